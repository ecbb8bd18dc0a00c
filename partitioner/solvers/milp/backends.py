"""MILP backends: HiGHS through highspy (warm start, Ctrl-C stop, progress of improving
solutions) and CBC (PuLP's bundled PULP_CBC_CMD, stopped by SIGINT), one :func:`run_backend`
that reports status, objective and bound of a model built by
:class:`partitioner.solvers.milp.model.MilpModel`."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pulp

from ... import progress
from ...errors import SolverError, UsageError

log = logging.getLogger(__name__)
#: relative MIP gap requested from the backends (proofs are real proofs)
MIP_GAP = 1e-9


@dataclass
class Outcome:
    """What a backend run reports (objective and bound in model units)."""

    status: str  # optimal | time_limit | infeasible | no_solution
    objective: float | None
    bound: float | None
    time_s: float
    backend: str
    interrupted: bool = False  # stopped by a stop request (Ctrl-C), not by the time limit

    @property
    def has_solution(self) -> bool:
        return self.status in ("optimal", "time_limit")


_HIGHS_THREADS: int | None = None


class HighsWarm(pulp.HiGHS):
    """PuLP's highspy interface, plus a MIP start from the variables' initial values, a stop
    on :func:`partitioner.progress.stop_requested` (MIP interrupt callback) and progress
    reports of improving solutions (``unit_s`` seconds per model unit)."""

    def __init__(self, warm: bool = False, unit_s: float | None = None, phase: str | None = None, **kw):
        super().__init__(**kw)
        self.warm = warm
        self.unit_s = unit_s
        self.phase = phase

    def callSolver(self, lp):  # noqa: N802 (PuLP's name)
        global _HIGHS_THREADS
        h = lp.solverModel
        if self.threads != _HIGHS_THREADS:
            # HiGHS fixes its thread pool at first use; a different thread count needs a reset
            if _HIGHS_THREADS is not None:
                h.resetGlobalScheduler(True)
            _HIGHS_THREADS = self.threads
        if self.warm:
            vs = [v for v in lp.variables() if v.varValue is not None]
            idx = np.array([v.index for v in vs], dtype=np.int32)
            val = np.array([float(v.varValue) for v in vs], dtype=np.float64)
            if len(vs):
                h.setSolution(len(vs), idx, val)
        subs = []
        if hasattr(h, "cbMipInterrupt"):  # highspy >= 1.8 (Python callbacks)
            def interrupt(e):
                if progress.stop_requested():
                    e.interrupt()

            subs.append((h.cbMipInterrupt, interrupt))
            if self.unit_s is not None and progress.active():
                report, unit, phase = progress.reporter(), self.unit_s, self.phase

                def improving(e):
                    out = e.data_out
                    b = out.mip_dual_bound
                    report(out.objective_function_value * unit, b * unit if math.isfinite(b) else None,
                           phase=phase or "HiGHS")

                subs.append((h.cbMipImprovingSolution, improving))
            for event, fn in subs:
                event.subscribe(fn)
        try:
            h.run()
        finally:
            for event, fn in subs:
                event.unsubscribe(fn)


def _child_pids(name: str) -> list[int]:
    """This process's child processes called ``name`` (Linux /proc; else none)."""
    me, out = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm, _, rest = stat.partition("(")[2].rpartition(")")
        fields = rest.split()
        if len(fields) > 1 and int(fields[1]) == me and comm.startswith(name):
            out.append(int(e))
    return out


def _interrupt_cbc() -> None:
    """Stop hook: CBC stops on SIGINT with its incumbent (``Result - User ctrl-c``). A
    terminal's Ctrl-C reaches it anyway (same process group); this covers a SIGINT sent to
    the Python process alone, or :func:`partitioner.progress.request_stop`."""
    for pid in _child_pids("cbc"):
        try:
            os.kill(pid, signal.SIGINT)
        except OSError:
            pass


_CBC_RESULT = re.compile(r"Result - (.*)")
_CBC_OBJ = re.compile(r"Objective value:\s*([-+0-9.eE]+)")
_CBC_LB = re.compile(r"Lower bound:\s*([-+0-9.eE]+)")


def run_backend(lp: pulp.LpProblem, backend: str, *, time_limit: float | None, threads: int, seed: int,
                warm: bool, unit_s: float | None = None, phase: str | None = None) -> Outcome:
    """Solve ``lp`` with ``backend`` ("highs" | "cbc"); report status, objective and bound.

    ``unit_s`` (seconds per model unit) turns on progress reports of HiGHS's improving
    solutions, labelled ``phase``. A stop request (Ctrl-C) stops either backend with its
    incumbent: status "time_limit" (or "no_solution") with ``interrupted`` set.
    """
    t0 = time.perf_counter()
    tl = None if time_limit is None else max(0.05, float(time_limit))
    if progress.stop_requested():
        return Outcome("no_solution", None, None, 0.0, backend, interrupted=True)
    if backend == "highs":
        import highspy

        solver = HighsWarm(warm=warm, unit_s=unit_s, phase=phase, msg=False, gapRel=MIP_GAP,
                           threads=max(1, int(threads)), timeLimit=tl, random_seed=int(seed) % 2147483647)
        S = highspy.HighsModelStatus
        lp.solve(solver)
        h = lp.solverModel
        ms = h.getModelStatus()
        if ms == S.kNotset:  # the thread pool was set up elsewhere with another size: reset, retry
            global _HIGHS_THREADS
            h.resetGlobalScheduler(True)
            _HIGHS_THREADS = None
            lp.solve(solver)
            h = lp.solverModel
            ms = h.getModelStatus()
        info = h.getInfo()
        has = lp.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        bound = float(info.mip_dual_bound) if math.isfinite(info.mip_dual_bound) else None
        obj = float(pulp.value(lp.objective)) if has else None
        if ms == S.kOptimal:
            status = "optimal"
        elif ms in (S.kInfeasible, S.kUnboundedOrInfeasible):
            status = "infeasible"
        elif ms in tuple(getattr(S, k) for k in ("kTimeLimit", "kInterrupt", "kIterationLimit", "kSolutionLimit")
                         if hasattr(S, k)):
            status = "time_limit" if has else "no_solution"
        else:
            raise SolverError(f"HiGHS stopped with model status {h.modelStatusToString(ms)!r}",
                              hint="try milp_backend='cbc'")
        stopped = ms == getattr(S, "kInterrupt", None) or (status != "optimal" and progress.stop_requested())
        return Outcome(status, obj, bound, time.perf_counter() - t0, "highs", interrupted=stopped)
    if backend == "cbc":
        with tempfile.TemporaryDirectory() as td:
            logp = os.path.join(td, "cbc.log")
            with warnings.catch_warnings():  # PULP_CBC_CMD (the bundled CBC) warns of PuLP 4.0
                warnings.simplefilter("ignore", DeprecationWarning)
                solver = pulp.PULP_CBC_CMD(msg=False, logPath=logp, gapRel=MIP_GAP, threads=max(1, int(threads)),
                                           timeLimit=tl, warmStart=warm,
                                           options=[f"randomCbcSeed {int(seed) % 2**31}"])
                with progress.on_stop(_interrupt_cbc):
                    lp.solve(solver)
            with open(logp) as f:
                text = f.read()
        m = _CBC_RESULT.search(text)
        result = m.group(1).strip() if m else ""
        mo, ml = _CBC_OBJ.search(text), _CBC_LB.search(text)
        has = lp.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible) and mo is not None
        obj = float(pulp.value(lp.objective)) if has else None
        if result.startswith("Optimal"):
            return Outcome("optimal", obj, obj, time.perf_counter() - t0, "cbc")
        if "infeasible" in result.lower() or lp.status == pulp.LpStatusInfeasible:
            return Outcome("infeasible", None, None, time.perf_counter() - t0, "cbc")
        stopped = result.lower().startswith("user ctrl-c")
        if result.startswith("Stopped") or stopped:
            # the log prints the bound with 3 decimals: shave so it stays a bound
            bound = float(ml.group(1)) - 1e-3 if ml else None
            return Outcome("time_limit" if has else "no_solution", obj, bound, time.perf_counter() - t0, "cbc",
                           interrupted=stopped or progress.stop_requested())
        raise SolverError(f"CBC ended unexpectedly ({result or 'no result line'})", hint="try milp_backend='highs'")
    raise UsageError(f"unknown MILP backend {backend!r}", hint="use 'highs' or 'cbc'")
