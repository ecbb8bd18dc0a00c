"""Local search of the ``split`` heuristic on the incremental :class:`~.engine.State`.

**Score.** Lexicographic ``(violation, objective, tie-break)``: ``violation`` sums the
relative excess of memory peaks (exact, only checked where the conservative proxy
exceeds a capacity), of the period over a throughput floor and of the latency over a
ceiling (0 for a feasible plan); the objective is the latency or the period; the
tie-break is the sum of finish times (latency: moves that start work earlier open room
for later ones) or the loads sorted in decreasing order (throughput: leximax).

**Latency** (:func:`latency_descent`): first-improvement descent over moves of the nodes
of the critical path (recomputed after every accepted move), with don't-look bits:
a node to another device at the insertion position (before the first node there that
would finish after its inputs arrive), the maximal run of consecutive critical nodes
on its device (up to ``RUN`` either side) to another device, its module's nodes on its
device (up to ``PART``) to another device, and a reorder before the device predecessor
that delays it. A tried move is abandoned as soon as some node provably pushes the
latency past the best (:meth:`State.apply` with ``cutoff``).

**Throughput** (:func:`throughput_descent`): moves off the bottleneck resource: nodes of
the bottleneck device (heaviest first) to other devices, swaps of a heavy node there
with a lighter node elsewhere, prefixes and suffixes of its nodes in topological order
(stage-boundary shifts of a pipeline, doubling sizes), its part of each module; for a
bottleneck link, the producer of a transfer on it to its consumers' device and the
consumers to the producer's device. :func:`chain_polish` then moves work along the pipeline:
the best improving stage-shift chain (:func:`.blocks.shift_chains`, an ejection chain
of boundary shifts from the bottleneck to the least loaded stage) while one improves.

**Iterated local search** (:func:`iterated_search`; Lourenco, Martin and Stutzle,
"Iterated local search", 2003): descend, kick (1 to 3 random critical nodes to random
devices; sometimes a run of critical nodes, or two devices trading their nodes), descend
again, keep the best. All budgets count :attr:`State.work`; the wall-clock deadline is
only a safety cap, and a stop request (Ctrl-C, :func:`partitioner.progress.stop_requested`)
ends every budget at once (the state is always at its best plan between moves).
"""

from __future__ import annotations

import random

from .blocks import block_move as _block_move
from .blocks import shift_chains
from .blocks import unit as _unit
from .engine import State, _between
from .score import _REL, Budget, Scorer, better

WALK = 0.0  # accepting worse local optima did not help in our runs
WALK_RESET = 10
KICK_SWAP = 0.15
KICK_RUN = 0.2
RUN = 8     # a run reaches this many critical nodes either side of the node
PART = 32   # largest module part moved as a block


def try_moves(st: State, moves: list, score: Scorer, best: tuple) -> tuple[bool, tuple]:
    """Apply ``moves``; keep them if the score improves on ``best``, else undo.

    Returns ``(kept, new_best)``.
    """
    st.apply(moves)
    s = score(st)
    if better(s, best):
        st.commit()
        return True, s
    st.undo()
    return False, best


def _fits(st: State, nodes: list[int], b: int) -> bool:
    mask = st.t.mask
    return all(mask[x, b] for x in nodes)


def _single(st: State, v: int, b: int):
    if st.t.group_of[v] >= 0:
        return _block_move(st, [v], b)
    q = st.insertion_pos(v, b)
    if q is None:
        st.renumber()
        q = st.insertion_pos(v, b)
    return None if q is None else [(v, b, q)]


# ---- latency --------------------------------------------------------------------------------
def _lat_candidates(st: State, v: int, path: list[int], idx: int, mod_of, mods):
    t = st.t
    a = st.pl[v]
    for b in t.allowed[v]:
        if b != a:
            m = _single(st, v, b)
            if m:
                yield m
    i, j = idx, idx
    while i > 0 and st.pl[path[i - 1]] == a and idx - i < RUN:
        i -= 1
    while j + 1 < len(path) and st.pl[path[j + 1]] == a and j - idx < RUN:
        j += 1
    run = path[i:j + 1]
    if len(run) > 1:
        for b in range(t.D):
            if b != a and _fits(st, [x for r in run for x in _unit(st, r)], b):
                yield _block_move(st, run, b)
    if mod_of is not None:
        part = [x for x in mods[mod_of[v]] if st.pl[x] == a]
        if len(run) < len(part) <= PART:
            for b in range(t.D):
                if b != a and _fits(st, [x for r in part for x in _unit(st, r)], b):
                    yield _block_move(st, part, b)
    w = st.prv[v]
    if w >= 0 and st.finish[w] == st.start[v] and t.group_of[v] < 0 and w not in t.preds[v]:
        lo, _ = st.window(v)
        if lo < st.pos[w]:
            z = st.prv[w]
            left = max(lo, st.pos[z]) if z >= 0 else lo
            q = _between(left, st.pos[w])
            if q is not None:
                yield [(v, a, q)]


def latency_descent(st: State, score: Scorer, budget: Budget, mod_of=None, mods=None,
                    frozen: set[int] | None = None) -> tuple:
    """First-improvement descent on critical-path moves; returns the final score.
    Nodes in ``frozen`` are not moved (tabu after a kick)."""
    best = score(st)
    dont: set[int] = set(frozen or ())
    frozen = frozen or set()
    t = st.t
    while not budget.out(st):
        path = st.critical_path()[::-1]
        improved = False
        for idx, v in enumerate(path):
            if v in dont:
                continue
            for moves in _lat_candidates(st, v, path, idx, mod_of, mods):
                if frozen and any(x in frozen for x, _, _ in moves):
                    continue
                cut = best[1] * (1 + _REL) if score.lat and best[0] == 0 else None
                if not st.apply(moves, cut):
                    st.undo()
                    if budget.out(st):
                        return best
                    continue
                s = score(st)
                if better(s, best):
                    st.commit()
                    best = s
                    improved = True
                    for x, _, _ in moves:
                        dont.discard(x)
                        dont.difference_update(t.preds[x])
                        dont.difference_update(t.succs[x])
                    dont.update(frozen)
                    break
                st.undo()
                if budget.out(st):
                    return best
            if improved:
                break
            dont.add(v)
        if not improved:
            break
    return best


def kick(st: State, rng: random.Random, strength: int) -> None:
    """The perturbation of the iterated search, accepted whatever it costs: usually
    ``strength`` random critical nodes to random other devices (insertion positions);
    one time in KICK_SWAP the nodes of two devices trade places (where both may run
    them: devices of similar speed but different links), one time in KICK_RUN a run of
    consecutive critical nodes on one device moves to another device."""
    path = st.critical_path()
    if not path:
        return
    t = st.t
    r = rng.random()
    if r < KICK_SWAP and t.D >= 2:
        a, b = rng.sample(range(t.D), 2)
        moves = []
        for x in st.seq[a] + st.seq[b]:
            y = b if st.pl[x] == a else a
            if t.group_of[x] < 0 and t.mask[x, y]:
                moves.append((x, y, st.pos[x]))
        if moves:
            st.apply(moves)
            st.commit()
        return
    if r < KICK_SWAP + KICK_RUN:
        path = path[::-1]
        i = rng.randrange(len(path))
        a = st.pl[path[i]]
        j = i
        while j + 1 < len(path) and st.pl[path[j + 1]] == a and j - i < 2 * RUN:
            j += 1
        run = path[i:j + 1]
        devs = [b for b in range(t.D) if b != a and _fits(st, [y for x in run for y in _unit(st, x)], b)]
        if devs:
            st.apply(_block_move(st, run, rng.choice(devs)))
            st.commit()
        return
    for _ in range(strength):
        v = rng.choice(path)
        devs = [b for b in t.allowed[v] if b != st.pl[v]]
        if not devs:
            continue
        m = _single(st, v, rng.choice(devs))
        if m and all(t.mask[x, b] for x, b, _ in m):
            st.apply(m)
            st.commit()


def iterated_search(st: State, score: Scorer, budget: Budget, rng: random.Random, mod_of=None, mods=None,
                    descent=None, perturb=None) -> tuple:
    """Iterated local search (Lourenco, Martin and Stutzle 2003): descend, then repeatedly
    kick (1 to 3 random moves) and descend again, keeping the best plan; a worse local
    optimum is dropped (the state goes back to the best). The state ends at the best."""
    descent = descent or latency_descent
    perturb = perturb or kick
    best = descent(st, score, budget, mod_of, mods)
    snap = st.snapshot()
    cur = best
    rounds = stale = 0
    while not budget.out(st):
        rounds += 1
        perturb(st, rng, 1 + rounds % 3)
        s = descent(st, score, budget, mod_of, mods)
        if better(s, best):
            best, snap, cur, stale = s, st.snapshot(), s, 0
            continue
        stale += 1
        if (WALK > 0 and stale % WALK_RESET and s[0] <= cur[0]
                and s[1] <= cur[1] * (1 + WALK)):
            cur = s  # accept a slightly worse local optimum (random walk), back to the best now and then
        else:
            st.rebuild(*snap)
            cur = best
    if st.snapshot() != snap:
        st.rebuild(*snap)
    return best


# ---- throughput -------------------------------------------------------------------------------
def _thr_candidates(st: State, mod_of, mods):
    t = st.t
    loads = st.loads
    r = max(range(t.R), key=loads.__getitem__)
    pl = st.pl
    if r < t.D:
        d = r
        nodes = st.seq[d]
        st.work += 2 * len(nodes)
        heavy = sorted(nodes, key=lambda v: (-t.T[v][d], v))
        for v in heavy[:48]:
            for b in t.allowed[v]:
                if b != d:
                    yield _block_move(st, [v], b)
        # swaps: a heavy node of the bottleneck for a lighter one elsewhere (balancing)
        for v in heavy[:12]:
            for b in t.allowed[v]:
                if b == d:
                    continue
                light = sorted((w for w in st.seq[b] if t.mask[w, d] and t.T[w][d] < t.T[v][d]),
                               key=lambda w: (t.T[w][d], w))[:6]
                st.work += len(st.seq[b])
                for w in light:
                    yield _block_move(st, [v], b) + _block_move(st, [w], d)
        by_index = sorted(nodes)
        k = 2
        while k < len(by_index):
            for chunk in (by_index[:k], by_index[-k:]):
                targets = set()
                for x in chunk:
                    for u in t.preds[x]:
                        if pl[u] != d:
                            targets.add(pl[u])
                    for w in t.succs[x]:
                        if pl[w] != d:
                            targets.add(pl[w])
                for b in sorted(targets) or [b for b in range(t.D) if b != d]:
                    if _fits(st, [y for x in chunk for y in _unit(st, x)], b):
                        yield _block_move(st, chunk, b)
            k *= 2
        if mod_of is not None:
            seen = set()
            for v in by_index:
                m = mod_of[v]
                if m in seen:
                    continue
                seen.add(m)
                part = [x for x in mods[m] if pl[x] == d]
                for b in range(t.D):
                    if b != d and _fits(st, [y for x in part for y in _unit(st, x)], b):
                        yield _block_move(st, part, b)
    else:
        # a link: transfers whose route uses it
        cands = []
        st.work += t.n
        for u in range(t.n):
            du = pl[u]
            c = st.cnt[u]
            for d in range(t.D):
                if c[d] and d != du and any(rr == r for rr, _ in t.hop_costs(du, d, st.xbytes(u, d))):
                    cands.append((u, d))
            if len(cands) >= 64:
                break
        for u, d in cands:
            yield _block_move(st, [u], d)
            cons = [w for w in t.succs[u] if pl[w] == d]
            yield _block_move(st, cons, pl[u])


def _best_chain(st: State, score: Scorer, budget: Budget, best: tuple) -> tuple[bool, tuple]:
    """The best improving stage-shift chain off a bottleneck device (:func:`shift_chains`), kept."""
    r = max(range(st.t.R), key=st.loads.__getitem__)
    if r >= st.t.D:
        return False, best
    top, top_s = None, best
    for moves in shift_chains(st, r):
        if not all(st.t.mask[x, b] for x, b, _ in moves):
            continue
        st.apply(moves)
        s = score(st)
        st.undo()
        if better(s, top_s):
            top, top_s = moves, s
        if budget.out(st):
            break
    if top is None:
        return False, best
    st.apply(top)
    st.commit()
    return True, score(st)


def chain_polish(st: State, score: Scorer, budget: Budget, mod_of=None, mods=None) -> tuple:
    """After the iterated search: the best improving stage-shift chain while one improves,
    then a plain descent, until neither improves (never worse than the state it starts from)."""
    best = score(st)
    while not budget.out(st):
        ok, best = _best_chain(st, score, budget, best)
        if ok:
            continue
        s = throughput_descent(st, score, budget, mod_of, mods)
        if not better(s, best):
            break
        best = s
    return best


def throughput_descent(st: State, score: Scorer, budget: Budget, mod_of=None, mods=None) -> tuple:
    """First-improvement descent on moves off the bottleneck resource."""
    best = score(st)
    while not budget.out(st):
        improved = False
        for moves in _thr_candidates(st, mod_of, mods):
            if not moves or not all(st.t.mask[x, b] for x, b, _ in moves):
                continue
            ok, best = try_moves(st, moves, score, best)
            if ok:
                improved = True
                break
            if budget.out(st):
                return best
        if not improved:
            break
    return best


def throughput_kick(st: State, rng: random.Random, strength: int) -> None:
    """Move ``strength`` random nodes of the bottleneck device elsewhere."""
    t = st.t
    d = max(range(t.D), key=st.loads.__getitem__)
    nodes = st.seq[d]
    if not nodes:
        return
    for v in rng.sample(nodes, min(strength, len(nodes))):
        devs = [b for b in t.allowed[v] if b != st.pl[v]]
        if devs:
            m = _block_move(st, [v], rng.choice(devs))
            if all(t.mask[x, b] for x, b, _ in m):
                st.apply(m)
                st.commit()


def iterated_throughput(st: State, score: Scorer, budget: Budget, rng: random.Random, mod_of=None,
                        mods=None) -> tuple:
    """:func:`iterated_search` with the throughput descent and bottleneck kicks."""
    return iterated_search(st, score, budget, rng, mod_of, mods, throughput_descent, throughput_kick)


__all__ = ["Budget", "Scorer", "better", "chain_polish", "iterated_search", "iterated_throughput", "latency_descent",
           "throughput_descent", "try_moves"]
