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
once per sample, in sample order, with per-sample mailboxes (transfers are tagged per
sample), so stages overlap across samples. A device's trailing recvs (the host's model
outputs) are waited for by a helper thread of that worker, so the host starts the next
sample at once. :func:`stream_replicas` shares a stream among the runtimes of a
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
import math
import queue
import threading
import time
import weakref
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import ArtifactError, RuntimeFailure, UsageError
from ..ir.schedule import Action, Schedule
from ..ir.tree import tree_unflatten
from .stats import ActionTime, RunStats, StreamStats, _predicted_rate

log = logging.getLogger(__name__)

__all__ = ["LocalRuntime", "resolve_devices", "run_once"]


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


class _Slot:
    __slots__ = ("event", "value", "cuda_event")

    def __init__(self):
        self.event = threading.Event()
        self.value = None
        self.cuda_event = None


class _Run:
    """State of one run shared by the workers."""

    def __init__(self, schedule: Schedule, env: dict, n_workers: int, timeout_s: float,
                 t0: float | None = None, deadline: float | None = None):
        self.slots = {t.tag: _Slot() for t in schedule.transfers}
        self.env = env
        self.t0 = time.perf_counter() if t0 is None else t0
        self.deadline = self.t0 + timeout_s if deadline is None else deadline
        self.end = math.nan
        self.failed = False
        self.errors: list[tuple[float, str, BaseException]] = []
        self.lock = threading.Lock()
        self.left = n_workers
        self.done = threading.Event()
        self.outputs: dict[str, Any] = {}
        self.times: list[ActionTime] = []
        self.current: dict[str, str] = {}
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()

    def fail(self, message: str, err: BaseException) -> None:
        with self.lock:
            self.errors.append((time.perf_counter(), message, err))
            self.failed = True
        for s in self.slots.values():
            s.event.set()

    def finish_one(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.end = time.perf_counter()
                self.done.set()


class _Worker:
    """One logical device: a thread that runs its actions for every submitted run."""

    def __init__(self, rt: "LocalRuntime", dev: str, budget: int | None, ready: threading.Barrier):
        s = rt.schedule
        self.dev = dev
        self.tdev = rt.devices[dev]
        self.devices = rt.devices
        self.actions: tuple[Action, ...] = tuple(s.actions.get(dev, ()))
        self.segs = {x.id: x for x in s.segments}
        self.modules = rt.modules
        self.copy_same = rt.copy_same_device
        self.profile = rt.profile
        self.is_host = dev == s.host
        self.outputs = s.output_values if self.is_host else []
        self.inputs = s.inputs if self.is_host else ()
        last = s.last_uses(dev)
        # where a failure happened, spelled once (not on every action of every run)
        self.where = [f"action #{k} ({a.describe()})" for k, a in enumerate(self.actions)]
        self.free_after: list[list[str]] = [[] for _ in self.actions]
        for v, k in last.items():
            self.free_after[k].append(v)
        self.cuda = self.tdev.type == "cuda"
        self.stream = torch.cuda.Stream(self.tdev) if self.cuda else None
        self.copy_stream = torch.cuda.Stream(self.tdev) if self.cuda else None
        self.budget = budget
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        tail = len(self.actions)
        while tail > 0 and self.actions[tail - 1].op == "recv":
            tail -= 1
        self.tail_start = tail
        self.tail_queue: queue.SimpleQueue | None = None
        self.tail_thread: threading.Thread | None = None
        if tail < len(self.actions) and tail > 0:
            self.tail_queue = queue.SimpleQueue()
            self.tail_thread = threading.Thread(target=self._tail_loop, name=f"partitioner-{dev}-tail", daemon=True)
            self.tail_thread.start()
        self.thread = threading.Thread(target=self._loop, args=(ready,), name=f"partitioner-{dev}", daemon=True)
        self.thread.start()

    # -- thread body
    def _loop(self, ready: threading.Barrier) -> None:
        if self.budget is not None:
            # ATen initialises a thread's count lazily, from the global default, on its first
            # parallel call: trigger that first, or it would later undo the budget.
            torch.get_num_threads()
            torch.set_num_threads(self.budget)
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return
        while True:
            run = self.queue.get()
            if run is None:
                if self.tail_queue is not None:
                    self.tail_queue.put(None)
                return
            handed = False
            try:
                with self._context(run):
                    handed = self._execute(run)
            except BaseException as err:  # noqa: BLE001 - reported to the caller
                self._fail(run, err)
            finally:
                if not handed:
                    run.finish_one()

    def _context(self, run: _Run):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(run.inference))
        stack.enter_context(torch.set_grad_enabled(run.grad))
        if self.cuda:
            stack.enter_context(torch.cuda.device(self.tdev))
            stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def _fail(self, run: _Run, err: BaseException) -> None:
        where = run.current.get(self.dev, "start")
        run.fail(f"device {self.dev} ({self.tdev}) failed at {where}: {type(err).__name__}: {err}", err)

    def _tail_loop(self) -> None:
        """Trailing recvs (the host's model outputs) of each run, in run order, so that
        the worker can start the next sample meanwhile (pipelined streams)."""
        while True:
            item = self.tail_queue.get()
            if item is None:
                return
            run, store = item
            try:
                with self._context(run):
                    if self._actions(run, store, self.tail_start, len(self.actions)):
                        self._collect(run, store)
            except BaseException as err:  # noqa: BLE001 - reported to the caller
                self._fail(run, err)
            finally:
                run.finish_one()

    def _execute(self, run: _Run) -> bool:
        """Run the actions before the trailing recvs; return True when the rest was
        handed to the tail thread (which then finishes the run)."""
        store: dict[str, Any] = {}
        if self.is_host:
            for v in self.inputs:
                store[v] = _tree_to(run.env[v], self.tdev)
        if not self._actions(run, store, 0, self.tail_start):
            return False
        if self.tail_queue is not None:
            self.tail_queue.put((run, store))
            return True
        self._collect(run, store)
        return False

    def _collect(self, run: _Run, store: dict) -> None:
        if self.is_host:
            if self.cuda:
                self.stream.synchronize()
            run.outputs = {v: store[v] for v in self.outputs}

    def _actions(self, run: _Run, store: dict, lo: int, hi: int) -> bool:
        """Actions ``lo:hi``; False when the run was aborted meanwhile."""
        for k in range(lo, hi):
            a = self.actions[k]
            if run.failed:
                return False
            run.current[self.dev] = self.where[k]
            t0 = time.perf_counter()
            if a.op == "compute":
                seg = self.segs[a.segment]
                outs = self.modules[a.segment](*[store[v] for v in seg.inputs])
                if not isinstance(outs, (tuple, list)) or len(outs) != len(seg.outputs):
                    raise ArtifactError(f"segment {seg.id!r} returned {type(outs).__name__}, expected a tuple of "
                                        f"{len(seg.outputs)}", hint="emit the plan again")
                store.update(zip(seg.outputs, outs))
                if self.profile and self.cuda:
                    self.stream.synchronize()
            elif a.op == "send":
                self._send(run, store[a.value], a)
            else:
                store[a.value] = self._recv(run, a, k)
                if store[a.value] is _ABORTED:
                    return False
            t1 = time.perf_counter()
            for v in self.free_after[k]:
                store.pop(v, None)
            run.times.append(ActionTime(self.dev, k, a.op, a.segment if a.op == "compute" else a.value,
                                        t0 - run.t0, t1 - run.t0))
        return True

    def _send(self, run: _Run, value: Any, a: Action) -> None:
        dst = self.devices[a.peer]
        slot = run.slots[a.tag]
        if dst == self.tdev:
            slot.value = _tree_clone(value) if self.copy_same else value
        elif self.cuda:
            self.copy_stream.wait_stream(self.stream)
            with torch.cuda.stream(self.copy_stream):
                slot.value = _tree_to(value, dst, non_blocking=True)
                for t in _tensors(value):
                    t.record_stream(self.copy_stream)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            slot.cuda_event = ev
        elif dst.type == "cuda":
            slot.value = _tree_to(value, dst, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dst))
            slot.cuda_event = ev
        else:
            slot.value = _tree_to(value, dst)
        slot.event.set()

    def _recv(self, run: _Run, a: Action, k: int) -> Any:
        slot = run.slots[a.tag]
        if not slot.event.wait(timeout=max(0.0, run.deadline - time.perf_counter())):
            raise RuntimeFailure(f"device {self.dev} waited {run.deadline - run.t0:.1f} s at action #{k} for "
                                 f"{a.value!r} from {a.peer}, which never arrived",
                                 hint="the sending device is stuck or much slower than expected; raise timeout_s")
        if run.failed:
            return _ABORTED
        ev = slot.cuda_event
        if ev is not None:
            if self.cuda:
                self.stream.wait_event(ev)
                for t in _tensors(slot.value):
                    if t.device == self.tdev:
                        t.record_stream(self.stream)
            else:
                ev.synchronize()
        return slot.value


_ABORTED = object()
#: seconds the caller waits beyond ``timeout_s`` for the workers, and again after aborting
_GRACE_S = 5.0
_JOIN_S = 2.0  # how long close() waits for the worker threads to end


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _tree_to(value: Any, dev: torch.device, non_blocking: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dev, non_blocking=non_blocking)
    return pytree.tree_map(lambda t: t.to(dev, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t,
                           value)


def _tree_clone(value: Any) -> Any:
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


def _stop(workers: list[_Worker]) -> None:
    """Stop the workers and wait (a little) for their threads to end: a thread still tearing
    down its intra-op pool while the interpreter exits can abort the process ("terminate
    called without an active exception")."""
    for w in workers:
        w.queue.put(None)
    me = threading.current_thread()
    deadline = time.perf_counter() + _JOIN_S
    for w in workers:
        for th in (w.thread, w.tail_thread):
            if th is not None and th is not me and th.is_alive():
                th.join(timeout=max(0.0, deadline - time.perf_counter()))


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

    Examples
    --------
    >>> with LocalRuntime(artifact, {"gpu0": "cuda:0"}) as rt:   # doctest: +SKIP
    ...     out = rt.run(x)
    ...     print(rt.last_stats.wall_s)
    """

    def __init__(self, artifact, map_devices: Any = None, *, threads: int | dict | None = None,
                 timeout_s: float = 300.0, copy_same_device: bool = False, profile: bool = False):
        if not timeout_s > 0:
            raise UsageError(f"timeout_s must be > 0, got {timeout_s}", hint="e.g. timeout_s=60")
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
        computing = [d for d in active if self.devices[d].type == "cpu"
                     and any(a.op == "compute" for a in s.actions.get(d, ()))]
        budgets = self._budgets(threads, computing)
        own = torch.get_num_threads()
        ready = threading.Barrier(len(active) + 1)
        self._workers = [_Worker(self, d, budgets.get(d), ready) for d in active]
        try:
            ready.wait(timeout=60)
        finally:
            torch.set_num_threads(own)  # restore the caller's count and the global default
        self._finalizer = weakref.finalize(self, _stop, list(self._workers))
        self._lock = threading.Lock()
        self._broken: str | None = None
        self.last_stats: RunStats | None = None
        self.thread_budgets = budgets
        log.info("local runtime: %s; CPU thread budgets %s",
                 ", ".join(f"{d}->{self.devices[d]}" for d in active), budgets)

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
    def run(self, *inputs) -> Any:
        """Run the schedule once; return the outputs (structured like the model's)."""
        return self.run_with_stats(*inputs)[0]

    def run_with_stats(self, *inputs) -> tuple[Any, RunStats]:
        """Run once; return ``(outputs, RunStats)`` (also kept in ``last_stats``)."""
        from ..ir.schedule import bind_inputs

        if self._broken:
            raise RuntimeFailure(f"this runtime is unusable: {self._broken}", hint="create a new LocalRuntime")
        if not self._finalizer.alive:
            raise RuntimeFailure("this runtime is closed", hint="create a new LocalRuntime")
        env = bind_inputs(self.schedule, inputs)
        with self._lock:
            run = _Run(self.schedule, env, len(self._workers), self.timeout_s)
            for w in self._workers:
                w.queue.put(run)
            finished = run.done.wait(timeout=self.timeout_s + _GRACE_S)
            if not finished:
                run.fail("timeout", TimeoutError())
                finished = run.done.wait(timeout=_GRACE_S)
            wall = time.perf_counter() - run.t0
        self._check(run, finished)
        run.times.sort(key=lambda a: (a.start_s, a.device, a.index))
        self.last_stats = RunStats(wall, run.times)
        return tree_unflatten(self.schedule.outputs, run.outputs.__getitem__), self.last_stats

    def _check(self, run: _Run, finished: bool, what: str = "the run") -> None:
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

        Every worker runs its program once per sample, in sample order, as soon as the
        values it needs for that sample are there: while a device computes sample ``k``,
        the device before it in the pipeline already computes sample ``k + 1``. Each
        sample has its own mailboxes, so transfers are tagged per sample. Sample ``k``
        must finish within ``(k + 1) * timeout_s`` of the stream's start; the first
        failure aborts the samples after it and is raised as for :meth:`run`.

        Parameters
        ----------
        inputs_list : list
            One entry per sample: a tuple of call arguments (or a single tensor).
        """
        from ..ir.schedule import bind_inputs

        if self._broken:
            raise RuntimeFailure(f"this runtime is unusable: {self._broken}", hint="create a new LocalRuntime")
        if not self._finalizer.alive:
            raise RuntimeFailure("this runtime is closed", hint="create a new LocalRuntime")
        envs = [bind_inputs(self.schedule, x if isinstance(x, tuple) else (x,)) for x in inputs_list]
        if not envs:
            return [], StreamStats(0, 0.0, [], [], _predicted_rate(self.schedule))
        with self._lock:
            t0 = time.perf_counter()
            runs = [_Run(self.schedule, env, len(self._workers), self.timeout_s, t0=t0,
                         deadline=t0 + self.timeout_s * (k + 1)) for k, env in enumerate(envs)]
            for w in self._workers:
                for r in runs:
                    w.queue.put(r)
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
        """Stop the worker threads (also done when the runtime is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> "LocalRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
