"""LP bounds for :mod:`partitioner.bounds.lower`: the load LP, the coupled latency LP and the
link-load period LP, assembled as sparse matrices and solved with HiGHS (scipy).

Every value returned is a weak-duality certificate computed from HiGHS' duals (valid
whatever the solver's tolerances), and at most the primal optimum shaved by a relative
``SHAVE``. Variables have finite bounds (``_serial_upper`` bounds every time and load of
an optimal plan) so that the certificate is finite. ``LIMITS`` sets the sizes at which
cheaper, still valid, variants take over; each function's docstring states its
formulation and why it bounds every plan.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from ..machine.problem import Problem

log = logging.getLogger(__name__)

SHAVE = 1e-7
#: Sizes that pick the LP variants (see each function); tests may lower them.
LIMITS = {"coupled_z": 2_000, "coupled_nodes": 2_500, "coupled_x": 200_000,
          "period_nnz": 60_000, "period_io": 1_500_000, "replica_devices": 6, "replica_lps": 6,
          "jackson": 6, "jackson_nnz": 100_000}


@dataclass(frozen=True)
class LPResult:
    """An LP bound: ``value`` (certified, shaved), ``primal`` (HiGHS' optimum, unshaved);
    ``ub_duals``: the multipliers (``>= 0``) of the ``<=`` rows, in the order they were added."""

    value: float
    primal: float
    variant: str
    n_vars: int = 0
    n_rows: int = 0
    seconds: float = 0.0
    ub_duals: np.ndarray | None = field(default=None, repr=False, compare=False)


class _LP:
    """A minimisation LP assembled from COO blocks: ``A_ub x <= b_ub``, ``A_eq x = b_eq``, bounds."""

    def __init__(self):
        self.nv = 0
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        self.rows = {"ub": ([], [], [], []), "eq": ([], [], [], [])}
        self.nr = {"ub": 0, "eq": 0}

    def var(self, k: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
        idx = np.arange(self.nv, self.nv + k)
        self.nv += k
        self.lo.append(np.full(k, lo))
        self.hi.append(np.full(k, hi))
        return idx

    def add(self, kind: str, k: int, r, c, v, rhs) -> int:
        """Append ``k`` rows; ``r`` are row numbers 0..k-1 within the block. Returns the offset."""
        off = self.nr[kind]
        R, C, V, B = self.rows[kind]
        R.append(np.asarray(r, dtype=np.int64) + off)
        C.append(np.asarray(c, dtype=np.int64))
        V.append(np.asarray(v, dtype=float))
        B.append(np.broadcast_to(np.asarray(rhs, dtype=float), (k,)))
        self.nr[kind] += k
        return off

    def _mat(self, kind):
        R, C, V, B = self.rows[kind]
        if not self.nr[kind]:
            return None, None
        m = sp.csr_matrix((np.concatenate(V), (np.concatenate(R), np.concatenate(C))),
                          shape=(self.nr[kind], self.nv))
        return m, np.concatenate(B)

    def solve(self, obj: int, scale: float, variant: str) -> LPResult:
        """Minimise variable ``obj``; times were divided by ``scale``. Infeasible: value inf."""
        t0 = time.perf_counter()
        c = np.zeros(self.nv)
        c[obj] = 1.0
        A_ub, b_ub = self._mat("ub")
        A_eq, b_eq = self._mat("eq")
        lo, hi = np.concatenate(self.lo), np.concatenate(self.hi)
        res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=np.column_stack([lo, hi]),
                      method="highs")
        dt = time.perf_counter() - t0
        size = dict(n_vars=self.nv, n_rows=self.nr["ub"] + self.nr["eq"], seconds=dt)
        if res.status == 2:
            return LPResult(math.inf, math.inf, variant, **size)
        if res.status != 0 or res.x is None:
            log.warning("LP bound %s: HiGHS status %s (%s); using 0", variant, res.status, res.message)
            return LPResult(0.0, 0.0, variant, **size)
        # weak duality: for any lam <= 0 (rows <=), mu, and r = c - A_ub' lam - A_eq' mu,
        # c'x >= lam'b_ub + mu'b_eq + sum_j min(r_j lo_j, r_j hi_j) for every feasible x.
        r = c.copy()
        cert = 0.0
        if A_ub is not None:
            lam = np.minimum(res.ineqlin.marginals, 0.0)
            r -= A_ub.T @ lam
            cert += float(lam @ b_ub)
        if A_eq is not None:
            mu = res.eqlin.marginals
            r -= A_eq.T @ mu
            cert += float(mu @ b_eq)
        cert += float(np.where(r > 0, r * lo, r * hi).sum())
        primal = float(res.fun)
        value = max(0.0, min(cert, primal * (1 - SHAVE)) * scale)
        if cert < primal * (1 - 1e-6):
            log.debug("LP bound %s: dual certificate %.9g below primal %.9g", variant, cert, primal)
        return LPResult(value, primal * scale, variant, **size, ub_duals=None if A_ub is None else -lam)


def _x_vars(lp: _LP, A: np.ndarray) -> np.ndarray:
    """Variables ``x[v, d]`` (share of ``v`` on ``d``) for allowed pairs; -1 elsewhere; rows sum to 1."""
    n, D = A.shape
    xid = np.full((n, D), -1, dtype=np.int64)
    vv, dd = np.nonzero(A)
    xid[vv, dd] = lp.var(vv.size)
    lp.add("eq", n, vv, xid[vv, dd], np.ones(vv.size), 1.0)
    return xid


def _common_rows(lp: _LP, problem: Problem, A: np.ndarray, xid: np.ndarray, Ts: np.ndarray | None,
                 obj: int) -> None:
    """Loads ``sum_v T x <= obj`` (unless ``Ts`` is None), memory ``sum_v params x <= capacity``,
    and co-located groups (``x[v, d] = x[g0, d]``)."""
    D = A.shape[1]
    vv, dd = np.nonzero(A)
    if Ts is not None:
        lp.add("ub", D, np.concatenate([dd, np.arange(D)]), np.concatenate([xid[vv, dd], np.full(D, obj)]),
               np.concatenate([Ts[vv, dd], -np.ones(D)]), 0.0)
    if problem.constraints.memory and problem.param_bytes.any():
        cap = np.maximum(problem.capacity, 1e-300)  # A excludes nodes that alone exceed a device
        lp.add("ub", D, dd, xid[vv, dd], problem.param_bytes[vv] / cap[dd], 1.0 + 1e-9)
    for g in problem.groups:
        for v in g[1:]:
            ds = np.flatnonzero(A[v])
            lp.add("eq", ds.size, np.arange(ds.size).repeat(2), np.column_stack([xid[v, ds], xid[g[0], ds]]).ravel(),
                   np.tile([1.0, -1.0], ds.size), 0.0)


def _serial_upper(problem: Problem, A: np.ndarray) -> float:
    """Every node and every transfer one after the other: no plan's latency or load exceeds it."""
    T = np.where(A, problem.T, 0.0)
    total = float(T.max(axis=1).sum()) if problem.n else 0.0
    D = problem.D
    for u in range(problem.n):
        if problem.succ_bytes[u]:
            b = max(x for _, x in problem.succ_bytes[u])
            total += min(len(problem.succ_bytes[u]), D - 1) * float(problem.comm_matrix(b).max())
    for b, dsts in problem.in_tensors:
        total += min(len(dsts), D) * float(problem.comm_matrix(b).max())
    for _, b in problem.outputs:
        total += float(problem.comm_matrix(b).max())
    return 2.0 * total + 1.0


def load_lp(problem: Problem, A: np.ndarray) -> LPResult:
    """The fractional load-balancing LP: ``min C`` with ``C >= sum_v T[v, d] x[v, d]`` for each
    device, ``x`` over the allowed pairs ``A`` (n, D), parameters within memory. Its first
    ``D`` ``<=`` rows are the device loads (their multipliers: ``ub_duals[:D]``)."""
    if problem.n == 0:
        return LPResult(0.0, 0.0, "load")
    if not A.any(axis=1).all():
        return LPResult(math.inf, math.inf, "load")
    Tf = np.where(A, problem.T, 0.0)
    scale = float(Tf.max()) or 1.0
    lp = _LP()
    xid = _x_vars(lp, A)
    C = int(lp.var(1, 0.0, _serial_upper(problem, A) / scale)[0])
    _common_rows(lp, problem, A, xid, Tf / scale, C)
    return lp.solve(C, scale, "load")


# ---- latency: the coupled LP ----------------------------------------------------------

def _edge_comm(problem: Problem) -> np.ndarray:
    """``(E, D, D)``: transfer time of every edge's bytes between every device pair."""
    eb = problem.edge_bytes
    if not eb.size:
        return np.zeros((0, problem.D, problem.D))
    uniq, inv = np.unique(eb, return_inverse=True)
    return np.stack([problem.comm_matrix(float(b)) for b in uniq])[inv]


def coupled_lp(problem: Problem, lab, lb0: float, variant: str | None = None) -> LPResult:
    """The LP relaxation coupling path potentials with device loads (latency).

    Variables: ``x[v, d] in [0, 1]`` for ``d in A[v]`` with ``sum_d x[v, d] = 1``; ``F[v]``
    (finish of ``v``); ``C`` (latency). Rows, with ``T(v) = sum_d T[v, d] x[v, d]``::

        F[v] >= sum_d head[v, d] x[v, d]                       (release and path heads)
        C    >= F[v] + sum_d tail[v, d] x[v, d]                (path tails, outputs)
        F[v] >= F[u] + K(u, v) + T(v)         for each edge    (precedence + transfer)
        C    >= sum_v T[v, d] x[v, d]         for each device  (loads)
        C    >= theta + q + sum_{v in S} T[v, d] x[v, d]       (head-body-tail cuts)
        sum_v params[v] x[v, d] <= capacity[d]; x[v, .] = x[g, .] within a group

    ``K(u, v) = sum_{a != b} comm(a, b, bytes) z[a, b]`` with ``z >= 0`` a flow that
    carries ``x[u, .]`` to ``x[v, .]`` (``out(a) - in(a) = x[u, a] - x[v, a]``); its minimum
    is the earth mover's distance between the two placements, exact at integer points
    (routed times obey the triangle inequality). Variants: ``flow`` (``z`` on every edge),
    ``partial`` (``z`` on the ``LIMITS["coupled_z"] / (D (D - 1))`` edges with the longest
    best path through them, ``K = 0`` elsewhere), ``nocomm`` (``K = 0``). The head-body-tail
    cuts (:func:`_jackson_rows`) are added while small.

    Validity: take any plan and its evaluated schedule; set ``x`` to its placement, ``F`` to
    its finish times, ``C`` to its latency, ``z[p(u), p(v)] = 1`` on edges that cross
    devices and zero elsewhere. Heads and tails bound the finish and the remaining time on
    the device each node uses; a node starts after each predecessor's tensor arrives
    (sent with at least the edge's bytes, and ``comm`` grows with the bytes); no device
    does more than ``C`` of work; parameters fit. Every row holds at this point, so the LP
    minimum is at most the plan's latency; dropping ``K`` only relaxes. Heads and tails
    make the LP at least the ``path`` bound (``C >= sum_d (head + tail)[v, d] x[v, d] >=
    min_d``), and the load rows at least the ``load`` bound.
    """
    A, n, D = lab.allowed, problem.n, problem.D
    if n == 0:
        return LPResult(0.0, 0.0, "empty")
    m = int(A.sum())
    if m > LIMITS["coupled_x"]:
        return LPResult(0.0, 0.0, "skipped")
    # path structure on the most critical nodes (all of them while small)
    crit = (lab.head + lab.tail).min(axis=1)
    S = np.sort(np.lexsort((np.arange(n), -crit))[:LIMITS["coupled_nodes"]])
    inS = np.zeros(n, dtype=bool)
    inS[S] = True
    keep = inS[problem.edge_src] & inS[problem.edge_dst]
    es, ed = problem.edge_src[keep], problem.edge_dst[keep]
    E = es.size
    P = D * (D - 1)
    n_flow = E if E * P <= LIMITS["coupled_z"] else LIMITS["coupled_z"] // max(P, 1)
    n_flow = {"flow": E, "nocomm": 0}.get(variant, n_flow) if D > 1 else 0
    variant = "flow" if n_flow == E or D == 1 else ("nocomm" if n_flow == 0 else "partial")
    if S.size < n:
        variant = "subset-" + variant
    s = float((lab.head + lab.tail).min(axis=1).max()) or float(np.where(A, problem.T, 0).max()) or 1.0
    Ts = np.where(A, problem.T, 0.0) / s
    lp = _LP()
    xid = _x_vars(lp, A)
    U = _serial_upper(problem, A) / s
    F = np.full(n, -1, dtype=np.int64)
    F[S] = lp.var(S.size, 0.0, U)
    C = int(lp.var(1, 0.0, U)[0])
    _common_rows(lp, problem, A, xid, Ts, C)
    vv, dd = np.nonzero(A[S])
    k = S.size
    lp.add("ub", k, np.concatenate([vv, np.arange(k)]), np.concatenate([xid[S[vv], dd], F[S]]),
           np.concatenate([lab.head[S[vv], dd] / s, -np.ones(k)]), 0.0)
    lp.add("ub", k, np.concatenate([vv, np.arange(k), np.arange(k)]),
           np.concatenate([xid[S[vv], dd], F[S], np.full(k, C)]),
           np.concatenate([lab.tail[S[vv], dd] / s, np.ones(k), -np.ones(k)]), 0.0)
    if E:
        # precedence rows: F[u] - F[v] + T(v) + K <= 0
        ev, dv = np.nonzero(A[ed])
        r = [np.arange(E), np.arange(E), ev]
        c = [F[es], F[ed], xid[ed[ev], dv]]
        v = [np.ones(E), -np.ones(E), Ts[ed[ev], dv]]
        if n_flow:
            K = _edge_comm(problem)[keep]
            sel = np.arange(E)
            if n_flow < E:  # the edges with the longest best path through them
                through = (lab.head[es][:, :, None] + K + (lab.T + lab.tail)[ed][:, None, :]).min(axis=(1, 2))
                sel = np.sort(np.lexsort((np.arange(E), -through))[:n_flow])
            k = sel.size
            pa, pb = np.nonzero(~np.eye(D, dtype=bool))
            z = lp.var(k * P).reshape(k, P)
            r.append(sel.repeat(P))
            c.append(z.ravel())
            v.append((K[sel][:, pa, pb] / s).ravel())
            # conservation: out(a) - in(a) - x[u, a] + x[v, a] = 0, one row per (edge, device)
            rows_o = (np.arange(k)[:, None] * D + pa[None, :]).ravel()
            rows_i = (np.arange(k)[:, None] * D + pb[None, :]).ravel()
            eu, du = np.nonzero(A[es[sel]])
            evv, dvv = np.nonzero(A[ed[sel]])
            lp.add("eq", k * D, np.concatenate([rows_o, rows_i, eu * D + du, evv * D + dvv]),
                   np.concatenate([z.ravel(), z.ravel(), xid[es[sel][eu], du], xid[ed[sel][evv], dvv]]),
                   np.concatenate([np.ones(k * P), -np.ones(k * P), -np.ones(eu.size), np.ones(evv.size)]), 0.0)
        lp.add("ub", E, np.concatenate(r), np.concatenate(c), np.concatenate(v), 0.0)
    if LIMITS["jackson"] and 2 * LIMITS["jackson"] * m <= LIMITS["jackson_nnz"]:
        _jackson_rows(lp, problem, lab, lb0, xid, C, s, int(LIMITS["jackson"]))
    res = lp.solve(C, s, "coupled-" + variant)
    log.info("coupled LP (%s; potentials on %d of %d nodes, comm on %d edges): %d vars, %d rows, %.3f s, "
             "bound %.6g", variant, S.size, n, n_flow, res.n_vars, res.n_rows, res.seconds, res.value)
    return res


def _jackson_rows(lp: _LP, problem: Problem, lab, lb0: float, xid: np.ndarray, C: int, s: float, K: int) -> None:
    """Head-body-tail cuts: nodes with head start >= theta that run on ``d`` run one at a time
    after theta, and the last of them is followed by its tail. Valid when the constant
    part is at most a known bound (the set of such nodes on ``d`` may be empty)."""
    A = lab.allowed
    est = np.full(A.shape, np.inf)
    np.subtract(lab.head, lab.T, out=est, where=A)
    rows_r, rows_c, rows_v, rhs = [], [], [], []
    for d in range(problem.D):
        for key, other in ((est, lab.tail), (np.where(A, lab.tail, np.inf), est)):
            vals = np.unique(key[A[:, d], d])
            vals = vals[(vals > 0) & (vals <= lb0)]
            if not vals.size:
                continue
            for theta in np.unique(vals[np.linspace(0, vals.size - 1, min(K, vals.size)).astype(int)]):
                S = np.flatnonzero(A[:, d] & (key[:, d] >= theta))
                q = min(float(other[S, d].min()), lb0 - theta)
                k = len(rhs)
                rows_r += [k] * (S.size + 1)
                rows_c += xid[S, d].tolist() + [C]
                rows_v += (lab.T[S, d] / s).tolist() + [-1.0]
                rhs.append(-(theta + q) / s)
    if rhs:
        lp.add("ub", len(rhs), rows_r, rows_c, rows_v, rhs)


# ---- throughput: loads of devices and links ---------------------------------------------

class _Routes:
    """Per-sample load a transfer certainly puts on each resource (rows: devices, then hops)."""

    def __init__(self, problem: Problem):
        self.links, self.D = problem.links, problem.D
        self.blocks = problem.spec.comm_blocks_device
        self.hop_row = {h: problem.D + k for k, h in enumerate(sorted(self.links.hop))}
        self.n_res = problem.D + len(self.hop_row)
        self.cache: dict[tuple, list[tuple[int, float]]] = {}

    def contrib(self, a: int, b: int, sizes: tuple[float, ...]) -> list[tuple[int, float]]:
        """``(resource row, seconds)`` for a transfer ``a -> b`` of one of ``sizes`` bytes (at least
        the smallest): only hops on the chosen route for every possible size count."""
        key = (a, b, sizes)
        out = self.cache.get(key)
        if out is None:
            routes = [self.links.route(a, b, x) for x in sizes]
            common = set(routes[0].hops).intersection(*(r.hops for r in routes[1:]))
            out = []
            for h in routes[0].hops:
                if h in common:
                    lat, inv = self.links.hop[h]
                    t = lat + sizes[0] * inv
                    out.append((self.hop_row[h], t))
                    if self.blocks:
                        out += [(h[0], t), (h[1], t)]
            self.cache[key] = out
        return out


def period_lp(problem: Problem, A: np.ndarray, variant: str | None = None, nnz: int | None = None) -> LPResult:
    """The load LP extended with link loads, for single-group plans on the allowed pairs ``A``.

    ``x`` as in the load LP; ``y[u, a, b] in [0, 1]`` stands for "``u`` runs on ``a`` and
    sends its tensor to ``b``" (``a != b``); ``s[k, b]`` for "model input ``k`` goes to
    ``b``". Rows, for each edge ``(u, v)``: ``y[u, a, b] >= x[u, a] + x[v, b] - 1``
    (McCormick); ``sum_b y[u, a, b] >= x[u, a] - x[v, a]`` and ``sum_a y[u, a, b] >=
    x[v, b] - x[u, b]`` (whatever of ``u`` on ``a`` is not matched by ``v`` is sent
    somewhere, and vice versa); and ``s[k, b] >= x[v, b]`` for an input's consumers. Each
    resource's load is at most ``P``: a device's compute ``sum_v T x`` plus, with
    ``comm_blocks_device``, the transfer hops touching it; a directed link's hops. A
    transfer of ``u`` is priced at its smallest edge bytes, on the hops common to the
    routes for all its edge sizes (the route depends on the bytes actually sent).
    Outputs load their routes with ``x[s, a]``.

    Variants: ``full`` (all rows), ``transport`` (no McCormick rows), ``partial`` (all rows
    for the edges between nodes with different device sets first, then for the largest
    tensors, within ``nnz``, default ``LIMITS["period_nnz"]``), ``io`` (no ``y``).

    Validity (plans on one device group): set ``x`` to the placement and ``y``, ``s`` to
    its actual transfers: every row holds (a transfer's bytes are at least its smallest
    edge's, its route contains the common hops), and every resource's LP load is at most
    its evaluated load, hence at most the period. Rows dropped only relax the LP.
    """
    n, D, host = problem.n, problem.D, problem.host
    if n == 0:
        return LPResult(0.0, 0.0, "empty")
    if not A.any(axis=1).all():
        return LPResult(math.inf, math.inf, "period")
    if 3 * int(A.sum()) > LIMITS["period_io"]:
        return LPResult(0.0, 0.0, "skipped")
    es, ed = problem.edge_src, problem.edge_dst
    De = int(A.any(axis=0).sum())
    mcc = De > 2  # with two devices the transport rows are the McCormick rows
    per_edge = 3 * D * (D - 1) * mcc + 2 * D * (D + 2)
    sel = np.arange(es.size)
    nnz = LIMITS["period_nnz"] if nnz is None else nnz
    if variant is None:
        variant = "full" if es.size * per_edge <= nnz else "partial"
    if variant == "partial":
        k = min(es.size, nnz // per_edge)
        out_b = np.array([min((b for _, b in problem.succ_bytes[u]), default=0.0) for u in range(n)])
        mixed = (A[es] != A[ed]).any(axis=1)
        sel = np.sort(np.lexsort((np.arange(es.size), -out_b[es], ~mixed))[:k])
        variant = "full" if k == es.size else ("io" if k == 0 else "partial")
    if variant == "io" or D == 1:
        sel = sel[:0]
    mcc = mcc and variant != "transport"
    Tf = np.where(A, problem.T, 0.0)
    s = float(Tf.max()) or 1.0
    routes = _Routes(problem)
    lp = _LP()
    xid = _x_vars(lp, A)
    P = int(lp.var(1, 0.0, _serial_upper(problem, A) / s)[0])
    _common_rows(lp, problem, A, xid, None, P)
    vv, dd = np.nonzero(A)
    R, Cc, V = [dd.tolist()], [xid[vv, dd].tolist()], [(Tf[vv, dd] / s).tolist()]

    def load(var: int, rows: list[tuple[int, float]]) -> None:
        R.append([row for row, _ in rows])
        Cc.append([var] * len(rows))
        V.append([t / s for _, t in rows])

    # model inputs: s[k, b] >= x[v, b]; outputs load their route with x[src, a]
    rr, cc = [], []
    for k, (b, dsts) in enumerate(problem.in_tensors):
        for d in range(D):
            users = [j for j in dsts if A[j, d]]
            if d != host and users:
                sv = int(lp.var(1)[0])
                load(sv, routes.contrib(host, d, (b,)))
                for j in users:
                    rr += [len(rr) // 2] * 2
                    cc += [int(xid[j, d]), sv]
    if rr:
        lp.add("ub", len(rr) // 2, rr, cc, np.tile([1.0, -1.0], len(rr) // 2), 0.0)
    for src, b in problem.outputs:
        for a in np.flatnonzero(A[src]):
            if a != host:
                load(int(xid[src, a]), routes.contrib(int(a), host, (b,)))
    if sel.size:
        eu, ev = es[sel], ed[sel]
        k = sel.size
        off = ~np.eye(D, dtype=bool)
        need = np.zeros((n, D, D), dtype=bool)  # y[u, a, b] for a in A[u], b in A[consumer]
        np.logical_or.at(need, eu, A[eu][:, :, None] & A[ev][:, None, :] & off[None])
        yid = np.full((n, D, D), -1, dtype=np.int64)
        yu, ya, yb = np.nonzero(need)
        yid[yu, ya, yb] = lp.var(yu.size)
        sizes = {}
        for u, a, b, y in zip(yu.tolist(), ya.tolist(), yb.tolist(), yid[yu, ya, yb].tolist()):
            if u not in sizes:
                sizes[u] = tuple(sorted({x for _, x in problem.succ_bytes[u]}))
            load(y, routes.contrib(a, b, sizes[u]))
        blocks = []
        if mcc:  # x[u, a] + x[v, b] - y[u, a, b] <= 1
            e, a, b = np.nonzero(A[eu][:, :, None] & A[ev][:, None, :] & off[None])
            r = np.arange(e.size)
            blocks.append((e.size, np.concatenate([r, r, r]),
                           np.concatenate([xid[eu[e], a], xid[ev[e], b], yid[eu[e], a, b]]),
                           np.concatenate([np.ones(2 * e.size), -np.ones(e.size)]), 1.0))
        for w1, w2, ys in ((eu, ev, yid[eu]), (ev, eu, yid[eu].transpose(0, 2, 1))):
            # x[w1, a] - x[w2, a] - sum_b y <= 0 (sum over b of y[u, a, b], or over a of y[u, a, b])
            e, a = np.nonzero(A[w1])
            r = np.arange(e.size)
            h2 = A[w2[e], a]
            ye = ys[e, a]  # (rows, D)
            ry, cy = np.nonzero(ye >= 0)
            blocks.append((e.size, np.concatenate([r, r[h2], ry]),
                           np.concatenate([xid[w1[e], a], xid[w2[e[h2]], a[h2]], ye[ry, cy]]),
                           np.concatenate([np.ones(e.size), -np.ones(int(h2.sum())), -np.ones(ry.size)]), 0.0))
        for blk in blocks:
            lp.add("ub", *blk)
    n_res = routes.n_res
    R.append(list(range(n_res)))
    Cc.append([P] * n_res)
    V.append([-1.0] * n_res)
    lp.add("ub", n_res, np.concatenate(R), np.concatenate(Cc), np.concatenate(V), 0.0)
    res = lp.solve(P, s, "period-" + variant)
    log.info("period LP (%s, y on %d of %d edges): %d vars, %d rows, %.3f s, bound %.6g", variant, sel.size,
             es.size, res.n_vars, res.n_rows, res.seconds, res.value)
    return res
