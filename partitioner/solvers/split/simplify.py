"""Ties go to the simpler plan: the last pass of the ``split`` heuristic.

Every hand-off between devices costs more in practice than the machine model charges, so
among plans of (nearly) equal predicted value the one with fewer transfers is better. The
local search's tie-breaks do not see this (the latency search prefers earlier finish
times, which a node moved to an idle device can buy for free). :func:`simplify` walks
the nodes that send or receive a cross-device tensor and tries to move each (with its
co-location group) to a device of one of its neighbours; a move is kept when the plan
stays feasible, its value stays within ``limit`` and the number of transfers (one per
producer and destination device, plus model inputs and outputs away from the host)
drops. The value may grow by a relative ``tol`` plus an ``allowance`` (seconds) per transfer
removed, what a hand-off costs in practice beyond the model's charge, but never above a cap
(split passes its best starting plan's value: never worse than a baseline). Work is counted
on the state like every other move.
"""

from __future__ import annotations

from ...machine.evaluate import pieces
from .blocks import block_move
from .engine import State
from .score import Budget, Scorer


def _transfers(st: State, nodes: set[int]) -> int:
    """Transfers sent by ``nodes``, their outputs returned to the host and the model inputs
    they read sent to their devices."""
    t = st.t
    pl, host = st.pl, t.host
    out = 0
    ins = set()
    for u in nodes:
        du = pl[u]
        c = st.cnt[u]
        out += sum(1 for d in range(t.D) if c[d] and d != du)
        if t.outs_of[u] and du != host:
            out += 1
        ins.update(t.node_inputs[u])
    for k in ins:
        out += sum(1 for d, c in enumerate(st.icnt[k]) if c and d != host)
    return out


def _touched(st: State, moved: list[int]) -> set[int]:
    t = st.t
    out = set(moved)
    for v in moved:
        out.update(t.preds[v])
    return out


class Limit:
    """The value a simpler plan may reach: ``base * (1 + tol) + allowance * saved`` (``saved``:
    transfers removed so far), never above ``cap``."""

    def __init__(self, base: float, tol: float, allowance: float, cap: float):
        self.base, self.tol, self.allowance, self.cap = base, tol, allowance, cap
        self.saved = 0

    def ok(self, value: float, saved: int) -> bool:
        lim = self.base * (1 + self.tol) + self.allowance * (self.saved + saved)
        return value <= min(lim, self.cap)


def _try(st: State, score: Scorer, limit: Limit, nodes: list[int], b: int) -> bool:
    t = st.t
    moves = block_move(st, nodes, b)
    if not all(t.mask[x, b] for x, _, _ in moves):
        return False
    moved = [x for x, _, _ in moves]
    before = _transfers(st, _touched(st, moved))
    st.apply(moves)
    s = score(st)
    if s[0] == 0:
        saved = before - _transfers(st, _touched(st, moved))
        if saved > 0 and limit.ok(s[1], saved):
            st.commit()
            limit.saved += saved
            return True
    st.undo()
    return False


def simplify(st: State, score: Scorer, limit: Limit, budget: Budget, max_piece: int = 64) -> int:
    """Moves that cut transfers at a value within ``limit`` (see the module docstring):
    whole pieces (same-device connected components, up to ``max_piece`` nodes) to a
    neighbouring device, then single boundary nodes. Returns how many moves were kept."""
    t = st.t
    kept = 0
    changed = True
    while changed and not budget.out(st):
        changed = False
        for piece in pieces(t.p, st.pl):
            if len(piece) > max_piece or budget.out(st):
                break
            a = st.pl[piece[0]]
            inside = set(piece)
            devs = sorted({st.pl[u] for v in piece for u in t.preds[v] if u not in inside}
                          | {st.pl[w] for v in piece for w in t.succs[v] if w not in inside} - {a})
            for b in devs:
                if _try(st, score, limit, piece, b):
                    kept += 1
                    changed = True
                    break
        if changed:
            continue
        cand = [v for v in range(t.n)
                if any(st.pl[u] != st.pl[v] for u in t.preds[v]) or any(st.pl[w] != st.pl[v] for w in t.succs[v])]
        for v in cand:
            a = st.pl[v]
            devs = sorted({st.pl[u] for u in t.preds[v]} | {st.pl[w] for w in t.succs[v]} - {a})
            for b in devs:
                if _try(st, score, limit, [v], b):
                    kept += 1
                    changed = True
                    break
            if budget.out(st):
                break
    return kept
