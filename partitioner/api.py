"""The public API: load a model, compile it for a spec, grade the plan, compare solvers.

Every figure reported here comes from the evaluator (:mod:`partitioner.evaluate`); the
bound from :mod:`partitioner.bounds` (and the solver's own proven bound, if larger).
"""

from __future__ import annotations

import importlib.util
import logging
import math

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import graph as graphmod
from . import progress
from .bounds import Bound, lower_bound
from .errors import InfeasibleError, NoSolutionError, PartitionerError, SolverError, UsageError
from .evaluate import Evaluation, evaluate
from .hardware import Spec, load_spec
from .problem import Constraints, Objective, Plan, Problem, Settings, gap
from .solvers import solve

log = logging.getLogger(__name__)

#: relative tolerance between a solver's claimed objective and the evaluator's figure
CLAIM_RTOL = 1e-6


@dataclass
class LoadedModel:
    """A model ready for planning: the cost graph, and the fx graph when traced."""

    graph: graphmod.CostGraph
    gm: Any = None  # torch.fx.GraphModule
    example_inputs: tuple | None = None
    source: str = ""


def _load_factory(ref: str):
    path, _, fn = ref.rpartition(":")
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"model file {path!r} does not exist", hint="use path/to/file.py:factory")
    spec = importlib.util.spec_from_file_location(f"_partitioner_user_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as err:  # user code: report, don't crash
        raise UsageError(f"importing {path} failed: {type(err).__name__}: {err}", hint="fix the model file") from None
    factory = getattr(mod, fn, None)
    if not callable(factory):
        raise UsageError(f"{path} has no callable {fn!r}", hint="factory() must return (model, example_inputs)")
    try:
        out = factory()
    except Exception as err:
        raise UsageError(f"{ref}() failed: {type(err).__name__}: {err}", hint="fix the factory") from None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise UsageError(f"{ref}() must return (model, example_inputs_tuple)", hint="return a 2-tuple")
    model, inputs = out
    if isinstance(inputs, dict):  # keyword inputs, as model(**inputs)
        return model, inputs
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def load_model(ref: Any, example_inputs: Any = None, *, frontend: str = "auto",
               model_kwargs: dict | None = None, example_kwargs: dict | None = None) -> LoadedModel:
    """Load a model from a zoo name, ``file.py:factory``, a cost-graph JSON, an ONNX file, or an
    nn.Module.

    Parameters
    ----------
    ref : str or nn.Module or CostGraph
    example_inputs : tuple or dict, optional
        Required when ``ref`` is an nn.Module: positional inputs (a tuple, or one tensor) or
        keyword inputs (a dict, as ``model(**inputs)``). A ``file.py:factory`` may return
        either too.
    frontend : {"auto", "fx", "export", "dynamo"}
        See :func:`partitioner.trace.trace`. ``LoadedModel.example_inputs`` holds the inputs
        as the traced graph takes them (positionally).
    model_kwargs : dict, optional
        Keyword arguments of a zoo factory (e.g. ``{"nodes": 200}`` for RandWire).
    example_kwargs : dict, optional
        Keyword inputs of an nn.Module besides positional ``example_inputs``.
    """
    if isinstance(ref, graphmod.CostGraph):
        return LoadedModel(ref, source="cost graph")
    if isinstance(ref, (str, Path)) and str(ref).endswith(".json"):
        return LoadedModel(graphmod.load(ref), source=str(ref))
    if isinstance(ref, (str, Path)) and str(ref).endswith(".onnx"):
        from .onnx_import import load_onnx

        return LoadedModel(load_onnx(ref), source=str(ref))
    from .trace import trace

    if isinstance(ref, str):
        if ref.endswith(".py") or ".py:" in ref:
            if ":" not in ref:
                raise UsageError(f"{ref!r} names no factory", hint="use path/to/file.py:factory")
            model, inputs = _load_factory(ref)
            name = ref.rpartition(":")[2]
        else:
            import models

            if ref not in models.ZOO:
                names = ", ".join(n for n, _ in models.list_models())
                raise UsageError(f"unknown model {ref!r}",
                                 hint=f"zoo models: {names}; or path/to/file.py:factory; or a cost-graph .json")
            model, inputs = _zoo_model(models, ref, dict(model_kwargs or {}))
            name = ref
    else:
        if example_inputs is None and not example_kwargs:
            raise UsageError("an nn.Module needs example_inputs", hint="pass example_inputs=(tensor, ...)")
        model, inputs, name = ref, example_inputs, type(ref).__name__
    progress.step(f"tracing {name} ({frontend})")
    gm = trace(model, inputs, frontend=frontend, example_kwargs=example_kwargs)
    return LoadedModel(graphmod.from_fx(gm, name), gm, tuple(gm.meta["partitioner_inputs"]), source=str(name))


def _zoo_model(models, name: str, kwargs: dict):
    """Build zoo model ``name`` with factory arguments ``kwargs`` (from ``--model-arg``): an
    argument the factory does not take, or a value of the wrong type or range, is a
    UsageError that lists the factory's arguments and their defaults."""
    import inspect

    factory = models.ZOO[name]
    params = {k: p for k, p in inspect.signature(factory).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepted = ", ".join(f"{k}={p.default!r}" if p.default is not p.empty else k for k, p in params.items())
    hint = f"{name} takes: {accepted}" if accepted else f"{name} takes no arguments"
    for k, v in kwargs.items():
        if k not in params:
            raise UsageError(f"model {name!r} has no argument {k!r} (--model-arg {k}=...)", hint=hint)
        default = params[k].default
        int_for_float = isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool)
        if isinstance(default, (bool, int, float, str)) and not isinstance(v, type(default)) and not int_for_float:
            raise UsageError(f"--model-arg {k}={v!r}: model {name!r} expects a value of type {type(default).__name__} "
                             f"(default {default!r})", hint=hint)
    if not kwargs:
        return models.get_model(name)
    try:
        return models.get_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError, ZeroDivisionError, IndexError, RuntimeError) as err:
        args = " ".join(f"--model-arg {k}={v}" for k, v in kwargs.items())
        raise UsageError(f"model {name!r} cannot be built with {args}: {err}", hint=hint) from None


@dataclass
class Result:
    """A graded plan: the solver's plan, the evaluator's figures, the bound and the gap."""

    problem: Problem
    plan: Plan
    evaluation: Evaluation
    bound: Bound
    status: str
    value: float
    gap: float
    model: LoadedModel | None = None
    extra: dict = field(default_factory=dict)

    @property
    def contended_latency(self) -> float:
        """Latency when each link carries one transfer at a time (see ``contended_latency``)."""
        if "contended_latency_s" not in self.extra:
            from .evaluate import contended_latency

            self.extra["contended_latency_s"] = (contended_latency(self.problem, self.plan)
                                                 if self.evaluation.feasible and not self.plan.replicas else math.nan)
        return self.extra["contended_latency_s"]

    @property
    def best_bound(self) -> float:
        return max(self.bound.value, self.plan.solver_bound or 0.0)

    def summary(self) -> dict[str, Any]:
        p, ev = self.problem, self.evaluation
        counts = [0] * p.D
        for d in self.plan.placement:
            counts[d] += 1
        return {
            "model": p.graph.name, "spec": p.spec.name, "objective": p.objective.value,
            "solver": self.plan.solver, "status": self.status, "value_s": self.value,
            "latency_s": ev.latency, "period_s": ev.period, "throughput_per_s": ev.throughput,
            "latency_with_link_contention_s": (self.contended_latency if math.isfinite(self.contended_latency)
                                               else None),
            "bound_s": self.best_bound, "bound_binding": self.bound.binding,
            "bound_parts_s": dict(self.bound.parts, **({"solver": self.plan.solver_bound}
                                                      if self.plan.solver_bound is not None else {})),
            "gap": self.gap, "solve_time_s": self.plan.solve_time_s, "feasible": ev.feasible,
            "violations": list(ev.violations), "nodes": p.n,
            "devices": {d: {"nodes": counts[j], "load_s": float(ev.device_load[j]),
                            "memory_peak_bytes": float(ev.memory_peak[j]),
                            "param_bytes": float(ev.param_bytes[j]),
                            "capacity_bytes": float(p.capacity[j])} for j, d in enumerate(p.devices)},
        }

    def to_json(self) -> dict[str, Any]:
        """The content of ``plan.json``."""
        p, ev = self.problem, self.evaluation
        out = {"format": "partitioner.plan/1"}
        out.update(self.summary())
        out["placement"] = {p.node_name(i): p.devices[d] for i, d in enumerate(self.plan.placement)}
        out["order"] = {p.devices[d]: [p.node_name(i) for i in seq] for d, seq in enumerate(ev.order)}
        out["schedule"] = {p.node_name(i): [float(ev.start[i]), float(ev.finish[i])] for i in range(p.n)}
        out["links_load_s"] = {f"{p.devices[a]}->{p.devices[b]}": t for (a, b), t in sorted(ev.link_load.items())}
        if self.plan.info:
            out["solver_info"] = {k: v for k, v in self.plan.info.items() if _jsonable(v)}
        return out


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


def grade(problem: Problem, plan: Plan, bound: Bound | None = None, model: LoadedModel | None = None) -> Result:
    """Evaluate a plan, check the solver's claims against the evaluator, attach bound and gap.

    Raises
    ------
    SolverError
        The solver's claimed objective differs from the evaluator's (relative 1e-6), or it
        claims optimality for a plan the evaluator finds infeasible.
    """
    ev = evaluate(problem, plan)
    value = ev.value(problem.objective)
    if plan.claimed is not None and math.isfinite(value):
        if abs(plan.claimed - value) > CLAIM_RTOL * max(abs(value), 1e-12):
            raise SolverError(f"solver {plan.solver!r} claims {plan.claimed!r} but the evaluator finds {value!r} "
                              f"for its plan", hint="this is a bug in the solver's model; please report it")
    status = plan.status
    if not ev.feasible:
        if status in ("optimal", "optimal_coarse"):
            raise SolverError(f"solver {plan.solver!r} claims an optimal plan the evaluator rejects: "
                              f"{ev.violations[0]}", hint="this is a bug in the solver's model; please report it")
        status = "infeasible"
    bound = bound or lower_bound(problem)
    best = max(bound.value, plan.solver_bound or 0.0)
    if status == "optimal":
        best = max(best, value if plan.solver_bound is None else best)
    g = gap(value, best) if ev.feasible else math.inf
    if best > value * (1 + 1e-6) and ev.feasible:
        raise SolverError(f"bound {best!r} exceeds the value {value!r} of a feasible plan by {plan.solver!r}",
                          hint="a lower bound is invalid; this is a bug, please report it")
    return Result(problem, plan, ev, bound, status, value, g, model)


def solve_problem(problem: Problem, solver: str, settings: Settings | None = None,
                  coarsen_to: int | None = None) -> tuple[Plan, dict[str, Any]]:
    """Solve ``problem`` with ``solver``, optionally on a coarsened graph.

    With ``coarsen_to``, the graph is coarsened (:func:`partitioner.coarsen.coarsen`, backend
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
    from .coarsen import coarse_problem, coarsen

    progress.step(f"coarsening {problem.n} -> {target} nodes")
    c = coarsen(problem.graph, target, problem=problem)
    if len(c.coarse) < 0.8 * target:
        c = coarsen(problem.graph, target, fuse_elementwise=False, fuse_chains=False, problem=problem)
    return c, coarse_problem(problem, c)


def apply_measured(loaded: LoadedModel, spec: Spec, profile: Any,
                   device_map: dict[str, str] | None = None) -> tuple[LoadedModel, Spec, dict[str, Any]]:
    """Measured costs for planning: the spec calibrated from ``profile`` and the model's
    cost graph carrying the profile's per-node times.

    Spec devices matched to a profiled device (:func:`partitioner.profile.match_devices`,
    ``device_map`` first) take the measured time of every node the profile covers; the
    other nodes, and unmatched devices, use the roofline calibrated on the profile
    (:func:`partitioner.calibrate.calibrate`: efficiencies, launch overhead; unmatched
    devices of a calibrated kind take its factors) and links between matched devices take
    the measured transfer figures. Nodes that fall back to the roofline are logged.

    Parameters
    ----------
    profile : Profile or path
        Written by ``partitioner profile`` / :func:`partitioner.profile.profile_graph`.

    Returns
    -------
    (LoadedModel, Spec, dict)
        The model with measured times, the calibrated spec, and provenance (``profile``
        path, ``device_map`` used, ``calibrated`` devices, ``links``, ``runtime``: the runtime's
        own measured costs, :func:`partitioner.profile_handoff.runtime_costs`) for ``Result.extra``.
    """
    from .calibrate import calibrate
    from .profile import Profile, load_profile, match_devices, with_profile
    from .profile_handoff import runtime_costs

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
                 solver: str = "heft", settings: Settings | None = None,
                 constraints: Constraints | None = None, example_inputs: Any = None,
                 frontend: str = "auto", model_kwargs: dict | None = None,
                 coarsen_to: int | None = None, profile: Any = None,
                 device_map: dict[str, str] | None = None) -> Result:
    """Trace (or load) a model, build the problem for a spec, solve it and grade the plan.

    With ``profile`` (a :class:`~partitioner.profile.Profile` or its file), node times and
    links are the measured ones and the rest of the spec is calibrated on them
    (:func:`apply_measured`; ``device_map``: spec device id -> profiled device id).

    Raises
    ------
    InfeasibleError
        When the solver's plan violates a constraint (names every violation).
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, example_inputs, frontend=frontend, model_kwargs=model_kwargs)
    spec = hw if isinstance(hw, Spec) else load_spec(hw)
    measured_info = None
    if profile is not None:
        loaded, spec, measured_info = apply_measured(loaded, spec, profile, device_map)
    elif device_map:
        raise UsageError("a device map needs a profile", hint="pass profile=FILE (--profile FILE) too")
    problem = Problem(loaded.graph, spec, Objective(objective), constraints or Constraints())
    t0 = time.perf_counter()
    progress.step(f"lower bound ({problem.n} nodes)")
    bound = lower_bound(problem)
    progress.bound(bound.value)
    progress.step(f"solving with {solver}")
    plan, info = solve_problem(problem, solver, settings, coarsen_to)
    res = grade(problem, plan, bound, model=loaded)
    res.extra.update(info, compile_time_s=time.perf_counter() - t0)
    if measured_info is not None:
        res.extra["measured_costs"] = measured_info
    if res.status == "infeasible":
        raise InfeasibleError(f"solver {solver!r} found no feasible plan: " + "; ".join(res.evaluation.violations),
                              hint="try another solver, a spec with more memory, or relax the constraints")
    return res


def default_solvers(n: int) -> list[str]:
    """Every registered solver whose size limit admits ``n`` nodes (``milp`` itself is left
    out: it is ``milp-highs`` or ``milp-cbc`` by setting, and both are listed)."""
    from .solvers import SOLVERS

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
    from .solvers import get_solver

    loaded = model if isinstance(model, LoadedModel) else load_model(model, **load_kw)
    spec = hw if isinstance(hw, Spec) else load_spec(hw)
    if profile is not None:
        loaded, spec, _ = apply_measured(loaded, spec, profile, device_map)
    elif device_map:
        raise UsageError("a device map needs a profile", hint="pass profile=FILE (--profile FILE) too")
    problem = Problem(loaded.graph, spec, Objective(objective), constraints or Constraints())
    problem.check_supported()
    size = problem.n if coarsen_to is None else min(problem.n, coarsen_to)
    names = list(solvers) if solvers else default_solvers(size)
    for name in names:
        get_solver(name)  # unknown names fail before any work
    progress.step(f"lower bound ({problem.n} nodes)")
    bound = lower_bound(problem)
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
