"""How the split heuristic compares plans: the score of a search state (violations first, then the
objective, then a tie-break), the strict comparison :func:`better`, and the work :class:`Budget`."""

from __future__ import annotations

import time

from ... import progress
from ...ir.plan import Objective
from ...machine.problem import Problem
from .engine import State

_REL = 1e-12


class Budget:
    """A work budget (deterministic) with a wall-clock safety deadline; a stop request
    (Ctrl-C) exhausts it (``stopped``)."""

    def __init__(self, work: float, deadline: float):
        self.limit = work
        self.deadline = deadline
        self.hit_deadline = False
        self.stopped = False

    def out(self, st: State) -> bool:
        if st.work >= self.limit:
            return True
        if progress.stop_requested():
            self.stopped = True
            return True
        # every call: a call can follow a costly kick or rebuild (tenths of a second at 50,000 nodes)
        if time.perf_counter() > self.deadline:
            self.hit_deadline = True
            return True
        return False


class Scorer:
    """Score of a state (see the module docstring); lower is better."""

    def __init__(self, problem: Problem, check_memory: bool):
        self.lat = problem.objective is Objective.LATENCY
        c = problem.constraints
        self.fp = 1.0 / c.throughput_floor if c.throughput_floor else None
        self.ceil = c.latency_ceiling
        self.mem = check_memory and c.memory

    def __call__(self, st: State) -> tuple:
        viol = 0.0
        if self.mem:
            viol += st.mem_excess()
        if self.fp is not None:
            per = st.period()
            if per > self.fp * (1 + 1e-9):
                viol += per / self.fp - 1.0
        if self.ceil is not None and st.sched:
            lat = st.latency()
            if lat > self.ceil * (1 + 1e-9):
                viol += lat / self.ceil - 1.0
        if self.lat:
            return (viol, st.latency(), st.sumf)
        loads = sorted(st.loads, reverse=True)
        return (viol, loads[0] if loads else 0.0, loads)


def better(a: tuple, b: tuple) -> bool:
    """``a`` strictly better than ``b`` (relative tolerance on every real compared)."""
    if a[0] < b[0] - 1e-12:
        return True
    if a[0] > b[0] + 1e-12:
        return False
    if a[1] < b[1] * (1 - _REL):
        return True
    if a[1] > b[1] * (1 + _REL):
        return False
    x, y = a[2], b[2]
    if isinstance(x, list):
        for p, q in zip(x, y):
            if p < q * (1 - 1e-9):
                return True
            if p > q * (1 + 1e-9):
                return False
        return False
    return x < y * (1 - 1e-9)
