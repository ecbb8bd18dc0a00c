"""Bytes every plan must hold on a device at the same time: the memory side of the bounds.

A device holds the parameters of all its nodes throughout. Co-location groups add more: in
a training graph a forward node ``u`` and its backward node ``j`` share a device, and ``u``'s
output stays there until ``j`` runs. Take a *turning point* ``c`` (the loss): every ancestor
``u`` of ``c`` runs before every descendant ``j`` of ``c``, on every device of a feasible plan
(else the device order and the data edges form a cycle). So at the step of a device's last
ancestor of ``c``, the output of every ancestor ``u`` on it whose same-group consumer ``j`` is
a descendant of ``c`` is live (the evaluator keeps an output from its step to its last local
consumer's). Hence, for any feasible plan and device ``d``::

    memory_peak(d) >= sum_{v on d} resident[v],
    resident[v] = param_bytes[v] + [v is such a u] * output_bytes[v]

:func:`resident_bytes` computes ``resident`` for the turning point that separates the most
bytes (candidates: ungrouped nodes with both predecessors and successors, at most
``CANDIDATES`` of them, those with the most ancestors x descendants first); without groups
it is the parameters alone. Bounds use it wherever they used parameters (which nodes fit a
device, the load and coupled LPs' memory rows), and memory-aware heuristics use it as the
part of a device's memory they cannot avoid.

A node also needs room for its own step: while ``v`` runs on ``d``, its output and every
input are live there (a local producer's output until its last local consumer, a received
tensor from its first to its last consumer, model inputs likewise), besides the parameters
of everything on ``d``. :func:`step_bytes` is that activation sum: per producer the smaller
of the edge's bytes and its output bytes (a local output is charged at its output bytes, a
received one at its largest edge to ``d``), plus the model inputs ``v`` reads and its output.
So ``v`` can run on ``d`` only if ``params(group of v) + step_bytes[v] <= capacity[d]``.
"""

from __future__ import annotations

import weakref

import numpy as np

from ..machine.problem import Problem

CANDIDATES = 32

_CACHE: "weakref.WeakKeyDictionary[Problem, np.ndarray]" = weakref.WeakKeyDictionary()


def _reach(problem: Problem) -> tuple[list[int], list[int]]:
    """Ancestor and descendant sets of every node as bitsets (Python ints; a node is in neither)."""
    n = problem.n
    anc = [0] * n
    for v in range(n):
        a = 0
        for u in problem.preds[v]:
            a |= anc[u] | (1 << u)
        anc[v] = a
    desc = [0] * n
    for v in range(n - 1, -1, -1):
        d = 0
        for w in problem.succs[v]:
            d |= desc[w] | (1 << w)
        desc[v] = d
    return anc, desc


def resident_bytes(problem: Problem) -> np.ndarray:
    """``resident[v]`` (bytes): see the module docstring; cached per Problem."""
    hit = _CACHE.get(problem)
    if hit is not None:
        return hit
    res = problem.param_bytes.astype(float).copy()
    pairs = [(u, j) for u in range(problem.n) if problem.group_of[u] >= 0
             for j in problem.succs[u] if problem.group_of[j] == problem.group_of[u]]
    if pairs:
        anc, desc = _reach(problem)
        cands = [c for c in range(problem.n) if problem.group_of[c] < 0 and problem.preds[c] and problem.succs[c]]
        cands.sort(key=lambda c: (-(anc[c].bit_count() * desc[c].bit_count()), c))
        best, best_set = 0.0, ()
        for c in cands[:CANDIDATES]:
            a, d = anc[c], desc[c]
            us = {u for u, j in pairs if (a >> u) & 1 and (d >> j) & 1}
            tot = float(problem.output_bytes[list(us)].sum()) if us else 0.0
            if tot > best:
                best, best_set = tot, us
        if best_set:
            idx = sorted(best_set)
            res[idx] += problem.output_bytes[idx]
    _CACHE[problem] = res
    return res


def group_resident(problem: Problem) -> np.ndarray:
    """``resident`` summed over each node's co-location group (its own value when ungrouped):
    what a device must hold to run the node at all."""
    res = resident_bytes(problem)
    out = res.copy()
    for g in problem.groups:
        out[g] = res[g].sum()
    return out


def step_bytes(problem: Problem) -> np.ndarray:
    """Activation bytes live on a node's device while it runs (module docstring)."""
    ob = problem.output_bytes
    out = ob.astype(float).copy()
    for v in range(problem.n):
        for u, b in problem.pred_bytes[v]:
            out[v] += min(b, ob[u])
        for k in problem.node_inputs[v]:
            out[v] += problem.in_tensors[k][0]
    return out


def group_step_need(problem: Problem) -> np.ndarray:
    """The memory a device must have to run each node: the larger of its group's resident
    bytes and its group's parameters plus :func:`step_bytes` of the node."""
    params = problem.param_bytes.astype(float).copy()
    for g in problem.groups:
        params[g] = problem.param_bytes[g].sum()
    return np.maximum(group_resident(problem), params + step_bytes(problem))
