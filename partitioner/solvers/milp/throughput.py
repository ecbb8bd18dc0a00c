"""Throughput side of the ``milp`` solver: the bottleneck-period MILP and data-parallel replicas.

Single replica (the bottleneck formulation of pipeline partitioning, e.g. Tarnawski et
al., "Efficient algorithms for device placement of DNN graph operators", NeurIPS 2020,
extended with per-link loads and routed transfers):

* ``x[v,d]`` placement as in the latency model; ``min P``.
* ``P >= sum_v T[v,d] x[v,d] (+ hop times with comm_blocks_device)`` per device.
* ``P >=`` each directed link's load: every hop of every transfer's route. A tensor of
  ``u`` moves once per (producer, destination device), sized by the largest edge to that
  device: ``y[u,a,b,l] >= x[u,a] + x[v,b] - 1 - sum_{v': bytes(u,v') > l} x[v',b]`` for
  every consumer ``v`` at byte level ``l`` (exact at the optimum; a spuriously set ``y``
  only over-counts). Model inputs (``i[k,d] >= x[j,d]``) come from the host and outputs
  (``x[s,d]``) go back to it.
* memory as in the latency model (conservative proxy, certified by the relaxed model);
  an optional throughput floor bounds every load; an optional latency ceiling adds the
  latency model's start-time and disjunctive constraints with ``C <= ceiling``.

Data parallelism (docs/architecture.md): the devices may be split into groups, each running a full
replica, throughputs adding up. The solver ENUMERATES device groups: the single-replica
MILP is solved on every non-empty subset ``S`` of the devices (``2^D - 1`` MILPs, cached
by subset; a subset that cannot run the whole model scores 0), then a DP over subsets
picks the set partition (devices may stay idle) maximising the summed throughput
``1 / period``. The same DP over each subset's proven upper bound on throughput gives a
proven bound for the whole problem, so the status is "optimal" only when every subset
that matters was proven. Enumeration is capped by ``settings.get("max_replica_devices",
6)``: with more devices (or ``settings.get("replicate", True)`` false) only the single
replica on all devices is solved, and the bound is the fractional load LP of
:mod:`partitioner.bounds.lower` (valid for replicated plans too).

Ctrl-C (:func:`partitioner.progress.stop_requested`): the running group's MILP stops with
its incumbent; every group not solved yet gets its best heuristic plan (HEFT, greedy,
single: milliseconds) and the load-LP bound, so the DP still returns the best replicas
known, status "interrupted", with a valid bound. While groups are enumerated, progress
reports the period of the best replica set found so far (the groups' own incumbents are
not the whole problem's).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pulp

from ... import progress
from ...bounds.lower import load_lp_bound
from ...errors import InfeasibleError, NoSolutionError, SolverError
from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.evaluate import evaluate
from ...machine.problem import Boundary, Problem
from .latency import (
    CHECK_RTOL,
    OPT_RTOL,
    deadline_of,
    heuristic_candidates,
    memory_modes,
    remaining,
    solve_flow,
)
from .model import CONSERVATIVE, NONE, SIDE_RTOL, TIME_UNITS, MilpModel, horizon

log = logging.getLogger(__name__)


def build_throughput_milp(problem: Problem, *, memory_mode: str | None = "auto", devices=None,
                          tau: float | None = None):
    """Build the single-replica period MILP of the whole problem.

    Parameters
    ----------
    memory_mode : {"auto", "conservative", "relaxed", None}
    devices : iterable of int, optional
        Restrict placement to these devices.
    tau : float, optional
        Seconds per model time unit (default: the serial compute time / 1000).

    Returns
    -------
    (pulp.LpProblem, MilpModel)
    """
    bnd = Boundary.full(problem)
    if tau is None:
        ref = float(np.nan_to_num(np.where(problem.supported, problem.T, 0.0)).max(axis=1).sum())
        tau = ref / TIME_UNITS if ref > 0 else 1.0
    m = MilpModel(problem, bnd, "throughput", tau, devices)
    m.add_period()
    c = problem.constraints
    if c.throughput_floor:
        m.add_load_limit(1.0 / c.throughput_floor, "floor")
    if c.latency_ceiling is not None:
        m.add_timing(min(horizon(problem, bnd), c.latency_ceiling * (1 - SIDE_RTOL)))
    if memory_mode == "auto":
        memory_mode = CONSERVATIVE if c.memory else NONE
    m.add_memory(memory_mode, bnd.capacity)
    m.lp.setObjective(pulp.LpAffineExpression({m.P: 1.0}))
    return m.lp, m


def solve_single_replica(problem: Problem, settings: Settings, deadline: float | None) -> Plan:
    """Minimum-period plan with one replica on the devices ``problem`` supports."""
    cands = heuristic_candidates(problem, settings)
    ref = min([ev.period for _, _, ev in cands if ev.period > 0], default=0.0)
    if ref <= 0:
        ref = float(np.nan_to_num(np.where(problem.supported, problem.T, 0.0)).max(axis=1).sum())
    tau = ref / TIME_UNITS if ref > 0 else 1.0

    def build(mode, ub):
        return build_throughput_milp(problem, memory_mode=mode, tau=tau)[1]

    return solve_flow(problem, settings, deadline, build, cands, None, tau, memory_modes(problem), "throughput")


def restrict(problem: Problem, devices) -> Problem:
    """The same problem with every device outside ``devices`` unable to run anything."""
    T = problem.T.copy()
    off = [d for d in range(problem.D) if d not in set(devices)]
    T[:, off] = np.inf
    return Problem(problem.graph, problem.spec, problem.objective, problem.constraints, T=T)


def _subset_result(problem: Problem, mask: int, settings: Settings, deadline: float | None):
    """(plan or None, throughput achieved, proven upper bound on throughput, status)."""
    devs = [d for d in range(problem.D) if mask >> d & 1]
    sub = restrict(problem, devs)
    if any(not sub.allowed_devices(v).size for v in range(problem.n)):
        return None, 0.0, 0.0, "optimal"
    try:
        plan = solve_single_replica(sub, settings, deadline)
    except InfeasibleError as err:
        return None, 0.0, 0.0, "infeasible: " + err.message
    except SolverError as err:
        log.info("milp throughput: subset %s: %s", devs, err.message)
        plan = None
    if plan is not None and plan.solver_bound is not None and plan.solver_bound > 0:
        ub = 1.0 / plan.solver_bound
    else:
        try:
            lb = load_lp_bound(sub)
        except InfeasibleError:
            return None, 0.0, 0.0, "optimal"
        ub = 1.0 / lb if lb > 0 else math.inf
    if plan is None:
        return None, 0.0, ub, "time_limit"
    rate = 1.0 / plan.claimed if plan.claimed > 0 else math.inf
    return plan, rate, max(ub, rate), plan.status


def _heuristic_result(problem: Problem, mask: int, settings: Settings):
    """A device group left unsolved by Ctrl-C: its best heuristic plan, and the load-LP
    bound on its throughput (status "interrupted")."""
    devs = [d for d in range(problem.D) if mask >> d & 1]
    sub = restrict(problem, devs)
    if any(not sub.allowed_devices(v).size for v in range(problem.n)):
        return None, 0.0, 0.0, "optimal"
    try:
        lb = load_lp_bound(sub)
    except InfeasibleError:
        return None, 0.0, 0.0, "optimal"
    ub = 1.0 / lb if lb > 0 else math.inf
    cands = [(ev.period, name, plan) for name, plan, ev in heuristic_candidates(sub, settings) if ev.period > 0]
    if not cands:
        return None, 0.0, ub, "interrupted"
    period, name, plan = min(cands, key=lambda c: (c[0], c[1]))
    plan = plan.with_(status="interrupted", claimed=period, solver_bound=min(lb, period), info={"source": name})
    return plan, 1.0 / period, max(ub, 1.0 / period), "interrupted"


def _merge(a: tuple, b: tuple) -> tuple:
    """Two results of one device group: the better plan, the smaller upper bound."""
    plan, rate = (a[0], a[1]) if a[1] >= b[1] else (b[0], b[1])
    ub = max(min(a[2], b[2]), rate)
    return plan, rate, ub, "optimal" if rate >= ub * (1 - OPT_RTOL) else "time_limit"


def _prune(problem: Problem, mask: int, rate: dict[int, float]):
    """Skip a device group whose load-LP throughput bound cannot beat splitting it into
    replicas on its (already solved) smaller groups; its upper bound stays valid."""
    if bin(mask).count("1") < 2:
        return None
    devs = [d for d in range(problem.D) if mask >> d & 1]
    sub = restrict(problem, devs)
    if any(not sub.allowed_devices(v).size for v in range(problem.n)):
        return None
    try:
        lb = load_lp_bound(sub)
    except InfeasibleError:
        return None
    if lb <= 0:
        return None
    best, _ = _partition_dp(problem.D, {m: r for m, r in rate.items() if m & mask == m and m != mask})
    if 1.0 / lb <= best[mask]:
        return None, 0.0, 1.0 / lb, "pruned"
    return None


def _partition_dp(D: int, value: dict[int, float]) -> tuple[dict[int, float], dict[int, tuple[int, ...]]]:
    """Best set partition of every device mask into groups (devices may stay idle)."""
    best = {0: 0.0}
    choice: dict[int, tuple[int, ...]] = {0: ()}
    for mask in range(1, 1 << D):
        low = mask & -mask
        rest = mask ^ low
        b, c = best[rest], choice[rest]  # the lowest device idle
        s = rest
        while True:
            g = s | low
            cand = value.get(g, 0.0) + best[mask ^ g]
            if cand > b:
                b, c = cand, (g,) + choice[mask ^ g]
            if s == 0:
                break
            s = (s - 1) & rest
        best[mask], choice[mask] = b, c
    return best, choice


def solve_throughput(problem: Problem, settings: Settings) -> Plan:
    """Maximum-throughput plan, with data-parallel replicas (see the module docstring)."""
    deadline = deadline_of(settings)
    D = problem.D
    cap = int(settings.get("max_replica_devices", 6))
    if not settings.get("replicate", True) or D == 1 or D > cap:
        plan = solve_single_replica(problem, settings, deadline)
        if D == 1:
            return plan
        # the single-replica proof does not cover replicated plans: use a bound that does
        try:
            lb = load_lp_bound(problem)
        except InfeasibleError:
            lb = 0.0
        val = plan.claimed
        status = "optimal" if val <= lb * (1 + OPT_RTOL) else (
            plan.status if plan.status in ("time_limit", "interrupted") else "feasible")
        info = dict(plan.info, replication="not enumerated", single_replica_status=plan.status,
                    single_replica_bound=plan.solver_bound)
        return plan.with_(status=status, solver_bound=min(lb, val), info=info)

    masks = sorted(range(1, 1 << D), key=lambda m: (bin(m).count("1"), m))
    weight = {m: bin(m).count("1") ** 2 for m in masks}
    results: dict[int, tuple] = {}
    for i, mask in enumerate(masks):
        if progress.stop_requested():
            results[mask] = _heuristic_result(problem, mask, settings)
            continue
        sub_deadline = None
        if deadline is not None:
            left = sum(weight[m] for m in masks[i:])
            sub_deadline = time.perf_counter() + remaining(deadline) * weight[mask] / left
        pruned = _prune(problem, mask, {m: r[1] for m, r in results.items()})
        if pruned is not None:
            results[mask] = pruned
        else:
            with progress.muted():  # a group's own incumbents are not the whole problem's
                results[mask] = _subset_result(problem, mask, settings, sub_deadline)
        best_now, _ = _partition_dp(D, {m: r[1] for m, r in results.items()})
        if best_now[(1 << D) - 1] > 0:
            progress.incumbent(1.0 / best_now[(1 << D) - 1], None, phase=f"milp device groups {i + 1}/{len(masks)}")
    # time left over (groups proven early): retry the groups that hit their share
    retry = [m for m in masks if results[m][3] == "time_limit"]
    for i, mask in enumerate(retry):
        left = remaining(deadline)
        if left is None or left < 0.5 or progress.stop_requested():
            break
        with progress.muted():
            again = _subset_result(problem, mask, settings, time.perf_counter() + left / (len(retry) - i))
        results[mask] = _merge(results[mask], again)
    rate = {m: r[1] for m, r in results.items()}
    rate_ub = {m: r[2] for m, r in results.items()}
    full = (1 << D) - 1
    best, choice = _partition_dp(D, rate)
    best_ub, _ = _partition_dp(D, rate_ub)
    groups = choice[full]
    if best_ub[full] <= 0:
        why = results[full][3].partition(": ")[2] or "no device group can run the whole model"
        raise InfeasibleError(why, hint="use a spec with more memory or devices, or relax the constraints")
    if not groups or best[full] <= 0:
        raise NoSolutionError("the throughput MILP found no feasible plan on any device group (infeasibility is not "
                          "proven: the conservative memory model rejects every plan tried)",
                          hint="raise the time limit, or use a spec with more memory")
    plans = [results[g][0] for g in groups]
    if len(plans) == 1:
        plan = plans[0]
    else:
        reps = tuple(p.with_(info={}) for p in plans)
        plan = Plan(reps[0].placement, reps[0].order, replicas=reps)
    ev = evaluate(problem, plan)
    if not ev.feasible:
        raise SolverError(f"the evaluator rejects the throughput MILP's plan: {ev.violations[0]}",
                          hint="this is a bug in partitioner.solvers.milp.throughput; please report it")
    val = ev.period
    if val * best[full] < 1.0 - CHECK_RTOL:
        raise SolverError(f"the evaluator finds period {val!r} s, below the replica DP's {1 / best[full]!r} s",
                          hint="this is a bug in partitioner.solvers.milp.throughput; please report it")
    shared = val * best[full] > 1.0 + CHECK_RTOL
    if shared:
        # the replicas share a link (or, with comm_blocks_device, a device): the DP's sum of
        # throughputs is only an upper bound (still a valid bound); keep the best by the
        # evaluator of this plan and every group's single pipeline
        log.info("milp throughput: replicas %s share a resource (period %.6g s, DP %.6g s)", groups, val,
                 1.0 / best[full])
        for m in sorted(results):
            p1 = results[m][0]
            if p1 is None:
                continue
            e1 = evaluate(problem, p1)
            if e1.feasible and e1.period < val:
                plan, ev, val, groups = p1, e1, e1.period, (m,)
    bound = 1.0 / best_ub[full] if best_ub[full] > 0 and math.isfinite(best_ub[full]) else 0.0
    if bound > val * (1 + CHECK_RTOL):
        raise SolverError(f"the throughput MILP's bound {bound!r} exceeds the value {val!r} of its plan",
                          hint="this is a bug in partitioner.solvers.milp.throughput; please report it")
    if val <= bound * (1 + OPT_RTOL):
        status = "optimal"
    elif any(r[3] == "interrupted" for r in results.values()):
        status = "interrupted"
    elif any(r[3] == "time_limit" for r in results.values()):
        status = "time_limit"
    else:
        status = "feasible"
    info = {"groups": [[problem.devices[d] for d in range(D) if g >> d & 1] for g in groups],
            "subsets": {",".join(problem.devices[d] for d in range(D) if m >> d & 1):
                        {"throughput": r[1], "throughput_ub": r[2], "status": r[3]} for m, r in results.items()},
            "backend": settings.milp_backend, "replicas_share_resources": shared}
    return plan.with_(status=status, claimed=val, solver_bound=min(bound, val), info=info)


__all__ = ["build_throughput_milp", "restrict", "solve_single_replica", "solve_throughput"]
