"""The transfer rule (partitioner.machine.links) in its shapes: a time, a matrix, per-hop times, resource loads."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from instances import mixed_graph, random_plan, random_spec

from partitioner.ir.spec import parse_spec
from partitioner.machine.evaluate import evaluate
from partitioner.machine.problem import Problem

SIZES = (0.0, 1e3, 3.3e5, 1e9)


def _spec(seed: int, D: int, blocks: bool):
    spec = random_spec(seed, D, unsupported=False)
    return parse_spec({**spec.model_dump(), "comm_blocks_device": blocks}) if blocks else spec


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), D=st.integers(2, 5), blocks=st.booleans())
def test_every_shape_of_the_transfer_rule_agrees(seed, D, blocks):
    p = Problem(mixed_graph(seed, 3), _spec(seed, D, blocks))
    links = p.links
    for b in SIZES:
        M = p.comm_matrix(b)
        for a in range(D):
            assert M[a, a] == 0.0 and links.hop_times(a, a, b) == () and p.transfer_loads(a, a, b) == ()
            for c in range(D):
                if a == c:
                    continue
                t = p.comm(a, c, b)
                assert M[a, c] == t  # the vectorised matrix, value for value
                route = links.route(a, c, b)
                assert t == route.time(b) == min(r.time(b) for r in links.routes[(a, c)])
                hops = links.hop_times(a, c, b)
                assert [h for h, _ in hops] == list(route.hops)
                assert [(h, lat + b * inv) for h, lat, inv in links.hop_factors(a, c, b)] == list(hops)
                assert math.isclose(sum(x for _, x in hops), t, rel_tol=1e-12)  # store and forward
                expect = []
                for h, x in hops:
                    expect.append((D + p.hops.index(h), x))
                    if blocks:
                        expect += [(h[0], x), (h[1], x)]
                assert list(p.transfer_loads(a, c, b)) == expect


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 12), D=st.integers(2, 4), blocks=st.booleans())
def test_the_evaluator_loads_are_compute_plus_the_transfer_loads(seed, n, D, blocks):
    p = Problem(mixed_graph(seed, n), _spec(seed, D, blocks), "throughput")
    plan = random_plan(p, seed)
    ev = evaluate(p, plan)
    loads = np.zeros(D + len(p.hops))  # resources: devices, then p.hops
    for v, d in enumerate(plan.placement):
        loads[d] += p.T[v, d]
    for tr in ev.transfers:
        assert math.isclose(tr.arrival - tr.start, p.comm(tr.src, tr.dst, tr.bytes), rel_tol=1e-9, abs_tol=1e-15)
        for r, x in p.transfer_loads(tr.src, tr.dst, tr.bytes):
            loads[r] += x
    assert np.allclose(ev.device_load, loads[:D], rtol=1e-12, atol=0)
    for k, h in enumerate(p.hops):
        assert math.isclose(ev.link_load.get(h, 0.0), loads[D + k], rel_tol=1e-12)
    assert math.isclose(ev.period, loads.max(), rel_tol=1e-12)
