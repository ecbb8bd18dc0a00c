"""Solver registry: every solver is ``solve(problem, settings) -> Plan``, registered by name."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError
from ..problem import Plan, Problem, Settings

log = logging.getLogger(__name__)

SolveFn = Callable[[Problem, Settings], Plan]


@dataclass(frozen=True)
class SolverInfo:
    name: str
    fn: SolveFn
    description: str
    exact: bool = False
    max_nodes: int | None = None  # default `compare` skips larger graphs


SOLVERS: dict[str, SolverInfo] = {}


def register(name: str, description: str, exact: bool = False, max_nodes: int | None = None):
    """Decorator: register ``fn`` as solver ``name``."""

    def deco(fn: SolveFn) -> SolveFn:
        SOLVERS[name] = SolverInfo(name, fn, description, exact, max_nodes)
        return fn

    return deco


def get_solver(name: str) -> SolverInfo:
    try:
        return SOLVERS[name]
    except KeyError:
        raise UsageError(f"unknown solver {name!r}", hint=f"solvers: {', '.join(sorted(SOLVERS))}") from None


def solve(problem: Problem, name: str, settings: Settings | None = None) -> Plan:
    """Run solver ``name`` on ``problem``; the returned plan carries the solver name and time."""
    info = get_solver(name)
    settings = settings or Settings()
    if settings.time_limit is not None and settings.time_limit <= 0:
        raise UsageError(f"time limit must be > 0 seconds, got {settings.time_limit}",
                         hint="pass a positive --time-limit, or leave it out")
    problem.check_supported()
    t0 = time.perf_counter()
    try:
        plan = info.fn(problem, settings)
    except KeyboardInterrupt:
        if name == "heft" or not settings.extra.get("interrupt_fallback", True):
            raise
        # Ctrl-C: the solver's own incumbent is lost with its stack, so return the plan every
        # solver starts from (HEFT, milliseconds), marked "interrupted"; a second Ctrl-C aborts.
        log.warning("solver %s interrupted after %.1f s; returning the HEFT plan", name, time.perf_counter() - t0)
        from . import heft

        plan = heft.solve(problem, settings).with_(
            status="interrupted", info={"interrupted": name, "fallback": "heft"})
    dt = time.perf_counter() - t0
    log.info("solver %s: %s in %.3f s", name, plan.status, dt)
    return plan.with_(solver=name, solve_time_s=dt)


from . import cpsat, dp, greedy, heft, metis, milp, peft, single, split  # noqa: E402,F401  (register the solvers)
from .. import symmetry  # noqa: E402,F401  (registers the 'symmetry' solver)
