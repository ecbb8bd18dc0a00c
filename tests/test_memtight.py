"""Memory-tight problems (issue 19): the baselines a practitioner tries first, memory-aware
list scheduling, the memory-aware bound, and split never worse than any of them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from instances import chain_graph, tight_spec
from test_bounds import brute_latency, brute_period
from models.synthetic import training_graph
from partitioner.api import grade
from partitioner.bounds import lower_bound
from partitioner.bounds_memory import resident_bytes
from partitioner.errors import InfeasibleError
from partitioner.evaluate import evaluate
from partitioner.problem import Problem, Settings
from partitioner.solvers import solve
from partitioner.solvers.contiguous import unit_order

BASELINES = ("first-fit", "balanced", "pipeline-dp", "heft", "peft", "greedy")


def tight_problem(seed: int, n: int, k: int, factor: float, objective: str, train: bool = False,
                  blocks: bool = False, mixed: bool = False) -> Problem:
    g = chain_graph(seed, n)
    if train:
        g = training_graph(g)
    one = Problem(g, tight_spec(1e12, 1, 1.0))
    spec = tight_spec(float(resident_bytes(one).sum()), k, factor, blocks=blocks, mixed=mixed, ring=seed % 2 == 1)
    return Problem(g, spec, objective)


def contiguous_stages(p: Problem, placement) -> bool:
    """Every accelerator's units form one contiguous run of the unit order."""
    units = unit_order(p)
    devs = [placement[u[0]] for u in units]
    seen, last = set(), None
    for d in devs:
        if d == p.host:
            continue
        if d != last and d in seen:
            return False
        seen.add(d)
        last = d
    return True


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", ["first-fit", "balanced"])
def test_contiguous_baselines_fit_memory_in_contiguous_stages(name, train):
    p = tight_problem(3, 40, 4, 1.3, "latency", train=train)
    plan = solve(p, name, Settings())
    ev = evaluate(p, plan)
    assert ev.feasible, ev.violations
    assert len({d for d in plan.placement if d != p.host}) >= 2  # no accelerator holds the model
    assert contiguous_stages(p, plan.placement)
    assert plan.claimed == pytest.approx(ev.latency)


def test_first_fit_fills_the_first_accelerator_before_the_next():
    p = tight_problem(5, 60, 4, 1.2, "throughput")
    plan = solve(p, "first-fit", Settings())
    ev = evaluate(p, plan)
    assert ev.feasible
    first = [plan.placement[v] for v in range(p.n)]
    assert first[0] == 1  # acc0 (device 1) opens first
    # the first accelerator is nearly full: the next unit would not have fitted
    nxt = next(v for v in range(p.n) if plan.placement[v] != 1)
    assert ev.memory_peak[1] + p.param_bytes[nxt] > p.capacity[1] * 0.9


@hsettings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), n=st.integers(12, 40), k=st.sampled_from([2, 4, 6]),
       factor=st.sampled_from([1.15, 1.3, 1.5]), objective=st.sampled_from(["latency", "throughput"]),
       train=st.booleans(), blocks=st.booleans())
def test_no_baseline_infeasible_where_a_contiguous_split_fits(seed, n, k, factor, objective, train, blocks):
    p = tight_problem(seed, n, k, factor, objective, train=train, blocks=blocks)
    ff = evaluate(p, solve(p, "first-fit", Settings()))
    if not ff.feasible:
        return  # no contiguous split found: nothing to require
    for name in BASELINES:
        ev = evaluate(p, solve(p, name, Settings()))
        assert ev.feasible, (name, ev.violations)


def test_list_schedulers_respect_groups_and_memory_on_training_graphs():
    p = tight_problem(11, 30, 4, 1.25, "latency", train=True)
    for name in ("heft", "peft", "greedy"):
        plan = solve(p, name, Settings())
        ev = evaluate(p, plan)
        assert ev.feasible, (name, ev.violations)
        for g in p.groups:
            assert len({plan.placement[v] for v in g}) == 1


# ---- the memory-aware bound --------------------------------------------------------------------
def two_device_problem(seed: int, n_fwd: int, train: bool, objective: str, factor: float) -> Problem:
    """A chain (or its training graph) on a host and one accelerator, each holding ``factor`` of
    the one-device footprint: below 1 the plan must split the model."""
    from partitioner.hardware import parse_spec
    from partitioner.problem import Plan

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
    from partitioner.graph import CostGraph, InputTensor, Node

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
    plan = solve(p, "split", Settings())
    assert plan.placement[p.graph.index["head"]] == p.host
    assert evaluate(p, plan).feasible


def test_multilevel_start_is_graded_like_every_start():
    p = tight_problem(7, 120, 4, 1.4, "throughput")
    plan = solve(p, "split", Settings(extra={"multilevel": True, "ml_nodes": 20}))
    assert "multilevel" in plan.info["start"]
    assert evaluate(p, plan).feasible
    base = min(v for k, v in plan.info["start"].items() if k != "multilevel")
    assert plan.claimed <= base * (1 + 1e-9)  # never worse than a baseline
