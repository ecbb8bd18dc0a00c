"""Lower bounds: numbers no plan can beat, for both objectives.

v1 combines two bounds and reports which one binds:

* ``path``: the communication-aware critical path. ``F[v, d]``, a lower bound on the finish
  time of ``v`` if it runs on ``d``, is ``T[v, d]`` plus the latest of its inputs' earliest
  arrivals, each predecessor taking its best device ``d'`` (``F[u, d'] + transfer(d', d)``)
  and each model input its transfer from the host. Device contention is ignored, so this
  is a valid bound on any schedule; outputs add their transfer back to the host.
* ``load``: the fractional load-balancing LP: every node's work split across the devices
  that support it (``sum_d x[v, d] = 1``), each device's load at most ``C``, parameters
  within memory. The busiest device of any plan carries at least ``C`` seconds per
  sample, so ``C`` bounds both the latency and the period; data-parallel replicas are a
  fractional split of the same work, so it also bounds their combined period.

The latency bound is ``max(path, load)``; the period bound is ``load``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from .errors import InfeasibleError
from .problem import Objective, Problem


@dataclass(frozen=True)
class Bound:
    """A lower bound on the objective (seconds) and the parts it is the maximum of."""

    value: float
    binding: str
    parts: dict[str, float] = field(default_factory=dict)


def critical_path_bound(problem: Problem) -> float:
    """Communication-aware critical path with every node at its best device (latency)."""
    T, D, host = problem.T, problem.D, problem.host
    F = np.empty((problem.n, D))
    mats: dict[float, np.ndarray] = {}

    def cm(b: float) -> np.ndarray:
        m = mats.get(b)
        if m is None:
            m = mats[b] = problem.comm_matrix(b)
        return m

    in_arr = np.zeros((problem.n, D))
    for b, dsts in problem.in_tensors:
        row = cm(b)[host]
        for j in dsts:
            np.maximum(in_arr[j], row, out=in_arr[j])
    out_extra = np.zeros((problem.n, D))
    for s, b in problem.outputs:
        np.maximum(out_extra[s], cm(b)[:, host], out=out_extra[s])
    best = 0.0
    for v in range(problem.n):
        ready = in_arr[v].copy()
        for u, b in problem.pred_bytes[v]:
            arr = (F[u][:, None] + cm(b)).min(axis=0)
            np.maximum(ready, arr, out=ready)
        F[v] = ready + T[v]
        best = max(best, float((F[v] + out_extra[v]).min()))
    return best


def load_lp_bound(problem: Problem) -> float:
    """The fractional load-balancing LP (HiGHS via scipy); raises InfeasibleError if no fit."""
    n, D = problem.n, problem.D
    T = problem.T
    allowed = [problem.allowed_devices(i) for i in range(n)]
    cols_v, cols_d = [], []
    for i in range(n):
        for d in allowed[i]:
            cols_v.append(i)
            cols_d.append(int(d))
    if len(set(cols_v)) < n:
        problem.check_supported()
    m = len(cols_v)
    cols_v = np.array(cols_v)
    cols_d = np.array(cols_d)
    t = T[cols_v, cols_d]
    # scale to keep HiGHS well conditioned
    scale = float(t.max()) if m and t.max() > 0 else 1.0
    c = np.zeros(m + 1)
    c[-1] = 1.0
    A_eq = sp.csr_matrix((np.ones(m), (cols_v, np.arange(m))), shape=(n, m + 1))
    b_eq = np.ones(n)
    rows = [cols_d]
    data = [t / scale]
    colidx = [np.arange(m)]
    A_load = sp.csr_matrix((np.concatenate(data + [-np.ones(D)]),
                            (np.concatenate(rows + [np.arange(D)]), np.concatenate(colidx + [np.full(D, m)]))),
                           shape=(D, m + 1))
    A_ub, b_ub = [A_load], [np.zeros(D)]
    if problem.constraints.memory and problem.param_bytes.any():
        pb = problem.param_bytes[cols_v]
        A_mem = sp.csr_matrix((pb, (cols_d, np.arange(m))), shape=(D, m + 1))
        A_ub.append(A_mem)
        b_ub.append(problem.capacity)
    res = linprog(c, A_ub=sp.vstack(A_ub).tocsr(), b_ub=np.concatenate(b_ub), A_eq=A_eq, b_eq=b_eq,
                  bounds=[(0, None)] * (m + 1), method="highs")
    if res.status == 2:
        need = problem.param_bytes.sum()
        raise InfeasibleError(
            f"the parameters ({need / 1e9:.3f} GB) fit on the devices of spec {problem.spec.name!r} in no way "
            f"(usable memory {problem.capacity.sum() / 1e9:.3f} GB in all, given which devices support each op)",
            hint="use a spec with more memory, lower memory_reserve, or a smaller model")
    if res.status != 0:
        return 0.0  # numerical trouble: fall back to the trivially valid bound
    # HiGHS' optimum is exact up to its tolerances; shave a hair so the bound stays valid
    return max(0.0, float(res.fun) * scale * (1 - 1e-7))


def lower_bound(problem: Problem) -> Bound:
    """The best lower bound this module can prove for ``problem``'s objective."""
    load = load_lp_bound(problem)
    parts = {"load": load}
    if problem.objective is Objective.LATENCY:
        parts["path"] = critical_path_bound(problem)
    binding = max(parts, key=lambda k: (parts[k], k))
    value = parts[binding]
    if not math.isfinite(value):
        problem.check_supported()
    return Bound(value, binding, parts)
