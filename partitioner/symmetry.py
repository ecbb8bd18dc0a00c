"""Symmetry: repeated blocks in the graph, identical devices in the spec, and a reduced solve.

Large language models are a prologue (embedding, positions, mask), ``L`` identical
decoder layers and an epilogue (final norm, head); GPU servers hold several identical
GPUs. :func:`find_blocks` and :func:`device_classes` detect both, and the ``symmetry``
solver places the model as a pipeline of layer ranges over device classes by a small
exact dynamic programme instead of searching the full operator-level problem, then
expands the answer to a plan for every node. Where the structure is not there (no
repeated blocks, not a chain, too many device classes) it falls back to a full solver.

**Blocks** (:func:`find_blocks`). Nodes are keyed by the first indexed component of
their ``module_path`` (``layers.3.attn.q_proj`` -> ``("layers", 3)``); each key's
nodes, in topological order, form a candidate block. Blocks are typed by the
Weisfeiler-Lehman hash (Shervashidze et al., JMLR 2011; ``networkx``) of their induced
subgraph labelled by op, parameter and output bytes, and then compared exactly: per
relative position the op, bytes and the row of ``T`` (so every device prices them
identically), the internal edges, the edges from the previous block, and the edges
from nodes outside the blocks (*shared* tensors such as the mask, identical for every
block). The longest run of consecutive blocks of one type is kept; the other nodes are
the *prologue* (no block ancestor) and the *epilogue* (with the prologue nodes that only the
epilogue reads, such as a tied head's weight). The run must be a chain: a block feeds only
the next block (the last one the epilogue), no epilogue node feeds a block, only the last
block's nodes may be model outputs, and no co-location group crosses a block. Inside a
block, *cheap cuts* (the tensors crossing them weigh at most ``cut_factor`` times those
crossing a block boundary) split it into segments.

**Devices** (:func:`device_classes`). Colour refinement (1-dimensional WL) on the
devices: the initial colour is the column of ``T``, the capacity and whether the device
is the host; a colour is refined by the multiset of (colour, transfer times) to every
other device at the tensor sizes the DP uses. Classes whose members do not all have the
same transfer time to every member of another class are split into single devices, so
that the DP can price a transfer between two classes by one number. Servers (``host``
of the spec) with the same multiset of device models are reported as one server type.

**Reduced problem.** Units: the prologue, the ``g`` segments of each of the ``L`` blocks,
the epilogue; a stage is a range of units on one device (or, for latency, on a group of
devices, below); stages follow the chain, so the first holds the prologue and the last the
epilogue (a stage may hold only one of them, e.g. the head next to the host). The DP
state is (how many devices of each class are used, anchor class of the last stage,
position); the lattice has ``prod(size_c + 1)`` points. Costs (the evaluator's machine
model, per stage):

* compute: the sum of ``T`` over the stage's units (prefix sums); infinite when the
  stage's parameters (KV cache included) plus one block's activations, the crossing and
  shared tensors (and the prologue's / epilogue's outputs) exceed the usable memory;
* latency: stages add up, each cut adds the largest transfer of its crossing tensors,
  the model inputs reach the first stage and the outputs return from the last;
* period: the largest of each stage's compute and the sum of the transfers it receives
  (crossing tensors, the shared tensors), the input and the output transfers. Link
  sharing between stages is not seen by the DP, so it is a model; the plan it returns is
  graded by the evaluator (``claimed``).

*Group stages* (latency): a pattern for ``p`` consecutive blocks is placed at operator
level by HEFT on a group of devices of one server (a sub-problem with one block type and
one server type; see :func:`_group_kinds`), and a stage repeats it as often as memory
allows, running its other blocks on one device; this captures the intra-layer
parallelism that a pipeline of single devices lacks.

*Replicas* (throughput): after the DP the best pipeline on every sub-multiset of the
devices is known; a second DP over the lattice splits the devices into data-parallel
replicas (throughputs add up, as in DESIGN.md), and the better of that and the best
single pipeline by the evaluator is returned. Stages are contiguous and use distinct
devices, so plans in which a device runs several separate parts of the chain are out of
reach (the operator-level solvers can find them). Status ``"heuristic"``; ``info``
reports the reduction (nodes and devices before and after, DP size, times).

Settings extras: ``fallback`` (solver when symmetry does not hold, default ``"heft"``),
``replicate`` (default True), ``groups`` (latency group stages, default True),
``pattern_blocks`` (default (1,)), ``pattern_memory`` (fractions f: also solve patterns
for L/(p f) repetitions, default ()), ``max_group`` (default 8), ``cut_factor`` (default 8),
``max_positions`` (default 480 for throughput, 4 per block for latency), ``max_lattice``
(default 20000), ``per_first_class`` (price shared tensors per first class; default False:
the largest).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from itertools import product

import networkx as nx
import numpy as np

from .errors import InfeasibleError
from .evaluate import evaluate
from .problem import Objective, Plan, Problem, Settings
from .solvers import register
from .solvers import solve as run_solver

log = logging.getLogger(__name__)

__all__ = ["Blocks", "DeviceClasses", "find_blocks", "device_classes", "servers", "solve", "reduce_and_solve"]


# ---- blocks ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Blocks:
    """A chain of identical blocks between a prologue and an epilogue (node indices)."""

    prefix: str
    indices: tuple[int, ...]                 # the blocks' module indices (e.g. layer numbers)
    blocks: tuple[tuple[int, ...], ...]      # nodes of each block, topological order
    prologue: tuple[int, ...]
    epilogue: tuple[int, ...]
    boundary: tuple[float, ...]              # bytes of each producer crossing a block boundary
    shared: tuple[float, ...]                # bytes of each shared producer (sent once per device)
    cuts: tuple[int, ...]                    # relative positions of cheap cuts inside a block
    cut_cross: tuple[tuple[float, ...], ...]  # bytes of each producer crossing each cut
    chain: tuple[tuple[int, int, float], ...] = ()         # (rel producer, rel consumer, bytes) block -> next
    shared_edges: tuple[tuple[int, int, float], ...] = ()  # (outside producer, rel consumer, bytes)
    wl_hash: str = ""
    info: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.blocks[0])


def _block_key(path: str) -> tuple[str, int] | None:
    parts = path.split(".") if path else []
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), int(p)
    return None


def _local_signature(problem: Problem, nodes: list[int]) -> tuple:
    rel = {v: r for r, v in enumerate(nodes)}
    g = problem.graph
    vs = tuple((g.node(problem.node_name(v)).op, float(problem.param_bytes[v]), float(problem.output_bytes[v]),
                problem.T[v].tobytes()) for v in nodes)
    es = tuple(sorted((rel[v], rel[w], b) for v in nodes for w, b in problem.succ_bytes[v] if w in rel))
    return vs, es


def _wl_hash(problem: Problem, nodes: list[int]) -> str:
    rel = {v: r for r, v in enumerate(nodes)}
    G = nx.DiGraph()
    for v in nodes:
        G.add_node(rel[v], label=f"{problem.graph.node(problem.node_name(v)).op}|{problem.param_bytes[v]:.0f}|"
                                 f"{problem.output_bytes[v]:.0f}")
    for v in nodes:
        for w, b in problem.succ_bytes[v]:
            if w in rel:
                G.add_edge(rel[v], rel[w], bytes=f"{b:.0f}")
    with warnings.catch_warnings():  # networkx 3.5 notes that directed hashes changed; ours are only compared
        warnings.simplefilter("ignore", UserWarning)
        return nx.weisfeiler_lehman_graph_hash(G, node_attr="label", edge_attr="bytes", iterations=3)


def find_blocks(problem: Problem, cut_factor: float = 8.0,
                max_positions: int | None = 480) -> tuple[Blocks | None, str]:
    """Detect the longest chain of identical blocks; ``(None, reason)`` when there is none.

    ``cut_factor``: a cut inside a block is kept when the tensors crossing it weigh at most
    that many times a block boundary's (0: no cuts inside blocks); at most
    ``max_positions / blocks - 1`` cuts (None: 3) are kept (those nearest to equal shares of the
    block's mean time).
    """
    keyed: dict[str, dict[int, list[int]]] = {}
    for i in range(problem.n):
        k = _block_key(problem.graph.node(problem.node_name(i)).module_path)
        if k is not None:
            keyed.setdefault(k[0], {}).setdefault(k[1], []).append(i)
    prefixes = sorted((p for p in keyed if len(keyed[p]) >= 2),
                      key=lambda p: (-sum(len(v) for v in keyed[p].values()), p))
    if not prefixes:
        return None, "no repeated module (no module_path with a layer index)"
    reasons = []
    for prefix in prefixes:
        found, why = _chain(problem, prefix, keyed[prefix], cut_factor, max_positions)
        if found is not None:
            return found, ""
        reasons.append(f"{prefix}: {why}")
    return None, "; ".join(reasons)


def _chain(problem: Problem, prefix: str, groups: dict[int, list[int]], cut_factor: float,
           max_positions: int | None) -> tuple[Blocks | None, str]:
    idxs = sorted(groups)
    local = {i: _local_signature(problem, groups[i]) for i in idxs}
    wl: dict = {}
    for i in idxs:  # one WL hash per distinct exact signature (it names the block type)
        if local[i] not in wl:
            wl[local[i]] = _wl_hash(problem, groups[i])
    types = {i: (wl[local[i]], local[i]) for i in idxs}
    best: list[int] = []
    run: list[int] = []
    for i in idxs:
        if run and i == run[-1] + 1 and types[i] == types[run[-1]]:
            run.append(i)
        else:
            run = [i]
        if len(run) > len(best):
            best = list(run)
    if len(best) < 2:
        return None, "no two consecutive identical blocks"
    blocks = [groups[i] for i in best]
    L, n = len(blocks), problem.n
    which = np.full(n, -1, dtype=np.int64)
    for b, nodes in enumerate(blocks):
        which[nodes] = b
    rel = {v: r for nodes in blocks for r, v in enumerate(nodes)}
    after = np.zeros(n, dtype=bool)  # in a block, or has an ancestor in one
    for v in range(n):
        after[v] = which[v] >= 0 or any(after[u] for u in problem.preds[v])
    prologue = [v for v in range(n) if which[v] < 0 and not after[v]]
    epi = {v for v in range(n) if which[v] < 0 and after[v]}
    outs = {s for s, _ in problem.outputs}
    for v in reversed(prologue):  # what only the epilogue reads runs with it (e.g. a tied head's weight)
        if problem.succs[v] and v not in outs and all(w in epi for w in problem.succs[v]):
            epi.add(v)
    prologue = [v for v in prologue if v not in epi]
    epilogue = sorted(epi)
    for v in range(n):
        for w, _ in problem.succ_bytes[v]:
            bv, bw = which[v], which[w]
            if v in epi and bw >= 0:
                return None, "an epilogue node feeds a block (not a chain)"
            if bv >= 0 and bw >= 0 and bw not in (bv, bv + 1):
                return None, f"block {best[bv]} feeds block {best[bw]} (not the next one)"
            if bv >= 0 and bw < 0 and bv != L - 1:
                return None, f"block {best[bv]} feeds a node outside the chain"
    if any(0 <= which[s] < L - 1 for s, _ in problem.outputs):
        return None, "a block node other than the last block's is a model output"
    for g in problem.groups:
        if len({int(which[v]) for v in g}) > 1:
            return None, "a co-location group crosses a block boundary"
    ins = [sorted((k, rel[v]) for k, (_, dsts) in enumerate(problem.in_tensors) for v in dsts if which[v] == b)
           for b in range(L)]
    if any(x != ins[0] for x in ins):
        return None, "blocks read different model inputs"
    outside = [set() for _ in range(L)]
    chain_in = [set() for _ in range(L)]
    for b, nodes in enumerate(blocks):
        for v in nodes:
            for u, by in problem.pred_bytes[v]:
                if which[u] < 0:
                    outside[b].add((u, rel[v], by))
                elif which[u] == b - 1:
                    chain_in[b].add((rel[u], rel[v], by))
    shared = set.intersection(*outside[1:])
    if any(o != shared for o in outside[1:]) or any(c != chain_in[1] for c in chain_in[2:]):
        return None, "blocks differ in their edges from outside or from the previous block"
    entry = outside[0] - shared
    if not shared <= outside[0] or Counter((r, by) for _, r, by in entry) != Counter(
            (r, by) for _, r, by in chain_in[1]):
        return None, "the first block is entered differently from the others"
    bmax: dict[int, float] = {}
    for rs, _, by in chain_in[1]:
        bmax[rs] = max(bmax.get(rs, 0.0), by)
    smax: dict[int, float] = {}
    for u, _, by in shared:
        smax[u] = max(smax.get(u, 0.0), by)
    cuts, cross = _cheap_cuts(problem, blocks, rel, chain_in[1], cut_factor * sum(bmax.values()))
    keep = 3 if max_positions is None else max(0, max_positions // L - 1)
    if len(cuts) > keep:  # keep the cuts nearest to equal shares of the block's mean time
        T = problem.T[blocks[0]]
        cum = np.concatenate([[0.0], np.cumsum(np.nanmean(np.where(np.isfinite(T), T, np.nan), axis=1))])
        chosen: list[int] = []
        for q in range(1, keep + 1):
            target = cum[-1] * q / (keep + 1)
            free = [i for i in range(len(cuts)) if i not in chosen]
            chosen.append(min(free, key=lambda i: (abs(cum[cuts[i]] - target), sum(cross[i]), i)))
        chosen.sort()
        cuts, cross = [cuts[i] for i in chosen], [cross[i] for i in chosen]
    info = {"prefix": prefix, "run": [best[0], best[-1]], "block_types": len(set(types.values()))}
    return Blocks(prefix, tuple(best), tuple(tuple(b) for b in blocks), tuple(prologue), tuple(epilogue),
                  tuple(bmax[k] for k in sorted(bmax)), tuple(smax[k] for k in sorted(smax)), tuple(cuts),
                  tuple(tuple(c) for c in cross), tuple(sorted(chain_in[1])), tuple(sorted(shared)),
                  types[best[0]][0], info), ""


def _cheap_cuts(problem: Problem, blocks, rel, chain_in, limit: float) -> tuple[list[int], list[list[float]]]:
    """Cuts inside a block whose crossing tensors weigh at most ``limit`` bytes (a block boundary's).

    A cut at relative position ``r`` separates the block's nodes ``< r`` from those ``>= r``;
    it is crossed by every producer before it (in the block, or in the previous block) with
    a consumer after it (in the block, or in the next block, as ``chain_in`` says).
    """
    blk = blocks[1]
    m = len(blk)
    inb = set(blk)
    group_span: dict[int, int] = {}
    for g in problem.groups:
        rs = [rel[v] for v in g if v in inb]
        if rs:
            group_span[min(rs)] = max(group_span.get(min(rs), 0), max(rs))
    uses: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for v in blk:
        for w, by in problem.succ_bytes[v]:
            if w in inb:
                uses.setdefault(("in", rel[v]), []).append((rel[w], by))
    for rs, rd, by in chain_in:
        uses.setdefault(("in", rs), []).append((m, by))     # to the next block
        uses.setdefault(("prev", rs), []).append((rd, by))  # from the previous block
    cuts, cross = [], []
    for r in range(1, m):
        if any(a < r <= b for a, b in group_span.items()):
            continue
        c = []
        for (kind, src), us in sorted(uses.items()):
            if kind == "in" and src >= r:
                continue
            far = [by for q, by in us if q >= r]
            if far:
                c.append(max(far))
        if c and sum(c) <= limit:
            cuts.append(r)
            cross.append(c)
    return cuts, cross


# ---- devices -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceClasses:
    """Devices that are interchangeable for the DP: ``members[c]`` (device indices, sorted)."""

    members: tuple[tuple[int, ...], ...]
    of: tuple[int, ...]  # class of every device

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(m) for m in self.members)


def device_classes(problem: Problem, sizes_bytes: tuple[float, ...] = (0.0, 1e6)) -> DeviceClasses:
    """Colour refinement of the devices (see the module docstring)."""
    D = problem.D
    cm = [problem.comm_matrix(b) for b in sorted(set(sizes_bytes))]
    col = [hash((problem.T[:, d].tobytes(), float(problem.capacity[d]), d == problem.host)) for d in range(D)]
    colour = _relabel(col)
    while True:
        sig = [(colour[d], tuple(sorted((colour[e], tuple(round(m[d, e], 15) for m in cm),
                                         tuple(round(m[e, d], 15) for m in cm)) for e in range(D) if e != d)))
               for d in range(D)]
        new = _relabel(sig)
        if len(set(new)) == len(set(colour)):
            break
        colour = new
    while True:  # split classes whose pairwise transfer times are not constant
        groups = _groups(colour)
        bad = set()
        for a, b in product(range(len(groups)), repeat=2):
            vals = {tuple(round(m[x, y], 15) for m in cm) for x in groups[a] for y in groups[b] if x != y}
            if len(vals) > 1:
                bad.update((a, b))
        if not bad:
            break
        nxt = max(colour) + 1
        for c in sorted(bad):
            for d in groups[c][1:]:
                colour[d] = nxt
                nxt += 1
        colour = _relabel(colour)
    groups = _groups(colour)
    of = [0] * D
    for c, g in enumerate(groups):
        for d in g:
            of[d] = c
    return DeviceClasses(tuple(tuple(g) for g in groups), tuple(of))


def _relabel(keys) -> list[int]:
    first: dict = {}
    for k in keys:
        first.setdefault(k, len(first))
    return [first[k] for k in keys]


def _groups(colour: list[int]) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for d, c in enumerate(colour):
        out.setdefault(c, []).append(d)
    return sorted(out.values())


def servers(problem: Problem) -> dict:
    """Servers of the spec (device ``host``) and how many distinct server types they form."""
    by: dict[str, list[str]] = {}
    for d in problem.spec.devices:
        by.setdefault(d.host, []).append(d.id)
    kinds = {h: tuple(sorted(problem.spec.device(x).model or problem.spec.device(x).kind for x in ids))
             for h, ids in by.items()}
    return {"servers": {h: ids for h, ids in sorted(by.items())}, "server_types": len(set(kinds.values()))}


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
    kinds = []
    for c in range(K):
        t = ST[c][None, :] - ST[c][:, None]
        ok = upper & (need <= cap[rep[c]] * (1 + 1e-12)) & ((SB[c][None, :] - SB[c][:, None]) == 0)
        kinds.append(_Kind(tuple(int(x == c) for x in range(K)), c, np.where(ok, t, np.inf)))
    if additive and settings.get("groups", True):
        kinds += _group_kinds(problem, bl, cls, g, ut, mem, cap, settings)
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
    return _Reduced(K, cls.sizes, U, g, kinds, link, shared, h_in, h_out, additive)


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
    from .graph import CostGraph, InputTensor

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
                 settings: Settings) -> list[_Kind]:
    """Latency stages on a group of devices of one server (one server type, one block type).

    A pattern for ``p`` consecutive blocks (``p`` in ``pattern_blocks``, default 1) is placed
    at operator level by HEFT on a sub-problem whose boundary input arrives at, and whose
    boundary output returns to, the group's anchor device (without memory limits, and for
    ``m`` in ``L / (p f)``, f in ``pattern_memory``, with the memory of ``m`` repetitions per
    device). A stage of ``m`` blocks repeats the pattern ``r`` times and runs the other
    ``m - r p`` blocks alone on one device of the anchor's class, ``r`` as large as memory
    allows (:func:`_mixed_costs`); the prologue / epilogue go on the stage's entry / exit
    device. Classes more than 10x slower than the fastest on a block are left out of groups.
    """
    from .problem import Constraints
    from .solvers import heft

    K, L = len(cls.members), len(bl.blocks)
    U, E = L * g, L * g + 2
    per_block = ut[1:1 + g].sum(axis=0)
    fast = [c for c in range(K) if np.isfinite(per_block[c]) and per_block[c] <= 10 * per_block.min()]
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
    out, seen = [], set()
    for p in [int(x) for x in settings.get("pattern_blocks", (1,)) if 1 <= int(x) < L]:
        cg, blk = _block_problem(problem, bl, p)
        pb = problem.param_bytes[blk]
        for host, devs in sorted(by_host.items()):
            cnt = [sum(1 for d in devs if cls.of[d] == c) if c in fast else 0 for c in range(K)]
            for u in product(*[range(x + 1) for x in cnt]):
                if not 2 <= sum(u) <= max_group or (p, u) in seen:
                    continue
                seen.add((p, u))
                G = [d for c in range(K) for d in [x for x in devs if cls.of[x] == c][:u[c]]]
                slot = {d: (cls.of[d], [y for y in G if cls.of[y] == cls.of[d]].index(d)) for d in G}
                for a in [c for c in range(K) if u[c]]:
                    x = next(d for d in G if cls.of[d] == a)
                    fits = False
                    for m in _targets(settings.get("pattern_memory", ()), L, p):
                        if fits:  # the unconstrained pattern already holds every block
                            break
                        T = problem.T[blk].copy()
                        T[:, [d for d in range(problem.D) if d not in G]] = np.inf
                        sub = Problem(cg, problem.spec, Objective.LATENCY, Constraints(memory=m is not None), T=T)
                        sub.host = x
                        if m is not None:
                            sub.capacity = np.maximum(cap - mem["act"] * p, 0.0) / m
                        plan = heft.solve(sub, Settings(seed=settings.seed))
                        tau = evaluate(sub, plan).latency
                        key = (p, u, a, plan.placement)
                        if key in seen:
                            continue
                        seen.add(key)
                        load = np.bincount(np.asarray(plan.placement), weights=pb, minlength=problem.D)
                        pro_p = problem.param_bytes[list(bl.prologue)].sum()
                        epi_p = problem.param_bytes[list(bl.epilogue)].sum()
                        pb_block = problem.param_bytes[list(bl.blocks[0])].sum()
                        # repetitions that fit, for a stage holding the prologue (j = 0) and/or the epilogue (k = E)
                        same = [i for i, d in enumerate(G) if cls.of[d] == a]
                        cost, nrep, nsolo = _mixed_costs(
                            cap[G] - mem["act"] * p, load[G], G.index(x), same, extra_j[0] + pro_p, extra_k[E] + epi_p,
                            L, p, tau, float(ut[1:1 + g, a].sum()), float(pb_block), hop[a])
                        fits = m is None and nrep[1, 1, L] * p >= L
                        hp_, he_ = (k == 0).astype(int)[:, None], (k == E).astype(int)[None, :]
                        nbc = np.clip(nb, 0, L)
                        t = cost[hp_, he_, nbc] + np.where(k == 0, ut[0, a], 0.0)[:, None] \
                            + np.where(k == E, ut[E - 1, a], 0.0)[None, :]
                        ok = (nb >= 1) & on_block[:, None] & on_block[None, :] & (k[None, :] > k[:, None])
                        kd = _Kind(tuple(u), a, np.where(ok & np.isfinite(t), t, np.inf),
                                   tuple(slot[int(d)] for d in plan.placement), float(tau))
                        kd.reps = np.where(ok, nrep[hp_, he_, nbc], 0)
                        kd.solo = np.where(ok, nsolo[hp_, he_, nbc], 0)
                        kd.group = tuple(slot[d] for d in G)
                        out.append(kd)
    return out


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
    cols = np.arange(E + 1)
    for ui, u in enumerate(vecs):
        if not np.isfinite(V[ui]).any():
            continue
        for s, kd in enumerate(R.kinds):
            if np.any(u + kd.u > sz):
                continue
            a = kd.anchor
            if R.additive:
                W = V[ui] + R.link[:, a, :]
            else:
                W = np.maximum(V[ui], R.link[:, a, :] + (R.shared[f, a] if f is not None else R.shared[:, a].max()))
            bc = W.argmin(axis=0)
            w = W[bc, cols]
            rows = kd.rows[np.isfinite(w[kd.rows])]
            if not rows.size:
                continue
            C = kd.comp[rows]
            cand = w[rows][:, None] + C if R.additive else np.maximum(w[rows][:, None], C)
            jb = cand.argmin(axis=0)
            best = cand[jb, cols]
            vi = ui + kidx[s]
            upd = best < V[vi, a]
            if upd.any():
                V[vi, a][upd] = best[upd]
                aj[vi, a][upd] = rows[jb[upd]]
                ac[vi, a][upd] = bc[rows[jb[upd]]]
                ak[vi, a][upd] = s
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
                    r = (q - first_block) % (len(kd.pattern) // bl.size)
                    pl[list(blk)] = [taken[c][i] for c, i in kd.pattern[r * bl.size:(r + 1) * bl.size]]
    order = [[] for _ in range(problem.D)]
    for i in range(problem.n):
        order[pl[i]].append(i)
    return Plan(tuple(int(x) for x in pl), tuple(tuple(o) for o in order), status="heuristic")


def _replica_split(rates: dict[int, float], vecs) -> tuple[float, list[int]]:
    """Max total throughput over splits of the devices into replicas (sub-multisets of classes)."""
    idx = {tuple(v): i for i, v in enumerate(vecs)}
    F = [0.0] * len(vecs)
    choice: list[int | None] = [None] * len(vecs)
    items = sorted(rates.items())
    for vi, v in enumerate(vecs):
        for ui, rate in items:
            u = vecs[ui]
            if np.all(u <= v):
                rest = idx[tuple(v - u)]
                if rate + F[rest] > F[vi] * (1 + 1e-12):
                    F[vi], choice[vi] = rate + F[rest], ui
    parts, vi = [], len(vecs) - 1
    while choice[vi] is not None:
        parts.append(choice[vi])
        vi = idx[tuple(vecs[vi] - vecs[choice[vi]])]
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


def reduce_and_solve(problem: Problem, settings: Settings) -> tuple[Plan | None, dict]:
    """The reduced solve; ``(None, info)`` when symmetry does not hold (see the module docstring)."""
    t0 = time.perf_counter()
    thr = problem.objective is Objective.THROUGHPUT
    bl, why = find_blocks(problem, float(settings.get("cut_factor", 8.0)),
                          settings.get("max_positions", 480 if thr else None))
    if bl is None:
        return None, {"symmetry": False, "reason": why}
    sizes_b = (*bl.boundary, *bl.shared, *(x for c in bl.cut_cross for x in c),
               *(b for b, _ in problem.in_tensors), *(b for _, b in problem.outputs))
    cls = device_classes(problem, sizes_b or (0.0,))
    t_detect = time.perf_counter() - t0
    lattice = int(np.prod([s + 1 for s in cls.sizes]))
    info = {"symmetry": True, "nodes_full": problem.n, "devices_full": problem.D, "blocks": len(bl.blocks),
            "block_nodes": bl.size, "block_wl_hash": bl.wl_hash, "prologue_nodes": len(bl.prologue),
            "epilogue_nodes": len(bl.epilogue), "nodes_reduced": len(bl.prologue) + bl.size + len(bl.epilogue),
            "segments_per_block": len(bl.cuts) + 1, "dp_positions": len(bl.blocks) * (len(bl.cuts) + 1),
            "device_classes": [[problem.devices[d] for d in m] for m in cls.members],
            "devices_reduced": len(cls.members), "lattice": lattice, **servers(problem), **bl.info}
    if lattice > int(settings.get("max_lattice", 20000)):
        info.update(symmetry=False, reason=f"{len(cls.members)} device classes ({lattice} lattice points)")
        return None, info
    R = _build(problem, bl, cls, not thr, settings)
    t1 = time.perf_counter()
    runs = {f: _dp(R, f) for f in (range(R.K) if settings.get("per_first_class", False) else [None])}
    t_dp = time.perf_counter() - t1
    info.update(stage_kinds=len(R.kinds), group_kinds=sum(kd.pattern is not None for kd in R.kinds),
                dp_states=int(lattice * R.K * (R.end + 1) * len(runs)), build_s=round(t1 - t0 - t_detect, 4))
    plans = []
    for f, (final, ptr, _) in runs.items():
        ui, c = np.unravel_index(np.argmin(final), final.shape)
        if np.isfinite(final[ui, c]):
            stages = _backtrack(ptr, int(ui), int(c), R.end)
            plans.append((_expand(problem, bl, cls, R, stages, {}), float(final[ui, c])))
    if not plans:
        if problem.constraints.memory and (problem.param_bytes.sum() + _block_peak(problem, bl)
                                           > problem.capacity.sum()):
            raise _memory_error(problem, bl, cls)
        info.update(symmetry=False, reason="no contiguous pipeline of whole segments fits the devices "
                                           "(operator support or memory per device)")
        return None, info
    t2 = time.perf_counter()
    if thr and settings.get("replicate", True):
        best_u: dict[int, tuple[float, int, int]] = {}
        for f, (final, _, _) in runs.items():
            for ui in range(final.shape[0]):
                c = int(np.argmin(final[ui]))
                if np.isfinite(final[ui, c]) and (ui not in best_u or final[ui, c] < best_u[ui][0]):
                    best_u[ui] = (float(final[ui, c]), f, c)
        rate, parts = _replica_split({u: 1.0 / v[0] for u, v in best_u.items() if v[0] > 0},
                                     next(iter(runs.values()))[2])
        if len(parts) > 1:
            used: dict[int, int] = {}
            reps = tuple(_expand(problem, bl, cls, R, _backtrack(runs[best_u[ui][1]][1], ui, best_u[ui][2], R.end),
                                 used) for ui in parts)
            plans.append((Plan(reps[0].placement, reps[0].order, status="heuristic", replicas=reps), 1.0 / rate))
    best = None
    for plan, dp_value in [*plans, *(((_listed(p), v) for p, v in plans) if not thr else ())]:
        ev = evaluate(problem, plan)
        key = (not ev.feasible, ev.value(problem.objective))
        if best is None or key < best[0]:
            best = (key, plan, dp_value)
    (_, value), plan, dp_value = best
    t3 = time.perf_counter()
    reps = plan.replicas or (plan,)
    info.update(dp_value_s=dp_value, replicas=len(reps), pipelines=[_describe(problem, r, bl) for r in reps],
                detect_s=round(t_detect, 4), dp_s=round(t_dp, 4), expand_eval_s=round(t3 - t2, 4),
                reduce_total_s=round(t3 - t0, 4))
    log.info("symmetry: %d nodes -> %d blocks of %d nodes (+%d), %d devices -> %d classes; %s in %.3f s",
             problem.n, len(bl.blocks), bl.size, len(bl.prologue) + len(bl.epilogue), problem.D,
             len(cls.members), info["pipelines"], t3 - t0)
    return plan.with_(claimed=float(value), info=info), info


def _listed(plan: Plan) -> Plan:
    """The same placement with the evaluator's list-scheduling order (decreasing upward rank)."""
    if plan.replicas:
        reps = tuple(r.with_(order=None) for r in plan.replicas)
        return plan.with_(order=None, replicas=reps)
    return plan.with_(order=None)


def _describe(problem: Problem, plan: Plan, bl: Blocks) -> list[list]:
    """``[[devices, blocks], ...]`` in pipeline order (fractions where a block is split)."""
    out: list[list] = []
    for blk in bl.blocks:
        devs = "+".join(sorted({problem.devices[plan.placement[v]] for v in blk},
                               key=problem.devices.index))
        if len(devs.split("+")) == 1:
            for v in blk:
                d = problem.devices[plan.placement[v]]
                if not out or out[-1][0] != d:
                    out.append([d, 0])
                out[-1][1] += 1 / len(blk)
        else:
            if not out or out[-1][0] != devs:
                out.append([devs, 0])
            out[-1][1] += 1
    return [[d, round(x, 3)] for d, x in out]


@register("symmetry", "repeated blocks x identical devices: pipeline DP over device classes and groups, "
                      "data-parallel replicas; falls back to a full solver (after DiviML, Yahya et al. 2023)")
def solve(problem: Problem, settings: Settings) -> Plan:
    """The ``symmetry`` solver (see the module docstring)."""
    t0 = time.perf_counter()
    plan, info = reduce_and_solve(problem, settings)
    if plan is not None:
        return plan
    name = str(settings.get("fallback", "heft"))
    log.info("symmetry does not hold (%s); solving the full problem with %s", info.get("reason"), name)
    full = run_solver(problem, name, settings)
    info.update(fallback=name, fallback_s=round(time.perf_counter() - t0, 4))
    return full.with_(status="heuristic" if full.status in ("optimal", "optimal_coarse") else full.status,
                      info={**dict(full.info), "symmetry_info": info})
