"""Graph coarsening: fuse what a backend fuses anyway, then (optionally) merge to a size.

Follows Moirai (Zhang et al., "Moirai: Towards Optimal Placement for Distributed
Inference on Heterogeneous Devices", 2023): coarsen the operator graph by the fusion
rules of inference backends before the exact placement solve, so that the solver's
search space shrinks without losing the inter-operator fusion a backend performs.

Rules, applied in this order to the *quotient graph* (one node per cluster):

(a) **elementwise fusion** (``fuse_elementwise``): every node whose op is elementwise, a
    normalisation, dropout, softmax or a shape/selection op (:func:`fusible_op`) joins
    the cluster of one of its producers: the one sending it the most bytes (ties: the
    latest in topological order) when that merge is legal, else the latest producer,
    which is always legal.
(b) **chains** (``fuse_chains``): a cluster with exactly one successor that has exactly
    one predecessor is merged with it, as long as the result carries at most
    ``max_chain_share`` of the graph's total weight (so a purely sequential model, e.g.
    VGG, keeps enough clusters to be pipelined).
(c) **target size** (``target_nodes``): while there are more clusters than asked, merge
    the quotient edge with the smallest key ``w^2 / (w + c)`` (``w`` the merged weight,
    ``c`` the edge's bytes at a nominal bandwidth): heavy edges relative to compute
    first, then the lightest pairs (heavy-edge coarsening, Karypis & Kumar 1998,
    restricted to acyclicity-preserving contractions as in Herrmann et al., "Multilevel
    algorithms for acyclic partitioning of directed acyclic graphs", SISC 2019). Passes
    over a lazy priority queue first take only merges that are legal without a search,
    then searched ones; when none is left, sweeps merge every cluster with its first
    successor in topological order, which is always legal. The phase stops when no
    quotient edge is left (more weakly connected components than the target) or every
    remaining merge would leave a cluster with no device; ``Coarsening.info["reached"]``
    reports the count. The target is an upper bound: (a) and (b) are not undone.

**Legality.** Contracting quotient edge ``A -> B`` keeps the quotient acyclic iff there
is no other path ``A -> ... -> B``. The quotient keeps a topological numbering ``pos``
(``pos[u] < pos[v]`` on every edge; floats, ties allowed). The merge needs no search when
``B``'s other producers are all numbered before ``A`` or ``A``'s other consumers all after
``B`` (so fusing a node into its unique producer, into its latest producer, or a cluster
with its first successor is free). Otherwise a forward search from ``A`` and a backward
search from ``B`` run in turns among the clusters numbered between them, at most
``search_budget`` visits (over budget counts as illegal); the first to finish decides,
and only its side is renumbered past ``B`` (or before ``A``), in the spirit of Pearce &
Kelly's dynamic topological order (JEA 2006). A merge is also refused when no device
can run every member (support masks do not intersect) or, given a ``problem`` with
memory constraints, when the members' parameters exceed the largest capacity among the
devices that can run them.

**Cost semantics of the coarse graph** (exact for :func:`coarse_problem`):

* cluster time on device ``d``: the sum of its members' times (they run back to back),
  ``inf`` if any member cannot run on ``d`` (this honours ``supported_on``,
  ``unsupported_ops``, measured times and the roofline exactly);
* coarse edge ``A -> B`` bytes: ``sum over distinct producers u in A of max_{j in B}
  bytes(u, j)``: every producer's tensor is sent once to ``B``'s device;
* model inputs into members become inputs into the cluster (same tensor, same bytes);
  every model output ``(s, bytes)`` becomes ``(cluster(s), bytes)`` (one each);
* node attributes: flops, param_bytes and bytes_moved summed; output_bytes summed over
  members whose output leaves the cluster (a consumer outside it or a model output);
  ``time_s`` summed per key every timed member carries (kernel-free ops may lack it);
  ``supported_on`` the intersection of the members' explicit lists (spec independent),
  or, when coarsened with a ``problem``, the ids of the devices that can run every
  member; groups of members that share a cluster are united (the cluster takes the
  smallest group name of the union). A fused node's ``op`` is ``fused:op1+op2+...``,
  so ``unsupported_ops`` are honoured only through :func:`coarse_problem` (the full
  member ops are in ``Coarsening.ops``); do not price the coarse graph with
  ``cost_matrix`` alone.

**Relation between coarse and fine figures.** For every coarse plan (any placement and
any per-device order the coarse evaluator accepts), the plan that
:meth:`Coarsening.expand_plan` returns satisfies, under the fine evaluator:

* ``latency_fine <= latency_coarse``. Proof sketch, by induction along the coarse
  schedule: the ``k``-th member of a cluster starting at ``S`` starts by
  ``S + sum of the earlier members' times``, because a fine predecessor in another
  cluster finishes no later than its cluster, a fine transfer of producer ``u`` to
  device ``d`` carries ``max_j bytes(u, j) <=`` the coarse edge's bytes and leaves when
  ``u`` (not its whole cluster) finishes, transfer time is non-decreasing in bytes,
  and inputs/outputs are the same tensors. Equality holds when every cluster is a
  single node and can be strict otherwise. Hence, for latency, the coarse problem is a
  restriction of the fine one: its optimum bounds the fine optimum from above, and
  expanding it loses nothing.
* per-device compute time (``sum T``) and parameter bytes are identical, so the device
  part of the period agrees when ``comm_blocks_device`` is false.
* link loads and activation memory are *not* bounded either way: the fine plan sends one
  transfer (one latency) per producer where the coarse sends one per cluster, its routes
  may differ with the tensor size, and a cluster's internal tensors are invisible to
  the coarse memory model. Re-evaluate expanded plans with the fine evaluator (which
  :meth:`Coarsening.expand_plan` leaves to its caller by setting ``claimed=None``).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from typing import Any

import numpy as np

from ..errors import GraphError, UsageError
from ..ir.graph import CostGraph, InputTensor, Node
from ..machine.cost import FREE_OPS
from ..machine.problem import Problem
from .mapping import Coarsening

log = logging.getLogger(__name__)

#: Ops (lowercase, as the tracer names them) that a backend fuses into their producer.
ELEMENTWISE_OPS = frozenset({
    # activations
    "relu", "relu6", "gelu", "silu", "swish", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leakyrelu", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign", "prelu", "glu",
    "logsigmoid", "quickgelu",
    # arithmetic
    "add", "iadd", "radd", "mul", "imul", "rmul", "sub", "isub", "rsub", "truediv", "itruediv", "div",
    "floordiv", "neg", "pos", "pow", "sqrt", "rsqrt", "exp", "log", "abs", "clamp", "clip", "reciprocal",
    "square", "erf", "where", "masked_fill", "maximum", "minimum",
    # normalisation, dropout, softmax
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alphadropout", "identity", "softmax", "log_softmax",
    "logsoftmax", "softmin",
    # shape and selection
    "getitem", "getattr", "get_attr", "size", "view", "reshape", "permute", "transpose", "contiguous",
    "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "view_as", "reshape_as", "t",
    "to", "type", "type_as", "float", "half", "bfloat16", "chunk", "split", "narrow", "select", "slice",
    "movedim", "detach", "clone",
})
_NORM_PREFIXES = ("batchnorm", "batch_norm", "layernorm", "layer_norm", "groupnorm", "group_norm",
                  "instancenorm", "instance_norm", "rmsnorm", "rms_norm", "localresponsenorm")
_NOMINAL_FLOPS, _NOMINAL_MEM_BW, _NOMINAL_LINK_BW = 1e13, 1e12, 1e10


def fusible_op(op: str) -> bool:
    """Whether a backend would fuse ``op`` into its producer (rule (a))."""
    o = op.lower()
    for pre in ("aten::", "aten.", "torch.", "f."):
        if o.startswith(pre):
            o = o[len(pre):]
    o = o.split(".")[0].rstrip("_")
    return o in ELEMENTWISE_OPS or o.startswith(_NORM_PREFIXES)


class _Quotient:
    """Union-find clusters with quotient adjacency (dicts of bytes) and a topological numbering."""

    def __init__(self, n, succ, pred, w, mask, params, cap_of, budget):
        self.parent = list(range(n))
        self.succ, self.pred = succ, pred
        self.pos = [float(i) for i in range(n)]
        self.renumbered = 0
        self.w, self.mask, self.params = list(w), list(mask), list(params)
        self.cap_of = cap_of  # mask -> largest capacity among its devices (None: no check)
        self.budget = budget
        self.ver = [0] * n
        self.count = n

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def alive(self, x: int) -> bool:
        return self.succ[x] is not None

    def _place(self, a: int, b: int, budget: int) -> float | None:
        """Position of the merged cluster if contracting ``a -> b`` is legal, else None.

        Searches forward from ``a`` and backward from ``b`` in turns, only among clusters
        numbered between them (ties included); the first search to finish decides (forward
        reaching ``b``, or backward reaching ``a``: another path, illegal). The finished
        side is then renumbered just past ``b`` (or just before ``a``), which keeps the
        numbering topological with the merged cluster at ``b``'s (or ``a``'s) position.
        """
        pos, succ, pred = self.pos, self.succ, self.pred
        pa, pb = pos[a], pos[b]
        if all(pos[c] < pa for c in pred[b] if c != a):
            return pa  # b's other producers all come before a
        if all(pos[c] > pb for c in succ[a] if c != b):
            return pb  # a's other consumers all come after b
        if budget <= 0:
            return None
        fs = [c for c in succ[a] if c != b and pos[c] <= pb]  # ties count as inside
        bs = [c for c in pred[b] if c != a and pos[c] >= pa]
        fseen: set[int] = set()
        bseen: set[int] = set()
        steps = 0
        while True:
            if not fs:
                self._shift(fseen, b, after=True)
                return self.pos[b]
            x = fs.pop()
            if x not in fseen:
                if x == b:
                    return None  # another path a -> ... -> b
                fseen.add(x)
                steps += 1
                fs.extend(c for c in succ[x] if pos[c] <= pb)
            if not bs:
                self._shift(bseen, a, after=False)
                return self.pos[a]
            y = bs.pop()
            if y not in bseen:
                if y == a:
                    return None
                bseen.add(y)
                steps += 1
                bs.extend(c for c in pred[y] if pos[c] >= pa)
            if steps > budget:
                return None

    #: Renumber everything when a gap gets finer than this (relative to the positions).
    MIN_STEP = 1e-9

    def _shift(self, side: set[int], anchor: int, after: bool, fresh: bool = False) -> None:
        """Renumber a finished search side: just after ``anchor`` (a's descendants, up to
        their first outside consumer) or just before it (b's ancestors)."""
        if not side:
            return
        pos = self.pos
        nbr = self.succ if after else self.pred
        lim = [pos[c] for x in side for c in nbr[x] if c not in side]
        ref = pos[anchor]
        if after:
            lo, hi = ref, (min(lim) if lim else ref + len(side) + 1.0)
        else:
            lo, hi = (max(lim) if lim else ref - len(side) - 1.0), ref
        step = (hi - lo) / (len(side) + 1)
        if not fresh and step <= self.MIN_STEP * max(1.0, abs(lo), abs(hi)):
            self._renumber()  # gaps are 1 again: the side fits
            return self._shift(side, anchor, after, fresh=True)
        for k, x in enumerate(sorted(side, key=pos.__getitem__)):
            pos[x] = lo + (k + 1) * step

    def _renumber(self) -> None:
        """Spread the numbering out again (keeps its order); rare."""
        live = sorted((x for x in range(len(self.parent)) if self.succ[x] is not None), key=self.pos.__getitem__)
        for k, x in enumerate(live):
            self.pos[x] = float(k)
        self.renumbered += 1

    def try_merge(self, a: int, b: int, budget: int | None = None) -> bool:
        """Contract quotient edge ``a -> b`` if legal (acyclic, supported, fits); ``budget``
        bounds the legality search (default: the coarsening's; 0: the free checks only)."""
        m = self.mask[a] & self.mask[b]
        if m == 0:
            return False
        if self.cap_of is not None and self.params[a] + self.params[b] > self.cap_of(m):
            return False
        newpos = self._place(a, b, self.budget if budget is None else budget)
        if newpos is None:
            return False
        succ, pred = self.succ, self.pred
        del succ[a][b]
        del pred[b][a]
        deg = lambda x: len(succ[x]) + len(pred[x])  # noqa: E731
        r, x = (a, b) if deg(a) >= deg(b) else (b, a)
        sr, pr = succ[r], pred[r]
        for c, by in succ[x].items():
            pc = pred[c]
            del pc[x]
            pc[r] = pc.get(r, 0.0) + by
            sr[c] = sr.get(c, 0.0) + by
        for c, by in pred[x].items():
            sc = succ[c]
            del sc[x]
            sc[r] = sc.get(r, 0.0) + by
            pr[c] = pr.get(c, 0.0) + by
        succ[x] = pred[x] = None
        self.parent[x] = r
        self.pos[r] = newpos
        self.w[r] += self.w[x]
        self.mask[r] = m
        self.params[r] += self.params[x]
        self.ver[r] += 1
        self.ver[x] += 1
        self.count -= 1
        return True

    def reps(self) -> list[int]:
        """Live clusters in topological order."""
        return sorted((x for x in range(len(self.parent)) if self.succ[x] is not None), key=self.pos.__getitem__)


def coarsen(graph: CostGraph, target_nodes: int | None = None, fuse_elementwise: bool = True,
            fuse_chains: bool = True, *, problem: Problem | None = None, max_chain_share: float = 0.05,
            search_budget: int = 64) -> Coarsening:
    """Coarsen ``graph`` by backend fusion rules and, optionally, down to ``target_nodes``.

    Parameters
    ----------
    graph : CostGraph
    target_nodes : int, optional
        Keep merging (rule (c)) until at most this many clusters remain, or no legal merge.
    fuse_elementwise, fuse_chains : bool
        Rules (a) and (b) of the module docstring.
    problem : Problem, optional
        A problem on ``graph``: merges then keep a device that runs every member (its
        ``allowed_devices``, groups included) with room for their parameters, weights
        are the fastest member times, and ``supported_on`` of fused nodes names devices.
        Without it the coarsening is spec independent (weights from a nominal roofline
        at 10 TFLOP/s and 1 TB/s, or the smallest measured time; support from
        ``supported_on`` lists).
    max_chain_share : float
        Rule (b) never builds a cluster heavier than this share of the total weight.
    search_budget : int
        Clusters the legality search may visit per candidate merge (over: refused).

    Returns
    -------
    Coarsening
        Deterministic: the same input gives the same coarse graph.
    """
    t0 = time.perf_counter()
    if target_nodes is not None and target_nodes < 1:
        raise UsageError(f"target_nodes must be >= 1, got {target_nodes}", hint="ask for at least one node")
    if problem is not None and problem.graph is not graph:
        raise GraphError("coarsen(): `problem` is not built on `graph`", hint="pass problem.graph as graph")
    order, index = graph.order, graph.index
    n = len(order)
    nodes = [graph.node(v) for v in order]
    edges = [(index[u], index[v], float(b)) for u, v, b in graph.edges()]
    succ: list[dict | None] = [{} for _ in range(n)]
    pred: list[dict | None] = [{} for _ in range(n)]
    in_bytes = [0.0] * n
    for u, v, b in edges:
        succ[u][v] = b
        pred[v][u] = b
        in_bytes[v] += b
    for t in graph.inputs:
        for d in t.dsts:
            in_bytes[index[d]] += float(t.bytes)
    moved = [float(nd.bytes_moved) if nd.bytes_moved is not None
             else in_bytes[i] + nd.output_bytes + nd.param_bytes for i, nd in enumerate(nodes)]
    w, mask, cap_of, bw, so_names = _weights_and_masks(nodes, moved, problem)
    q = _Quotient(n, succ, pred, w, mask, [float(nd.param_bytes) for nd in nodes], cap_of, max(0, search_budget))
    info: dict[str, Any] = {"fine_nodes": n}
    total_w = float(sum(w))

    if fuse_elementwise:  # (a)
        for v in range(n):
            if not fusible_op(nodes[v].op) or not q.alive(v) or not q.pred[v]:
                continue
            cands = sorted(q.pred[v].items(), key=lambda cb: (-cb[1], -q.pos[cb[0]]))
            for k, (c, _) in enumerate(cands):  # the latest producer never needs a search
                if q.try_merge(c, v, None if k == 0 else 0):
                    break
    info["after_elementwise"] = q.count

    if fuse_chains:  # (b)
        limit = max_chain_share * total_w * (1 + 1e-9)
        for r in q.reps():
            if not q.alive(r):
                continue
            while len(q.succ[r]) == 1:
                (s,) = q.succ[r]
                if len(q.pred[s]) != 1 or q.w[r] + q.w[s] > limit or not q.try_merge(r, s):
                    break
                r = q.find(r)
    info["after_chains"] = q.count

    if target_nodes is not None and q.count > target_nodes:  # (c)
        _merge_to_target(q, target_nodes, bw)
    info.update(target=target_nodes, reached=q.count, renumbered=q.renumbered,
                reached_target=target_nodes is None or q.count <= target_nodes)

    c = _build(graph, nodes, moved, q, problem, so_names)
    info["time_s"] = time.perf_counter() - t0
    log.info("coarsened %s: %d -> %d nodes (elementwise %d, chains %d, target %s) in %.3f s", graph.name, n,
             q.count, info["after_elementwise"], info["after_chains"], target_nodes, info["time_s"])
    return Coarsening(c[0], c[1], c[2], c[3], graph, info)


def _weights_and_masks(nodes, moved, problem):
    """Per-node weight (s), support bitmask, capacity lookup, nominal link bandwidth, mask names."""
    n = len(nodes)
    if problem is not None:
        T = problem.T
        fin = np.where(np.isfinite(T), T, np.inf).min(axis=1) if n else np.zeros(0)
        w = [float(x) if math.isfinite(x) else 0.0 for x in fin]
        mask = []
        for i in range(n):
            m = 0
            for d in problem.allowed_devices(i).tolist():
                m |= 1 << d
            mask.append(m)
        caps = problem.capacity.tolist()
        check_mem = problem.constraints.memory
        memo: dict[int, float] = {}

        def cap_of(m: int) -> float:
            if m not in memo:
                memo[m] = max(c for d, c in enumerate(caps) if m >> d & 1)
            return memo[m]

        bws = sorted(ln.bandwidth_Bps for ln in problem.spec.links)
        bw = bws[len(bws) // 2] if bws else _NOMINAL_LINK_BW
        return w, mask, (cap_of if check_mem else None), bw, None
    w, mask = [], []
    names: dict[str, int] = {}
    for i, nd in enumerate(nodes):
        if nd.time_s:
            w.append(float(min(nd.time_s.values())))
        elif nd.op in FREE_OPS:
            w.append(0.0)
        else:
            w.append(max(nd.flops / _NOMINAL_FLOPS, moved[i] / _NOMINAL_MEM_BW))
        if nd.supported_on is None:
            mask.append(-1)  # every bit set: no restriction
        else:
            m = 0
            for s in nd.supported_on:
                m |= 1 << names.setdefault(s, len(names))
            mask.append(m)
    return w, mask, None, _NOMINAL_LINK_BW, names


def _merge_to_target(q: _Quotient, target: int, bw: float) -> None:
    """Rule (c): lazy priority queue of quotient edges, then first-successor sweeps."""

    def key(a: int, b: int, by: float) -> float:
        wm = q.w[a] + q.w[b]
        den = wm + by / bw
        return wm * wm / den if den > 0 else 0.0

    def push_all(heap):
        for a in q.reps():
            for b, by in q.succ[a].items():
                heap.append((key(a, b, by), q.pos[a], q.pos[b], a, b, q.ver[a], q.ver[b]))
        heapq.heapify(heap)

    heap: list = []
    push_all(heap)
    budget = 0  # first passes: only merges legal without a search; then searched ones
    for _ in range(16):
        merged = 0
        while heap and q.count > target:
            _, _, _, a, b, va, vb = heapq.heappop(heap)
            if q.ver[a] != va or q.ver[b] != vb or not q.alive(a) or b not in q.succ[a]:
                continue
            if q.try_merge(a, b, budget):
                merged += 1
                r = q.find(a)
                for c, by in q.succ[r].items():
                    heapq.heappush(heap, (key(r, c, by), q.pos[r], q.pos[c], r, c, q.ver[r], q.ver[c]))
                for c, by in q.pred[r].items():
                    heapq.heappush(heap, (key(c, r, by), q.pos[c], q.pos[r], c, r, q.ver[c], q.ver[r]))
        if q.count <= target:
            break
        if merged == 0:
            if budget:
                break
            budget = q.budget
        push_all(heap)
    while q.count > target:  # fallback: a cluster with its first successor is always acyclic
        merged = 0
        for r in q.reps():
            if q.count <= target:
                break
            if not q.alive(r) or not q.succ[r]:
                continue
            for s in sorted(q.succ[r], key=q.pos.__getitem__):
                if q.try_merge(r, s):
                    merged += 1
                    break
                if q.mask[r] & q.mask[s]:
                    break  # only the first successor is certainly legal
        if merged == 0:
            break


def _build(graph: CostGraph, nodes: list[Node], moved, q: _Quotient, problem, so_names):
    """The coarse CostGraph and the maps (semantics in the module docstring)."""
    order = graph.order
    n = len(order)
    own = [q.find(i) for i in range(n)]
    reps = q.reps()
    mem: dict[int, list[int]] = {r: [] for r in reps}
    for i in range(n):
        mem[own[i]].append(i)
    cid = {r: order[mem[r][0]] for r in reps}
    # group union over clusters
    gparent: dict[str, str] = {}

    def gfind(g: str) -> str:
        while gparent.setdefault(g, g) != g:
            gparent[g] = gparent[gparent[g]]
            g = gparent[g]
        return g

    for r in reps:
        gs = sorted({nodes[i].group for i in mem[r] if nodes[i].group is not None})
        for g in gs[1:]:
            a, b = gfind(gs[0]), gfind(g)
            if a != b:
                gparent[max(a, b)] = min(a, b)
    leaves = [False] * n
    per: dict[tuple[int, int, int], float] = {}
    for u, v, b in graph.edges():
        i, j = graph.index[u], graph.index[v]
        A, B = own[i], own[j]
        if A != B:
            leaves[i] = True
            k = (A, B, i)
            if b > per.get(k, -1.0):
                per[k] = b
    agg: dict[tuple[int, int], float] = {}
    for (A, B, _), b in per.items():
        agg[(A, B)] = agg.get((A, B), 0.0) + b
    for s, _ in graph.outputs:
        leaves[graph.index[s]] = True
    bit_names = sorted(so_names, key=so_names.get) if so_names else []
    devices = problem.devices if problem is not None else []
    coarse_nodes, members, owner, ops = [], {}, {}, {}
    for r in reps:
        ms = mem[r]
        ns = [nodes[i] for i in ms]
        c = cid[r]
        members[c] = tuple(order[i] for i in ms)
        for i in ms:
            owner[order[i]] = c
        ops[c] = tuple(dict.fromkeys(nd.op for nd in ns))
        timed = [nd for nd in ns if nd.time_s or nd.op not in FREE_OPS]
        keys = set(timed[0].time_s) if timed else set()
        for nd in timed[1:]:
            keys &= set(nd.time_s)
        time_s = {k: float(sum(nd.time_s.get(k, 0.0) for nd in ns)) for k in sorted(keys)}
        if problem is not None:
            ok = np.isfinite(problem.T[ms]).all(axis=0)
            sup = None if ok.all() else tuple(d for d, f in zip(devices, ok.tolist()) if f)
        elif q.mask[r] == -1:
            sup = None
        else:
            sup = tuple(s for k, s in enumerate(bit_names) if q.mask[r] >> k & 1)
        gs = [nd.group for nd in ns if nd.group is not None]
        group = gfind(gs[0]) if gs else None
        if len(ns) == 1:
            nd = ns[0]
            coarse_nodes.append(Node(id=c, op=nd.op, flops=nd.flops, param_bytes=nd.param_bytes,
                                     output_bytes=nd.output_bytes, bytes_moved=nd.bytes_moved, time_s=dict(nd.time_s),
                                     supported_on=sup if problem is not None else nd.supported_on, group=group,
                                     dtype=nd.dtype, module_path=nd.module_path, fx_name=nd.fx_name))
            continue
        op_list = ops[c]
        op = "fused:" + "+".join(op_list[:8]) + ("+..." if len(op_list) > 8 else "")
        heaviest = max(ns, key=lambda nd: nd.flops)
        coarse_nodes.append(Node(
            id=c, op=op, flops=float(sum(nd.flops for nd in ns)), param_bytes=sum(nd.param_bytes for nd in ns),
            output_bytes=sum(nodes[i].output_bytes for i in ms if leaves[i]),
            bytes_moved=int(round(sum(moved[i] for i in ms))), time_s=time_s, supported_on=sup, group=group,
            dtype=heaviest.dtype, module_path=_common_prefix([nd.module_path for nd in ns]), fx_name=None))
    pos = q.pos
    cedges = [(cid[A], cid[B], b) for (A, B), b in sorted(agg.items(), key=lambda kv: (pos[kv[0][0]], pos[kv[0][1]]))]
    inputs = [InputTensor(t.name, t.bytes, tuple(dict.fromkeys(cid[own[graph.index[d]]] for d in t.dsts)))
              for t in graph.inputs]
    outputs = [(cid[own[graph.index[s]]], b) for s, b in graph.outputs]
    coarse = CostGraph(f"{graph.name}.coarse", coarse_nodes, cedges, inputs, outputs)
    return coarse, members, owner, ops


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts or len(parts) < len(paths):
        return ""
    out = []
    for seg in zip(*parts):
        if any(s != seg[0] for s in seg):
            break
        out.append(seg[0])
    return ".".join(out)
