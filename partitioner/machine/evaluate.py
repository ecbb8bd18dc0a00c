"""THE evaluator: the one place that computes a plan's latency, throughput and memory.

:func:`evaluate` applies the machine model (docs/architecture.md) to a plan: each device
runs its nodes one at a time in the plan's order (without an order, list scheduling by
decreasing upward rank, :func:`list_order`), a tensor is sent once per (producer,
destination device) at the transfer time of :mod:`.links`, and model inputs start and
outputs end on the host. It returns the latency, the period (the largest per-sample load
of a device or directed link; replicas are charged for what they share,
:func:`_evaluate_replicas`), each device's memory peak (:mod:`.memory`) and every violated
constraint. :func:`subset_schedule` times a sub-plan for the exact solvers;
:func:`contended_latency` adds per-link serialisation.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..ir.plan import Objective, Plan
from .memory import activation_peaks
from .problem import Problem

_TOL = 1e-9


@dataclass(frozen=True)
class Transfer:
    """One tensor moved between devices for one sample (``producer`` -1: a model input;
    ``consumer_device`` is the host for a model output)."""

    producer: int
    src: int
    dst: int
    bytes: float
    start: float
    arrival: float
    kind: str = "edge"  # edge | input | output


@dataclass(frozen=True)
class Evaluation:
    """A plan's figures. Times in seconds; memory in bytes; indices as in the Problem."""

    feasible: bool
    violations: tuple[str, ...]
    latency: float
    period: float
    start: np.ndarray
    finish: np.ndarray
    order: tuple[tuple[int, ...], ...]
    device_load: np.ndarray
    link_load: dict[tuple[int, int], float]
    memory_peak: np.ndarray
    param_bytes: np.ndarray
    transfers: tuple[Transfer, ...] = ()
    replicas: tuple["Evaluation", ...] = field(default=())

    @property
    def throughput(self) -> float:
        return 1.0 / self.period if self.period > 0 else math.inf

    def value(self, objective: Objective | str) -> float:
        return self.latency if Objective(objective) is Objective.LATENCY else self.period


def pieces(problem: Problem, placement) -> list[list[int]]:
    """The pieces of a plan: connected components of the graph restricted to edges whose ends
    share a device (what emit cuts into segments, at least), each in index order, smallest first."""
    parent = list(range(problem.n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in zip(problem.edge_src.tolist(), problem.edge_dst.tolist()):
        if placement[u] == placement[v]:
            a, b = find(u), find(v)
            if a != b:
                parent[a] = b
    comp: dict[int, list[int]] = {}
    for v in range(problem.n):
        comp.setdefault(find(v), []).append(v)
    return sorted(comp.values(), key=lambda c: (len(c), c[0]))


def upward_rank(problem: Problem, placement) -> np.ndarray:
    """HEFT-style upward rank with the nodes' assigned devices and actual transfer times."""
    T, pl = problem.T, placement
    rank = np.zeros(problem.n)
    out_extra = np.zeros(problem.n)
    for s, b in problem.outputs:
        out_extra[s] = max(out_extra[s], problem.comm(pl[s], problem.host, b))
    for i in range(problem.n - 1, -1, -1):
        best = out_extra[i]
        di = pl[i]
        for j, b in problem.succ_bytes[i]:
            c = rank[j] + (problem.comm(di, pl[j], b) if pl[j] != di else 0.0)
            if c > best:
                best = c
        rank[i] = T[i, di] + best
    return rank


def list_order(problem: Problem, placement) -> tuple[tuple[int, ...], ...]:
    """Deterministic per-device order for a placement (decreasing upward rank)."""
    rank = upward_rank(problem, placement)
    seq = np.lexsort((np.arange(problem.n), -rank))
    order: list[list[int]] = [[] for _ in range(problem.D)]
    for i in seq:
        order[placement[i]].append(int(i))
    return tuple(tuple(o) for o in order)


def _transfer_bytes(problem: Problem, pl) -> dict[tuple[int, int], float]:
    """Bytes sent per (producer, destination device): the largest edge to that device."""
    xb: dict[tuple[int, int], float] = {}
    for i in range(problem.n):
        di = pl[i]
        for j, b in problem.succ_bytes[i]:
            dj = pl[j]
            if dj != di:
                k = (i, dj)
                if b > xb.get(k, -1.0):
                    xb[k] = b
    return xb


def _input_bytes(problem: Problem, pl) -> dict[tuple[int, int], float]:
    """Bytes of model input ``k`` needed on each device (sent from the host)."""
    ib: dict[tuple[int, int], float] = {}
    for k, (b, dsts) in enumerate(problem.in_tensors):
        for j in dsts:
            ib[(k, pl[j])] = b
    return ib


def evaluate(problem: Problem, plan: Plan) -> Evaluation:
    """Compute a plan's latency, period, loads, memory and feasibility.

    Parameters
    ----------
    problem : Problem
    plan : Plan
        Placement and optional per-device order; data-parallel plans carry ``replicas``.

    Returns
    -------
    Evaluation
        Infeasibility (unsupported placement, order against precedence, memory, group,
        floors/ceilings) is reported in ``violations``, not raised.
    """
    if plan.replicas:
        return _evaluate_replicas(problem, plan)
    problem.validate_plan(plan)
    pl = np.asarray(plan.placement, dtype=np.int64)
    n, D, T = problem.n, problem.D, problem.T
    violations: list[str] = []
    dur = T[np.arange(n), pl]
    bad = np.flatnonzero(~np.isfinite(dur))
    for i in bad[:5]:
        violations.append(f"node {problem.node_name(i)!r} (op {problem.graph.node(problem.node_name(i)).op!r}) "
                          f"is placed on {problem.devices[pl[i]]!r}, which cannot run it")
    if len(bad) > 5:
        violations.append(f"... and {len(bad) - 5} more unsupported placements")
    for g in problem.groups:
        if len(set(pl[g].tolist())) > 1:
            violations.append(f"group of node {problem.node_name(g[0])!r} is split across devices")
    order = plan.order if plan.order is not None else list_order(problem, pl)

    pl_l = pl.tolist()  # Python scalars in the loops below (the same figures as numpy's, faster to index)
    xb = _transfer_bytes(problem, pl_l)
    ib = _input_bytes(problem, pl_l)
    host = problem.host
    comm = problem.comm

    # ---- timing: Kahn over precedence + device-order chains -------------------------
    prev = [-1] * n
    nxt = [-1] * n
    for seq in order:
        for a, b in zip(seq, seq[1:]):
            prev[b] = a
            nxt[a] = b
    preds, node_inputs, succs = problem.preds, problem.node_inputs, problem.succs
    indeg = [len(p) + (q >= 0) for p, q in zip(preds, prev)]
    in_arrival = {key: comm(host, key[1], b) for key, b in ib.items()}
    start_l = [math.inf] * n
    finish_l = [math.inf] * n
    dur_l = dur.tolist()
    arrival: dict[tuple[int, int], float] = {}
    queue = deque(i for i in range(n) if indeg[i] == 0)
    done = 0
    while queue:
        v = queue.popleft()
        dv = pl_l[v]
        s = finish_l[prev[v]] if prev[v] >= 0 else 0.0
        for u in preds[v]:
            a = finish_l[u] if pl_l[u] == dv else arrival[(u, dv)]
            if a > s:
                s = a
        for k in node_inputs[v]:
            a = in_arrival[(k, dv)]
            if a > s:
                s = a
        start_l[v] = s
        f = s + dur_l[v]
        finish_l[v] = f
        done += 1
        for j in succs[v]:
            dj = pl_l[j]
            if dj != dv and (v, dj) not in arrival:
                arrival[(v, dj)] = f + comm(dv, dj, xb[(v, dj)])
            indeg[j] -= 1
            if indeg[j] == 0:
                queue.append(j)
        w = nxt[v]
        if w >= 0:
            indeg[w] -= 1
            if indeg[w] == 0:
                queue.append(w)
    start = np.array(start_l, dtype=float)
    finish = np.array(finish_l, dtype=float)
    if done < n:
        violations.append("the per-device order contradicts the graph's precedence (a cycle through device queues)")
        latency = math.inf
    else:
        latency = float(finish.max()) if n else 0.0
        for s_, b in problem.outputs:
            latency = max(latency, finish[s_] + comm(pl[s_], host, b))

    # ---- transfers, loads and period -----------------------------------------------
    transfers: list[Transfer] = []
    for (k, d), b in sorted(ib.items()):
        if d != host:
            transfers.append(Transfer(-1, host, d, b, 0.0, in_arrival[(k, d)], "input"))
    for (u, d), b in sorted(xb.items()):
        transfers.append(Transfer(u, pl_l[u], d, b, finish[u], arrival.get((u, d), math.inf), "edge"))
    for s_, b in problem.outputs:
        if pl_l[s_] != host:
            transfers.append(Transfer(s_, pl[s_], host, b, finish[s_], finish[s_] + comm(pl[s_], host, b), "output"))
    device_load = np.bincount(pl, weights=dur, minlength=D).astype(float)
    link_load: dict[tuple[int, int], float] = {}
    hops = problem.hops
    for tr in transfers:
        for r, t in problem.transfer_loads(tr.src, tr.dst, tr.bytes):
            if r < D:
                device_load[r] += t
            else:
                h = hops[r - D]
                link_load[h] = link_load.get(h, 0.0) + t
    period = max([float(device_load.max())] + list(link_load.values()))

    # ---- memory ----------------------------------------------------------------------
    param_bytes = np.bincount(pl, weights=problem.param_bytes, minlength=D).astype(float)
    memory_peak = activation_peaks(problem, pl_l, order, lambda u, d: xb[(u, d)]) + param_bytes
    if problem.constraints.memory:
        for d in range(D):
            cap = problem.capacity[d]
            if memory_peak[d] > cap * (1 + _TOL):
                io = (f" after the {problem.io_bytes / 1e9:.3f} GB of model inputs and outputs it holds"
                      if d == problem.host and problem.io_bytes > 0 else "")
                violations.append(f"device {problem.devices[d]!r} needs {memory_peak[d] / 1e9:.3f} GB but has "
                                  f"{cap / 1e9:.3f} GB usable{io} (short by {(memory_peak[d] - cap) / 1e9:.3f} GB)")
    _check_side_constraints(problem, latency, period, violations)
    return Evaluation(not violations, tuple(violations), float(latency), float(period), start, finish,
                      tuple(tuple(int(x) for x in s) for s in order), device_load, link_load, memory_peak,
                      param_bytes, tuple(transfers))


def _check_side_constraints(problem: Problem, latency: float, period: float, violations: list[str]) -> None:
    c = problem.constraints
    if c.throughput_floor is not None and period > 0 and 1.0 / period < c.throughput_floor * (1 - _TOL):
        violations.append(f"throughput {1.0 / period:.4g}/s is below the floor {c.throughput_floor:.4g}/s")
    if c.latency_ceiling is not None and latency > c.latency_ceiling * (1 + _TOL):
        violations.append(f"latency {latency:.4g} s is above the ceiling {c.latency_ceiling:.4g} s")


def _evaluate_replicas(problem: Problem, plan: Plan) -> Evaluation:
    """Data parallelism: replicas on disjoint device groups; throughputs add up, less what
    the replicas lose on resources they share (links, see below).

    ``device_load`` and ``link_load`` are per sample of the whole stream (each replica's
    loads weighted by its share of the stream)."""
    evs = [evaluate(problem, r) for r in plan.replicas]
    violations: list[str] = []
    used = [set(np.asarray(r.placement).tolist()) for r in plan.replicas]
    for a in range(len(used)):
        for b in range(a + 1, len(used)):
            common = used[a] & used[b]
            if common:
                violations.append(f"replicas {a} and {b} share device(s) "
                                  f"{sorted(problem.devices[d] for d in common)}")
    for k, ev in enumerate(evs):
        violations.extend(f"replica {k}: {v}" for v in ev.violations if "floor" not in v and "ceiling" not in v)
    rate = sum(ev.throughput for ev in evs)
    period = 1.0 / rate if rate > 0 else math.inf
    # Shared resources: replicas run on disjoint devices, but their transfers may cross the
    # same physical link (model inputs and outputs to the host, routes through a host or a
    # network link), and with comm_blocks_device a transfer occupies devices of another
    # group. With the stream split in proportion to the replicas' own throughputs (shares
    # w_k), a resource busy load_k(r) s per sample of replica k is busy sum_k w_k load_k(r)
    # per sample of the whole stream, so the period is the largest such sum; it equals
    # 1 / (sum of throughputs) when no resource is shared.
    link_load: dict[tuple[int, int], float] = {}
    device_load = np.zeros(problem.D)
    if math.isfinite(period) and all(ev.period > 0 and math.isfinite(ev.period) for ev in evs):
        for ev in evs:
            w = ev.throughput / rate
            device_load += w * ev.device_load
            for k, v in ev.link_load.items():
                link_load[k] = link_load.get(k, 0.0) + w * v
        shared = max([float(device_load.max())] + list(link_load.values()))
        period = max(period, shared)
    else:
        device_load = sum(ev.device_load for ev in evs)
        link_load = {k: v for ev in evs for k, v in ev.link_load.items()}
    latency = max(ev.latency for ev in evs)
    _check_side_constraints(problem, latency, period, violations)
    first = evs[0]
    return Evaluation(not violations, tuple(violations), latency, period, first.start, first.finish, first.order,
                      device_load, link_load,
                      np.max([ev.memory_peak for ev in evs], axis=0), sum(ev.param_bytes for ev in evs),
                      first.transfers, tuple(evs))


def subset_schedule(problem: Problem, nodes: tuple[int, ...], pl: dict[int, int], order: list[list[int]],
            dur: Callable[[int, int], float], comm: Callable[[int, int, float], float],
            rel: Callable[[int, int], float], tail: Callable[[int, int], float]):
    """Earliest-start schedule of ``nodes`` placed by ``pl`` in per-device ``order``.

    The machine model of :func:`partitioner.machine.evaluate.evaluate`: one transfer per (producer,
    destination device) at the largest bytes among the producer's edges to that device;
    a node starts after its device's previous node, its release (``rel``: inputs from
    outside the subset and the device's ready time) and its inputs' arrivals.

    Returns
    -------
    start, finish : dict
    objective : the largest ``finish + tail`` (inf when the order contradicts precedence)
    """
    inset = set(nodes)
    xb: dict[tuple[int, int], float] = {}
    for u in nodes:
        for v, b in problem.succ_bytes[u]:
            if v not in inset:
                continue
            if pl[v] != pl[u] and b > xb.get((u, pl[v]), -1.0):
                xb[(u, pl[v])] = b
    prev: dict[int, int] = {}
    nxt: dict[int, int] = {}
    for seq in order:
        for a, b in zip(seq, seq[1:]):
            prev[b], nxt[a] = a, b
    preds = {v: [u for u in problem.preds[v] if u in inset] for v in nodes}
    indeg = {v: len(preds[v]) + (v in prev) for v in nodes}
    queue = deque(v for v in nodes if indeg[v] == 0)
    start: dict[int, float] = {}
    finish: dict[int, float] = {}
    obj = 0
    while queue:
        v = queue.popleft()
        d = pl[v]
        s = rel(v, d)
        if v in prev:
            s = max(s, finish[prev[v]])
        for u in preds[v]:
            a = finish[u] if pl[u] == d else finish[u] + comm(pl[u], d, xb[(u, d)])
            s = max(s, a)
        start[v] = s
        finish[v] = s + dur(v, d)
        obj = max(obj, finish[v] + tail(v, d))
        for w in problem.succs[v]:
            if w in indeg:
                indeg[w] -= 1
                if indeg[w] == 0:
                    queue.append(w)
        if v in nxt:
            w = nxt[v]
            indeg[w] -= 1
            if indeg[w] == 0:
                queue.append(w)
    if len(start) < len(nodes):
        return start, finish, math.inf
    return start, finish, obj


def contended_latency(problem: Problem, plan: Plan) -> float:
    """The latency of ``plan`` when every directed link carries one transfer at a time.

    The canonical model (:func:`evaluate`) lets transfers overlap freely on a link. Here
    each hop of a route is a FIFO resource: a discrete-event simulation processes node
    finishes in time order, and each transfer they issue reserves its hops one after the
    other (store and forward), each at the later of its arrival at the hop and the hop's
    free time. Same placement, order, and transfer rules (once per (producer, destination)
    at the largest bytes; inputs from and outputs to the host) as :func:`evaluate`. Never
    below the canonical latency; equal when no two transfers share a hop at once.
    """
    import heapq

    n = problem.n
    pl = np.asarray(plan.placement, dtype=np.int64)
    order = plan.order if plan.order is not None else list_order(problem, pl)
    dur = problem.T[np.arange(n), pl]
    xb, ib = _transfer_bytes(problem, pl), _input_bytes(problem, pl)
    links, host = problem.links, problem.host
    hop_free: dict[tuple[int, int], float] = {}

    def send(t: float, a: int, b: int, nbytes: float) -> float:
        for hop, dt in links.hop_times(a, b, nbytes):
            t = max(t, hop_free.get(hop, 0.0)) + dt
            hop_free[hop] = t
        return t

    prev = {b: a for seq in order for a, b in zip(seq, seq[1:])}
    nxt = {a: b for seq in order for a, b in zip(seq, seq[1:])}
    ready = {}  # (producer, device) or ("in", k, device) -> arrival
    for (k, d), b in sorted(ib.items()):
        ready[("in", k, d)] = send(0.0, host, d, b) if d != host else 0.0
    waiting = np.array([len(p) for p in problem.preds], dtype=np.int64) + np.array(
        [v in prev for v in range(n)], dtype=np.int64)
    finish = np.full(n, math.inf)
    events: list[tuple[float, int]] = []

    def start_node(v: int) -> None:
        d = pl[v]
        s = finish[prev[v]] if v in prev else 0.0
        for u in problem.preds[v]:
            s = max(s, finish[u] if pl[u] == d else ready[(u, d)])
        for k in problem.node_inputs[v]:
            s = max(s, ready[("in", k, d)])
        finish[v] = s + dur[v]
        heapq.heappush(events, (finish[v], v))

    for v in range(n):
        if waiting[v] == 0:
            start_node(v)
    latency = 0.0
    while events:
        t, v = heapq.heappop(events)
        latency = max(latency, t)
        d = pl[v]
        for dj in sorted({int(pl[j]) for j in problem.succs[v]} - {int(d)}):
            ready[(v, dj)] = send(t, d, dj, xb[(v, dj)])
        for s_, b in problem.outputs:
            if s_ == v and d != host:
                latency = max(latency, send(t, d, host, b))
        for j in list(problem.succs[v]) + ([nxt[v]] if v in nxt else []):
            waiting[j] -= 1
            if waiting[j] == 0:
                start_node(j)
    return latency if np.all(np.isfinite(finish)) else math.inf
