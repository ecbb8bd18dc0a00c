"""A solver's answer (:class:`Plan`), the objective it optimises and its side constraints.

A :class:`Plan` holds a placement (a device index per node, node ``i`` being
``graph.order[i]``) and, optionally, the order in which each device runs its nodes;
without an order the evaluator derives one by deterministic list scheduling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any


class Objective(str, Enum):
    LATENCY = "latency"
    THROUGHPUT = "throughput"


@dataclass(frozen=True)
class Constraints:
    """Side constraints: a latency objective may carry a throughput floor (samples/s), a
    throughput objective a latency ceiling (s); ``memory`` enforces device capacities."""

    throughput_floor: float | None = None
    latency_ceiling: float | None = None
    memory: bool = True


#: Plan statuses. Only "optimal" claims a proof of optimality for the problem as given.
STATUSES = ("optimal", "optimal_coarse", "time_limit", "feasible", "heuristic", "interrupted",
            "infeasible", "no_solution")


@dataclass(frozen=True)
class Plan:
    """A solver's answer.

    Attributes
    ----------
    placement : tuple of int
        Device index of every node (index ``i`` is ``graph.order[i]``).
    order : tuple of tuple of int, optional
        Per device, its nodes in execution order; None lets the evaluator list-schedule.
    status : str
        One of :data:`STATUSES`.
    claimed : float, optional
        The solver's own objective value; the evaluator must agree with it.
    solver_bound : float, optional
        A lower bound the solver proved (e.g. the MILP's best bound).
    replicas : tuple of Plan, optional
        Data parallelism: each replica is a full plan on its own device group; the
        input stream is shared in proportion to the replicas' throughputs.
    """

    placement: tuple[int, ...]
    order: tuple[tuple[int, ...], ...] | None = None
    solver: str = ""
    status: str = "heuristic"
    claimed: float | None = None
    solver_bound: float | None = None
    solve_time_s: float = 0.0
    info: Mapping[str, Any] = field(default_factory=dict)
    replicas: tuple["Plan", ...] | None = None

    def with_(self, **kw) -> "Plan":
        return replace(self, **kw)


def gap(value: float, bound: float) -> float:
    """Relative gap ``(value - bound) / value`` (0 when proven optimal; inf without a value)."""
    if value is None or not math.isfinite(value):
        return math.inf
    if value <= 0:
        return 0.0
    return max(0.0, (value - bound) / value)
