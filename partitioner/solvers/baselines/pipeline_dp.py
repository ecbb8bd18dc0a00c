"""``pipeline-dp``: the best contiguous pipeline split of a linear order, by dynamic programming.

After PipeDream (Narayanan et al., "PipeDream: generalized pipeline parallelism for DNN
training", SOSP 2019) and the contiguous-split algorithms of Tarnawski et al. ("Efficient
algorithms for device placement of DNN graph operators", NeurIPS 2020).

**Linear orders.** Two topological orders of the nodes are tried: the graph's own
(``range(n)``) and a depth-first one (Kahn's algorithm with a LIFO ready stack: the node
released last runs next, so a branch stays contiguous). Each is split by the DP below; the
better plan by the evaluator is returned.

**Stages.** A stage is a contiguous segment ``[a, b)`` of the order on one device; stages
follow one another along the order and use pairwise distinct devices, so the DP state is
``(cut i, set of used devices, device of the last stage)``: ``O(2^D * D)`` states per cut.
For more than ``max_devices`` (default 10) devices only that many are used: those that
support the most nodes, then with the least total time.

**Stage cost (throughput).** The DP minimises the largest stage cost, where the cost of
stage ``[a, b)`` on ``d`` entered from the previous stage's device ``e`` is the largest of

* ``d``'s compute time of the segment (plus, with ``comm_blocks_device``, the hops of its
  transfers that touch ``d``; its outgoing transfer is charged at the worst next device);
* for every directed link hop, the sum over this stage's transfers routed over it: the
  *cut tensors* at ``a`` (every tensor produced before ``a`` and consumed at or after
  it, once per producer at its largest remaining edge, sent ``e -> d``), the model
  inputs consumed in the segment (``host -> d``) and the model outputs produced in it
  (``d -> host``); each transfer costs ``latency + bytes / bandwidth`` per hop.

Without ``comm_blocks_device`` this is the evaluator's period exactly when no tensor
skips a stage and the routes of different stages use different directed links (e.g. any
chain on a star or a fully linked machine; checked against brute force in the tests). It
is only a model otherwise: a tensor that skips stages goes directly from its producer's
device to its consumers' (the DP charges it on every link in between instead); routes of
different stages may share a link; and with ``comm_blocks_device`` the host (which sends
every model input and receives every output) and the devices that relay routed
transfers also carry other stages' hops, a sum over stages that a max-over-stages DP
cannot see. So the returned plan is always re-evaluated and ``claimed`` is the
**evaluator's** period; the DP's own figure is ``info["dp_value_s"]``.

**Stage cost (latency).** A contiguous split for one sample: the DP minimises the sum of
the stages' compute times plus, per cut, the transfer time of its largest cut tensor
(transfers of one cut travel in parallel), plus the model inputs' arrival at the first
stage and the outputs' return from the last. Again the evaluator's latency is claimed.

**Memory.** A segment fits ``d`` when its parameters, the outputs of all its nodes, the
cut tensors it receives and the model inputs it reads fit together (every activation live
at once: an upper bound on the evaluator's step-granular peak). When no split passes this
test, the DP is re-run with parameters only and the evaluator decides.

**Candidate cuts.** With up to ``cuts`` (default 200) candidate cut positions the DP is
``O(K^2 * 2^D * D^2)`` vectorised work. When the order has more valid cut positions (a cut
may not split a co-location group), they are bucketed by cumulative mean compute time
into ``K`` equal buckets and the cut with the fewest crossing bytes of each bucket is kept.
The plan is then optimal (in the DP's cost model) among contiguous splits at those cuts;
with at most ``K`` valid positions it is optimal among all contiguous splits of the order.
``K`` is lowered for large ``D`` to keep the work near ``3e8`` elementary operations.

Data-parallel replicas are not considered. Status: ``"heuristic"``.

Settings extras: ``cuts`` (int), ``max_devices`` (int), ``dp_orders`` (tuple of
``"index"``, ``"dfs"``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ...errors import NoSolutionError
from ...ir.plan import Objective, Plan
from ...ir.settings import Settings
from ...machine.evaluate import evaluate
from ...machine.problem import Problem
from ..registry import register
from .peft import allowed_mask

log = logging.getLogger(__name__)

WORK_BUDGET = 3e8


# ---- linear orders ------------------------------------------------------------------------
def dfs_order(problem: Problem) -> np.ndarray:
    """A depth-first topological order: Kahn's algorithm with a LIFO ready stack."""
    n = problem.n
    indeg = np.array([len(p) for p in problem.preds], dtype=np.int64)
    stack = [v for v in range(n - 1, -1, -1) if indeg[v] == 0]
    out = []
    while stack:
        v = stack.pop()
        out.append(v)
        for j in reversed(problem.succs[v]):
            indeg[j] -= 1
            if indeg[j] == 0:
                stack.append(j)
    return np.array(out, dtype=np.int64)


@dataclass
class _Crossing:
    """Cut tensors of a linear order: for cut ``c`` (first ``c`` positions before it)."""

    bytes: np.ndarray   # (n+1,) total bytes crossing (once per producer, largest remaining edge)
    count: np.ndarray   # (n+1,) number of producers crossing
    lo: np.ndarray      # intervals [lo, hi] of cuts where a producer sends ``val`` bytes
    hi: np.ndarray
    val: np.ndarray


def crossing(problem: Problem, pos: np.ndarray) -> _Crossing:
    """Bytes and counts of the tensors produced before each cut and consumed after it."""
    n = problem.n
    dB = np.zeros(n + 2)
    dC = np.zeros(n + 2)
    lo, hi, val = [], [], []
    for u in range(n):
        sb = problem.succ_bytes[u]
        if not sb:
            continue
        p = int(pos[u])
        qs = sorted((int(pos[j]), float(b)) for j, b in sb)
        suffix, m = [], 0.0
        for q, b in reversed(qs):
            m = max(m, b)
            suffix.append((q, m))
        prev = p
        for q, m in reversed(suffix):
            if q > prev:  # cuts prev+1 .. q see the largest edge at or after q
                dB[prev + 1] += m
                dB[q + 1] -= m
                lo.append(prev + 1), hi.append(q), val.append(m)
                prev = q
        dC[p + 1] += 1
        dC[qs[-1][0] + 1] -= 1
    return _Crossing(np.cumsum(dB)[:n + 1], np.cumsum(dC)[:n + 1], np.array(lo, dtype=np.int64),
                     np.array(hi, dtype=np.int64), np.array(val))


def valid_cuts(problem: Problem, pos: np.ndarray) -> np.ndarray:
    """Cut positions ``1..n-1`` that split no co-location group."""
    n = problem.n
    bad = np.zeros(n + 2, dtype=np.int64)
    for g in problem.groups:
        ps = pos[g]
        bad[ps.min() + 1] += 1
        bad[ps.max() + 1] -= 1
    ok = np.cumsum(bad)[:n + 1] == 0
    ok[0] = ok[n] = False
    return np.flatnonzero(ok)


def candidate_cuts(weights: np.ndarray, cross_bytes: np.ndarray, valid: np.ndarray, K: int) -> np.ndarray:
    """At most ``K`` cuts: per bucket of cumulative weight, the one with fewest crossing bytes."""
    if len(valid) <= K:
        return valid
    cum = np.concatenate([[0.0], np.cumsum(weights)])
    tot = cum[-1]
    key = cum[valid] / tot if tot > 0 else valid / len(weights)
    bucket = np.minimum((key * K).astype(np.int64), K - 1)
    chosen = []
    for b in np.unique(bucket):
        idx = valid[bucket == b]
        chosen.append(int(idx[np.argmin(cross_bytes[idx])]))
    return np.array(sorted(chosen), dtype=np.int64)


# ---- stage cost tables ----------------------------------------------------------------------
class _Tables:
    """Stage costs for the cut positions ``P`` (``P[0] = 0``, ``P[-1] = n``) of one order."""

    def __init__(self, problem: Problem, order: np.ndarray, P: np.ndarray, cr: _Crossing,
                 devs: list[int], allowed: np.ndarray, memory_acts: bool):
        self.p, self.order, self.P, self.cr, self.devs = problem, order, P, cr, devs
        n, M1 = problem.n, len(P)
        self.M1 = M1
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)
        self.pos = pos
        A = allowed[order]
        T0 = np.where(A, problem.T[order], 0.0)
        pref = lambda x: np.concatenate([np.zeros((1,) + x.shape[1:]), np.cumsum(x, axis=0)])[P]  # noqa: E731
        self.ST = pref(T0)                      # (M1, D) compute prefix at cuts
        self.SU = pref((~A).astype(float))      # unsupported counts
        seg = lambda x: x[None, :] - x[:, None]  # noqa: E731  [i, k] = x[k] - x[i]
        self.upper = P[None, :] > P[:, None]
        self.seg = seg
        # model inputs per segment (sent once per device)
        self.in_b = np.zeros((M1, M1))
        self.in_c = np.zeros((M1, M1))
        self.in_first = []  # (bytes, nx): first consumer position at or after each cut
        for b, dsts in problem.in_tensors:
            qs = np.sort(pos[list(dsts)])
            if not len(qs):
                continue
            ix = np.searchsorted(qs, P, side="left")
            nx = np.where(ix < len(qs), qs[np.minimum(ix, len(qs) - 1)], n)
            hit = nx[:, None] < P[None, :]
            self.in_b += b * hit
            self.in_c += hit
            self.in_first.append((b, nx))
        ob = np.zeros(n)
        oc = np.zeros(n)
        for s, b in problem.outputs:
            ob[pos[s]] += b
            oc[pos[s]] += 1
        self.out_b = seg(pref(ob))
        self.out_c = seg(pref(oc))
        self.cut_b = cr.bytes[P]
        self.cut_c = cr.count[P]
        # memory need of each segment
        self.mem = None
        if problem.constraints.memory:
            need = seg(pref(problem.param_bytes[order]))
            if memory_acts:
                need = need + seg(pref(problem.output_bytes[order])) + self.cut_b[:, None] + self.in_b
            self.mem = need

    def compute(self, d: int) -> np.ndarray:
        """``[i, k]``: compute time of segment ``P[i]:P[k]`` on ``d``; inf when invalid."""
        S = self.seg(self.ST[:, d])
        bad = ~self.upper | (self.seg(self.SU[:, d]) > 0)
        if self.mem is not None:
            bad |= self.mem > self.p.capacity[d] * (1 + 1e-12)
        return np.where(bad, np.inf, S)

    def _hops(self, a: int, b: int, nbytes: float) -> list[tuple[tuple[int, int], float, float]]:
        if a == b:
            return []
        links = self.p.links
        r = links.route(a, b, nbytes)
        return [((x, y),) + tuple(links.hop[(x, y)]) for x, y in r.hops]

    def _io_hops(self, d: int) -> dict[tuple[int, int], np.ndarray]:
        """Per directed hop, ``[i, k]`` load of segment's input and output transfers on ``d``."""
        p, loads = self.p, {}
        host = p.host
        in_avg = float(np.mean([b for b, _ in p.in_tensors])) if p.in_tensors else 0.0
        out_avg = float(np.mean([b for _, b in p.outputs])) if p.outputs else 0.0
        for h, lat, inv in self._hops(host, d, in_avg):
            loads[h] = loads.get(h, 0.0) + self.in_c * lat + self.in_b * inv
        for h, lat, inv in self._hops(d, host, out_avg):
            loads[h] = loads.get(h, 0.0) + self.out_c * lat + self.out_b * inv
        return loads

    def _cut_hops(self, e: int, d: int) -> dict[tuple[int, int], np.ndarray]:
        """Per directed hop, load (vector over cut ``i``) of the cut tensors sent ``e -> d``."""
        loads: dict[tuple[int, int], np.ndarray] = {}
        for i in range(self.M1):
            c = self.cut_c[i]
            if c <= 0:
                continue
            b = self.cut_b[i]
            for h, lat, inv in self._hops(e, d, b / c):
                loads.setdefault(h, np.zeros(self.M1))[i] += c * lat + b * inv
        return loads

    def period_costs(self) -> tuple[np.ndarray, np.ndarray]:
        """``first[d][k]`` (stage ``0:P[k]``) and ``C[e, d][i, k]`` for the throughput DP."""
        p, D, M1 = self.p, self.p.D, self.M1
        blocks = p.spec.comm_blocks_device
        first = np.full((D, M1), np.inf)
        C = np.full((D, D, M1, M1), np.inf)
        for d in self.devs:
            base = self.compute(d)
            io = self._io_hops(d)
            dev = base.copy()
            if blocks:
                for (x, y), L in io.items():
                    if d in (x, y):
                        dev = dev + L
                # outgoing cut tensors at the segment's end, at the worst next device
                out = np.zeros(M1)
                for f in self.devs:
                    if f == d:
                        continue
                    o = np.zeros(M1)
                    for h, L in self._cut_hops(d, f).items():
                        if d in h:
                            o += L
                    np.maximum(out, o, out=out)
                dev = dev + out[None, :]
            io_max = np.max(list(io.values()), axis=0) if io else 0.0
            first[d] = np.maximum(dev, io_max)[0]
            for e in self.devs:
                if e == d:
                    continue
                loads = {h: L.copy() if isinstance(L, np.ndarray) else L for h, L in io.items()}
                devc = dev
                for h, v in self._cut_hops(e, d).items():
                    loads[h] = loads.get(h, 0.0) + v[:, None]
                    if blocks and d in h:
                        devc = devc + v[:, None]
                link = np.max(np.broadcast_arrays(*loads.values()), axis=0) if loads else 0.0
                C[e, d] = np.maximum(devc, link)
        return first, C

    def latency_costs(self) -> tuple[np.ndarray, np.ndarray]:
        """``first[d][k]`` and ``C[e, d][i, k]`` for the latency DP (additive)."""
        p, D, M1, n = self.p, self.p.D, self.M1, self.p.n
        host = p.host
        first = np.full((D, M1), np.inf)
        C = np.full((D, D, M1, M1), np.inf)
        # largest cut tensor at each candidate cut
        cr = self.cr
        bmax = np.zeros(M1)
        if len(cr.val):
            for i, c in enumerate(self.P):
                m = (cr.lo <= c) & (cr.hi >= c)
                if m.any():
                    bmax[i] = cr.val[m].max()
        # outputs produced at or after each cut (they leave the last stage)
        outs = sorted((int(self.pos[s]), float(b)) for s, b in p.outputs)
        for d in self.devs:
            S = self.compute(d)
            tail = np.zeros(M1)  # last stage starting at cut i returns its outputs
            for i, c in enumerate(self.P):
                ts = [p.comm(d, host, b) for q, b in outs if q >= c]
                tail[i] = max(ts) if ts else 0.0
            last = S.copy()
            last[:, M1 - 1] += tail
            arr = np.zeros(M1)  # inputs consumed before P[k] reach the first stage
            for b, nx in self.in_first:
                arr = np.maximum(arr, np.where(nx[0] < self.P, p.comm(host, d, b), 0.0))
            first[d] = (last + arr[None, :])[0]
            for e in self.devs:
                if e == d:
                    continue
                xfer = np.array([p.comm(e, d, b) if b > 0 else 0.0 for b in bmax])
                C[e, d] = last + xfer[:, None]
        return first, C


# ---- the dynamic programme ---------------------------------------------------------------------
def run_dp(first: np.ndarray, C: np.ndarray, devs: list[int], additive: bool):
    """Min over splits of the max (or sum) of stage costs.

    Returns
    -------
    (value, stages) with stages a list of ``(i, k, d)`` cut indices and device, or
    ``(inf, [])`` when no split is feasible.
    """
    D, M1 = first.shape
    nd = len(devs)
    V = np.full((1 << nd, nd, M1), np.inf)
    pi = np.full((1 << nd, nd, M1), -1, dtype=np.int32)
    pe = np.full((1 << nd, nd, M1), -1, dtype=np.int32)
    for a, d in enumerate(devs):
        V[1 << a, a] = first[d]
        V[1 << a, a, 0] = np.inf
    cols = np.arange(M1)
    for mask in range(1, 1 << nd):
        for a in range(nd):
            if not mask >> a & 1:
                continue
            v = V[mask, a]
            rows = np.flatnonzero(np.isfinite(v[:M1 - 1]))
            if not rows.size:
                continue
            e = devs[a]
            vr = v[rows][:, None]
            for b in range(nd):
                if mask >> b & 1:
                    continue
                Cr = C[e, devs[b]][rows]
                cand = vr + Cr if additive else np.maximum(vr, Cr)
                j = cand.argmin(axis=0)
                best = cand[j, cols]
                nm = mask | (1 << b)
                upd = best < V[nm, b]
                if upd.any():
                    V[nm, b][upd] = best[upd]
                    pi[nm, b][upd] = rows[j[upd]]
                    pe[nm, b][upd] = a
    best, arg = math.inf, None
    for mask in sorted(range(1, 1 << nd), key=lambda m: (bin(m).count("1"), m)):
        for a in range(nd):
            if V[mask, a, M1 - 1] < best:
                best, arg = float(V[mask, a, M1 - 1]), (mask, a)
    if arg is None:
        return math.inf, []
    stages, (mask, a), k = [], arg, M1 - 1
    while True:
        i, e = int(pi[mask, a, k]), int(pe[mask, a, k])
        stages.append((max(i, 0), k, devs[a]))
        if e < 0:
            break
        mask ^= 1 << a
        a, k = e, i
    stages.reverse()
    return best, stages


def pick_devices(problem: Problem, allowed: np.ndarray, limit: int) -> list[int]:
    """All devices, or the ``limit`` that support the most nodes, then with the least total time."""
    if problem.D <= limit:
        return list(range(problem.D))
    tot = np.where(allowed, problem.T, 0.0).sum(axis=0)
    key = sorted(range(problem.D), key=lambda d: (-int(allowed[:, d].sum()), tot[d], d))
    return sorted(key[:limit])


def split_order(problem: Problem, order: np.ndarray, settings: Settings, allowed: np.ndarray,
                devs: list[int]) -> tuple[float, Plan | None, dict]:
    """Run the DP on one linear order; return (DP value, plan, info)."""
    n = problem.n
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    cr = crossing(problem, pos)
    nd = len(devs)
    K = int(settings.get("cuts", 200))
    K = max(1, min(K, int(math.sqrt(WORK_BUDGET / max(1, (1 << nd) * nd * nd / 4)))))
    w = np.where(allowed, problem.T, np.nan)[order]
    w = np.nan_to_num(np.nanmean(w, axis=1), nan=0.0)
    cuts = candidate_cuts(w, cr.bytes, valid_cuts(problem, pos), K)
    P = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    thr = problem.objective is Objective.THROUGHPUT
    info = {"cuts": int(len(cuts)), "valid_cuts_limited": bool(len(cuts) < n - 1)}
    for acts in (True, False):
        tab = _Tables(problem, order, P, cr, devs, allowed, memory_acts=acts)
        first, C = tab.period_costs() if thr else tab.latency_costs()
        val, stages = run_dp(first, C, devs, additive=not thr)
        if stages:
            info["memory_model"] = "params+activations" if acts else "params only"
            break
        if not problem.constraints.memory:
            break
    if not stages:
        return math.inf, None, info
    pl = np.empty(n, dtype=np.int64)
    per_dev: list[list[int]] = [[] for _ in range(problem.D)]
    for i, k, d in stages:
        seg = order[P[i]:P[k]]
        pl[seg] = d
        per_dev[d].extend(int(v) for v in seg)
    info["stages"] = [(problem.devices[d], int(P[k] - P[i])) for i, k, d in stages]
    plan = Plan(tuple(int(x) for x in pl), tuple(tuple(s) for s in per_dev), status="heuristic")
    return val, plan, info


@register("pipeline-dp", "contiguous pipeline split of a linear order by DP over (cut, used devices) "
                         "(PipeDream SOSP'19; Tarnawski et al. NeurIPS'20)")
def solve(problem: Problem, settings: Settings) -> Plan:
    n = problem.n
    if n == 0:
        return Plan((), tuple(() for _ in range(problem.D)), status="heuristic", claimed=0.0)
    allowed = allowed_mask(problem)
    devs = pick_devices(problem, allowed, int(settings.get("max_devices", 10)))
    orders = {"index": lambda: np.arange(n, dtype=np.int64), "dfs": lambda: dfs_order(problem)}
    names = tuple(settings.get("dp_orders", ("index", "dfs")))
    best = None
    seen: set[bytes] = set()
    for name in names:
        order = orders[name]()
        key = order.tobytes()
        if key in seen:
            continue
        seen.add(key)
        val, plan, info = split_order(problem, order, settings, allowed, devs)
        if plan is None:
            log.info("pipeline-dp: no contiguous split of the %s order", name)
            continue
        ev = evaluate(problem, plan)
        value = ev.value(problem.objective)
        log.debug("pipeline-dp: %s order, DP %.6g s, evaluator %.6g s", name, val, value)
        cand = ((not ev.feasible, value), plan, dict(info, order=name, dp_value_s=val, feasible=ev.feasible))
        if best is None or cand[0] < best[0]:
            best = cand
    if best is None:
        raise NoSolutionError("pipeline-dp found no contiguous split: every split needs a device twice or a "
                          "device that cannot run a segment's ops or hold its memory",
                          hint="use a list-scheduling solver (heft, peft) or split")
    (_, value), plan, info = best
    return plan.with_(claimed=float(value), info=info)
