"""Modules and exact module solves for the ``split`` heuristic (DiviML, Ghannane and Abdelfattah, ICCAD 2023).

* :func:`find_modules`: Louvain communities of the undirected view weighted by transfer
  bytes, made acyclic in the quotient graph and capped in size, in topological order.
* :func:`module_pass`: DiviML's sequential pass: each module solved exactly (CP-SAT or
  MILP) on a :class:`~partitioner.machine.problem.Boundary` fixed by the modules before it
  (devices' ready times, arrival times of incoming tensors), with an optimistic tail
  (PEFT's optimistic cost table) standing for the rest of the model.
* :func:`solve_window`: an exact re-solve of an interval of the search state's priority
  list (a large-neighbourhood move): everything before the interval is fixed (device
  ready times, tensor arrivals: exact), everything after keeps its placement and order,
  and the tail of a window node is the exact longest path from its finish to the end
  through the fixed rest (data successors and the next node on its device), so the
  sub-objective ``max finish + tail`` is the plan's latency through the window.

All solves are capped in CP-SAT deterministic time (``module_det_time``) so that results
do not depend on the machine's speed; the wall-clock limit is only a safety cap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import networkx as nx
import numpy as np

from ...errors import PartitionerError
from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.problem import Boundary, Problem
from ..cpsat.options import CpsatOptions
from .options import SplitOptions

log = logging.getLogger(__name__)

#: the largest graph whose modules come from Louvain (larger ones: fast label propagation)
LOUVAIN_NODES = 10_000


# ---- modules --------------------------------------------------------------------------------
def find_modules(problem: Problem, max_size: int = 24, seed: int = 0, resolution: float = 1.0) -> list[list[int]]:
    """Acyclic, size-capped modules in topological order of the quotient graph.

    Louvain (networkx, seeded) on the undirected view with edge weights ``1 + bytes``
    (normalised); a community on a cycle of the quotient graph is cut at its topological
    median until the quotient is a DAG; modules above ``max_size`` are cut into
    topologically contiguous chunks (which never creates a cycle: every edge between
    two chunks goes forward, and no other module can be both fed by and feed one module
    of an acyclic quotient). ``O((n + e) log n)`` apart from the communities themselves:
    Louvain up to ``LOUVAIN_NODES`` nodes; above, networkx's fast label propagation (FLPA,
    Traag and Šubelj 2023), near-linear, because networkx's Louvain is not (its first level
    alone can sweep for minutes on a path-like graph of some 10,000 nodes and more).

    Returns
    -------
    list of list of int
        Each module's nodes in increasing (topological) index.
    """
    n = problem.n
    if n == 0:
        return []
    if n <= max_size:
        return [list(range(n))]
    U = nx.Graph()
    U.add_nodes_from(range(n))
    if len(problem.edge_src):
        w = problem.edge_bytes + 1.0
        w = w / w.mean()
        U.add_weighted_edges_from(zip(problem.edge_src.tolist(), problem.edge_dst.tolist(), w.tolist()))
    if n <= LOUVAIN_NODES:
        comms = nx.community.louvain_communities(U, weight="weight", resolution=resolution, seed=seed)
    else:
        comms = nx.community.fast_label_propagation_communities(U, weight="weight", seed=seed)
    label = np.empty(n, dtype=np.int64)
    for k, c in enumerate(sorted(comms, key=min)):
        label[list(c)] = k
    label = _make_acyclic(problem, label)
    label = _cap_size(label, max_size)
    return _ordered_modules(problem, label)


def _members(label: np.ndarray) -> dict[int, np.ndarray]:
    """Label -> its nodes in increasing index (one sort, no per-label scans)."""
    order = np.argsort(label, kind="stable")
    lab = label[order]
    cuts = np.flatnonzero(np.diff(lab)) + 1
    return {int(label[g[0]]): np.sort(g) for g in np.split(order, cuts) if len(g)}


def _quotient(problem: Problem, label: np.ndarray) -> nx.DiGraph:
    Q = nx.DiGraph()
    Q.add_nodes_from(np.unique(label).tolist())
    if len(problem.edge_src):
        a, b = label[problem.edge_src], label[problem.edge_dst]
        m = a != b
        pairs = np.unique(np.stack([a[m], b[m]], axis=1), axis=0) if m.any() else np.zeros((0, 2), dtype=np.int64)
        Q.add_edges_from(map(tuple, pairs.tolist()))
    return Q


def _make_acyclic(problem: Problem, label: np.ndarray) -> np.ndarray:
    """Cut communities on cycles of the quotient graph at their topological median."""
    label = label.copy()
    nxt = int(label.max()) + 1
    while True:
        bad = [c for c in nx.strongly_connected_components(_quotient(problem, label)) if len(c) > 1]
        if not bad:
            return label
        mem = _members(label)
        for scc in bad:
            for c in sorted(scc):
                members = mem[c]
                if len(members) < 2:
                    continue
                label[members[len(members) // 2:]] = nxt
                nxt += 1


def _cap_size(label: np.ndarray, max_size: int) -> np.ndarray:
    label = label.copy()
    nxt = int(label.max()) + 1
    for c, members in sorted(_members(label).items()):
        for k in range(max_size, len(members), max_size):
            label[members[k:k + max_size]] = nxt
            nxt += 1
    return label


def _ordered_modules(problem: Problem, label: np.ndarray) -> list[list[int]]:
    Q = _quotient(problem, label)
    mem = _members(label)
    first = {c: int(m[0]) for c, m in mem.items()}
    order = nx.lexicographical_topological_sort(Q, key=first.__getitem__)
    return [mem[c].tolist() for c in order]


# ---- exact subproblem solves ------------------------------------------------------------------
def _sub_settings(settings: Settings, det_time: float, wall: float) -> Settings:
    return replace(settings.with_options(CpsatOptions, deterministic_time=det_time, deterministic=True),
                   time_limit=max(0.05, wall))


def solve_subproblem(problem: Problem, bnd: Boundary, settings: Settings, det_time: float, wall: float):
    """Solve one Boundary exactly (option ``split.module_solver``: "cpsat" or "milp").

    CP-SAT stops at ``det_time`` units of its deterministic clock (reproducible); the
    MILP (HiGHS/CBC have no deterministic clock) at ``split.module_time`` seconds
    (default 0.5), so MILP module solves are reproducible only when they finish.
    ``wall`` is a safety cap for both.

    Returns
    -------
    (placement dict, per-device orders, start dict) or None when no plan was found.
    """
    opts = settings.options_of(SplitOptions)
    sub = _sub_settings(settings, det_time, wall)
    try:
        if opts.module_solver == "milp":
            from ..milp import latency as milp

            sub = replace(sub, time_limit=max(0.05, min(wall, opts.module_time)))
            pl, order, obj, status, _ = milp.solve_latency_subproblem(problem, bnd, sub)
            if pl is None:
                return None
            pld = {v: int(d) for v, d in zip(bnd.nodes, pl)}
            start = _forward_starts(problem, bnd, pld, order)
            return pld, order, start
        from ..cpsat import solver as cpsat

        sol = cpsat.solve_latency_subproblem(problem, bnd, sub)
        return dict(sol.placement), sol.order, dict(sol.start)
    except PartitionerError as err:
        log.info("split: module solve gave no plan (%s)", err.message)
        return None


def _forward_starts(problem: Problem, bnd: Boundary, pl: dict[int, int], order) -> dict[int, float]:
    from ...machine.evaluate import subset_schedule

    loc = {v: i for i, v in enumerate(bnd.nodes)}
    start, _, _ = subset_schedule(problem, tuple(bnd.nodes), pl, [list(s) for s in order],
                                  lambda v, d: float(problem.T[v, d]), problem.comm,
                                  lambda v, d: max(bnd.release[loc[v], d], bnd.device_ready[d]),
                                  lambda v, d: bnd.tail[loc[v], d])
    return start


def module_pass(problem: Problem, mods: list[list[int]], settings: Settings, det_time: float,
                deadline: float) -> Plan | None:
    """DiviML's pass: solve modules in order with boundaries fixed by the earlier ones.

    Device ready times are the finish of the device's last node so far; releases are the
    arrival times of tensors from fixed producers (and model inputs); the tail of a node
    is the optimistic time from its finish to the end of the model (PEFT's OCT on exact
    transfer times, successors outside the module at their best devices) plus output
    transfers. Memory: each device's remaining capacity under the conservative proxy.
    """
    from ..baselines.peft import allowed_mask, optimistic_cost_table

    n, D, T = problem.n, problem.D, problem.T
    full = Boundary.full(problem)
    allowed = allowed_mask(problem)
    oct_ = optimistic_cost_table(problem, allowed)
    after = np.where(allowed, T, np.inf) + oct_
    pl = np.full(n, -1, dtype=np.int64)
    finish = np.zeros(n)
    start = np.zeros(n)
    ready = np.zeros(D)
    used = np.zeros(D)
    in_mod = np.full(n, -1, dtype=np.int64)
    for k, m in enumerate(mods):
        in_mod[m] = k
    roomy = problem.memory_never_binds()
    cmat = problem.comm_matrices()

    for k, mod in enumerate(mods):
        rel = full.release[mod].copy()
        tail = full.tail[mod].copy()
        for r, v in enumerate(mod):
            for u, b in problem.pred_bytes[v]:
                if in_mod[u] != k:
                    np.maximum(rel[r], finish[u] + cmat(b)[pl[u]], out=rel[r])
            for s, b in problem.succ_bytes[v]:
                if in_mod[s] != k:
                    np.maximum(tail[r], (cmat(b) + after[s][None, :]).min(axis=1), out=tail[r])
        cap = problem.capacity * 4.0 if roomy else np.maximum(problem.capacity - used, 0.0)
        bnd = Boundary(tuple(mod), ready.copy(), rel, tail, cap)
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        sol = solve_subproblem(problem, bnd, settings, det_time, left / max(1, len(mods) - k))
        if sol is None:
            return None
        spl, sorder, sstart = sol
        for v, d in spl.items():
            pl[v] = d
            start[v] = sstart[v]
            finish[v] = sstart[v] + T[v, d]
            used[d] += problem.param_bytes[v] + problem.output_bytes[v]
        for d in range(D):
            if sorder[d]:
                ready[d] = max(ready[d], max(finish[v] for v in sorder[d]))
    order = [[] for _ in range(D)]
    for v in sorted(range(n), key=lambda v: (start[v], finish[v], v)):
        order[pl[v]].append(v)
    return Plan(tuple(int(x) for x in pl), tuple(tuple(o) for o in order), status="heuristic")


# ---- windows of the priority list -------------------------------------------------------------
def window_boundary(st, nodes: list[int], q: list[float], roomy: bool) -> Boundary:
    """The Boundary of a priority-list interval ``nodes`` (see the module docstring)."""
    t = st.t
    p = t.p
    D = t.D
    inset = set(nodes)
    lo = min(st._key(v) for v in nodes)
    hi = max(st._key(v) for v in nodes)
    from bisect import bisect_left, bisect_right

    ready = np.zeros(D)
    first_after: list[int] = [-1] * D
    for d in range(D):
        sd = st.seq[d]
        i = bisect_left(sd, lo, key=st._key)
        if i > 0:
            ready[d] = st.finish[sd[i - 1]]
        j = bisect_right(sd, hi, key=st._key)
        if j < len(sd):
            first_after[d] = sd[j]
    k = len(nodes)
    rel = np.zeros((k, D))
    tail = np.zeros((k, D))
    for i, v in enumerate(nodes):
        r = t.rel_in[v]
        if r is not None:
            rel[i] = r
        for u, b in t.pred_b[v]:
            if u in inset:
                continue
            du, fu = st.pl[u], st.finish[u]
            if t.uni[u] >= 0:
                row = np.asarray(t.cm(b)[du]) + fu
            else:
                row = np.array([p.comm(du, d, max([b] + [x for w, x in t.succ_b[u] if w not in inset
                                                          and st.pl[w] == d])) for d in range(D)]) + fu
            row[du] = fu
            np.maximum(rel[i], row, out=rel[i])
        tail[i] = t.out_tail[v]
        for w, b in t.succ_b[v]:
            if w in inset:
                continue
            dw = st.pl[w]
            row = np.asarray(t.cm(b))[:, dw] + (t.T[w][dw] + q[w])
            row[dw] = t.T[w][dw] + q[w]
            np.maximum(tail[i], row, out=tail[i])
        for d in range(D):
            x = first_after[d]
            if x >= 0:
                tail[i, d] = max(tail[i, d], t.T[x][d] + q[x])
    if roomy:
        cap = p.capacity * 4.0
    else:
        inside_p = np.zeros(D)
        for v in nodes:
            inside_p[st.pl[v]] += t.pb[v] + t.ob[v]
        cap = np.maximum(np.asarray(t.cap) - (np.asarray(st.params) + np.asarray(st.act) - inside_p), 0.0)
    return Boundary(tuple(sorted(nodes)), ready, rel[np.argsort(nodes)], tail[np.argsort(nodes)], cap)


def solve_window(st, nodes: list[int], q: list[float], settings: Settings, det_time: float, wall: float,
                 roomy: bool):
    """Exact re-solve of the priority-list interval ``nodes``; returns the moves
    ``(node, device, position)`` of its solution (not applied) or None."""
    t = st.t
    bnd = window_boundary(st, nodes, q, roomy)
    sol = solve_subproblem(t.p, bnd, settings, det_time, wall)
    if sol is None:
        return None
    spl, _, sstart = sol
    T = t.T
    seq = sorted(bnd.nodes, key=lambda v: (sstart[v], sstart[v] + T[v][spl[v]], v))
    lo = min(st.pos[v] for v in nodes)
    hi = max(st.pos[v] for v in nodes)
    k = len(seq)
    if k > 1 and not (hi - lo) / (k - 1) > 1e-9 * max(1.0, abs(hi)):
        return None
    step = (hi - lo) / (k - 1) if k > 1 else 0.0
    return [(v, int(spl[v]), lo + i * step if i < k - 1 else hi) for i, v in enumerate(seq)]


__all__ = ["find_modules", "module_pass", "solve_subproblem", "solve_window", "window_boundary"]
