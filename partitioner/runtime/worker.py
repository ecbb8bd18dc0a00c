"""The worker of one logical device of the local runtime: a thread that runs the device's
actions for every submitted sample, interleaving samples (see :class:`Worker`).

Used by :class:`partitioner.runtime.local.LocalRuntime`, which builds one worker per
device, submits runs (:class:`Run`, one per sample) to every worker and waits for them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import threading
import time
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import ArtifactError, RuntimeFailure
from ..ir.schedule import Action, Schedule
from .stats import ActionTime
from .traced import TracedSegment

__all__ = ["Run", "Worker", "Setup", "stop_workers", "tree_to", "tree_clone", "run_segment", "JOIN_S"]

JOIN_S = 2.0  # how long stop_workers waits for the worker threads to end


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a :class:`Worker` reads from its runtime (the same for every device).

    Attributes
    ----------
    schedule : Schedule
        The plan's programs.
    devices : dict
        Spec device id -> torch device.
    modules : dict
        Segment id -> the module that computes it (already on its torch device).
    copy_same_device : bool
        Clone values passed between two logical devices on the same torch device.
    profile : bool
        Synchronise CUDA after each compute, so its recorded time is the kernel time.
    segments : str
        ``"eager"``: call the segments' modules; ``"traced"``: run TorchScript traces of
        them where that is faithful (:class:`~partitioner.runtime.traced.TracedSegment`).
    """

    schedule: Schedule
    devices: dict
    modules: dict
    copy_same_device: bool = False
    profile: bool = False
    segments: str = "eager"


class Slot:
    """The mailbox of one transfer of one run: the sender fills it and wakes the receiver."""

    __slots__ = ("ready", "value", "cuda_event")

    def __init__(self):
        self.ready = False
        self.value = None
        self.cuda_event = None


class Run:
    """State of one run (one sample) shared by the workers."""

    def __init__(self, schedule: Schedule, env: dict, n_workers: int, timeout_s: float, wakers: list,
                 t0: float | None = None, deadline: float | None = None, on_fail=None):
        self.slots = {t.tag: Slot() for t in schedule.transfers}
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
        self.wakers = wakers
        self.on_fail = on_fail  # called once, on the first failure (the process runtime tells the other processes)

    def fail(self, message: str, err: BaseException) -> None:
        with self.lock:
            self.errors.append((time.perf_counter(), message, err))
            first, self.failed = not self.failed, True
        for w in self.wakers:
            w.set()
        if first and self.on_fail is not None:
            self.on_fail(self)

    def finish_one(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.end = time.perf_counter()
                self.done.set()


class _Task:
    """One run as seen by one worker: its local values and its next action."""

    __slots__ = ("run", "store", "pc")

    def __init__(self, run: Run, store: dict):
        self.run, self.store, self.pc = run, store, 0


class Worker:
    """One logical device: a thread that runs the device's actions for every submitted run.

    Within a run the actions keep their order. Across runs (the samples of a stream) the
    worker interleaves, among the first ``in_flight`` runs it has not finished: it moves
    values first (the next send, or recv whose value has arrived, of the oldest run that
    has one), then runs the next compute of the oldest run that has one, and sleeps only
    when none of them can progress. So another device never waits behind a compute for
    a value that is ready to go, and a
    device whose program waits in the middle (the host sending a sample's inputs and
    then waiting for an intermediate value, or receiving outputs before a last segment)
    still starts the next samples while it waits, and every device stays busy as the
    period model assumes. The oldest unfinished sample is always in every worker's
    window, and one sample's program runs to the end on its own (the schedule is checked
    for that), so interleaving never deadlocks.
    """

    def __init__(self, rt: Setup, dev: str, budget: int | None, ready: threading.Barrier,
                 wakers: dict[str, threading.Event], in_flight: int):
        s = rt.schedule
        self.dev = dev
        self.tdev = rt.devices[dev]
        self.devices = rt.devices
        self.actions: tuple[Action, ...] = tuple(s.actions.get(dev, ()))
        self.segs = {x.id: x for x in s.segments}
        self.modules = rt.modules
        if rt.segments == "traced":
            self.modules = {sid: TracedSegment(m, sid) if self.segs[sid].device == dev else m
                            for sid, m in rt.modules.items()}
        self.copy_same = rt.copy_same_device
        self.profile = rt.profile
        self.is_host = dev == s.host
        self.outputs = s.output_values if self.is_host else []
        self.inputs = s.inputs if self.is_host else ()
        # where a failure happened, spelled once (not on every action of every run)
        self.where = [f"action #{k} ({a.describe()})" for k, a in enumerate(self.actions)]
        self.free_after: list[list[str]] = [[] for _ in self.actions]
        for v, k in s.last_uses(dev).items():
            self.free_after[k].append(v)
        self.cuda = self.tdev.type == "cuda"
        self.stream = torch.cuda.Stream(self.tdev) if self.cuda else None
        self.copy_stream = torch.cuda.Stream(self.tdev) if self.cuda else None
        self.budget = budget
        self.wake = wakers[dev]
        self.wakers = wakers
        self.in_flight = max(1, in_flight)
        self.inbox: collections.deque = collections.deque()
        self.thread = threading.Thread(target=self._loop, args=(ready,), name=f"partitioner-{dev}", daemon=True)
        self.thread.start()

    def submit(self, run: Run | None) -> None:
        """Queue a run (``None``: stop once the queue is empty of earlier runs)."""
        self.inbox.append(run)
        self.wake.set()

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
        tasks: list[_Task] = []
        stopping = False
        while not (stopping and not tasks):
            self.wake.clear()
            while self.inbox and len(tasks) < self.in_flight:
                run = self.inbox.popleft()
                if run is None:
                    stopping = True
                    break
                tasks.append(self._admit(run))
            task, compute = self._next(tasks)
            if task is not None:
                self._advance(task, tasks, compute)
            elif not (stopping and not tasks):
                self._wait(tasks)

    def _admit(self, run: Run) -> _Task:
        store: dict[str, Any] = {}
        if self.is_host:
            for v in self.inputs:
                store[v] = tree_to(run.env[v], self.tdev)
        return _Task(run, store)

    def _next(self, tasks: list[_Task]) -> tuple[_Task | None, bool]:
        """The task to advance, and whether it may compute: the oldest one whose next
        action moves a value (a send, or a recv whose value is there) or ends it, else
        the oldest one whose next action is a compute (dropping runs that failed)."""
        first_compute = None
        for t in list(tasks):
            if t.run.failed:
                tasks.remove(t)
                t.run.finish_one()
                continue
            if t.pc == len(self.actions):
                return t, False
            a = self.actions[t.pc]
            if a.op == "send" or (a.op == "recv" and t.run.slots[a.tag].ready):
                return t, False
            if a.op == "compute" and first_compute is None:
                first_compute = t
        return first_compute, first_compute is not None

    def _wait(self, tasks: list[_Task]) -> None:
        """Sleep until a value arrives, a run is submitted or the earliest deadline passes;
        fail the runs whose deadline passed while they waited for a value."""
        deadline = min((t.run.deadline for t in tasks), default=math.inf)
        now = time.perf_counter()
        if deadline > now:
            self.wake.wait(timeout=None if deadline == math.inf else deadline - now)
            return
        for t in list(tasks):
            if t.run.deadline <= now:
                k = t.pc
                a = self.actions[k]
                t.run.current[self.dev] = self.where[k]
                self._fail(t.run, RuntimeFailure(
                    f"device {self.dev} waited {t.run.deadline - t.run.t0:.1f} s at action #{k} for {a.value!r} "
                    f"from {a.peer}, which never arrived",
                    hint="the sending device is stuck or much slower than expected; raise timeout_s"))
                tasks.remove(t)
                t.run.finish_one()

    def _advance(self, task: _Task, tasks: list[_Task], compute: bool) -> None:
        """Run the task's actions until it waits for a value, reaches a compute (past the
        one it may run: sends and recvs of other samples go before the next compute) or ends."""
        run = task.run
        try:
            with self._context(run):
                while task.pc < len(self.actions) and not run.failed:
                    a = self.actions[task.pc]
                    if a.op == "recv" and not run.slots[a.tag].ready:
                        run.current[self.dev] = self.where[task.pc]
                        return
                    if a.op == "compute":
                        if not compute:
                            return
                        compute = False
                    self._action(run, task.store, task.pc)
                    task.pc += 1
                if not run.failed:
                    self._collect(run, task.store)
        except BaseException as err:  # noqa: BLE001 - reported to the caller
            self._fail(run, err)
        tasks.remove(task)
        run.finish_one()

    def _context(self, run: Run):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(run.inference))
        stack.enter_context(torch.set_grad_enabled(run.grad))
        if self.cuda:
            stack.enter_context(torch.cuda.device(self.tdev))
            stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def _fail(self, run: Run, err: BaseException) -> None:
        where = run.current.get(self.dev, "start")
        run.fail(f"device {self.dev} ({self.tdev}) failed at {where}: {type(err).__name__}: {err}", err)

    def _collect(self, run: Run, store: dict) -> None:
        if self.is_host:
            if self.cuda:
                self.stream.synchronize()
            run.outputs = {v: store[v] for v in self.outputs}

    def _action(self, run: Run, store: dict, k: int) -> None:
        a = self.actions[k]
        run.current[self.dev] = self.where[k]
        t0 = time.perf_counter()
        if a.op == "compute":
            run_segment(self.segs[a.segment], self.modules[a.segment], store)
            if self.profile and self.cuda:
                self.stream.synchronize()
        elif a.op == "send":
            self._send(run, store[a.value], a)
        else:
            store[a.value] = self._recv(run, a)
        t1 = time.perf_counter()
        for v in self.free_after[k]:
            store.pop(v, None)
        run.times.append(ActionTime(self.dev, k, a.op, a.segment if a.op == "compute" else a.value,
                                    t0 - run.t0, t1 - run.t0))

    def _send(self, run: Run, value: Any, a: Action) -> None:
        if self.post(run, a, value):
            return
        dst = self.devices[a.peer]
        slot = run.slots[a.tag]
        if dst == self.tdev:
            slot.value = tree_clone(value) if self.copy_same else value
        elif self.cuda:
            self.copy_stream.wait_stream(self.stream)
            with torch.cuda.stream(self.copy_stream):
                slot.value = tree_to(value, dst, non_blocking=True)
                for t in _tensors(value):
                    t.record_stream(self.copy_stream)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            slot.cuda_event = ev
        elif dst.type == "cuda":
            slot.value = tree_to(value, dst, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dst))
            slot.cuda_event = ev
        else:
            slot.value = tree_to(value, dst)
        slot.ready = True
        self.wakers[a.peer].set()

    def post(self, run: Run, a: Action, value: Any) -> bool:
        """Hand ``value`` to another process instead of a mailbox of this one; False: no
        other process here (the process runtime's workers override it)."""
        return False

    def _recv(self, run: Run, a: Action) -> Any:
        slot = run.slots[a.tag]
        ev = slot.cuda_event
        if ev is not None:
            if self.cuda:
                self.stream.wait_event(ev)
                for t in _tensors(slot.value):
                    if t.device == self.tdev:
                        t.record_stream(self.stream)
            else:
                ev.synchronize()
        value, slot.value = slot.value, None  # the mailbox lets go: the value lives as long as the receiver needs it
        return value


def run_segment(seg, module, store: dict) -> None:
    """Call ``module`` (segment ``seg``) on its input values from ``store`` and file its
    outputs there."""
    outs = module(*[store[v] for v in seg.inputs])
    if not isinstance(outs, (tuple, list)) or len(outs) != len(seg.outputs):
        raise ArtifactError(f"segment {seg.id!r} returned {type(outs).__name__}, expected a tuple of "
                            f"{len(seg.outputs)}", hint="emit the plan again")
    store.update(zip(seg.outputs, outs))


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def tree_to(value: Any, dev: torch.device, non_blocking: bool = False) -> Any:
    """``value`` (a tensor or a pytree of them) on torch device ``dev``."""
    if isinstance(value, torch.Tensor):
        return value.to(dev, non_blocking=non_blocking)
    return pytree.tree_map(lambda t: t.to(dev, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t,
                           value)


def tree_clone(value: Any) -> Any:
    """A copy of every tensor in ``value``."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


def stop_workers(workers: list[Worker]) -> None:
    """Stop the workers and wait (a little) for their threads to end: a thread still tearing
    down its intra-op pool while the interpreter exits can abort the process ("terminate
    called without an active exception")."""
    for w in workers:
        w.submit(None)
    me = threading.current_thread()
    deadline = time.perf_counter() + JOIN_S
    for w in workers:
        if w.thread is not me and w.thread.is_alive():
            w.thread.join(timeout=max(0.0, deadline - time.perf_counter()))
