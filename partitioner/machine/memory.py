"""The memory rule of the machine model: what a device holds while it runs its nodes in order.

A device holds the parameters of its nodes for the whole run, and each activation from the
step that creates or first needs it to the step that last needs it (step granularity, what
a sequential per-device executor allocates): a node's output until its last local
consumer; a tensor received from another device (once per producer and destination, at the
largest edge) and a model input from the first to the last step of their consumers there.
:func:`activation_peak` is the exact rule for one device (the evaluator applies it to every
device); :func:`peak_of_intervals` is its step accounting, for callers with intervals of
their own; :func:`memory_upper_bound` is the conservative proxy (every activation live at
once) that linear memory models use, never below the exact peak.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate

import numpy as np

from .problem import Problem


def peak_of_intervals(steps: int, intervals: Iterable[tuple[int, int, float]]) -> float:
    """The largest total of ``bytes`` held at one step, for tensors held over the steps
    ``first..last`` (inclusive) of ``(first, last, bytes)``, on ``steps`` steps (0 when none)."""
    if not steps:
        return 0.0
    diffs = [0.0] * (steps + 1)
    for a, c, b in intervals:
        diffs[a] += b
        diffs[c + 1] -= b
    return _peak(diffs)


def _peak(diffs: list[float]) -> float:
    """The largest prefix sum of ``diffs[:-1]``, added left to right (drops ``diffs``' last entry)."""
    del diffs[-1]
    return float(max(accumulate(diffs)))


def activation_peak(problem: Problem, d: int, seq: Sequence[int], placement: Sequence[int],
                    received: Callable[[int, int], float], output_bytes: Sequence[float] | None = None) -> float:
    """Peak live activation bytes of device ``d`` running ``seq`` in order (parameters excluded).

    Parameters
    ----------
    problem : Problem
    d : int
        The device.
    seq : sequence of int
        The nodes placed on ``d``, in the order it runs them.
    placement : sequence of int
        Device of every node (only the nodes that feed ``seq`` or read from it are looked at).
    received : callable
        ``received(u, d)``: bytes of producer ``u``'s tensor sent to ``d`` (the largest edge
        from ``u`` to a consumer on ``d``).
    output_bytes : sequence of float, optional
        ``problem.output_bytes`` as a list, for callers that keep one (faster scalar access).

    Returns
    -------
    float
        The rule of the module docstring.
    """
    m = len(seq)
    if not m:
        return 0.0
    out_b = problem.output_bytes.tolist() if output_bytes is None else output_bytes
    succs, preds = problem.succs, problem.preds
    pos = {v: i for i, v in enumerate(seq)}
    diffs = [0.0] * (m + 1)
    remote: dict[int, list[int]] = {}  # producer on another device -> [first, last] step of its consumers here
    for i, u in enumerate(seq):
        last = i
        for j in succs[u]:
            if placement[j] == d:
                k = pos[j]
                if k > last:
                    last = k
        diffs[i] += out_b[u]
        diffs[last + 1] -= out_b[u]
        for w in preds[u]:
            if placement[w] != d:
                r = remote.get(w)
                if r is None:
                    remote[w] = [i, i]
                else:
                    r[1] = i
    for w, (a, c) in remote.items():
        b = received(w, d)
        diffs[a] += b
        diffs[c + 1] -= b
    for b, dsts in problem.in_tensors:
        at = [pos[j] for j in dsts if placement[j] == d]
        if at:
            diffs[min(at)] += b
            diffs[max(at) + 1] -= b
    return _peak(diffs)


def activation_peaks(problem: Problem, placement: Sequence[int], order: Sequence[Sequence[int]],
                     received: Callable[[int, int], float]) -> np.ndarray:
    """:func:`activation_peak` of every device, ``order[d]`` being device ``d``'s sequence."""
    out_b = problem.output_bytes.tolist()
    return np.array([activation_peak(problem, d, order[d], placement, received, out_b) for d in range(problem.D)],
                    dtype=float).reshape(problem.D)


def memory_upper_bound(problem: Problem, placement, nodes: Iterable[int] | None = None) -> np.ndarray:
    """Per device: parameters + every activation live at once (the conservative proxy).

    The outputs of its nodes, the tensors it receives (once per producer, at the largest edge
    to it) and the model inputs its nodes read, all counted together: never below the exact
    peak (parameters + :func:`activation_peak`) in any order. With ``nodes``, only those nodes
    and the tensors between them (plus the model inputs they read) count, as for a sub-problem
    whose other nodes are fixed.

    Parameters
    ----------
    problem : Problem
    placement : sequence or mapping of int
        Device of every node counted (indexed by node).
    nodes : iterable of int, optional
        The subset (default: every node).
    """
    nodes = range(problem.n) if nodes is None else list(dict.fromkeys(nodes))
    inset = None if isinstance(nodes, range) else set(nodes)
    use = np.zeros(problem.D)
    pb, ob = problem.param_bytes, problem.output_bytes
    for v in nodes:
        dv = placement[v]
        use[dv] += pb[v] + ob[v]
        xb: dict[int, float] = {}
        for w, b in problem.succ_bytes[v]:
            if inset is not None and w not in inset:
                continue
            dw = placement[w]
            if dw != dv:
                xb[dw] = max(xb.get(dw, 0.0), b)
        for dw, b in xb.items():
            use[dw] += b
    for b, dsts in problem.in_tensors:
        for dd in {placement[j] for j in dsts if inset is None or j in inset}:
            use[dd] += b
    return use
