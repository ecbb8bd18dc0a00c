"""The split heuristic: modules, the incremental engine, plan validity, quality, determinism."""

from __future__ import annotations

import math
import random

import networkx as nx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from instances import random_graph, random_spec, two_gpu_spec
from partitioner.zoo.synthetic import dnn_cost_graph

import partitioner.solvers.split.solver as split
from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.plan import Constraints
from partitioner.ir.settings import Settings
from partitioner.machine.evaluate import evaluate
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import SOLVERS
from partitioner.solvers.split.engine import (
    State,
    Tables,
    _between,
    positions_from_schedule,
)
from partitioner.solvers.split.modules import find_modules

FAST = {"effort": 0.3}


def dnn_graph(n: int, seed: int = 0) -> CostGraph:
    """A DNN-like DAG: mostly a chain with skip connections inside a short window."""
    return dnn_cost_graph(n, seed, ops=("conv2d", "matmul", "relu", "add", "layernorm"))


def value(problem: Problem, plan) -> float:
    ev = evaluate(problem, plan)
    assert ev.feasible, ev.violations
    return ev.value(problem.objective)


def run_split(problem: Problem, **extra):
    plan = split.solve(problem, Settings(seed=extra.pop("seed", 0), extra=dict(FAST, **extra)))
    ev = evaluate(problem, plan)
    return plan, ev


# ---- modules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modules_partition_the_nodes_acyclically_within_the_size_cap(seed):
    p = Problem(random_graph(seed, 60, 0.1), random_spec(seed, 3))
    mods = find_modules(p, max_size=7, seed=seed)
    flat = sorted(v for m in mods for v in m)
    assert flat == list(range(p.n))
    assert max(len(m) for m in mods) <= 7
    label = {v: k for k, m in enumerate(mods) for v in m}
    for u, v in zip(p.edge_src.tolist(), p.edge_dst.tolist()):
        assert label[u] <= label[v], "modules are listed in topological order of the quotient graph"
    Q = nx.DiGraph((label[u], label[v]) for u, v in zip(p.edge_src.tolist(), p.edge_dst.tolist())
                   if label[u] != label[v])
    assert nx.is_directed_acyclic_graph(Q)


# ---- the incremental engine agrees with the evaluator --------------------------------------------
@pytest.mark.parametrize("seed,objective,blocks", [(0, "latency", False), (1, "throughput", True),
                                                   (2, "latency", True), (3, "throughput", False)])
def test_incremental_state_matches_the_evaluator(seed, objective, blocks):
    g = random_graph(seed, 22, 0.25)
    spec = random_spec(seed, 3) if not blocks else two_gpu_spec(comm_blocks=True, gpu_link=seed % 2 == 0)
    p = Problem(g, spec, objective)
    plan = SOLVERS["heft"].fn(p, Settings())
    ev = evaluate(p, plan)
    stt = State(Tables(p), plan.placement, positions_from_schedule(ev.start, ev.finish))
    rng = random.Random(seed)
    for it in range(120):
        v = rng.randrange(p.n)
        b = rng.choice(stt.t.allowed[v])
        if rng.random() < 0.6:
            q = stt.insertion_pos(v, b)
            if q is None:
                stt.renumber()
                continue
            moves = [(v, b, q)]
        else:
            q = _between(*stt.window(v))
            if q is None:
                continue
            moves = [(v, b, q)]
        before = (stt.latency(), stt.period())
        stt.apply(moves)
        if rng.random() < 0.4:
            stt.undo()
            assert (stt.latency(), stt.period()) == before
        else:
            stt.commit()
        if it % 10 == 0:
            e = evaluate(p, stt.plan())
            assert math.isclose(e.latency, stt.latency(), rel_tol=1e-9)
            assert math.isclose(e.period, stt.period(), rel_tol=1e-9)
            for d in range(p.D):
                assert math.isclose(stt.device_peak(d), e.memory_peak[d], rel_tol=1e-9)
                assert stt.params[d] + stt.act[d] >= e.memory_peak[d] * (1 - 1e-9)


# ---- validity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("seed", [0, 1])
def test_split_returns_valid_heuristic_plans(seed, objective):
    p = Problem(random_graph(seed, 40, 0.12), random_spec(seed, 4), objective)
    plan, ev = run_split(p)
    assert ev.feasible, ev.violations
    assert plan.status == "heuristic" and plan.solver == "split"
    assert math.isclose(plan.claimed, ev.value(objective), rel_tol=1e-9)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_split_respects_memory_limits(objective):
    g = random_graph(5, 30, 0.15)
    total = sum(n.param_bytes for n in g.nodes)
    # each device holds about 45% of the parameters: at least three devices are needed
    spec = random_spec(5, 4, unsupported=False, capacity=0.45 * total / 0.9 + 30e6)
    p = Problem(g, spec, objective)
    plan, ev = run_split(p)
    assert ev.feasible, ev.violations
    assert (ev.memory_peak <= p.capacity * (1 + 1e-9)).all()
    assert len(set(plan.placement if not plan.replicas else plan.replicas[0].placement)) >= 3


def test_split_honours_a_throughput_floor():
    p = Problem(random_graph(7, 30, 0.15), random_spec(7, 3), "latency")
    unconstrained = value(p, split.solve(p, Settings(extra=FAST)))
    per = evaluate(p, SOLVERS["greedy"].fn(p.with_objective("throughput"), Settings())).period
    q = p.with_objective("latency", Constraints(throughput_floor=1.0 / per))
    plan, ev = run_split(q)
    assert ev.feasible, ev.violations
    assert ev.latency >= unconstrained * (1 - 1e-9) or ev.period <= per * (1 + 1e-9)


def test_throughput_uses_replicas_when_they_pay():
    # a chain of heavy nodes with big tensors on two identical GPUs: two replicas double
    # the throughput, a pipeline pays a large transfer through the host at every cut
    # (each GPU runs the whole chain in 64 ms; a cut moves 600 MB through the host, 60 ms a hop)
    nodes = [Node(id=f"n{i}", op="matmul", flops=4e10, output_bytes=600_000_000) for i in range(8)]
    edges = [(f"n{i}", f"n{i + 1}", 600_000_000) for i in range(7)]
    g = CostGraph("chain", nodes, edges, [InputTensor("x", 1000, ("n0",))], [("n7", 1000)])
    p = Problem(g, two_gpu_spec(capacity=1e11), "throughput")
    plan, ev = run_split(p)
    assert ev.feasible
    assert plan.replicas is not None and len(plan.replicas) >= 2
    single = evaluate(p, SOLVERS["single"].fn(p, Settings())).period
    pipe = evaluate(p, SOLVERS["pipeline-dp"].fn(p, Settings())).period
    assert ev.period <= single / 2 * (1 + 1e-9) < pipe


# ---- quality --------------------------------------------------------------------------------------
@hsettings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(6, 45), devices=st.integers(2, 4),
       objective=st.sampled_from(["latency", "throughput"]))
def test_split_never_worse_than_the_list_schedulers(seed, n, devices, objective):
    p = Problem(random_graph(seed, n, 0.2), random_spec(seed, devices), objective)
    plan, ev = run_split(p)
    assert ev.feasible
    base = []
    for name in ("heft", "peft", "greedy"):
        e = evaluate(p, SOLVERS[name].fn(p, Settings()))
        if e.feasible:
            base.append(e.value(objective))
    assert ev.value(objective) <= min(base) * (1 + 1e-9)


def test_split_beats_the_list_schedulers_on_average():
    ratios = []
    for seed in range(4):
        p = Problem(random_graph(seed, 40, 0.15), random_spec(seed, 3))
        plan, ev = run_split(p)
        best = min(value(p, SOLVERS[s].fn(p, Settings())) for s in ("heft", "peft", "greedy"))
        ratios.append(ev.latency / best)
    assert math.exp(np.mean(np.log(ratios))) < 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_is_close_to_the_milp_optimum_on_tiny_graphs(seed):
    p = Problem(random_graph(seed, 9, 0.3), random_spec(seed, 3))
    opt = SOLVERS["milp"].fn(p, Settings(time_limit=30))
    assert opt.status == "optimal"
    plan, ev = run_split(p)
    assert ev.latency <= opt.claimed * 1.02


@pytest.mark.parametrize("seed", [3, 4])
def test_small_graphs_end_with_an_exact_solve_whose_bound_grades_the_plan(seed):
    """On a graph within ``exact_nodes`` the whole-problem CP-SAT finish reaches the proven
    optimum (and proves it: the returned solver_bound meets the value), and switching it
    off never gives a better plan."""
    from partitioner import api

    p = Problem(random_graph(seed, 14, 0.3), random_spec(seed, 3))
    opt = SOLVERS["cpsat"].fn(p, Settings(time_limit=30))
    assert opt.status == "optimal"
    plan, ev = run_split(p)
    assert plan.status == "heuristic" and plan.info["exact"]["solver"] == "cpsat"
    assert ev.latency <= opt.claimed * (1 + 1e-6)
    assert plan.solver_bound is not None and plan.solver_bound <= ev.latency * (1 + 1e-9)
    res = api.grade(p, plan)
    assert res.gap <= 1e-6
    off, ev_off = run_split(p, exact_nodes=0)
    assert "exact" not in off.info and ev_off.latency >= ev.latency * (1 - 1e-9)


# ---- determinism, settings, scale ---------------------------------------------------------------
@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_same_seed_same_plan(objective):
    p = Problem(random_graph(11, 60, 0.08), random_spec(11, 3), objective)
    a, _ = run_split(p, seed=3)
    b, _ = run_split(p, seed=3)
    assert a.placement == b.placement and a.order == b.order
    assert (a.replicas is None) == (b.replicas is None)


def test_module_solver_setting_milp_gives_a_valid_plan():
    p = Problem(random_graph(4, 40, 0.1), random_spec(4, 3))
    plan, ev = run_split(p, module_solver="milp", windows=2, module_pass_nodes=50)
    assert ev.feasible
    assert plan.info["modules"] >= 2


def test_a_2000_node_graph_finishes_with_a_valid_plan():
    p = Problem(dnn_graph(2000, 1), two_gpu_spec(gpu_link=True))
    plan, ev = run_split(p)
    assert ev.feasible
    heft = value(p, SOLVERS["heft"].fn(p, Settings()))
    assert ev.latency <= heft * (1 + 1e-9)


def test_split_reports_progress_incumbents():
    """With a listener, split publishes its phases and improving incumbents (no worse than the
    returned plan's value at the end)."""
    from partitioner import progress

    p = Problem(dnn_graph(120, 3), two_gpu_spec(gpu_link=True))
    events = []
    with progress.listen(lambda kind, **data: events.append((kind, data))):
        plan = split.solve(p, Settings(seed=0, time_limit=20, extra=FAST))
    steps = [d["description"] for k, d in events if k == "step"]
    incs = [d["value"] for k, d in events if k == "incumbent"]
    assert any(s.startswith("split:") for s in steps)
    assert incs and incs[-1] >= value(p, plan) * (1 - 1e-9)
