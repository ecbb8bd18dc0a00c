"""The symmetry DP's memory rule: what a stage of units on one device may need, at most.

A stage holds the units ``[j, k)`` (the prologue, block segments, the epilogue; see
:mod:`.dp`) on one device, run in index order. :func:`_stage_need` prices it as its
parameters plus a constant activation term: one block's live activations in the
evaluator's step accounting (:func:`_block_peak`), plus every shared tensor, the tensors
crossing the widest cut, and the model inputs the blocks read; plus the prologue's outputs
and every model input when it holds the prologue, and the epilogue's outputs when it holds
the epilogue. It is conservative: never below the evaluator's peak on the stage's device
(``tests/solvers/test_symmetry_memory_agrees.py`` checks this on random block graphs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...errors import InfeasibleError
from ...machine.memory import peak_of_intervals
from ...machine.problem import Problem

if TYPE_CHECKING:  # annotations only
    from .blocks import Blocks, DeviceClasses


def _block_peak(problem: Problem, bl: Blocks) -> float:
    """Peak live activation bytes of one block in a run of blocks on one device, in the evaluator's
    step accounting (:func:`partitioner.machine.memory.peak_of_intervals`): an output from its node
    to its last consumer (to the block's end when the next block reads it); a tensor of the
    previous block from the block's start to its last consumer, at the larger of its output and
    its edges (held since the previous block when that ran on the same device, received there
    otherwise)."""
    blk = bl.blocks[1]
    pos = {v: r for r, v in enumerate(blk)}
    m = len(blk)
    ob = problem.output_bytes
    held = []
    for v in blk:
        r = pos[v]
        held.append((r, max([pos.get(w, m - 1) for w, _ in problem.succ_bytes[v]] + [r]), ob[v]))
    uses: dict[int, list] = {}
    for rs, rd, by in bl.chain:
        uses.setdefault(rs, []).append((rd, by))
    for rs, lst in uses.items():
        held.append((0, max(rd for rd, _ in lst), max([ob[bl.blocks[0][rs]]] + [by for _, by in lst])))
    return peak_of_intervals(m, held)


def _stage_memory(problem: Problem, bl: Blocks, units: list[list[int]]) -> tuple[np.ndarray, dict[str, float]]:
    """``SM`` (prefix sums of the units' parameters, length ``E + 1``) and the activation terms
    ``act`` (every stage), ``first`` (with the prologue) and ``last`` (with the epilogue)."""
    pb, ob = problem.param_bytes, problem.output_bytes
    SM = np.concatenate([[0.0], np.cumsum([pb[x].sum() for x in units])])
    block = set(bl.blocks[0])
    block_inputs = sum(b for b, dsts in problem.in_tensors if block.intersection(dsts))
    act = (_block_peak(problem, bl) + sum(bl.shared) + max((sum(c) for c in bl.cut_cross), default=0.0)
           + block_inputs)
    return SM, dict(act=act, first=ob[list(bl.prologue)].sum() + sum(b for b, _ in problem.in_tensors),
                    last=ob[list(bl.epilogue)].sum())


def _stage_need(SM: np.ndarray, mem: dict[str, float]) -> np.ndarray:
    """``need[j, k]``: memory of a stage of units ``[j, k)`` on one device (``E = len(SM) - 1``)."""
    E = len(SM) - 1
    k = np.arange(E + 1)
    return SM[None, :] - SM[:, None] + mem["act"] + np.where(k == 0, mem["first"], 0.0)[:, None] \
        + np.where(k == E, mem["last"], 0.0)[None, :]


def _memory_error(problem: Problem, bl: Blocks, cls: DeviceClasses) -> InfeasibleError:
    pb = problem.param_bytes
    need, act, have = pb.sum(), _block_peak(problem, bl), problem.capacity.sum()
    where = ", ".join(f"{problem.devices[m[0]]}{'..' + problem.devices[m[-1]] if len(m) > 1 else ''} "
                      f"{problem.capacity[m[0]] / 1e9:.2f} GB{' each' if len(m) > 1 else ''}" for m in cls.members)
    msg = (f"{problem.graph.name} needs {need / 1e9:.2f} GB of parameters (KV cache included; "
           f"{pb[list(bl.blocks[0])].sum() / 1e9:.3f} GB per block) plus about {act / 1e9:.3f} GB of activations, "
           f"but the devices of {problem.spec.name!r} have {have / 1e9:.2f} GB usable in all ({where}): "
           f"short by {(need + act - have) / 1e9:.2f} GB")
    return InfeasibleError(msg, hint="use a spec with more memory, a lower memory_reserve, fewer kv_cache_tokens "
                                     "or a smaller dtype")
