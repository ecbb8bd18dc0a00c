"""Symmetry: repeated blocks in the graph, identical devices in the spec, a reduced solve and a
polish on the full problem.

Large language models are a prologue (embedding, positions, mask), ``L`` identical
decoder layers and an epilogue (final norm, head); GPU servers hold several identical
GPUs. :func:`find_blocks` and :func:`device_classes` detect both, and the ``symmetry``
solver places the model as a pipeline of layer ranges over device classes by a small
exact dynamic programme instead of searching the full operator-level problem, expands
the answer to a plan for every node, and then polishes that plan on the full
operator-level problem with a short local search under a deterministic work budget.
Where the structure is not there (no repeated blocks, not a chain, too many device
classes) it falls back to a full solver.

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
*Main classes*: those whose time for one block is within ``main_ratio`` (default 2) of
the fastest class's; the others (a host CPU next to GPUs) are better used as helpers
for single operators than as pipeline stages or group members.

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
level by HEFT and by PEFT (``pattern_solvers``) on a group of main-class devices of one
server (a sub-problem with one block type and one server type; see :func:`_group_kinds`),
and a stage repeats it as often as memory allows, running its other blocks on one device;
this captures the intra-layer parallelism that a pipeline of single devices lacks. The
expanded plan runs every repetition in the order of the pattern's own schedule, so it
reproduces the DP's figure. Groups grow one device at a time only while that shortens the
pattern, and a group whose critical-path bound cannot beat a pattern that already holds
every block (allowing for what its anchor saves at the ends of the pipeline) is not solved.

*Replicas* (throughput): after the DP the best pipeline on every sub-multiset of the
devices is known; a second DP over the lattice splits the devices into data-parallel
replicas (throughputs add up, as in DESIGN.md).

**Polish** (:func:`_polish_select`). Stages are contiguous and use distinct devices, so
the DP cannot place single operators where they fit best (a launch-bound elementwise op
costs a host CPU about what it costs a GPU, a prologue's independent chains can run in
parallel on other devices). The candidates (the DP's best pipeline; for throughput also
the best pipeline on the main classes only, and the replica split) are therefore polished
on the full operator-level problem with the incremental engine of ``split``
(:mod:`.solvers._split_engine`: delta schedule, loads and memory; figures equal to the
evaluator's): for latency ``split``'s descent on the critical path (moves of nodes, runs
and of the reduced problem's units, reorders); for throughput the relief descent
(:func:`_relief_descent`: the bottleneck device's nodes to the devices that run them at
the least cost per unit of relief, then ``split``'s throughput descent), each replica on
its own devices. The budget is counted in the engine's work units (``polish_work``;
default 10 per node for latency, 150 per node for throughput, plus 5,000; ``split``'s
search uses 1,000 per node plus 500,000), so the same input and seed give the same plan;
``time_limit`` is only a safety cap. The candidates that start within 25% of the best
start get an even share of half the budget, the best of them after that the rest; the
result is graded by the evaluator and is never worse than the best unpolished candidate. Status ``"heuristic"``; ``info`` reports the
reduction (nodes and devices before and after, DP size, pattern sub-solves, times) and the
polish (candidates with their values before and after, work spent).

Settings extras: ``fallback`` (solver when symmetry does not hold, default ``"heft"``),
``replicate`` (default True), ``groups`` (latency group stages, default True),
``pattern_blocks`` (default (1,)), ``pattern_memory`` (fractions f: also solve patterns
for L/(p f) repetitions, default ()), ``pattern_solvers`` (default ("heft", "peft")),
``max_group`` (default 8), ``main_ratio`` (default 2), ``cut_factor`` (default 8),
``max_positions`` (default 4 per block; 480 for throughput without the polish),
``max_lattice`` (default 20000), ``per_first_class`` (price shared tensors per first
class; default False: the largest), ``polish`` (default True; False returns the best
expanded DP plan, graded by the evaluator, as before), ``polish_work``.
"""

from __future__ import annotations

import copy
import heapq
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
from .solvers._split_engine import State, Tables
from .solvers._split_modules import _memory_room
from .solvers._split_search import Budget, Scorer, latency_descent, throughput_descent, try_moves

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


def _local_signature(problem: Problem, nodes: list[int], ops: list[str]) -> tuple:
    rel = {v: r for r, v in enumerate(nodes)}
    pb, ob, T = problem.param_bytes, problem.output_bytes, problem.T
    vs = tuple((ops[v], float(pb[v]), float(ob[v]), T[v].tobytes()) for v in nodes)
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
    nodes = problem.graph.nodes
    for i, node in enumerate(nodes):
        k = _block_key(node.module_path)
        if k is not None:
            keyed.setdefault(k[0], {}).setdefault(k[1], []).append(i)
    ops = [node.op for node in nodes]
    prefixes = sorted((p for p in keyed if len(keyed[p]) >= 2),
                      key=lambda p: (-sum(len(v) for v in keyed[p].values()), p))
    if not prefixes:
        return None, "no repeated module (no module_path with a layer index)"
    reasons = []
    for prefix in prefixes:
        found, why = _chain(problem, prefix, keyed[prefix], cut_factor, max_positions, ops)
        if found is not None:
            return found, ""
        reasons.append(f"{prefix}: {why}")
    return None, "; ".join(reasons)


def _chain(problem: Problem, prefix: str, groups: dict[int, list[int]], cut_factor: float,
           max_positions: int | None, ops: list[str]) -> tuple[Blocks | None, str]:
    idxs = sorted(groups)
    local = {i: _local_signature(problem, groups[i], ops) for i in idxs}
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
    which = which.tolist()  # scalar access below
    rel = {v: r for nodes in blocks for r, v in enumerate(nodes)}
    after = [False] * n  # in a block, or has an ancestor in one
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
        at_cut = [float(cum[c]) for c in cuts]
        weight = [sum(c) for c in cross]
        for q in range(1, keep + 1):
            target = float(cum[-1]) * q / (keep + 1)
            taken = set(chosen)
            chosen.append(min((i for i in range(len(cuts)) if i not in taken),
                              key=lambda i: (abs(at_cut[i] - target), weight[i], i)))
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
    R = np.round(np.stack(cm, axis=-1), 15)  # (D, D, sizes)
    rt = [[tuple(R[d, e].tolist()) for e in range(D)] for d in range(D)]
    col = [hash((problem.T[:, d].tobytes(), float(problem.capacity[d]), d == problem.host)) for d in range(D)]
    colour = _relabel(col)
    while True:
        sig = [(colour[d], tuple(sorted((colour[e], rt[d][e], rt[e][d]) for e in range(D) if e != d)))
               for d in range(D)]
        new = _relabel(sig)
        if len(set(new)) == len(set(colour)):
            break
        colour = new
    while True:  # split classes whose pairwise transfer times are not constant
        groups = _groups(colour)
        bad = set()
        for a, b in product(range(len(groups)), repeat=2):
            vals = {rt[x][y] for x in groups[a] for y in groups[b] if x != y}
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
        self.prank = None             # group stages: rank of every pattern node in the pattern's schedule


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
    stats: dict = field(default_factory=dict)  # pattern sub-solves run and skipped

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
    kinds, stats = [], {}
    for c in range(K):
        t = ST[c][None, :] - ST[c][:, None]
        ok = upper & (need <= cap[rep[c]] * (1 + 1e-12)) & ((SB[c][None, :] - SB[c][:, None]) == 0)
        kinds.append(_Kind(tuple(int(x == c) for x in range(K)), c, np.where(ok, t, np.inf)))
    if additive and settings.get("groups", True):
        kinds += _group_kinds(problem, bl, cls, g, ut, mem, cap, settings, stats)
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
    return _Reduced(K, cls.sizes, U, g, kinds, link, shared, h_in, h_out, additive, stats)


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
                 settings: Settings, stats: dict) -> list[_Kind]:
    """Latency stages on a group of devices of one server (one server type, one block type).

    A pattern for ``p`` consecutive blocks (``p`` in ``pattern_blocks``, default 1) is placed
    at operator level by each of ``pattern_solvers`` on a sub-problem whose boundary input
    arrives at, and whose boundary output returns to, the group's anchor device (without
    memory limits, and for ``m`` in ``L / (p f)``, f in ``pattern_memory``, with the memory
    of ``m`` repetitions per device); every distinct pattern is a stage kind. A stage of
    ``m`` blocks repeats the pattern ``r`` times and runs the other ``m - r p`` blocks alone
    on one device of the anchor's class, ``r`` as large as memory allows
    (:func:`_mixed_costs`); the prologue / epilogue go on the stage's entry / exit device.
    Groups hold main-class devices (:func:`_main_classes`) and are anchored on their fastest
    class. Groups are enumerated by growing composition, per (server, anchor, solver), and
    a composition is not solved when it contains one after which growth stopped (a device
    stayed idle, adding the last device did not shorten the pattern by ``PATTERN_TOL``, or
    the solver was ``PATTERN_TOL`` behind another one), when another solver's pattern for
    it is within ``PATTERN_TOL`` of its critical-path bound, or when that bound cannot beat
    (by ``PATTERN_TOL``) an unconstrained pattern that holds every block plus what the
    anchor's class can save at the ends of the pipeline (inputs and prologue, epilogue and
    outputs). Servers are visited fastest first.
    """
    from .problem import Constraints
    from .solvers import SOLVERS

    K, L = len(cls.members), len(bl.blocks)
    U, E = L * g, L * g + 2
    fast = _main_classes(problem, bl, cls, float(settings.get("main_ratio", MAIN_RATIO)))
    per_block = ut[1:1 + g].sum(axis=0)
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
    solvers = tuple(settings.get("pattern_solvers", ("heft", "peft")))
    pro_p = problem.param_bytes[list(bl.prologue)].sum()
    epi_p = problem.param_bytes[list(bl.epilogue)].sum()
    pb_block = problem.param_bytes[list(bl.blocks[0])].sum()
    hp_, he_ = (k == 0).astype(int)[:, None], (k == E).astype(int)[None, :]
    nbc = np.clip(nb, 0, L)
    ok = (nb >= 1) & on_block[:, None] & on_block[None, :] & (k[None, :] > k[:, None])
    taus: dict = {}   # (configuration, u) -> latency of the pattern
    near: dict = {}   # (.., u) -> a pattern for u is within PATTERN_TOL of its critical-path bound
    cones: dict = {}  # configuration -> compositions u whose growth stops (no group containing u is solved)
    best_hold: dict = {}  # (p, anchor class) -> least latency of an unconstrained pattern holding every block
    host_d = problem.host
    entry = [sum(problem.comm(host_d, m[0], b) for b, _ in problem.in_tensors) + ut[0, c]
             for c, m in enumerate(cls.members)]
    leave = [sum(problem.comm(m[0], host_d, b) for _, b in problem.outputs) + ut[E - 1, c]
             for c, m in enumerate(cls.members)]

    def gain(a: int, aw: int) -> float:
        """The most a stage anchored on class ``a`` can save over one anchored on ``aw`` at the
        ends of the pipeline (model inputs and prologue, epilogue and outputs)."""
        return max(0.0, entry[aw] - entry[a]) + max(0.0, leave[aw] - leave[a])
    cps: dict = {}

    def cp(u) -> float:
        """Critical path of the pattern's blocks with every node on its fastest class of ``u``."""
        key_ = (blk_key, tuple(c for c in range(K) if u[c]))
        if key_ not in cps:
            tmin = problem.T[np.ix_(blk, [cls.members[c][0] for c in key_[1]])].min(axis=1)
            f = [0.0] * len(blk)
            for i, v in enumerate(blk):
                f[i] = tmin[i] + max((f[at[w]] for w in problem.preds[v] if w in at), default=0.0)
            cps[key_] = max(f, default=0.0)
        return cps[key_]

    solved = skipped = 0
    out, seen = [], set()
    for p in [int(x) for x in settings.get("pattern_blocks", (1,)) if 1 <= int(x) < L]:
        cg, blk = _block_problem(problem, bl, p)
        pb = problem.param_bytes[blk]
        blk_key, at = p, {int(v): i for i, v in enumerate(blk)}
        base = {False: Problem(cg, problem.spec, Objective.LATENCY, Constraints(memory=False), T=problem.T[blk])}
        for host, devs in sorted(by_host.items(), key=lambda hd: (min(per_block[cls.of[d]] for d in hd[1]), hd[0])):
            cnt = [sum(1 for d in devs if cls.of[d] == c) if c in fast else 0 for c in range(K)]
            for u in product(*[range(x + 1) for x in cnt]):
                if not 2 <= sum(u) <= max_group or (p, u) in seen:
                    continue
                seen.add((p, u))
                G = [d for c in range(K) for d in [x for x in devs if cls.of[x] == c][:u[c]]]
                slot = {d: (cls.of[d], [y for y in G if cls.of[y] == cls.of[d]].index(d)) for d in G}
                present = [c for c in range(K) if u[c]]
                for a in [c for c in present if per_block[c] <= per_block[present].min() * (1 + 1e-9)]:
                    x = next(d for d in G if cls.of[d] == a)
                    fits = set()
                    for m in _targets(settings.get("pattern_memory", ()), L, p):
                        for solver in solvers:
                            if solver in fits:  # its unconstrained pattern already holds every block
                                continue
                            cfg = (p, host, a, solver, m)
                            if near.get((p, host, a, m, u), False):
                                skipped += 1  # an earlier solver's pattern is within PATTERN_TOL of the bound
                                continue
                            if any(all(ui_ >= wi_ for ui_, wi_ in zip(u, w)) for w in cones.get(cfg, ())) or (
                                    cp(u) >= min((tw + gain(a, aw) for (p_, aw), tw in best_hold.items() if p_ == p),
                                                 default=math.inf) * (1 - PATTERN_TOL)):
                                skipped += 1  # see the docstring: the group does not grow past this, or
                                continue      # cannot beat a pattern that holds every block
                            T = problem.T[blk].copy()
                            T[:, [d for d in range(problem.D) if d not in G]] = np.inf
                            if (m is not None) not in base:
                                base[True] = base[False].with_objective(Objective.LATENCY, Constraints(memory=True))
                            sub = copy.copy(base[m is not None])  # the sub-problem with these devices
                            sub.T, sub.supported, sub.host = T, np.isfinite(T), x
                            if m is not None:
                                sub.capacity = np.maximum(cap - mem["act"] * p, 0.0) / m
                            plan = SOLVERS[solver].fn(sub, Settings(seed=settings.seed))
                            solved += 1
                            busy = set(int(d) for d in plan.placement)
                            ev_sub = evaluate(sub, plan)
                            tau = ev_sub.latency
                            taus[(cfg, u)] = tau
                            near[(p, host, a, m, u)] = tau <= (1 + PATTERN_TOL) * cp(u)
                            if any(d not in busy and d != x for d in G) or any(
                                    (cfg, _minus(u, c)) in taus and tau >= taus[(cfg, _minus(u, c))] * (1 - PATTERN_TOL)
                                    for c in range(K)):
                                cones.setdefault(cfg, []).append(u)
                            key = (p, u, a, plan.placement)
                            if key in seen:
                                continue
                            seen.add(key)
                            load = np.bincount(np.asarray(plan.placement), weights=pb, minlength=problem.D)
                            # repetitions that fit, for a stage holding the prologue (j = 0) and/or the epilogue (k = E)
                            same = [i for i, d in enumerate(G) if cls.of[d] == a]
                            cost, nrep, nsolo = _mixed_costs(
                                cap[G] - mem["act"] * p, load[G], G.index(x), same, extra_j[0] + pro_p,
                                extra_k[E] + epi_p, L, p, tau, float(ut[1:1 + g, a].sum()), float(pb_block), hop[a])
                            if m is None and nrep[1, 1, L] * p >= L:
                                fits.add(solver)
                                best_hold[(p, a)] = min(best_hold.get((p, a), math.inf), tau)
                            t = cost[hp_, he_, nbc] + np.where(k == 0, ut[0, a], 0.0)[:, None] \
                                + np.where(k == E, ut[E - 1, a], 0.0)[None, :]
                            kd = _Kind(tuple(u), a, np.where(ok & np.isfinite(t), t, np.inf),
                                       tuple(slot[int(d)] for d in plan.placement), float(tau))
                            kd.reps = np.where(ok, nrep[hp_, he_, nbc], 0)
                            kd.solo = np.where(ok, nsolo[hp_, he_, nbc], 0)
                            kd.group = tuple(slot[d] for d in G)
                            seq = sorted(range(len(blk)), key=lambda i: (ev_sub.start[i], ev_sub.finish[i], i))
                            prank = [0] * len(blk)
                            for r_, i in enumerate(seq):
                                prank[i] = r_
                            kd.prank = tuple(prank)
                            out.append(kd)
                        done = {sv: taus[((p, host, a, sv, m), u)] for sv in solvers
                                if ((p, host, a, sv, m), u) in taus}
                        for sv, tv in done.items():  # a solver clearly behind another one here stops growing
                            if tv > min(done.values()) * (1 + PATTERN_TOL):
                                cones.setdefault((p, host, a, sv, m), []).append(u)
    stats.update(pattern_solves=solved, pattern_solves_skipped=skipped)
    return out


def _minus(u: tuple[int, ...], c: int) -> tuple[int, ...]:
    return tuple(x - (i == c) for i, x in enumerate(u))


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
    fit = np.all(np.array(vecs)[:, None, :] + np.array([kd.u for kd in R.kinds])[None, :, :] <= sz, axis=2).tolist()
    cols = np.arange(E + 1)
    for ui in range(N):
        if not np.isfinite(V[ui]).any():
            continue
        entering: dict[int, tuple] = {}  # anchor -> (entry values at each cut, their previous anchors)
        for s, kd in enumerate(R.kinds):
            if not fit[ui][s]:
                continue
            a = kd.anchor
            if a not in entering:
                if R.additive:
                    W = V[ui] + R.link[:, a, :]
                else:
                    W = np.maximum(V[ui], R.link[:, a, :] + (R.shared[f, a] if f is not None else R.shared[:, a].max()))
                bc = W.argmin(axis=0)
                entering[a] = (W[bc, cols], bc)
            w, bc = entering[a]
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
    prio = [float(v) for v in range(problem.n)]  # priority list: the index, but patterns in their own order
    patterned = False
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
                    pbk = len(kd.pattern) // bl.size
                    r = (q - first_block) % pbk
                    pl[list(blk)] = [taken[c][i] for c, i in kd.pattern[r * bl.size:(r + 1) * bl.size]]
                    if kd.prank is not None:  # the pattern's own schedule order inside the repetition
                        patterned = True
                        f_rep = min(bl.blocks[q - r + i][0] for i in range(pbk))
                        P = len(kd.pattern)
                        for jj, v in enumerate(blk):
                            prio[v] = f_rep + (1.0 + kd.prank[r * bl.size + jj]) / (P + 2.0)
    order = [[] for _ in range(problem.D)]
    for i in (_priority_order(problem, prio) if patterned else range(problem.n)):
        order[pl[i]].append(i)
    return Plan(tuple(int(x) for x in pl), tuple(tuple(o) for o in order), status="heuristic")


def _priority_order(problem: Problem, prio) -> list[int]:
    """The topological order that takes the ready node of least ``(prio, index)`` first (Kahn)."""
    indeg = [len(p) for p in problem.preds]
    heap = [(prio[v], v) for v in range(problem.n) if not indeg[v]]
    heapq.heapify(heap)
    out = []
    while heap:
        _, v = heapq.heappop(heap)
        out.append(v)
        for w in problem.succs[v]:
            indeg[w] -= 1
            if not indeg[w]:
                heapq.heappush(heap, (prio[w], w))
    return out


def _replica_split(rates: dict[int, float], vecs) -> tuple[float, list[int]]:
    """Max total throughput over splits of the devices into replicas (sub-multisets of classes).

    ``vecs[i]`` is lattice point ``i`` (mixed radix, as in :func:`_dp`), so the rest of ``v`` after
    taking ``u <= v`` is the point ``v - u`` at index ``i_v - i_u``."""
    V = np.array(vecs)
    items = sorted(rates.items())
    ui_arr = np.array([u for u, _ in items], dtype=np.int64)
    le = np.all(V[ui_arr][None, :, :] <= V[:, None, :], axis=2) if items else np.zeros((len(vecs), 0), bool)
    F = [0.0] * len(vecs)
    choice: list[int | None] = [None] * len(vecs)
    for vi in range(len(vecs)):
        for k in np.flatnonzero(le[vi]).tolist():
            ui, rate = items[k]
            val = rate + F[vi - ui]
            if val > F[vi] * (1 + 1e-12):
                F[vi], choice[vi] = val, ui
    parts, vi = [], len(vecs) - 1
    while choice[vi] is not None:
        parts.append(choice[vi])
        vi -= choice[vi]
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


# ---- polish on the full problem ---------------------------------------------------------------------
MAIN_RATIO = 2.0           # main classes: within this factor of the fastest class's time for a block
POLISH_PER_NODE = {"latency": 10, "throughput": 150}  # default polish budget: work units per node ...
POLISH_BASE = 5_000        # ... plus this (split's search: 1000 per node + 500,000)
PATTERN_TOL = 0.005        # groups grow while their pattern's latency improves, and is not within, this much
RACE_SHARE = 0.5           # of the polish budget, shared evenly by the candidates before the best gets the rest
RACE_CUT = 1.25            # candidates starting this much worse than the best start are not polished
FALLBACK_SHARE = 0.25      # of the budget left, for split's throughput descent when the relief stalls
RELIEF_TRIES = 64          # relief moves tried per bottleneck before falling back to split's descent


def _main_classes(problem: Problem, bl: Blocks, cls: DeviceClasses, ratio: float) -> list[int]:
    """Classes whose time for one block is within ``ratio`` of the fastest class's."""
    blk = list(bl.blocks[0])
    t = np.array([problem.T[blk, m[0]].sum() for m in cls.members])
    fin = np.isfinite(t)
    if not fin.any():
        return list(range(len(cls.members)))
    return [c for c in range(len(cls.members)) if fin[c] and t[c] <= ratio * t[fin].min()]


def _units_as_modules(problem: Problem, bl: Blocks) -> tuple[list[list[int]], list[int]]:
    """The reduced problem's units (prologue, every block's segments, epilogue) as the modules
    of the polish's part moves; nodes outside them (none here) form singletons."""
    bounds = [0, *bl.cuts, bl.size]
    mods = [list(bl.prologue)] if bl.prologue else []
    for blk in bl.blocks:
        mods += [list(blk[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    if bl.epilogue:
        mods.append(list(bl.epilogue))
    mod_of = [-1] * problem.n
    for k, m in enumerate(mods):
        for v in m:
            mod_of[v] = k
    for v in range(problem.n):
        if mod_of[v] < 0:
            mod_of[v] = len(mods)
            mods.append([v])
    return mods, mod_of


def _relief_descent(st, score, budget, mod_of=None, mods=None) -> tuple:
    """Throughput descent that relieves the bottleneck device by its cheapest moves first.

    A contiguous pipeline leaves a device that is fast only on some operators (a host CPU
    next to GPUs: launch-bound elementwise ops cost it about what they cost a GPU) either
    idle or holding a stage of mixed operators. Each step takes the bottleneck device
    ``d`` and tries to move one of its nodes ``v`` to another device ``b`` that stays
    below the bottleneck, in increasing order of ``T[v, b] / T[v, d]`` (the work a move
    adds per unit it removes; the greedy order of the fractional load-balancing LP), at
    most :data:`RELIEF_TRIES` per step, keeping the first that improves the score
    (leximax of the loads, with links and memory; :class:`~.solvers._split_search.Scorer`).
    When no such move helps (or a link is the bottleneck), ``split``'s own throughput
    descent runs with ``FALLBACK_SHARE`` of the budget left; the loop stops when neither
    improves (by :func:`_gains`). Every scanned node counts one work unit. Returns the
    final score.
    """
    t = st.t
    D = t.D
    Tm = np.where(t.mask, t.p.T, np.inf)
    free = t.p.group_of < 0
    best = score(st)
    while not budget.out(st):
        loads = st.loads
        r = max(range(t.R), key=loads.__getitem__)
        improved = False
        if r < D and st.seq[r]:
            top = loads[r]
            nodes = np.array(st.seq[r])
            Tn = Tm[nodes]
            g = Tn[:, r]
            new = np.asarray(loads[:D])[None, :] + Tn
            valid = (new < top) & ((g > 0) & free[nodes])[:, None]
            valid[:, r] = False
            st.work += nodes.size
            vi, bi = np.nonzero(valid)
            if vi.size:
                ratio = Tn[vi, bi] / g[vi]
                pick = np.lexsort((bi, nodes[vi], new[vi, bi], ratio))[:RELIEF_TRIES]
                for k in pick:
                    v, b = int(nodes[vi[k]]), int(bi[k])
                    kept, best = try_moves(st, [(v, b, st.pos[v])], score, best)
                    if kept:
                        improved = True
                        break
                    if budget.out(st):
                        return best
        if not improved:
            before = st.work
            cap = Budget(before + FALLBACK_SHARE * max(0.0, budget.limit - before), budget.deadline)
            s = throughput_descent(st, score, cap, mod_of, mods)
            if st.work == before or not _gains(s, best):
                break
            best = s
    return best


def _gains(a: tuple, b: tuple) -> bool:
    """Throughput score ``a`` strictly better than ``b``: violation, then period (relative
    tolerance), then the sorted loads with an absolute tolerance at the scale of the period
    (loads that cancel out to about -1e-19 must not read as an improvement)."""
    if abs(a[0] - b[0]) > 1e-12:
        return a[0] < b[0]
    if abs(a[1] - b[1]) > 1e-12 * max(abs(b[1]), 1e-300):
        return a[1] < b[1]
    tol = 1e-9 * max(abs(b[1]), 1e-300)
    for p, q in zip(a[2], b[2]):
        if abs(p - q) > tol:
            return p < q
    return False


def _positions(problem: Problem, plan: Plan) -> list[float]:
    """Priority positions whose restriction to every device is the plan's order: a topological
    order of the data edges plus each device's chain (Kahn, least index first)."""
    n = problem.n
    nxt = [-1] * n
    indeg = [len(p) for p in problem.preds]
    for o in plan.order:
        for a, b in zip(o, o[1:]):
            nxt[a] = b
            indeg[b] += 1
    heap = [v for v in range(n) if not indeg[v]]
    heapq.heapify(heap)
    pos = [0.0] * n
    k = 0
    while heap:
        v = heapq.heappop(heap)
        pos[v] = float(k)
        k += 1
        for w in (*problem.succs[v], nxt[v]):
            if w >= 0:
                indeg[w] -= 1
                if not indeg[w]:
                    heapq.heappush(heap, w)
    return pos


def _masked(tab, devs: tuple[int, ...]):
    """``tab`` restricted to the devices ``devs`` (a replica's group): a shallow copy with its own
    mask and allowed-device lists; every other table of :class:`Tables` is independent of the mask."""
    out = copy.copy(tab)
    keep = [False] * tab.D
    for d in devs:
        keep[d] = True
    out.mask = tab.mask & np.array(keep)[None, :]
    out.allowed = [[d for d in a if keep[d]] for a in tab.allowed]
    out._qs = None
    return out


def _start(problem: Problem, plan: Plan, tab, score):
    """The incremental state of one pipeline, in the plan's own order (index order, patterns in the
    order of their schedule), and its score."""
    lat = problem.objective is Objective.LATENCY
    sched = lat or problem.constraints.latency_ceiling is not None
    track = not lat or not _memory_room(problem) or problem.constraints.throughput_floor is not None
    indexed = all(all(a < b for a, b in zip(o, o[1:])) for o in plan.order)
    st = State(tab, plan.placement, range(problem.n) if indexed else _positions(problem, plan), schedule=sched,
               loads=track)
    st.work = 0
    return st, score(st)


def _descend(problem: Problem, st, score, budget, mods, mod_of) -> tuple:
    """The polish of one pipeline: ``split``'s latency descent (critical-path moves, runs, part
    moves of the reduced problem's units, reorders), or for throughput the relief descent
    (:func:`_relief_descent`, which falls back on ``split``'s throughput descent)."""
    if problem.objective is Objective.LATENCY:
        return latency_descent(st, score, budget, mod_of, mods)
    return _relief_descent(st, score, budget, mod_of, mods)


def _combined(problem: Problem, parts) -> tuple[float, float]:
    """``(violation, value)`` of a candidate from its parts' scores (replicas: throughputs add up)."""
    viol = sum(p["score"][0] for p in parts)
    if problem.objective is Objective.LATENCY:
        return viol, parts[0]["score"][1]
    rate = sum(1.0 / p["score"][1] if p["score"][1] > 0 else math.inf for p in parts)
    return viol, (1.0 / rate if rate > 0 else math.inf)


def _polish_select(problem: Problem, settings: Settings, bl: Blocks, cls: DeviceClasses, cands,
                   deadline: float):
    """Polish the candidates (the DP's pipelines, the replica split) on the full problem and
    return the best (see the module docstring): the candidates that start within ``RACE_CUT`` of
    the best start share ``RACE_SHARE`` of the budget evenly, the best of them by the incremental
    figures gets the rest; the winner is graded by the evaluator. Never worse than the best
    unpolished candidate."""
    t0 = time.perf_counter()
    work = float(settings.get("polish_work", POLISH_PER_NODE[problem.objective.value] * problem.n + POLISH_BASE))
    score = Scorer(problem, check_memory=not _memory_room(problem))
    mods, mod_of = _units_as_modules(problem, bl)
    full = Tables(problem)
    single: dict[int, tuple] = {}  # class -> score of a replica on one device of it (all alike)
    entries = []
    for label, plan, dp_value in cands:
        parts = []
        for r in plan.replicas or (plan,):
            devs = tuple(sorted(set(int(x) for x in r.placement)))
            if plan.replicas and len(devs) == 1:  # nothing to move within a one-device group
                c = cls.of[devs[0]]
                if c not in single:
                    single[c] = score(State(full, r.placement, range(problem.n), schedule=False))
                parts.append({"plan": r, "state": None, "score": single[c], "devs": devs})
                continue
            tab = _masked(full, devs) if plan.replicas else full
            st, s0 = _start(problem, r, tab, score)
            parts.append({"plan": r, "state": st, "score": s0, "devs": devs})
        entries.append({"label": label, "plan": plan, "dp_value": dp_value, "parts": parts,
                        "start": _combined(problem, parts), "work": 0.0})

    def run(e: dict, amount: float) -> None:
        movable = [p for p in e["parts"] if p["state"] is not None]
        size = sum(len(p["devs"]) for p in movable)
        for p in movable:
            st = p["state"]
            before = st.work
            p["score"] = _descend(problem, st, score, Budget(before + amount * len(p["devs"]) / size, deadline),
                                  mods, mod_of)
            e["work"] += st.work - before

    lead = min(e["start"] for e in entries)
    racing = [e for e in entries if e["start"][0] <= lead[0] + 1e-12 and e["start"][1] <= RACE_CUT * lead[1]]
    race = len(racing) > 1 and RACE_SHARE < 1
    for e in racing:
        run(e, work * (RACE_SHARE if race else 1.0) / len(racing))
    best = min(racing, key=lambda e: (_combined(problem, e["parts"]), entries.index(e)))
    if race:
        run(best, work - sum(e["work"] for e in entries))
    parts = [p["state"].plan(status="heuristic") if p["state"] is not None else p["plan"] for p in best["parts"]]
    out = parts[0] if not best["plan"].replicas else Plan(parts[0].placement, parts[0].order, status="heuristic",
                                                           replicas=tuple(parts))
    ev = evaluate(problem, out)
    viol, value = _combined(problem, best["parts"])
    if abs(ev.value(problem.objective) - value) > 1e-9 * max(value, 1e-30) or ev.feasible != (viol <= 1e-12):
        log.warning("symmetry: polished figures differ from the evaluator's (%.6g vs %.6g); grading the "
                    "unpolished candidates", value, ev.value(problem.objective))
        plan, value, dp_value, info = _plain_select(problem, cands)
        return plan, value, dp_value, {**info, "polish_mismatch": True}
    tried = [{"candidate": e["label"], "dp_value_s": e["dp_value"], "start_value_s": e["start"][1],
              "polished_value_s": _combined(problem, e["parts"])[1], "work": e["work"]} for e in entries]
    return out, ev.value(problem.objective), best["dp_value"], {
        "polished": True, "polish_work": sum(e["work"] for e in entries), "polish_budget": work,
        "polish_s": round(time.perf_counter() - t0, 4), "candidates": tried, "chosen": best["label"],
        "unpolished_value_s": min(e["start"][1] for e in entries if e["start"][0] <= 1e-12)
        if any(e["start"][0] <= 1e-12 for e in entries) else None}


def reduce_and_solve(problem: Problem, settings: Settings) -> tuple[Plan | None, dict]:
    """The reduced solve, its expansion and the polish (see the module docstring).

    Parameters
    ----------
    problem : Problem
    settings : Settings

    Returns
    -------
    plan : Plan or None
        None when symmetry does not hold (no chain of identical blocks, too many device
        classes, no contiguous pipeline that fits).
    info : dict
        The reduction (and the reason when ``plan`` is None).

    Raises
    ------
    InfeasibleError
        When the model's parameters and activations exceed the memory of all devices.
    """
    t0 = time.perf_counter()
    thr = problem.objective is Objective.THROUGHPUT
    polish = bool(settings.get("polish", True))
    bl, why = find_blocks(problem, float(settings.get("cut_factor", 8.0)),
                          settings.get("max_positions", 480 if thr and not polish else None))
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
    info.update(stage_kinds=len(R.kinds), group_kinds=sum(kd.pattern is not None for kd in R.kinds), **R.stats,
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
    cands = [("dp", plan, value) for plan, value in plans]
    if thr:
        best_u: dict[int, tuple[float, int, int]] = {}
        for f, (final, _, _) in runs.items():
            for ui in range(final.shape[0]):
                c = int(np.argmin(final[ui]))
                if np.isfinite(final[ui, c]) and (ui not in best_u or final[ui, c] < best_u[ui][0]):
                    best_u[ui] = (float(final[ui, c]), f, c)
        vecs = next(iter(runs.values()))[2]
        main = _main_classes(problem, bl, cls, float(settings.get("main_ratio", MAIN_RATIO)))
        if len(main) < R.K:  # the best pipeline on the fast classes only: the polish fills the others
            on_main = [ui for ui in best_u if not any(vecs[ui][c] for c in range(R.K) if c not in main)]
            if on_main:
                ui = min(on_main, key=lambda u: (best_u[u][0], u))
                if best_u[ui][0] > min(v for _, _, v in cands) * (1 + 1e-12):
                    f_, c_ = best_u[ui][1], best_u[ui][2]
                    cands.append(("dp-main", _expand(problem, bl, cls, R, _backtrack(runs[f_][1], ui, c_, R.end), {}),
                                  best_u[ui][0]))
        if settings.get("replicate", True):
            rate, parts = _replica_split({u: 1.0 / v[0] for u, v in best_u.items() if v[0] > 0}, vecs)
            if len(parts) > 1:
                used: dict[int, int] = {}
                reps = tuple(_expand(problem, bl, cls, R, _backtrack(runs[best_u[ui][1]][1], ui, best_u[ui][2],
                                                                     R.end), used) for ui in parts)
                cands.append(("replicas", Plan(reps[0].placement, reps[0].order, status="heuristic", replicas=reps),
                              1.0 / rate))
    deadline = t0 + (settings.time_limit if settings.time_limit is not None else math.inf)
    if polish:
        plan, value, dp_value, pinfo = _polish_select(problem, settings, bl, cls, cands, deadline)
    else:
        plan, value, dp_value, pinfo = _plain_select(problem, cands)
    t3 = time.perf_counter()
    reps = plan.replicas or (plan,)
    info.update(dp_value_s=dp_value, replicas=len(reps), pipelines=[_describe(problem, r, bl) for r in reps],
                detect_s=round(t_detect, 4), dp_s=round(t_dp, 4), expand_eval_s=round(t3 - t2, 4),
                reduce_total_s=round(t3 - t0, 4), **pinfo)
    log.info("symmetry: %d nodes -> %d blocks of %d nodes (+%d), %d devices -> %d classes; %s in %.3f s",
             problem.n, len(bl.blocks), bl.size, len(bl.prologue) + len(bl.epilogue), problem.D,
             len(cls.members), info["pipelines"], t3 - t0)
    return plan.with_(claimed=float(value), info=info), info


def _plain_select(problem: Problem, cands) -> tuple[Plan, float, float, dict]:
    """The best candidate by the evaluator (latency: also with the list-scheduling order)."""
    thr = problem.objective is Objective.THROUGHPUT
    best = None
    for _, plan, dp_value in [*cands, *(((k, _listed(p), v) for k, p, v in cands) if not thr else ())]:
        ev = evaluate(problem, plan)
        key = (not ev.feasible, ev.value(problem.objective))
        if best is None or key < best[0]:
            best = (key, plan, dp_value)
    (_, value), plan, dp_value = best
    return plan, value, dp_value, {"polished": False}


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
                      "data-parallel replicas, polished on the full problem; falls back to a full solver "
                      "(after DiviML, Yahya et al. 2023)")
def solve(problem: Problem, settings: Settings) -> Plan:
    """The ``symmetry`` solver: reduced DP, expansion and polish (see the module docstring).

    Parameters
    ----------
    problem : Problem
    settings : Settings
        ``seed`` and ``time_limit`` (a safety cap; the polish is budgeted in work units) and
        the extras listed in the module docstring.

    Returns
    -------
    Plan
        Status ``"heuristic"``, ``claimed`` equal to the evaluator's figure; ``info`` reports
        the reduction and the polish, or (``symmetry_info``) why the fallback solver ran.
    """
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
