"""The list schedulers' PartialSchedule (greedy, HEFT, PEFT) keeps times the evaluator reproduces or beats."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from instances import random_graph, random_spec, two_gpu_spec

from partitioner.machine.evaluate import evaluate
from partitioner.machine.problem import Problem
from partitioner.solvers.baselines.listsched import PartialSchedule


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 20), D=st.integers(2, 4), insertion=st.booleans(),
       blocks=st.booleans())
def test_partial_schedule_times_hold_under_the_evaluator(seed, n, D, insertion, blocks):
    """Every producer's edges carry one size (as in traced graphs), so a tensor sent to a device
    is the one every later consumer there needs: the evaluator then starts each node no later than
    the partial schedule did (at the same time without insertion, where both start it as early
    as its device and inputs allow)."""
    rng = random.Random(seed)
    spec = two_gpu_spec(comm_blocks=True, gpu_link=seed % 2 == 0) if blocks else random_spec(seed, D)
    p = Problem(random_graph(seed, n), spec)
    ps = PartialSchedule(p)
    indeg = [len(x) for x in p.preds]
    ready = [v for v in range(p.n) if not indeg[v]]
    while ready:  # a random topological order, each node on a random candidate device
        v = ready.pop(rng.randrange(len(ready)))
        d = int(rng.choice(ps.candidates(v).tolist()))
        ps.place(v, d, ps.earliest_slot(d, ps.data_ready(v, d), p.T[v, d], insertion))
        for w in p.succs[v]:
            indeg[w] -= 1
            if not indeg[w]:
                ready.append(w)
    ev = evaluate(p, ps.plan())
    assert not any("order" in x for x in ev.violations)
    for v in range(p.n):
        assert ev.start[v] <= ps.start[v] * (1 + 1e-12) + 1e-15
        if not insertion:
            assert math.isclose(ev.start[v], ps.start[v], rel_tol=1e-12, abs_tol=1e-15)
    out = max((ps.finish[s] + p.comm(int(ps.pl[s]), p.host, b) for s, b in p.outputs), default=0.0)
    assert ev.latency <= max(out, max(ps.finish, default=0.0)) * (1 + 1e-12)
