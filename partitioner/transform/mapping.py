"""Coarse plans mapped back: :class:`Coarsening` (the result of :func:`partitioner.transform.coarsen.coarsen`:
the coarse graph and the map between clusters and fine nodes; :meth:`Coarsening.expand_plan`
maps a plan of the coarse problem back to every fine node) and :func:`coarse_problem` (the
problem on the coarse graph, with every cluster's time the sum of its members').
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import GraphError, PlanError
from ..ir.graph import CostGraph
from ..ir.plan import Plan
from ..machine.evaluate import list_order
from ..machine.problem import Problem

__all__ = ["Coarsening", "coarse_problem"]


@dataclass(frozen=True)
class Coarsening:
    """A coarse graph and the map between its clusters and the fine nodes.

    Attributes
    ----------
    coarse : CostGraph
        The coarse graph (semantics in the module docstring).
    members : dict
        Coarse node id -> fine node ids, in fine topological order.
    owner : dict
        Fine node id -> coarse node id.
    ops : dict
        Coarse node id -> distinct member ops, in member order.
    fine : CostGraph
        The graph that was coarsened.
    info : dict
        Counts after each phase, the target, whether it was reached, and the time taken.
    """

    coarse: CostGraph
    members: dict[str, tuple[str, ...]]
    owner: dict[str, str]
    ops: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fine: CostGraph | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def expand_plan(self, fine_problem: Problem, coarse_problem: Problem, plan: Plan) -> Plan:
        """Map a plan of the coarse problem to every fine node.

        Members go where their cluster goes; each device runs its clusters in the coarse
        order (the plan's, or the evaluator's list order when it has none) and a
        cluster's members in fine topological order. ``status`` "optimal" becomes
        "optimal_coarse" (proven only for the coarse problem); ``claimed`` and
        ``solver_bound`` are dropped (the fine evaluator decides the value, and a bound
        of the coarse problem is no bound of the fine one); the coarse figures stay in
        ``info["coarse"]``.
        """
        owner_idx = _owner_index(self, fine_problem.graph, coarse_problem.graph)
        if coarse_problem.devices != fine_problem.devices:
            raise PlanError("the coarse and fine problems have different devices",
                            hint="build the coarse problem with coarse_problem(fine, coarsening)")
        if not plan.replicas:
            coarse_problem.validate_plan(plan)
        replicas = None
        if plan.replicas:
            replicas = tuple(self.expand_plan(fine_problem, coarse_problem, r) for r in plan.replicas)
        mem: list[list[int]] = [[] for _ in range(coarse_problem.n)]
        for i, k in enumerate(owner_idx.tolist()):
            mem[k].append(i)
        cpl = tuple(int(x) for x in plan.placement)
        placement = tuple(cpl[k] for k in owner_idx.tolist())
        corder = plan.order if plan.order is not None else list_order(coarse_problem, np.asarray(cpl))
        order = tuple(tuple(i for k in seq for i in mem[k]) for seq in corder)
        status = "optimal_coarse" if plan.status == "optimal" else plan.status
        info = dict(plan.info)
        info["coarse"] = {"nodes": coarse_problem.n, "status": plan.status, "claimed": plan.claimed,
                          "solver_bound": plan.solver_bound}
        return plan.with_(placement=placement, order=order, status=status, claimed=None, solver_bound=None,
                          info=info, replicas=replicas)


def coarse_problem(fine: Problem, c: Coarsening) -> Problem:
    """The problem on ``c.coarse`` with ``T[cluster, d] = sum of its members' T[i, d]``.

    Exact: unsupported members (``inf``) make the cluster unsupported on that device,
    and measured times and roofline times are kept per member. Same spec, objective and
    constraints as ``fine``.
    """
    idx = _owner_index(c, fine.graph, c.coarse)
    T = np.zeros((len(c.coarse), fine.D))
    np.add.at(T, idx, fine.T)
    return Problem(c.coarse, fine.spec, fine.objective, fine.constraints, T=T)


def _owner_index(c: Coarsening, fine: CostGraph, coarse: CostGraph) -> np.ndarray:
    """``m[i]`` = index in ``coarse`` of the cluster of fine node ``i`` (checks they match)."""
    same = c.fine is None or fine is c.fine or (
        fine.order == c.fine.order and fine.g.number_of_edges() == c.fine.g.number_of_edges())
    if not same or len(fine) != len(c.owner) or any(v not in c.owner for v in fine.order):
        raise GraphError(f"the coarsening does not belong to graph {fine.name!r}",
                         hint="coarsen the fine problem's own graph")
    if coarse is not c.coarse and list(coarse.order) != list(c.coarse.order):
        raise GraphError("the coarse problem is not built on this coarsening's graph",
                         hint="build it with coarse_problem(fine, coarsening)")
    cidx = coarse.index
    return np.array([cidx[c.owner[v]] for v in fine.order], dtype=np.int64)
