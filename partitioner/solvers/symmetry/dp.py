"""The symmetry solver's reduced problem: a pipeline DP over block units and device classes.

:mod:`partitioner.solvers.symmetry.solver` detects the repeated blocks and the device classes and calls
:func:`_build` (units, costs, memory, latency group-stage kinds from :func:`_group_kinds`),
:func:`_dp` / :func:`_backtrack` (the pipeline DP over the class lattice),
:func:`_replica_split` (data-parallel replicas over the lattice) and :func:`_expand` (the
stages back to a plan for every node). The formulation is in that module's docstring.
"""

from __future__ import annotations

import copy
import heapq
import math
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING

import numpy as np

from ...errors import InfeasibleError
from ...ir.plan import Objective, Plan
from ...ir.settings import Settings
from ...machine.evaluate import evaluate
from ...machine.problem import Problem

if TYPE_CHECKING:  # annotations only: symmetry imports this module
    from .blocks import Blocks, DeviceClasses


# ---- the reduced problem ---------------------------------------------------------------------------
# Units: 0 = the prologue, 1..U = the blocks' segments (U = L x g), U+1 = the epilogue. A stage is a
# range of units [j, k) of positions 0..U+2; the first stage starts at 0, the last ends at U+2.
@dataclass
class _Kind:
    """A stage type: ``u[c]`` devices of class ``c``; the boundary enters and leaves on ``anchor``."""

    u: tuple[int, ...]
    anchor: int
    comp: np.ndarray              # (E+1, E+1), E = U+2: cost of units [j, k), inf when invalid
    pattern: tuple | None = None  # group stages: (class, slot) of every node of p blocks; None: one device
    tau: float = 0.0

    def __post_init__(self):
        self.rows = np.flatnonzero(np.isfinite(self.comp).any(axis=1))
        self.reps = self.solo = None  # group stages, per units [j, k): repetitions of the pattern, and
        self.group = ()               # the group device (index into ``group``) running the other blocks
        self.prank = None             # group stages: rank of every pattern node in the pattern's schedule


@dataclass
class _Reduced:
    K: int
    sizes: tuple[int, ...]
    U: int
    g: int
    kinds: list
    link: np.ndarray      # (K, K, U+3) transfer cost at cut j between the anchors' classes
    shared: np.ndarray    # (K, K) shared tensors from the first class to another (period)
    h_in: np.ndarray      # (K,) model inputs from the host
    h_out: np.ndarray     # (K,) model outputs to the host
    additive: bool
    stats: dict = field(default_factory=dict)  # pattern sub-solves run and skipped

    @property
    def end(self) -> int:
        return self.U + 2


def _build(problem: Problem, bl: Blocks, cls: DeviceClasses, additive: bool, settings: Settings) -> _Reduced:
    K, L = len(cls.members), len(bl.blocks)
    rep = [m[0] for m in cls.members]
    other = [m[1] if len(m) > 1 else m[0] for m in cls.members]
    bounds = [0, *bl.cuts, bl.size]
    g = len(bounds) - 1
    U, E = L * g, L * g + 2
    T, pb, ob = problem.T, problem.param_bytes, problem.output_bytes
    units = [list(bl.prologue)] + [list(bl.blocks[q][bounds[s]:bounds[s + 1]]) for q in range(L)
                                    for s in range(g)] + [list(bl.epilogue)]
    ut = np.array([T[np.ix_(x, rep)].sum(axis=0) if x else np.zeros(K) for x in units])     # (E, K)
    bad = ~np.isfinite(ut)
    ST = np.vstack([np.zeros(K), np.cumsum(np.where(bad, 0.0, ut), axis=0)]).T              # (K, E+1)
    SB = np.vstack([np.zeros(K), np.cumsum(bad, axis=0)]).T
    SM = np.concatenate([[0.0], np.cumsum([pb[x].sum() for x in units])])
    in_b = [b for b, _ in problem.in_tensors]
    out_b = [b for _, b in problem.outputs]
    mem = dict(act=_block_peak(problem, bl) + sum(bl.shared) + max((sum(c) for c in bl.cut_cross), default=0.0),
               first=ob[list(bl.prologue)].sum() + sum(in_b), last=ob[list(bl.epilogue)].sum())
    cap = problem.capacity if problem.constraints.memory else np.full(problem.D, np.inf)
    k = np.arange(E + 1)
    need = SM[None, :] - SM[:, None] + mem["act"] + np.where(k == 0, mem["first"], 0.0)[:, None] \
        + np.where(k == E, mem["last"], 0.0)[None, :]
    upper = k[None, :] > k[:, None]
    kinds, stats = [], {}
    for c in range(K):
        t = ST[c][None, :] - ST[c][:, None]
        ok = upper & (need <= cap[rep[c]] * (1 + 1e-12)) & ((SB[c][None, :] - SB[c][:, None]) == 0)
        kinds.append(_Kind(tuple(int(x == c) for x in range(K)), c, np.where(ok, t, np.inf)))
    if additive and settings.get("groups", True):
        kinds += _group_kinds(problem, bl, cls, g, ut, mem, cap, settings, stats)
    last = set(bl.blocks[-1])
    for kd in kinds:  # a stage of only the prologue (epilogue) must hold something and take the inputs (outputs)
        if not bl.prologue or any(d not in set(bl.prologue) for _, ds in problem.in_tensors for d in ds):
            kd.comp[0, 1] = np.inf
        if not bl.epilogue or any(s_ in last for s_, _ in problem.outputs):
            kd.comp[E - 1, E] = np.inf
        kd.rows = np.flatnonzero(np.isfinite(kd.comp).any(axis=1))

    def cm(a: int, b: int, nbytes: float) -> float:
        return problem.comm(rep[a], other[b] if a == b else rep[b], nbytes)

    agg = (lambda xs: max(xs, default=0.0)) if additive else sum
    link = np.full((K, K, E + 1), np.inf)
    shared = np.zeros((K, K))
    for a, b in product(range(K), repeat=2):
        if a == b and len(cls.members[a]) < 2:
            continue
        cut_t = [agg([cm(a, b, x) for x in c]) for c in bl.cut_cross]
        bnd_t = agg([cm(a, b, x) for x in bl.boundary])
        for j in range(1, E):
            link[a, b, j] = bnd_t if (j - 1) % g == 0 or j == E - 1 else cut_t[(j - 1) % g - 1]
        shared[a, b] = sum(cm(a, b, x) for x in bl.shared)
    host = problem.host
    h_in = np.array([agg([problem.comm(host, rep[c], b) for b in in_b]) for c in range(K)])
    h_out = np.array([agg([problem.comm(rep[c], host, b) for b in out_b]) for c in range(K)])
    return _Reduced(K, cls.sizes, U, g, kinds, link, shared, h_in, h_out, additive, stats)


def _block_peak(problem: Problem, bl: Blocks) -> float:
    """Peak live activation bytes of one block run alone in index order, as the evaluator counts
    them: an output from its node to its last consumer (to the block's end when the next block
    reads it), a received boundary tensor from its first to its last consumer."""
    blk = bl.blocks[1]
    pos = {v: r for r, v in enumerate(blk)}
    m = len(blk)
    diff = np.zeros(m + 1)
    for v in blk:
        r = pos[v]
        last = max([pos.get(w, m - 1) for w, _ in problem.succ_bytes[v]] + [r])
        diff[r] += problem.output_bytes[v]
        diff[last + 1] -= problem.output_bytes[v]
    uses: dict[int, list] = {}
    for rs, rd, by in bl.chain:
        uses.setdefault(rs, []).append((rd, by))
    for lst in uses.values():
        rds = [rd for rd, _ in lst]
        diff[min(rds)] += max(by for _, by in lst)
        diff[max(rds) + 1] -= max(by for _, by in lst)
    return float(np.cumsum(diff[:-1]).max()) if m else 0.0


def _block_problem(problem: Problem, bl: Blocks, p: int):
    """A cost graph of ``p`` consecutive blocks (from the second) whose boundary input and shared
    tensors are model inputs and whose boundary output is the model output."""
    from ...ir.graph import CostGraph, InputTensor

    blk = [v for q in range(1, 1 + p) for v in bl.blocks[q]]
    names = [problem.node_name(v) for v in blk]
    pos = {v: r for r, v in enumerate(blk)}
    edges = [(problem.node_name(v), problem.node_name(w), b) for v in blk for w, b in problem.succ_bytes[v] if w in pos]
    ins: dict[str, tuple[float, list[str]]] = {}
    srcs = [(f"prev{rs}", rd, by) for rs, rd, by in bl.chain]
    srcs += [(f"shared{u}", q * bl.size + rd, by) for q in range(p) for u, rd, by in bl.shared_edges]
    for src, rd, by in srcs:
        b0, dsts = ins.get(src, (0.0, []))
        ins[src] = (max(b0, by), dsts + [names[rd]])
    outs: dict[int, float] = {}
    for rs, _, by in bl.chain:
        outs[rs] = max(outs.get(rs, 0.0), by)
    cg = CostGraph(f"{problem.graph.name}:{p}-block", [problem.graph.node(x) for x in names], edges,
                   [InputTensor(k, b, tuple(dict.fromkeys(d))) for k, (b, d) in sorted(ins.items())],
                   [(names[(p - 1) * bl.size + r], b) for r, b in sorted(outs.items())])
    return cg, np.array(blk)


def _group_kinds(problem: Problem, bl: Blocks, cls: DeviceClasses, g: int, ut, mem, cap,
                 settings: Settings, stats: dict) -> list[_Kind]:
    """Latency stages on a group of devices of one server (one server type, one block type).

    A pattern for ``p`` consecutive blocks (``p`` in ``pattern_blocks``, default 1) is placed
    at operator level by each of ``pattern_solvers`` on a sub-problem whose boundary input
    arrives at, and whose boundary output returns to, the group's anchor device (without
    memory limits, and for ``m`` in ``L / (p f)``, f in ``pattern_memory``, with the memory
    of ``m`` repetitions per device); every distinct pattern is a stage kind. A stage of
    ``m`` blocks repeats the pattern ``r`` times and runs the other ``m - r p`` blocks alone
    on one device of the anchor's class, ``r`` as large as memory allows
    (:func:`_mixed_costs`); the prologue / epilogue go on the stage's entry / exit device.
    Groups hold main-class devices (:func:`_main_classes`) and are anchored on their fastest
    class. Groups are enumerated by growing composition, per (server, anchor, solver), and
    a composition is not solved when it contains one after which growth stopped (a device
    stayed idle, adding the last device did not shorten the pattern by ``PATTERN_TOL``, or
    the solver was ``PATTERN_TOL`` behind another one), when another solver's pattern for
    it is within ``PATTERN_TOL`` of its critical-path bound, or when that bound cannot beat
    (by ``PATTERN_TOL``) an unconstrained pattern that holds every block plus what the
    anchor's class can save at the ends of the pipeline (inputs and prologue, epilogue and
    outputs). Servers are visited fastest first.
    """
    from ...ir.plan import Constraints
    from ..registry import SOLVERS

    K, L = len(cls.members), len(bl.blocks)
    U, E = L * g, L * g + 2
    fast = _main_classes(problem, bl, cls, float(settings.get("main_ratio", MAIN_RATIO)))
    per_block = ut[1:1 + g].sum(axis=0)
    by_host: dict[str, list[int]] = {}
    for d, dev in enumerate(problem.spec.devices):
        by_host.setdefault(dev.host, []).append(d)
    k = np.arange(E + 1)
    blocks_at = np.where(k == 0, 0, np.where(k >= U + 1, L, (k - 1) // g))   # blocks before position k
    on_block = (k == 0) | (k == E) | (((k - 1) % g == 0) & (k <= U + 1) & (k >= 1))
    nb = blocks_at[None, :] - blocks_at[:, None]
    extra_j = np.where(k == 0, mem["first"], 0.0)
    extra_k = np.where(k == E, mem["last"], 0.0)
    max_group = int(settings.get("max_group", 8))
    hop = [sum(problem.comm(m[0], m[1], b) for b in bl.boundary) if len(m) > 1 else 0.0 for m in cls.members]
    solvers = tuple(settings.get("pattern_solvers", ("heft", "peft")))
    pro_p = problem.param_bytes[list(bl.prologue)].sum()
    epi_p = problem.param_bytes[list(bl.epilogue)].sum()
    pb_block = problem.param_bytes[list(bl.blocks[0])].sum()
    hp_, he_ = (k == 0).astype(int)[:, None], (k == E).astype(int)[None, :]
    nbc = np.clip(nb, 0, L)
    ok = (nb >= 1) & on_block[:, None] & on_block[None, :] & (k[None, :] > k[:, None])
    taus: dict = {}   # (configuration, u) -> latency of the pattern
    near: dict = {}   # (.., u) -> a pattern for u is within PATTERN_TOL of its critical-path bound
    cones: dict = {}  # configuration -> compositions u whose growth stops (no group containing u is solved)
    best_hold: dict = {}  # (p, anchor class) -> least latency of an unconstrained pattern holding every block
    host_d = problem.host
    entry = [sum(problem.comm(host_d, m[0], b) for b, _ in problem.in_tensors) + ut[0, c]
             for c, m in enumerate(cls.members)]
    leave = [sum(problem.comm(m[0], host_d, b) for _, b in problem.outputs) + ut[E - 1, c]
             for c, m in enumerate(cls.members)]

    def gain(a: int, aw: int) -> float:
        """The most a stage anchored on class ``a`` can save over one anchored on ``aw`` at the
        ends of the pipeline (model inputs and prologue, epilogue and outputs)."""
        return max(0.0, entry[aw] - entry[a]) + max(0.0, leave[aw] - leave[a])
    cps: dict = {}

    def cp(u) -> float:
        """Critical path of the pattern's blocks with every node on its fastest class of ``u``."""
        key_ = (blk_key, tuple(c for c in range(K) if u[c]))
        if key_ not in cps:
            tmin = problem.T[np.ix_(blk, [cls.members[c][0] for c in key_[1]])].min(axis=1)
            f = [0.0] * len(blk)
            for i, v in enumerate(blk):
                f[i] = tmin[i] + max((f[at[w]] for w in problem.preds[v] if w in at), default=0.0)
            cps[key_] = max(f, default=0.0)
        return cps[key_]

    solved = skipped = 0
    out, seen = [], set()
    for p in [int(x) for x in settings.get("pattern_blocks", (1,)) if 1 <= int(x) < L]:
        cg, blk = _block_problem(problem, bl, p)
        pb = problem.param_bytes[blk]
        blk_key, at = p, {int(v): i for i, v in enumerate(blk)}
        base = {False: Problem(cg, problem.spec, Objective.LATENCY, Constraints(memory=False), T=problem.T[blk])}
        for host, devs in sorted(by_host.items(), key=lambda hd: (min(per_block[cls.of[d]] for d in hd[1]), hd[0])):
            cnt = [sum(1 for d in devs if cls.of[d] == c) if c in fast else 0 for c in range(K)]
            for u in product(*[range(x + 1) for x in cnt]):
                if not 2 <= sum(u) <= max_group or (p, u) in seen:
                    continue
                seen.add((p, u))
                G = [d for c in range(K) for d in [x for x in devs if cls.of[x] == c][:u[c]]]
                slot = {d: (cls.of[d], [y for y in G if cls.of[y] == cls.of[d]].index(d)) for d in G}
                present = [c for c in range(K) if u[c]]
                for a in [c for c in present if per_block[c] <= per_block[present].min() * (1 + 1e-9)]:
                    x = next(d for d in G if cls.of[d] == a)
                    fits = set()
                    for m in _targets(settings.get("pattern_memory", ()), L, p):
                        for solver in solvers:
                            if solver in fits:  # its unconstrained pattern already holds every block
                                continue
                            cfg = (p, host, a, solver, m)
                            if near.get((p, host, a, m, u), False):
                                skipped += 1  # an earlier solver's pattern is within PATTERN_TOL of the bound
                                continue
                            if any(all(ui_ >= wi_ for ui_, wi_ in zip(u, w)) for w in cones.get(cfg, ())) or (
                                    cp(u) >= min((tw + gain(a, aw) for (p_, aw), tw in best_hold.items() if p_ == p),
                                                 default=math.inf) * (1 - PATTERN_TOL)):
                                skipped += 1  # see the docstring: the group does not grow past this, or
                                continue      # cannot beat a pattern that holds every block
                            T = problem.T[blk].copy()
                            T[:, [d for d in range(problem.D) if d not in G]] = np.inf
                            if (m is not None) not in base:
                                base[True] = base[False].with_objective(Objective.LATENCY, Constraints(memory=True))
                            sub = copy.copy(base[m is not None])  # the sub-problem with these devices
                            sub.T, sub.supported, sub.host = T, np.isfinite(T), x
                            if m is not None:
                                sub.capacity = np.maximum(cap - mem["act"] * p, 0.0) / m
                            plan = SOLVERS[solver].fn(sub, Settings(seed=settings.seed))
                            solved += 1
                            busy = set(int(d) for d in plan.placement)
                            ev_sub = evaluate(sub, plan)
                            tau = ev_sub.latency
                            taus[(cfg, u)] = tau
                            near[(p, host, a, m, u)] = tau <= (1 + PATTERN_TOL) * cp(u)
                            if any(d not in busy and d != x for d in G) or any(
                                    (cfg, _minus(u, c)) in taus and tau >= taus[(cfg, _minus(u, c))] * (1 - PATTERN_TOL)
                                    for c in range(K)):
                                cones.setdefault(cfg, []).append(u)
                            key = (p, u, a, plan.placement)
                            if key in seen:
                                continue
                            seen.add(key)
                            load = np.bincount(np.asarray(plan.placement), weights=pb, minlength=problem.D)
                            # repetitions that fit, for a stage holding the prologue (j = 0) and/or the epilogue (k = E)
                            same = [i for i, d in enumerate(G) if cls.of[d] == a]
                            cost, nrep, nsolo = _mixed_costs(
                                cap[G] - mem["act"] * p, load[G], G.index(x), same, extra_j[0] + pro_p,
                                extra_k[E] + epi_p, L, p, tau, float(ut[1:1 + g, a].sum()), float(pb_block), hop[a])
                            if m is None and nrep[1, 1, L] * p >= L:
                                fits.add(solver)
                                best_hold[(p, a)] = min(best_hold.get((p, a), math.inf), tau)
                            t = cost[hp_, he_, nbc] + np.where(k == 0, ut[0, a], 0.0)[:, None] \
                                + np.where(k == E, ut[E - 1, a], 0.0)[None, :]
                            kd = _Kind(tuple(u), a, np.where(ok & np.isfinite(t), t, np.inf),
                                       tuple(slot[int(d)] for d in plan.placement), float(tau))
                            kd.reps = np.where(ok, nrep[hp_, he_, nbc], 0)
                            kd.solo = np.where(ok, nsolo[hp_, he_, nbc], 0)
                            kd.group = tuple(slot[d] for d in G)
                            seq = sorted(range(len(blk)), key=lambda i: (ev_sub.start[i], ev_sub.finish[i], i))
                            prank = [0] * len(blk)
                            for r_, i in enumerate(seq):
                                prank[i] = r_
                            kd.prank = tuple(prank)
                            out.append(kd)
                        done = {sv: taus[((p, host, a, sv, m), u)] for sv in solvers
                                if ((p, host, a, sv, m), u) in taus}
                        for sv, tv in done.items():  # a solver clearly behind another one here stops growing
                            if tv > min(done.values()) * (1 + PATTERN_TOL):
                                cones.setdefault((p, host, a, sv, m), []).append(u)
    stats.update(pattern_solves=solved, pattern_solves_skipped=skipped)
    return out


def _minus(u: tuple[int, ...], c: int) -> tuple[int, ...]:
    return tuple(x - (i == c) for i, x in enumerate(u))


def _targets(fractions, L: int, p: int) -> list[int | None]:
    """Repetitions a pattern is solved for: any (no memory limit), then ``L / (p f)`` per ``f``."""
    return [None, *sorted({-(-L // (p * int(f))) for f in fractions}, reverse=True)]


def _mixed_costs(room, load, xi: int, same: list[int], pro: float, epi: float, L: int, p: int, tau: float,
                 t_solo: float, pb_block: float, hop: float):
    """Latency of a group stage of ``m`` blocks (``m = 0..L``): ``r`` repetitions of a ``p``-block
    pattern (``load[i]`` parameter bytes on group device ``i`` per repetition; the input arrives
    at, and the output returns to, the anchor ``xi``), then ``m - r p`` blocks alone on a device
    ``s`` of the anchor's class (the anchor, or the one of ``same`` the pattern loads least,
    reached by one boundary transfer ``hop``), with ``r`` the best that fits every device's
    ``room``; the prologue's bytes ``pro`` go on the anchor and the epilogue's ``epi`` on the
    stage's exit device. Returns ``cost[hp, he, m]`` (inf: no fit), ``r`` and ``s``."""
    cost = np.full((2, 2, L + 1), np.inf)
    reps = np.zeros((2, 2, L + 1), dtype=np.int64)
    solo = np.full((2, 2, L + 1), xi, dtype=np.int64)
    cands = [xi] + ([min((i for i in same if i != xi), key=lambda i: (load[i], i))] if len(same) > 1 else [])
    m = np.arange(L + 1)
    n = len(room)
    for hp, he in product((0, 1), repeat=2):
        rm = room.astype(float).copy()
        rm[xi] -= pro * hp + epi * he
        if rm.min() >= 0:  # the pattern alone; exit on the anchor
            r = m // p
            ok = (m >= 1) & (m % p == 0) & np.all(r[:, None] * load[None, :] <= rm[None, :], axis=1)
            c = np.where(ok, r * tau, np.inf)
            upd = c < cost[hp, he]
            cost[hp, he][upd], reps[hp, he][upd], solo[hp, he][upd] = c[upd], r[upd], xi
        for si in cands:  # then at least one block alone on si
            rm = room.astype(float).copy()
            rm[xi] -= pro * hp
            rm[si] -= epi * he
            if rm.min() < 0:
                continue
            r_oth = min((math.floor(rm[i] / load[i]) for i in range(n) if i != si and load[i] > 0), default=L)
            hi = np.minimum((m - 1) // p, r_oth)
            coef, rhs = load[si] - p * pb_block, rm[si] - m * pb_block  # on si: r * coef <= rhs
            lo = np.zeros(L + 1, dtype=np.int64)
            if coef < 0:
                lo = np.maximum(0, np.ceil(rhs / coef - 1e-9)).astype(np.int64)
            elif coef > 0:
                hi = np.minimum(hi, np.floor(rhs / coef + 1e-9)).astype(np.int64)
            else:
                hi = np.where(rhs < 0, -1, hi)
            for r in (lo, hi):
                ok = (m >= 1) & (lo <= hi) & (r >= lo) & (r <= hi)
                c = np.where(ok, r * tau + (m - r * p) * t_solo + (hop if si != xi else 0.0), np.inf)
                upd = c < cost[hp, he]
                cost[hp, he][upd], reps[hp, he][upd], solo[hp, he][upd] = c[upd], r[upd], si
    return cost, reps, solo


def _dp(R: _Reduced, f: int | None):
    """DP over (devices used per class, anchor class of the last stage, position); ``f``: the
    first stage's anchor class (None: any). Returns final values and back-pointers."""
    K, E, sizes = R.K, R.end, R.sizes
    strides = np.cumprod([1, *[s + 1 for s in sizes[:-1]]]).astype(np.int64)
    N = int(np.prod([s + 1 for s in sizes]))
    V = np.full((N, K, E + 1), np.inf)
    aj = np.full((N, K, E + 1), -1, dtype=np.int32)
    ac = np.full((N, K, E + 1), -1, dtype=np.int32)
    ak = np.full((N, K, E + 1), -1, dtype=np.int32)
    kidx = [int(np.dot(kd.u, strides)) for kd in R.kinds]
    for s, kd in enumerate(R.kinds):
        if f is not None and kd.anchor != f:
            continue
        a = kd.anchor
        val = R.h_in[a] + kd.comp[0] if R.additive else np.maximum(R.h_in[a], kd.comp[0])
        upd = val < V[kidx[s], a]
        V[kidx[s], a][upd] = val[upd]
        aj[kidx[s], a][upd], ak[kidx[s], a][upd] = 0, s
    vecs = [np.array(v[::-1]) for v in product(*[range(s + 1) for s in sizes[::-1]])]
    sz = np.array(sizes)
    fit = np.all(np.array(vecs)[:, None, :] + np.array([kd.u for kd in R.kinds])[None, :, :] <= sz, axis=2).tolist()
    cols = np.arange(E + 1)
    for ui in range(N):
        if not np.isfinite(V[ui]).any():
            continue
        entering: dict[int, tuple] = {}  # anchor -> (entry values at each cut, their previous anchors)
        for s, kd in enumerate(R.kinds):
            if not fit[ui][s]:
                continue
            a = kd.anchor
            if a not in entering:
                if R.additive:
                    W = V[ui] + R.link[:, a, :]
                else:
                    W = np.maximum(V[ui], R.link[:, a, :] + (R.shared[f, a] if f is not None else R.shared[:, a].max()))
                bc = W.argmin(axis=0)
                entering[a] = (W[bc, cols], bc)
            w, bc = entering[a]
            rows = kd.rows[np.isfinite(w[kd.rows])]
            if not rows.size:
                continue
            # the rows from the first to the last with a finite entry (an inf row is never the least
            # of a column that has a finite one, and ties go to the first row, as over ``rows``); a
            # stage [j, k) has k > j, so the columns up to the first row stay inf
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            lo = r0 + 1
            C = kd.comp[r0:r1, lo:]
            wr = w[r0:r1, None]
            cand = wr + C if R.additive else np.maximum(wr, C)
            jb = cand.argmin(axis=0)
            best = cand[jb, cols[:E + 1 - lo]]
            vi = ui + kidx[s]
            Vt = V[vi, a, lo:]
            upd = best < Vt
            if upd.any():
                Vt[upd] = best[upd]
                jr = jb[upd] + r0
                aj[vi, a, lo:][upd] = jr
                ac[vi, a, lo:][upd] = bc[jr]
                ak[vi, a, lo:][upd] = s
    final = V[:, :, E] + R.h_out[None, :] if R.additive else np.maximum(V[:, :, E], R.h_out[None, :])
    return final, (aj, ac, ak, kidx), vecs


def _backtrack(ptr, ui: int, c: int, E: int) -> list[tuple[int, int, int]]:
    aj, ac, ak, kidx = ptr
    stages, k = [], E
    while True:
        j, pc, s = int(aj[ui, c, k]), int(ac[ui, c, k]), int(ak[ui, c, k])
        stages.append((s, j, k))
        if pc < 0:
            break
        ui -= kidx[s]
        c, k = pc, j
    return stages[::-1]


def _expand(problem: Problem, bl: Blocks, cls: DeviceClasses, R: _Reduced, stages, used: dict[int, int]) -> Plan:
    """Stages ``(kind, j, k)`` over units -> a plan; ``used`` counts devices taken per class."""
    g, U = R.g, R.U
    bounds = [0, *bl.cuts, bl.size]
    pl = np.full(problem.n, -1, dtype=np.int64)
    prio = [float(v) for v in range(problem.n)]  # priority list: the index, but patterns in their own order
    patterned = False
    for s, j, k in stages:
        kd = R.kinds[s]
        taken = {}
        for c in [kd.anchor] + [c for c in range(R.K) if c != kd.anchor]:
            taken[c] = list(cls.members[c][used.get(c, 0):used.get(c, 0) + kd.u[c]])
            used[c] = used.get(c, 0) + kd.u[c]
        anchor = exit_ = taken[kd.anchor][0]
        first_block = None
        n_pat = int(kd.reps[j, k]) * (len(kd.pattern) // bl.size) if kd.pattern is not None else 0
        blocks_in = sorted({(x - 1) // g for x in range(max(j, 1), min(k, U + 1))})
        if kd.pattern is not None and len(blocks_in) > n_pat:
            c_, i_ = kd.group[int(kd.solo[j, k])]
            exit_ = taken[c_][i_]
        for unit in range(j, k):
            if unit == 0:
                pl[list(bl.prologue)] = anchor
            elif unit == U + 1:
                pl[list(bl.epilogue)] = exit_
            else:
                q, sg = divmod(unit - 1, g)
                blk = bl.blocks[q]
                if kd.pattern is None:
                    pl[list(blk[bounds[sg]:bounds[sg + 1]])] = anchor
                elif sg == 0:
                    first_block = q if first_block is None else first_block
                    if q - first_block >= n_pat:  # the blocks after the pattern's repetitions
                        pl[list(blk)] = exit_
                        continue
                    pbk = len(kd.pattern) // bl.size
                    r = (q - first_block) % pbk
                    pl[list(blk)] = [taken[c][i] for c, i in kd.pattern[r * bl.size:(r + 1) * bl.size]]
                    if kd.prank is not None:  # the pattern's own schedule order inside the repetition
                        patterned = True
                        f_rep = min(bl.blocks[q - r + i][0] for i in range(pbk))
                        P = len(kd.pattern)
                        for jj, v in enumerate(blk):
                            prio[v] = f_rep + (1.0 + kd.prank[r * bl.size + jj]) / (P + 2.0)
    order = [[] for _ in range(problem.D)]
    for i in (_priority_order(problem, prio) if patterned else range(problem.n)):
        order[pl[i]].append(i)
    return Plan(tuple(int(x) for x in pl), tuple(tuple(o) for o in order), status="heuristic")


def _priority_order(problem: Problem, prio) -> list[int]:
    """The topological order that takes the ready node of least ``(prio, index)`` first (Kahn)."""
    indeg = [len(p) for p in problem.preds]
    heap = [(prio[v], v) for v in range(problem.n) if not indeg[v]]
    heapq.heapify(heap)
    out = []
    while heap:
        _, v = heapq.heappop(heap)
        out.append(v)
        for w in problem.succs[v]:
            indeg[w] -= 1
            if not indeg[w]:
                heapq.heappush(heap, (prio[w], w))
    return out


def _replica_split(rates: dict[int, float], vecs) -> tuple[float, list[int]]:
    """Max total throughput over splits of the devices into replicas (sub-multisets of classes).

    ``vecs[i]`` is lattice point ``i`` (mixed radix, as in :func:`_dp`), so the rest of ``v`` after
    taking ``u <= v`` is the point ``v - u`` at index ``i_v - i_u``."""
    V = np.array(vecs)
    items = sorted(rates.items())
    ui_arr = np.array([u for u, _ in items], dtype=np.int64)
    le = np.all(V[ui_arr][None, :, :] <= V[:, None, :], axis=2) if items else np.zeros((len(vecs), 0), bool)
    F = [0.0] * len(vecs)
    choice: list[int | None] = [None] * len(vecs)
    for vi in range(len(vecs)):
        for k in np.flatnonzero(le[vi]).tolist():
            ui, rate = items[k]
            val = rate + F[vi - ui]
            if val > F[vi] * (1 + 1e-12):
                F[vi], choice[vi] = val, ui
    parts, vi = [], len(vecs) - 1
    while choice[vi] is not None:
        parts.append(choice[vi])
        vi -= choice[vi]
    return F[-1], parts


def _memory_error(problem: Problem, bl: Blocks, cls: DeviceClasses) -> InfeasibleError:
    pb = problem.param_bytes
    need, act, have = pb.sum(), _block_peak(problem, bl), problem.capacity.sum()
    where = ", ".join(f"{problem.devices[m[0]]}{'..' + problem.devices[m[-1]] if len(m) > 1 else ''} "
                      f"{problem.capacity[m[0]] / 1e9:.2f} GB{' each' if len(m) > 1 else ''}" for m in cls.members)
    msg = (f"{problem.graph.name} needs {need / 1e9:.2f} GB of parameters (KV cache included; "
           f"{pb[list(bl.blocks[0])].sum() / 1e9:.3f} GB per block) plus about {act / 1e9:.3f} GB of activations, "
           f"but the devices of {problem.spec.name!r} have {have / 1e9:.2f} GB usable in all ({where}): "
           f"short by {(need + act - have) / 1e9:.2f} GB")
    return InfeasibleError(msg, hint="use a spec with more memory, a lower memory_reserve, fewer kv_cache_tokens "
                                     "or a smaller dtype")


MAIN_RATIO = 2.0           # main classes: within this factor of the fastest class's time for a block
PATTERN_TOL = 0.005        # groups grow while their pattern's latency improves, and is not within, this much


def _main_classes(problem: Problem, bl: Blocks, cls: DeviceClasses, ratio: float) -> list[int]:
    """Classes whose time for one block is within ``ratio`` of the fastest class's."""
    blk = list(bl.blocks[0])
    t = np.array([problem.T[blk, m[0]].sum() for m in cls.members])
    fin = np.isfinite(t)
    if not fin.any():
        return list(range(len(cls.members)))
    return [c for c in range(len(cls.members)) if fin[c] and t[c] <= ratio * t[fin].min()]
