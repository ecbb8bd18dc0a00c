"""``milp``, ``milp-cbc``, ``milp-highs``: the exact MILP solvers, registered.

Latency: :mod:`.latency` (disjunctive schedule); throughput: :mod:`.throughput`
(bottleneck period, data-parallel replicas). Backends: :mod:`.backends`.
"""

from __future__ import annotations

from dataclasses import replace

from ...ir.plan import Objective, Plan
from ...ir.settings import Settings
from ...machine.problem import Problem
from ..registry import register
from .latency import solve_latency
from .throughput import solve_throughput


@register("milp", "exact MILP: disjunctive schedule (latency) or bottleneck period with data-parallel "
                  "replicas (throughput); CBC or HiGHS (Manne 1960; DiviML, Ghannane and Abdelfattah 2023)",
          exact=True, max_nodes=30, interruptible=True)
def solve(problem: Problem, settings: Settings) -> Plan:
    if problem.objective is Objective.LATENCY:
        return solve_latency(problem, settings)
    return solve_throughput(problem, settings)


@register("milp-cbc", "the milp solver with the CBC backend", exact=True, max_nodes=30, interruptible=True)
def solve_cbc(problem: Problem, settings: Settings) -> Plan:
    return solve(problem, replace(settings, milp_backend="cbc"))


@register("milp-highs", "the milp solver with the HiGHS backend", exact=True, max_nodes=30, interruptible=True)
def solve_highs(problem: Problem, settings: Settings) -> Plan:
    return solve(problem, replace(settings, milp_backend="highs"))
