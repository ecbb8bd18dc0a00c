"""Local runtime: execute an emitted plan with one worker thread per logical device.

Every spec device that has actions in the :class:`~partitioner.ir.schedule.Schedule` gets a
persistent worker thread that runs its actions in order: ``compute`` calls the segment's
module on the values it holds, ``send`` moves a value to the peer's torch device and
posts it in a mailbox (never blocking), ``recv`` waits for its mailbox (up to the run's
timeout). Values are dropped after their last local use.

Devices
-------
``map_devices`` maps spec device ids to torch devices (default: everything to ``cpu``,
so a plan for GPUs is exercised end to end on a CPU-only machine). Segments are moved to
their torch device once, when the runtime is built (a deep copy when that moves weights,
so the traced model is never modified). On CUDA, each worker computes on its own stream;
a send from a GPU copies on a per-device copy stream after waiting for the compute
stream, with ``.to(device, non_blocking=True)``, and records a CUDA event the receiver
waits on (``wait_event`` on a GPU, ``synchronize`` on the CPU) before using the value.
Between two logical devices mapped to the same torch device a value is passed by
reference (``copy_same_device=True`` clones it, as a real transfer would).

Threads on the CPU
------------------
``torch.set_num_threads`` is process-wide in name only: with the OpenMP backend (see
``torch.__config__.parallel_info()``) it sets the calling thread's OpenMP team size and
MKL's thread-local count, plus a global default that threads initialise from. Each CPU
worker that computes therefore calls ``torch.set_num_threads(budget)`` once in its own
thread when it starts (after forcing ATen's lazy per-thread initialisation, which would
otherwise reset the count to the global default on the first parallel op), and the
runtime then restores the caller's own count and the global default before its
constructor returns. Budgets: ``threads`` (an int for every CPU worker, or a dict per
spec device); by default the caller's ``torch.get_num_threads()`` split evenly over the
CPU workers that compute (at least 1 each). Workers run concurrently, so the process may
use the sum of the budgets. Other backends (TBB, native) are not per-thread: there the
budgets are best effort.

Measurements
------------
Every run records each action's wall-clock start and end relative to the run's start
(:class:`RunStats`); with ``profile=True`` CUDA workers synchronise after each compute so
its time is the kernel time, not the launch time. ``RunStats.fidelity(schedule)``
compares measured segment times with the plan's predictions.

Streams (pipelining)
--------------------
:meth:`LocalRuntime.stream` submits N samples at once: every worker runs its program
once per sample, with per-sample mailboxes (transfers are tagged per sample), and
interleaves samples: it runs the next action of the oldest sample that can make
progress, so a device that waits for one sample's values (the host waiting for a
sample's outputs, or for an intermediate value it computes on) starts the next sample
meanwhile and stages overlap across samples whatever the stage order
(:mod:`partitioner.runtime.worker`). :func:`stream_replicas` shares a stream among the runtimes of a
data-parallel plan's replicas (:func:`partitioner.emit.build.emit_replicas`) in proportion to
their predicted throughputs. :class:`StreamStats` reports measured samples/s next to
``1 / meta["predicted_period_s"]``. Measured throughput reaches the prediction only when
every device has its own core: the period model assumes devices never wait mid-program.

Grad mode and inference mode of the calling thread apply in the workers. A failing
segment, a timeout or a worker that hangs ends the run with a
:class:`~partitioner.errors.RuntimeFailure` naming the device and action; a runtime
whose worker is still stuck refuses further runs.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from typing import Any

import torch

from ..errors import RuntimeFailure, UsageError
from ..ir.schedule import Schedule
from ..ir.tree import tree_unflatten
from .stats import RunStats, StreamStats, _predicted_rate
from .stream import stream_replicas
from .traced import SEGMENT_MODES
from .worker import Run, Setup, Worker, stop_workers

log = logging.getLogger(__name__)

__all__ = ["LocalRuntime", "resolve_devices", "run_once", "computing_cpu_devices", "open_replicas", "choose_mode",
           "MODES"]


def resolve_devices(schedule: Schedule, map_devices: Any = None) -> dict[str, torch.device]:
    """Spec device id -> torch device: ``None`` (all cpu), one device for all, or a dict
    (unlisted devices go to cpu). Checks that CUDA devices exist."""
    if map_devices is None or isinstance(map_devices, (str, torch.device)):
        default = torch.device(map_devices or "cpu")
        table = {}
    elif isinstance(map_devices, dict):
        default = torch.device("cpu")
        table = dict(map_devices)
        unknown = sorted(set(table) - set(schedule.devices))
        if unknown:
            raise UsageError(f"map_devices names unknown spec device(s) {unknown}",
                             hint=f"the schedule's devices are {', '.join(schedule.devices)}")
    else:
        raise UsageError(f"map_devices must be a device or a dict, got {type(map_devices).__name__}",
                         hint="e.g. {'gpu0': 'cuda:0', 'gpu1': 'cuda:1'}")
    out = {}
    for d in schedule.devices:
        try:
            out[d] = torch.device(table.get(d, default))
        except (RuntimeError, TypeError) as err:
            raise UsageError(f"map_devices[{d!r}] = {table.get(d)!r} is not a torch device: {err}",
                             hint="use 'cpu', 'cuda', 'cuda:1', ...") from None
        dev = out[d]
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeFailure(f"spec device {d!r} is mapped to {dev}, but CUDA is not available",
                                     hint="map it to 'cpu' (the default), or run on a machine with a GPU")
            if (dev.index or 0) >= torch.cuda.device_count():
                raise RuntimeFailure(f"spec device {d!r} is mapped to {dev}, but only "
                                     f"{torch.cuda.device_count()} CUDA device(s) exist", hint="use another index")
        elif dev.type not in ("cpu", "meta"):
            log.warning("spec device %s mapped to %s: no stream handling for this device type", d, dev)
    return out


#: seconds the caller waits beyond ``timeout_s`` for the workers, and again after aborting
_GRACE_S = 5.0
#: the local runtime's ways to run devices (see LocalRuntime's ``mode``)
MODES = ("threads", "processes")
#: choose_mode keeps the process runtime only when it streams this much faster than threads
PROCESS_MARGIN = 1.05


def computing_cpu_devices(schedule: Schedule, devices: dict[str, torch.device]) -> list[str]:
    """The spec devices that compute a segment and are mapped to a CPU (the workers that
    get an intra-op thread budget)."""
    return [d for d in schedule.devices if devices[d].type == "cpu"
            and any(a.op == "compute" for a in schedule.actions.get(d, ()))]


class LocalRuntime:
    """Run an :class:`~partitioner.emit.build.Artifact` on this machine (see the module docstring).

    Parameters
    ----------
    artifact : Artifact
    map_devices : str or dict, optional
        Spec device id -> torch device; default all ``cpu``.
    threads : int or dict, optional
        Intra-op thread budget of each CPU worker that computes.
    timeout_s : float
        Longest a run may take; a recv waiting longer fails the run.
    copy_same_device : bool
        Clone values passed between logical devices on the same torch device.
    profile : bool
        Synchronise CUDA streams after each compute for exact action times.
    in_flight : int, optional
        In a stream, how many samples a device may have started and not finished (its
        window, see :class:`~partitioner.runtime.worker.Worker`); default: the number of
        segments plus one, enough for every stage of the pipeline to hold a sample.
    mode : {"threads", "processes"}
        ``"threads"``: one worker thread per device in this process. ``"processes"``:
        one process per device (:mod:`partitioner.runtime.procs`; CPU devices and
        inference only), for models whose devices would otherwise contend for the
        interpreter lock; see docs/runtime.md for when it pays.
    segments : {"eager", "traced"}
        ``"eager"``: call the segments' modules. ``"traced"``: run each segment as a
        TorchScript trace (made on its first call with each input signature, checked
        against the module's outputs), which computes without holding the interpreter
        lock, so that CPU workers of one process do not wait for each other on models
        of many small ops; a segment that cannot be traced faithfully, and every
        segment while grad mode is on, runs eagerly
        (:mod:`partitioner.runtime.traced`).

    Examples
    --------
    >>> with LocalRuntime(artifact, {"gpu0": "cuda:0"}) as rt:   # doctest: +SKIP
    ...     out = rt.run(x)
    ...     print(rt.last_stats.wall_s)
    """

    def __init__(self, artifact, map_devices: Any = None, *, threads: int | dict | None = None,
                 timeout_s: float = 300.0, copy_same_device: bool = False, profile: bool = False,
                 in_flight: int | None = None, mode: str = "threads", segments: str = "eager"):
        if not timeout_s > 0:
            raise UsageError(f"timeout_s must be > 0, got {timeout_s}", hint="e.g. timeout_s=60")
        if in_flight is not None and not (isinstance(in_flight, int) and in_flight >= 1):
            raise UsageError(f"in_flight must be an integer >= 1, got {in_flight!r}", hint="e.g. in_flight=4")
        if mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", hint="e.g. mode='threads'")
        if segments not in SEGMENT_MODES:
            raise UsageError(f"segments must be one of {', '.join(SEGMENT_MODES)}, got {segments!r}",
                             hint="e.g. segments='traced'")
        self.mode = mode
        self.segments = segments
        self.artifact = artifact
        self.schedule: Schedule = artifact.schedule
        self.devices = resolve_devices(self.schedule, map_devices)
        self.timeout_s = float(timeout_s)
        self.copy_same_device = copy_same_device
        self.profile = profile
        self.modules = {}
        for seg in self.schedule.segments:
            self.modules[seg.id] = _place(artifact.modules[seg.id], self.devices[seg.device])
        s = self.schedule
        active = [d for d in s.devices if s.actions.get(d) or d == s.host]
        computing = computing_cpu_devices(s, self.devices)
        budgets = self._budgets(threads, computing)
        self._wakers = {d: threading.Event() for d in s.devices}
        self.in_flight = in_flight or len(s.segments) + 1
        self._workers: list[Worker] = []
        self._procs = None
        if mode == "processes":
            from .procs import ProcessBackend

            gpu = sorted(d for d in active if self.devices[d].type != "cpu")
            if gpu:
                raise UsageError(f"the process runtime runs CPU devices only; {gpu} are mapped to "
                                 f"{sorted({str(self.devices[d]) for d in gpu})}", hint="use mode='threads'")
            self._procs = ProcessBackend(artifact, s, active, budgets, self.in_flight, segments)
            self._finalizer = weakref.finalize(self, self._procs.close)
        else:
            own = torch.get_num_threads()
            ready = threading.Barrier(len(active) + 1)
            setup = Setup(s, self.devices, self.modules, copy_same_device, profile, segments)
            self._workers = [Worker(setup, d, budgets.get(d), ready, self._wakers, self.in_flight) for d in active]
            try:
                ready.wait(timeout=60)
            finally:
                torch.set_num_threads(own)  # restore the caller's count and the global default
            self._finalizer = weakref.finalize(self, stop_workers, list(self._workers))
        self._lock = threading.Lock()
        self._broken: str | None = None
        self.last_stats: RunStats | None = None
        self.thread_budgets = budgets
        log.info("local runtime (%s): %s; CPU thread budgets %s", mode,
                 ", ".join(f"{d}->{self.devices[d]}" for d in active), budgets)

    def _new_run(self, env: dict, t0: float | None = None, deadline: float | None = None) -> Run:
        if self._procs is not None:
            return self._procs.new_run(env, self.timeout_s, t0=t0, deadline=deadline)
        return Run(self.schedule, env, len(self._workers), self.timeout_s, list(self._wakers.values()), t0=t0,
                   deadline=deadline)

    def _submit(self, runs: list[Run]) -> None:
        if self._procs is not None:
            if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
                raise UsageError("the process runtime runs inference only, and grad mode is on",
                                 hint="call it under torch.no_grad() or torch.inference_mode(), or use mode='threads'")
            self._procs.submit(runs)
            return
        for w in self._workers:
            for r in runs:
                w.submit(r)

    @staticmethod
    def _budgets(threads, computing: list[str]) -> dict[str, int]:
        if threads is None:
            each = max(1, torch.get_num_threads() // max(1, len(computing)))
            return {d: each for d in computing}
        if isinstance(threads, int):
            if threads < 1:
                raise UsageError(f"threads must be >= 1, got {threads}", hint="e.g. threads=1")
            return {d: threads for d in computing}
        if isinstance(threads, dict):
            bad = {d: t for d, t in threads.items() if not (isinstance(t, int) and t >= 1)}
            if bad:
                raise UsageError(f"thread budgets must be integers >= 1, got {bad}", hint="e.g. {'cpu0': 2}")
            return {d: int(threads[d]) for d in computing if d in threads}
        raise UsageError(f"threads must be an int or a dict, got {type(threads).__name__}", hint="e.g. threads=1")

    # -- running
    def run(self, *inputs, **kw_inputs) -> Any:
        """Run the schedule once; return the outputs (structured like the model's). Keyword
        inputs are bound by the model's parameter names."""
        return self.run_with_stats(*inputs, **kw_inputs)[0]

    def run_with_stats(self, *inputs, **kw_inputs) -> tuple[Any, RunStats]:
        """Run once; return ``(outputs, RunStats)`` (also kept in ``last_stats``)."""
        from ..ir.inputs import bind_inputs

        if self._broken:
            raise RuntimeFailure(f"this runtime is unusable: {self._broken}", hint="create a new LocalRuntime")
        if not self._finalizer.alive:
            raise RuntimeFailure("this runtime is closed", hint="create a new LocalRuntime")
        env = bind_inputs(self.schedule, inputs, kw_inputs)
        with self._lock:
            run = self._new_run(env)
            self._submit([run])
            finished = run.done.wait(timeout=self.timeout_s + _GRACE_S)
            if not finished:
                run.fail("timeout", TimeoutError())
                finished = run.done.wait(timeout=_GRACE_S)
            wall = time.perf_counter() - run.t0
        self._check(run, finished)
        run.times.sort(key=lambda a: (a.start_s, a.device, a.index))
        self.last_stats = RunStats(wall, run.times)
        return tree_unflatten(self.schedule.outputs, run.outputs.__getitem__), self.last_stats

    def _check(self, run: Run, finished: bool, what: str = "the run") -> None:
        if not finished:
            stuck = "; ".join(f"{d} at {w}" for d, w in sorted(run.current.items()))
            self._broken = f"a worker did not finish within {self.timeout_s:.0f} s ({stuck})"
            raise RuntimeFailure(f"{what} did not finish within {self.timeout_s:.0f} s: {stuck}",
                                 hint="a segment hangs or is far slower than planned; raise timeout_s")
        if run.errors:
            real = [e for e in run.errors if e[1] not in ("timeout", "aborted")] or run.errors
            _, msg, err = min(real, key=lambda e: e[0])
            prefix = "" if what == "the run" else f"{what}: "
            if isinstance(err, RuntimeFailure):
                raise RuntimeFailure(prefix + msg, hint=err.hint) from err
            raise RuntimeFailure(prefix + msg, hint="the segment's code raised: check the inputs' shapes and dtypes "
                                                    "against the example inputs") from err

    def stream(self, inputs_list: list) -> tuple[list, "StreamStats"]:
        """Pipeline a list of samples through the plan; return ``(outputs, StreamStats)``.

        Every worker runs its program once per sample, interleaving samples: it runs the
        next action of the oldest sample that can make progress (see
        :class:`~partitioner.runtime.worker.Worker`), so while a device computes sample
        ``k`` the device before it in the pipeline already computes sample ``k + 1``, and
        a device that waits for sample ``k``'s values starts sample ``k + 1`` meanwhile.
        Each sample has its own mailboxes, so transfers are tagged per sample. Sample ``k``
        must finish within ``(k + 1) * timeout_s`` of the stream's start; the first
        failure aborts the samples after it and is raised as for :meth:`run`.

        Parameters
        ----------
        inputs_list : list
            One entry per sample: a tuple of call arguments (or a single tensor).
        """
        from ..ir.inputs import bind_inputs

        if self._broken:
            raise RuntimeFailure(f"this runtime is unusable: {self._broken}", hint="create a new LocalRuntime")
        if not self._finalizer.alive:
            raise RuntimeFailure("this runtime is closed", hint="create a new LocalRuntime")
        envs = [bind_inputs(self.schedule, x if isinstance(x, tuple) else (x,)) for x in inputs_list]
        if not envs:
            return [], StreamStats(0, 0.0, [], [], _predicted_rate(self.schedule))
        with self._lock:
            t0 = time.perf_counter()
            runs = [self._new_run(env, t0=t0, deadline=t0 + self.timeout_s * (k + 1)) for k, env in enumerate(envs)]
            self._submit(runs)
            bad: tuple[int, bool] | None = None
            for k, r in enumerate(runs):
                finished = r.done.wait(timeout=max(0.0, r.deadline - time.perf_counter()) + _GRACE_S)
                if not finished:
                    r.fail("timeout", TimeoutError())
                    finished = r.done.wait(timeout=_GRACE_S)
                if not finished or r.errors:
                    bad = (k, finished)
                    break
            if bad is not None:
                for r in runs[bad[0] + 1:]:
                    r.fail("aborted", RuntimeFailure("aborted"))
                for r in runs[bad[0] + 1:]:
                    r.done.wait(timeout=_GRACE_S)
                self._check(runs[bad[0]], bad[1], f"sample {bad[0]} of the stream")
            wall = time.perf_counter() - t0
        outputs = [tree_unflatten(self.schedule.outputs, r.outputs.__getitem__) for r in runs]
        starts = [min((a.start_s for a in r.times), default=0.0) for r in runs]
        ends = [r.end - t0 for r in runs]
        acts = [sorted(r.times, key=lambda a: (a.start_s, a.device, a.index)) for r in runs]
        return outputs, StreamStats(len(runs), wall, starts, ends, _predicted_rate(self.schedule), acts)

    def close(self) -> None:
        """Stop the worker threads or processes (also done when the runtime is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> "LocalRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_replicas(artifacts: list, map_devices: Any = None, *, threads: int | dict | None = None,
                  timeout_s: float = 300.0, **kw) -> list[LocalRuntime]:
    """One :class:`LocalRuntime` per replica of a data-parallel plan (``artifacts`` from
    :func:`partitioner.emit.build.emit_replicas`), for :func:`~partitioner.runtime.stream.stream_replicas`. The replicas run
    at the same time, so by default the caller's ``torch.get_num_threads()`` is split
    evenly over the CPU workers that compute in *all* replicas (at least 1 each), not
    given whole to each replica. ``kw`` goes to every runtime."""
    if threads is None:
        n = sum(len(computing_cpu_devices(a.schedule, resolve_devices(a.schedule, map_devices))) for a in artifacts)
        threads = max(1, torch.get_num_threads() // max(1, n))
    rts: list[LocalRuntime] = []
    try:
        for a in artifacts:
            rts.append(LocalRuntime(a, map_devices, threads=threads, timeout_s=timeout_s, **kw))
    except BaseException:
        for rt in rts:
            rt.close()
        raise
    return rts


def choose_mode(artifacts: list, inputs: tuple, map_devices: Any = None, *, threads: int | dict | None = None,
                timeout_s: float = 300.0, samples: int | None = None, modes: tuple[str, ...] = MODES,
                segments: tuple[str, ...] = ("eager",)) -> tuple[list[LocalRuntime], dict]:
    """Open the replicas ``artifacts`` (:func:`open_replicas`) the way that streams
    ``inputs`` fastest here, chosen by measurement among every runtime of ``modes`` with
    every way of running segments of ``segments``: a short stream (``samples``; default
    three windows of samples, at least 8) through each after a warm-up. The process
    runtime is kept only when it beats the best thread runtime by ``PROCESS_MARGIN``
    (threads start at once and keep grad mode). The runtimes not chosen are closed. Plans
    with a device off the CPU use threads (and the first of ``segments``) without a trial
    (``modes`` without threads: the process runtime, which refuses them with a clear error).

    Returns
    -------
    (list of LocalRuntime, dict)
        The runtimes, and ``{"mode", "segments", "trial_samples", "rates"}``, ``rates``
        mapping ``"MODE/SEGMENTS"`` to the trial's samples/s.
    """
    bad = [m for m in modes if m not in MODES] + [g for g in segments if g not in SEGMENT_MODES]
    if bad or not modes or not segments:
        raise UsageError(f"choose_mode: modes must be among {MODES} and segments among {SEGMENT_MODES}, got "
                         f"{modes} and {segments}", hint="e.g. modes=('threads', 'processes'), segments=('eager',)")
    devs = [resolve_devices(a.schedule, map_devices) for a in artifacts]
    if any(t.type != "cpu" for d in devs for t in d.values()):
        mode = "threads" if "threads" in modes else modes[0]  # processes alone: LocalRuntime refuses, clearly
        rts = open_replicas(artifacts, map_devices, threads=threads, timeout_s=timeout_s, mode=mode,
                            segments=segments[0])
        return rts, {"mode": mode, "segments": segments[0]}
    n = samples or max(8, 3 * max(len(a.schedule.segments) + 1 for a in artifacts))
    rates: dict[str, float] = {}
    best: tuple[float, str, str, list[LocalRuntime]] | None = None
    for mode in modes:
        for seg in segments:
            rts = []
            try:
                rts = open_replicas(artifacts, map_devices, threads=threads, timeout_s=timeout_s, mode=mode,
                                    segments=seg)
                with torch.inference_mode():
                    stream_replicas(rts, [tuple(inputs)] * min(n, 4))
                    rate = rates[f"{mode}/{seg}"] = stream_replicas(rts, [tuple(inputs)] * n)[1].samples_per_s
            except BaseException:
                for rt in rts + (best[3] if best is not None else []):
                    rt.close()
                raise
            rate /= PROCESS_MARGIN if mode == "processes" else 1.0
            if best is None or rate > best[0]:
                best, loser = (rate, mode, seg, rts), (best[3] if best is not None else [])
            else:
                loser = rts
            for rt in loser:
                rt.close()
    _, mode, seg, rts = best
    log.info("runtime by measurement: %s runtime, %s segments (trial of %d samples: %s)", mode, seg, n,
             ", ".join(f"{k} {v:.3g}/s" for k, v in rates.items()))
    return rts, {"mode": mode, "segments": seg, "trial_samples": n, "rates": rates}


def _place(module: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``module`` on ``dev``: itself when its tensors are already there, else a moved deep copy."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device == dev for t in tensors):
        return module
    return copy.deepcopy(module).to(dev)


def run_once(artifact, *inputs, **kw):
    """Run ``artifact`` once on a :class:`LocalRuntime` (``kw`` as for it) and return the outputs."""
    with LocalRuntime(artifact, **kw) as rt:
        return rt.run(*inputs)
