"""The chain bound (latency): a critical chain cut into short segments, each solved exactly.

Take any chain ``c_0 -> c_1 -> ... -> c_L`` of nodes, each an ancestor of the next (here:
the critical path of :func:`partitioner.bounds.lower.path_labels`). Every node of ``B_k =
De(c_k) ∩ An(c_{k+1})`` (descendants of ``c_k`` that are ancestors of ``c_{k+1}``) starts
after ``c_k`` finishes and finishes before ``c_{k+1}`` starts. So in any plan ``p``

    latency >= head[c_0, p(c_0)] + sum_k G_k(p(c_k), p(c_{k+1})) + tail[c_L, p(c_L)]

where ``G_k(a, b)`` is the least ``F(c_{k+1}) - F(c_k)`` of any schedule of the segment
``{c_k} ∪ B_k ∪ {c_{k+1}}`` alone with ``c_k`` on ``a`` and ``c_{k+1}`` on ``b``: every
other node is dropped (and with it its contention), and what the segment keeps holds in
the plan's own schedule: one node at a time per device, a consumer starts after its
producer's tensor arrives (``comm(a, b, bytes of the edge)`` at least, the evaluator
sending the largest bytes to a device and ``comm`` growing with the bytes), the devices
each node may use (:func:`partitioner.bounds.lower.allowed_mask`). Memory, co-location groups,
model inputs and link contention are dropped (each only relaxes). The minimum over
placements of the right-hand side is a shortest path over the chain with the device of
``c_k`` as state, so it is a lower bound on the latency of every plan.

``G_k(a, b)`` is bounded below by the larger of

* the segment's path value (a longest path with every node on its best device given its
  predecessors; transfers charged), computed for each ``a``, and
* a proven lower bound of CP-SAT on ``min_{a, b} G_k(a, b)`` over the segment (the
  minimum over ``a, b`` bounds every ``(a, b)``): one worker, a fixed seed and a limit in
  CP-SAT's deterministic time, so it does not depend on the machine's speed or load.
  Times are rounded down to integer units ``u``; rounding every start of a real schedule
  down to units keeps it feasible for the rounded model (``floor(s + t) >= floor(s) +
  floor(t)``) and changes ``F(c_{k+1}) - F(c_k)`` by less than 2 units, so the CP-SAT
  bound ``z`` proves ``G_k >= (z - 2) u``. The model also states ``F(c_{k+1}) - F(c_k) >=
  floor(path / u) - 2``, which every such rounded real schedule meets.

Segments are grown greedily along the chain while ``|B_k| <= LIMITS["chain_seg"]``; the
CP-SAT solves stop when their deterministic budget (``LIMITS["chain_det"]`` in all,
``LIMITS["chain_det_seg"]`` each, to the segments whose work most exceeds their path
value first) is spent; past it the path value alone is used. Above ``LIMITS["chain_nodes"]``
nodes or ``LIMITS["chain_devices"]`` devices the part is skipped (the compile-time budget at
10,000 nodes, and at 1,000 nodes on 17 devices, where the segment paths alone took 20 s). ``LIMITS["chain_wall_seg"]``
seconds per solve is a safety net on a very slow machine (then the bound, still valid,
may depend on timing).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from ..machine.problem import Problem
from .join import chains_of, join_ready

log = logging.getLogger(__name__)

LIMITS = {"chain_seg": 24, "chain_det": 0.25, "chain_det_seg": 0.08, "chain_wall_seg": 2.0,
          "chain_nodes": 5_000, "chain_visit": 4_000, "chain_devices": 12}


def critical_chain(problem: Problem, lab) -> list[int]:
    """A path through the node with the largest ``min_d head + tail``, following at each step
    the neighbour with the largest such value (ties: lowest index)."""
    crit = (lab.head + lab.tail).min(axis=1)
    v = int(np.lexsort((np.arange(problem.n), -crit))[0])
    back = [v]
    while problem.preds[back[-1]]:
        ps = problem.preds[back[-1]]
        back.append(max(ps, key=lambda u: (crit[u], -u)))
    fwd = [v]
    while problem.succs[fwd[-1]]:
        ss = problem.succs[fwd[-1]]
        fwd.append(max(ss, key=lambda w: (crit[w], -w)))
    return back[::-1] + fwd[1:]


def _between(problem: Problem, a: int, b: int, limit: int) -> list[int] | None:
    """``De(a) ∩ An(b)`` without ``a`` and ``b``, sorted; None if the search visits more than
    ``limit`` nodes. Node indices are a topological order."""
    # backward from b over nodes with index > a, then keep those reachable from a
    seen = {b}
    stack = [b]
    while stack:
        v = stack.pop()
        for u in problem.preds[v]:
            if u > a and u not in seen:
                seen.add(u)
                stack.append(u)
                if len(seen) > limit:
                    return None
    anc = seen
    reach = {a}
    stack = [a]
    while stack:
        v = stack.pop()
        for w in problem.succs[v]:
            if w in anc and w not in reach:
                reach.add(w)
                stack.append(w)
    reach.discard(a)
    reach.discard(b)
    return sorted(reach)


def _segments(problem: Problem, chain: list[int]) -> list[tuple[int, int, list[int]]]:
    """Cut the chain greedily: from each cut, the furthest chain node whose ``B`` has at most
    ``LIMITS["chain_seg"]`` nodes (the next chain node whatever its ``B``)."""
    cap, visit = LIMITS["chain_seg"], LIMITS["chain_visit"]
    segs = []
    k, L = 0, len(chain) - 1
    while k < L:
        j = k + 1
        best = _between(problem, chain[k], chain[j], visit)
        while j < L:
            nxt = _between(problem, chain[k], chain[j + 1], visit)
            if nxt is None or len(nxt) > cap:
                break
            j, best = j + 1, nxt
        segs.append((chain[k], chain[j], best if best is not None else []))
        k = j
    return segs


def _segment_path(problem: Problem, lab, cm, nodes: list[int], a: int, b: int) -> np.ndarray:
    """``(D, D)``: for ``c_k = a`` on device ``i`` (finishing at 0) the least finish of
    ``c_{k+1} = b`` on ``j`` by longest paths within the segment (contention ignored but
    among one node's inputs and the chains feeding only them on its own device,
    :func:`partitioner.bounds.join.join_ready`, within the segment)."""
    D = problem.D
    seg = [a, *nodes, b]
    at = {v: k for k, v in enumerate(seg)}
    Ts = lab.T[seg]
    preds = [[(at[u], by) for u, by in problem.pred_bytes[v] if u in at] for v in seg]
    outdeg = [0] * len(seg)
    for lst in preds:
        for u, _ in lst:
            outdeg[u] += 1
    ups = chains_of(preds, outdeg)
    out = np.empty((D, D))
    for i in range(D):
        g = np.full((len(seg), D), np.inf)
        g[0, i] = 0.0
        for k in range(1, len(seg)):
            g[k] = (join_ready(g, preds[k], Ts, Ts[k], cm, ups) if preds[k] else 0.0) + Ts[k]
        out[i] = g[-1]
    return out


def _segment_cpsat(problem: Problem, lab, cm, nodes: list[int], a: int, b: int, unit: float,
                   det: float, floor_lb: int = 0) -> tuple[float, str]:
    """A proven lower bound (seconds) on ``min F(b) - F(a)`` over schedules of the segment."""
    from ortools.sat.python import cp_model

    D = problem.D
    A = lab.allowed
    allv = [a] + nodes + [b]
    pos = {v: k for k, v in enumerate(allv)}
    Ti = {(v, d): int(math.floor(lab.T[v, d] / unit * (1 - 1e-12))) for v in allv for d in range(D) if A[v, d]}
    horizon = sum(max(Ti[v, d] for d in range(D) if A[v, d]) for v in allv)
    edges = [(u, v, by) for v in allv[1:] for u, by in problem.pred_bytes[v] if u in pos]
    Ci = {}
    for u, v, by in edges:
        m = cm(by)
        for i in range(D):
            for j in range(D):
                if i != j and A[u, i] and A[v, j]:
                    Ci[u, v, i, j] = int(math.floor(m[i, j] / unit * (1 - 1e-12)))
    horizon += sum(max((c for (x, y, _, _), c in Ci.items() if (x, y) == (u, v)), default=0) for u, v, _ in edges)
    md = cp_model.CpModel()
    s, e, x = {}, {}, {}
    per_dev: list[list] = [[] for _ in range(D)]
    for v in allv:
        s[v] = md.NewIntVar(0, horizon, f"s{v}")
        e[v] = md.NewIntVar(0, horizon, f"e{v}")
        lits = []
        for d in range(D):
            if A[v, d]:
                lit = md.NewBoolVar(f"x{v}_{d}")
                x[v, d] = lit
                lits.append((d, lit))
                per_dev[d].append(md.NewOptionalFixedSizeIntervalVar(s[v], Ti[v, d], lit, f"i{v}_{d}"))
        md.AddExactlyOne([lit for _, lit in lits])
        md.Add(e[v] == s[v] + sum(Ti[v, d] * lit for d, lit in lits))
    md.Add(s[a] == 0)
    for d in range(D):
        if len(per_dev[d]) > 1:
            md.AddNoOverlap(per_dev[d])
    for u, v, _ in edges:
        md.Add(s[v] >= e[u])
    for u, v, _ in edges:
        for j in range(D):
            if A[v, j]:
                terms = [Ci.get((u, v, i, j), 0) * x[u, i] for i in range(D) if A[u, i] and Ci.get((u, v, i, j), 0)]
                if terms:
                    md.Add(s[v] >= e[u] + sum(terms)).OnlyEnforceIf(x[v, j])
    md.Add(e[b] - e[a] >= floor_lb)
    md.Minimize(e[b] - e[a])
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = 1
    p.random_seed = 0
    p.max_deterministic_time = det
    p.max_time_in_seconds = LIMITS["chain_wall_seg"]  # a safety net only; the deterministic limit binds
    p.catch_sigint_signal = False
    st = solver.Solve(md)
    name = solver.StatusName(st)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return 0.0, name
    z = math.ceil(solver.BestObjectiveBound() - 1e-9)
    log.debug("chain segment %d->%d (%d nodes): %s, bound %d, det %.3f, wall %.3f", a, b, len(nodes), name, z,
              solver.deterministic_time, solver.wall_time)
    return max(0.0, (z - 2) * unit), name + f" det={solver.deterministic_time:.3f}"



def chain_bound(problem: Problem, lab) -> tuple[float, dict]:
    """The chain bound (see the module docstring) and facts about its computation."""
    t0 = time.perf_counter()
    n, D = problem.n, problem.D
    info: dict = {}
    if n == 0 or n > LIMITS["chain_nodes"] or D > LIMITS["chain_devices"]:
        return 0.0, {"chain": "skipped"}
    cm = problem.comm_matrices()
    chain = critical_chain(problem, lab)
    crit = float((lab.head + lab.tail).min(axis=1).max())
    unit = (crit or 1.0) / 2 ** 24
    segs = _segments(problem, chain)
    G = [_segment_path(problem, lab, cm, nodes, a, b) for a, b, nodes in segs]
    # CP-SAT time to the segments whose work most exceeds their path value first
    tmin = lab.T.min(axis=1)
    gain = [float(tmin[nodes].sum()) + tmin[b] - float(g.min()) if nodes else -math.inf
            for (a, b, nodes), g in zip(segs, G)]
    det_left, solved = LIMITS["chain_det"], 0
    for i in sorted(range(len(segs)), key=lambda i: (-gain[i], i)):
        a, b, nodes = segs[i]
        if not nodes or len(nodes) > LIMITS["chain_seg"] or gain[i] <= 0 or det_left <= 1e-3:
            continue
        d = min(LIMITS["chain_det_seg"], det_left)
        flo = int(math.floor(float(G[i].min()) / unit * (1 - 1e-9))) - 2  # every real schedule maps above it
        val, _ = _segment_cpsat(problem, lab, cm, nodes, a, b, unit, d, flo)
        det_left -= d
        solved += 1
        G[i] = np.maximum(G[i], val)
    c0, cL = chain[0], chain[-1]
    cur = np.where(lab.allowed[c0], lab.head[c0], np.inf)
    for g in G:
        cur = (cur[:, None] + g).min(axis=0)
    value = float((cur + lab.tail[cL]).min())
    info.update(chain_len=len(chain), chain_segments=len(segs), chain_cpsat=solved,
                chain_s=round(time.perf_counter() - t0, 4))
    return value, info
