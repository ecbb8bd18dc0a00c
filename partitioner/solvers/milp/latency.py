"""``milp``: exact placement and scheduling by mixed-integer linear programming.

The latency model is the classical disjunctive (big-M) formulation of scheduling with
precedence and sequence-dependent delays (Manne, "On the job-shop scheduling problem",
Operations Research 1960), extended with placement variables and device-pair transfer
times as in the heterogeneous DNN-partitioning MILP of DiviML (Ghannane and Abdelfattah, "DiviML:
A Module-based Heuristic for Mapping Neural Networks onto Heterogeneous Platforms", ICCAD
2023, arXiv:2308.00127). Everything is built on a :class:`~partitioner.machine.problem.Boundary`
(default: the whole problem) in scaled time units; see :mod:`.model` for the variable names.

Formulation (latency)
---------------------
* ``x[v,d]`` binary, ``sum_d x[v,d] = 1`` over the devices that support ``v`` (members of a
  group share one set of variables, so they share a device).
* ``s[v]`` start; ``f[v] = s[v] + sum_d T[v,d] x[v,d]`` (an expression).
* release: ``s[v] >= sum_d max(release[v,d], device_ready[d]) x[v,d]`` (exact since one
  ``x`` is 1); bounds ``head[v] <= s[v] <= UB - qtail[v] - Tmin[v]`` from fastest-device
  path lengths.
* precedence: ``s[v] >= f[u]`` per edge; transfers, one per (producer, destination
  device) at the LARGEST bytes among ``u``'s edges to consumers there (as the evaluator):
  ``s[v] >= f[u] + sum_{a!=b} c(a,b,B_uv) x[u,a] - cmax (1 - x[v,b])`` for every device
  ``b`` of ``v`` and, for every other consumer ``v'`` with more bytes,
  ``s[v] >= f[u] + sum_a c(a,b,B_uv') x[u,a] - cmax' (2 - x[v,b] - x[v',b])``.
* one node at a time: for each pair not ordered by a path (transitive closure by
  bitsets) with a common device ``d``, binary ``o[u,v]`` and
  ``s[v] >= f[u] - M (3 - o - x[u,d] - x[v,d])``,
  ``s[u] >= f[v] - M' (2 + o - x[u,d] - x[v,d])``, with ``M = UB - qtail[u] - head[v]``
  derived from a valid upper bound ``UB`` on the objective (the best evaluator-feasible
  heuristic plan, else the serial horizon; ``C <= UB`` is imposed).
* objective: ``min C``, ``C >= f[v] + sum_d tail[v,d] x[v,d]``.
* memory, conservative (never accepts a plan the evaluator rejects): per device,
  params + output bytes of its nodes + ``r[u,d]`` (``>= bytes(u,v) (x[v,d] - x[u,d])``:
  the largest tensor of ``u`` received) + model inputs received ``<= capacity``.
  Relaxed (never rejects a plan the evaluator accepts): params + what is live at one
  node's own step (its output, its inputs) ``<= capacity``.
* throughput floor: every device and directed-link load (see the throughput model)
  ``<= 1 / floor``.

Optimality is claimed honestly: when memory may bind, the relaxed model is solved first
(its bound is a bound for the real problem, and its plan is optimal if the evaluator
accepts it); otherwise the conservative model supplies the plan and the status is
"optimal" only if its value meets the relaxed bound. Side constraints are tightened by a
relative 1e-8 to absorb solver tolerances. ``claimed`` is the evaluator's latency of the
extracted placement and order (its earliest-start schedule is never later than the
MILP's start times; a larger figure raises :class:`SolverError`).

Progress and Ctrl-C: the warm start (the best heuristic plan) is reported as the first
incumbent, then HiGHS's improving solutions with its dual bound (CBC: the result of each
run). A stop request (:func:`partitioner.progress.stop_requested`, the first Ctrl-C) stops
the backend with its incumbent; no further model is solved, and the best of the MILP's
plan and the heuristic plans is returned with status "interrupted" and the bound proven so
far.
"""

from __future__ import annotations

import logging
import math
import time

import pulp

from ... import progress
from ...errors import InfeasibleError, NoSolutionError, PartitionerError, SolverError
from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.evaluate import evaluate, list_order, subset_schedule
from ...machine.problem import Boundary, Problem
from .backends import run_backend
from .model import (
    CONSERVATIVE,
    NONE,
    RELAXED,
    SIDE_RTOL,
    TIME_UNITS,
    MilpModel,
    horizon,
    memory_may_bind,
    restricted_allowed,
)

log = logging.getLogger(__name__)

#: relative tolerance of "the best value meets the proven bound": the same as CHECK_RTOL (and
#: CP-SAT's); HiGHS may stop at a proven gap of ~1e-7 after scaling (its absolute gap
#: tolerance), which is optimal to within the precision we check anything else
OPT_RTOL = 1e-6
#: relative tolerance of "the evaluator confirms the MILP's objective"
CHECK_RTOL = 1e-6


def deadline_of(settings: Settings) -> float | None:
    return None if settings.time_limit is None else time.perf_counter() + float(settings.time_limit)


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.perf_counter())


def heuristic_candidates(problem: Problem, settings: Settings) -> list[tuple[str, Plan, object]]:
    """Evaluator-feasible heuristic plans (heft, greedy, single): warm starts and upper bounds."""
    from ..baselines import greedy, heft, single

    out = []
    for name, mod in (("heft", heft), ("greedy", greedy), ("single", single)):
        try:
            plan = mod.solve(problem, settings)
        except PartitionerError:
            continue
        ev = evaluate(problem, plan)
        if ev.feasible:
            out.append((name, plan.with_(order=ev.order), ev))
    return out


def memory_modes(problem: Problem, devices=None) -> list:
    """``[None]`` when memory cannot bind (or is off), else ``[relaxed, conservative]``."""
    if not problem.constraints.memory:
        return [NONE]
    allowed = restricted_allowed(problem, range(problem.n), devices)
    return [RELAXED, CONSERVATIVE] if memory_may_bind(problem, range(problem.n), allowed, problem.capacity) else [NONE]


def build_latency_milp(problem: Problem, boundary: Boundary | None = None, upper_bound: float | None = None, *,
                       memory_mode: str | None = "auto", devices=None, tau: float | None = None):
    """Build the latency MILP of ``boundary`` (default: the whole problem).

    Parameters
    ----------
    upper_bound : float, optional
        A valid upper bound (s) on the optimum (e.g. a feasible plan's latency); it sets
        ``C <= UB`` and the big-M constants. Default (or if larger): the serial horizon.
    memory_mode : {"auto", "conservative", "relaxed", None}
        "auto": conservative when ``problem.constraints.memory``.
    devices : iterable of int, optional
        Restrict placement to these devices.
    tau : float, optional
        Seconds per model time unit (default: the upper bound / 1000).

    Returns
    -------
    (pulp.LpProblem, MilpModel)
        The model and its variable families (``x``, ``s``, ``o``, ``C``, ...).
    """
    bnd = boundary if boundary is not None else Boundary.full(problem)
    cap = horizon(problem, bnd)
    if problem.constraints.latency_ceiling is not None:
        cap = min(cap, problem.constraints.latency_ceiling * (1 - SIDE_RTOL))
    ub = cap if upper_bound is None else min(upper_bound, cap)
    if tau is None:
        tau = ub / TIME_UNITS if ub > 0 else 1.0
    m = MilpModel(problem, bnd, "latency", tau, devices)
    m.add_timing(ub)
    if problem.constraints.throughput_floor:
        m.add_load_limit(1.0 / problem.constraints.throughput_floor, "floor")
    if memory_mode == "auto":
        memory_mode = CONSERVATIVE if problem.constraints.memory else NONE
    m.add_memory(memory_mode, bnd.capacity)
    m.lp.setObjective(pulp.LpAffineExpression({m.C: 1.0}))
    m.cap_s = cap
    return m.lp, m


def extract_plan(problem: Problem, m: MilpModel) -> Plan:
    """The whole-problem plan of a solved model (order from start times, else list order)."""
    pld = m.placement()
    pl = tuple(int(pld[v]) for v in range(problem.n))
    order = tuple(tuple(o) for o in m.order(pld)) if m.s else list_order(problem, pl)
    return Plan(pl, order)


def solve_flow(problem: Problem, settings: Settings, deadline: float | None, build, cands: list,
               cap_s: float, tau: float, modes: list, what: str) -> Plan:
    """Solve ``build(mode, ub_s)`` models honestly (see the module docstring).

    ``cands`` are evaluator-feasible ``(name, plan, evaluation)``; ``cap_s`` the largest
    valid upper bound on the objective, used for a retry when a candidate-based bound proves
    too tight (None: the model takes no objective bound, ``build`` gets ``ub=None``).
    """
    obj = problem.objective
    results = [(ev.value(obj), name, plan, ev) for name, plan, ev in cands]
    bound_s, proven, timed_out, info = None, False, False, {"modes": [m or "exact" for m in modes]}
    interrupted = False
    relaxed_done = False
    if results:
        val0, name0 = min((r[0], r[1]) for r in results)
        info.update(warm_start=name0, warm_start_s=val0)
        progress.incumbent(val0, None, phase=f"milp warm start ({name0})")
    for mode in modes:
        if mode == CONSERVATIVE and relaxed_done:
            break  # a relaxed optimum (after no-good cuts) is feasible: the proxy cannot do better
        if progress.stop_requested():
            interrupted = timed_out = True
            break
        tl = remaining(deadline)
        if tl is not None and tl <= 0.01:
            timed_out = True
            break
        best = min(results, key=lambda r: (r[0], r[1])) if results else None
        ub = None if cap_s is None else (min(cap_s, best[0] * (1 + 1e-7) + 1e-12) if best else cap_s)
        m = build(mode, ub)
        warm = best is not None and settings.warm_start
        if warm:
            m.set_start(best[2].placement, best[3].start)
        phase = f"milp {what} ({mode or 'exact'} model, {settings.milp_backend})"
        out = run_backend(m.lp, settings.milp_backend, time_limit=tl, threads=settings.threads,
                          seed=settings.seed, warm=warm, unit_s=m.tau, phase=phase)
        if out.status == "infeasible" and cap_s is not None and ub < cap_s and not out.interrupted:
            log.info("milp: bound %.6g from a heuristic too tight for the %s model; retrying", ub, mode or "exact")
            m = build(mode, cap_s)
            out = run_backend(m.lp, settings.milp_backend, time_limit=remaining(deadline),
                              threads=settings.threads, seed=settings.seed, warm=False, unit_s=m.tau, phase=phase)
        interrupted = interrupted or out.interrupted
        info[f"{mode or 'exact'}_model"] = dict(m.size(), status=out.status, time_s=round(out.time_s, 4))
        log.info("milp %s (%s, %s): %s in %.2f s, %s", what, mode or "exact", out.backend, out.status, out.time_s,
                 m.size())
        if out.status == "infeasible":
            if mode == CONSERVATIVE:
                info["conservative"] = "no plan passes the conservative memory proxy"
                break
            raise InfeasibleError(_infeasible_reason(problem, what, mode), hint=_infeasible_hint(problem))
        if mode in (NONE, RELAXED):
            bound_s = out.bound * m.tau if out.bound is not None else None
            proven = out.status == "optimal"
        if out.status != "optimal":
            timed_out = True
        if out.has_solution:
            plan, ev = _checked_plan(problem, m, out, what)
            if ev.feasible:
                results.append((ev.value(obj), "milp", plan, ev))
                if out.backend != "highs":  # HiGHS reports its own improving solutions
                    progress.incumbent(ev.value(obj), bound_s, phase=phase)
                relaxed_done = mode == RELAXED and out.status == "optimal"
            elif mode in (NONE, CONSERVATIVE):
                raise SolverError(f"the evaluator rejects the {what} MILP's plan: {ev.violations[0]}",
                                  hint="this is a bug in partitioner.solvers.milp.latency; please report it")
            else:
                relaxed_done = _nogood_rounds(problem, settings, deadline, m, plan, results, what)
        if interrupted or progress.stop_requested():
            interrupted = timed_out = True
            break  # Ctrl-C: no further model; the bound proven so far stands
    if interrupted:
        info["interrupted"] = True
    if not results:
        if timed_out:
            raise NoSolutionError(f"the {what} MILP found no feasible plan within the time limit and no heuristic "
                              "plan is feasible", hint="raise the time limit")
        raise NoSolutionError(f"no plan found that passes the conservative memory model ({what}); feasibility is "
                          "not proven either way", hint="use a spec with more memory, or try the cpsat solver")
    val, src, plan, ev = min(results, key=lambda r: (r[0], r[1] != "milp", r[1]))
    if bound_s is not None and bound_s > val * (1 + CHECK_RTOL) + 1e-15:
        raise SolverError(f"the {what} MILP's bound {bound_s!r} exceeds the value {val!r} of a feasible plan",
                          hint="this is a bug in partitioner.solvers.milp.latency; please report it")
    if proven and bound_s is not None and val <= bound_s * (1 + OPT_RTOL) + 1e-15:
        status = "optimal"
    elif interrupted:
        status = "interrupted"
    else:
        status = "time_limit" if timed_out else "feasible"
    sb = None if bound_s is None else min(bound_s, val)
    info.update(source=src, backend=settings.milp_backend, tau_s=tau)
    return plan.with_(status=status, claimed=val, solver_bound=sb, info=info, order=ev.order)


def _checked_plan(problem: Problem, m: MilpModel, out, what: str):
    """Extract the plan, evaluate it, and check that the MILP does not under-model it."""
    plan = extract_plan(problem, m)
    ev = evaluate(problem, plan)
    val, milp_s = ev.value(problem.objective), out.objective * m.tau
    if math.isfinite(val) and val > milp_s * (1 + CHECK_RTOL) + 1e-15:
        raise SolverError(f"the evaluator finds {val!r} s for the {what} MILP's plan, more than its objective "
                          f"{milp_s!r} s: the MILP under-models the machine",
                          hint="this is a bug in partitioner.solvers.milp.latency; please report it")
    return plan, ev


def _nogood_rounds(problem: Problem, settings: Settings, deadline, m: MilpModel, plan: Plan, results: list,
                   what: str) -> bool:
    """The relaxed model's plan fails the evaluator's (order-dependent) memory check: try the
    list order, else cut the placement off (a no-good cut on ``x``) and re-solve, a few rounds
    (``settings.get("milp_nogood_rounds", 8)``). The relaxed bound is kept from before the
    cuts. Returns True when an optimal re-solve gave a feasible plan in its own order: then
    no plan of the conservative model is better (its placements are never cut)."""
    obj = problem.objective
    for r in range(int(settings.get("milp_nogood_rounds", 8)) + 1):
        alt = Plan(plan.placement, list_order(problem, plan.placement))
        ev = evaluate(problem, alt)
        if ev.feasible:
            results.append((ev.value(obj), "milp-relaxed", alt.with_(order=ev.order), ev))
            return False
        tl = remaining(deadline)
        if (r == int(settings.get("milp_nogood_rounds", 8)) or (tl is not None and tl <= 0.01)
                or progress.stop_requested()):
            return False
        m.nogood(plan.placement, f"nogood_{r}")
        out = run_backend(m.lp, settings.milp_backend, time_limit=tl, threads=settings.threads,
                          seed=settings.seed, warm=False)
        log.info("milp %s (relaxed, no-good round %d): %s", what, r + 1, out.status)
        if not out.has_solution:
            return False
        plan, ev = _checked_plan(problem, m, out, what)
        if ev.feasible:
            results.append((ev.value(obj), "milp", plan, ev))
            return out.status == "optimal"
    return False


def _infeasible_reason(problem: Problem, what: str, mode) -> str:
    c = problem.constraints
    parts = []
    if c.memory and mode == RELAXED:
        caps = ", ".join(f"{d}: {problem.capacity[j] / 1e9:.3f} GB" for j, d in enumerate(problem.devices))
        parts.append(f"memory (usable {caps}; even counting only parameters and the tensors live at one "
                     f"node's own step)")
    if c.throughput_floor is not None:
        parts.append(f"the throughput floor {c.throughput_floor:.4g}/s")
    if c.latency_ceiling is not None:
        parts.append(f"the latency ceiling {c.latency_ceiling:.4g} s")
    if not parts:
        parts.append("device support and groups")
    return f"the {what} MILP proves that no plan satisfies " + " and ".join(parts)


def _infeasible_hint(problem: Problem) -> str:
    return "use a spec with more memory or faster devices, lower memory_reserve, or relax the constraints"


def solve_latency(problem: Problem, settings: Settings) -> Plan:
    """Minimum-latency plan (see the module docstring)."""
    deadline = deadline_of(settings)
    cands = heuristic_candidates(problem, settings)
    bnd = Boundary.full(problem)
    cap = horizon(problem, bnd)
    if problem.constraints.latency_ceiling is not None:
        cap = min(cap, problem.constraints.latency_ceiling * (1 - SIDE_RTOL))
    ref = min([ev.latency for _, _, ev in cands] + [cap])
    tau = ref / TIME_UNITS if ref > 0 else 1.0

    def build(mode, ub):
        return build_latency_milp(problem, bnd, ub, memory_mode=mode, tau=tau)[1]

    return solve_flow(problem, settings, deadline, build, cands, cap, tau, memory_modes(problem), "latency")


def subproblem_objective(problem: Problem, bnd: Boundary, pl: dict[int, int], order) -> float:
    """The sub-objective (max finish + tail) of the earliest-start schedule of a subset plan."""
    loc = {v: i for i, v in enumerate(bnd.nodes)}
    return subset_schedule(problem, tuple(bnd.nodes), pl, order, lambda v, d: float(problem.T[v, d]),
                           problem.comm, lambda v, d: max(bnd.release[loc[v], d], bnd.device_ready[d]),
                           lambda v, d: bnd.tail[loc[v], d])[2]


def solve_latency_subproblem(problem: Problem, boundary: Boundary, settings: Settings,
                             upper_bound: float | None = None, warm: tuple[dict, dict] | None = None):
    """Solve the latency MILP of a subproblem (for the split heuristic).

    Memory uses the conservative proxy with ``boundary.capacity`` (tensors from fixed
    predecessors are counted as received); a throughput floor counts only the subset's
    own loads. "optimal" means optimal for this model.

    Parameters
    ----------
    upper_bound : float, optional
        A valid upper bound (s) on the sub-objective.
    warm : (placement dict, start dict), optional
        A warm start: device and start time (s) per subset node.

    Returns
    -------
    placement : tuple of int
        Device of each ``boundary.nodes[i]`` (None when no solution was found).
    order : tuple of tuple of int
        Per device, its subset nodes in order.
    objective : float
        Sub-objective (s) of the earliest-start schedule of that placement and order.
    status : str
        "optimal", "time_limit" or "no_solution".
    bound : float or None
        The solver's proven lower bound (s).
    """
    deadline = deadline_of(settings)
    lp, m = build_latency_milp(problem, boundary, upper_bound)
    use_warm = warm is not None and settings.warm_start
    if use_warm:
        m.set_start(warm[0], warm[1])
    out = run_backend(lp, settings.milp_backend, time_limit=remaining(deadline), threads=settings.threads,
                      seed=settings.seed, warm=use_warm)
    if out.status == "infeasible" and upper_bound is not None and upper_bound < m.cap_s:
        lp, m = build_latency_milp(problem, boundary, None)
        out = run_backend(lp, settings.milp_backend, time_limit=remaining(deadline), threads=settings.threads,
                          seed=settings.seed, warm=False)
    if out.status == "infeasible":
        raise InfeasibleError(_infeasible_reason(problem, "subproblem", RELAXED).replace(
            "even counting only", "with the conservative proxy, counting"), hint=_infeasible_hint(problem))
    bound = None if out.bound is None else out.bound * m.tau
    if not out.has_solution:
        return None, None, math.inf, "no_solution", bound
    pl = m.placement()
    order = m.order(pl)
    obj = subproblem_objective(problem, boundary, pl, order)
    milp_s = out.objective * m.tau
    if obj > milp_s * (1 + CHECK_RTOL) + 1e-15:
        raise SolverError(f"subproblem schedule gives {obj!r} s, more than the MILP objective {milp_s!r} s",
                          hint="this is a bug in partitioner.solvers.milp.latency; please report it")
    if bound is not None:
        bound = min(bound, obj)
    return (tuple(int(pl[v]) for v in boundary.nodes), tuple(tuple(o) for o in order), obj, out.status, bound)


__all__ = ["build_latency_milp", "extract_plan", "solve_latency", "solve_latency_subproblem", "solve_flow",
           "subproblem_objective", "heuristic_candidates", "memory_modes"]
