"""``metis``: balanced k-way graph partitioning (METIS-style), then parts matched to devices.

The classic placement baseline: ignore the schedule, cut the graph into ``k`` parts of
balanced compute with the fewest bytes crossing between parts (Karypis and Kumar, "A fast
and high quality multilevel scheme for partitioning irregular graphs", SIAM J. Sci.
Comput. 20(1), 1998), and give every part a device.

1. **Units.** Members of a co-location group are contracted into one unit. The undirected
   unit graph has edge weight = bytes of the edges between the units, and unit weight =
   the mean time of its nodes over the devices that may run them.
2. **Partition** by recursive bisection into ``k`` = the number of usable devices (those
   that may run at least one node). Every bisection splits the remaining device list in
   two and aims each side at its share of the weight: proportional to the devices' speed
   (``targets="speed"``, default; speed of ``d`` = mean time / time on ``d`` over the
   nodes it may run) or equal (``targets="equal"``, METIS' own balance). A bisection is
   computed by

   * ``pymetis`` (``part_graph(2, ...)``, the METIS library) when it is importable, or
   * the fallback: split the units in topological order at the target weight, refine
     with Kernighan-Lin pair swaps (``networkx.algorithms.community.
     kernighan_lin_bisection``; Kernighan and Lin, Bell Syst. Tech. J. 49, 1970),

   then nodes are moved from the heavier side (largest cut reduction first) until each
   side is within 3 % of its target weight.
3. **Match parts to devices** greedily: parts by decreasing weight, each to the free
   device that runs it fastest (a node the device cannot run priced at its fastest
   allowed device, where step 4 moves it).
4. **Fix-ups.** A unit on a device that cannot run it moves to its fastest allowed device;
   while a device's resident bytes (parameters, and the activations a co-location group
   keeps) overflow its memory budget, its largest unit moves to the allowed device with the
   most free memory that can take it; budgets start at the capacities and are lowered by
   the evaluated excess until the plan fits (:func:`.listsched.fit_memory`).
5. The order is left to the evaluator's list scheduling (``order=None``).

Options: :class:`MetisOptions` (``--option metis.KEY=VALUE``): ``backend`` = ``"auto"``
(pymetis if installed, else the fallback), ``"pymetis"`` (a :class:`SolverError` when it is
not installed) or ``"kl"``; ``targets`` = ``"speed"`` | ``"equal"``; ``kl_iter``.
Status: ``"heuristic"``; ``claimed`` is the evaluator's figure.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import networkx as nx
import numpy as np

from ...bounds.memory import group_step_need, resident_bytes
from ...errors import SolverError
from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.problem import Problem
from ..registry import register
from .listsched import MEMORY_ROUNDS, fit_memory
from .peft import allowed_mask

log = logging.getLogger(__name__)

BALANCE_TOL = 0.03


@dataclass(frozen=True)
class MetisOptions:
    """Options of ``metis``.

    Attributes
    ----------
    backend : {"auto", "pymetis", "kl"}
        Bisection by pymetis, or by the Kernighan-Lin fallback (auto: pymetis if installed).
    targets : {"speed", "equal"}
        Each part's share of the weight: in proportion to its device's speed, or equal (METIS' own balance).
    kl_iter : int or None
        Kernighan-Lin passes per bisection (None: 10, or 3 above 3,000 units).
    """

    solver: ClassVar[str] = "metis"

    backend: Literal["auto", "pymetis", "kl"] = "auto"
    targets: Literal["speed", "equal"] = "speed"
    kl_iter: int | None = None


def _pymetis():
    """The pymetis module, or None when it is not installed."""
    try:
        return importlib.import_module("pymetis")
    except ImportError:
        return None


class _Units:
    """Groups contracted: ``members[u]`` nodes, ``weight[u]``, adjacency with byte weights."""

    def __init__(self, problem: Problem, allowed: np.ndarray):
        n = problem.n
        uid = np.full(n, -1, dtype=np.int64)
        members: list[list[int]] = []
        for v in range(n):
            if uid[v] >= 0:
                continue
            g = problem.group_of[v]
            mem = list(problem.groups[g]) if g >= 0 else [v]
            uid[mem] = len(members)
            members.append(sorted(mem))
        self.uid, self.members, self.m = uid, members, len(members)
        Tm = np.where(allowed, problem.T, np.nan)
        mean = np.nan_to_num(np.nanmean(Tm, axis=1), nan=0.0)
        self.node_mean = mean
        self.weight = np.bincount(uid, weights=mean, minlength=self.m)
        G = nx.Graph()
        G.add_nodes_from(range(self.m))
        for a, b, w in zip(uid[problem.edge_src].tolist(), uid[problem.edge_dst].tolist(),
                           problem.edge_bytes.tolist()):
            if a == b:
                continue
            if G.has_edge(a, b):
                G[a][b]["weight"] += w
            else:
                G.add_edge(a, b, weight=w)
        self.G = G


def _device_speed(problem: Problem, allowed: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Relative speed per device: mean time / own time over the nodes it may run."""
    T = np.where(allowed, problem.T, 0.0)
    own = T.sum(axis=0)
    ref = (allowed * mean[:, None]).sum(axis=0)
    return np.divide(ref, own, out=np.zeros(problem.D), where=own > 0)


def _bisect(U: _Units, units: list[int], frac: float, backend: str, kl_iter: int) -> tuple[list[int], list[int]]:
    """Split ``units`` into (A, B) with about ``frac`` of their weight in A."""
    w = U.weight
    units = sorted(units)
    tot = float(w[units].sum())
    if len(units) < 2:
        return (units, []) if frac >= 0.5 else ([], units)
    cum = np.cumsum(w[units])
    if backend == "pymetis":
        A, B = _bisect_pymetis(U, units)
        wa = float(w[A].sum()) if A else 0.0
        if (wa < 0.5 * tot) != (frac < 0.5):  # put the heavier half where more weight goes
            A, B = B, A
    else:
        cut = int(np.searchsorted(cum, frac * tot, side="left")) + 1 if tot > 0 else int(round(frac * len(units)))
        cut = min(max(cut, 1), len(units) - 1)
        A, B = set(units[:cut]), set(units[cut:])
        H = U.G.subgraph(units)
        if H.number_of_edges():
            A, B = nx.algorithms.community.kernighan_lin_bisection(H, (A, B), max_iter=kl_iter, weight="weight")
    return _rebalance(U, sorted(A), sorted(B), frac)


def _bisect_pymetis(U: _Units, units: list[int]) -> tuple[list[int], list[int]]:
    pm = _pymetis()
    idx = {u: k for k, u in enumerate(units)}
    H = U.G.subgraph(units)
    xadj, adjncy, ew = [0], [], []
    emax = max((d["weight"] for _, _, d in H.edges(data=True)), default=1.0) or 1.0
    for u in units:
        for v, d in sorted(H[u].items()):
            adjncy.append(idx[v])
            ew.append(1 + int(1e4 * d["weight"] / emax))
        xadj.append(len(adjncy))
    w = U.weight[units]
    vw = [1 + int(1e6 * x / max(float(w.sum()), 1e-300)) for x in w]
    if not adjncy:
        order = np.argsort(-w, kind="stable")
        A = [units[k] for k in order[::2]]
        return A, [u for u in units if u not in set(A)]
    _, memb = pm.part_graph(2, xadj=xadj, adjncy=adjncy, vweights=vw, eweights=ew)
    A = [u for u, p in zip(units, memb) if p == 0]
    B = [u for u, p in zip(units, memb) if p != 0]
    return A, B


def _rebalance(U: _Units, A: list[int], B: list[int], frac: float) -> tuple[list[int], list[int]]:
    """Move units off the side above its target (largest cut reduction first)."""
    w = U.weight
    tot = float(w[A].sum() + w[B].sum())
    if tot <= 0:
        return A, B
    target = {0: frac * tot, 1: (1 - frac) * tot}
    side = {u: 0 for u in A}
    side.update({u: 1 for u in B})
    load = [float(w[A].sum()), float(w[B].sum())]
    heavy = 0 if load[0] - target[0] > load[1] - target[1] else 1
    if load[heavy] <= target[heavy] * (1 + BALANCE_TOL):
        return A, B
    light = 1 - heavy
    G = U.G

    def gain(u):
        g = 0.0
        for v, d in G[u].items():
            s = side.get(v)
            if s == light:
                g += d["weight"]
            elif s == heavy:
                g -= d["weight"]
        return g

    cands = sorted((u for u, s in side.items() if s == heavy), key=lambda u: (-gain(u), u))
    for u in cands:
        if load[heavy] <= target[heavy] * (1 + BALANCE_TOL):
            break
        # do not overshoot: the moved unit must bring the heavy side closer to its target
        if abs(load[heavy] - w[u] - target[heavy]) >= abs(load[heavy] - target[heavy]):
            continue
        side[u] = light
        load[heavy] -= w[u]
        load[light] += w[u]
    A = sorted(u for u, s in side.items() if s == 0)
    B = sorted(u for u, s in side.items() if s == 1)
    return A, B


def partition(U: _Units, shares: list[float], backend: str, kl_iter: int) -> list[list[int]]:
    """Recursive bisection of all units into ``len(shares)`` parts sized by ``shares``."""
    def rec(units: list[int], sh: list[float]) -> list[list[int]]:
        if len(sh) == 1:
            return [units]
        h = len(sh) // 2
        frac = sum(sh[:h]) / sum(sh) if sum(sh) > 0 else h / len(sh)
        A, B = _bisect(U, units, frac, backend, kl_iter)
        return rec(A, sh[:h]) + rec(B, sh[h:])

    return rec(list(range(U.m)), shares)


def _match(problem: Problem, U: _Units, parts: list[list[int]], devices: list[int], allowed: np.ndarray) -> list[int]:
    """Greedy matching: heaviest part first, to the free device that runs it fastest."""
    Tm = np.where(allowed, problem.T, np.inf)
    # a node the device cannot run is priced at its fastest allowed device (where the
    # fix-up will move it)
    T = np.where(allowed, problem.T, Tm.min(axis=1, keepdims=True))
    free = list(devices)
    dev_of = [-1] * len(parts)
    for p in sorted(range(len(parts)), key=lambda p: (-float(U.weight[parts[p]].sum()), p)):
        nodes = [v for u in parts[p] for v in U.members[u]]
        best = min(free, key=lambda d: (float(T[nodes, d].sum()), d))
        dev_of[p] = best
        free.remove(best)
    return dev_of


def _fixups(problem: Problem, U: _Units, unit_dev: np.ndarray, allowed: np.ndarray, cap: np.ndarray) -> dict:
    """Unsupported units to their fastest allowed device; then relieve memory overflows
    (resident bytes, :func:`partitioner.bounds.memory.resident_bytes`, within ``cap``) and
    move off each unit whose own steps need more room than ``cap`` leaves
    (:func:`partitioner.bounds.memory.group_step_need`)."""
    T = np.where(allowed, problem.T, np.inf)
    moved_support = moved_memory = 0
    res = resident_bytes(problem)
    ok = np.ones(U.m, dtype=bool)
    unit_T = np.zeros((U.m, problem.D))
    unit_par = np.zeros(U.m)
    for u, mem in enumerate(U.members):
        unit_T[u] = T[mem].sum(axis=0)
        unit_par[u] = res[mem].sum()
        ok[u] = np.isfinite(unit_T[u, unit_dev[u]])
    for u in np.flatnonzero(~ok):
        unit_dev[u] = int(np.argmin(unit_T[u]))
        moved_support += 1
    if problem.constraints.memory:
        need = group_step_need(problem)
        unit_need = np.array([need[mem].max() for mem in U.members])  # room a unit's own steps need
        used = np.bincount(unit_dev, weights=unit_par, minlength=problem.D)
        for d in range(problem.D):
            on = np.flatnonzero(unit_dev == d)
            if used[d] <= cap[d] and not (unit_need[on] > cap[d]).any():
                continue
            # units whose steps do not fit the budget first, then the largest
            for u in sorted(on, key=lambda u: (unit_need[u] <= cap[d], -unit_par[u], u)):
                if used[d] <= cap[d] and unit_need[u] <= cap[d]:
                    continue
                dests = [f for f in range(problem.D) if f != d and np.isfinite(unit_T[u, f])
                         and used[f] + unit_par[u] <= cap[f] and unit_need[u] <= cap[f]]
                if not dests:
                    continue
                f = max(dests, key=lambda f: (cap[f] - used[f], -f))
                unit_dev[u] = f
                used[d] -= unit_par[u]
                used[f] += unit_par[u]
                moved_memory += 1
    return {"moved_unsupported": moved_support, "moved_memory": moved_memory}


@register("metis", "balanced k-way partition (METIS if pymetis is installed, else recursive "
                   "Kernighan-Lin bisection), parts matched to devices by speed", options=MetisOptions)
def solve(problem: Problem, settings: Settings) -> Plan:
    opts = settings.options_of(MetisOptions)
    backend = opts.backend
    have = _pymetis() is not None
    if backend == "pymetis" and not have:
        raise SolverError("pymetis is not installed; pip install pymetis",
                          hint="or use option metis.backend=kl (the Kernighan-Lin fallback)")
    if backend == "auto":
        backend = "pymetis" if have else "kl"
    targets = opts.targets
    n = problem.n
    if n == 0:
        return Plan((), None, status="heuristic", claimed=0.0)
    allowed = allowed_mask(problem)
    U = _Units(problem, allowed)
    kl_iter = opts.kl_iter if opts.kl_iter is not None else 10 if U.m <= 3000 else 3
    usable = [d for d in range(problem.D) if allowed[:, d].any()]
    speed = _device_speed(problem, allowed, U.node_mean)
    usable.sort(key=lambda d: (-speed[d], d))
    shares = [float(speed[d]) for d in usable] if targets == "speed" else [1.0] * len(usable)
    parts = partition(U, shares, backend, kl_iter)
    dev_of = _match(problem, U, parts, usable, allowed)
    unit_dev = np.zeros(U.m, dtype=np.int64)
    for p, units in enumerate(parts):
        unit_dev[units] = dev_of[p]
    info: dict = {}

    def build(budget: np.ndarray) -> Plan:
        ud = unit_dev.copy()
        info.update(_fixups(problem, U, ud, allowed, budget))
        return Plan(tuple(int(x) for x in ud[U.uid]), None, status="heuristic")

    rounds = MEMORY_ROUNDS if problem.constraints.memory else 1
    plan, ev, info["memory_rounds"] = fit_memory(problem, build, rounds, settings.deadline())
    unit_dev = np.asarray(plan.placement)[[m[0] for m in U.members]]
    parts_w = [float(U.weight[p].sum()) for p in parts]
    cut = sum(d["weight"] for a, b, d in U.G.edges(data=True) if unit_dev[a] != unit_dev[b])
    info.update(backend=backend, targets=targets, k=len(usable), part_weights=parts_w,
                part_devices=[problem.devices[d] for d in dev_of], cut_bytes=float(cut), feasible=ev.feasible)
    return plan.with_(claimed=float(ev.value(problem.objective)), info=info)
