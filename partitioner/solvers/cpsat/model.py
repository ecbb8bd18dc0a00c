"""Model construction for the ``cpsat`` solver (the formulation is stated in ``cpsat.py``).

Everything here works on a :class:`~partitioner.machine.problem.Boundary` (a subset of the nodes
with fixed surroundings), in integer time units: :func:`build_model` creates the CP-SAT
model, :func:`set_hint` adds a warm start, :func:`extract` reads a solution back, and
:func:`forward` computes the earliest-start schedule of a placement and per-device order
under the same machine model as the evaluator, with real (float) or integer durations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from ...machine.evaluate import subset_schedule as forward
from ...machine.problem import Boundary, Problem

#: the time unit is ``horizon / 2**K_BITS``: integers stay near 1e9
K_BITS = 30
#: memory unit: the largest capacity / 2**MEM_BITS bytes
MEM_BITS = 30

CONSERVATIVE = "conservative"  # side constraints rounded so that the model accepts only feasible plans
RELAXED = "relaxed"            # side constraints rounded/relaxed so that no feasible plan is cut off


def ceil_units(x: float, unit: float) -> int:
    """``ceil(x / unit)`` (0 for ``x <= 0``): rounding up over-estimates every time."""
    return int(math.ceil(x / unit)) if x > 0 else 0


def floor_units(x: float, unit: float) -> int:
    """``floor(x / unit)``, shaved by a relative 1e-12 so float error never rounds up."""
    return int(math.floor(x / unit * (1 - 1e-12))) if x > 0 else 0


def edge_levels(problem: Problem, nodes_in: set[int] | None, u: int) -> tuple[list[tuple[int, float]], list[float]]:
    """``u``'s out-edges to consumers in the subset, and their distinct byte sizes (decreasing)."""
    out = [(v, b) for v, b in problem.succ_bytes[u] if nodes_in is None or v in nodes_in]
    return out, sorted({b for _, b in out}, reverse=True)


def serial_horizon(problem: Problem, bnd: Boundary) -> float:
    """An upper bound on the sub-objective of every plan: a longest path visits every node
    once (its slowest device), at most one transfer per node (its slowest), one release
    and one tail."""
    nodes = set(bnd.nodes)
    D = problem.D
    total = 0.0
    for i, v in enumerate(bnd.nodes):
        devs = problem.allowed_devices(v)
        total += float(problem.T[v, devs].max()) if devs.size else 0.0
        _, levels = edge_levels(problem, nodes, v)
        if levels:
            total += max(problem.comm(a, b, levels[0]) for a in range(D) for b in range(D))
    total += max(float(np.max(bnd.release, initial=0.0)), float(np.max(bnd.device_ready, initial=0.0)))
    total += float(np.max(bnd.tail, initial=0.0))
    return total


@dataclass
class Side:
    """Side constraints of a model (None: absent)."""

    memory: bool = True
    floor_period: float | None = None      # the throughput floor as a period (s)
    latency_ceiling: float | None = None   # s


@dataclass
class Built:
    """A CP-SAT model and the handles needed to hint it and read it back."""

    model: cp_model.CpModel
    problem: Problem
    nodes: tuple[int, ...]
    allowed: dict[int, list[int]]
    unit: float                      # seconds per integer time step (schedule)
    load_unit: float | None          # seconds per integer step of loads
    dur: dict[tuple[int, int], int]
    comm_int: Callable[[int, int, float], int]
    rel: dict[tuple[int, int], int]
    tail: dict[tuple[int, int], int]
    p: dict[tuple[int, int], cp_model.IntVar] = field(default_factory=dict)
    start: dict[int, cp_model.IntVar] = field(default_factory=dict)
    end: dict[int, cp_model.IntVar] = field(default_factory=dict)
    arr: dict[tuple[int, int], cp_model.IntVar] = field(default_factory=dict)
    makespan: cp_model.IntVar | None = None
    period: cp_model.IntVar | None = None
    n_terms: int = 0                 # rounded terms on any path (schedule) or resource (loads)
    active: list[str] = field(default_factory=list)  # side constraints that may bind
    aux_hint: list[Callable[[dict[int, int]], list[tuple[cp_model.IntVar, int]]]] = field(default_factory=list)


def build_model(problem: Problem, bnd: Boundary, *, unit: float, horizon_int: int, mode: str, side: Side,
                objective: str = "latency", load_unit: float | None = None, schedule: bool = True) -> Built:
    """Build the CP-SAT model of the subproblem ``bnd`` (see ``cpsat.py`` for the formulation).

    Parameters
    ----------
    unit : float
        Seconds per integer time step of the schedule; every duration, transfer, release
        and tail is rounded up to a whole number of steps.
    horizon_int : int
        Upper bound of every time variable (steps).
    mode : {"conservative", "relaxed"}
        How side constraints are rounded: conservative accepts only plans the evaluator
        accepts; relaxed cuts off no plan the evaluator accepts (params-only memory,
        loads rounded down).
    objective : {"latency", "period"}
    load_unit : float, optional
        Seconds per integer step of device/link loads (period objective or floor).
    schedule : bool
        Build the scheduling part (start/end, intervals, makespan).
    """
    m = cp_model.CpModel()
    nodes = tuple(int(v) for v in bnd.nodes)
    inset = set(nodes)
    loc = {v: i for i, v in enumerate(nodes)}
    T = problem.T
    allowed = {v: [int(d) for d in problem.allowed_devices(v)] for v in nodes}
    dur = {(v, d): ceil_units(T[v, d], unit) for v in nodes for d in allowed[v]}
    rel = {(v, d): max(ceil_units(bnd.release[loc[v], d], unit), ceil_units(bnd.device_ready[d], unit))
           for v in nodes for d in allowed[v]}
    tail = {(v, d): ceil_units(bnd.tail[loc[v], d], unit) for v in nodes for d in allowed[v]}
    ccache: dict[tuple[int, int, float], int] = {}

    def comm_int(a: int, b: int, nbytes: float) -> int:
        k = (a, b, nbytes)
        if k not in ccache:
            ccache[k] = ceil_units(problem.comm(a, b, nbytes), unit)
        return ccache[k]

    H = int(horizon_int)
    # prune options that cannot fit in the horizon (every plan worth having fits)
    for v in nodes:
        keep = [d for d in allowed[v] if rel[(v, d)] + dur[(v, d)] + tail[(v, d)] <= H] if schedule else allowed[v]
        allowed[v] = keep or allowed[v]
    B = Built(m, problem, nodes, allowed, unit, load_unit, dur, comm_int, rel, tail)
    p = B.p
    for v in nodes:
        for d in allowed[v]:
            p[(v, d)] = m.new_bool_var(f"p[{v},{d}]")
        m.add_exactly_one(p[(v, d)] for d in allowed[v])
    for g in problem.groups:  # members of a group share a device
        members = [v for v in g if v in inset]
        for v, w in zip(members, members[1:]):
            for d in set(allowed[v]) | set(allowed[w]):
                a = p.get((v, d), 0)
                b = p.get((w, d), 0)
                m.add(a == b)

    def pexpr(v: int, coef: Callable[[int], int], skip: int | None = None):
        ds = [d for d in allowed[v] if d != skip and coef(d)]
        return cp_model.LinearExpr.weighted_sum([p[(v, d)] for d in ds], [coef(d) for d in ds])

    if schedule:
        _schedule_part(problem, B, bnd, inset, H, pexpr)
    if side.memory:
        _memory_part(problem, B, bnd, inset, mode)
    if objective == "period" or side.floor_period is not None:
        if load_unit is None:
            raise ValueError("load_unit is needed for loads")
        rhs = None
        if objective != "period":
            fp = side.floor_period
            rhs = floor_units(fp, load_unit) if mode == CONSERVATIVE else floor_units(fp / (1 - 1e-9), load_unit) + 1
        _load_part(problem, B, inset, load_unit, mode if objective != "period" else CONSERVATIVE,
                   rhs, objective == "period", H, side.floor_period)
    if side.latency_ceiling is not None and schedule:
        c = side.latency_ceiling * (1 + 1e-9)
        lim = floor_units(c, unit) if mode == CONSERVATIVE else floor_units(c, unit) + 2 * len(nodes) + 3
        m.add(B.makespan <= lim)
        B.active.append(f"latency ceiling {side.latency_ceiling:.6g} s")
    if objective == "latency":
        m.minimize(B.makespan)
        B.n_terms = 2 * len(nodes) + 2
    else:
        m.minimize(B.period)
    return B


def _schedule_part(problem: Problem, B: Built, bnd: Boundary, inset: set[int], H: int, pexpr) -> None:
    m, p, nodes, allowed = B.model, B.p, B.nodes, B.allowed
    D = problem.D
    intervals: list[list] = [[] for _ in range(D)]
    for d in range(D):
        r = ceil_units(bnd.device_ready[d], B.unit)
        if r > 0:
            intervals[d].append(m.new_fixed_size_interval_var(0, r, f"ready[{d}]"))
    for v in nodes:
        s = B.start[v] = m.new_int_var(0, H, f"start[{v}]")
        e = B.end[v] = m.new_int_var(0, H, f"end[{v}]")
        m.add(e == s + pexpr(v, lambda d: B.dur[(v, d)]))
        for d in allowed[v]:
            intervals[d].append(m.new_optional_fixed_size_interval_var(s, B.dur[(v, d)], p[(v, d)], f"iv[{v},{d}]"))
        if any(B.rel[(v, d)] for d in allowed[v]):
            m.add(s >= pexpr(v, lambda d: B.rel[(v, d)]))
    for d in range(D):
        if len(intervals[d]) > 1:
            m.add_no_overlap(intervals[d])
    # precedence and transfers: one transfer per (producer, destination device), charged at
    # the largest bytes among the producer's edges to consumers on that device
    for u in nodes:
        out, levels = edge_levels(problem, inset, u)
        for v, _ in out:
            m.add(B.start[v] >= B.end[u])
        for b in sorted({d for v, _ in out for d in allowed[v]}):
            if not any(a != b for a in allowed[u]):
                continue
            cons = [(v, nb) for v, nb in out if b in allowed[v]]
            if len(levels) == 1:
                for v, nb in cons:
                    ex = pexpr(u, lambda a: B.comm_int(a, b, nb), skip=b)
                    m.add(B.start[v] >= B.end[u] + ex).only_enforce_if(p[(v, b)])
            else:
                arr = B.arr[(u, b)] = m.new_int_var(0, H, f"arr[{u},{b}]")
                for v, nb in cons:
                    ex = pexpr(u, lambda a: B.comm_int(a, b, nb), skip=b)
                    m.add(arr >= B.end[u] + ex).only_enforce_if(p[(v, b)])
                    m.add(B.start[v] >= arr).only_enforce_if(p[(v, b)])
    mk = B.makespan = m.new_int_var(0, H, "makespan")
    for v in nodes:
        m.add(mk >= B.end[v] + pexpr(v, lambda d: B.tail[(v, d)]))
    for d in range(D):  # redundant: a device's nodes run one after the other after it is ready
        vs = [v for v in nodes if d in allowed[v]]
        if vs:
            m.add(mk >= ceil_units(bnd.device_ready[d], B.unit)
                  + cp_model.LinearExpr.weighted_sum([p[(v, d)] for v in vs], [B.dur[(v, d)] for v in vs]))


def _memory_part(problem: Problem, B: Built, bnd: Boundary, inset: set[int], mode: str) -> None:
    """Conservative: params + outputs + received tensors (at their largest edge) + model
    inputs received, which bounds the evaluator's peak from above. Relaxed: params only."""
    m, p, allowed = B.model, B.p, B.allowed
    cap = np.asarray(bnd.capacity, dtype=float)
    mu = max(float(cap.max(initial=0.0)), 1.0) / 2 ** MEM_BITS
    for d in range(problem.D):
        vs = [v for v in B.nodes if d in allowed[v]]
        if mode == RELAXED:
            coefs = [floor_units(problem.param_bytes[v], mu) for v in vs]
            rhs = floor_units(cap[d] * (1 + 1e-9), mu) + 1
            if sum(coefs) > rhs:
                m.add(cp_model.LinearExpr.weighted_sum([p[(v, d)] for v in vs], coefs) <= rhs)
                B.active.append(f"memory of {problem.devices[d]!r} (parameters alone)")
            continue
        rhs = floor_units(cap[d], mu)
        terms, coefs, maxsum = [], [], 0
        for v in vs:
            c = ceil_units(problem.param_bytes[v] + problem.output_bytes[v], mu)
            terms.append(p[(v, d)]), coefs.append(c)
            maxsum += c
        recv = []
        for u in B.nodes:
            out, levels = edge_levels(problem, inset, u)
            cons = [(v, nb) for v, nb in out if d in allowed[v]]
            if not cons or allowed[u] == [d]:
                continue
            top = ceil_units(max(nb for _, nb in cons), mu)
            if top == 0:
                continue
            recv.append((u, cons, top))
            maxsum += top
        ins = []
        for k, (nb, dsts) in enumerate(problem.in_tensors):
            js = [j for j in dsts if j in inset and d in allowed[j]]
            if js and ceil_units(nb, mu):
                ins.append((k, js, ceil_units(nb, mu)))
                maxsum += ceil_units(nb, mu)
        if maxsum <= rhs:
            continue
        B.active.append(f"memory of {problem.devices[d]!r}")
        for u, cons, top in recv:
            r = m.new_int_var(0, top, f"recv[{u},{d}]")
            pu = p.get((u, d), 0)
            for v, nb in cons:
                c = ceil_units(nb, mu)
                m.add(r >= c * p[(v, d)] - c * pu)
            terms.append(r), coefs.append(1)

            def h(pl, u=u, cons=cons, d=d, r=r):
                if pl[u] == d:
                    return [(r, 0)]
                return [(r, max([ceil_units(nb, mu) for v, nb in cons if pl[v] == d], default=0))]
            B.aux_hint.append(h)
        for k, js, c in ins:
            x = m.new_bool_var(f"in[{k},{d}]")
            for j in js:
                m.add(x >= p[(j, d)])
            terms.append(x), coefs.append(c)
            B.aux_hint.append(lambda pl, x=x, js=js, d=d: [(x, int(any(pl[j] == d for j in js)))])
        m.add(cp_model.LinearExpr.weighted_sum(terms, coefs) <= rhs)


def _load_part(problem: Problem, B: Built, inset: set[int], lu: float, mode: str, rhs: int | None,
               as_objective: bool, H: int, rhs_s: float | None = None) -> None:
    """Per-sample loads of devices and directed links (the evaluator's period model).

    Transfer indicators: ``s[u,b,j]`` = "some consumer of ``u`` with bytes >= level j is on
    ``b``" (monotone in j), ``t[u,a,b,j] >= p[u,a] + s[u,b,j] - s[u,b,j-1] - 1`` = "u on a
    sends level j to b"; every hop of its route loads its link (and, with
    ``comm_blocks_device``, both endpoint devices).
    """
    m, p, allowed, T = B.model, B.p, B.allowed, problem.T
    D, host, links = problem.D, problem.host, problem.links
    blocks = problem.spec.comm_blocks_device
    rnd = (lambda x: ceil_units(x, lu)) if mode == CONSERVATIVE else (lambda x: floor_units(x, lu))
    res: dict[tuple, tuple[list, list]] = {}

    def add(key, var, c):
        if c:
            t, cs = res.setdefault(key, ([], []))
            t.append(var), cs.append(c)

    def hops(a, b, nb, var):
        for x, y in links.route(a, b, nb).hops:
            lat, inv = links.hop[(x, y)]
            c = rnd(lat + nb * inv)
            add(("link", x, y), var, c)
            if blocks:
                add(("dev", x), var, c)
                add(("dev", y), var, c)

    for v in B.nodes:
        for d in allowed[v]:
            add(("dev", d), p[(v, d)], rnd(T[v, d]))
    for u in B.nodes:
        out, levels = edge_levels(problem, inset, u)
        for b in sorted({d for v, _ in out for d in allowed[v]}):
            senders = [a for a in allowed[u] if a != b]
            if not senders:
                continue
            svars = []
            for j, L in enumerate(levels):
                s = m.new_bool_var(f"s[{u},{b},{j}]")
                for v, nb in out:
                    if nb >= L and b in allowed[v]:
                        m.add(s >= p[(v, b)])
                if svars:
                    m.add(s >= svars[-1])
                svars.append(s)
            for a in senders:
                for j, L in enumerate(levels):
                    t = m.new_bool_var(f"t[{u},{a},{b},{j}]")
                    lo = p[(u, a)] + svars[j] - (svars[j - 1] if j else 0) - 1
                    m.add(t >= lo)
                    hops(a, b, L, t)

            def h(pl, b=b, out=out, levels=levels, svars=svars):
                top = max([nb for v, nb in out if pl[v] == b], default=None)
                return [(s, int(top is not None and top >= L)) for s, L in zip(svars, levels)]
            B.aux_hint.append(h)
    for k, (nb, dsts) in enumerate(problem.in_tensors):
        js = [j for j in dsts if j in inset]
        for b in sorted({d for j in js for d in allowed[j]} - {host}):
            w = m.new_bool_var(f"w[{k},{b}]")
            for j in js:
                if b in allowed[j]:
                    m.add(w >= p[(j, b)])
            hops(host, b, nb, w)
            B.aux_hint.append(lambda pl, w=w, js=js, b=b: [(w, int(any(pl[j] == b for j in js)))])
    for s_, nb in problem.outputs:
        if s_ in inset:
            for a in allowed[s_]:
                if a != host:
                    hops(a, host, nb, p[(s_, a)])
    B.n_terms = max((len(t) for t, _ in res.values()), default=0)
    if as_objective:
        per = B.period = m.new_int_var(0, H, "period")
        for key in sorted(res):
            t, cs = res[key]
            m.add(per >= cp_model.LinearExpr.weighted_sum(t, cs))
        return
    for key in sorted(res):
        t, cs = res[key]
        if sum(cs) > rhs:
            m.add(cp_model.LinearExpr.weighted_sum(t, cs) <= rhs)
            B.active.append(f"throughput floor {1.0 / (rhs_s):.6g}/s")


def set_hint(B: Built, pl: dict[int, int], order: list[list[int]] | None) -> None:
    """Hint a placement (and, with a schedule part, the integer earliest-start schedule)."""
    m = B.model
    for (v, d), x in B.p.items():
        m.add_hint(x, pl[v] == d)
    if B.start and order is not None:
        st, fi, obj = int_schedule(B, pl, order)
        if math.isfinite(obj):
            for v in B.nodes:
                m.add_hint(B.start[v], st[v])
                m.add_hint(B.end[v], fi[v])
            m.add_hint(B.makespan, int(obj))
            inset = set(B.nodes)
            for (u, b), x in B.arr.items():
                ts = [fi[u] + B.comm_int(pl[u], b, nb) for v, nb in edge_levels(B.problem, inset, u)[0]
                      if pl[v] == b and pl[u] != b]
                m.add_hint(x, max(ts, default=fi[u]))
    for h in B.aux_hint:
        for var, val in h(pl):
            m.add_hint(var, val)


def int_schedule(B: Built, pl: dict[int, int], order: list[list[int]]):
    """The integer model's earliest-start schedule for a placement and order."""
    problem = B.problem
    return forward(problem, B.nodes, pl, order, lambda v, d: B.dur[(v, d)], B.comm_int,
                   lambda v, d: B.rel[(v, d)], lambda v, d: B.tail[(v, d)])


def extract(B: Built, solver: cp_model.CpSolver) -> tuple[dict[int, int], list[list[int]] | None]:
    """Placement from the presences; per-device order by (start, end, node index)."""
    pl = {}
    for v in B.nodes:
        for d in B.allowed[v]:
            if solver.boolean_value(B.p[(v, d)]):
                pl[v] = d
                break
    if not B.start:
        return pl, None
    D = B.problem.D
    order: list[list[int]] = [[] for _ in range(D)]
    for v in sorted(B.nodes, key=lambda v: (solver.value(B.start[v]), solver.value(B.end[v]), v)):
        order[pl[v]].append(v)
    return pl, order
