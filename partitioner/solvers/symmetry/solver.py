"""Symmetry: repeated blocks in the graph, identical devices in the spec, a reduced solve and a
polish on the full problem.

Large language models are a prologue (embedding, positions, mask), ``L`` identical
decoder layers and an epilogue (final norm, head); GPU servers hold several identical
GPUs. :func:`find_blocks` and :func:`device_classes` detect both, and the ``symmetry``
solver places the model as a pipeline of layer ranges over device classes by a small
exact dynamic programme instead of searching the full operator-level problem, expands
the answer to a plan for every node, and then polishes that plan on the full
operator-level problem with a short local search under a deterministic work budget.
Where the structure is not there (no repeated blocks, not a chain, too many device
classes) it falls back to a full solver.

**Blocks** (:func:`find_blocks`). Nodes are keyed by the first indexed component of
their ``module_path`` (``layers.3.attn.q_proj`` -> ``("layers", 3)``); each key's
nodes, in topological order, form a candidate block. Blocks are typed by the
Weisfeiler-Lehman hash (Shervashidze et al., JMLR 2011; ``networkx``) of their induced
subgraph labelled by op, parameter and output bytes, and then compared exactly: per
relative position the op, bytes and the row of ``T`` (so every device prices them
identically), the internal edges, the edges from the previous block, and the edges
from nodes outside the blocks (*shared* tensors such as the mask, identical for every
block). The longest run of consecutive blocks of one type is kept; the other nodes are
the *prologue* (no block ancestor) and the *epilogue* (with the prologue nodes that only the
epilogue reads, such as a tied head's weight). The run must be a chain: a block feeds only
the next block (the last one the epilogue), no epilogue node feeds a block, only the last
block's nodes may be model outputs, and no co-location group crosses a block. Inside a
block, *cheap cuts* (the tensors crossing them weigh at most ``cut_factor`` times those
crossing a block boundary) split it into segments.

**Devices** (:func:`device_classes`). Colour refinement (1-dimensional WL) on the
devices: the initial colour is the column of ``T``, the capacity and whether the device
is the host; a colour is refined by the multiset of (colour, transfer times) to every
other device at the tensor sizes the DP uses. Classes whose members do not all have the
same transfer time to every member of another class are split into single devices, so
that the DP can price a transfer between two classes by one number. Servers (``host``
of the spec) with the same multiset of device models are reported as one server type.
*Main classes*: those whose time for one block is within ``main_ratio`` (default 2) of
the fastest class's; the others (a host CPU next to GPUs) are better used as helpers
for single operators than as pipeline stages or group members.

**Reduced problem.** Units: the prologue, the ``g`` segments of each of the ``L`` blocks,
the epilogue; a stage is a range of units on one device (or, for latency, on a group of
devices, below); stages follow the chain, so the first holds the prologue and the last the
epilogue (a stage may hold only one of them, e.g. the head next to the host). The DP
state is (how many devices of each class are used, anchor class of the last stage,
position); the lattice has ``prod(size_c + 1)`` points. Costs (the evaluator's machine
model, per stage):

* compute: the sum of ``T`` over the stage's units (prefix sums); infinite when the
  stage's parameters (KV cache included) plus one block's activations, the crossing and
  shared tensors (and the prologue's / epilogue's outputs) exceed the usable memory;
* latency: stages add up, each cut adds the largest transfer of its crossing tensors,
  the model inputs reach the first stage and the outputs return from the last;
* period: the largest of each stage's compute and the sum of the transfers it receives
  (crossing tensors, the shared tensors), the input and the output transfers. Link
  sharing between stages is not seen by the DP, so it is a model; the plan it returns is
  graded by the evaluator (``claimed``).

*Group stages* (latency): a pattern for ``p`` consecutive blocks is placed at operator
level by HEFT and by PEFT (``pattern_solvers``) on a group of main-class devices of one
server (a sub-problem with one block type and one server type; see :func:`partitioner.solvers.symmetry.dp._group_kinds`),
and a stage repeats it as often as memory allows, running its other blocks on one device;
this captures the intra-layer parallelism that a pipeline of single devices lacks. The
expanded plan runs every repetition in the order of the pattern's own schedule, so it
reproduces the DP's figure. Groups grow one device at a time only while that shortens the
pattern, and a group whose critical-path bound cannot beat a pattern that already holds
every block (allowing for what its anchor saves at the ends of the pipeline) is not solved.

*Replicas* (throughput): after the DP the best pipeline on every sub-multiset of the
devices is known; a second DP over the lattice splits the devices into data-parallel
replicas (throughputs add up, as in docs/architecture.md).

**Polish** (:func:`partitioner.solvers.symmetry.polish._polish_select`). Stages are contiguous and use distinct devices, so
the DP cannot place single operators where they fit best (a launch-bound elementwise op
costs a host CPU about what it costs a GPU, a prologue's independent chains can run in
parallel on other devices). The candidates (the DP's best pipeline; for throughput also
the best pipeline on the main classes only, and the replica split) are therefore polished
on the full operator-level problem with the incremental engine of ``split``
(:mod:`..split.engine`: delta schedule, loads and memory; figures equal to the
evaluator's): for latency ``split``'s descent on the critical path (moves of nodes, runs
and of the reduced problem's units, reorders); for throughput the relief descent
(:func:`partitioner.solvers.symmetry.polish._relief_descent`: the bottleneck device's nodes to the devices that run them at
the least cost per unit of relief, then ``split``'s throughput descent), each replica on
its own devices. The budget is counted in the engine's work units (``polish_work``;
default 10 per node for latency, 150 per node for throughput, plus 5,000; ``split``'s
search uses 1,000 per node plus 500,000), so the same input and seed give the same plan;
``time_limit`` is only a safety cap. The candidates that start within 25% of the best
start get an even share of half the budget, the best of them after that the rest; the
result is graded by the evaluator and is never worse than the best unpolished candidate. Status ``"heuristic"``; ``info`` reports the
reduction (nodes and devices before and after, DP size, pattern sub-solves, times) and the
polish (candidates with their values before and after, work spent).

Settings extras: ``fallback`` (solver when symmetry does not hold, default ``"heft"``),
``replicate`` (default True), ``groups`` (latency group stages, default True),
``pattern_blocks`` (default (1,)), ``pattern_memory`` (fractions f: also solve patterns
for L/(p f) repetitions, default ()), ``pattern_solvers`` (default ("heft", "peft")),
``max_group`` (default 8), ``main_ratio`` (default 2), ``cut_factor`` (default 8),
``max_positions`` (default 4 per block; 480 for throughput without the polish),
``max_lattice`` (default 20000), ``per_first_class`` (price shared tensors per first
class; default False: the largest), ``polish`` (default True; False returns the best
expanded DP plan, graded by the evaluator, as before), ``polish_work``.
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
    MAIN_RATIO,
    _backtrack,
    _block_peak,
    _build,
    _dp,
    _expand,
    _main_classes,
    _memory_error,
    _replica_split,
)
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
    polish = bool(settings.get("polish", True))
    bl, why = find_blocks(problem, float(settings.get("cut_factor", 8.0)),
                          settings.get("max_positions", 480 if thr and not polish else None))
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
    if lattice > int(settings.get("max_lattice", 20000)):
        info.update(symmetry=False, reason=f"{len(cls.members)} device classes ({lattice} lattice points)")
        return None, info
    R = _build(problem, bl, cls, not thr, settings)
    t1 = time.perf_counter()
    runs = {f: _dp(R, f) for f in (range(R.K) if settings.get("per_first_class", False) else [None])}
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
        main = _main_classes(problem, bl, cls, float(settings.get("main_ratio", MAIN_RATIO)))
        if len(main) < R.K:  # the best pipeline on the fast classes only: the polish fills the others
            on_main = [ui for ui in best_u if not any(vecs[ui][c] for c in range(R.K) if c not in main)]
            if on_main:
                ui = min(on_main, key=lambda u: (best_u[u][0], u))
                if best_u[ui][0] > min(v for _, _, v in cands) * (1 + 1e-12):
                    f_, c_ = best_u[ui][1], best_u[ui][2]
                    cands.append(("dp-main", _expand(problem, bl, cls, R, _backtrack(runs[f_][1], ui, c_, R.end), {}),
                                  best_u[ui][0]))
        if settings.get("replicate", True):
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
                      "(after DiviML, Ghannane and Abdelfattah 2023)")
def solve(problem: Problem, settings: Settings) -> Plan:
    """The ``symmetry`` solver: reduced DP, expansion and polish (see the module docstring).

    Parameters
    ----------
    problem : Problem
    settings : Settings
        ``seed`` and ``time_limit`` (a safety cap; the polish is budgeted in work units) and
        the extras listed in the module docstring.

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
    name = str(settings.get("fallback", "heft"))
    log.info("symmetry does not hold (%s); solving the full problem with %s", info.get("reason"), name)
    full = run_solver(problem, name, settings)
    info.update(fallback=name, fallback_s=round(time.perf_counter() - t0, 4))
    return full.with_(status="heuristic" if full.status in ("optimal", "optimal_coarse") else full.status,
                      info={**dict(full.info), "symmetry_info": info})
