"""Model construction and backends for the ``milp`` solvers (formulation: see ``milp.py``).

:class:`MilpModel` builds the variable families and constraints of a
:class:`~partitioner.machine.problem.Boundary` in scaled time units (``tau`` seconds per unit, so
that the horizon is about 1000 units and solver tolerances stay far below the evaluator's
1e-6), sets a full warm start from a plan, and reads a solution back. :func:`partitioner.solvers.milp.backends.run_backend`
solves a PuLP model with CBC or HiGHS and reports the status and the proven bound.

Ctrl-C (:func:`partitioner.progress.stop_requested`): HiGHS is stopped from its MIP
interrupt callback and keeps its incumbent and dual bound; CBC (a subprocess) is sent
SIGINT, stops with its incumbent and prints its bound. Either way the outcome is flagged
``interrupted``. HiGHS reports each improving solution (value and dual bound, in seconds)
to :mod:`partitioner.progress`.
"""

from __future__ import annotations

import logging

import numpy as np
import pulp

from ...errors import InfeasibleError
from ...machine.problem import Boundary, Problem

log = logging.getLogger(__name__)

#: the horizon (or the reference period) maps to this many model time units
TIME_UNITS = 1000.0
#: conservative memory rows keep this fraction of capacity free (absorbs solver tolerances)
MEM_SHAVE = 2e-6
#: throughput floors / latency ceilings are tightened by this relative amount (tolerances)
SIDE_RTOL = 1e-8

NONE, CONSERVATIVE, RELAXED = None, "conservative", "relaxed"


class _Lin:
    """A linear expression under construction: coefficients summed per variable."""

    __slots__ = ("t", "c")

    def __init__(self, c: float = 0.0):
        self.t: dict[pulp.LpVariable, float] = {}
        self.c = c

    def add(self, var, coef: float) -> "_Lin":
        if coef:
            self.t[var] = self.t.get(var, 0.0) + coef
        return self

    def addmap(self, terms: dict, k: float = 1.0) -> "_Lin":
        for var, coef in terms.items():
            self.add(var, k * coef)
        return self

    def value(self, vals: dict) -> float:
        return self.c + sum(coef * vals.get(v, 0.0) for v, coef in self.t.items())




def horizon(problem: Problem, bnd: Boundary) -> float:
    """An upper bound (s) on the sub-objective of every plan's earliest-start schedule.

    The critical chain of such a schedule visits each node once (at its slowest device),
    with at most one transfer before each node (its producer's largest, slowest), one
    release and one tail.
    """
    inset = set(bnd.nodes)
    D = problem.D
    total = 0.0
    for v in bnd.nodes:
        devs = problem.allowed_devices(v)
        total += float(problem.T[v, devs].max()) if devs.size else 0.0
        bs = [b for w, b in problem.succ_bytes[v] if w in inset]
        if bs and D > 1:
            total += max(problem.comm(a, b, max(bs)) for a in range(D) for b in range(D))
    total += max(float(np.max(bnd.release, initial=0.0)), float(np.max(bnd.device_ready, initial=0.0)))
    total += float(np.max(bnd.tail, initial=0.0))
    return total


def restricted_allowed(problem: Problem, nodes, devices=None) -> dict[int, tuple[int, ...]]:
    """Allowed devices per node (support and groups), optionally within ``devices``."""
    mask = None if devices is None else set(int(d) for d in devices)
    out = {}
    for v in nodes:
        devs = tuple(int(d) for d in problem.allowed_devices(v) if mask is None or int(d) in mask)
        if not devs:
            name = problem.node_name(v)
            where = "" if mask is None else f" among {sorted(problem.devices[d] for d in mask)}"
            raise InfeasibleError(f"node {name!r} (op {problem.graph.node(name).op!r}) can run on no device{where}",
                                  hint="add a device that supports the op")
        out[v] = devs
    return out


def memory_may_bind(problem: Problem, nodes, allowed, capacity) -> list[int]:
    """Devices whose conservative memory proxy could exceed capacity for some plan."""
    inset = set(nodes)
    out = []
    for d in range(problem.D):
        on = [v for v in nodes if d in allowed[v]]
        if not on:
            continue
        tot = float(sum(problem.param_bytes[v] + problem.output_bytes[v] for v in on))
        prods: dict[int, float] = {}
        for v in on:
            for u, b in problem.pred_bytes[v]:
                prods[u] = max(prods.get(u, 0.0), b)
        tot += sum(prods.values())
        tot += sum(b for b, dsts in problem.in_tensors if any(j in inset and d in allowed[j] for j in dsts))
        if tot > capacity[d] * (1 - MEM_SHAVE):
            out.append(d)
    return out


class MilpModel:
    """Variables and constraints of a placement/scheduling MILP on a Boundary.

    Variable families: ``x_{v}_{d}`` placement (binary, shared by a group), ``s_{v}``
    start, ``o_{u}_{v}`` disjunctive order, ``C`` makespan, ``P`` period,
    ``y_{u}_{a}_{b}_{l}`` transfer of ``u`` from ``a`` to ``b`` at byte level ``l``,
    ``i_{k}_{d}`` model input ``k`` needed on ``d``, ``r_{u}_{d}`` bytes of ``u``
    received on ``d`` (memory, in units of ``d``'s capacity).
    """

    def __init__(self, problem: Problem, bnd: Boundary, name: str, tau: float, devices=None):
        self.p = problem
        self.bnd = bnd
        self.tau = tau if tau > 0 else 1.0
        self.nodes = tuple(int(v) for v in bnd.nodes)
        self.inset = set(self.nodes)
        self.loc = {v: i for i, v in enumerate(self.nodes)}
        self.allowed = restricted_allowed(problem, self.nodes, devices)
        self.lp = pulp.LpProblem(name, pulp.LpMinimize)
        self.x: dict[tuple[int, int], pulp.LpVariable] = {}
        self.s: dict[int, pulp.LpVariable] = {}
        self.o: dict[tuple[int, int], pulp.LpVariable] = {}
        self.C: pulp.LpVariable | None = None
        self.P: pulp.LpVariable | None = None
        self.covers: dict[pulp.LpVariable, list[_Lin]] = {}  # aux var >= each expression
        self.inp: dict[tuple[int, int], pulp.LpVariable] = {}
        self.loads: tuple[dict, dict] | None = None
        self.memory_mode = NONE
        self.ub_units: float | None = None
        self.cap_s: float | None = None  # the largest valid objective bound used (set by builders)
        g = problem.group_of
        rep: dict[int, int] = {}
        for v in self.nodes:
            gi = int(g[v])
            if gi >= 0 and gi in rep:
                for d in self.allowed[v]:
                    self.x[(v, d)] = self.x[(rep[gi], d)]
                continue
            if gi >= 0:
                rep[gi] = v
            for d in self.allowed[v]:
                self.x[(v, d)] = self.lp.add_variable(f"x_{v}_{d}", cat=pulp.LpBinary)
            self._cons(f"assign_{v}", _Lin().addmap({self.x[(v, d)]: 1.0 for d in self.allowed[v]}), "==", 1.0)
        self.same_group = lambda u, v: g[u] >= 0 and g[u] == g[v]

    # ---- helpers ------------------------------------------------------------------
    def _cons(self, name: str, lin: _Lin, sense: str, rhs: float) -> None:
        s = {">=": pulp.LpConstraintGE, "<=": pulp.LpConstraintLE, "==": pulp.LpConstraintEQ}[sense]
        self.lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(lin.t, constant=lin.c), s, name, rhs))

    def dur(self, v: int) -> dict:
        """``sum_d T[v, d] x[v, d]`` in model units (as a term map)."""
        T = self.p.T
        return {self.x[(v, d)]: T[v, d] / self.tau for d in self.allowed[v]}

    def out_edges(self, u: int) -> list[tuple[int, float]]:
        """``u``'s edges to consumers in the subset on possibly other devices."""
        return [(v, b) for v, b in self.p.succ_bytes[u] if v in self.inset and not self.same_group(u, v)]

    def input_indicator(self, k: int, d: int) -> pulp.LpVariable:
        """``i_{k}_{d}`` >= x[j, d] for every consumer j of model input k in the subset."""
        key = (k, d)
        if key not in self.inp:
            var = self.inp[key] = self.lp.add_variable(f"i_{k}_{d}", lowBound=0, upBound=1)
            covs = self.covers.setdefault(var, [])
            for j in sorted(set(self.p.in_tensors[k][1])):
                if j in self.inset and d in self.allowed[j]:
                    lin = _Lin().add(self.x[(j, d)], 1.0)
                    covs.append(lin)
                    self._cons(f"icov_{k}_{d}_{j}", _Lin().add(var, 1.0).addmap(lin.t, -1.0), ">=", 0.0)
        return self.inp[key]

    # ---- timing ---------------------------------------------------------------------
    def add_timing(self, ub_s: float) -> None:
        """Start times, release, precedence with transfers, disjunctive order, makespan ``C``."""
        p, bnd, tau, nodes = self.p, self.bnd, self.tau, self.nodes
        T = p.T
        U = ub_s / tau
        self.ub_units = U
        A = self.allowed
        rel = {(v, d): max(bnd.release[self.loc[v], d], bnd.device_ready[d]) / tau for v in nodes for d in A[v]}
        tail = {(v, d): bnd.tail[self.loc[v], d] / tau for v in nodes for d in A[v]}
        tmin = {v: min(T[v, d] for d in A[v]) / tau for v in nodes}
        spred = {v: [u for u in p.preds[v] if u in self.inset] for v in nodes}
        ssucc = {v: [w for w in p.succs[v] if w in self.inset] for v in nodes}
        head, qtail = {}, {}
        for v in nodes:
            head[v] = max([min(rel[(v, d)] for d in A[v])] + [head[u] + tmin[u] for u in spred[v]])
        for v in reversed(nodes):
            qtail[v] = max([min(tail[(v, d)] for d in A[v])] + [tmin[w] + qtail[w] for w in ssucc[v]])
        for v in nodes:
            self.s[v] = self.lp.add_variable(f"s_{v}", lowBound=head[v], upBound=max(head[v], U - qtail[v] - tmin[v]))
        self.C = self.lp.add_variable("C", lowBound=0, upBound=U)
        s, x = self.s, self.x
        for v in nodes:
            if max(rel[(v, d)] for d in A[v]) > head[v]:
                self._cons(f"release_{v}", _Lin().add(s[v], 1.0).addmap({x[(v, d)]: -rel[(v, d)] for d in A[v]}),
                           ">=", 0.0)
        comm = p.comm
        for u in nodes:
            fu = _Lin().add(s[u], 1.0).addmap(self.dur(u))
            for v in ssucc[u]:
                self._cons(f"prec_{u}_{v}", _Lin().add(s[v], 1.0).addmap(fu.t, -1.0), ">=", 0.0)
            edges = self.out_edges(u)
            for v, B in edges:
                for b in A[v]:
                    ca = {a: comm(a, b, B) / tau for a in A[u] if a != b}
                    cmax = max(ca.values(), default=0.0)
                    if cmax > 0:
                        lin = _Lin().add(s[v], 1.0).addmap(fu.t, -1.0).addmap({x[(u, a)]: -c for a, c in ca.items()})
                        self._cons(f"xfer_{u}_{v}_{b}", lin.add(x[(v, b)], -cmax), ">=", -cmax)
                    # the transfer to b is sized by u's largest edge to a consumer on b
                    for v2, B2 in edges:
                        if B2 <= B or b not in A[v2]:
                            continue
                        ca2 = {a: comm(a, b, B2) / tau for a in A[u] if a != b}
                        c2 = max(ca2.values(), default=0.0)
                        if c2 <= 0:
                            continue
                        lin = _Lin().add(s[v], 1.0).addmap(fu.t, -1.0).addmap({x[(u, a)]: -c for a, c in ca2.items()})
                        lin.add(x[(v, b)], -c2).add(x[(v2, b)], -c2)
                        self._cons(f"xferbig_{u}_{v}_{v2}_{b}", lin, ">=", -2 * c2)
        # disjunctive pairs: not ordered by a path inside the subset, with a common device
        reach = {v: 0 for v in nodes}
        bit = {v: 1 << i for i, v in enumerate(nodes)}
        for v in reversed(nodes):
            r = 0
            for w in ssucc[v]:
                r |= bit[w] | reach[w]
            reach[v] = r
        for i, u in enumerate(nodes):
            fu = _Lin().add(s[u], 1.0).addmap(self.dur(u))
            for v in nodes[i + 1:]:
                if reach[u] & bit[v]:
                    continue
                common = [d for d in A[u] if d in A[v]]
                if not common:
                    continue
                o = self.o[(u, v)] = self.lp.add_variable(f"o_{u}_{v}", cat=pulp.LpBinary)
                fv = _Lin().add(s[v], 1.0).addmap(self.dur(v))
                M1 = max(0.0, U - qtail[u] - head[v])
                M2 = max(0.0, U - qtail[v] - head[u])
                for d in common:
                    # o = 1: u before v;  s[v] >= f[u] - M1 (3 - o - x[u,d] - x[v,d])
                    lin = _Lin().add(s[v], 1.0).addmap(fu.t, -1.0).add(o, -M1).add(x[(u, d)], -M1).add(x[(v, d)], -M1)
                    self._cons(f"seq_{u}_{v}_{d}", lin, ">=", -3 * M1)
                    # o = 0: v before u;  s[u] >= f[v] - M2 (2 + o - x[u,d] - x[v,d])
                    lin = _Lin().add(s[u], 1.0).addmap(fv.t, -1.0).add(o, M2).add(x[(u, d)], -M2).add(x[(v, d)], -M2)
                    self._cons(f"seqrev_{u}_{v}_{d}", lin, ">=", -2 * M2)
        for v in nodes:
            tl = {x[(v, d)]: tail[(v, d)] for d in A[v]}
            if not ssucc[v] or any(tl.values()):
                lin = _Lin().add(self.C, 1.0).add(s[v], -1.0).addmap(self.dur(v), -1.0).addmap(tl, -1.0)
                self._cons(f"makespan_{v}", lin, ">=", 0.0)
        # valid cuts: a used device runs all its nodes after the earliest release among them
        # and before the smallest tail among them (``u_d`` >= every x[v,d]: 1 if d is used)
        for d in range(p.D):
            on = [v for v in nodes if d in A[v]]
            if len(on) < 2:
                continue
            lin = _Lin().add(self.C, 1.0)
            for v in on:
                lin.add(x[(v, d)], -T[v, d] / tau)
            const = min(rel[(v, d)] for v in on) + min(tail[(v, d)] for v in on)
            if const > 0:
                u = self.lp.add_variable(f"used_{d}", lowBound=0, upBound=1)
                covs = self.covers.setdefault(u, [])
                for v in on:
                    covs.append(_Lin().add(x[(v, d)], 1.0))
                    self._cons(f"usedcov_{d}_{v}", _Lin().add(u, 1.0).add(x[(v, d)], -1.0), ">=", 0.0)
                lin.add(u, -const)
            self._cons(f"devload_{d}", lin, ">=", 0.0)

    # ---- loads (period) -----------------------------------------------------------------
    def add_loads(self) -> tuple[dict[int, _Lin], dict[tuple[int, int], _Lin]]:
        """Per-sample device and directed-link loads (model units), as the evaluator counts."""
        if self.loads is not None:
            return self.loads
        p, tau, A, x = self.p, self.tau, self.allowed, self.x
        dev = {d: _Lin() for d in range(p.D)}
        link: dict[tuple[int, int], _Lin] = {}
        links, blocks = p.links, p.spec.comm_blocks_device

        def charge(var, a: int, b: int, nbytes: float) -> None:
            for hx, hy in links.route(a, b, nbytes).hops:
                lat, inv = links.hop[(hx, hy)]
                t = (lat + nbytes * inv) / tau
                link.setdefault((hx, hy), _Lin()).add(var, t)
                if blocks:
                    dev[hx].add(var, t)
                    dev[hy].add(var, t)

        for v in self.nodes:
            for d in A[v]:
                dev[d].add(x[(v, d)], p.T[v, d] / tau)
        for u in self.nodes:
            edges = self.out_edges(u)
            levels = sorted({b for _, b in edges}, reverse=True)
            for li, L in enumerate(levels):
                at = [v for v, b in edges if b == L]
                bigger = [v for v, b in edges if b > L]
                for a in A[u]:
                    for b in sorted({d for v in at for d in A[v]} - {a}):
                        y = self.lp.add_variable(f"y_{u}_{a}_{b}_{li}", lowBound=0, upBound=1)
                        covs = self.covers.setdefault(y, [])
                        for v in at:
                            if b not in A[v]:
                                continue
                            lin = _Lin(-1.0).add(x[(u, a)], 1.0).add(x[(v, b)], 1.0)
                            for v2 in bigger:
                                if b in A[v2]:
                                    lin.add(x[(v2, b)], -1.0)
                            covs.append(lin)
                            self._cons(f"ycov_{u}_{a}_{b}_{li}_{v}", _Lin().add(y, 1.0).addmap(lin.t, -1.0),
                                       ">=", lin.c)
                        charge(y, a, b, L)
        for k, (b, dsts) in enumerate(p.in_tensors):
            devs = sorted({d for j in dsts if j in self.inset for d in A[j]})
            for d in devs:
                if d != p.host:
                    charge(self.input_indicator(k, d), p.host, d, b)
        for s_, b in p.outputs:
            if s_ in self.inset:
                for d in A[s_]:
                    if d != p.host:
                        charge(x[(s_, d)], d, p.host, b)
        self.loads = (dev, link)
        return self.loads

    def add_load_limit(self, limit_s: float, tag: str) -> None:
        """Every device and link load <= ``limit_s`` (a throughput floor as a period)."""
        dev, link = self.add_loads()
        lim = limit_s * (1 - SIDE_RTOL) / self.tau
        for d, lin in dev.items():
            if lin.t:
                self._cons(f"{tag}_dev_{d}", lin, "<=", lim)
        for (a, b), lin in sorted(link.items()):
            self._cons(f"{tag}_link_{a}_{b}", lin, "<=", lim)

    def add_period(self) -> None:
        """``P`` >= every device and link load."""
        dev, link = self.add_loads()
        self.P = self.lp.add_variable("P", lowBound=0)
        for d, lin in dev.items():
            if lin.t:
                self._cons(f"period_dev_{d}", _Lin().add(self.P, 1.0).addmap(lin.t, -1.0), ">=", lin.c)
        for (a, b), lin in sorted(link.items()):
            self._cons(f"period_link_{a}_{b}", _Lin().add(self.P, 1.0).addmap(lin.t, -1.0), ">=", lin.c)

    # ---- memory -------------------------------------------------------------------------
    def add_memory(self, mode: str | None, capacity: np.ndarray) -> None:
        """Memory rows: ``conservative`` (an upper bound on the evaluator's peak) or
        ``relaxed`` (a lower bound on it); devices that can never overflow get none."""
        self.memory_mode = mode
        if mode is NONE:
            return
        p, A, x = self.p, self.allowed, self.x
        devs = memory_may_bind(p, self.nodes, A, capacity)
        pb, ob = p.param_bytes, p.output_bytes
        for d in devs:
            norm = max(float(capacity[d]), 1.0)
            on = [v for v in self.nodes if d in A[v]]
            if mode == CONSERVATIVE:
                row = _Lin()
                for v in on:
                    row.add(x[(v, d)], (pb[v] + ob[v]) / norm)
                recv: dict[int, list[tuple[int, float]]] = {}
                for v in on:
                    for u, b in p.pred_bytes[v]:
                        if u in self.inset and self.same_group(u, v):
                            continue
                        recv.setdefault(u, []).append((v, b))
                for u in sorted(recv):
                    r = self.lp.add_variable(f"r_{u}_{d}", lowBound=0)
                    covs = self.covers.setdefault(r, [])
                    for v, b in recv[u]:
                        lin = _Lin().add(x[(v, d)], b / norm)
                        if u in self.inset and d in A[u]:
                            lin.add(x[(u, d)], -b / norm)
                        covs.append(lin)
                        self._cons(f"recv_{u}_{d}_{v}", _Lin().add(r, 1.0).addmap(lin.t, -1.0), ">=", 0.0)
                    row.add(r, 1.0)
                for k, (b, dsts) in enumerate(p.in_tensors):
                    if any(j in self.inset and d in A[j] for j in dsts):
                        row.add(self.input_indicator(k, d), b / norm)
                self._cons(f"mem_{d}", row, "<=", capacity[d] / norm * (1 - MEM_SHAVE))
            else:
                params = _Lin()
                for v in on:
                    params.add(x[(v, d)], pb[v] / norm)
                for v in on:
                    need: dict[int, float] = {}
                    for u, b in p.pred_bytes[v]:
                        need[u] = max(need.get(u, 0.0), min(ob[u], b))
                    c = ob[v] + sum(need.values()) + sum(p.in_tensors[k][0] for k in set(p.node_inputs[v]))
                    if c <= 0:
                        continue
                    row = _Lin().addmap(params.t).add(x[(v, d)], c / norm)
                    self._cons(f"memlb_{v}_{d}", row, "<=", capacity[d] / norm * (1 + MEM_SHAVE))
                self._cons(f"memparams_{d}", params, "<=", capacity[d] / norm * (1 + MEM_SHAVE))

    def nogood(self, pl, name: str) -> None:
        """Cut off the placement ``pl`` (device per node)."""
        on = {self.x[(v, int(pl[v]))] for v in self.nodes}
        self._cons(name, _Lin().addmap({var: 1.0 for var in on}), "<=", len(on) - 1.0)

    # ---- warm start and read-back -------------------------------------------------------
    def set_start(self, pl, start_s=None) -> None:
        """Warm start from a placement (device per node, indexable by node) and, when the
        model has timing, the evaluator's start times (s) of that plan."""
        vals: dict = {}
        for (v, d), var in self.x.items():
            vals[var] = 1.0 if int(pl[v]) == d else 0.0
        T, tau = self.p.T, self.tau
        if self.s:
            mid = {v: start_s[v] + T[v, int(pl[v])] / 2 for v in self.nodes}
            for v, var in self.s.items():
                vals[var] = start_s[v] / tau
            for (u, v), var in self.o.items():
                vals[var] = 1.0 if (mid[u], u) <= (mid[v], v) else 0.0
            cm = 0.0
            for v in self.nodes:
                d = int(pl[v])
                cm = max(cm, (start_s[v] + T[v, d] + self.bnd.tail[self.loc[v], d]) / tau)
            vals[self.C] = cm
        for var, covs in self.covers.items():
            vals[var] = max([0.0] + [lin.value(vals) for lin in covs])
        if self.P is not None:
            dev, link = self.add_loads()
            vals[self.P] = max([lin.value(vals) for lin in dev.values()] + [lin.value(vals) for lin in link.values()])
        for var in self.lp.variables():
            val = vals.get(var, var.lowBound or 0.0)
            if var.lowBound is not None:
                val = max(val, var.lowBound)
            if var.upBound is not None:
                val = min(val, var.upBound)
            var.setInitialValue(val, check=False)

    def placement(self) -> dict[int, int]:
        """Device per subset node, read from ``x``."""
        return {v: max(self.allowed[v], key=lambda d: (self.x[(v, d)].varValue or 0.0, -d)) for v in self.nodes}

    def order(self, pl: dict[int, int]) -> list[list[int]]:
        """Per-device order of the subset nodes by the midpoints of their MILP intervals."""
        T = self.p.T
        seq = [[] for _ in range(self.p.D)]
        key = {v: (self.s[v].varValue or 0.0) + T[v, pl[v]] / (2 * self.tau) for v in self.nodes}
        for v in sorted(self.nodes, key=lambda v: (key[v], v)):
            seq[pl[v]].append(v)
        return seq

    def size(self) -> dict[str, int]:
        nb = sum(1 for v in self.lp.variables() if v.cat == pulp.LpInteger)
        return {"variables": len(self.lp.variables()), "binaries": nb, "constraints": self.lp.numConstraints()}
