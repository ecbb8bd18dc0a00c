"""Block moves of the ``split`` heuristic for plans spread over many devices.

When memory forces a model over many devices, good plans are close to pipelines: each
device runs a stretch of the *unit order* (nodes in topological order, a co-location group
at its first member's position). Moving single nodes off the bottleneck rarely helps there:
the neighbour stage is as loaded, and the devices with slack are several stages away and
full of their own memory. :func:`shift_chains` moves work along the pipeline instead (an
ejection chain of stage-boundary shifts): the bottleneck device hands the units at its
boundary to the next stage, which hands as much work at its far boundary to the next, and
so on to the least loaded stage in that direction; every device on the way keeps its load,
the bottleneck loses and the end of the chain gains. Both directions, several amounts
(fractions of the load difference). Each chain is one compound move for
``try_moves`` of :mod:`.search` (kept only when the score improves, memory included).
"""

from __future__ import annotations

from .engine import State

FRACTIONS = (0.5, 0.25, 0.125, 0.0625)


def unit(st: State, v: int) -> list[int]:
    """``v`` and the members of its co-location group (they move together)."""
    g = st.t.group_of[v]
    return st.t.groups[g] if g >= 0 else [v]


def block_move(st: State, nodes: list[int], b: int) -> list[tuple[int, int, float]]:
    """``nodes`` (with their groups) to device ``b``, each at its priority position."""
    out, seen = [], set()
    for v in nodes:
        for x in unit(st, v):
            if x not in seen:
                seen.add(x)
                out.append((x, b, st.pos[x]))
    return out


def stage_sequence(st: State) -> list[int]:
    """Used devices in the order their units appear (mean unit position)."""
    t = st.t
    pos = {}
    for d in range(t.D):
        seq = st.seq[d]
        if seq:
            pos[d] = sum(t.upos[v] for v in seq) / len(seq)
    return sorted(pos, key=lambda d: (pos[d], d))


def _units(st: State, d: int) -> list[list[int]]:
    """Units on device ``d``, in unit order."""
    t = st.t
    by: dict[int, list[int]] = {}
    for v in st.seq[d]:
        by.setdefault(t.upos[v], []).append(v)
    st.work += len(st.seq[d])
    return [by[k] for k in sorted(by)]


def shift_chains(st: State, d: int, fractions=FRACTIONS):
    """Compound moves shifting work from device ``d`` along the stage sequence (module docstring)."""
    t = st.t
    seq = stage_sequence(st)
    if d not in seq or len(seq) < 2:
        return
    i = seq.index(d)
    loads = st.loads
    T = t.T
    for step in (1, -1):
        chain = [d]
        j = i + step
        while 0 <= j < len(seq):
            chain.append(seq[j])
            j += step
        if len(chain) < 2:
            continue
        end = min(range(1, len(chain)), key=lambda k: (loads[chain[k]], k))
        chain = chain[:end + 1]
        excess = loads[d] - loads[chain[-1]]
        if excess <= 0:
            continue
        units = {a: _units(st, a) for a in chain[:-1]}
        for f in fractions:
            moves, want = [], excess * f
            for a, b in zip(chain, chain[1:]):
                us = units[a] if step < 0 else units[a][::-1]  # the boundary facing b first
                got, take = 0.0, []
                for u in us[:-1]:  # a keeps at least one unit
                    if got >= want:
                        break
                    take.extend(u)
                    got += sum(T[x][a] for x in u)
                if not take:
                    break
                moves += block_move(st, take, b)
                want = sum(T[x][b] for x in take)  # what b received, b hands on
            else:
                if moves:
                    yield moves


def _halves(piece: list[int], depth: int):
    """The piece, then its halves in index order, down to ``depth`` levels."""
    yield piece
    if depth > 0 and len(piece) >= 4:
        h = len(piece) // 2
        yield from _halves(piece[:h], depth - 1)
        yield from _halves(piece[h:], depth - 1)


def relocate_pieces(st: State, score, budget, pieces_of, targets: int = 4, depth: int = 2,
                    max_piece: int = 256) -> int:
    """Move whole pieces (same-device connected components, ``pieces_of(placement)``), or
    their halves, to the devices with the most free memory (idle ones first), kept when the
    score improves: what fills an idle accelerator with a module the host or a slow device
    runs. Returns the moves kept."""
    from .score import better

    t = st.t
    best = score(st)
    kept = 0
    changed = True
    while changed and not budget.out(st):
        changed = False
        used = [t.cap[d] - st.params[d] - st.act[d] for d in range(t.D)]
        order = sorted(range(t.D), key=lambda d: (len(st.seq[d]) > 0, -used[d], d))
        plist = sorted(pieces_of(st.pl), key=lambda c: -sum(t.T[v][st.pl[v]] for v in c))
        for piece in plist:
            if len(piece) > max_piece or budget.out(st):
                continue
            a = st.pl[piece[0]]
            for part in _halves(piece, depth):
                moved = False
                for b in [d for d in order if d != a][:targets]:
                    moves = block_move(st, part, b)
                    if not all(t.mask[x, b] for x, _, _ in moves):
                        continue
                    st.apply(moves)
                    s = score(st)
                    if better(s, best):
                        st.commit()
                        best, moved = s, True
                        break
                    st.undo()
                if moved:
                    kept += 1
                    changed = True
                    break
            if changed:
                break
    return kept
