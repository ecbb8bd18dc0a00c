"""Incremental plan state for the ``split`` heuristic's local search.

The evaluator (:func:`partitioner.machine.evaluate.evaluate`) is ``O(n + e)`` Python per call; a
local search that calls it for every tried move does not scale. :class:`State` keeps a
plan together with everything the evaluator would compute for it and updates only what
a move changes:

* **Priority list.** Every node carries a position ``pos`` (a float); sorting by it gives
  a linear extension of the precedence, and each device runs its nodes in ``pos`` order
  (so a plan's per-device order is "the priority list restricted to the device"). The
  earliest-start schedule of that order is the evaluator's (a node starts after its
  device's previous node, its model inputs and its inputs' arrivals, one transfer per
  (producer, destination device) at the largest bytes among the producer's edges to it).
* **Delta schedule.** A move changes the device and/or position of a few nodes; start
  times are recomputed only where they can change: from the moved nodes, forward along
  data edges and device chains, in ``pos`` order (a heap), stopping where a finish time
  does not change. ``latency = max(finish + output tail)``.
* **Delta loads.** Device loads and directed-link loads (every hop of every routed
  transfer, and with ``comm_blocks_device`` both endpoint devices of each hop) are kept
  with per-(producer, device) consumer counts, so a move costs ``O(degree)``; the period
  is the largest load.
* **Memory.** Per device, parameters plus a conservative activation proxy (outputs of its
  nodes, tensors it receives, model inputs it reads: everything live at once), an upper
  bound on the evaluator's step-granular peak; only when the proxy exceeds a capacity is
  the exact peak of that device computed (:meth:`State.device_peak`, the evaluator's rule).

Every move can be undone exactly (:meth:`State.undo`). Work is counted in ``work`` (node
recomputations plus edges scanned), which the search uses as a deterministic budget.
Figures of the final plan always come from the evaluator.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right

from ...ir.plan import Plan
from .tables import Tables


class State:
    """A plan (placement + priority positions) with its schedule, loads and memory proxy.

    Parameters
    ----------
    tab : Tables
    placement : sequence of int
    pos : sequence of float
        Priority positions; must order every edge forward.
    schedule : bool
        Keep the earliest-start schedule (latency); False keeps loads only.
    loads : bool
        Keep loads and the memory proxy (needed for the period, floors and memory checks).
    """

    def __init__(self, tab: Tables, placement, pos, schedule: bool = True, loads: bool = True):
        self.t = tab
        self.track = loads
        self.pl = [int(x) for x in placement]
        self.pos = [float(x) for x in pos]
        self.sched = schedule
        self.work = 0
        self._log: list | None = None
        self.xbc: dict[tuple[int, int], float] = {}
        self._build()

    # ---- construction ---------------------------------------------------------------
    def _key(self, v: int) -> tuple[float, int]:
        """The total order of the priority list: position, then node index."""
        return (self.pos[v], v)

    def _build(self) -> None:
        t = self.t
        n, D = t.n, t.D
        pl = self.pl
        order = sorted(range(n), key=self._key)
        self.seq = [[] for _ in range(D)]
        for v in order:
            self.seq[pl[v]].append(v)
        self.prv = [-1] * n
        self.nxt = [-1] * n
        for s in self.seq:
            for a, b in zip(s, s[1:]):
                self.nxt[a] = b
                self.prv[b] = a
        self.cnt = [[0] * D for _ in range(n)]
        for v in range(n):
            dv = pl[v]
            for u in t.preds[v]:
                self.cnt[u][dv] += 1
        self.icnt = [[0] * D for _ in t.in_bytes]
        for v in range(n):
            for k in t.node_inputs[v]:
                self.icnt[k][pl[v]] += 1
        self.xbc = {}
        self._loads_from_scratch()
        self.work += (2 * n + 2 * len(t.p.edge_src)) if self.track else n
        self.qd = [0.0] * n
        self.qd_ok = False
        self.start = [0.0] * n
        self.finish = [0.0] * n
        self.ft = [0.0] * n
        self.sumf = 0.0
        if self.sched:
            for v in order:
                s = self._ready(v, pl[v])
                f = s + t.T[v][pl[v]]
                self.start[v], self.finish[v] = s, f
                self.ft[v] = f + t.out_tail[v][pl[v]]
            self.sumf = math.fsum(self.finish)
            self.work += n + sum(len(p) for p in t.preds)

    def _loads_from_scratch(self) -> None:
        t = self.t
        D = t.D
        self.loads = [0.0] * t.R
        self.params = [0.0] * D
        self.act = [0.0] * D  # activation proxy: outputs + received + inputs
        if not self.track:
            return
        for v in range(t.n):
            d = self.pl[v]
            self.loads[d] += t.T[v][d]
            self.params[d] += t.pb[v]
            self.act[d] += t.ob[v]
        for u in range(t.n):
            du = self.pl[u]
            c = self.cnt[u]
            for d in range(D):
                if c[d] and d != du:
                    self._xfer(u, du, d, 1.0)
            for b in t.outs_of[u]:
                if du != t.host:
                    for r, x in t.hop_costs(du, t.host, b):
                        self.loads[r] += x
        for k in range(len(t.in_bytes)):
            for d in range(D):
                if self.icnt[k][d]:
                    self._xin(k, d, 1.0)

    def rebuild(self, placement, pos) -> None:
        """Reset to another plan (counts as one full evaluation of work)."""
        self.pl = [int(x) for x in placement]
        self.pos = [float(x) for x in pos]
        self._log = None
        self._build()

    # ---- transfers ----------------------------------------------------------------------
    def xbytes(self, u: int, d: int) -> float:
        """Bytes ``u`` sends to device ``d``: its largest edge to a consumer there."""
        b = self.t.uni[u]
        if b >= 0:
            return b
        key = (u, d)
        b = self.xbc.get(key)
        if b is None:
            pl = self.pl
            b = max((bb for w, bb in self.t.succ_b[u] if pl[w] == d), default=0.0)
            self.xbc[key] = b
        return b

    def _xfer(self, u: int, src: int, d: int, sign: float) -> None:
        b = self.xbytes(u, d)
        loads = self.loads
        for r, x in self.t.hop_costs(src, d, b):
            loads[r] += sign * x
        self.act[d] += sign * b

    def _xin(self, k: int, d: int, sign: float) -> None:
        t = self.t
        b = t.in_bytes[k]
        if d != t.host:
            for r, x in t.hop_costs(t.host, d, b):
                self.loads[r] += sign * x
        self.act[d] += sign * b

    def arrival(self, u: int, d: int) -> float:
        """When ``u``'s tensor is available on device ``d``."""
        du = self.pl[u]
        if du == d:
            return self.finish[u]
        c = self.t.ucm[u]
        if c is not None:
            return self.finish[u] + c[du][d]
        return self.finish[u] + self.t.p.comm(du, d, self.xbytes(u, d))

    def _ready(self, v: int, d: int) -> float:
        """Earliest start of ``v`` on ``d`` after its device predecessor and inputs."""
        t = self.t
        w = self.prv[v]
        s = self.finish[w] if w >= 0 else 0.0
        r = t.rel_in[v]
        if r is not None and r[d] > s:
            s = r[d]
        pl, fin, ucm = self.pl, self.finish, t.ucm
        for u in t.preds[v]:
            du = pl[u]
            if du == d:
                a = fin[u]
            else:
                c = ucm[u]
                a = fin[u] + (c[du][d] if c is not None else t.p.comm(du, d, self.xbytes(u, d)))
            if a > s:
                s = a
        return s

    def data_ready(self, v: int, d: int) -> float:
        """Earliest time every input of ``v`` could be on ``d`` (device queue ignored)."""
        t = self.t
        r = t.rel_in[v]
        s = r[d] if r is not None else 0.0
        pl, fin = self.pl, self.finish
        for u, b in t.pred_b[v]:
            du = pl[u]
            if du == d:
                a = fin[u]
            elif t.ucm[u] is not None:
                a = fin[u] + t.ucm[u][du][d]
            else:
                a = fin[u] + t.p.comm(du, d, max(b, self.xbytes(u, d)))
            if a > s:
                s = a
        return s

    # ---- objective --------------------------------------------------------------------
    def latency(self) -> float:
        return max(self.ft) if self.ft else 0.0

    def period(self) -> float:
        return max(self.loads) if self.loads else 0.0

    def mem_excess(self) -> float:
        """Sum over devices of the relative excess of the exact peak over capacity (0: fits)."""
        t = self.t
        if not t.memory:
            return 0.0
        ex = 0.0
        for d in range(t.D):
            if self.params[d] + self.act[d] > t.cap[d] * (1 + 1e-12):
                peak = self.device_peak(d)
                if peak > t.cap[d] * (1 + 1e-9):
                    ex += peak / t.cap[d] - 1.0
        return ex

    def device_peak(self, d: int) -> float:
        """The evaluator's memory peak of device ``d`` (parameters + live activations)."""
        t = self.t
        seq = self.seq[d]
        m = len(seq)
        self.work += m
        if not m:
            return self.params[d]
        pl = self.pl
        at = {v: i for i, v in enumerate(seq)}
        diffs = [0.0] * (m + 1)
        remote: dict[int, list[int]] = {}
        for i, u in enumerate(seq):
            last = i
            for j in t.succs[u]:
                if pl[j] == d:
                    k = at[j]
                    if k > last:
                        last = k
            diffs[i] += t.ob[u]
            diffs[last + 1] -= t.ob[u]
            for w in t.preds[u]:
                if pl[w] != d:
                    r = remote.get(w)
                    if r is None:
                        remote[w] = [i, i]
                    else:
                        r[1] = i
        for w, (a, c) in remote.items():
            nb = self.xbytes(w, d)
            diffs[a] += nb
            diffs[c + 1] -= nb
        for k, b in enumerate(t.in_bytes):
            if self.icnt[k][d]:
                idx = [at[j] for j in t.p.in_tensors[k][1] if pl[j] == d]
                diffs[min(idx)] += b
                diffs[max(idx) + 1] -= b
        run, peak = 0.0, 0.0
        for x in diffs[:-1]:
            run += x
            if run > peak:
                peak = run
        return self.params[d] + peak

    # ---- moves ------------------------------------------------------------------------
    def _relocate(self, v: int, b: int, q: float) -> tuple[int, float]:
        """Put ``v`` on device ``b`` at position ``q``; update chains, counts, loads, memory."""
        t = self.t
        pl, pos = self.pl, self.pos
        a, q0 = pl[v], pos[v]
        key = self._key
        sa = self.seq[a]
        i = bisect_left(sa, (q0, v), key=key)
        del sa[i]
        p_, n_ = self.prv[v], self.nxt[v]
        if p_ >= 0:
            self.nxt[p_] = n_
        if n_ >= 0:
            self.prv[n_] = p_
        self.work += 16
        if a != b:
            track = self.track
            if track:
                self.work += 4 * (len(t.preds[v]) + len(t.succs[v]) + t.D)
                self._charge(v, a, b, -1.0)
            pl[v] = b
            for u in t.preds[v]:
                cu = self.cnt[u]
                cu[a] -= 1
                cu[b] += 1
                if t.uni[u] < 0:
                    self.xbc.pop((u, a), None)
                    self.xbc.pop((u, b), None)
            for k in t.node_inputs[v]:
                self.icnt[k][a] -= 1
                self.icnt[k][b] += 1
            if track:
                self._charge(v, a, b, 1.0)
        pos[v] = q
        sb = self.seq[b]
        j = bisect_right(sb, (q, v), key=key)
        sb.insert(j, v)
        p_ = sb[j - 1] if j > 0 else -1
        n_ = sb[j + 1] if j + 1 < len(sb) else -1
        self.prv[v], self.nxt[v] = p_, n_
        if p_ >= 0:
            self.nxt[p_] = v
        if n_ >= 0:
            self.prv[n_] = v
        return a, q0

    def _charge(self, v: int, a: int, b: int, sign: float) -> None:
        """Add (sign 1) or remove (-1) every load and memory term that moving ``v``
        between ``a`` and ``b`` can change, for the current placement."""
        t = self.t
        pl = self.pl
        dv = pl[v]
        self.loads[dv] += sign * t.T[v][dv]
        self.params[dv] += sign * t.pb[v]
        self.act[dv] += sign * t.ob[v]
        c = self.cnt[v]
        for d in range(t.D):
            if c[d] and d != dv:
                self._xfer(v, dv, d, sign)
        for b_ in t.outs_of[v]:
            if dv != t.host:
                for r, x in t.hop_costs(dv, t.host, b_):
                    self.loads[r] += sign * x
        for u in t.preds[v]:
            du = pl[u]
            cu = self.cnt[u]
            for d in (a, b):
                if cu[d] and d != du:
                    self._xfer(u, du, d, sign)
        for k in t.node_inputs[v]:
            ck = self.icnt[k]
            for d in (a, b):
                if ck[d]:
                    self._xin(k, d, sign)

    def apply(self, moves: list[tuple[int, int, float]], cutoff: float | None = None) -> bool:
        """Apply ``(node, device, position)`` moves (positions must keep every edge forward)
        and update the schedule; :meth:`undo` reverts, :meth:`commit` keeps.

        With ``cutoff``, the update stops (returns False; the state is then only good for
        :meth:`undo`) as soon as some node after every moved one finishes so late that
        the latency must exceed ``cutoff``: its finish plus its optimistic tail (every
        later node on its fastest device, no transfers; valid for any placement) or its
        own output transfer."""
        t = self.t
        snap = (self.loads[:], self.params[:], self.act[:], self.sumf)
        rel = []
        for v, b, q in moves:
            a, q0 = self._relocate(v, b, q)
            rel.append((v, a, q0))
        flog: list = []
        self._log = (rel, snap, flog)
        if not self.sched:
            return True
        dirty = set()
        for v, a, _ in rel:
            dirty.add(v)
            dirty.update(t.succs[v])
            w = self.nxt[v]
            if w >= 0:
                dirty.add(w)
            for u in t.preds[v]:
                if t.uni[u] < 0:
                    dirty.update(t.succs[u])
        key = self._key
        for v, a, q0 in rel:  # old chain successors of the moved nodes
            sa = self.seq[a]
            i = bisect_right(sa, (q0, v), key=key)
            if i < len(sa):
                dirty.add(sa[i])
        last = None
        if cutoff is not None:
            if not self.qd_ok:
                self._refresh_qd()
            last = max(key(v) for v, _, _ in rel)
        return self._propagate(dirty, {v for v, _, _ in rel}, cutoff, last)

    def _refresh_qd(self) -> None:
        """``qd[v]``: the longest path from ``v``'s finish to the end of the current
        schedule (data edges with their transfers, the next node on ``v``'s device, output
        transfers), so ``latency = max_v finish[v] + qd[v]``. A move leaves it exact for
        every node after all moved ones in the priority list (their successors and device
        successors are unchanged), which :meth:`apply` uses to stop early."""
        t = self.t
        pl, T, qd, nxt = self.pl, t.T, self.qd, self.nxt
        ucm, comm = t.ucm, t.p.comm
        for v in sorted(range(t.n), key=self._key, reverse=True):
            d = pl[v]
            best = t.out_tail[v][d]
            c = ucm[v]
            for w, b in t.succ_b[v]:
                dw = pl[w]
                x = T[w][dw] + qd[w]
                if dw != d:
                    x += c[d][dw] if c is not None else comm(d, dw, self.xbytes(v, dw))
                if x > best:
                    best = x
            w = nxt[v]
            if w >= 0:
                x = T[w][d] + qd[w]
                if x > best:
                    best = x
            qd[v] = best
        self.qd_ok = True
        self.work += 2 * t.n + len(t.p.edge_src)

    def _propagate(self, dirty: set[int], moved: set[int], cutoff: float | None = None,
                   last: tuple | None = None) -> bool:
        t = self.t
        pos, pl, T, tails = self.pos, self.pl, t.T, t.out_tail
        start, finish, ft = self.start, self.finish, self.ft
        succs, nxt = t.succs, self.nxt
        qs = t.qs
        heap = [(pos[v], v) for v in dirty]
        heapq.heapify(heap)
        inq = set(dirty)
        flog = self._log[2]
        work = 0
        sumf = self.sumf
        ok = True
        qd = self.qd
        while heap:
            item = heapq.heappop(heap)
            v = item[1]
            d = pl[v]
            s = self._ready(v, d)
            f = s + T[v][d]
            work += 1 + len(t.preds[v])
            if f != finish[v] or s != start[v] or v in moved:
                flog.append((v, start[v], finish[v], ft[v]))
                sumf += f - finish[v]
                start[v], finish[v] = s, f
                x = f + tails[v][d]
                ft[v] = x
                if cutoff is not None and (x > cutoff or f + (qd[v] if item > last else qs[v]) > cutoff):
                    ok = False
                    break
                for w in succs[v]:
                    if w not in inq:
                        inq.add(w)
                        heapq.heappush(heap, (pos[w], w))
                w = nxt[v]
                if w >= 0 and w not in inq:
                    inq.add(w)
                    heapq.heappush(heap, (pos[w], w))
        self.sumf = sumf
        self.work += work
        return ok

    def undo(self) -> None:
        """Revert the last :meth:`apply`."""
        rel, snap, flog = self._log
        start, finish, ft = self.start, self.finish, self.ft
        for v, s, f, x in reversed(flog):
            start[v], finish[v], ft[v] = s, f, x
        for v, a, q0 in reversed(rel):
            self._relocate(v, a, q0)
        self.loads, self.params, self.act, self.sumf = snap[0], snap[1], snap[2], snap[3]
        self._log = None

    def commit(self) -> None:
        self._log = None
        self.qd_ok = False

    # ---- helpers for move generation ------------------------------------------------------
    def window(self, v: int) -> tuple[float, float]:
        """Open interval of positions ``v`` may take (after its preds, before its succs)."""
        pos = self.pos
        lo = max((pos[u] for u in self.t.preds[v]), default=-math.inf)
        hi = min((pos[w] for w in self.t.succs[v]), default=math.inf)
        return lo, hi

    def insertion_pos(self, v: int, b: int, ready: float | None = None) -> float | None:
        """A position for ``v`` on device ``b``: before the first node of ``b`` in ``v``'s
        window that finishes after ``v``'s inputs could arrive there (insertion policy).
        None when no float fits between the neighbours (call :meth:`renumber`)."""
        lo, hi = self.window(v)
        r = self.data_ready(v, b) if ready is None else ready
        sb = self.seq[b]
        key = self._key
        i = bisect_right(sb, (lo, math.inf), key=key)
        j = bisect_left(sb, (hi, -1), key=key)
        k = i
        fin = self.finish
        while k < j and (sb[k] == v or fin[sb[k]] <= r):
            k += 1
        left = lo
        if k > 0:
            w = sb[k - 1]
            if w == v:
                w = sb[k - 2] if k >= 2 else -1
            if w >= 0 and self.pos[w] > left:
                left = self.pos[w]
        right = hi if k >= j else min(hi, self.pos[sb[k]])
        return _between(left, right)

    def renumber(self) -> None:
        """Spread positions evenly (same order); needed when floats run out between nodes."""
        order = sorted(range(self.t.n), key=self._key)
        for i, v in enumerate(order):
            self.pos[v] = float(i)
        self.work += self.t.n

    def plan(self, **kw) -> Plan:
        """The plan: placement and per-device order (priority list restricted)."""
        return Plan(tuple(self.pl), tuple(tuple(s) for s in self.seq), **kw)

    def snapshot(self) -> tuple[list[int], list[float]]:
        return self.pl[:], self.pos[:]

    def critical_path(self) -> list[int]:
        """Nodes of one critical path of the schedule, from the end backwards: each node's
        start is bound by the previous one (data arrival first, else its device predecessor)."""
        ft, start, pl = self.ft, self.start, self.pl
        if not ft:
            return []
        v = max(range(len(ft)), key=ft.__getitem__)
        path = [v]
        t = self.t
        seen = {v}
        while True:
            s = start[v]
            if s <= 0.0:
                break
            d = pl[v]
            nxt_v = -1
            for u in t.preds[v]:
                if self.arrival(u, d) == s:
                    nxt_v = u
                    break
            if nxt_v < 0:
                w = self.prv[v]
                if w >= 0 and self.finish[w] == s:
                    nxt_v = w
            if nxt_v < 0 or nxt_v in seen:
                break
            seen.add(nxt_v)
            path.append(nxt_v)
            v = nxt_v
        self.work += 4 * len(path)
        return path


def _between(a: float, b: float) -> float | None:
    """A float strictly between ``a`` and ``b`` (infinite ends allowed), or None."""
    if a == -math.inf and b == math.inf:
        return 0.0
    if a == -math.inf:
        return b - 1.0
    if b == math.inf:
        return a + 1.0
    m = 0.5 * (a + b)
    if a < m < b:
        return m
    return None


def positions_from_schedule(start, finish) -> list[float]:
    """Priority positions from a schedule: sort by (start, finish, index)."""
    n = len(start)
    order = sorted(range(n), key=lambda v: (start[v], finish[v], v))
    pos = [0.0] * n
    for i, v in enumerate(order):
        pos[v] = float(i)
    return pos


__all__ = ["State", "Tables", "positions_from_schedule"]
