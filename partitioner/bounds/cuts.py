"""The cuts bound (latency): the transfers and slow devices that memory forces onto a path.

Take any path ``v_1 -> v_2 -> ... -> v_L`` of the graph. In every plan ``p`` a node starts
after its predecessor on the path finishes, plus the transfer of their edge when they run
on different devices (``comm(a, b, bytes of the edge)`` at least: the evaluator sends the
largest bytes a producer has for a device, and ``comm`` grows with the bytes). Cut the path
into its maximal runs of consecutive nodes on one device: a run on ``d`` takes at least
``sum T[v, d]`` over its nodes, and holds at most ``C_d`` (the device's usable capacity) of
resident bytes (:func:`partitioner.bounds.memory.resident_bytes`: a device holds the
resident bytes of all its nodes); two consecutive runs are on different devices. So

    latency >= head[v_1, d_1] - T[v_1, d_1] + sum over runs r (on d_r) of sum_{v in r} T[v, d_r]
               + sum over consecutive runs r, r+1 of comm(d_r, d_{r+1}, bytes of their edge)
               + tail[v_L, d_last]

for the plan's own runs (``head``, ``tail``: the path labels of
:func:`partitioner.bounds.lower.path_labels`). The least right-hand side over every cut of
the path into runs that respect the capacities and every choice of their devices is a
dynamic programme along the path (state: the device of the run that ends at a node; a
sliding-window minimum per device over the prefix sums of resident bytes), so it is a
lower bound on every feasible plan's latency. Everything else (the other nodes, the
devices' capacities summed over several runs, contention, the order) is dropped, which
only relaxes. Where the fast devices cannot hold the path, the bound pays for the
transfers between them or for the slow device's time, which neither ``path`` (memory
ignored) nor ``load`` (transfers ignored) sees.

The paths tried are the longest for the node weights ``min_d T + lam * resident`` over a
few ``lam`` (0: the critical path; infinite: the path holding the most bytes; between).
The part is skipped when memory never binds, and above ``MAX_NODES`` nodes.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from ..machine.problem import Problem
from .memory import resident_bytes

#: the part is skipped above this many nodes (a few Python passes over the graph)
MAX_NODES = 20_000
#: weights ``lam`` of the resident bytes, as multiples of (total time / total resident bytes)
LAMBDAS = (0.0, 0.5, 1.0, 2.0, 8.0, math.inf)


def cuts_bound(problem: Problem, head: np.ndarray, tail: np.ndarray, T: np.ndarray) -> tuple[float, dict]:
    """The cuts bound and ``{"cuts_path_nodes", "cuts_runs"}`` of the path that gives it
    (``T``: the op times, infinite where a node may not run); ``(0.0, {})`` when memory never
    binds or the graph is larger than ``MAX_NODES``."""
    n = problem.n
    if n == 0 or n > MAX_NODES or problem.D < 2 or problem.memory_never_binds():
        return 0.0, {}
    res = resident_bytes(problem)
    tmin = T.min(axis=1)
    if not np.isfinite(tmin).all():
        return 0.0, {}
    scale = float(tmin.sum()) / max(float(res.sum()), 1.0)
    cm = problem.comm_matrices()
    best, info, seen = 0.0, {}, set()
    for lam in LAMBDAS:
        w = res if math.isinf(lam) else tmin + lam * scale * res
        path, nbytes = _heaviest_path(problem, w)
        if tuple(path) in seen:
            continue
        seen.add(tuple(path))
        value, runs = _path_value(problem, path, nbytes, head, tail, T, res, cm)
        if value > best:
            best, info = value, {"cuts_path_nodes": len(path), "cuts_runs": runs}
    return best, info


def _heaviest_path(problem: Problem, w: np.ndarray) -> tuple[list[int], list[float]]:
    """The path of the largest total ``w`` (nodes in topological order: the Problem's
    indices) and the bytes of its edges."""
    n = problem.n
    acc = w.astype(float).copy()
    back = [-1] * n
    for v in range(n):
        for u in problem.preds[v]:
            if acc[u] + w[v] > acc[v]:
                acc[v], back[v] = acc[u] + w[v], u
    v = int(np.argmax(acc))
    path = [v]
    while back[v] >= 0:
        v = back[v]
        path.append(v)
    path.reverse()
    nbytes = [max(b for w_, b in problem.succ_bytes[u] if w_ == x) for u, x in zip(path, path[1:])]
    return path, nbytes


def _path_value(problem: Problem, path: list[int], nbytes: list[float], head: np.ndarray, tail: np.ndarray,
                T: np.ndarray, res: np.ndarray, cm) -> tuple[float, int]:
    """The least right-hand side of the module docstring's inequality for ``path`` (edges of
    ``nbytes``), and the number of runs of a cut that attains it (0 when none is feasible)."""
    D, L = problem.D, len(path)
    Tp = T[path]  # L x D, infinite where a node may not run
    ok = np.isfinite(Tp)
    PT = np.concatenate([np.zeros((1, D)), np.cumsum(np.where(ok, Tp, 0.0), axis=0)])
    last_bad = np.full(D, -1)  # per device: the last path position it may not run
    prefix = np.concatenate([[0.0], np.cumsum(res[path])])
    cap = np.maximum(problem.capacity, 0.0) * (1 + 1e-9)  # the evaluator's tolerance
    INF = math.inf
    F = np.full((L + 1, D), INF)  # F[j, d]: least value of the nodes before j, the run ending at j-1 on d
    runs_end = np.zeros((L + 1, D), dtype=int)  # runs of the cut behind F (behind H: runs_start)
    runs_start = np.zeros((L + 1, D), dtype=int)
    # G[a, d]: least value before node a with a run starting at a on d (H = G - PT kept per window)
    H = np.full((L + 1, D), INF)
    H[0][ok[0]] = head[path[0]][ok[0]] - Tp[0][ok[0]]  # the path's start on d (- PT[0] = 0)
    windows = [deque([0]) if ok[0, d] else deque() for d in range(D)]
    left = np.zeros(D, dtype=int)
    for j in range(1, L + 1):
        bad = ~ok[j - 1]
        last_bad[bad] = j - 1
        for d in range(D):
            lo = max(int(left[d]), int(last_bad[d]) + 1)
            while lo < j and prefix[j] - prefix[lo] > cap[d]:
                lo += 1
            left[d] = lo
            dq = windows[d]
            while dq and dq[0] < lo:
                dq.popleft()
            if dq:
                a = dq[0]
                F[j, d] = H[a, d] + PT[j, d]
                runs_end[j, d] = runs_start[a, d] + 1
        if j == L:
            break
        # a run starting at node j on d, after a run ending at j-1 on another device
        M = F[j][:, None] + cm(nbytes[j - 1])  # from d' (rows) to d (columns)
        np.fill_diagonal(M, INF)
        src = M.argmin(axis=0)
        G = M[src, np.arange(D)]
        for d in range(D):
            if ok[j, d] and G[d] < INF:
                H[j, d] = G[d] - PT[j, d]
                runs_start[j, d] = runs_end[j, src[d]]
                dq = windows[d]
                while dq and H[dq[-1], d] >= H[j, d]:
                    dq.pop()
                dq.append(j)
    total = F[L] + tail[path[-1]]
    d = int(np.argmin(total))
    return (float(total[d]), int(runs_end[L, d])) if math.isfinite(total[d]) else (0.0, 0)


