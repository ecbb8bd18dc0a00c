"""``greedy``: earliest finish time, nodes in topological order, no insertion.

Latency: each node goes to the device where it would finish first, given the devices'
queues so far and the transfers its inputs need. Throughput: each node goes to the
device that keeps the estimated bottleneck (device load plus inbound transfer time)
lowest, ties broken by the transfer time added, then by finish time.
"""

from __future__ import annotations

from ...ir.plan import Objective, Plan
from ...ir.settings import Settings
from ...machine.problem import Problem
from ..registry import register
from .listsched import PartialSchedule


@register("greedy", "earliest-finish-time greedy in topological order")
def solve(problem: Problem, settings: Settings) -> Plan:
    ps = PartialSchedule(problem)
    T = problem.T
    thr = problem.objective is Objective.THROUGHPUT
    bottleneck = 0.0
    for v in range(problem.n):
        best, best_key = None, None
        for d in ps.candidates(v):
            d = int(d)
            ready = ps.data_ready(v, d)
            s = ps.earliest_slot(d, ready, T[v, d], insertion=False)
            f = s + T[v, d]
            if thr:
                comm_in = sum(problem.comm(ps.pl[u], d, b) for u, b in problem.pred_bytes[v]
                              if ps.pl[u] != d and (u, d) not in ps.arrival)
                key = (max(bottleneck, ps.load[d] + T[v, d] + comm_in), comm_in, f, d)
            else:
                key = (f, d)
            if best_key is None or key < best_key:
                best, best_key = (d, s), key
        d, s = best
        ps.place(v, d, s)
        if thr:
            bottleneck = max(bottleneck, best_key[0])
    return ps.plan()
