"""Symmetry in a problem: repeated blocks of the graph (a chain of isomorphic layers) and classes of identical devices."""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from itertools import product

import networkx as nx
import numpy as np

from ...machine.problem import Problem

log = logging.getLogger(__name__)

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")  # the first all-digit component of a dotted path


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
    m = _INDEX.search(path)
    return None if m is None else (path[:m.start()], int(m.group(1)))


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
        if node.module_path:
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
    wa = np.asarray(which, dtype=np.int64)
    bv_, bw_ = wa[problem.edge_src], wa[problem.edge_dst]
    in_epi = np.zeros(n, dtype=bool)
    in_epi[list(epi)] = True
    if ((in_epi[problem.edge_src] & (bw_ >= 0)) | ((bv_ >= 0) & (bw_ >= 0) & (bw_ != bv_) & (bw_ != bv_ + 1))
            | ((bv_ >= 0) & (bw_ < 0) & (bv_ != L - 1))).any():  # name the first offending edge
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
    ins: list[list] = [[] for _ in range(L)]
    for k, (_, dsts) in enumerate(problem.in_tensors):
        for v in dsts:
            if which[v] >= 0:
                ins[which[v]].append((k, rel[v]))
    ins = [sorted(x) for x in ins]
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
