"""The public API: load a model, compile it for a spec, grade the plan, compare solvers.

Every figure reported here comes from the evaluator (:mod:`partitioner.machine.evaluate`); the
bound from :mod:`partitioner.bounds.lower` (and the solver's own proven bound, if larger).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any

from . import progress
from .bounds.lower import lower_bound
from .errors import (
    CostModelError,
    InfeasibleError,
    NoSolutionError,
    PartitionerError,
    SolverError,
    UsageError,
)
from .frontend.load import LoadedModel, load_model
from .grade import Result, grade
from .ir.plan import Constraints, Objective, Plan
from .ir.settings import Settings
from .ir.spec import Spec, load_spec
from .machine.problem import Problem
from .solvers.registry import check_options, get_solver, solve

log = logging.getLogger(__name__)

#: The longest single time (an operator, or one transfer over its route) the solvers take:
#: the bound LPs and the MILPs' big-M rows lose their footing beyond it (1e10 s next to
#: operators of 1e-4 s made HiGHS fail).
MAX_SOLVABLE_S = 1e9
#: The critical path with every node on its fastest device must be 0 or at least this long: a
#: model whose every operator takes less (1e-30 s) is below the LPs' tolerances.
MIN_SOLVABLE_S = 1e-15


def check_magnitudes(problem: Problem) -> None:
    """Refuse a problem whose operator or transfer times exceed :data:`MAX_SOLVABLE_S`.

    Raises
    ------
    CostModelError
        Naming the node and device, or the bytes and devices, of the longest such time.
    """
    import numpy as np

    T = np.where(np.isfinite(problem.T), problem.T, 0.0)
    if T.size and T.max() > MAX_SOLVABLE_S:
        i, d = np.unravel_index(int(np.argmax(T)), T.shape)
        raise CostModelError(f"node {problem.node_name(int(i))!r} takes {T[i, d]:.3g} s on device "
                             f"{problem.devices[int(d)]!r}, beyond the {MAX_SOLVABLE_S:g} s the solvers handle",
                             hint="check the node's flops/bytes/time_s and the device's peak_flops, memory "
                                  "bandwidth and efficiency in the spec")
    fastest = np.where(np.isfinite(problem.T), problem.T, np.inf).min(axis=1, initial=np.inf)
    longest = float(fastest[np.isfinite(fastest)].max(initial=0.0))
    if 0 < longest < MIN_SOLVABLE_S:
        raise CostModelError(f"every operator of {problem.graph.name!r} takes at most {longest:.3g} s on its fastest "
                             f"device, below the {MIN_SOLVABLE_S:g} s the solvers resolve",
                             hint="check the units: times are seconds, sizes bytes, peak_flops FLOP/s")
    sizes = [*problem.edge_bytes.tolist(), *(b for b, _ in problem.in_tensors), *(b for _, b in problem.outputs)]
    if sizes and problem.D > 1:
        big = max(sizes)
        M = problem.comm_matrix(big)
        if M.max() > MAX_SOLVABLE_S:
            a, b = np.unravel_index(int(np.argmax(M)), M.shape)
            raise CostModelError(f"a transfer of {big:.3g} bytes from {problem.devices[int(a)]!r} to "
                                 f"{problem.devices[int(b)]!r} takes {M[a, b]:.3g} s, beyond the "
                                 f"{MAX_SOLVABLE_S:g} s the solvers handle",
                                 hint="check the graph's bytes and the spec's link bandwidth_Bps and latency_s")

def solve_problem(problem: Problem, solver: str, settings: Settings | None = None,
                  coarsen_to: int | None = None) -> tuple[Plan, dict[str, Any]]:
    """Solve ``problem`` with ``solver``, optionally on a coarsened graph.

    With ``coarsen_to``, the graph is coarsened (:func:`partitioner.transform.coarsen.coarsen`, backend
    fusion rules then merges down to ``coarsen_to`` clusters), the solver runs on the coarse
    problem, and its plan is expanded to every fine node. A coarse "optimal" becomes
    "optimal_coarse": coarsening restricts the plans, so it is no proof for the fine graph,
    and the bound used to grade it is always the fine graph's.

    Returns
    -------
    plan : Plan
        On the fine problem; ``solve_time_s`` includes coarsening and expansion.
    info : dict
        ``coarse_nodes`` and ``coarsen_time_s`` when coarsened.
    """
    settings = settings or Settings()
    if coarsen_to is None or coarsen_to >= problem.n:
        return solve(problem, solver, settings), {}
    if coarsen_to < 1:
        raise UsageError(f"--coarsen must be >= 1 node, got {coarsen_to}", hint="e.g. --coarsen 60")

    t0 = time.perf_counter()
    c, cp = coarsen_problem(problem, coarsen_to)
    t_c = time.perf_counter() - t0
    cplan = solve(cp, solver, settings)
    plan = c.expand_plan(problem, cp, cplan)
    dt = time.perf_counter() - t0
    log.info("coarsened %d -> %d nodes in %.3f s", problem.n, cp.n, t_c)
    return plan.with_(solve_time_s=dt), {"coarse_nodes": cp.n, "coarsen_time_s": t_c}


def coarsen_problem(problem: Problem, target: int):
    """Coarsen ``problem`` to about ``target`` nodes: backend fusion rules and merges, or, when
    the fusion rules alone overshoot below 80% of the target, merges only (the user asked
    for that size). Returns ``(Coarsening, coarse Problem)``."""
    from .transform.coarsen import coarsen
    from .transform.mapping import coarse_problem

    progress.step(f"coarsening {problem.n} -> {target} nodes")
    c = coarsen(problem.graph, target, problem=problem)
    if len(c.coarse) < 0.8 * target:
        c = coarsen(problem.graph, target, fuse_elementwise=False, fuse_chains=False, problem=problem)
    return c, coarse_problem(problem, c)


def apply_measured(loaded: LoadedModel, spec: Spec, profile: Any,
                   device_map: dict[str, str] | None = None) -> tuple[LoadedModel, Spec, dict[str, Any]]:
    """Measured costs for planning: the spec calibrated from ``profile`` and the model's
    cost graph carrying the profile's per-node times.

    Spec devices matched to a profiled device (:func:`partitioner.measure.profile.match_devices`,
    ``device_map`` first) take the measured time of every node the profile covers; the
    other nodes, and unmatched devices, use the roofline calibrated on the profile
    (:func:`partitioner.measure.calibrate.calibrate`: efficiencies, launch overhead; unmatched
    devices of a calibrated kind take its factors) and links between matched devices take
    the measured transfer figures. Nodes that fall back to the roofline are logged.

    Parameters
    ----------
    profile : Profile or path
        Written by ``partitioner profile`` / :func:`partitioner.measure.profile.profile_graph`.

    Returns
    -------
    (LoadedModel, Spec, dict)
        The model with measured times, the calibrated spec, and provenance (``profile``
        path, ``device_map`` used, ``calibrated`` devices, ``links``, ``runtime``: the runtime's
        own measured costs, :func:`partitioner.measure.handoff.runtime_costs`) for ``Result.extra``.
    """
    from .measure.apply import match_devices, with_profile
    from .measure.calibrate import calibrate
    from .measure.handoff import runtime_costs
    from .measure.profile import Profile, load_profile

    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    cal = calibrate(spec, prof, device_map=device_map, strict=False, graph=loaded.graph.name)
    matched = match_devices(cal.spec, prof, device_map)
    measured = with_profile(loaded, cal.spec, prof, device_map=matched)
    info = {"profile": str(profile) if not isinstance(profile, Profile) else "(in memory)",
            "device_map": matched, "calibrated": sorted(k for k, f in cal.fits.items()),
            "links": dict(cal.links), "runtime": runtime_costs(prof, cal.spec, matched, loaded.graph.name)}
    log.info("costs from profile %s: measured on %s; calibrated roofline on %s", info["profile"], matched,
             info["calibrated"])
    return measured, cal.spec, info


def compile_plan(model: Any, hw: str | Spec = "server-cpu-2gpu", objective: str = "latency",
                 solver: str = "split", settings: Settings | None = None,
                 constraints: Constraints | None = None, example_inputs: Any = None,
                 frontend: str = "auto", model_kwargs: dict | None = None,
                 coarsen_to: int | None = None, profile: Any = None,
                 device_map: dict[str, str] | None = None) -> Result:
    """Trace (or load) a model, build the problem for a spec, solve it and grade the plan.

    With ``profile`` (a :class:`~partitioner.measure.profile.Profile` or its file), node times and
    links are the measured ones and the rest of the spec is calibrated on them
    (:func:`apply_measured`; ``device_map``: spec device id -> profiled device id).

    Raises
    ------
    InfeasibleError
        When the solver's plan violates a constraint (names every violation).
    UsageError
        An unknown solver, or an unknown or ill-typed option in ``settings.options`` (before
        any tracing).
    """
    get_solver(solver)
    check_options(settings or Settings())
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, example_inputs, frontend=frontend, model_kwargs=model_kwargs)
    spec = hw if isinstance(hw, Spec) else load_spec(hw)
    measured_info = None
    if profile is not None:
        loaded, spec, measured_info = apply_measured(loaded, spec, profile, device_map)
    elif device_map:
        raise UsageError("a device map needs a profile", hint="pass profile=FILE (--profile FILE) too")
    problem = Problem(loaded.graph, spec, Objective(objective), constraints or Constraints())
    check_magnitudes(problem)
    t0 = time.perf_counter()
    settings = settings or Settings()
    # one block for bound and solve: the first Ctrl-C during the bound ends it (a weaker,
    # still valid bound) and the solver then returns the best plan it has at once
    with progress.interruptible(True):
        progress.step(f"lower bound ({problem.n} nodes)")
        bound = lower_bound(problem, bound_deadline(t0, settings.time_limit))
        progress.bound(bound.value)
        progress.step(f"solving with {solver}")
        plan, info = solve_problem(problem, solver, solve_settings(t0, settings), coarsen_to)
    res = grade(problem, plan, bound, model=loaded)
    res.extra.update(info, compile_time_s=time.perf_counter() - t0)
    if measured_info is not None:
        res.extra["measured_costs"] = measured_info
    if res.status == "infeasible":
        raise InfeasibleError(f"solver {solver!r} found no feasible plan: " + "; ".join(res.evaluation.violations),
                              hint="try another solver, a spec with more memory, or relax the constraints")
    return res


#: share of a compile's time limit that the lower bound may start parts in (the rest is the solver's)
BOUND_SHARE = 0.25


def bound_deadline(t0: float, time_limit: float | None) -> float | None:
    """Until when the lower bound may start another part (None: no time limit)."""
    return None if time_limit is None else t0 + BOUND_SHARE * time_limit


def solve_settings(t0: float, settings: Settings) -> Settings:
    """``settings`` with the time the bound left of the limit (at least ``1 - BOUND_SHARE`` of
    it minus the bound's overrun, and never under a tenth of it), so that bound and solver
    together keep to the compile's time limit."""
    if settings.time_limit is None:
        return settings
    left = settings.time_limit - (time.perf_counter() - t0)
    return replace(settings, time_limit=max(left, 0.1 * settings.time_limit))


def default_solvers(n: int) -> list[str]:
    """Every registered solver whose size limit admits ``n`` nodes (``milp`` itself is left
    out: it is ``milp-highs`` or ``milp-cbc`` by setting, and both are listed)."""
    from .solvers.registry import SOLVERS

    return [name for name, info in sorted(SOLVERS.items())
            if name != "milp" and (info.max_nodes is None or n <= info.max_nodes)]


def compare(model: Any, hw: str | Spec, objective: str, solvers: list[str] | None = None,
            settings: Settings | None = None, constraints: Constraints | None = None, on_solver=None,
            coarsen_to: int | None = None, profile: Any = None, device_map: dict[str, str] | None = None,
            **load_kw) -> dict[str, Any]:
    """Run several solvers on one problem and grade each against the same bound.

    Parameters
    ----------
    solvers : list of str, optional
        Default: :func:`default_solvers` for the size actually solved (the coarse size when
        ``coarsen_to`` is given).
    on_solver : callable, optional
        Called as ``on_solver(solver_name, row_or_None)``: before each solve (``None``) and after.
    profile, device_map : optional
        Measured costs, as for :func:`compile_plan`.

    Returns
    -------
    dict
        ``model``, ``spec``, ``objective``, ``nodes``, ``coarse_nodes``, ``bound_s``,
        ``bound_binding`` and ``rows``: one per solver (``solver``, ``value_s``,
        ``value_over_bound``, ``status``, ``gap``, ``solve_time_s``, ...). A solver that fails on
        bad input or finds no feasible plan becomes a row with its status and ``error``.
    """
    check_options(settings or Settings())
    loaded = model if isinstance(model, LoadedModel) else load_model(model, **load_kw)
    spec = hw if isinstance(hw, Spec) else load_spec(hw)
    if profile is not None:
        loaded, spec, _ = apply_measured(loaded, spec, profile, device_map)
    elif device_map:
        raise UsageError("a device map needs a profile", hint="pass profile=FILE (--profile FILE) too")
    problem = Problem(loaded.graph, spec, Objective(objective), constraints or Constraints())
    problem.check_supported()
    check_magnitudes(problem)
    size = problem.n if coarsen_to is None else min(problem.n, coarsen_to)
    names = list(solvers) if solvers else default_solvers(size)
    for name in names:
        get_solver(name)  # unknown names fail before any work
    progress.step(f"lower bound ({problem.n} nodes)")
    bound = lower_bound(problem, bound_deadline(time.perf_counter(), (settings or Settings()).time_limit))
    progress.bound(bound.value)
    rows = []
    for name in names:
        progress.step(f"solving with {name}")
        if on_solver:
            on_solver(name, None)
        try:
            plan, info = solve_problem(problem, name, settings, coarsen_to)
            res = grade(problem, plan, bound=bound)
            row = {"solver": name, "value_s": res.value,
                   "value_over_bound": res.value / res.best_bound if res.best_bound > 0 else math.inf,
                   "status": res.status, "gap": res.gap, "bound_s": res.best_bound,
                   "solver_bound_s": plan.solver_bound, "solve_time_s": plan.solve_time_s,
                   "latency_s": res.evaluation.latency, "period_s": res.evaluation.period, **info}
        except InfeasibleError as err:
            row = {"solver": name, "status": "infeasible", "error": err.message}
        except NoSolutionError as err:  # stopped without a plan, nothing proven: the others still count
            row = {"solver": name, "status": "no_solution", "error": err.message}
        except SolverError:
            raise  # a solver whose claim the evaluator contradicts is a bug: fail loudly
        except PartitionerError as err:
            row = {"solver": name, "status": "error", "error": err.message}
        rows.append(row)
        if on_solver:
            on_solver(name, row)
    best = min((r["value_s"] for r in rows if "value_s" in r and r["status"] != "infeasible"), default=math.inf)
    for r in rows:
        if "value_s" in r:
            r["value_over_best"] = r["value_s"] / best if best > 0 and math.isfinite(best) else math.inf
    coarse = next((r["coarse_nodes"] for r in rows if "coarse_nodes" in r), None)
    return {"model": problem.graph.name, "spec": spec.name, "objective": objective, "nodes": problem.n,
            "coarse_nodes": coarse, "bound_s": bound.value, "bound_binding": bound.binding,
            "bound_parts_s": dict(bound.parts), "rows": rows}


__all__ = ["LoadedModel", "Result", "apply_measured", "coarsen_problem", "compare", "compile_plan", "default_solvers", "grade", "load_model",
           "solve_problem"]
