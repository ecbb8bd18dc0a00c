"""Solver registry: every solver is ``solve(problem, settings) -> Plan``, registered by name.

Solver modules register themselves with :func:`register`; importing :mod:`partitioner.solvers`
imports them all.

Ctrl-C during :func:`solve` asks the solver to stop (:mod:`partitioner.progress`): solvers
registered ``interruptible`` poll the stop flag and return the best plan they have, which
:func:`solve` marks status "interrupted" (keeping the solver's bound, so the gap is honest;
``info["interrupted"]`` names the solver). Only a solver with nothing to return (or one that
does not poll, where the first Ctrl-C raises KeyboardInterrupt) falls back to the HEFT plan.
A second Ctrl-C aborts with KeyboardInterrupt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import progress
from ..errors import NoSolutionError, UsageError
from ..ir.plan import Plan
from ..ir.settings import Settings
from ..machine.problem import Problem

log = logging.getLogger(__name__)

SolveFn = Callable[[Problem, Settings], Plan]


@dataclass(frozen=True)
class SolverInfo:
    name: str
    fn: SolveFn
    description: str
    exact: bool = False
    max_nodes: int | None = None  # default `compare` skips larger graphs
    interruptible: bool = False  # polls progress.stop_requested() and returns its best plan


SOLVERS: dict[str, SolverInfo] = {}


def register(name: str, description: str, exact: bool = False, max_nodes: int | None = None,
             interruptible: bool = False):
    """Decorator: register ``fn`` as solver ``name`` (``interruptible``: it polls
    :func:`partitioner.progress.stop_requested` and then returns its best plan so far)."""

    def deco(fn: SolveFn) -> SolveFn:
        SOLVERS[name] = SolverInfo(name, fn, description, exact, max_nodes, interruptible)
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
    log.info("solver %s: started on %d nodes, %d devices", name, problem.n, problem.D)
    with progress.interruptible(info.interruptible):
        try:
            plan = info.fn(problem, settings)
        except KeyboardInterrupt:
            if (name == "heft" or not settings.extra.get("interrupt_fallback", True)
                    or progress.interrupt_presses() >= 2):
                raise
            plan = _fallback(problem, settings, name, t0, "its plan was lost")
        except NoSolutionError:
            if not progress.stop_requested() or name == "heft":
                raise
            plan = _fallback(problem, settings, name, t0, "it had found no plan yet")
        else:
            if progress.stop_requested() and plan.status != "optimal" and not plan.info.get("fallback"):
                log.warning("solver %s interrupted after %.1f s; returning its best plan so far", name,
                            time.perf_counter() - t0)
                plan = plan.with_(status="interrupted", info=dict(plan.info, interrupted=name,
                                                                  interrupted_plan="its best plan so far"))
    dt = time.perf_counter() - t0
    log.info("solver %s: %s in %.3f s", name, plan.status, dt)
    return plan.with_(solver=name, solve_time_s=dt)


def _fallback(problem: Problem, settings: Settings, name: str, t0: float, why: str) -> Plan:
    """Ctrl-C left solver ``name`` with nothing to return: the HEFT plan (milliseconds),
    marked "interrupted" (a second Ctrl-C aborts)."""
    log.warning("solver %s interrupted after %.1f s (%s); returning the HEFT plan", name,
                time.perf_counter() - t0, why)
    return SOLVERS["heft"].fn(problem, settings).with_(
        status="interrupted", info={"interrupted": name, "fallback": "heft",
                                    "interrupted_plan": "the HEFT plan it started from"})

