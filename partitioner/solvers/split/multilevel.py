"""The multilevel start of the ``split`` heuristic: coarsen, solve the coarse graph, expand.

DiviML's module pass solves modules exactly one after the other; METIS coarsens, partitions
the small graph and refines while uncoarsening. :func:`multilevel_start` does both at every
graph size and for both objectives: :func:`partitioner.transform.coarsen.coarsen` fuses what a backend
fuses and merges clusters (heavy edges first, keeping the quotient acyclic) down to
``ml_nodes`` clusters; ``split`` itself solves the coarse problem (its module pass and, at
that size, its exact CP-SAT finish: the coarse graph solved exactly within a deterministic
budget; the pipeline DP among its starts); the coarse plan is expanded to every fine node
and becomes one more starting plan of the fine search, which refines it.

The coarse memory model does not see activations internal to a cluster, so the coarse
problem gets ``1 - ml_margin`` of each capacity; the expanded plan is graded by the
evaluator like every start. Off by default (``multilevel``): on the memory-tight family its
plans were never the best start (coarse clusters pack memory badly, 48 or 150 clusters) and
the extra start cost 1-4 s; with co-location groups (training graphs) coarsening unites the
forward and backward clusters into a few giant groups.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ...errors import PartitionerError
from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.problem import Problem
from ...transform.coarsen import coarsen
from ...transform.mapping import coarse_problem
from .options import SplitOptions

log = logging.getLogger(__name__)


def multilevel_start(problem: Problem, settings: Settings, deadline: float, solve) -> Plan | None:
    """The expanded plan of the coarse problem solved by ``solve`` (split), or None."""
    import time

    opts = settings.options_of(SplitOptions)
    target = opts.ml_nodes
    if problem.n <= 2 * target:
        return None
    try:
        c = coarsen(problem.graph, target, problem=problem)
        cp = coarse_problem(problem, c)
    except PartitionerError as err:
        log.info("split: multilevel coarsening failed: %s", err.message)
        return None
    if cp.n >= problem.n:
        return None
    cp.capacity = problem.capacity * (1.0 - opts.ml_margin)
    left = deadline - time.perf_counter()
    sub = replace(settings, time_limit=max(1.0, 0.25 * left)).with_options(
        SplitOptions, multilevel=False, effort=0.5 * opts.effort)
    try:
        plan = solve(cp, sub)
    except PartitionerError as err:
        log.info("split: coarse solve failed: %s", err.message)
        return None
    return c.expand_plan(problem, cp, plan).with_(status="heuristic", info={"coarse_nodes": cp.n})
