"""``cpsat``: exact placement and scheduling with Google OR-Tools CP-SAT.

The latency model is the classic disjunctive formulation of scheduling a task graph on
heterogeneous processors with communication delays (optional intervals per alternative
machine, no-overlap per machine; cf. Laborie, Rogerie, Shaw and Vilim, "IBM ILOG CP
Optimizer for scheduling", Constraints 23, 2018, and its use for DNN placement in Tarnawski
et al., "Efficient algorithms for device placement of DNN graph operators", NeurIPS 2020).
It is exactly the evaluator's machine model, on a :class:`~partitioner.machine.problem.Boundary`
(the whole problem by default):

* ``p[v,d]`` (bool) for each node ``v`` and each device ``d`` in ``allowed_devices(v)``;
  ``sum_d p[v,d] = 1``; members of a group have equal presences.
* ``start[v], end[v]`` (int); ``end = start + sum_d dur[v,d] p[v,d]``; an optional interval
  ``[start, start + dur[v,d])`` present iff ``p[v,d]``; ``add_no_overlap`` per device over
  its intervals and a fixed interval ``[0, device_ready[d])``; ``start[v] >= sum_d
  max(release[v,d], device_ready[d]) p[v,d]``.
* Precedence: ``start[v] >= end[u]`` for every edge; transfers are sent once per
  (producer, destination device) at the largest bytes among the producer's edges to that
  device: for a producer whose edges all carry the same bytes ``B``,
  ``start[v] >= end[u] + sum_{a != b} comm(a,b,B) p[u,a]`` enforced if ``p[v,b]``; with
  several sizes, an arrival variable ``arr[u,b] >= end[u] + sum_a comm(a,b,B_uv) p[u,a]``
  enforced if ``p[v,b]`` for every consumer ``v`` and ``start[v] >= arr[u,b]`` if
  ``p[v,b]``, so the largest tensor to ``b`` delays every consumer on ``b``.
* ``makespan >= end[v] + sum_d tail[v,d] p[v,d]`` (outputs back to the host), and the
  redundant ``makespan >= device_ready[d] + sum_v dur[v,d] p[v,d]``; minimise ``makespan``.
* Throughput floor (latency objective, whole problem): each device's compute load, and
  every directed link's per-sample transfer load (transfer indicators once per (producer,
  destination device) and size level, every hop of the route; with ``comm_blocks_device``
  also both endpoint devices), at most ``1 / floor``. A latency ceiling bounds
  ``makespan``.
* Memory: a conservative linear proxy per device, params + outputs of its nodes +
  received tensors (at their largest edge) + model inputs received <= capacity, which
  bounds the evaluator's step-granular peak from above.

The throughput objective drops the schedule (unless a latency ceiling needs it) and
minimises ``period >= load`` of every device and directed link, the evaluator's period
for a single pipeline. Data-parallel replicas are not modelled, so a throughput plan is
called "optimal" only when its period meets :func:`partitioner.bounds.lower.lower_bound` (which
covers replicas); the solver's own bound is then reported in ``info`` only. Latency plans
(with or without a throughput floor) are single pipelines, as the machine model reserves replicas for
throughput plans.

:func:`solve_latency_subproblem` solves the same model on any Boundary (for the split
heuristic) and returns a :class:`SubSolution`.

Scaling and rounding error
--------------------------
CP-SAT needs integers. The time unit is ``u = horizon / 2**30`` where ``horizon`` is the
evaluator's value of the best feasible heuristic plan (heft, greedy, single), or a serial
upper bound when none is feasible; every duration, transfer, release and tail is rounded
UP to whole units. Hence, with ``N = 2 n + 2`` (the most rounded terms on any path:
one release, ``n`` durations, ``n - 1`` transfers, one tail):

* for the plan returned, evaluator latency ``<= integer objective * u`` (checked; a
  violation raises :class:`SolverError`);
* every plan's integer value is below its real value ``/ u + N``, so the real optimum is
  at least ``(CP-SAT best bound - N) * u``; this corrected value is ``solver_bound``.

For loads (period objective, floor) ``N`` is the largest number of rounded terms on one
resource. Status: "optimal" only when ``claimed - solver_bound <= 1e-6 * claimed`` (the
rounding cannot hide a better plan; CP-SAT runs with ``relative_gap_limit = 1e-7``);
otherwise "feasible" when CP-SAT finished, "time_limit" when it stopped at the limit.
There is no "optimal but rounded" status.

Side constraints are rounded in two ways. The *relaxed* model (memory: parameters only;
loads rounded down) cuts off no plan the evaluator accepts, so its bound is valid and its
infeasibility proves :class:`InfeasibleError`; the *conservative* model (full memory proxy;
loads rounded up) accepts only plans the evaluator accepts. When some side constraint may
bind, the relaxed model is solved first (half the time); if its plan passes the evaluator it
is returned, otherwise the conservative model is solved with the rest of the time and the
relaxed bound is kept. Without binding side constraints both coincide and one solve runs.

Settings: ``time_limit`` -> ``max_time_in_seconds`` (per call, shared by the phases), ``seed``
-> ``random_seed``. Reproducible by default (``extra["cpsat_deterministic"] = True``): one
worker with ``interleave_search`` (CP-SAT's deterministic round-robin over its whole
portfolio), also limited by ``max_deterministic_time = 0.05 * time_limit`` (CP-SAT's work
clock; it advanced 0.03-0.2 units per wall second in our measurements), so a run stops on
that clock and returns the same plan for the same seed; only if the wall clock stops it
first (a slow or loaded machine; logged, ``info["phases"][k]["stopped_by"]``) can two runs
differ. ``threads`` is not used in this mode: CP-SAT 9.15's interleaved loop with several
workers was deterministic but up to 40x slower here. ``cpsat_deterministic = False`` runs
the parallel portfolio with ``num_workers = threads`` on the wall clock only (faster, not
reproducible). ``extra["cpsat_det_ratio"]`` changes the 0.05; ``extra["deterministic_time"]``
sets the deterministic limit in CP-SAT units directly. ``extra["hint_plans"]`` adds starting
plans (besides HEFT, greedy and single) for the hint and the time scale.

Ctrl-C: CP-SAT's own SIGINT catch is off (``catch_sigint_signal``: OR-Tools leaves SIGINT at
SIG_DFL after a solve, so a later Ctrl-C would kill the process); instead a stop request
(:func:`partitioner.progress.stop_requested`, the first Ctrl-C during a solve) calls
``stop_search`` at once, no further phase runs, and the best plan so far (CP-SAT's or the
hint) is returned with status "interrupted" and the bound proven so far.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ortools.sat.python import cp_model

from ... import progress
from ...bounds.lower import lower_bound
from ...errors import InfeasibleError, NoSolutionError, SolverError
from ...ir.plan import Objective, Plan
from ...ir.settings import Settings
from ...machine.evaluate import evaluate
from ...machine.problem import Boundary, Problem
from ..registry import register
from .model import (
    CONSERVATIVE,
    K_BITS,
    RELAXED,
    Built,
    Side,
    build_model,
    edge_levels,
    extract,
    forward,
    serial_horizon,
    set_hint,
)

log = logging.getLogger(__name__)

#: relative tolerance for calling a plan optimal (the same as the evaluator agreement)
OPT_RTOL = 1e-6
#: CP-SAT's own stopping gap (leaves room for the rounding correction within OPT_RTOL)
REL_GAP = 1e-7
#: deterministic-time limit per second of time limit (CP-SAT's work clock ran at 0.03-0.2
#: units per wall second in our measurements, so this clock usually stops the search first)
DET_RATIO = 0.05

_STATUS = {cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE", cp_model.INFEASIBLE: "INFEASIBLE",
           cp_model.UNKNOWN: "UNKNOWN", cp_model.MODEL_INVALID: "MODEL_INVALID"}


@dataclass(frozen=True)
class SubSolution:
    """A solved :class:`Boundary` subproblem (times in seconds, real machine model).

    ``objective`` is ``max finish + tail`` of the returned placement and order;
    ``bound`` a proven lower bound on it over all plans of the subset (None if unknown).
    """

    placement: dict[int, int]
    order: tuple[tuple[int, ...], ...]
    start: dict[int, float]
    finish: dict[int, float]
    objective: float
    status: str
    bound: float | None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    status: int
    pl: dict[int, int] | None = None
    order: list[list[int]] | None = None
    obj: float | None = None
    bound: float | None = None
    wall: float = 0.0
    det_time: float = 0.0
    stopped_by: str | None = None


def _configure(params, settings: Settings, limit: float | None) -> dict[str, Any]:
    """Map Settings onto CP-SAT parameters (see "Settings" in the module docstring)."""
    threads = max(1, int(settings.threads or 1))
    det = bool(settings.get("cpsat_deterministic", True))
    params.random_seed = int(settings.seed) % (2 ** 31 - 1)
    params.relative_gap_limit = REL_GAP
    if det:
        # one worker interleaving the whole portfolio: deterministic; CP-SAT 9.15's interleaved
        # multi-worker loop was measured up to 40x slower in wall time, so threads are not used
        params.num_workers = 1
        params.interleave_search = True
        if threads > 1:
            log.info("cpsat: reproducible mode runs one interleaved worker (threads=%d ignored); "
                     "set extra cpsat_deterministic=False for the parallel portfolio", threads)
    else:
        params.num_workers = threads
    det_limit = None
    if limit is not None:
        params.max_time_in_seconds = max(float(limit), 1e-3)
        if det:
            det_limit = max(float(limit), 1e-3) * float(settings.get("cpsat_det_ratio", DET_RATIO))
    if det and settings.get("deterministic_time") is not None:
        det_limit = float(settings.get("deterministic_time"))
    if det_limit is not None:
        params.max_deterministic_time = det_limit
    params.log_search_progress = bool(settings.get("cpsat_log", False))
    params.catch_sigint_signal = False  # Ctrl-C goes through partitioner.progress (see the docstring)
    return {"deterministic": det, "det_limit": det_limit, "wall_limit": limit}


class _Progress(cp_model.CpSolverSolutionCallback):
    """Reports each CP-SAT incumbent (in seconds, rounded up to the integer scale) and stops
    the search on a stop request (Ctrl-C)."""

    def __init__(self, unit: float, report: bool = True):
        super().__init__()
        self.unit = unit
        self.report = report

    def on_solution_callback(self) -> None:
        if self.report:
            progress.incumbent(self.objective_value * self.unit, self.best_objective_bound * self.unit)
        if progress.stop_requested():
            self.stop_search()


def _run(B: Built, settings: Settings, limit: float | None, warn: bool = True) -> _Run:
    solver = cp_model.CpSolver()
    lim = _configure(solver.parameters, settings, limit)
    t0 = time.perf_counter()
    cb = _Progress(B.load_unit if B.period is not None else B.unit, progress.active())
    with progress.on_stop(solver.stop_search):
        st = solver.solve(B.model, cb)
    wall = time.perf_counter() - t0
    det_time = float(solver.response_proto.deterministic_time)
    log.info("cpsat: %s in %.3f s (objective %s, bound %s)", _STATUS.get(st, st), wall,
             solver.objective_value if st in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None,
             solver.best_objective_bound)
    if st == cp_model.MODEL_INVALID:
        raise SolverError(f"CP-SAT rejects the model: {B.model.validate()}", hint="this is a bug; please report it")
    r = _Run(st, wall=wall, det_time=det_time)
    if st not in (cp_model.OPTIMAL, cp_model.INFEASIBLE):
        if progress.stop_requested():
            r.stopped_by = "interrupt"
        elif lim["det_limit"] is not None and det_time >= lim["det_limit"] * 0.999:
            r.stopped_by = "deterministic_time"
        elif lim["wall_limit"] is not None:
            r.stopped_by = "wall_time"  # not reproducible: the machine's speed decided
            if lim["deterministic"]:
                (log.warning if warn else log.info)(
                    "cpsat: the wall-clock limit stopped the search before the deterministic one; "
                    "the result may differ between runs")
    bd = solver.best_objective_bound
    r.bound = float(bd) if math.isfinite(bd) else None
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        r.pl, r.order = extract(B, solver)
        r.obj = float(solver.objective_value)
    return r


def _corrected_bound(B: Built, r: _Run, unit: float) -> float | None:
    if r.bound is None:
        return None
    return max(0.0, (math.ceil(r.bound - 1e-9) - B.n_terms) * unit)


def _remaining(t0: float, limit: float | None) -> float | None:
    return None if limit is None else limit - (time.perf_counter() - t0)


def _drive(build, value_of, hint, settings: Settings, unit: float, who: str, warn: bool = True):
    """Relaxed-then-conservative solve (see the module docstring).

    ``build(mode)`` returns a Built; ``value_of(pl, order)`` returns (value, feasible, payload);
    ``hint`` is (pl, order, value, feasible, payload) or None. Returns (best, bound, finished,
    info) with best = (pl, order, value, payload) or None.
    """
    t0 = time.perf_counter()
    limit = settings.time_limit
    Bc = build(CONSERVATIVE)
    phases = [Bc] if not Bc.active else [build(RELAXED), Bc]
    info: dict[str, Any] = {"unit_s": unit, "active_constraints": list(dict.fromkeys(Bc.active)), "phases": []}
    best = None
    if hint is not None and hint[3]:
        best = (hint[0], hint[1], hint[2], hint[4])
    bound, finished, proxy_infeasible = None, True, False
    for i, B in enumerate(phases):
        rem = _remaining(t0, limit)
        if (rem is not None and rem <= 0) or progress.stop_requested():
            finished = False
            break
        lim = rem if (rem is None or i == len(phases) - 1) else rem / 2
        if hint is not None:
            set_hint(B, hint[0], hint[1])
        r = _run(B, settings, lim, warn)
        info["phases"].append({"mode": CONSERVATIVE if B is Bc else RELAXED, "status": _STATUS.get(r.status),
                               "objective_int": r.obj, "bound_int": r.bound, "n_terms": B.n_terms,
                               "wall_s": r.wall, "det_time": r.det_time, "stopped_by": r.stopped_by})
        if i == 0:
            bound = _corrected_bound(B, r, B.load_unit if B.period is not None else unit)
        if r.status == cp_model.INFEASIBLE:
            if i == 0:
                what = "; ".join(dict.fromkeys(phases[0].active)) or "none (the horizon)"
                raise InfeasibleError(f"{who}: no single-pipeline plan satisfies the side constraints ({what}); "
                                      f"CP-SAT proved even a relaxation of them infeasible",
                                      hint="relax the throughput floor / latency ceiling, or use devices with "
                                           "more memory")
            proxy_infeasible = True
            break
        if r.status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            finished = False
            break
        if r.status == cp_model.FEASIBLE:
            finished = False
            if r.stopped_by == "interrupt":
                info["interrupted"] = True
        val, ok, payload = value_of(r.pl, r.order)
        u = B.load_unit if B.period is not None else unit
        if not val <= r.obj * u * (1 + 1e-9) + 1e-15:
            raise SolverError(f"{who}: the evaluator finds {val!r} s for CP-SAT's plan, more than its integer "
                              f"objective allows ({r.obj} x {u!r} s)",
                              hint="the CP-SAT model under-estimates the machine model; this is a bug")
        if ok:
            if best is None or val < best[2]:
                best = (r.pl, r.order, val, payload)
            break
        if B is Bc:
            raise SolverError(f"{who}: CP-SAT's conservative model accepted a plan the evaluator rejects: {payload}",
                              hint="the memory/floor proxy is not conservative; this is a bug")
    info["proxy_infeasible"] = proxy_infeasible
    return best, bound, finished, info


def _status(value: float, bound: float | None, finished: bool) -> str:
    if bound is not None and value - bound <= OPT_RTOL * value:
        return "optimal"
    return "feasible" if finished else "time_limit"


# ---- whole problem -------------------------------------------------------------------------
def _serial_period(problem: Problem) -> float:
    """An upper bound on every single-pipeline plan's period: all compute plus twice every
    transfer that could happen (a device is an endpoint of at most two hops of a route)."""
    D, host = problem.D, problem.host
    pairs = [(a, b) for a in range(D) for b in range(D) if a != b]
    tot = float(np.sum(np.max(np.where(problem.supported, problem.T, 0.0), axis=1)))
    xfer = 0.0
    for u in range(problem.n):
        _, levels = edge_levels(problem, None, u)
        if levels and pairs:
            xfer += D * max(problem.comm(a, b, levels[0]) for a, b in pairs)
    for b, _ in problem.in_tensors:
        xfer += D * max(problem.comm(host, d, b) for d in range(D))
    for _, b in problem.outputs:
        xfer += max(problem.comm(d, host, b) for d in range(D))
    return tot + 2 * xfer


def _heuristics(problem: Problem, settings: Settings):
    """Starting plans, best first: HEFT, greedy, single, and the caller's ``extra["hint_plans"]``
    (e.g. the split heuristic's best plan); the best one is the hint and sets the time scale."""
    from ..baselines import greedy, heft, single

    out = []
    for k, (name, fn) in enumerate((("heft", heft.solve), ("greedy", greedy.solve), ("single", single.solve))):
        try:
            plan = fn(problem, settings)
        except InfeasibleError:
            continue
        ev = evaluate(problem, plan)
        out.append((not ev.feasible, ev.value(problem.objective), k, name, plan, ev))
    for k, plan in enumerate(settings.get("hint_plans", ())):
        if plan.replicas:
            continue
        ev = evaluate(problem, plan)
        out.append((not ev.feasible, ev.value(problem.objective), 3 + k, plan.solver or "given", plan, ev))
    out.sort(key=lambda x: x[:3])
    return out


@register("cpsat", "CP-SAT: exact placement + schedule (disjunctive model, rounding-corrected bound)",
          exact=True, max_nodes=120, interruptible=True)
def solve(problem: Problem, settings: Settings) -> Plan:
    """Solve ``problem`` with CP-SAT (see the module docstring for the formulation)."""
    lat = problem.objective is Objective.LATENCY
    cons = problem.constraints
    heur = _heuristics(problem, settings)
    feas = [h for h in heur if not h[0]]
    bnd = Boundary.full(problem)
    who = "cpsat"
    hint = None
    if heur:
        h = heur[0]
        pl = {i: int(d) for i, d in enumerate(h[4].placement)}
        hint = (pl, [list(s) for s in h[5].order], h[1], not h[0], h[5])
    if feas:
        horizon = feas[0][1]
    elif lat:
        horizon = serial_horizon(problem, bnd)
    else:
        horizon = _serial_period(problem)
    if horizon <= 0 and feas:
        h = feas[0]
        return h[4].with_(status="optimal", claimed=h[1], solver_bound=0.0, info={"hint": h[3]})
    n = problem.n
    side = Side(memory=cons.memory, floor_period=(1.0 / cons.throughput_floor if lat and cons.throughput_floor
                                                   else None),
                latency_ceiling=cons.latency_ceiling)
    if lat:
        unit, load_unit = horizon / 2 ** K_BITS, None
        if side.floor_period is not None:
            load_unit = side.floor_period / 2 ** K_BITS
        H = 2 ** K_BITS + 2 * n + 4
        sched = True
    else:
        load_unit = horizon / 2 ** K_BITS
        sched = side.latency_ceiling is not None
        unit = (side.latency_ceiling / 2 ** K_BITS) if sched else load_unit
        H = 2 ** K_BITS + 2 * n + 4 if sched else 2 ** (K_BITS + 2)

    def build(mode):
        return build_model(problem, bnd, unit=unit, horizon_int=H, mode=mode, side=side,
                           objective="latency" if lat else "period", load_unit=load_unit, schedule=sched)

    def value_of(pl, order):
        plan = Plan(tuple(pl[i] for i in range(n)), None if order is None else tuple(tuple(s) for s in order))
        ev = evaluate(problem, plan)
        return ev.value(problem.objective), ev.feasible, (ev.violations[0] if ev.violations else ev)

    best, bound, finished, info = _drive(build, value_of, hint, settings, unit, who)
    info["hint"] = heur[0][3] if heur else None
    if best is None:
        if info["proxy_infeasible"]:
            raise NoSolutionError(f"{who}: the conservative memory/floor model admits no plan, and no heuristic plan "
                              f"is feasible", hint="try the milp solver, or relax the constraints")
        raise NoSolutionError(f"{who}: no feasible plan found within the time limit",
                          hint="raise the time limit or use a heuristic solver")
    pl, order, val, ev = best
    if not lat:
        # replicas are not modelled: the CP-SAT bound holds for single pipelines only
        info["single_pipeline_bound_s"] = bound
        bound = lower_bound(problem).value
    status = _status(val, bound, finished)
    if status != "optimal" and progress.stop_requested():
        status = "interrupted"
        info["interrupted"] = True
    order_t = tuple(tuple(int(x) for x in s) for s in (order if order is not None else ev.order))
    return Plan(tuple(int(pl[i]) for i in range(n)), order_t, status=status, claimed=float(val),
                solver_bound=bound, info=info)


# ---- subproblems (for the split heuristic) -----------------------------------------------------
def _sub_greedy(problem: Problem, bnd: Boundary):
    """Earliest-finish-time placement of the subset in topological order (a hint)."""
    loc = {v: i for i, v in enumerate(bnd.nodes)}
    free = np.asarray(bnd.device_ready, dtype=float).copy()
    pl: dict[int, int] = {}
    fin: dict[int, float] = {}
    order: list[list[int]] = [[] for _ in range(problem.D)]
    gdev: dict[int, int] = {}
    for v in bnd.nodes:
        g = int(problem.group_of[v])
        devs = [gdev[g]] if g in gdev else [int(d) for d in problem.allowed_devices(v)]
        best = None
        for d in devs:
            s = max(free[d], bnd.release[loc[v], d])
            for u, b in problem.pred_bytes[v]:
                if u in pl:
                    s = max(s, fin[u] + problem.comm(pl[u], d, b))
            key = (s + problem.T[v, d], d)
            best = key if best is None or key < best else best
        f, d = best
        pl[v], fin[v] = d, f
        free[d] = f
        order[d].append(v)
        if g >= 0:
            gdev.setdefault(g, d)
    return pl, order


def _sub_memory_ok(problem: Problem, bnd: Boundary, pl: dict[int, int]) -> tuple[bool, str]:
    """The conservative memory proxy of the model, in bytes."""
    if not problem.constraints.memory:
        return True, ""
    inset = set(bnd.nodes)
    use = np.zeros(problem.D)
    for v in bnd.nodes:
        use[pl[v]] += problem.param_bytes[v] + problem.output_bytes[v]
        out, _ = edge_levels(problem, inset, v)
        xb: dict[int, float] = {}
        for w, b in out:
            if pl[w] != pl[v]:
                xb[pl[w]] = max(xb.get(pl[w], 0.0), b)
        for d, b in xb.items():
            use[d] += b
    for b, dsts in problem.in_tensors:
        for d in {pl[j] for j in dsts if j in inset}:
            use[d] += b
    over = np.flatnonzero(use > np.asarray(bnd.capacity) * (1 + 1e-9))
    if over.size:
        d = int(over[0])
        return False, f"device {problem.devices[d]!r} needs {use[d]:.4g} B (proxy) of {bnd.capacity[d]:.4g}"
    return True, ""


def solve_latency_subproblem(problem: Problem, boundary: Boundary | None = None,
                             settings: Settings | None = None) -> SubSolution:
    """Minimise ``max finish + tail`` over the nodes of ``boundary`` (the same CP-SAT model).

    Throughput floors and latency ceilings of ``problem`` are not applied (they concern
    the whole problem); memory uses ``boundary.capacity`` with the conservative proxy
    (tensors received from fixed producers outside the subset are the caller's to take
    off the capacity). Group members outside the subset are not constrained.

    Raises
    ------
    InfeasibleError
        When the relaxed model (parameters within ``boundary.capacity``) is infeasible.
    SolverError
        When no plan is found within the time limit.
    """
    settings = settings or Settings()
    bnd = boundary if boundary is not None else Boundary.full(problem)
    nodes = tuple(int(v) for v in bnd.nodes)
    if not nodes:
        return SubSolution({}, tuple(() for _ in range(problem.D)), {}, {}, 0.0, "optimal", 0.0)
    loc = {v: i for i, v in enumerate(nodes)}
    rel = lambda v, d: max(float(bnd.release[loc[v], d]), float(bnd.device_ready[d]))  # noqa: E731
    tail = lambda v, d: float(bnd.tail[loc[v], d])  # noqa: E731

    def real(pl, order):
        return forward(problem, nodes, pl, order, lambda v, d: float(problem.T[v, d]), problem.comm, rel, tail)

    gpl, gorder = _sub_greedy(problem, bnd)
    gst, gfi, gval = real(gpl, gorder)
    gok, _ = _sub_memory_ok(problem, bnd, gpl)
    horizon = gval if gok else serial_horizon(problem, bnd)
    if horizon <= 0 and gok:
        return SubSolution(gpl, tuple(tuple(s) for s in gorder), gst, gfi, 0.0, "optimal", 0.0)
    unit = horizon / 2 ** K_BITS
    H = 2 ** K_BITS + 2 * len(nodes) + 4
    side = Side(memory=problem.constraints.memory)

    def build(mode):
        return build_model(problem, bnd, unit=unit, horizon_int=H, mode=mode, side=side)

    def value_of(pl, order):
        st, fi, val = real(pl, order)
        ok, why = _sub_memory_ok(problem, bnd, pl)
        return val, ok, ((st, fi) if ok else why)

    with progress.muted():  # a module's incumbents are not the whole problem's
        best, bound, finished, info = _drive(build, value_of, (gpl, gorder, gval, gok, (gst, gfi)), settings, unit,
                                             "cpsat subproblem", warn=False)
    if best is None:
        raise NoSolutionError("cpsat subproblem: no plan found within the time limit",
                          hint="raise the time limit")
    pl, order, val, (st, fi) = best
    return SubSolution(dict(pl), tuple(tuple(s) for s in order), dict(st), dict(fi), float(val),
                       _status(val, bound, finished), bound, info)
