"""split's incremental State (its fast copy of the machine model) agrees with the evaluator on random plans and moves."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from instances import mixed_graph, random_spec, two_gpu_spec

from partitioner.machine.evaluate import evaluate
from partitioner.machine.memory import memory_upper_bound
from partitioner.machine.problem import Problem
from partitioner.solvers.split.engine import State, Tables, _between


def _random_state(p: Problem, rng: random.Random) -> State:
    """A random placement on allowed devices and priority positions from a random topological order."""
    tab = Tables(p)
    indeg = [len(x) for x in p.preds]
    ready = [v for v in range(p.n) if not indeg[v]]
    pos = [0.0] * p.n
    k = 0
    while ready:
        v = ready.pop(rng.randrange(len(ready)))
        pos[v], k = float(k), k + 1
        for w in p.succs[v]:
            indeg[w] -= 1
            if not indeg[w]:
                ready.append(w)
    return State(tab, [rng.choice(tab.allowed[v]) for v in range(p.n)], pos)


def _agrees(p: Problem, stt: State) -> None:
    ev = evaluate(p, stt.plan())
    assert math.isclose(stt.latency(), ev.latency, rel_tol=1e-9)
    assert math.isclose(stt.period(), ev.period, rel_tol=1e-9)
    ub = memory_upper_bound(p, stt.pl)
    excess = 0.0
    for d in range(p.D):
        assert math.isclose(stt.device_peak(d), ev.memory_peak[d], rel_tol=1e-9)
        assert math.isclose(stt.params[d] + stt.act[d], ub[d], rel_tol=1e-9, abs_tol=1e-3)  # the same proxy
        assert ub[d] >= ev.memory_peak[d] * (1 - 1e-9)
        if ev.memory_peak[d] > p.capacity[d] * (1 + 1e-9):
            excess += ev.memory_peak[d] / p.capacity[d] - 1.0
    assert math.isclose(stt.mem_excess(), excess, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 18), D=st.integers(2, 4),
       objective=st.sampled_from(["latency", "throughput"]), blocks=st.booleans(), tight=st.booleans())
def test_state_agrees_with_the_evaluator_on_random_plans_and_moves(seed, n, D, objective, blocks, tight):
    rng = random.Random(seed)
    cap = rng.uniform(4e6, 2e7) if tight else 64e9
    spec = two_gpu_spec(comm_blocks=True, gpu_link=seed % 2 == 0, capacity=cap) if blocks else \
        random_spec(seed, D, capacity=cap)
    p = Problem(mixed_graph(seed, n), spec, objective)
    stt = _random_state(p, rng)
    _agrees(p, stt)
    for _ in range(12):
        v = rng.randrange(p.n)
        b = rng.choice(stt.t.allowed[v])
        q = stt.insertion_pos(v, b) if rng.random() < 0.5 else _between(*stt.window(v))
        if q is None:
            stt.renumber()
            continue
        before = (stt.latency(), stt.period(), stt.plan())
        cutoff = stt.latency() * rng.uniform(0.5, 1.5) if rng.random() < 0.3 else None
        done = stt.apply([(v, b, q)], cutoff=cutoff)
        if not done or rng.random() < 0.3:
            stt.undo()
            assert (stt.latency(), stt.period(), stt.plan()) == before
        else:
            stt.commit()
        _agrees(p, stt)
