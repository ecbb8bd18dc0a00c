"""``split``: the modularity-based splitting heuristic (after DiviML, Yahya et al., ICCAD 2023).

1. **Modules.** The DAG's undirected view, weighted by the bytes its edges carry, is split
   into communities by Louvain modularity (networkx, seeded). Communities that make the
   quotient graph cyclic are split along the topological order until it is a DAG, and
   modules above ``module_size`` nodes are cut into topologically contiguous chunks
   (cutting a module by topological position never creates a cycle: every edge between
   the two halves goes forward, and no outside module can both feed and follow it).
2. **Exact module solves.** Modules are solved one at a time in topological order of the
   quotient graph by the exact latency model (CP-SAT, or the MILP: ``module_solver``) on a
   :class:`~partitioner.problem.Boundary`: devices' ready times, the arrival times of
   tensors from earlier modules (placement fixed) and model inputs are release times; the
   tail of a node is an optimistic estimate of the work after it outside the module (the
   optimistic cost table of PEFT on exact transfer times) plus output transfers, so each
   module minimises an estimate of the whole makespan.
3. **Stitch** the module plans (per-device orders concatenated in module order) and add
   the plans of the list-scheduling baselines (HEFT, PEFT, greedy) as candidates: the best
   by the evaluator is refined, so ``split`` is never worse than those baselines.
4. **Local search** driven by the evaluator: moves of a critical node, of a node with its
   same-device neighbours in its module, or of a whole module to another device (and, for
   throughput, moves of nodes and modules off the bottleneck device or link); first
   improvement, in a deterministic order, under an evaluation budget.

For the throughput objective, step 2 is skipped (module solves minimise latency) and the
candidates also include the contiguous pipeline DP, the greedy bottleneck plan and the
latency split plan; the local search then minimises the period.

Determinism: the same input and seed give the same plan as long as no wall-clock limit
is hit (module solves use CP-SAT's deterministic time limit; the local search counts
evaluations). The overall ``time_limit`` is a safety cap that can cut work short.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import networkx as nx
import numpy as np

from ..errors import PartitionerError
from ..evaluate import Evaluation, evaluate
from ..problem import Boundary, Objective, Plan, Problem, Settings
from . import register

log = logging.getLogger(__name__)


# ---- modules ------------------------------------------------------------------------------
def find_modules(problem: Problem, max_size: int = 24, seed: int = 0, resolution: float = 1.0) -> list[list[int]]:
    """Acyclic, size-capped modules in topological order of the quotient graph.

    Returns
    -------
    list of list of int
        Each module's nodes in increasing (topological) index.
    """
    n = problem.n
    if n == 0:
        return []
    U = nx.Graph()
    U.add_nodes_from(range(n))
    if len(problem.edge_src):
        w = problem.edge_bytes + 1.0
        w = w / w.mean()
        U.add_weighted_edges_from(zip(problem.edge_src.tolist(), problem.edge_dst.tolist(), w.tolist()))
    comms = nx.community.louvain_communities(U, weight="weight", resolution=resolution, seed=seed)
    label = np.empty(n, dtype=np.int64)
    for k, c in enumerate(sorted(comms, key=min)):
        label[list(c)] = k
    label = _make_acyclic(problem, label)
    label = _cap_size(label, max_size)
    return _ordered_modules(problem, label)


def _quotient(problem: Problem, label: np.ndarray) -> nx.DiGraph:
    Q = nx.DiGraph()
    Q.add_nodes_from(np.unique(label).tolist())
    if len(problem.edge_src):
        a, b = label[problem.edge_src], label[problem.edge_dst]
        m = a != b
        Q.add_edges_from(set(zip(a[m].tolist(), b[m].tolist())))
    return Q


def _make_acyclic(problem: Problem, label: np.ndarray) -> np.ndarray:
    """Split communities on cycles of the quotient graph at their topological median."""
    label = label.copy()
    nxt = int(label.max()) + 1
    while True:
        Q = _quotient(problem, label)
        bad = [c for c in nx.strongly_connected_components(Q) if len(c) > 1]
        if not bad:
            return label
        for scc in bad:
            for c in sorted(scc):
                members = np.flatnonzero(label == c)
                if len(members) < 2:
                    continue
                label[members[len(members) // 2:]] = nxt
                nxt += 1


def _cap_size(label: np.ndarray, max_size: int) -> np.ndarray:
    label = label.copy()
    nxt = int(label.max()) + 1
    for c in np.unique(label):
        members = np.flatnonzero(label == c)
        for k in range(max_size, len(members), max_size):
            label[members[k:k + max_size]] = nxt
            nxt += 1
    return label


def _ordered_modules(problem: Problem, label: np.ndarray) -> list[list[int]]:
    Q = _quotient(problem, label)
    first = {int(c): int(np.flatnonzero(label == c)[0]) for c in Q.nodes}
    order = nx.lexicographical_topological_sort(Q, key=first.__getitem__)
    groups: dict[int, list[int]] = {}
    for v in range(problem.n):
        groups.setdefault(int(label[v]), []).append(v)
    return [groups[c] for c in order]


# ---- optimistic downstream estimate ---------------------------------------------------------
def optimistic_cost_table(problem: Problem) -> np.ndarray:
    """PEFT's OCT on exact transfer times: ``OCT[v, d]`` = optimistic time from the end of ``v``
    on ``d`` to the end of the model (successors at their best devices, no contention)."""
    n, D, T = problem.n, problem.D, problem.T
    oct_ = np.zeros((n, D))
    mats: dict[float, np.ndarray] = {}
    out_tail = np.zeros((n, D))
    for s, b in problem.outputs:
        m = mats.setdefault(b, problem.comm_matrix(b))
        np.maximum(out_tail[s], m[:, problem.host], out=out_tail[s])
    for v in range(n - 1, -1, -1):
        best = out_tail[v].copy()
        for s, b in problem.succ_bytes[v]:
            m = mats.get(b)
            if m is None:
                m = mats[b] = problem.comm_matrix(b)
            # min over w of comm(d, w) + T[s, w] + OCT[s, w]
            cand = (m + (T[s] + oct_[s])[None, :]).min(axis=1)
            np.maximum(best, cand, out=best)
        oct_[v] = best
    return oct_


# ---- stitching module solves ------------------------------------------------------------------
def solve_modules(problem: Problem, mods: list[list[int]], settings: Settings, deadline: float) -> Plan:
    """Solve modules in order on Boundaries built from the modules already fixed."""
    from . import cpsat

    n, D, T = problem.n, problem.D, problem.T
    full = Boundary.full(problem)
    oct_ = optimistic_cost_table(problem)
    pl = np.full(n, -1, dtype=np.int64)
    finish = np.zeros(n)
    order: list[list[int]] = [[] for _ in range(D)]
    ready = np.zeros(D)
    used = np.zeros(D)
    in_mod = np.full(n, -1, dtype=np.int64)
    for k, m in enumerate(mods):
        in_mod[m] = k
    per_module = float(settings.get("module_time", 1.0))
    for k, mod in enumerate(mods):
        rel = full.release[mod].copy()
        tail = full.tail[mod].copy()
        for r, v in enumerate(mod):
            for u, b in problem.pred_bytes[v]:
                if in_mod[u] != k:  # fixed predecessor from an earlier module
                    arr = finish[u] + problem.comm_matrix(b)[pl[u]]
                    np.maximum(rel[r], arr, out=rel[r])
            for s, b in problem.succ_bytes[v]:
                if in_mod[s] != k:
                    m = problem.comm_matrix(b)
                    np.maximum(tail[r], (m + (T[s] + oct_[s])[None, :]).min(axis=1), out=tail[r])
        cap = np.maximum(problem.capacity - used, 0.0)
        bnd = Boundary(tuple(mod), ready.copy(), rel, tail, cap)
        left = deadline - time.perf_counter()
        sub_settings = replace(settings, time_limit=max(0.05, min(per_module, left / max(1, len(mods) - k))),
                               extra=dict(settings.extra, deterministic_time=per_module))
        sol = cpsat.solve_latency_subproblem(problem, bnd, sub_settings)
        for v, d in sol.placement.items():
            pl[v] = d
            finish[v] = sol.finish[v]
            used[d] += problem.param_bytes[v] + problem.output_bytes[v]
        for d in range(D):
            seq = sol.order[d]
            if seq:
                order[d].extend(seq)
                ready[d] = max(ready[d], max(sol.finish[v] for v in seq))
    return Plan(tuple(int(x) for x in pl), tuple(tuple(o) for o in order), status="heuristic")


# ---- local search ----------------------------------------------------------------------------
class _Search:
    def __init__(self, problem: Problem, plan: Plan, mods: list[list[int]], budget: int, deadline: float):
        self.p = problem
        self.obj = problem.objective
        self.mods = mods
        self.mod_of = np.empty(problem.n, dtype=np.int64)
        for k, m in enumerate(mods):
            self.mod_of[m] = k
        self.budget = budget
        self.deadline = deadline
        self.evals = 0
        self.plan = plan
        self.ev = evaluate(problem, plan)
        self.best = self._score(self.ev)

    def _score(self, ev: Evaluation) -> float:
        return ev.value(self.obj) if ev.feasible else math.inf

    def out_of_budget(self) -> bool:
        return self.evals >= self.budget or time.perf_counter() > self.deadline

    def try_move(self, nodes: list[int], d: int) -> bool:
        """Move ``nodes`` to device ``d``, inserted by their current start times."""
        p, ev = self.p, self.ev
        pl = list(self.plan.placement)
        if all(pl[v] == d for v in nodes):
            return False
        if not all(p.supported[v, d] for v in nodes):
            return False
        moving = set(nodes)
        order = [[v for v in seq if v not in moving] for seq in ev.order]
        for v in nodes:
            pl[v] = d
        seq = order[d] + list(nodes)
        order[d] = sorted(seq, key=lambda v: (ev.start[v], ev.finish[v], v))
        for g in {int(p.group_of[v]) for v in nodes if p.group_of[v] >= 0}:
            if any(pl[w] != d for w in p.groups[g]):
                return False
        cand = Plan(tuple(pl), tuple(tuple(o) for o in order), status="heuristic")
        self.evals += 1
        cev = evaluate(p, cand)
        sc = self._score(cev)
        if sc < self.best * (1 - 1e-12):
            self.plan, self.ev, self.best = cand, cev, sc
            return True
        return False

    def critical_nodes(self) -> list[int]:
        """Nodes on the critical path of the current schedule (latency), last first."""
        p, ev = self.p, self.ev
        pl = self.plan.placement
        prev = {}
        for seq in ev.order:
            for a, b in zip(seq, seq[1:]):
                prev[b] = a
        end = ev.finish.copy()
        for s, b in p.outputs:
            end[s] = max(end[s], ev.finish[s] + p.comm(pl[s], p.host, b))
        v = int(np.argmax(end))
        path = []
        seen = set()
        while v is not None and v not in seen:
            seen.add(v)
            path.append(v)
            st = ev.start[v]
            nxt = None
            for u, b in p.pred_bytes[v]:
                arr = ev.finish[u] + (p.comm(pl[u], pl[v], b) if pl[u] != pl[v] else 0.0)
                if abs(arr - st) <= 1e-12 * max(1.0, st):
                    nxt = u
                    break
            if nxt is None and v in prev and abs(ev.finish[prev[v]] - st) <= 1e-12 * max(1.0, st):
                nxt = prev[v]
            v = nxt
        return path

    def bottleneck_nodes(self) -> list[int]:
        """Nodes loading the bottleneck resource (throughput), heaviest first."""
        p, ev = self.p, self.ev
        pl = np.asarray(self.plan.placement)
        dmax = float(ev.device_load.max())
        lmax = max(ev.link_load.values(), default=0.0)
        if dmax >= lmax:
            d = int(np.argmax(ev.device_load))
            nodes = np.flatnonzero(pl == d)
            return [int(v) for v in nodes[np.argsort(-p.T[nodes, d], kind="stable")]]
        link = max(ev.link_load, key=ev.link_load.get)
        out = []
        for tr in ev.transfers:
            if tr.producer >= 0 and tr.src != tr.dst:
                route = p.links.route(tr.src, tr.dst, tr.bytes)
                if link in route.hops:
                    out.append(tr.producer)
        return out

    def run(self) -> None:
        p = self.p
        improved = True
        while improved and not self.out_of_budget():
            improved = False
            focus = self.critical_nodes() if self.obj is Objective.LATENCY else self.bottleneck_nodes()
            for v in focus:
                if self.out_of_budget():
                    return
                d0 = self.plan.placement[v]
                same = [w for w in self.mods[self.mod_of[v]] if self.plan.placement[w] == d0]
                succ_local = [v] + [w for w in p.succs[v] if self.plan.placement[w] == d0]
                for d in p.allowed_devices(v):
                    d = int(d)
                    if d == d0:
                        continue
                    if (self.try_move([v], d) or self.try_move(sorted(set(succ_local)), d)
                            or self.try_move(same, d)):
                        improved = True
                        break
                if improved:
                    break


# ---- the solver ---------------------------------------------------------------------------------
def _baseline_candidates(problem: Problem, settings: Settings, names: tuple[str, ...]) -> list[Plan]:
    from . import SOLVERS

    plans = []
    for name in names:
        if name not in SOLVERS:
            continue
        try:
            plans.append(SOLVERS[name].fn(problem, settings).with_(solver=name))
        except PartitionerError as err:
            log.info("split: baseline %s gave no plan: %s", name, err)
    return plans


@register("split", "modularity-based splitting heuristic with exact module solves and local search (DiviML-style)")
def solve(problem: Problem, settings: Settings) -> Plan:
    t0 = time.perf_counter()
    limit = settings.time_limit if settings.time_limit is not None else math.inf
    deadline = t0 + limit
    size = int(settings.get("module_size", 24 if problem.D <= 4 else 16))
    mods = find_modules(problem, size, settings.seed)
    cands: list[Plan] = []
    info: dict = {"modules": len(mods), "module_size": size}
    lat_problem = problem if problem.objective is Objective.LATENCY else problem.with_objective("latency")
    if settings.get("module_solves", True):
        try:
            cands.append(solve_modules(lat_problem, mods, settings, deadline).with_(solver="modules"))
        except PartitionerError as err:
            log.warning("split: module solves failed (%s); continuing from the baselines", err)
    names = ("heft", "peft", "greedy")
    if problem.objective is Objective.THROUGHPUT:
        names += ("pipeline-dp", "single")
    cands += _baseline_candidates(problem, settings, names)
    scored = []
    for c in cands:
        ev = evaluate(problem, c)
        scored.append((ev.value(problem.objective) if ev.feasible else math.inf, len(scored), c))
    scored.sort(key=lambda x: (x[0], x[1]))
    info["start"] = {c.solver: v for v, _, c in scored}
    best_val, _, best = scored[0]
    if not math.isfinite(best_val):
        best = scored[0][2]
    budget = int(settings.get("search_evals", max(200, min(4000, 400_000 // max(problem.n, 1)))))
    search = _Search(problem, best.with_(order=evaluate(problem, best).order), mods, budget, deadline)
    search.run()
    info.update(started_from=best.solver, evals=search.evals, time_s=time.perf_counter() - t0)
    return search.plan.with_(status="heuristic", info=info)
