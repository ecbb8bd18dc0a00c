"""Lower bounds: numbers no plan can beat, for both objectives.

:func:`lower_bound` returns the largest of several proven bounds and names the one that
binds (``Bound.parts`` holds each, ``Bound.info`` the LP variants and times). ``A[v]``
is the set of devices that may run ``v`` (support and co-location groups).

Combinatorial parts (a dynamic programme or closed form):

* ``path`` (latency): ``head[v, d]`` bounds the finish of ``v`` if it runs on ``d`` (its
  inputs' earliest arrivals, each predecessor on its best device, plus ``T[v, d]``);
  ``tail[v, d]`` bounds the time from that finish to the end (each successor on its best
  device after the transfer; output transfers to the host). Any plan ``p`` has
  ``latency >= head[v, p(v)] + tail[v, p(v)] >= min_d (head + tail)[v, d]`` for every
  ``v``. Contention is ignored except at one node's own device: the inputs of ``v`` on
  ``d`` come either from ``d`` itself, where their producers ran one at a time (each from
  its own ``head - T``), or from another device after the transfer, so ``v`` is ready no
  earlier than ``min_L max(last arrival from elsewhere, one-machine span of L with
  release dates)`` over the sets ``L`` of local producers (by release order, exact on one
  machine); the same for the consumers in ``tail`` (Jackson's rule, decreasing tails). A
  local input may bring the chain of nodes that feeds only it (each running on ``d`` or
  not), priced by the least span over those options (:mod:`partitioner.bounds.join`).
  Chains of nodes only one device supports are priced exactly here (``T`` is infinite
  elsewhere). This is at least v1's path bound (``L`` of at most one node).
* ``energy``: ``sum_v min_d T[v, d] / D``: the busiest device does at least the average
  work (it is also implied by ``load``).
* ``window`` (latency): energetic reasoning. Node ``v`` on ``d`` runs inside ``[head - T,
  C - tail]``, so at most ``max(0, t1 - head + T)`` of it before ``t1`` and ``max(0, t2 -
  tail)`` after ``C - t2``: at least ``r[v, d] = max(0, T - both)`` inside ``[t1, C - t2]``,
  where every device works at most ``C - t1 - t2``. With weights ``y >= 0`` summing to 1
  (uniform, and the load LP's duals), ``C >= t1 + t2 + sum_v min_d y[d] r[v, d]`` whenever
  that sum is positive (then the window holds work, so it is not empty); the best over a
  grid of ``(t1, t2)`` (``WINDOW_GRID`` per side, up to the ``path`` value). The load
  bound is the window ``t1 = t2 = 0``; the others add the idle time forced at the start
  and the end.
* ``forced`` (latency): the nodes ``S`` only ``d`` can run all run on ``d``, one at a time:
  the first starts no earlier than ``min_S (head - T)``, the last finishes at least
  ``sum_S T`` later and is followed by its tail, so ``latency >= min_S (head - T)[., d] +
  sum_S T[., d] + min_S tail[., d]``.

Memory on a path (latency): ``cuts``, the transfers and slow devices that the capacities
force onto a path, a dynamic programme over its runs (:mod:`partitioner.bounds.cuts`).

Exact part (latency): ``chain``, the critical chain cut into short segments whose
schedules CP-SAT bounds exactly within a deterministic budget (:mod:`partitioner.bounds.chain`).

LP parts (formulations and proofs in :mod:`partitioner.bounds.lp`):

* ``load``: the fractional load-balancing LP; bounds the latency and the period,
  data-parallel replicas included (:func:`period_lp_bound`).
* ``coupled`` (latency): the load LP coupled with path potentials and transfer flows;
  at least ``path`` and ``load`` by construction.
* ``links`` (throughput): the load LP with link loads (and, with ``comm_blocks_device``,
  transfer time on the devices), made valid for replicas by :func:`period_lp_bound`.

Size fallbacks (measured on DNN-like DAGs, 4 devices, 2 cores): the coupled LP keeps
transfer flows on its ``LIMITS["coupled_z"] / (D (D - 1))`` most critical edges and its
potentials on the ``LIMITS["coupled_nodes"]`` most critical nodes; the period LP keeps
transfer indicators within ``LIMITS["period_nnz"]`` nonzeros. Dropping rows only relaxes
an LP, so every variant stays valid.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import progress
from ..errors import InfeasibleError
from ..ir.plan import Objective
from ..machine.problem import Problem
from . import chain as _chain
from . import cuts as _cuts
from . import join as _join
from . import lp as _lp
from .lp import LIMITS, LPResult, _Routes
from .memory import group_step_need, resident_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bound:
    """A lower bound on the objective (seconds) and the parts it is the maximum of."""

    value: float
    binding: str
    parts: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PathLabels:
    """``head[v, d]``: earliest finish of ``v`` on ``d``; ``tail[v, d]``: least time from that
    finish to the end; ``allowed`` (n, D); ``T`` with inf where not allowed."""

    head: np.ndarray
    tail: np.ndarray
    allowed: np.ndarray
    T: np.ndarray


# ---- combinatorial parts -------------------------------------------------------------

def allowed_mask(problem: Problem) -> np.ndarray:
    """``(n, D)`` bool: devices that may run each node: support, groups (all members on one
    device that supports them all) and, with memory on, whose capacity holds what the node
    needs (:func:`partitioner.bounds.memory.group_step_need`: its group's parameters and kept
    activations, and the tensors live during its own step; the evaluator's tolerance,
    relative 1e-9)."""
    ok = problem.supported.copy()
    cap = problem.capacity * (1 + 1e-9)
    if problem.constraints.memory:
        ok &= group_step_need(problem)[:, None] <= cap[None, :]
    for g in problem.groups:
        ok[g] &= problem.supported[g].all(axis=0)
        if problem.constraints.memory:
            ok[g] &= ok[g].all(axis=0)
    if not ok.any(axis=1).all():
        problem.check_supported()
    return ok


def path_labels(problem: Problem) -> PathLabels:
    """Forward (head) and backward (tail) earliest-time labels, contention ignored except
    among the inputs (outputs) of one node on its own device (module docstring, ``path``)."""
    n, D, host = problem.n, problem.D, problem.host
    A = allowed_mask(problem)
    T = np.where(A, problem.T, np.inf)
    cm = problem.comm_matrices()
    head = np.empty((n, D))
    ups, downs = _join.exclusive_chains(problem, True), _join.exclusive_chains(problem, False)
    for v in range(n):
        ready = np.zeros(D)
        for k in problem.node_inputs[v]:
            np.maximum(ready, cm(problem.in_tensors[k][0])[host], out=ready)
        pb = problem.pred_bytes[v]
        if pb:
            np.maximum(ready, _join.join_ready(head, pb, T, T[v], cm, ups), out=ready)
        head[v] = ready + T[v]
    tail = np.zeros((n, D))
    for s, b in problem.outputs:
        np.maximum(tail[s], cm(b)[:, host], out=tail[s])
    for v in range(n - 1, -1, -1):
        sb = problem.succ_bytes[v]
        if sb:
            np.maximum(tail[v], _join.fork_tail(tail, sb, T, T[v], cm, downs), out=tail[v])
    return PathLabels(head, tail, A, T)


def critical_path_bound(problem: Problem, labels: PathLabels | None = None) -> float:
    """``max_v min_d head[v, d] + tail[v, d]``: the communication-aware critical path (latency)."""
    lab = labels or path_labels(problem)
    if problem.n == 0:
        return 0.0
    return float((lab.head + lab.tail).min(axis=1).max())


def energy_bound(problem: Problem, labels: PathLabels | None = None) -> float:
    """``sum_v min_d T[v, d] / D``: the average work per device (both objectives)."""
    T = labels.T if labels is not None else np.where(allowed_mask(problem), problem.T, np.inf)
    return float(T.min(axis=1).sum() / problem.D) if problem.n else 0.0


def forced_bound(problem: Problem, labels: PathLabels | None = None) -> float:
    """Nodes only one device can run, run one at a time there (latency; see module docstring)."""
    lab = labels or path_labels(problem)
    best = 0.0
    only = lab.allowed.sum(axis=1) == 1
    for d in range(problem.D):
        S = np.flatnonzero(only & lab.allowed[:, d])
        if S.size:
            t = lab.T[S, d]
            best = max(best, float((lab.head[S, d] - t).min() + t.sum() + lab.tail[S, d].min()))
    return best


WINDOW_GRID = 24  # window starts (and ends) tried per side by ``window_bound``


def window_bound(problem: Problem, labels: PathLabels | None = None, weights=()) -> float:
    """Energetic reasoning over windows ``[t1, C - t2]`` (latency; see the module docstring):
    ``weights`` are extra device weight vectors (each normalised here) besides uniform."""
    lab = labels or path_labels(problem)
    n, D = problem.n, problem.D
    if n == 0:
        return 0.0
    A, T = lab.allowed, lab.T
    est = np.full((n, D), np.inf)
    np.subtract(lab.head, T, out=est, where=A)
    tl = np.where(A, lab.tail, np.inf)
    crit = critical_path_bound(problem, lab)
    ys = [np.full(D, 1.0 / D)]
    for y in weights:
        y = np.maximum(np.asarray(y, dtype=float), 0.0)
        if y.sum() > 0 and np.isfinite(y).all():
            ys.append(y / y.sum())
    ts = np.linspace(0.0, crit, WINDOW_GRID + 1)[:-1]
    after = np.maximum(0.0, ts[:, None, None] - tl[None])          # (t2, n, D): at most this after C - t2
    best = 0.0
    for t1 in ts:
        r = np.maximum(0.0, np.where(A, T, 0.0)[None] - np.maximum(0.0, t1 - est)[None] - after)
        for y in ys:
            ry = r * y
            ry[:, ~A] = np.inf
            W = ry.min(axis=2).sum(axis=1)                         # (t2,)
            ok = W > 1e-12 * max(crit, 1e-300)
            if ok.any():
                best = max(best, float((t1 + ts + W)[ok].max()))
    return best


def load_lp(problem: Problem, mask: np.ndarray | None = None) -> LPResult:
    """The fractional load-balancing LP on the devices in ``mask`` (default all)."""
    A = allowed_mask(problem)
    return _lp.load_lp(problem, A if mask is None else A & mask[None, :])


def load_lp_bound(problem: Problem, res: LPResult | None = None) -> float:
    """The fractional load-balancing LP (HiGHS via scipy); raises InfeasibleError if no fit."""
    res = res or load_lp(problem)
    if not math.isfinite(res.value):
        need = resident_bytes(problem).sum()
        raise InfeasibleError(
            f"the parameters (and the activations they keep, {need / 1e9:.3f} GB) fit on the devices of spec {problem.spec.name!r} in no way "
            f"(usable memory {problem.capacity.sum() / 1e9:.3f} GB in all, given which devices support each op)",
            hint="use a spec with more memory, lower memory_reserve, or a smaller model")
    return res.value


def coupled_lp_bound(problem: Problem, labels: PathLabels | None = None, variant: str | None = None,
                     known: float = 0.0) -> LPResult:
    """The coupled latency LP (:func:`partitioner.bounds.lp.coupled_lp`); ``variant`` forces
    ``flow`` or ``nocomm``; ``known`` is a proven bound its cuts may use (with ``path`` and
    ``forced``)."""
    lab = labels or path_labels(problem)
    lb0 = max(known, critical_path_bound(problem, lab), forced_bound(problem, lab))
    return _lp.coupled_lp(problem, lab, lb0, variant)


def period_lp(problem: Problem, mask: np.ndarray | None = None, variant: str | None = None,
              nnz: int | None = None) -> LPResult:
    """The link-load LP (:func:`partitioner.bounds.lp.period_lp`) for single-group plans on the
    devices in ``mask``; ``variant`` forces ``full``, ``transport``, ``partial`` or ``io``."""
    A = allowed_mask(problem)
    return _lp.period_lp(problem, A if mask is None else A & mask[None, :], variant, nnz)


def _set_partitions(items: list[int]):
    """Every partition of ``items`` into non-empty blocks (deterministic order)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def _group_cheap(problem: Problem, A: np.ndarray, G: tuple[int, ...], routes: _Routes) -> float:
    """A closed-form bound on the period of any single-group plan on devices ``G``: inf if some
    node or the parameters do not fit; for one device its plan's exact period; else the
    larger of the average work and the work of nodes only one device of ``G`` can run."""
    AG = A[:, list(G)]
    if not AG.any(axis=1).all():
        return math.inf
    if problem.constraints.memory and resident_bytes(problem).sum() > problem.capacity[list(G)].sum() * (1 + 1e-9):
        return math.inf
    TG = np.where(AG, problem.T[:, list(G)], np.inf)
    if len(G) == 1:
        d = G[0]
        loads = np.zeros(routes.n_res)
        loads[d] = TG[:, 0].sum()
        if d != problem.host:
            for b, dsts in problem.in_tensors:
                if dsts:
                    for row, t in routes.contrib(problem.host, d, (b,)):
                        loads[row] += t
            for _, b in problem.outputs:
                for row, t in routes.contrib(d, problem.host, (b,)):
                    loads[row] += t
        return float(loads.max())
    only = AG.sum(axis=1) == 1
    forced = max((float(TG[only & AG[:, k], k].sum()) for k in range(len(G))), default=0.0)
    return max(float(TG.min(axis=1).sum()) / len(G), forced)


def period_lp_bound(problem: Problem, load: LPResult | None = None) -> tuple[float, dict[str, Any]]:
    """A period bound valid for every plan, data-parallel replicas included.

    The link-load LP (:func:`period_lp`) bounds plans that run as one device group. It
    does not bound replicas: the evaluator prices each replica's links (and, with
    ``comm_blocks_device``, the devices its routes cross) on its own, so a resource that
    several replicas use can carry more than the period in total. Replicas on groups
    ``G_1..G_k`` with periods ``P_r`` have period ``1 / sum_r 1/P_r``, and ``P_r`` is at
    least any single-group bound on ``G_r``; so the period of every plan is at least

        min( LP(all devices), min over partitions into >= 2 groups of 1 / sum_r 1/LB(G_r) )

    where ``LB(G)`` is the LP restricted to ``G`` (at most ``LIMITS["replica_lps"]`` of them,
    each with a quarter of the period LP's size budget) or else its closed form,
    :func:`_group_cheap` (exact for one device). Leaving some devices unused only
    raises the period, so partitions of all devices suffice. Partitions are visited by
    increasing closed-form value and pruned once that reaches the best so far. With more
    than ``LIMITS["replica_devices"]`` devices the enumeration is skipped and only the load
    LP (which bounds replicas too: a replica mix with stream shares ``lambda_r`` is the
    fractional placement ``x = sum_r lambda_r x_r``, and device ``d`` of group ``r`` then
    carries ``lambda_r load_r(d) <= lambda_r P_r = period``) is returned.
    """
    D = problem.D
    if D > LIMITS["replica_devices"]:  # the link LP would not bound replicas: skip it
        return (load.value if load is not None else load_lp(problem).value), {"replicas": "not enumerated"}
    one = period_lp(problem)
    info: dict[str, Any] = {"period_lp": one.variant, "period_lp_s": round(one.seconds, 4)}
    best = one.value
    if D == 1 or one.variant == "skipped":
        return best, info
    A = allowed_mask(problem)
    routes = _Routes(problem)
    cheap: dict[tuple[int, ...], float] = {}
    exact: dict[tuple[int, ...], float] = {}
    parts = []
    for part in _set_partitions(list(range(D))):
        if len(part) < 2:
            continue
        blocks = tuple(tuple(sorted(b)) for b in part)
        for G in blocks:
            if G not in cheap:
                cheap[G] = _group_cheap(problem, A, G, routes)
        parts.append((_combine(cheap[G] for G in blocks), blocks))
    parts.sort()
    lps = 0
    for value, blocks in parts:
        if value >= best:
            break
        for G in blocks:
            if G not in exact and len(G) > 1 and lps < LIMITS["replica_lps"]:
                mask = np.zeros(D, dtype=bool)
                mask[list(G)] = True
                exact[G] = max(cheap[G], period_lp(problem, mask, nnz=LIMITS["period_nnz"] // 4).value)
                lps += 1
        best = min(best, _combine(exact.get(G, cheap[G]) for G in blocks))
    info["replica_lps"] = lps
    return best, info


def _combine(periods) -> float:
    """Period of replicas with the given periods: ``1 / sum 1/P`` (inf periods add nothing)."""
    rate = 0.0
    for p in periods:
        if p <= 0:
            return 0.0
        rate += 1.0 / p
    return 1.0 / rate if rate > 0 else math.inf


_CACHE: "weakref.WeakKeyDictionary[Problem, Bound]" = weakref.WeakKeyDictionary()
#: expected seconds of an LP part per (node, device) variable, for the time limit (about 4 s
#: for 50,000 nodes x 3 devices on this project's 2-core machine: bench/scale.py)
LP_SECONDS_PER_VAR = 2.7e-5


def lower_bound(problem: Problem, deadline: float | None = None) -> Bound:
    """The best lower bound this module can prove for ``problem``'s objective.

    Latency: max of ``path``, ``load``, ``energy``, ``forced``, ``window``, ``coupled``, ``cuts``
    (:mod:`partitioner.bounds.cuts`) and ``chain`` (:mod:`partitioner.bounds.chain`). Period:
    max of ``load``, ``energy`` and ``links``. ``info`` names the LP variants used and
    the time taken. Results are cached per Problem object.

    ``deadline`` (a ``time.perf_counter()`` value): the parts are computed cheapest first
    (path labels, energy and path always; then the load LP, window, coupled LP, chain /
    link LP), and a part that would start after the deadline, or an LP expected to end after
    it (``LP_SECONDS_PER_VAR`` per placement variable), is skipped (listed in
    ``info["skipped"]``); so is every part after a first Ctrl-C. Every part computed is still a
    proven bound, so the result is too, only weaker. A bound cut short is not cached.
    """
    hit = _CACHE.get(problem)
    if hit is not None:
        return hit
    t0 = time.perf_counter()
    n_vars = problem.n * problem.D

    def late(cost: float = 0.0) -> bool:
        """Past the deadline (or Ctrl-C), or a part expected to take ``cost`` seconds would end after it."""
        if progress.stop_requested():
            return True
        return deadline is not None and time.perf_counter() + cost > deadline
    skipped: list[str] = []
    lat = problem.objective is Objective.LATENCY
    lab = path_labels(problem) if lat else None  # the period parts need no path labels
    parts = {"energy": energy_bound(problem, lab)}
    info: dict[str, Any] = {}
    if lat:
        parts["path"] = critical_path_bound(problem, lab)
        parts["forced"] = forced_bound(problem, lab)
    load = None
    if late(LP_SECONDS_PER_VAR * n_vars):
        skipped.append("load")
    else:
        load = load_lp(problem)
        parts["load"] = load_lp_bound(problem, load)
    if lat:
        if late():
            skipped.append("window")
        else:
            duals = () if load is None or load.ub_duals is None else (load.ub_duals[:problem.D],)  # device rows first
            parts["window"] = window_bound(problem, lab, duals)
        if late(LP_SECONDS_PER_VAR * n_vars):
            skipped.append("coupled")
        else:
            res = coupled_lp_bound(problem, lab, known=max(parts.get("load", 0.0), parts.get("window", 0.0)))
            info.update(coupled=res.variant, coupled_s=round(res.seconds, 4))
            if res.variant != "skipped":
                parts["coupled"] = res.value
        if late():
            skipped.append("cuts")
        else:
            cuts, more = _cuts.cuts_bound(problem, lab.head, lab.tail, lab.T)
            info.update(more)
            if cuts > 0:
                parts["cuts"] = cuts
        if late():
            skipped.append("chain")
        else:
            chain, more = _chain.chain_bound(problem, lab)
            info.update(more)
            if chain > 0:
                parts["chain"] = chain
    elif load is None or late(LP_SECONDS_PER_VAR * n_vars):
        skipped.append("links")
    else:
        parts["links"], more = period_lp_bound(problem, load)
        info.update(more)
    binding = max(parts, key=lambda k: (parts[k], k))
    value = parts[binding]
    if not math.isfinite(value):
        problem.check_supported()
    info["seconds"] = round(time.perf_counter() - t0, 4)
    if skipped:
        info["skipped"] = skipped
        log.warning("lower bound: %s skipped (time limit); the bound is valid but may be weaker", ", ".join(skipped))
    log.info("lower bound %.6g (%s) in %.3f s; %s", value, binding, info["seconds"], info)
    bound = Bound(value, binding, parts, info)
    if not skipped:
        _CACHE[problem] = bound
    return bound
