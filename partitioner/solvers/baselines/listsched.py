"""Shared machinery of the list-scheduling heuristics (greedy, HEFT, PEFT) and the
memory fitting of every constructive baseline.

A :class:`PartialSchedule` places nodes one at a time, keeping per-device busy intervals
(for insertion-based scheduling), the arrival time of every tensor already sent to a
device (sent once per producer and destination), the memory each device must hold (the
resident bytes of :func:`partitioner.bounds.memory.resident_bytes`: parameters, plus the
activations a co-location group keeps; a group is charged whole when its first member is
placed), and the nodes' groups. Candidate devices are those whose memory budget still
holds the node (or, when none does, the one with the most room left). The final
per-device order is the order of scheduled start times.

Activations that live only for a while are not known while placing; :func:`fit_memory`
runs a placement with per-device budgets, lowers the budget of every device whose
evaluated memory peak exceeds its capacity by the excess (and the others a little), and repeats (``MEMORY_ROUNDS``
= 24 rounds at most; on the memory-tight family of bench/memtight.py the list schedulers
needed up to 15, and 6 left 25 of their 228 runs overfull), keeping the best plan (feasible first, then the least
excess, then the objective).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable

import numpy as np

from ...bounds.memory import group_resident, group_step_need, resident_bytes
from ...errors import NoSolutionError
from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.evaluate import Evaluation, evaluate
from ...machine.problem import Problem

#: rounds of :func:`fit_memory` for the list schedulers (``memory_rounds``)
MEMORY_ROUNDS = 24


def fit_memory(problem: Problem, build: Callable[[np.ndarray], Plan | None], rounds: int,
               deadline: float = math.inf) -> tuple[Plan, Evaluation, int]:
    """Run ``build(budget) -> Plan`` (None: stopped at the deadline) with per-device memory budgets (bytes), lowering the
    budget of each device whose evaluated peak exceeds its capacity by the excess plus 3 % of
    its capacity (and every other budget by 1 %) until the plan fits or ``rounds`` builds ran. Returns the best plan
    (feasible first, then least excess, then objective), its evaluation and the builds run."""
    cap = problem.capacity.astype(float)
    budget = cap.copy()
    best = None
    for r in range(max(1, rounds)):
        plan = build(budget)
        if plan is None:  # the build stopped at the deadline
            break
        ev = evaluate(problem, plan)
        over = np.maximum(ev.memory_peak - cap, 0.0) if problem.constraints.memory else np.zeros(problem.D)
        key = (not ev.feasible, float(over.sum()), ev.value(problem.objective))
        if best is None or key < best[0]:
            best = (key, plan, ev, r + 1)
        if ev.feasible or not over.any() or time.perf_counter() > deadline:
            break
        # the devices over capacity lose their excess and a margin; the others a little
        # (what leaves one device goes to another, which may then overflow in turn)
        budget = np.maximum(np.where(over > 0, budget - over - 0.03 * cap, budget - 0.01 * cap), 0.0)
    if best is None:
        raise NoSolutionError("no plan within the time limit (the first placement was stopped)",
                              hint="give the solver more time")
    _, plan, ev, used = best
    return plan, ev, used


def list_schedule(problem: Problem, settings: Settings, run: Callable[["PartialSchedule"], None], **info) -> Plan:
    """A list scheduler ``run(ps)`` (it places every node of ``ps``) under :func:`fit_memory`."""
    deadline = settings.deadline()
    stop_at = deadline if settings.strict_time_limit else math.inf

    def build(budget: np.ndarray) -> Plan | None:
        ps = PartialSchedule(problem, budget, stop_at=stop_at)
        try:
            run(ps)
        except _PastDeadline:
            return None
        return ps.plan(schedule_makespan_s=float(ps.finish.max()) if problem.n else 0.0)

    rounds = MEMORY_ROUNDS if problem.constraints.memory else 1
    plan, ev, used = fit_memory(problem, build, rounds, deadline)
    return plan.with_(info=dict(plan.info, memory_rounds=used, **info))


class _PastDeadline(Exception):
    """A placement stopped at ``PartialSchedule.stop_at``."""


#: placements between two looks at the clock when a PartialSchedule has a ``stop_at``
CLOCK_EVERY = 256


class PartialSchedule:
    def __init__(self, problem: Problem, budget: np.ndarray | None = None, stop_at: float = math.inf):
        p = problem
        self.p = p
        self.stop_at, self.placed = stop_at, 0
        self.budget = p.capacity if budget is None else np.asarray(budget, dtype=float)
        self.need = group_resident(p) if p.constraints.memory else np.zeros(p.n)
        self.step = group_step_need(p) if p.constraints.memory else np.zeros(p.n)
        self.res = resident_bytes(p)
        self.pl = np.full(p.n, -1, dtype=np.int64)
        self.start = np.zeros(p.n)
        self.finish = np.zeros(p.n)
        self.busy: list[list[tuple[float, float]]] = [[] for _ in range(p.D)]  # sorted (start, finish)
        self.ready_at = np.zeros(p.D)  # end of the last interval (append-only scheduling)
        # (producer, device) -> (bytes sent, arrival); the evaluator sends the largest
        # tensor any consumer on that device needs, once
        self.arrival: dict[tuple[int, int], tuple[float, float]] = {}
        self.params = np.zeros(p.D)
        self.load = np.zeros(p.D)
        self.group_dev: dict[int, int] = {}
        self.in_arrival = {}
        for k, (b, _) in enumerate(p.in_tensors):
            for d in range(p.D):
                self.in_arrival[(k, d)] = p.comm(p.host, d, b)

    def candidates(self, v: int) -> np.ndarray:
        """Devices that may run ``v``: supported, group-consistent, and whose budget still
        holds its (group's) resident bytes; when none does, the one with the most room."""
        p = self.p
        g = p.group_of[v]
        if g >= 0 and g in self.group_dev:
            return np.array([self.group_dev[g]])
        devs = p.allowed_devices(v)
        if p.constraints.memory:
            room = self.budget[devs] - self.params[devs]
            fit = devs[(room >= self.need[v]) & (self.budget[devs] >= self.step[v])]
            if fit.size:
                return fit
            return devs[[int(np.argmax(room))]]
        return devs

    def data_ready(self, v: int, d: int) -> float:
        """Earliest time all inputs of ``v`` can be on device ``d``."""
        p = self.p
        r = 0.0
        for k in p.node_inputs[v]:
            r = max(r, self.in_arrival[(k, d)])
        for u, b in p.pred_bytes[v]:
            du = self.pl[u]
            if du == d:
                a = self.finish[u]
            else:
                sent = self.arrival.get((u, d))
                if sent is not None and sent[0] >= b:
                    a = sent[1]
                else:
                    a = self.finish[u] + p.comm(du, d, b if sent is None else max(b, sent[0]))
            if a > r:
                r = a
        return r

    def earliest_slot(self, d: int, ready: float, dur: float, insertion: bool) -> float:
        """Earliest start >= ready on device ``d`` for a node of duration ``dur``."""
        if not insertion:
            return max(ready, self.ready_at[d])
        iv = self.busy[d]
        k = bisect.bisect_left(iv, (ready, -math.inf))
        t = ready if k == 0 else max(ready, iv[k - 1][1])
        while k < len(iv):
            if t + dur <= iv[k][0]:
                return t
            t = max(t, iv[k][1])
            k += 1
        return t

    def place(self, v: int, d: int, s: float) -> None:
        p = self.p
        self.placed += 1
        if self.placed % CLOCK_EVERY == 0 and time.perf_counter() > self.stop_at:
            raise _PastDeadline
        dur = p.T[v, d]
        self.pl[v] = d
        self.start[v] = s
        self.finish[v] = s + dur
        bisect.insort(self.busy[d], (s, s + dur, v))
        self.ready_at[d] = max(self.ready_at[d], s + dur)
        self.load[d] += dur
        g = p.group_of[v]
        if g < 0:
            self.params[d] += self.res[v]
        elif g not in self.group_dev:
            self.group_dev[int(g)] = d
            self.params[d] += self.need[v]
        for u, b in p.pred_bytes[v]:
            du = self.pl[u]
            if du != d:
                sent = self.arrival.get((u, d))
                if sent is None or b > sent[0]:
                    self.arrival[(u, d)] = (b, self.finish[u] + p.comm(du, d, b))

    def plan(self, status: str = "heuristic", **info) -> Plan:
        order = []
        for d in range(self.p.D):
            order.append(tuple(int(x[2]) for x in sorted(self.busy[d], key=lambda x: (x[0], x[1], x[2]))))
        return Plan(tuple(int(x) for x in self.pl), tuple(order), status=status, info=info)
