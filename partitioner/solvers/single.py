"""``single``: the best single device that can run the whole model and fits its memory.

This is the "fastest GPU alone" baseline of DiviML (Yahya et al., ICCAD 2023): every node
on one device, nodes in topological order, evaluated by the evaluator.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InfeasibleError
from ..evaluate import evaluate
from ..problem import Plan, Problem, Settings
from . import register


@register("single", "best single device that fits (the 'fastest device alone' baseline)")
def solve(problem: Problem, settings: Settings) -> Plan:
    best, best_val, reasons = None, math.inf, []
    topo = tuple(range(problem.n))
    for d in range(problem.D):
        name = problem.devices[d]
        if not problem.supported[:, d].all():
            bad = problem.graph.node(problem.node_name(int(np.flatnonzero(~problem.supported[:, d])[0])))
            reasons.append(f"{name} cannot run op {bad.op!r}")
            continue
        order = tuple(topo if k == d else () for k in range(problem.D))
        plan = Plan((d,) * problem.n, order, status="heuristic")
        ev = evaluate(problem, plan)
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
