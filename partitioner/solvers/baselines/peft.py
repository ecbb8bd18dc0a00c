"""``peft``: Predict Earliest Finish Time (Arabnejad and Barbosa, "List Scheduling Algorithm
for Heterogeneous Systems by an Optimistic Cost Table", IEEE TPDS 25(3), 2014).

**Optimistic cost table.** ``OCT[v, d]`` is the optimistic time from the end of ``v`` on
device ``d`` to the end of the model: every successor at its best device, no contention::

    OCT[v, d] = max_{s in succ(v)} min_{w in A(s)} ( OCT[s, w] + T[s, w] + c(d, w, bytes(v, s)) )

with ``c(d, w, b) = 0`` when ``d == w``. Departures from the paper, both forced by our
machine model: ``c`` is the exact routed transfer time between the two devices
(:meth:`Problem.comm_matrix`; the paper uses the mean communication cost, its links
being homogeneous, ours are not), and a node that produces a model output starts from
the time to send it back to the host (``OCT[v, d] >= c(d, host, bytes)``; the paper's
exit task has ``OCT = 0`` and no output transfer). ``A(s)`` is the set of devices that
may run ``s`` (support and co-location groups).

**Priority.** ``rank_oct(v)`` is the mean of ``OCT[v, d]`` over ``A(v)`` (the paper averages
over all processors; a device that cannot run ``v`` has no meaningful entry).

**Schedule.** A ready list (the nodes whose predecessors are all scheduled) is served by
decreasing ``rank_oct`` (ties: topological index). The chosen node goes to the device
minimising the optimistic finish ``O_EFT(v, d) = EFT(v, d) + OCT[v, d]`` (ties: EFT, then
device index), where ``EFT`` is insertion-based (first idle gap long enough after the
inputs arrive, :class:`~partitioner.solvers.baselines.listsched.PartialSchedule`).

Cost: the table is ``O(E * D^2)`` numpy work, vectorised per node; scheduling is
``O((n + E) * D)`` list-scheduling steps plus the insertion scans.
"""

from __future__ import annotations

import heapq
import logging

import numpy as np

from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.problem import Problem
from ..registry import register
from .listsched import PartialSchedule

log = logging.getLogger(__name__)


def allowed_mask(problem: Problem) -> np.ndarray:
    """``(n, D)`` bool: node ``i`` may run on ``d`` (support, and its whole group supports ``d``)."""
    ok = problem.supported.copy()
    for g in problem.groups:
        ok[g] &= problem.supported[g].all(axis=0)
    return ok


def edge_comm_tensor(problem: Problem, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transfer-time matrices for a vector of tensor sizes.

    Returns
    -------
    mats : ndarray, shape (U, D, D)
        ``mats[u]`` is :meth:`Problem.comm_matrix` of the ``u``-th distinct size.
    index : ndarray, shape (len(nbytes),)
        ``mats[index[k]]`` belongs to ``nbytes[k]``.
    """
    uniq, index = np.unique(np.asarray(nbytes, dtype=float), return_inverse=True)
    D = problem.D
    mats = np.empty((len(uniq), D, D))
    for u, b in enumerate(uniq):
        mats[u] = problem.comm_matrix(float(b))
    return mats, index.reshape(-1)


def optimistic_cost_table(problem: Problem, allowed: np.ndarray | None = None) -> np.ndarray:
    """PEFT's optimistic cost table on exact transfer times (see the module docstring).

    Parameters
    ----------
    problem : Problem
    allowed : ndarray, optional
        ``(n, D)`` bool mask of the devices each node may run on; default :func:`allowed_mask`.

    Returns
    -------
    ndarray, shape (n, D)
    """
    n, D = problem.n, problem.D
    if allowed is None:
        allowed = allowed_mask(problem)
    Tm = np.where(allowed, problem.T, np.inf)
    oct_ = np.zeros((n, D))
    host = problem.host
    for s, b in problem.outputs:
        np.maximum(oct_[s], problem.comm_matrix(float(b))[:, host], out=oct_[s])
    E = len(problem.edge_src)
    if E == 0:
        return oct_
    # edges grouped by producer (CSR), each with the index of its comm matrix
    perm = np.lexsort((problem.edge_dst, problem.edge_src))
    src, dst = problem.edge_src[perm], problem.edge_dst[perm]
    mats, midx = edge_comm_tensor(problem, problem.edge_bytes[perm])
    ptr = np.searchsorted(src, np.arange(n + 1))
    for v in range(n - 1, -1, -1):
        a, b = ptr[v], ptr[v + 1]
        if a == b:
            continue
        S = dst[a:b]
        after = Tm[S] + oct_[S]                      # (k, D): successor on w, then to the end
        cand = (mats[midx[a:b]] + after[:, None, :]).min(axis=2)  # (k, D): from v on d
        np.maximum(oct_[v], cand.max(axis=0), out=oct_[v])
    return oct_


def rank_oct(oct_: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Mean of each row of the table over the node's allowed devices."""
    cnt = allowed.sum(axis=1)
    tot = np.where(allowed, oct_, 0.0).sum(axis=1)
    return np.divide(tot, cnt, out=np.zeros(len(cnt)), where=cnt > 0)


def peft_schedule(problem: Problem, oct_: np.ndarray, rank: np.ndarray) -> PartialSchedule:
    """Ready-list scheduling by decreasing ``rank``, device by least ``EFT + OCT``."""
    T = problem.T
    ps = PartialSchedule(problem)
    indeg = np.array([len(p) for p in problem.preds], dtype=np.int64)
    heap = [(-float(rank[v]), v) for v in range(problem.n) if indeg[v] == 0]
    heapq.heapify(heap)
    while heap:
        _, v = heapq.heappop(heap)
        best, best_key = None, None
        for d in ps.candidates(v):
            d = int(d)
            s = ps.earliest_slot(d, ps.data_ready(v, d), T[v, d], insertion=True)
            eft = s + T[v, d]
            key = (eft + oct_[v, d], eft, d)
            if best_key is None or key < best_key:
                best, best_key = (d, s), key
        ps.place(v, *best)
        for j in problem.succs[v]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(heap, (-float(rank[j]), j))
    return ps


@register("peft", "PEFT: optimistic cost table rank, insertion-based least EFT+OCT "
                  "(Arabnejad and Barbosa, IEEE TPDS 2014)")
def solve(problem: Problem, settings: Settings) -> Plan:
    allowed = allowed_mask(problem)
    oct_ = optimistic_cost_table(problem, allowed)
    rank = rank_oct(oct_, allowed)
    ps = peft_schedule(problem, oct_, rank)
    makespan = float(ps.finish.max()) if problem.n else 0.0
    log.debug("peft: list-schedule makespan %.6g s", makespan)
    return ps.plan(schedule_makespan_s=makespan)
