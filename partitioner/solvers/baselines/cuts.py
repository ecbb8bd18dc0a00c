"""Linear orders of a graph and the cuts a contiguous pipeline may take: a depth-first topological
order (co-location groups kept contiguous), the bytes and producers crossing every cut, which
cuts split no group, and the few candidate cuts per bucket of work that the pipeline DP tries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...machine.problem import Problem


# ---- linear orders ------------------------------------------------------------------------
def dfs_order(problem: Problem) -> np.ndarray:
    """A depth-first topological order: Kahn's algorithm with a LIFO ready stack."""
    n = problem.n
    indeg = np.array([len(p) for p in problem.preds], dtype=np.int64)
    stack = [v for v in range(n - 1, -1, -1) if indeg[v] == 0]
    out = []
    while stack:
        v = stack.pop()
        out.append(v)
        for j in reversed(problem.succs[v]):
            indeg[j] -= 1
            if indeg[j] == 0:
                stack.append(j)
    return np.array(out, dtype=np.int64)


def group_contiguous(problem: Problem, order: np.ndarray) -> np.ndarray:
    """``order`` with every co-location group's members moved together, to the position of the
    group's first member (so that a cut between groups splits none); unchanged without groups."""
    if not problem.groups:
        return order
    out, seen = [], set()
    for v in order.tolist():
        g = int(problem.group_of[v])
        if g < 0:
            out.append(v)
        elif g not in seen:
            seen.add(g)
            out.extend(sorted(problem.groups[g]))
    return np.array(out, dtype=np.int64)


@dataclass
class Crossing:
    """Cut tensors of a linear order: for cut ``c`` (first ``c`` positions before it)."""

    bytes: np.ndarray   # (n+1,) total bytes crossing (once per producer, largest remaining edge)
    count: np.ndarray   # (n+1,) number of producers crossing
    lo: np.ndarray      # intervals [lo, hi] of cuts where a producer sends ``val`` bytes
    hi: np.ndarray
    val: np.ndarray


def crossing(problem: Problem, pos: np.ndarray) -> Crossing:
    """Bytes and counts of the tensors produced before each cut and consumed after it (and,
    in an order that is not topological, of those consumed before it and produced after)."""
    n = problem.n
    dB = np.zeros(n + 2)
    dC = np.zeros(n + 2)
    lo, hi, val = [], [], []
    for u in range(n):
        sb = problem.succ_bytes[u]
        if not sb:
            continue
        p = int(pos[u])
        qs = sorted((int(pos[j]), float(b)) for j, b in sb)
        suffix, m = [], 0.0
        for q, b in reversed(qs):
            m = max(m, b)
            suffix.append((q, m))
        prev = p
        for q, m in reversed(suffix):
            if q > prev:  # cuts prev+1 .. q see the largest edge at or after q
                dB[prev + 1] += m
                dB[q + 1] -= m
                lo.append(prev + 1), hi.append(q), val.append(m)
                prev = q
        if qs[-1][0] > p:
            dC[p + 1] += 1
            dC[qs[-1][0] + 1] -= 1
        for q, b in qs:
            if q < p:  # an order that is not topological (groups kept together): a tensor sent back
                dB[q + 1] += b
                dB[p + 1] -= b
                dC[q + 1] += 1
                dC[p + 1] -= 1
                lo.append(q + 1), hi.append(p), val.append(b)
    return Crossing(np.cumsum(dB)[:n + 1], np.cumsum(dC)[:n + 1], np.array(lo, dtype=np.int64),
                     np.array(hi, dtype=np.int64), np.array(val))


def valid_cuts(problem: Problem, pos: np.ndarray) -> np.ndarray:
    """Cut positions ``1..n-1`` that split no co-location group."""
    n = problem.n
    bad = np.zeros(n + 2, dtype=np.int64)
    for g in problem.groups:
        ps = pos[g]
        bad[ps.min() + 1] += 1
        bad[ps.max() + 1] -= 1
    ok = np.cumsum(bad)[:n + 1] == 0
    ok[0] = ok[n] = False
    return np.flatnonzero(ok)


def candidate_cuts(weights: np.ndarray, cross_bytes: np.ndarray, valid: np.ndarray, K: int) -> np.ndarray:
    """At most ``K`` cuts: per bucket of cumulative weight, the one with fewest crossing bytes."""
    if len(valid) <= K:
        return valid
    cum = np.concatenate([[0.0], np.cumsum(weights)])
    tot = cum[-1]
    key = cum[valid] / tot if tot > 0 else valid / len(weights)
    bucket = np.minimum((key * K).astype(np.int64), K - 1)
    chosen = []
    for b in np.unique(bucket):
        idx = valid[bucket == b]
        chosen.append(int(idx[np.argmin(cross_bytes[idx])]))
    return np.array(sorted(chosen), dtype=np.int64)
