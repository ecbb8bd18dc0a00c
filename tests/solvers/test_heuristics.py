import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from instances import random_graph, random_spec, two_gpu_spec

from partitioner.bounds.lower import lower_bound
from partitioner.errors import InfeasibleError, UsageError
from partitioner.ir.graph import CostGraph, Node
from partitioner.ir.plan import Plan
from partitioner.ir.settings import Settings
from partitioner.machine.evaluate import evaluate
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import SOLVERS, solve

BASELINES = ("single", "greedy", "heft", "peft", "pipeline-dp", "metis")


def assigned_critical_path(p: Problem, pl) -> float:
    """Longest path with nodes at their assigned devices and actual transfer times."""
    f = np.zeros(p.n)
    for v in range(p.n):
        r = max([p.comm(p.host, pl[v], b) for k in p.node_inputs[v] for b in [p.in_tensors[k][0]]] + [0.0])
        for u, b in p.pred_bytes[v]:
            r = max(r, f[u] + p.comm(pl[u], pl[v], b))
        f[v] = r + p.T[v, pl[v]]
    return float(f.max())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 25), D=st.integers(2, 4),
       objective=st.sampled_from(["latency", "throughput"]))
def test_evaluator_and_baselines_are_consistent(seed, n, D, objective):
    p = Problem(random_graph(seed, n), random_spec(seed, D), objective)
    bound = lower_bound(p).value
    values = {}
    for name in BASELINES:
        try:
            plan = solve(p, name, Settings(seed=seed))
        except InfeasibleError:
            assert name == "single"
            continue
        ev = evaluate(p, plan)
        pl = plan.placement
        assert all(p.supported[i, pl[i]] for i in range(p.n))
        assert ev.feasible, ev.violations
        for i in range(p.n):  # precedence holds in the evaluator's times
            for j in p.succs[i]:
                assert ev.start[j] >= ev.finish[i] - 1e-12
        assert ev.latency >= assigned_critical_path(p, pl) * (1 - 1e-9)
        assert ev.period >= ev.device_load.max() * (1 - 1e-12)
        values[name] = ev.value(objective)
        assert bound <= values[name] * (1 + 1e-9)
    # `single` is no worse than any feasible single-device plan, and refuses only when none is
    for d in range(p.D):
        if p.supported[:, d].all():
            ev = evaluate(p, Plan((d,) * p.n))
            if ev.feasible:
                assert "single" in values, f"single refused although device {d} runs everything"
                assert values["single"] <= ev.value(objective) * (1 + 1e-12)


def test_heft_uses_both_gpus_for_parallel_branches():
    nodes = [Node(id="s", time_s={"cpu": 1e-4, "gpu": 1e-4}, output_bytes=10),
             Node(id="x", time_s={"cpu": 10.0, "gpu": 1.0}, output_bytes=10),
             Node(id="y", time_s={"cpu": 10.0, "gpu": 1.0}, output_bytes=10),
             Node(id="t", time_s={"cpu": 1e-4, "gpu": 1e-4})]
    g = CostGraph("fork", nodes, [("s", "x", 10), ("s", "y", 10), ("x", "t", 10), ("y", "t", 10)])
    p = Problem(g, two_gpu_spec())
    heft = evaluate(p, solve(p, "heft"))
    single = evaluate(p, solve(p, "single"))
    assert {solve(p, "heft").placement[1], solve(p, "heft").placement[2]} == {1, 2}
    assert heft.latency < 0.6 * single.latency
    assert lower_bound(p).value <= heft.latency


def test_determinism():
    p = Problem(random_graph(3, 40), random_spec(3, 4))
    for name in BASELINES:
        assert solve(p, name, Settings(seed=1)).placement == solve(p, name, Settings(seed=1)).placement


def test_no_device_supports_an_op():
    nodes = [Node(id="a", op="weird", supported_on=("accelerator",))]
    p = Problem(CostGraph("w", nodes, []), two_gpu_spec())
    with pytest.raises(InfeasibleError, match="can run on no device"):
        solve(p, "heft")


def test_single_reports_why_nothing_fits():
    nodes = [Node(id="a", param_bytes=int(2e10), time_s={"cpu": 1, "gpu": 1})]
    p = Problem(CostGraph("big", nodes, []), two_gpu_spec(capacity=1e10))
    with pytest.raises(InfeasibleError, match="no single device"):
        solve(p, "single")


def test_unknown_solver_and_zero_time_limit():
    p = Problem(random_graph(1, 5), random_spec(1, 2))
    with pytest.raises(UsageError, match="unknown solver"):
        solve(p, "nope")
    with pytest.raises(UsageError, match="time limit"):
        solve(p, "heft", Settings(time_limit=0))
    assert {"single", "greedy", "heft"} <= set(SOLVERS)


def test_bound_parts_and_throughput_lp():
    p = Problem(random_graph(5, 30), random_spec(5, 3), "throughput")
    b = lower_bound(p)
    assert b.binding in b.parts and b.value == max(b.parts.values())
    assert math.isfinite(b.value) and b.value > 0


def test_ctrl_c_returns_a_marked_fallback_plan():
    from partitioner.grade import grade
    from partitioner.solvers.registry import SOLVERS, register

    @register("_interrupt_me", "test only")
    def _boom(problem, settings):
        raise KeyboardInterrupt

    try:
        p = Problem(random_graph(7, 20), random_spec(7, 3), "latency")
        res = grade(p, solve(p, "_interrupt_me", Settings()))
        assert res.status == "interrupted" and res.evaluation.feasible and res.gap < 1
        assert res.plan.info == {"interrupted": "_interrupt_me", "fallback": "heft",
                                 "interrupted_plan": "the HEFT plan it started from"}
        with pytest.raises(KeyboardInterrupt):
            solve(p, "_interrupt_me", Settings(extra={"interrupt_fallback": False}))
    finally:
        SOLVERS.pop("_interrupt_me")
