"""``pipeline-dp``: the best contiguous pipeline split of a linear order, by dynamic programming.

After PipeDream (Narayanan et al., "PipeDream: generalized pipeline parallelism for DNN
training", SOSP 2019) and the contiguous-split algorithms of Tarnawski et al. ("Efficient
algorithms for device placement of DNN graph operators", NeurIPS 2020).

**Linear orders.** Two topological orders of the nodes are tried: the graph's own
(``range(n)``) and a depth-first one (Kahn's algorithm with a LIFO ready stack: the node
released last runs next, so a branch stays contiguous). Each is split by the DP below; the
better plan by the evaluator is returned. Co-location groups (e.g. a forward node and its
backward node) are kept together at their first member's position
(:func:`group_contiguous`); tensors that then flow backwards in the order count on the cuts
they cross like the others.

**Stages.** A stage is a contiguous segment ``[a, b)`` of the order on one device; stages
follow one another along the order and use pairwise distinct devices, so the DP state is
``(cut i, set of used devices, device of the last stage)``: ``O(2^D * D)`` states per cut.
For more than ``max_devices`` (default 10) devices the stages take a subsequence of a
fixed device sequence instead (every non-host device by index, the host last; devices may
be skipped), state ``(cut, device)``: ``O(D^2 K^2)`` (:func:`run_seq_dp`).

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
test (and in any case: the better plan by the evaluator is kept), the DP is re-run with the resident bytes (:func:`partitioner.bounds.memory.resident_bytes`:
parameters and the activations a group must keep) plus the cut tensors and inputs, and
each device that the evaluator finds over capacity gets its capacity lowered by the excess
for another run (``FIT_ROUNDS``; the stage costs are computed once, memory only
masks them); last, parameters only, and the evaluator decides.

**Candidate cuts.** With up to ``cuts`` (default 200) candidate cut positions the DP is
``O(K^2 * 2^D * D^2)`` vectorised work. When the order has more valid cut positions (a cut
may not split a co-location group), they are bucketed by cumulative mean compute time
into ``K`` equal buckets and the cut with the fewest crossing bytes of each bucket is kept.
The plan is then optimal (in the DP's cost model) among contiguous splits at those cuts;
with at most ``K`` valid positions it is optimal among all contiguous splits of the order.
``K`` is lowered for large ``D`` to keep the work near ``3e8`` elementary operations.

Data-parallel replicas are not considered. Status: ``"heuristic"``.

Options: :class:`PipelineDPOptions` (``--option pipeline-dp.KEY=VALUE``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from ...bounds.memory import resident_bytes
from ...errors import NoSolutionError
from ...ir.plan import Objective, Plan
from ...ir.settings import Settings
from ...machine.evaluate import evaluate
from ...machine.problem import Problem
from ..registry import register
from .cuts import (
    Crossing,
    candidate_cuts,
    crossing,
    dfs_order,
    group_contiguous,
    valid_cuts,
)
from .peft import allowed_mask

log = logging.getLogger(__name__)

WORK_BUDGET = 3e8
#: DP reruns with capacities lowered by the evaluated excess (memory model "resident")
FIT_ROUNDS = 8


@dataclass(frozen=True)
class PipelineDPOptions:
    """Options of ``pipeline-dp``.

    Attributes
    ----------
    cuts : int
        Most candidate cut positions (lowered for many devices to keep the DP's work near 3e8).
    max_devices : int
        Above this many devices, stages take a subsequence of a fixed device sequence (O(D^2 K^2)) instead of any device subset.
    orders : list of {"index", "dfs"}
        Linear orders split by the DP: the graph's own and a depth-first one.
    """

    solver: ClassVar[str] = "pipeline-dp"

    cuts: int = 200
    max_devices: int = 10
    orders: tuple[Literal["index", "dfs"], ...] = ("index", "dfs")


# ---- stage cost tables ----------------------------------------------------------------------
class _Tables:
    """Stage costs for the cut positions ``P`` (``P[0] = 0``, ``P[-1] = n``) of one order."""

    def __init__(self, problem: Problem, order: np.ndarray, P: np.ndarray, cr: Crossing,
                 devs: list[int], allowed: np.ndarray):
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
        self._pref, self._seg = pref, seg

    def need(self, memory: str) -> np.ndarray:
        """``[i, k]``: memory of segment ``P[i]:P[k]`` under a memory model (module docstring)."""
        p, order, pref, seg = self.p, self.order, self._pref, self._seg
        if memory == "acts":
            return (seg(pref(p.param_bytes[order])) + seg(pref(p.output_bytes[order]))
                    + self.cut_b[:, None] + self.in_b)
        if memory == "resident":
            return seg(pref(resident_bytes(p)[order])) + self.cut_b[:, None] + self.in_b
        return seg(pref(p.param_bytes[order]))

    def compute(self, d: int) -> np.ndarray:
        """``[i, k]``: compute time of segment ``P[i]:P[k]`` on ``d``; inf when invalid."""
        S = self.seg(self.ST[:, d])
        bad = ~self.upper | (self.seg(self.SU[:, d]) > 0)
        return np.where(bad, np.inf, S)

    def _io_hops(self, d: int) -> dict[tuple[int, int], np.ndarray]:
        """Per directed hop, ``[i, k]`` load of segment's input and output transfers on ``d``."""
        p, loads = self.p, {}
        host = p.host
        in_avg = float(np.mean([b for b, _ in p.in_tensors])) if p.in_tensors else 0.0
        out_avg = float(np.mean([b for _, b in p.outputs])) if p.outputs else 0.0
        for h, lat, inv in self.p.links.hop_factors(host, d, in_avg):
            loads[h] = loads.get(h, 0.0) + self.in_c * lat + self.in_b * inv
        for h, lat, inv in self.p.links.hop_factors(d, host, out_avg):
            loads[h] = loads.get(h, 0.0) + self.out_c * lat + self.out_b * inv
        return loads

    def _cut_hops(self, e: int, d: int) -> dict[tuple[int, int], np.ndarray]:
        """Per directed hop, load (vector over cut ``i``) of the cut tensors sent ``e -> d``
        (each cut on its fastest route for its mean tensor, ties to the fewer hops)."""
        memo = self.__dict__.setdefault("_cut_memo", {})
        if (e, d) in memo:
            return memo[(e, d)]
        loads: dict[tuple[int, int], np.ndarray] = {}
        memo[(e, d)] = loads
        if e == d:
            return loads
        links = self.p.links
        c, b = self.cut_c, self.cut_b
        on = c > 0
        mean = np.divide(b, c, out=np.zeros_like(b), where=on)
        routes = links.routes[(e, d)]
        pick = np.zeros(self.M1, dtype=np.int64)
        best_t = routes[0].latency_s + mean * routes[0].inv_bw
        best_h = np.full(self.M1, len(routes[0].hops))
        for k, r in enumerate(routes[1:], 1):  # as LinkTable.route: least time, then fewer hops
            t = r.latency_s + mean * r.inv_bw
            better = (t < best_t) | ((t == best_t) & (len(r.hops) < best_h))
            pick[better], best_t[better], best_h[better] = k, t[better], len(r.hops)
        for k, r in enumerate(routes):
            sel = on & (pick == k)
            if not sel.any():
                continue
            for x, y in r.hops:
                lat, inv = links.hop[(x, y)]
                v = loads.setdefault((x, y), np.zeros(self.M1))
                v[sel] += (c * lat + b * inv)[sel]
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
        p, D, M1 = self.p, self.p.D, self.M1
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


def run_seq_dp(first: np.ndarray, C: np.ndarray, seq: list[int], additive: bool):
    """:func:`run_dp` with stages on a subsequence of the device sequence ``seq`` (devices
    in that order, any skipped): ``O(len(seq)^2 K^2)``, for many devices."""
    M1 = first.shape[1]
    m = len(seq)
    V = np.full((m, M1), np.inf)
    pi = np.full((m, M1), -1, dtype=np.int64)
    pe = np.full((m, M1), -1, dtype=np.int64)
    cols = np.arange(M1)
    for j, d in enumerate(seq):
        V[j] = first[d]
        V[j, 0] = np.inf
        for a in range(j):
            v = V[a]
            rows = np.flatnonzero(np.isfinite(v[:M1 - 1]))
            if not rows.size:
                continue
            Cr = C[seq[a], d][rows]
            cand = v[rows][:, None] + Cr if additive else np.maximum(v[rows][:, None], Cr)
            k = cand.argmin(axis=0)
            best = cand[k, cols]
            upd = best < V[j]
            V[j][upd] = best[upd]
            pi[j][upd] = rows[k[upd]]
            pe[j][upd] = a
    j = int(np.argmin(V[:, M1 - 1]))
    if not np.isfinite(V[j, M1 - 1]):
        return math.inf, []
    best = float(V[j, M1 - 1])
    stages, k = [], M1 - 1
    while True:
        i, a = int(pi[j, k]), int(pe[j, k])
        stages.append((max(i, 0), k, seq[j]))
        if a < 0:
            break
        j, k = a, i
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
    opts = settings.options_of(PipelineDPOptions)
    K = opts.cuts
    dp_work = (1 << nd) * nd * nd / 4 if nd <= opts.max_devices else nd * nd
    K = max(1, min(K, int(math.sqrt(WORK_BUDGET / max(1, dp_work)))))
    w = np.where(allowed, problem.T, np.nan)[order]
    w = np.nan_to_num(np.nanmean(w, axis=1), nan=0.0)
    cuts = candidate_cuts(w, cr.bytes, valid_cuts(problem, pos), K)
    P = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    thr = problem.objective is Objective.THROUGHPUT
    info = {"cuts": int(len(cuts)), "valid_cuts_limited": bool(len(cuts) < n - 1)}
    seq = None
    if nd > opts.max_devices:
        seq = [d for d in range(problem.D) if d != problem.host and d in devs] + [problem.host] * (problem.host in devs)

    tab = _Tables(problem, order, P, cr, devs, allowed)
    first0, C0 = tab.period_costs() if thr else tab.latency_costs()

    def run(memory: str, cap: np.ndarray):
        first, C = first0, C0
        if memory != "none":
            bad = tab.need(memory)[None] > cap[:, None, None] * (1 + 1e-12)  # (D, M1, M1)
            first = np.where(bad[:, 0, :], np.inf, first0)
            C = np.where(bad[None], np.inf, C0)
        if seq is not None:
            return run_seq_dp(first, C, seq, additive=not thr)
        return run_dp(first, C, devs, additive=not thr)

    found = None  # (infeasible, value, DP value, stages, memory model, plan)
    for memory in (("acts", "resident", "params") if problem.constraints.memory else ("none",)):
        if memory == "params" and found is not None:
            break
        cap = problem.capacity.astype(float).copy()
        for _ in range(FIT_ROUNDS if memory == "resident" else 1):
            val, stages = run(memory, cap)
            if not stages:
                break
            plan = _stage_plan(problem, order, P, stages)
            ev = evaluate(problem, plan)
            cand = (not ev.feasible, ev.value(problem.objective), val, stages, memory, plan)
            if found is None or cand[:2] < found[:2]:
                found = cand
            over = np.maximum(ev.memory_peak - problem.capacity, 0.0)
            if ev.feasible or not over.any():
                break
            # a device over capacity must get a smaller segment next time
            need = tab.need(memory)
            for i, k, d in stages:
                if over[d] > 0:
                    cap[d] = max(0.0, min(cap[d] - over[d] - 0.01 * problem.capacity[d], need[i, k] * (1 - 1e-9)))
    if found is None:
        return math.inf, None, info
    _, _, val, stages, memory, plan = found
    info["memory_model"] = memory
    info["stages"] = [(problem.devices[d], int(P[k] - P[i])) for i, k, d in stages]
    return val, plan, info


def _stage_plan(problem: Problem, order: np.ndarray, P: np.ndarray, stages) -> Plan:
    n = problem.n
    pl = np.empty(n, dtype=np.int64)
    per_dev: list[list[int]] = [[] for _ in range(problem.D)]
    for i, k, d in stages:
        seg = order[P[i]:P[k]]
        pl[seg] = d
        per_dev[d].extend(int(v) for v in seg)
    if problem.groups:
        per_dev = [sorted(x) for x in per_dev]  # topological (a group-contiguous order need not be)
    return Plan(tuple(int(x) for x in pl), tuple(tuple(x) for x in per_dev), status="heuristic")


@register("pipeline-dp", "contiguous pipeline split of a linear order by DP over (cut, used devices) "
                         "(PipeDream SOSP'19; Tarnawski et al. NeurIPS'20)", options=PipelineDPOptions)
def solve(problem: Problem, settings: Settings) -> Plan:
    n = problem.n
    if n == 0:
        return Plan((), tuple(() for _ in range(problem.D)), status="heuristic", claimed=0.0)
    allowed = allowed_mask(problem)
    opts = settings.options_of(PipelineDPOptions)
    limit = opts.max_devices
    devs = list(range(problem.D)) if problem.D > limit else pick_devices(problem, allowed, limit)
    orders = {"index": lambda: group_contiguous(problem, np.arange(n, dtype=np.int64)),
              "dfs": lambda: group_contiguous(problem, dfs_order(problem))}
    names = opts.orders
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
