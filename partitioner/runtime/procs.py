"""Process-per-device backend of the local runtime: every logical device that has actions
runs in its own process (``torch.multiprocessing``, spawn), tensors travel between them
through shared memory.

Used by :class:`partitioner.runtime.local.LocalRuntime` with ``mode="processes"``. Each
child process runs the same :class:`~partitioner.runtime.worker.Worker` as the thread
runtime (interleaving the samples of a stream), with the whole process's intra-op
threads as its budget and no other Python thread computing beside it, so the devices
never share an interpreter lock or a thread pool. Values travel over one-way channels
(:mod:`partitioner.runtime.shm`: a pipe, tensors through reused shared-memory slots):
one from each device to every device it sends to, one from the caller to each device
(runs, aborts, the host's inputs) and one back (reports, the host's outputs). A
device's main thread reads its channels, files each value in its run's mailbox and
wakes the worker.

Segments reach the children by pickling (weights in shared memory, not copied) when
their class can be imported, else (segments loaded from an artifact directory) by
loading them again from that directory in the child. CPU devices only; inference only
(children run under ``torch.inference_mode``).
"""

from __future__ import annotations

import copy
import logging
import math
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
from .shm import Inbox, Outbox, channel
from .worker import Run, Setup, Worker

log = logging.getLogger(__name__)

__all__ = ["ProcessBackend", "RemoteError"]

#: seconds a child may take to start (spawn, import torch, load its segments)
START_S = 180.0
STOP_S = 5.0


class RemoteError(Exception):
    """An exception raised in a device's process (its type and text; the object itself
    may not cross processes)."""


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

    def __init__(self, rid: int, schedule: Schedule, report: Outbox, dev: str, wake: threading.Event, book: dict):
        super().__init__(schedule, {}, 1, math.inf, [wake], t0=0.0, deadline=math.inf)
        self.rid, self.report, self.dev, self.book = rid, report, dev, book
        self.grad, self.inference = False, True

    def fail(self, message: str, err: BaseException) -> None:
        if not self.failed:
            hint = getattr(err, "hint", None) if isinstance(err, RuntimeFailure) else None
            self.report.send(("failed", self.rid, self.dev, time.perf_counter(), message, hint,
                              isinstance(err, RuntimeFailure), f"{type(err).__name__}: {err}"))
        super().fail(message, err)

    def finish_one(self) -> None:
        self.book["finished"].add(self.rid)
        self.book["runs"].pop(self.rid, None)
        has = bool(self.outputs) and not self.failed
        self.report.send(("done", self.rid, self.dev, self.times), self.outputs if has else None, has_value=has)


class _ChildWorker(Worker):
    def __init__(self, *a, outboxes: dict[str, Outbox], **kw):
        self.outboxes = outboxes
        super().__init__(*a, **kw)

    def post(self, run: Run, a: Action, value: Any) -> bool:
        self.outboxes[a.peer].send(("value", run.rid, a.tag), value, has_value=True)
        return True


def _child_main(dev: str, schedule_json: dict, sources: dict, budget: int, in_flight: int, segments: str,
                control_end: tuple, report_end: tuple, peer_out: dict[str, tuple], peer_in: list[tuple]) -> None:
    """Body of a device's process: load its segments, start its worker, then read its
    channels (runs, aborts and stop from the caller, values from peers) until told to stop."""
    from multiprocessing.connection import wait

    report = Outbox(*report_end)
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
        setup = Setup(schedule, {d: torch.device("cpu") for d in schedule.devices}, modules, segments=segments)
        worker = _ChildWorker(setup, dev, budget, ready, wakers, in_flight,
                              outboxes={p: Outbox(*end) for p, end in peer_out.items()})
        ready.wait()
    except BaseException:  # noqa: BLE001 - reported to the caller
        report.send(("fatal", dev, traceback.format_exc()))
        return
    report.send(("ready", dev))
    wake = wakers[dev]
    book: dict = {"runs": {}, "finished": set()}
    control = Inbox(*control_end)
    boxes = [control, *(Inbox(*end) for end in peer_in)]

    def get(rid: int) -> _ChildRun | None:
        if rid in book["finished"]:
            return None
        r = book["runs"].get(rid)
        if r is None:
            r = book["runs"][rid] = _ChildRun(rid, schedule, report, dev, wake, book)
        return r

    with torch.inference_mode():
        while True:
            for box in wait(boxes):
                try:
                    msg, value = box.recv()
                except (EOFError, OSError):
                    if box is control:  # the caller is gone
                        msg = ("stop",)
                    else:  # a peer is gone; the caller sees it and aborts the runs
                        boxes.remove(box)
                        continue
                kind = msg[0]
                if kind == "stop":
                    worker.submit(None)
                    worker.thread.join(timeout=STOP_S)
                    return
                r = get(msg[1])
                if r is None:
                    continue
                if kind == "run":
                    _, _, t0, deadline = msg
                    r.env, r.t0, r.deadline = value or {}, t0, deadline
                    worker.submit(r)
                elif kind == "value":
                    slot = r.slots[msg[2]]
                    slot.value, slot.ready = value, True
                    wake.set()
                elif kind == "abort":
                    r.failed = True
                    wake.set()


class ProcessBackend:
    """The device processes of one :class:`~partitioner.runtime.local.LocalRuntime`."""

    def __init__(self, artifact, schedule: Schedule, active: list[str], budgets: dict[str, int], in_flight: int,
                 segments: str = "eager"):
        import torch.multiprocessing as tmp

        self.schedule = schedule
        self.active = active
        ctx = tmp.get_context("spawn")
        self.runs: dict[int, Run] = {}
        self.next_rid = 0
        self.lock = threading.Lock()
        self.dead: str | None = None
        self.closing = False
        control = {d: channel(ctx) for d in active}
        reports = {d: channel(ctx) for d in active}
        pairs = sorted({(t.src, t.dst) for t in schedule.transfers if t.src != t.dst})
        peers = {pair: channel(ctx) for pair in pairs}
        sources: dict[str, dict] = {d: {} for d in active}
        tmpdir = tempfile.TemporaryDirectory(prefix="partitioner-procs-")
        for sid, src in module_sources(artifact, Path(tmpdir.name)).items():
            sources[schedule.segment(sid).device][sid] = src
        self.procs = {d: ctx.Process(
            target=_child_main, name=f"partitioner-{d}", daemon=True,
            args=(d, schedule.to_json(), sources[d], budgets.get(d, 1), in_flight, segments, control[d][1], reports[d][0],
                  {b: peers[a, b][0] for a, b in pairs if a == d}, [peers[a, b][1] for a, b in pairs if b == d]))
            for d in active}
        self.control = {d: Outbox(*control[d][0]) for d in active}
        self.reports = {Inbox(*reports[d][1]): d for d in active}
        try:
            for p in self.procs.values():
                p.start()
            theirs = [control[d][1] for d in active] + [reports[d][0] for d in active] + \
                [end for ends in peers.values() for end in ends]
            for end in theirs:  # the children hold their own copies now
                end[0].close()
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        finally:
            tmpdir.cleanup()  # the children have loaded their segments
        self.collector = threading.Thread(target=self._collect, name="partitioner-collector", daemon=True)
        self.collector.start()

    def _wait_ready(self) -> None:
        from multiprocessing.connection import wait

        waiting, deadline = set(self.active), time.perf_counter() + START_S
        boxes = {box: d for box, d in self.reports.items()}
        sentinels = {self.procs[d].sentinel: d for d in self.active}
        while waiting:
            left = deadline - time.perf_counter()
            ready = wait([*boxes, *sentinels], timeout=max(0.0, left))
            if not ready:
                raise RuntimeFailure(f"process runtime: the processes of {sorted(waiting)} did not start within "
                                     f"{START_S:.0f} s", hint="use mode='threads'")
            for obj in ready:
                if obj in boxes:
                    try:
                        msg, _ = obj.recv()
                    except (EOFError, OSError):
                        continue  # its sentinel tells
                    if msg[0] == "fatal":
                        raise RuntimeFailure(f"process runtime: device {msg[1]} could not start:\n{msg[2]}",
                                             hint="use mode='threads', or check that the artifact loads in a "
                                                  "fresh process")
                    waiting.discard(msg[1])
                    del boxes[obj]
                elif sentinels[obj] in waiting:
                    d = sentinels[obj]
                    self.procs[d].join(timeout=1.0)
                    raise RuntimeFailure(f"process runtime: the process of device {d} exited with code "
                                         f"{self.procs[d].exitcode}", hint="use mode='threads'")

    @property
    def n_workers(self) -> int:
        return len(self.active)

    def new_run(self, env: dict, timeout_s: float, t0: float | None = None, deadline: float | None = None) -> Run:
        run = Run(self.schedule, env, len(self.active), timeout_s, [], t0=t0, deadline=deadline, on_fail=self._abort)
        for d in self.active:
            run.current[d] = "its process (no report yet)"
        return run

    def submit(self, runs: list[Run]) -> None:
        """Start ``runs`` in every device's process (inputs to the host's)."""
        if self.dead:
            raise RuntimeFailure(f"process runtime: {self.dead}", hint="create a new LocalRuntime")
        host = self.schedule.host
        for run in runs:
            with self.lock:
                rid, self.next_rid = self.next_rid, self.next_rid + 1
                run.rid = rid
                self.runs[rid] = run
            for d in self.active:
                self.control[d].send(("run", rid, run.t0, run.deadline), run.env, has_value=d == host)

    def _abort(self, run: Run) -> None:
        rid = getattr(run, "rid", None)
        if rid is None:
            return
        for box in self.control.values():
            try:
                box.send(("abort", rid))
            except (OSError, ValueError):  # that process is gone
                pass

    def _collect(self) -> None:
        """Files the children's reports into the runs; fails every run when a child dies."""
        from multiprocessing.connection import wait

        boxes = dict(self.reports)
        sentinels = {self.procs[d].sentinel: d for d in self.active}
        while not self.closing:
            ready = wait([*boxes, *sentinels], timeout=0.5)
            gone = [sentinels[o] for o in ready if o in sentinels]
            for box in (o for o in ready if o in boxes):
                try:
                    msg, value = box.recv()
                except (EOFError, OSError):
                    gone.append(boxes.pop(box))
                    continue
                self._file(msg, value)
            if gone and not self.closing:
                self.procs[gone[0]].join(timeout=1.0)
                self.dead = f"the process of device {gone[0]} died (exit code {self.procs[gone[0]].exitcode})"
                for run in list(self.runs.values()):
                    run.fail(f"device {gone[0]}: {self.dead}", RuntimeFailure(self.dead))
                return

    def _file(self, msg: tuple, value: Any) -> None:
        kind, rid = msg[0], msg[1]
        run = self.runs.get(rid)
        if run is None:
            return
        if kind == "failed":
            _, _, dev, t, message, hint, is_rf, text = msg
            err = RuntimeFailure(text.split(": ", 1)[-1], hint=hint) if is_rf else RemoteError(text)
            with run.lock:
                run.errors.append((t, message, err))
                first, run.failed = not run.failed, True
            if first:
                self._abort(run)
        elif kind == "done":
            _, _, dev, times = msg
            run.times.extend(times)
            if value is not None:
                run.outputs = value
            run.current.pop(dev, None)
            run.finish_one()
            if run.done.is_set():
                self.runs.pop(rid, None)

    def close(self) -> None:
        """Stop the device processes (killed after ``STOP_S`` when they do not end)."""
        self.closing = True
        for box in self.control.values():
            try:
                box.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.perf_counter() + STOP_S
        for p in self.procs.values():
            if p.pid is None:
                continue
            p.join(timeout=max(0.0, deadline - time.perf_counter()))
            if p.is_alive():
                p.kill()
                p.join(timeout=1.0)
        for box in (*self.control.values(), *self.reports):
            box.close()
