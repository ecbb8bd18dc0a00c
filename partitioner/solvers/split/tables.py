"""Constant per-problem tables of the ``split`` heuristic's incremental evaluator.

:class:`Tables` holds what :class:`~.engine.State` reads in its inner loops as plain
Python lists (scalar access on lists is several times faster than on numpy arrays):
times, adjacency, per-producer transfer-time matrices (one per tensor size, the
evaluator's arithmetic), model-input releases and output tails, the resources of the
period (devices and directed link hops, with the hop costs of every routed transfer),
and an optimistic time-to-end used to stop a move's evaluation early.
"""

from __future__ import annotations

import numpy as np

from ...machine.problem import Problem


def _row_lists(mask: np.ndarray) -> list[list[int]]:
    """``np.flatnonzero(mask[v]).tolist()`` for every row ``v`` (each its own list), computed once
    per distinct row."""
    n, D = mask.shape
    if D > 62:
        return [np.flatnonzero(r).tolist() for r in mask]
    keys = (mask.astype(np.int64) << np.arange(D, dtype=np.int64)).sum(axis=1)
    uniq, which = np.unique(keys, return_inverse=True)
    lists = [[d for d in range(D) if (k >> d) & 1] for k in uniq.tolist()]
    return [lists[k][:] for k in which.reshape(-1).tolist()]


class Tables:
    """Constant per-problem data, as plain Python lists for fast scalar access.

    Parameters
    ----------
    problem : Problem
    allowed : ndarray, optional
        ``(n, D)`` bool mask of the devices each node may use (default: support and
        groups, :func:`partitioner.solvers.baselines.peft.allowed_mask`).
    """

    def __init__(self, problem: Problem, allowed: np.ndarray | None = None):
        from ..baselines.peft import allowed_mask

        p = problem
        self.p = p
        n, D = p.n, p.D
        self.n, self.D, self.host = n, D, p.host
        self.T = p.T.tolist()
        self.preds, self.succs = p.preds, p.succs
        self.pred_b, self.succ_b = p.pred_bytes, p.succ_bytes
        mask = allowed_mask(p) if allowed is None else np.asarray(allowed, dtype=bool)
        self.mask = mask
        self.allowed = _row_lists(mask)
        self.group_of = p.group_of.tolist()
        self.groups = [list(g) for g in p.groups]
        self._cm: dict[float, list[list[float]]] = {}
        self.uni = [-1.0] * n  # the bytes of every out-edge when they agree, else -1
        self.ucm: list = [None] * n
        for u in range(n):
            bs = {b for _, b in self.succ_b[u]}
            if len(bs) <= 1:
                b = bs.pop() if bs else 0.0
                self.uni[u] = b
                self.ucm[u] = self.cm(b)
        zero = [0.0] * D
        self.rel_in: list = [None] * n
        for b, dsts in p.in_tensors:
            row = [p.comm(p.host, d, b) for d in range(D)]
            for j in dsts:
                cur = self.rel_in[j]
                self.rel_in[j] = row[:] if cur is None else [max(x, y) for x, y in zip(cur, row)]
        self.out_tail: list = [zero] * n
        self.outs_of: list[list[float]] = [[] for _ in range(n)]
        for s, b in p.outputs:
            row = [p.comm(d, p.host, b) for d in range(D)]
            self.out_tail[s] = [max(x, y) for x, y in zip(self.out_tail[s], row)]
            self.outs_of[s].append(float(b))
        self.node_inputs = p.node_inputs
        self.in_bytes = [float(b) for b, _ in p.in_tensors]
        self.pb = p.param_bytes.tolist()
        self.ob = p.output_bytes.tolist()
        self.cap = p.capacity.tolist()
        self.memory = bool(p.constraints.memory)
        hops = sorted(p.links.hop)
        self.res_names = [("dev", d) for d in range(D)] + [("link", h) for h in hops]
        self.link_index = {h: D + k for k, h in enumerate(hops)}
        self.R = D + len(hops)
        self.blocks = bool(p.spec.comm_blocks_device)
        self._hc: dict[tuple[int, int, float], tuple[tuple[int, float], ...]] = {}
        self._qs: list[float] | None = None

    @property
    def qs(self) -> list[float]:
        """Optimistic time from a node's finish to the end: every later node on its fastest
        allowed device, transfers free (a lower bound for any placement)."""
        if self._qs is None:
            n = self.n
            tmin = np.where(self.mask, self.p.T, np.inf).min(axis=1)
            tmin = np.where(np.isfinite(tmin), tmin, 0.0).tolist()
            qmin = [0.0] * n
            qs = [0.0] * n
            for v in range(n - 1, -1, -1):
                x = 0.0
                for w in self.succs[v]:
                    y = tmin[w] + qmin[w]
                    if y > x:
                        x = y
                qs[v] = x
                ot = [self.out_tail[v][d] for d in self.allowed[v]]
                qmin[v] = max(x, min(ot) if ot else 0.0)
            self._qs = qs
        return self._qs

    def cm(self, b: float) -> list[list[float]]:
        """``D x D`` transfer times of a ``b``-byte tensor (the evaluator's arithmetic)."""
        m = self._cm.get(b)
        if m is None:
            m = self._cm[b] = self.p.comm_matrix(b).tolist()
        return m

    def hop_costs(self, a: int, d: int, b: float) -> tuple[tuple[int, float], ...]:
        """(resource, seconds) charged by one ``b``-byte transfer from ``a`` to ``d``."""
        key = (a, d, b)
        hc = self._hc.get(key)
        if hc is None:
            out = []
            route = self.p.links.route(a, d, b)
            for x, y in route.hops:
                lat, inv = self.p.links.hop[(x, y)]
                t = lat + b * inv
                out.append((self.link_index[(x, y)], t))
                if self.blocks:
                    out.append((x, t))
                    out.append((y, t))
            hc = self._hc[key] = tuple(out)
        return hc


__all__ = ["Tables"]
