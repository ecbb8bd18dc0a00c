"""``symmetry``: repeated blocks on identical devices (LLMs), a reduced exact solve and a polish.

:func:`find_blocks` finds the longest chain of identical blocks of the graph (the decoder
layers, typed by Weisfeiler-Lehman hashes, Shervashidze et al., JMLR 2011, and compared
exactly) and :func:`device_classes` the classes of identical devices (colour refinement).
Without such a chain, with too many device classes, or when no contiguous pipeline fits,
the fallback solver (option ``fallback``) solves the full problem.

Reduced problem (:mod:`.dp`, :mod:`.memory`): units are the prologue, the segments of each
of the ``L`` blocks and the epilogue; a stage is a contiguous range of units on one device
(for latency also a group of devices repeating a pattern of blocks placed by HEFT / PEFT).
A DP over (devices used per class, class of the last stage, position) minimises the
latency (stage times plus the transfer at each cut, inputs and outputs) or the period
(the largest stage compute or received transfer); a stage over its device's memory costs
``inf``. For throughput a second DP over the lattice splits the devices into data-parallel
replicas. The DP's costs are a model (no link sharing between stages).

Polish (:mod:`.polish`): the expanded candidates are improved on the full operator-level
problem with ``split``'s incremental engine under a budget of work units, so the same input
and seed give the same plan; the result, graded by the evaluator, is never worse than the
best unpolished candidate. Status ``"heuristic"``.

Each step in detail: docs/solvers.md (symmetry). Options: :class:`.options.SymmetryOptions`
(``partitioner solvers --options symmetry``).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from ...ir.plan import Objective, Plan
from ...ir.settings import Settings
from ...machine.problem import Problem
from ..registry import register
from ..registry import solve as run_solver
from .blocks import Blocks, DeviceClasses, device_classes, find_blocks, servers
from .dp import (
    _backtrack,
    _build,
    _dp,
    _expand,
    _main_classes,
    _replica_split,
)
from .memory import _block_peak, _memory_error
from .options import SymmetryOptions
from .polish import _plain_select, _polish_select

log = logging.getLogger(__name__)

__all__ = ["Blocks", "DeviceClasses", "find_blocks", "device_classes", "servers", "solve", "reduce_and_solve"]


def reduce_and_solve(problem: Problem, settings: Settings) -> tuple[Plan | None, dict]:
    """The reduced solve, its expansion and the polish (see the module docstring).

    Parameters
    ----------
    problem : Problem
    settings : Settings

    Returns
    -------
    plan : Plan or None
        None when symmetry does not hold (no chain of identical blocks, too many device
        classes, no contiguous pipeline that fits).
    info : dict
        The reduction (and the reason when ``plan`` is None).

    Raises
    ------
    InfeasibleError
        When the model's parameters and activations exceed the memory of all devices.
    """
    t0 = time.perf_counter()
    thr = problem.objective is Objective.THROUGHPUT
    opts = settings.options_of(SymmetryOptions)
    polish = opts.polish
    bl, why = find_blocks(problem, opts.cut_factor,
                          opts.max_positions if opts.max_positions is not None else 480 if thr and not polish else None)
    if bl is None:
        return None, {"symmetry": False, "reason": why}
    sizes_b = (*bl.boundary, *bl.shared, *(x for c in bl.cut_cross for x in c),
               *(b for b, _ in problem.in_tensors), *(b for _, b in problem.outputs))
    cls = device_classes(problem, sizes_b or (0.0,))
    t_detect = time.perf_counter() - t0
    lattice = int(np.prod([s + 1 for s in cls.sizes]))
    info = {"symmetry": True, "nodes_full": problem.n, "devices_full": problem.D, "blocks": len(bl.blocks),
            "block_nodes": bl.size, "block_wl_hash": bl.wl_hash, "prologue_nodes": len(bl.prologue),
            "epilogue_nodes": len(bl.epilogue), "nodes_reduced": len(bl.prologue) + bl.size + len(bl.epilogue),
            "segments_per_block": len(bl.cuts) + 1, "dp_positions": len(bl.blocks) * (len(bl.cuts) + 1),
            "device_classes": [[problem.devices[d] for d in m] for m in cls.members],
            "devices_reduced": len(cls.members), "lattice": lattice, **servers(problem), **bl.info}
    if lattice > opts.max_lattice:
        info.update(symmetry=False, reason=f"{len(cls.members)} device classes ({lattice} lattice points)")
        return None, info
    R = _build(problem, bl, cls, not thr, settings)
    t1 = time.perf_counter()
    runs = {f: _dp(R, f) for f in (range(R.K) if opts.per_first_class else [None])}
    t_dp = time.perf_counter() - t1
    info.update(stage_kinds=len(R.kinds), group_kinds=sum(kd.pattern is not None for kd in R.kinds), **R.stats,
                dp_states=int(lattice * R.K * (R.end + 1) * len(runs)), build_s=round(t1 - t0 - t_detect, 4))
    plans = []
    for f, (final, ptr, _) in runs.items():
        ui, c = np.unravel_index(np.argmin(final), final.shape)
        if np.isfinite(final[ui, c]):
            stages = _backtrack(ptr, int(ui), int(c), R.end)
            plans.append((_expand(problem, bl, cls, R, stages, {}), float(final[ui, c])))
    if not plans:
        if problem.constraints.memory and (problem.param_bytes.sum() + _block_peak(problem, bl)
                                           > problem.capacity.sum()):
            raise _memory_error(problem, bl, cls)
        info.update(symmetry=False, reason="no contiguous pipeline of whole segments fits the devices "
                                           "(operator support or memory per device)")
        return None, info
    t2 = time.perf_counter()
    cands = [("dp", plan, value) for plan, value in plans]
    if thr:
        best_u: dict[int, tuple[float, int, int]] = {}
        for f, (final, _, _) in runs.items():
            for ui in range(final.shape[0]):
                c = int(np.argmin(final[ui]))
                if np.isfinite(final[ui, c]) and (ui not in best_u or final[ui, c] < best_u[ui][0]):
                    best_u[ui] = (float(final[ui, c]), f, c)
        vecs = next(iter(runs.values()))[2]
        main = _main_classes(problem, bl, cls, opts.main_ratio)
        if len(main) < R.K:  # the best pipeline on the fast classes only: the polish fills the others
            on_main = [ui for ui in best_u if not any(vecs[ui][c] for c in range(R.K) if c not in main)]
            if on_main:
                ui = min(on_main, key=lambda u: (best_u[u][0], u))
                if best_u[ui][0] > min(v for _, _, v in cands) * (1 + 1e-12):
                    f_, c_ = best_u[ui][1], best_u[ui][2]
                    cands.append(("dp-main", _expand(problem, bl, cls, R, _backtrack(runs[f_][1], ui, c_, R.end), {}),
                                  best_u[ui][0]))
        if opts.replicate:
            rate, parts = _replica_split({u: 1.0 / v[0] for u, v in best_u.items() if v[0] > 0}, vecs)
            if len(parts) > 1:
                used: dict[int, int] = {}
                reps = tuple(_expand(problem, bl, cls, R, _backtrack(runs[best_u[ui][1]][1], ui, best_u[ui][2],
                                                                     R.end), used) for ui in parts)
                cands.append(("replicas", Plan(reps[0].placement, reps[0].order, status="heuristic", replicas=reps),
                              1.0 / rate))
    deadline = t0 + (settings.time_limit if settings.time_limit is not None else math.inf)
    if polish:
        plan, value, dp_value, pinfo = _polish_select(problem, settings, bl, cls, cands, deadline)
    else:
        plan, value, dp_value, pinfo = _plain_select(problem, cands)
    t3 = time.perf_counter()
    reps = plan.replicas or (plan,)
    info.update(dp_value_s=dp_value, replicas=len(reps), pipelines=[_describe(problem, r, bl) for r in reps],
                detect_s=round(t_detect, 4), dp_s=round(t_dp, 4), expand_eval_s=round(t3 - t2, 4),
                reduce_total_s=round(t3 - t0, 4), **pinfo)
    log.info("symmetry: %d nodes -> %d blocks of %d nodes (+%d), %d devices -> %d classes; %s in %.3f s",
             problem.n, len(bl.blocks), bl.size, len(bl.prologue) + len(bl.epilogue), problem.D,
             len(cls.members), info["pipelines"], t3 - t0)
    return plan.with_(claimed=float(value), info=info), info


def _describe(problem: Problem, plan: Plan, bl: Blocks) -> list[list]:
    """``[[devices, blocks], ...]`` in pipeline order (fractions where a block is split)."""
    out: list[list] = []
    for blk in bl.blocks:
        devs = "+".join(sorted({problem.devices[plan.placement[v]] for v in blk},
                               key=problem.devices.index))
        if len(devs.split("+")) == 1:
            for v in blk:
                d = problem.devices[plan.placement[v]]
                if not out or out[-1][0] != d:
                    out.append([d, 0])
                out[-1][1] += 1 / len(blk)
        else:
            if not out or out[-1][0] != devs:
                out.append([devs, 0])
            out[-1][1] += 1
    return [[d, round(x, 3)] for d, x in out]


@register("symmetry", "repeated blocks x identical devices: pipeline DP over device classes and groups, "
                      "data-parallel replicas, polished on the full problem; falls back to a full solver "
                      "(after DiviML, Ghannane and Abdelfattah 2023)", options=SymmetryOptions)
def solve(problem: Problem, settings: Settings) -> Plan:
    """The ``symmetry`` solver: reduced DP, expansion and polish (see the module docstring).

    Parameters
    ----------
    problem : Problem
    settings : Settings
        ``seed`` and ``time_limit`` (a safety cap; the polish is budgeted in work units) and
        the options of :class:`.options.SymmetryOptions`.

    Returns
    -------
    Plan
        Status ``"heuristic"``, ``claimed`` equal to the evaluator's figure; ``info`` reports
        the reduction and the polish, or (``symmetry_info``) why the fallback solver ran.
    """
    t0 = time.perf_counter()
    plan, info = reduce_and_solve(problem, settings)
    if plan is not None:
        return plan
    name = settings.options_of(SymmetryOptions).fallback
    log.info("symmetry does not hold (%s); solving the full problem with %s", info.get("reason"), name)
    full = run_solver(problem, name, settings)
    info.update(fallback=name, fallback_s=round(time.perf_counter() - t0, 4))
    return full.with_(status="heuristic" if full.status in ("optimal", "optimal_coarse") else full.status,
                      info={**dict(full.info), "symmetry_info": info})
