"""Shared machinery of the list-scheduling heuristics (greedy, HEFT, PEFT).

A :class:`PartialSchedule` places nodes one at a time, keeping per-device busy intervals
(for insertion-based scheduling), the arrival time of every tensor already sent to a
device (sent once per producer and destination), parameter memory used per device, and
the nodes' groups. The final per-device order is the order of scheduled start times; the
evaluator then computes the plan's figures.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from ...ir.plan import Plan
from ...machine.problem import Problem


class PartialSchedule:
    def __init__(self, problem: Problem):
        p = problem
        self.p = p
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
        """Devices that may run ``v``: supported, group-consistent, parameters fit."""
        p = self.p
        g = p.group_of[v]
        if g >= 0 and g in self.group_dev:
            return np.array([self.group_dev[g]])
        devs = p.allowed_devices(v)
        if p.constraints.memory:
            fit = devs[self.params[devs] + p.param_bytes[v] <= p.capacity[devs]]
            if fit.size:
                return fit
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
        dur = p.T[v, d]
        self.pl[v] = d
        self.start[v] = s
        self.finish[v] = s + dur
        bisect.insort(self.busy[d], (s, s + dur, v))
        self.ready_at[d] = max(self.ready_at[d], s + dur)
        self.params[d] += p.param_bytes[v]
        self.load[d] += dur
        g = p.group_of[v]
        if g >= 0:
            self.group_dev.setdefault(int(g), d)
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
