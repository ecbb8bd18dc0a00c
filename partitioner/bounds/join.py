"""Contention among the inputs (outputs) of one node on its own device, for the path labels.

A node ``v`` on device ``d`` is ready once every input has arrived. An input whose producer
``u`` ran on ``d`` itself arrives when ``u`` finishes, but the producers on ``d`` ran one at
a time; any other arrives after a transfer. So with ``L`` the producers on ``d`` (each
released at its own earliest start there, ``head[u, d] - T[u, d]``), ``v`` is ready no
earlier than ``max(last arrival from elsewhere, one-machine span of L)``, and no earlier
than the least of that over all ``L``: the one-machine span with release dates is exact
in release order. Symmetrically the consumers of ``v`` on ``d`` start after ``v`` and run
one at a time, each followed by its own tail (Jackson's rule, decreasing tails, is exact
on one machine with delivery times). Pricing every input on its own (v1's labels) is the
case of ``L`` with at most one node, so these labels dominate v1's.

A local producer ``u`` also brings its exclusive chain (:func:`exclusive_chains`: the
nodes above it that feed nothing else): the plan runs some first ``k + 1`` nodes of it on
``d`` and the next one elsewhere, a job of their summed time released no earlier than the
earliest start of the last of them there, and than the arrival of the next one's tensor
from another device. The least one-machine span over every choice of ``k`` per job
(:func:`_span_options`, exact while the combinations are few, then over merged options, a
relaxation) bounds that set ``L``; the chains of one node's inputs are disjoint, so their
work adds up. The same going down. Other nodes' use of ``d``, the shared placement of a
common ancestor, co-location groups and link contention are dropped: each only relaxes.
"""

from __future__ import annotations

import bisect
import math

import numpy as np


def _off(D: int) -> np.ndarray:
    """0 off the diagonal, inf on it: a transfer from (to) another device only."""
    return np.where(np.eye(D, dtype=bool), np.inf, 0.0)


def join_ready(head: np.ndarray, preds, T: np.ndarray, Tv: np.ndarray, cm, chains=None) -> np.ndarray:
    """``(D,)``: the least time node ``v`` (times ``Tv``) may start on each device given its
    producers ``preds`` (``(u, bytes)``, finish labels ``head[u]``, times ``T[u]``); ``cm``
    as :meth:`~partitioner.machine.problem.Problem.comm_matrices`; ``chains[u]`` (optional, from
    :func:`exclusive_chains`) adds the producers' own chains (:func:`_chain_first`)."""
    if len(preds) == 1:
        u, b = preds[0]
        return (head[u][:, None] + cm(b)).min(axis=0)
    D = Tv.shape[0]
    us = [u for u, _ in preds]
    off = _off(D)
    rem = np.array([(head[u][:, None] + cm(b) + off).min(axis=0) for u, b in preds])
    loc = head[us]
    ready = np.minimum(loc, rem).max(axis=0)
    rel = np.full_like(loc, np.inf)
    np.subtract(loc, T[us], out=rel, where=np.isfinite(loc))
    for d in np.flatnonzero(np.isfinite(Tv) & (np.isfinite(loc).sum(axis=0) >= 2)).tolist():
        jobs = list(zip(rel[:, d].tolist(), T[us, d].tolist()))
        ready[d] = max(ready[d], _local_first(rem[:, d].tolist(), jobs, _release_span))
    if chains is not None and any(len(chains[u][0]) > 1 for u in us):
        R, P = _options([chains[u] for u in us], T, lambda a: head[a] - T[a],
                        lambda y, b: (head[y][:, None] + cm(b) + off).min(axis=0))
        np.maximum(ready, _chain_first(rem, R, P, Tv), out=ready)
    return ready


def fork_tail(tail: np.ndarray, succs, T: np.ndarray, Tv: np.ndarray, cm, chains=None) -> np.ndarray:
    """``(D,)``: the least time from the finish of node ``v`` on each device to the end,
    given its consumers ``succs`` (``(s, bytes)``, tails ``tail[s]``, times ``T[s]``) and
    optionally their chains (as in :func:`join_ready`)."""
    if len(succs) == 1:
        s, b = succs[0]
        return (cm(b) + (T[s] + tail[s])[None, :]).min(axis=1)
    D = Tv.shape[0]
    ss = [s for s, _ in succs]
    off = _off(D)
    loc = T[ss] + tail[ss]
    rem = np.array([(cm(b) + off + (T[s] + tail[s])[None, :]).min(axis=1) for s, b in succs])
    out = np.minimum(loc, rem).max(axis=0)
    for d in np.flatnonzero(np.isfinite(Tv) & (np.isfinite(loc).sum(axis=0) >= 2)).tolist():
        jobs = list(zip((-tail[ss, d]).tolist(), T[ss, d].tolist()))
        out[d] = max(out[d], _local_first(rem[:, d].tolist(), jobs, _delivery_span))
    if chains is not None and any(len(chains[x][0]) > 1 for x in ss):
        Q, P = _options([chains[x] for x in ss], T, lambda b: tail[b],
                        lambda y, b: (cm(b) + off + (T[y] + tail[y])[None, :]).min(axis=1))
        np.maximum(out, _chain_first(rem, Q, P, Tv), out=out)
    return out


CHAIN_MAX = 8  # nodes of a producer's (consumer's) own chain priced with it


def exclusive_chains(problem, up: bool) -> list[tuple[list[int], list[float]]]:
    """``chains[u] = ([u, a_1, a_2, ...], bytes)``: going up (``up``) each ``a_{i+1}`` is the
    only producer of ``a_i`` and ``a_i`` its only consumer (down: the mirror), at most
    :data:`CHAIN_MAX` nodes; ``bytes[i]`` is the tensor between ``a_i`` and ``a_{i+1}``. Such
    a chain belongs to ``u`` alone: the chains of the inputs (outputs) of one node are
    disjoint."""
    if up:
        return chains_of(problem.pred_bytes, [len(x) for x in problem.succs])
    return chains_of(problem.succ_bytes, [len(x) for x in problem.preds])


def chains_of(nxt: list, back: list[int]) -> list[tuple[list[int], list[float]]]:
    """:func:`exclusive_chains` of any DAG: ``nxt[u]`` the ``(node, bytes)`` one step on,
    ``back[a]`` how many nodes reach ``a`` in one step the other way."""
    out = []
    for u in range(len(nxt)):
        c, by = [u], []
        while len(c) < CHAIN_MAX and len(nxt[c[-1]]) == 1:
            a, b = nxt[c[-1]][0]
            if back[a] != 1:
                break
            c.append(a)
            by.append(b)
        out.append((c, by))
    return out


def _options(chains, T: np.ndarray, key, link) -> tuple[np.ndarray, np.ndarray]:
    """``(m, K, D)`` arrays for the jobs' options: option ``k`` runs the first ``k + 1``
    nodes of the job's chain on the device and not the next one; ``P`` is their summed time
    and ``R`` what bounds the last of them: ``key(c)`` (its earliest start there going up,
    its tail going down) and, when the chain goes on, ``link(y, bytes)`` (the same with the
    next node ``y`` on another device). Padded options and devices a node may not use have
    ``P = inf``."""
    m, K, D = len(chains), max(len(c) for c, _ in chains), T.shape[1]
    R = np.full((m, K, D), np.inf)
    P = np.full((m, K, D), np.inf)
    for j, (c, by) in enumerate(chains):
        Tc = T[c]
        P[j, :len(c)] = np.cumsum(Tc, axis=0)
        with np.errstate(invalid="ignore"):
            kv = np.asarray(key(c), dtype=float)
        for i in range(len(c) - 1):
            np.maximum(kv[i], link(c[i + 1], by[i]), out=kv[i])
        R[j, :len(c)] = np.where(np.isfinite(Tc) & np.isfinite(kv), kv, np.inf)
    return R, P


COMBOS_MAX = 256  # option combinations a prefix of jobs is solved for exactly (else options are merged)


def _pareto(R: np.ndarray, P: np.ndarray) -> list[tuple[float, float]]:
    """The options ``(release, time)`` no other beats in both (finite ones only)."""
    opts = sorted((float(r), float(p)) for r, p in zip(R, P) if math.isfinite(r) and math.isfinite(p))
    out: list[tuple[float, float]] = []
    for r, p in opts:  # increasing release: keep those shorter than every earlier one
        if not out or p < out[-1][1]:
            out.append((r, p))
    return out


def _merge(opts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pairs of neighbouring options replaced by their componentwise minimum (a relaxation:
    an option no worse than either)."""
    return [(min(r for r, _ in opts[i:i + 2]), min(p for _, p in opts[i:i + 2])) for i in range(0, len(opts), 2)]


def _span_options(opts: list[list[tuple[float, float]]]) -> float:
    """``min`` over one option per job of the one-machine span with release dates (exact:
    ``max_i R_(i) + sum of the times released at or after it``), every combination at once."""
    opts = list(opts)  # merged below; the caller's list stays as it is
    if any(not o for o in opts):
        return math.inf
    while math.prod(len(o) for o in opts) > COMBOS_MAX:
        j = max(range(len(opts)), key=lambda i: (len(opts[i]), -i))
        opts[j] = _merge(opts[j])
    grids = np.meshgrid(*[np.arange(len(o)) for o in opts], indexing="ij")
    idx = np.stack([g.ravel() for g in grids], axis=1)                     # (combos, jobs)
    Rj = [np.array([r for r, _ in o]) for o in opts]
    Pj = [np.array([p for _, p in o]) for o in opts]
    Rc = np.stack([Rj[j][idx[:, j]] for j in range(len(opts))], axis=1)
    Pc = np.stack([Pj[j][idx[:, j]] for j in range(len(opts))], axis=1)
    order = np.argsort(Rc, axis=1, kind="stable")
    Rs = np.take_along_axis(Rc, order, axis=1)
    Ps = np.take_along_axis(Pc, order, axis=1)
    after = np.cumsum(Ps[:, ::-1], axis=1)[:, ::-1]                         # work released at or after
    return float((Rs + after).max(axis=1).min())


def _chain_first(rem: np.ndarray, R: np.ndarray, P: np.ndarray, Tv: np.ndarray) -> np.ndarray:
    """``(D,)``: :func:`_local_first` where a local job may bring its own chain.

    Job ``j`` local on ``d`` runs, for the plan's own ``k``, the first ``k + 1`` nodes of its
    chain there and not the next: a job of time ``P[j, k]`` released at ``R[j, k]`` (going
    down: followed by the tail ``R[j, k]``, the mirror image of a release on one machine).
    The least span over the options (:func:`_span_options`) only grows with the set of
    jobs, so the prefix argument of :func:`_local_first` holds."""
    m, _, D = R.shape
    out = np.full(D, -np.inf)
    for d in np.flatnonzero(np.isfinite(Tv)).tolist():
        jobs = [_pareto(R[j, :, d], P[j, :, d]) for j in range(m)]
        out[d] = _local_first(rem[:, d].tolist(), jobs, _span_options, list.append)
    return out


def _local_first(rem: list[float], jobs: list, span, insert=bisect.insort) -> float:
    """``min over L`` of ``max(max_{i not in L} rem[i], span(L))``: the jobs ``L`` run on the
    node's own device one at a time (``span`` of their list, kept by ``insert``: sorted by
    default), the others arrive from
    elsewhere at ``rem``. Only the jobs of largest ``rem`` are worth running locally, so
    ``L`` is a prefix in decreasing ``rem``; ``span`` only grows along the prefixes and the
    threshold only falls, so the scan stops where they cross."""
    order = sorted(range(len(rem)), key=lambda i: -rem[i])
    best, local = math.inf, []
    for k in range(len(order) + 1):
        thr = rem[order[k]] if k < len(order) else -math.inf
        s = span(local) if local else -math.inf
        best = min(best, max(thr, s))
        if s >= thr or k == len(order):
            break
        insert(local, jobs[order[k]])
    return best


def _release_span(jobs: list[tuple[float, float]]) -> float:
    """Finish of the last of ``jobs`` ``(release, time)``, sorted by release, run one at a
    time (optimal on one machine with release dates)."""
    t = -math.inf
    for r, p in jobs:
        t = max(t, r) + p
    return t


def _delivery_span(jobs: list[tuple[float, float]]) -> float:
    """``max_j C_j + q_j`` of ``jobs`` ``(-q, time)`` run one at a time from 0 in decreasing
    ``q`` (Jackson's rule: optimal on one machine with delivery times)."""
    t, out = 0.0, -math.inf
    for nq, p in jobs:
        t += p
        out = max(out, t - nq)
    return out
