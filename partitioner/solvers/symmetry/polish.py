"""The symmetry solver's polish: its expanded reduced plans improved on the full problem.

A plan expanded from the reduced problem (:mod:`partitioner.solvers.symmetry.solver`) keeps stages
contiguous and on distinct devices; :func:`_polish_select` runs a short, deterministic local
search on the full operator-level problem with the split heuristic's incremental engine
(:mod:`partitioner.solvers.split.engine`, :mod:`partitioner.solvers.split.search`): the
critical-path descent for latency, and for throughput :func:`_relief_descent` (the
bottleneck device's nodes to the devices that run them at least cost), with split's
throughput descent when it stalls. Candidates share ``RACE_SHARE`` of the budget, the best
gets the rest; the winner is graded by the evaluator and is never worse than its start.
"""

from __future__ import annotations

import copy
import heapq
import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from ...ir.plan import Objective, Plan
from ...ir.settings import Settings
from ...machine.evaluate import evaluate
from ...machine.problem import Problem
from ..split.engine import State, Tables
from ..split.score import Budget, Scorer
from ..split.search import latency_descent, throughput_descent, try_moves
from .options import SymmetryOptions

if TYPE_CHECKING:  # annotations only: symmetry imports this module
    from .blocks import Blocks, DeviceClasses

log = logging.getLogger(__name__)

POLISH_PER_NODE = {"latency": 10, "throughput": 150}  # default polish budget: work units per node ...
POLISH_BASE = 5_000        # ... plus this (split's search: 1000 per node + 500,000)
RACE_SHARE = 0.5           # of the polish budget, shared evenly by the candidates before the best gets the rest
RACE_CUT = 1.25            # candidates starting this much worse than the best start are not polished
FALLBACK_SHARE = 0.25      # of the budget left, for split's throughput descent when the relief stalls
RELIEF_TRIES = 64          # relief moves tried per bottleneck before falling back to split's descent


def _units_as_modules(problem: Problem, bl: Blocks) -> tuple[list[list[int]], list[int]]:
    """The reduced problem's units (prologue, every block's segments, epilogue) as the modules
    of the polish's part moves; nodes outside them (none here) form singletons."""
    bounds = [0, *bl.cuts, bl.size]
    mods = [list(bl.prologue)] if bl.prologue else []
    for blk in bl.blocks:
        mods += [list(blk[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    if bl.epilogue:
        mods.append(list(bl.epilogue))
    mod_of = [-1] * problem.n
    for k, m in enumerate(mods):
        for v in m:
            mod_of[v] = k
    for v in range(problem.n):
        if mod_of[v] < 0:
            mod_of[v] = len(mods)
            mods.append([v])
    return mods, mod_of


def _relief_descent(st, score, budget, mod_of=None, mods=None) -> tuple:
    """Throughput descent that relieves the bottleneck device by its cheapest moves first.

    A contiguous pipeline leaves a device that is fast only on some operators (a host CPU
    next to GPUs: launch-bound elementwise ops cost it about what they cost a GPU) either
    idle or holding a stage of mixed operators. Each step takes the bottleneck device
    ``d`` and tries to move one of its nodes ``v`` to another device ``b`` that stays
    below the bottleneck, in increasing order of ``T[v, b] / T[v, d]`` (the work a move
    adds per unit it removes; the greedy order of the fractional load-balancing LP), at
    most :data:`RELIEF_TRIES` per step, keeping the first that improves the score
    (leximax of the loads, with links and memory; :class:`~..split.search.Scorer`).
    When no such move helps (or a link is the bottleneck), ``split``'s own throughput
    descent runs with ``FALLBACK_SHARE`` of the budget left; the loop stops when neither
    improves (by :func:`_gains`). Every scanned node counts one work unit. Returns the
    final score.
    """
    t = st.t
    D = t.D
    Tm = np.where(t.mask, t.p.T, np.inf)
    free = t.p.group_of < 0
    best = score(st)
    while not budget.out(st):
        loads = st.loads
        r = max(range(t.R), key=loads.__getitem__)
        improved = False
        if r < D and st.seq[r]:
            top = loads[r]
            nodes = np.array(st.seq[r])
            Tn = Tm[nodes]
            g = Tn[:, r]
            new = np.asarray(loads[:D])[None, :] + Tn
            valid = (new < top) & ((g > 0) & free[nodes])[:, None]
            valid[:, r] = False
            st.work += nodes.size
            vi, bi = np.nonzero(valid)
            if vi.size:
                keys = (bi, nodes[vi], new[vi, bi], Tn[vi, bi] / g[vi])
                for k in _lex_order(keys, RELIEF_TRIES):
                    v, b = int(nodes[vi[k]]), int(bi[k])
                    kept, best = try_moves(st, [(v, b, st.pos[v])], score, best)
                    if kept:
                        improved = True
                        break
                    if budget.out(st):
                        return best
        if not improved:
            before = st.work
            cap = Budget(before + FALLBACK_SHARE * max(0.0, budget.limit - before), budget.deadline)
            s = throughput_descent(st, score, cap, mod_of, mods)
            if st.work == before or not _gains(s, best):
                break
            best = s
    return best


def _lex_order(keys: tuple, most: int):
    """The first ``most`` indices of ``np.lexsort(keys)`` (last key primary), lazily: the least
    by a linear scan (the first try is usually kept), the others by one sort when asked."""
    c = np.flatnonzero(keys[-1] == keys[-1].min())
    for key in keys[-2::-1]:
        if c.size == 1:
            break
        kc = key[c]
        c = c[kc == kc.min()]
    first = int(c[0])
    yield first
    if most > 1:
        for k in np.lexsort(keys)[1:most].tolist():
            yield k


def _gains(a: tuple, b: tuple) -> bool:
    """Throughput score ``a`` strictly better than ``b``: violation, then period (relative
    tolerance), then the sorted loads with an absolute tolerance at the scale of the period
    (loads that cancel out to about -1e-19 must not read as an improvement)."""
    if abs(a[0] - b[0]) > 1e-12:
        return a[0] < b[0]
    if abs(a[1] - b[1]) > 1e-12 * max(abs(b[1]), 1e-300):
        return a[1] < b[1]
    tol = 1e-9 * max(abs(b[1]), 1e-300)
    for p, q in zip(a[2], b[2]):
        if abs(p - q) > tol:
            return p < q
    return False


def _positions(problem: Problem, plan: Plan) -> list[float]:
    """Priority positions whose restriction to every device is the plan's order: a topological
    order of the data edges plus each device's chain (Kahn, least index first)."""
    n = problem.n
    nxt = [-1] * n
    indeg = [len(p) for p in problem.preds]
    for o in plan.order:
        for a, b in zip(o, o[1:]):
            nxt[a] = b
            indeg[b] += 1
    heap = [v for v in range(n) if not indeg[v]]
    heapq.heapify(heap)
    pos = [0.0] * n
    k = 0
    while heap:
        v = heapq.heappop(heap)
        pos[v] = float(k)
        k += 1
        for w in (*problem.succs[v], nxt[v]):
            if w >= 0:
                indeg[w] -= 1
                if not indeg[w]:
                    heapq.heappush(heap, w)
    return pos


def _masked(tab, devs: tuple[int, ...]):
    """``tab`` restricted to the devices ``devs`` (a replica's group): a shallow copy with its own
    mask and allowed-device lists; every other table of :class:`Tables` is independent of the mask."""
    out = copy.copy(tab)
    keep = [False] * tab.D
    for d in devs:
        keep[d] = True
    out.mask = tab.mask & np.array(keep)[None, :]
    out.allowed = [[d for d in a if keep[d]] for a in tab.allowed]
    out._qs = None
    return out


def _start(problem: Problem, plan: Plan, tab, score):
    """The incremental state of one pipeline, in the plan's own order (index order, patterns in the
    order of their schedule), and its score."""
    lat = problem.objective is Objective.LATENCY
    sched = lat or problem.constraints.latency_ceiling is not None
    track = not lat or not problem.memory_never_binds() or problem.constraints.throughput_floor is not None
    indexed = all(all(a < b for a, b in zip(o, o[1:])) for o in plan.order)
    st = State(tab, plan.placement, range(problem.n) if indexed else _positions(problem, plan), schedule=sched,
               loads=track)
    st.work = 0
    return st, score(st)


def _descend(problem: Problem, st, score, budget, mods, mod_of) -> tuple:
    """The polish of one pipeline: ``split``'s latency descent (critical-path moves, runs, part
    moves of the reduced problem's units, reorders), or for throughput the relief descent
    (:func:`_relief_descent`, which falls back on ``split``'s throughput descent)."""
    if problem.objective is Objective.LATENCY:
        return latency_descent(st, score, budget, mod_of, mods)
    return _relief_descent(st, score, budget, mod_of, mods)


def _combined(problem: Problem, parts) -> tuple[float, float]:
    """``(violation, value)`` of a candidate from its parts' scores (replicas: throughputs add up)."""
    viol = sum(p["score"][0] for p in parts)
    if problem.objective is Objective.LATENCY:
        return viol, parts[0]["score"][1]
    rate = sum(1.0 / p["score"][1] if p["score"][1] > 0 else math.inf for p in parts)
    return viol, (1.0 / rate if rate > 0 else math.inf)


def _polish_select(problem: Problem, settings: Settings, bl: Blocks, cls: DeviceClasses, cands,
                   deadline: float):
    """Polish the candidates (the DP's pipelines, the replica split) on the full problem and
    return the best (see the module docstring): the candidates that start within ``RACE_CUT`` of
    the best start share ``RACE_SHARE`` of the budget evenly, the best of them by the incremental
    figures gets the rest; the winner is graded by the evaluator. Never worse than the best
    unpolished candidate."""
    t0 = time.perf_counter()
    given = settings.options_of(SymmetryOptions).polish_work
    work = float(given if given is not None else POLISH_PER_NODE[problem.objective.value] * problem.n + POLISH_BASE)
    score = Scorer(problem, check_memory=not problem.memory_never_binds())
    mods, mod_of = _units_as_modules(problem, bl)
    full = Tables(problem)
    single: dict[int, tuple] = {}  # class -> score of a replica on one device of it (all alike)
    entries = []
    for label, plan, dp_value in cands:
        parts = []
        for r in plan.replicas or (plan,):
            devs = tuple(sorted(set(int(x) for x in r.placement)))
            if plan.replicas and len(devs) == 1:  # nothing to move within a one-device group
                c = cls.of[devs[0]]
                if c not in single:
                    single[c] = score(State(full, r.placement, range(problem.n), schedule=False))
                parts.append({"plan": r, "state": None, "score": single[c], "devs": devs})
                continue
            tab = _masked(full, devs) if plan.replicas else full
            st, s0 = _start(problem, r, tab, score)
            parts.append({"plan": r, "state": st, "score": s0, "devs": devs})
        entries.append({"label": label, "plan": plan, "dp_value": dp_value, "parts": parts,
                        "start": _combined(problem, parts), "work": 0.0})

    def run(e: dict, amount: float) -> None:
        movable = [p for p in e["parts"] if p["state"] is not None]
        size = sum(len(p["devs"]) for p in movable)
        for p in movable:
            st = p["state"]
            before = st.work
            p["score"] = _descend(problem, st, score, Budget(before + amount * len(p["devs"]) / size, deadline),
                                  mods, mod_of)
            e["work"] += st.work - before

    lead = min(e["start"] for e in entries)
    racing = [e for e in entries if e["start"][0] <= lead[0] + 1e-12 and e["start"][1] <= RACE_CUT * lead[1]]
    race = len(racing) > 1 and RACE_SHARE < 1
    for e in racing:
        run(e, work * (RACE_SHARE if race else 1.0) / len(racing))
    best = min(racing, key=lambda e: (_combined(problem, e["parts"]), entries.index(e)))
    if race:
        run(best, work - sum(e["work"] for e in entries))
    parts = [p["state"].plan(status="heuristic") if p["state"] is not None else p["plan"] for p in best["parts"]]
    out = parts[0] if not best["plan"].replicas else Plan(parts[0].placement, parts[0].order, status="heuristic",
                                                           replicas=tuple(parts))
    ev = evaluate(problem, out)
    viol, value = _combined(problem, best["parts"])
    if abs(ev.value(problem.objective) - value) > 1e-9 * max(value, 1e-30) or ev.feasible != (viol <= 1e-12):
        log.warning("symmetry: polished figures differ from the evaluator's (%.6g vs %.6g); grading the "
                    "unpolished candidates", value, ev.value(problem.objective))
        plan, value, dp_value, info = _plain_select(problem, cands)
        return plan, value, dp_value, {**info, "polish_mismatch": True}
    tried = [{"candidate": e["label"], "dp_value_s": e["dp_value"], "start_value_s": e["start"][1],
              "polished_value_s": _combined(problem, e["parts"])[1], "work": e["work"]} for e in entries]
    return out, ev.value(problem.objective), best["dp_value"], {
        "polished": True, "polish_work": sum(e["work"] for e in entries), "polish_budget": work,
        "polish_s": round(time.perf_counter() - t0, 4), "candidates": tried, "chosen": best["label"],
        "unpolished_value_s": min(e["start"][1] for e in entries if e["start"][0] <= 1e-12)
        if any(e["start"][0] <= 1e-12 for e in entries) else None}


def _plain_select(problem: Problem, cands) -> tuple[Plan, float, float, dict]:
    """The best candidate by the evaluator (latency: also with the list-scheduling order)."""
    thr = problem.objective is Objective.THROUGHPUT
    best = None
    for _, plan, dp_value in [*cands, *(((k, _listed(p), v) for k, p, v in cands) if not thr else ())]:
        ev = evaluate(problem, plan)
        key = (not ev.feasible, ev.value(problem.objective))
        if best is None or key < best[0]:
            best = (key, plan, dp_value)
    (_, value), plan, dp_value = best
    return plan, value, dp_value, {"polished": False}


def _listed(plan: Plan) -> Plan:
    """The same placement with the evaluator's list-scheduling order (decreasing upward rank)."""
    if plan.replicas:
        reps = tuple(r.with_(order=None) for r in plan.replicas)
        return plan.with_(order=None, replicas=reps)
    return plan.with_(order=None)
