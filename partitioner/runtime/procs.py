"""Process-per-device backend of the local runtime: every logical device that has actions
runs in its own process (``torch.multiprocessing``, spawn), tensors travel between them
through shared memory.

Used by :class:`partitioner.runtime.local.LocalRuntime` with ``mode="processes"``. Each
child process runs the same :class:`~partitioner.runtime.worker.Worker` as the thread
runtime (interleaving the samples of a stream), with the whole process's intra-op
threads as its budget and no other Python thread computing beside it, so the devices
never share an interpreter lock or a thread pool. Transfers: the sender copies the
value into a fresh shared-memory tensor (never sharing a storage that its own next
segment may still read) and puts it on the receiver's queue; the receiver's main thread
files it in the run's mailbox and wakes its worker. The caller's process sends each
sample's inputs to the host device's process and gets the outputs back the same way.

Segments reach the children by pickling (weights in shared memory, not copied) when
their class can be imported, else (segments loaded from an artifact directory) by
loading them again from that directory in the child. CPU devices only; inference only
(children run under ``torch.inference_mode``).
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from ..errors import RuntimeFailure
from ..ir.schedule import Action, Schedule
from .worker import Run, Setup, Worker

log = logging.getLogger(__name__)

__all__ = ["ProcessBackend", "RemoteError"]

#: seconds a child may take to start (spawn, import torch, load its segments)
START_S = 180.0
STOP_S = 5.0


class RemoteError(Exception):
    """An exception raised in a device's process (its type and text; the object itself
    may not cross processes)."""


def _shared(value: Any) -> Any:
    """Every tensor of ``value`` copied into fresh shared memory."""
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.detach().clone().share_memory_() if isinstance(t, torch.Tensor) else t, value)


def _importable(m: Any) -> bool:
    cls = type(m)
    mod = sys.modules.get(cls.__module__)
    return mod is not None and cls.__module__ != "__main__" and getattr(mod, cls.__qualname__, None) is cls


def module_sources(art, tmp: Path) -> dict[str, tuple[str, Any]]:
    """How each device's process gets its segments: ``("module", m)`` (pickled, weights in
    shared memory) when the class can be imported, else ``("folder", path)``: the segment's
    folder in the artifact directory, or in a copy of the artifact saved under ``tmp`` when
    it has none (the emitted fx GraphModules of an in-memory artifact)."""
    from ..emit.artifact import save_artifact

    out: dict[str, tuple[str, Any]] = {}
    saved = art if getattr(art, "path", None) is not None else None
    for seg in art.schedule.segments:
        m = art.modules[seg.id]
        if _importable(m):
            out[seg.id] = ("module", m)
            continue
        if saved is None:
            saved = copy.copy(art)  # save_artifact records the path and code folders in the copy, not in art
            save_artifact(saved, tmp / "artifact", verify=False)
        out[seg.id] = ("folder", str(Path(saved.path) / saved.schedule.segment(seg.id).code))
    return out


class _ChildRun(Run):
    """A run inside a device's process: reports its end and its failure to the caller."""

    def __init__(self, rid: int, schedule: Schedule, results, dev: str, wake: threading.Event, book: dict):
        super().__init__(schedule, {}, 1, math.inf, [wake], t0=0.0, deadline=math.inf)
        self.rid, self.results, self.dev, self.book = rid, results, dev, book
        self.grad, self.inference = False, True

    def fail(self, message: str, err: BaseException) -> None:
        if not self.failed:
            hint = getattr(err, "hint", None) if isinstance(err, RuntimeFailure) else None
            self.results.put(("failed", self.rid, self.dev, time.perf_counter(), message, hint,
                              isinstance(err, RuntimeFailure), f"{type(err).__name__}: {err}"))
        super().fail(message, err)

    def finish_one(self) -> None:
        self.book["finished"].add(self.rid)
        self.book["runs"].pop(self.rid, None)
        outputs = _shared(self.outputs) if self.outputs and not self.failed else None
        self.results.put(("done", self.rid, self.dev, self.times, outputs))


class _ChildWorker(Worker):
    def __init__(self, *a, inboxes: dict, **kw):
        self.inboxes = inboxes
        super().__init__(*a, **kw)

    def post(self, run: Run, a: Action, value: Any) -> bool:
        self.inboxes[a.peer].put(("value", run.rid, a.tag, _shared(value)))
        return True


def _child_main(dev: str, schedule_json: dict, sources: dict, budget: int, in_flight: int, inboxes: dict,
                results) -> None:
    """Body of a device's process: load its segments, start its worker, then file every
    message of its inbox (runs, values from peers, aborts) until told to stop."""
    try:
        torch.set_num_threads(budget)
        schedule = Schedule.from_json(schedule_json)
        modules = {}
        for sid, (kind, src) in sources.items():
            if kind == "folder":
                from ..emit.segcode import load_segment

                modules[sid] = load_segment(Path(src), sid)
            else:
                modules[sid] = src
        wakers = {d: threading.Event() for d in schedule.devices}
        ready = threading.Barrier(2)
        setup = Setup(schedule, {d: torch.device("cpu") for d in schedule.devices}, modules)
        worker = _ChildWorker(setup, dev, budget, ready, wakers, in_flight, inboxes=inboxes)
        ready.wait()
    except BaseException:  # noqa: BLE001 - reported to the caller
        results.put(("fatal", dev, traceback.format_exc()))
        return
    results.put(("ready", dev))
    wake = wakers[dev]
    book: dict = {"runs": {}, "finished": set()}
    inbox = inboxes[dev]

    def get(rid: int) -> _ChildRun | None:
        if rid in book["finished"]:
            return None
        r = book["runs"].get(rid)
        if r is None:
            r = book["runs"][rid] = _ChildRun(rid, schedule, results, dev, wake, book)
        return r

    with torch.inference_mode():
        while True:
            msg = inbox.get()
            kind = msg[0]
            if kind == "stop":
                worker.submit(None)
                worker.thread.join(timeout=STOP_S)
                return
            r = get(msg[1])
            if r is None:
                continue
            if kind == "run":
                _, _, env, t0, deadline = msg
                r.env, r.t0, r.deadline = env or {}, t0, deadline
                worker.submit(r)
            elif kind == "value":
                slot = r.slots[msg[2]]
                slot.value, slot.ready = msg[3], True
                wake.set()
            elif kind == "abort":
                r.failed = True
                wake.set()


class ProcessBackend:
    """The device processes of one :class:`~partitioner.runtime.local.LocalRuntime`."""

    def __init__(self, artifact, schedule: Schedule, active: list[str], budgets: dict[str, int], in_flight: int):
        import torch.multiprocessing as tmp

        self.schedule = schedule
        self.active = active
        ctx = tmp.get_context("spawn")
        self.inboxes = {d: ctx.Queue() for d in active}
        self.results = ctx.Queue()
        self.runs: dict[int, Run] = {}
        self.next_rid = 0
        self.lock = threading.Lock()
        self.dead: str | None = None
        self.closing = False
        sources: dict[str, dict] = {d: {} for d in active}
        tmp = tempfile.TemporaryDirectory(prefix="partitioner-procs-")
        for sid, src in module_sources(artifact, Path(tmp.name)).items():
            sources[schedule.segment(sid).device][sid] = src
        self.procs = {d: ctx.Process(target=_child_main, name=f"partitioner-{d}", daemon=True,
                                     args=(d, schedule.to_json(), sources[d], budgets.get(d, 1), in_flight,
                                           self.inboxes, self.results)) for d in active}
        for p in self.procs.values():
            p.start()
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        finally:
            tmp.cleanup()  # the children have loaded their segments
        self.collector = threading.Thread(target=self._collect, name="partitioner-collector", daemon=True)
        self.collector.start()

    def _wait_ready(self) -> None:
        waiting, deadline = set(self.active), time.perf_counter() + START_S
        while waiting:
            try:
                msg = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [d for d in waiting if not self.procs[d].is_alive()]
                if dead or time.perf_counter() > deadline:
                    what = (f"the process of device {dead[0]} exited with code {self.procs[dead[0]].exitcode}"
                            if dead else f"the processes of {sorted(waiting)} did not start within {START_S:.0f} s")
                    raise RuntimeFailure(f"process runtime: {what}", hint="use mode='threads'") from None
                continue
            if msg[0] == "fatal":
                raise RuntimeFailure(f"process runtime: device {msg[1]} could not start:\n{msg[2]}",
                                     hint="use mode='threads', or check that the artifact loads in a fresh process")
            waiting.discard(msg[1])

    @property
    def n_workers(self) -> int:
        return len(self.active)

    def new_run(self, env: dict, timeout_s: float, t0: float | None = None, deadline: float | None = None) -> Run:
        run = Run(self.schedule, env, len(self.active), timeout_s, [], t0=t0, deadline=deadline, on_fail=self._abort)
        for d in self.active:
            run.current[d] = "its process (no report yet)"
        return run

    def submit(self, runs: list[Run]) -> None:
        """Start ``runs`` in every device's process (inputs to the host's, in shared memory)."""
        if self.dead:
            raise RuntimeFailure(f"process runtime: {self.dead}", hint="create a new LocalRuntime")
        cache: dict[int, torch.Tensor] = {}  # the same input tensor in several samples is shared once

        def share(t):
            if id(t) not in cache:
                cache[id(t)] = t.detach().clone().share_memory_()
            return cache[id(t)]

        import torch.utils._pytree as pytree

        host = self.schedule.host
        for run in runs:
            with self.lock:
                rid, self.next_rid = self.next_rid, self.next_rid + 1
                run.rid = rid
                self.runs[rid] = run
            env = {k: pytree.tree_map(lambda t: share(t) if isinstance(t, torch.Tensor) else t, v)
                   for k, v in run.env.items()}
            for d in self.active:
                self.inboxes[d].put(("run", rid, env if d == host else None, run.t0, run.deadline))

    def _abort(self, run: Run) -> None:
        rid = getattr(run, "rid", None)
        if rid is not None:
            for q in self.inboxes.values():
                q.put(("abort", rid))

    def _collect(self) -> None:
        """Files the children's reports into the runs; fails every run when a child dies."""
        while True:
            try:
                msg = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = [d for d, p in self.procs.items() if not p.is_alive()]
                if dead and self.dead is None and not self.closing:
                    self.dead = f"the process of device {dead[0]} died (exit code {self.procs[dead[0]].exitcode})"
                    for run in list(self.runs.values()):
                        run.fail(f"device {dead[0]}: {self.dead}", RuntimeFailure(self.dead))
                if self.closing or self.dead:
                    return
                continue
            except (EOFError, OSError, ValueError):  # the queue was closed
                return
            kind, rid = msg[0], msg[1]
            run = self.runs.get(rid)
            if run is None:
                continue
            if kind == "failed":
                _, _, dev, t, message, hint, is_rf, text = msg
                err = RuntimeFailure(text.split(": ", 1)[-1], hint=hint) if is_rf else RemoteError(text)
                with run.lock:
                    run.errors.append((t, message, err))
                    first, run.failed = not run.failed, True
                if first:
                    self._abort(run)
            elif kind == "done":
                _, _, dev, times, outputs = msg
                run.times.extend(times)
                if outputs is not None:
                    run.outputs = outputs
                run.current.pop(dev, None)
                run.finish_one()
                if run.done.is_set():
                    self.runs.pop(rid, None)

    def close(self) -> None:
        """Stop the device processes (killed after ``STOP_S`` when they do not end)."""
        self.closing = True
        for d, q in self.inboxes.items():
            try:
                q.put(("stop",))
            except (ValueError, OSError):
                pass
        deadline = time.perf_counter() + STOP_S
        for p in self.procs.values():
            p.join(timeout=max(0.0, deadline - time.perf_counter()))
            if p.is_alive():
                p.kill()
                p.join(timeout=1.0)
        for q in (*self.inboxes.values(), self.results):
            q.close()
            q.cancel_join_thread()
