"""The memory-aware bound (partitioner.bounds.memory, issue 19): the bytes every plan holds at
once and the room a node's own step needs, below the brute-force optimum on tight instances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from instances import chain_graph, tight_spec
from partitioner.zoo.synthetic import training_graph
from test_bounds import brute_latency, brute_period

from partitioner.bounds.lower import lower_bound
from partitioner.bounds.memory import resident_bytes
from partitioner.errors import InfeasibleError
from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.plan import Plan
from partitioner.ir.spec import parse_spec
from partitioner.machine.evaluate import evaluate
from partitioner.machine.problem import Problem


def two_device_problem(seed: int, n_fwd: int, train: bool, objective: str, factor: float) -> Problem:
    """A chain (or its training graph) on a host and one accelerator, each holding ``factor`` of
    the one-device footprint: below 1 the plan must split the model."""
    g = chain_graph(seed, n_fwd, skip=0.5)
    if train:
        g = training_graph(g)
    one = Problem(g, tight_spec(1e12, 1, 1.0))
    cap = factor * float(evaluate(one, Plan((0,) * one.n)).memory_peak[0])
    dev = lambda i, k, f: {"id": i, "host": "h", "kind": k, "peak_flops": {"fp32": f},  # noqa: E731
                           "memory": {"capacity_bytes": cap, "bandwidth_Bps": 1e12}, "launch_overhead_s": 5e-6}
    spec = parse_spec({"name": "two", "memory_reserve": 0.0, "comm_blocks_device": seed % 2 == 0,
                       "devices": [dev("cpu0", "cpu", 5e11), dev("acc0", "accelerator", 2e13)],
                       "links": [{"a": "cpu0", "b": "acc0", "bandwidth_Bps": 2e10, "latency_s": 5e-6}]})
    return Problem(g, spec, objective)


@hsettings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n_fwd=st.integers(2, 3), train=st.booleans(),
       objective=st.sampled_from(["latency", "throughput"]), factor=st.sampled_from([0.55, 0.7, 0.85, 1.2]))
def test_memory_aware_bound_below_brute_force(seed, n_fwd, train, objective, factor):
    """Parameters, kept activations of forward/backward groups and each node's own step
    all count in the bound: it stays below the optimum over every placement and order."""
    p = two_device_problem(seed, n_fwd, train, objective, factor)
    opt = brute_latency(p) if objective == "latency" else brute_period(p)[0]
    try:
        b = lower_bound(p).value
    except InfeasibleError:
        assert not np.isfinite(opt)
        return
    if np.isfinite(opt):
        assert b <= opt * (1 + 1e-9), (b, opt)


def test_bound_sees_a_node_whose_step_does_not_fit_the_accelerators():
    """A head that reads a weight tensor larger than any accelerator (GPT-2's tied embedding)
    must run on the host: the bound includes its host time."""
    nodes = [Node(id="emb", op="embedding", flops=1e6, param_bytes=40_000_000, output_bytes=200_000),
             Node(id="w", op="get_attr", output_bytes=40_000_000),
             Node(id="body", op="matmul", flops=4e9, param_bytes=8_000_000, output_bytes=200_000),
             Node(id="head", op="linear", flops=8e9, output_bytes=2_000_000)]
    edges = [("emb", "body", 200_000), ("body", "head", 200_000), ("w", "head", 40_000_000)]
    g = CostGraph("tied", nodes, edges, [InputTensor("x", 1000, ("emb",))], [("head", 2_000_000)])
    p = Problem(g, tight_spec(50e6, 4, 1.2), "latency")
    host_time = p.T[p.graph.index["head"], p.host]
    assert resident_bytes(p).sum() == pytest.approx(48e6)
    assert lower_bound(p).value >= host_time
