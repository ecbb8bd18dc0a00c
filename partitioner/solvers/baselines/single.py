"""``single``: the best single device that can run the whole model and fits its memory.

This is the "fastest GPU alone" baseline of DiviML (Ghannane and Abdelfattah, ICCAD 2023): every node
on one device, in the evaluator's list-scheduling order (decreasing upward rank, so
tensors bound for the host leave as early as possible).
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import InfeasibleError
from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.evaluate import evaluate
from ...machine.problem import Problem
from ..registry import register


@register("single", "best single device that fits (the 'fastest device alone' baseline)")
def solve(problem: Problem, settings: Settings) -> Plan:
    best, best_val, reasons = None, math.inf, []
    for d in range(problem.D):
        name = problem.devices[d]
        if not problem.supported[:, d].all():
            bad = problem.graph.node(problem.node_name(int(np.flatnonzero(~problem.supported[:, d])[0])))
            reasons.append(f"{name} cannot run op {bad.op!r}")
            continue
        ev = evaluate(problem, Plan((d,) * problem.n))
        plan = Plan((d,) * problem.n, ev.order, status="heuristic")
        if not ev.feasible:
            reasons.append(f"{name}: {ev.violations[0]}")
            continue
        val = ev.value(problem.objective)
        if val < best_val:
            best, best_val = plan.with_(info={"device": name}), val
    if best is None:
        raise InfeasibleError("no single device can run the whole model: " + "; ".join(reasons),
                              hint="use a solver that spreads the model over several devices (e.g. heft)")
    return best
