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
case of ``L`` with at most one node, so these labels dominate v1's. Other nodes' use of
``d``, co-location groups and link contention are dropped: each only relaxes.
"""

from __future__ import annotations

import bisect
import math

import numpy as np


def _off(D: int) -> np.ndarray:
    """0 off the diagonal, inf on it: a transfer from (to) another device only."""
    return np.where(np.eye(D, dtype=bool), np.inf, 0.0)


def join_ready(head: np.ndarray, preds, T: np.ndarray, Tv: np.ndarray, cm) -> np.ndarray:
    """``(D,)``: the least time node ``v`` (times ``Tv``) may start on each device given its
    producers ``preds`` (``(u, bytes)``, finish labels ``head[u]``, times ``T[u]``); ``cm``
    as :meth:`~partitioner.problem.Problem.comm_matrices`."""
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
    return ready


def fork_tail(tail: np.ndarray, succs, T: np.ndarray, Tv: np.ndarray, cm) -> np.ndarray:
    """``(D,)``: the least time from the finish of node ``v`` on each device to the end,
    given its consumers ``succs`` (``(s, bytes)``, tails ``tail[s]``, times ``T[s]``)."""
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
    return out


def _local_first(rem: list[float], jobs: list[tuple[float, float]], span) -> float:
    """``min over L`` of ``max(max_{i not in L} rem[i], span(L))``: the jobs ``L`` run on the
    node's own device one at a time (``span`` of their sorted list), the others arrive from
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
        bisect.insort(local, jobs[order[k]])
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
