"""The memory rule (partitioner.machine.memory): the exact per-device peak and the conservative proxy."""

from __future__ import annotations

import math
import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from instances import mixed_graph, random_plan, random_spec

from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.plan import Plan
from partitioner.machine.evaluate import evaluate
from partitioner.machine.memory import (
    activation_peak,
    memory_upper_bound,
    peak_of_intervals,
)
from partitioner.machine.problem import Problem


def test_peak_of_intervals_counts_inclusive_steps():
    assert peak_of_intervals(0, []) == 0.0
    assert peak_of_intervals(3, [(0, 0, 5.0), (1, 2, 3.0), (2, 2, 4.0)]) == 7.0  # step 2 holds 3 + 4
    assert peak_of_intervals(3, [(0, 1, 5.0), (1, 2, 3.0)]) == 8.0  # step 1 holds both


def test_activation_peak_by_hand():
    # a -> b -> c on device 0 with a -> c as well; x (device 1) -> c; input "in" read by a and c
    g = CostGraph("h", [Node("a", output_bytes=10), Node("b", output_bytes=20), Node("c", output_bytes=40),
                        Node("x", output_bytes=7)],
                  [("a", "b", 10), ("b", "c", 20), ("a", "c", 10), ("x", "c", 5)],
                  [InputTensor("in", 100, ("a", "c"))], [("c", 40)])
    p = Problem(g, random_spec(0, 2))
    ia, ib, ic, ix = (p.graph.index[k] for k in "abcx")
    pl = [0] * p.n
    pl[ix] = 1
    # steps a, b, c: in (100) over all three; a (10) over all three; b (20) at b, c; x's 5 B at c; c (40) at c
    assert activation_peak(p, 0, [ia, ib, ic], pl, lambda u, d: 5.0) == 100 + 10 + 20 + 5 + 40
    ev = evaluate(p, Plan(tuple(pl), ((ia, ib, ic), (ix,))))
    assert ev.memory_peak[0] == 175 and ev.memory_peak[1] == 7


def _peak_step_by_step(problem: Problem, plan: Plan, d: int) -> float:
    """The rule of partitioner.machine.memory counted the slow way: at every step of device
    ``d``, every tensor that is held then."""
    pl, seq = plan.placement, plan.order[d]
    pos = {v: i for i, v in enumerate(seq)}
    held = []  # (first, last, bytes)
    for u in range(problem.n):
        local = [pos[j] for j in problem.succs[u] if pl[j] == d]
        if pl[u] == d:
            held.append((pos[u], max([pos[u]] + local), problem.output_bytes[u]))
        elif local:
            b = max(b for j, b in problem.succ_bytes[u] if pl[j] == d)
            held.append((min(local), max(local), b))
    for b, dsts in problem.in_tensors:
        at = [pos[j] for j in dsts if pl[j] == d]
        if at:
            held.append((min(at), max(at), b))
    return max((sum(b for a, c, b in held if a <= t <= c) for t in range(len(seq))), default=0.0)


def _case(seed: int, n: int, D: int):
    p = Problem(mixed_graph(seed, n), random_spec(seed, D, unsupported=False))
    plan = random_plan(p, seed)
    return p, plan, evaluate(p, plan)


CASES = dict(seed=st.integers(0, 10**6), n=st.integers(1, 14), D=st.integers(2, 4))


@settings(max_examples=40, deadline=None)
@given(**CASES)
def test_the_evaluator_peak_is_the_rule_counted_step_by_step(seed, n, D):
    p, plan, ev = _case(seed, n, D)
    pl = plan.placement
    for d in range(p.D):
        params = float(sum(p.param_bytes[v] for v in plan.order[d]))
        slow = _peak_step_by_step(p, plan, d)
        assert math.isclose(ev.memory_peak[d], params + slow, rel_tol=1e-12, abs_tol=1e-6)
        received = lambda u, dd: max(b for j, b in p.succ_bytes[u] if pl[j] == dd)  # noqa: E731
        assert math.isclose(activation_peak(p, d, plan.order[d], pl, received), slow, rel_tol=1e-12, abs_tol=1e-6)


@settings(max_examples=40, deadline=None)
@given(**CASES)
def test_the_upper_bound_is_never_below_the_peak(seed, n, D):
    p, plan, ev = _case(seed, n, D)
    ub = memory_upper_bound(p, plan.placement)
    assert np.all(ub >= ev.memory_peak * (1 - 1e-12))
    # everything live at once: params + outputs + received tensors + inputs (once per reader), nothing else
    total = p.param_bytes.sum() + p.output_bytes.sum() + p.edge_bytes.sum()
    assert ub.sum() <= total + sum(b * len(set(dsts)) for b, dsts in p.in_tensors) + 1e-6
    # a subset counts its own nodes and the tensors between them: never more than the whole
    sub = sorted(random.Random(seed).sample(range(p.n), max(1, p.n // 2)))
    part = memory_upper_bound(p, {v: plan.placement[v] for v in sub}, sub)
    assert np.all(part <= ub * (1 + 1e-12))
    assert np.array_equal(memory_upper_bound(p, plan.placement, range(p.n)), ub)
