"""Grading: a solver's plan checked against the evaluator, with the lower bound and the gap.

:func:`grade` is what every entry point reports: the evaluator's figures
(:mod:`partitioner.machine.evaluate`), the solver's claims checked against them, and the
bound (:mod:`partitioner.bounds.lower`, or the solver's own proven bound when larger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .bounds.lower import Bound, lower_bound
from .errors import SolverError
from .frontend.load import LoadedModel
from .ir.jsonio import finite
from .ir.plan import Plan, gap
from .machine.evaluate import Evaluation, evaluate
from .machine.problem import Problem

#: relative tolerance between a solver's claimed objective and the evaluator's figure
CLAIM_RTOL = 1e-6


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

    def __repr__(self) -> str:
        p = self.problem
        return (f"Result(model={p.graph.name!r}, spec={p.spec.name!r}, objective={p.objective.value!r}, "
                f"solver={self.plan.solver!r}, status={self.status!r}, value_s={self.value:.6g}, "
                f"bound_s={self.best_bound:.6g}, gap={self.gap:.4g}, nodes={p.n}, devices={p.D})")

    @property
    def contended_latency(self) -> float:
        """Latency when each link carries one transfer at a time (see ``contended_latency``)."""
        if "contended_latency_s" not in self.extra:
            from .machine.evaluate import contended_latency

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
            "bound_time_s": self.bound.info.get("seconds"), "bound_skipped": list(self.bound.info.get("skipped", [])),
            "gap": self.gap, "solve_time_s": self.plan.solve_time_s, "feasible": ev.feasible,
            "violations": list(ev.violations), "nodes": p.n,
            "devices": {d: {"nodes": counts[j], "load_s": float(ev.device_load[j]),
                            "memory_peak_bytes": float(ev.memory_peak[j]),
                            "param_bytes": float(ev.param_bytes[j]),
                            "capacity_bytes": float(p.capacity[j])} for j, d in enumerate(p.devices)},
        }

    def to_json(self) -> dict[str, Any]:
        """The content of ``plan.json`` (standard JSON: an infinite or undefined figure, e.g. the
        throughput of a plan that takes no time, is None)."""
        p, ev = self.problem, self.evaluation
        out = {"format": "partitioner.plan/1"}
        out.update(self.summary())
        out["placement"] = {p.node_name(i): p.devices[d] for i, d in enumerate(self.plan.placement)}
        out["order"] = {p.devices[d]: [p.node_name(i) for i in seq] for d, seq in enumerate(ev.order)}
        out["schedule"] = {p.node_name(i): [float(ev.start[i]), float(ev.finish[i])] for i in range(p.n)}
        out["links_load_s"] = {f"{p.devices[a]}->{p.devices[b]}": t for (a, b), t in sorted(ev.link_load.items())}
        if self.plan.info:
            out["solver_info"] = {k: v for k, v in self.plan.info.items() if _jsonable(v)}
        return finite(out)


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
