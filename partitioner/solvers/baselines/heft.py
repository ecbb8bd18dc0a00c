"""``heft``: Heterogeneous Earliest Finish Time (Topcuoglu, Hariri and Wu, IEEE TPDS 2002).

Nodes are ranked by upward rank computed with mean execution times over the devices that
support them and mean transfer times over device pairs; in decreasing rank each node is
placed on the device giving the earliest finish time, inserting it into the first idle
gap of the device's schedule that is long enough (insertion-based policy).
"""

from __future__ import annotations

import numpy as np

from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.problem import Problem
from ..registry import register
from .listsched import PartialSchedule


def mean_comm_factors(problem: Problem) -> tuple[float, float]:
    """Mean latency and seconds-per-byte over ordered device pairs (for ranks)."""
    D = problem.D
    if D < 2:
        return 0.0, 0.0
    L = problem.links
    lat = np.mean([min(r.latency_s for r in L.routes[(a, b)]) for a in range(D) for b in range(D) if a != b])
    inv = np.mean([min(r.inv_bw for r in L.routes[(a, b)]) for a in range(D) for b in range(D) if a != b])
    return float(lat), float(inv)


def upward_rank_mean(problem: Problem) -> np.ndarray:
    """Upward rank with mean costs: ``rank(v) = w(v) + max_succ (c(v, s) + rank(s))``."""
    T = problem.T
    finite = np.where(np.isfinite(T), T, np.nan)
    w = np.nan_to_num(np.nanmean(finite, axis=1), nan=0.0)
    lat, inv = mean_comm_factors(problem)
    frac = (problem.D - 1) / problem.D if problem.D > 1 else 0.0  # chance two random devices differ
    rank = np.zeros(problem.n)
    for v in range(problem.n - 1, -1, -1):
        best = 0.0
        for s, b in problem.succ_bytes[v]:
            best = max(best, frac * (lat + b * inv) + rank[s])
        rank[v] = w[v] + best
    return rank


@register("heft", "HEFT: upward rank, insertion-based earliest finish time (Topcuoglu et al. 2002)")
def solve(problem: Problem, settings: Settings) -> Plan:
    rank = upward_rank_mean(problem)
    seq = np.lexsort((np.arange(problem.n), -rank))
    ps = PartialSchedule(problem)
    T = problem.T
    for v in seq:
        v = int(v)
        best, best_key = None, None
        for d in ps.candidates(v):
            d = int(d)
            s = ps.earliest_slot(d, ps.data_ready(v, d), T[v, d], insertion=True)
            key = (s + T[v, d], d)
            if best_key is None or key < best_key:
                best, best_key = (d, s), key
        ps.place(v, *best)
    return ps.plan()
