"""Transfer times between devices: direct links, and routes over several links where none is direct.

A transfer of ``b`` bytes over a route takes the sum of its hops' ``latency + b / bandwidth``
(store and forward); between two devices the route of least total time for the size is taken.
:class:`LinkTable` holds every non-dominated route per pair, so that a time for any size is
one minimum. This is the machine model's transfer rule: every other module asks it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from ..errors import SpecError
from ..ir.spec import Spec


@dataclass(frozen=True)
class Route:
    """A chain of links from one device to another (store and forward)."""

    hops: tuple[tuple[int, int], ...]  # (from device index, to device index)
    latency_s: float  # sum of hop latencies
    inv_bw: float  # sum of 1 / bandwidth over hops (seconds per byte)

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes * self.inv_bw


class LinkTable:
    """Pairwise transfer times, routed through intermediate devices where needed.

    Parameters
    ----------
    spec : Spec
        The hardware spec.

    The spec must be connected (:meth:`Spec.check_connected`, run by ``parse_spec``).
    """

    def __init__(self, spec: Spec):
        self.spec = spec
        self.ids = spec.device_ids
        n = len(self.ids)
        idx = {d: i for i, d in enumerate(self.ids)}
        self.index = idx
        adj: list[list[tuple[int, float, float]]] = [[] for _ in range(n)]
        self.hop: dict[tuple[int, int], tuple[float, float]] = {}
        for ln in spec.links:
            a, b = idx[ln.a], idx[ln.b]
            adj[a].append((b, ln.latency_s, 1.0 / ln.bandwidth_Bps))
            adj[b].append((a, ln.latency_s, 1.0 / ln.bandwidth_Bps))
            self.hop[(a, b)] = self.hop[(b, a)] = (ln.latency_s, 1.0 / ln.bandwidth_Bps)
        self.routes: dict[tuple[int, int], list[Route]] = {}
        for s in range(n):
            labels = self._pareto_from(s, adj)
            for t in range(n):
                if t != s:
                    self.routes[(s, t)] = labels[t]  # never empty: parse_spec checked the spec is connected
        rmax = max((len(r) for r in self.routes.values()), default=1)
        self._L = np.full((n, n, rmax), np.inf)
        self._I = np.zeros((n, n, rmax))  # padding: latency inf, inv_bw 0 (no inf * 0)
        for (s, t), rs in self.routes.items():
            for k, r in enumerate(rs):
                self._L[s, t, k] = r.latency_s
                self._I[s, t, k] = r.inv_bw
        for s in range(n):
            self._L[s, s, 0] = 0.0
            self._I[s, s, 0] = 0.0

    @staticmethod
    def _pareto_from(s: int, adj) -> list[list[Route]]:
        """Bi-criteria label setting: all routes from ``s`` not dominated in (latency, inv_bw)."""
        n = len(adj)
        labels: list[list[Route]] = [[] for _ in range(n)]
        heap = [(0.0, 0.0, (), s)]
        while heap:
            lat, inv, hops, u = heapq.heappop(heap)
            if any(r.latency_s <= lat + 1e-18 and r.inv_bw <= inv + 1e-30 for r in labels[u]) and u != s:
                continue
            if u == s and hops:
                continue
            if u != s:
                labels[u].append(Route(hops, lat, inv))
            visited = {h[0] for h in hops} | {u}
            for v, l, i in adj[u]:
                if v in visited:
                    continue
                heapq.heappush(heap, (lat + l, inv + i, hops + ((u, v),), v))
        return labels

    def time_idx(self, a: int, b: int, nbytes: float) -> float:
        """Transfer time between device indices ``a`` and ``b``."""
        if a == b:
            return 0.0
        return min(r.time(nbytes) for r in self.routes[(a, b)])

    def transfer_time(self, a: str, b: str, nbytes: float) -> float:
        """Seconds to move ``nbytes`` from device ``a`` to device ``b`` (0 when ``a == b``)."""
        try:
            return self.time_idx(self.index[a], self.index[b], nbytes)
        except KeyError as err:
            raise SpecError(f"unknown device {err.args[0]!r}", hint=f"devices are: {', '.join(self.ids)}") from None

    def route(self, a: int, b: int, nbytes: float) -> Route | None:
        """The fastest route for ``nbytes`` from ``a`` to ``b`` (None when ``a == b``)."""
        if a == b:
            return None
        return min(self.routes[(a, b)], key=lambda r: (r.time(nbytes), len(r.hops)))

    def matrix(self, nbytes: float) -> np.ndarray:
        """``D x D`` matrix of transfer times for one tensor size (diagonal 0)."""
        return np.min(self._L + nbytes * self._I, axis=2)


_TABLES: dict[int, tuple[Spec, LinkTable]] = {}


def link_table(spec: Spec) -> LinkTable:
    """The :class:`LinkTable` of ``spec``, built once per spec object (a few most recent kept)."""
    hit = _TABLES.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    if len(_TABLES) >= 64:
        _TABLES.pop(next(iter(_TABLES)))
    table = LinkTable(spec)
    _TABLES[id(spec)] = (spec, table)
    return table
