"""The symmetry DP's memory rule (a stage's need) is never below the evaluator's peak on random block graphs."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.plan import Plan
from partitioner.ir.settings import Settings
from partitioner.ir.spec import parse_spec
from partitioner.machine.evaluate import evaluate
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import solve
from partitioner.solvers.symmetry.blocks import find_blocks
from partitioner.solvers.symmetry.memory import _stage_memory, _stage_need


def block_graph(seed: int, edge_bytes_like_outputs: bool, block_inputs: bool) -> CostGraph:
    """A prologue, ``L`` identical random blocks (internal DAG, random edges from the previous
    block, a shared mask) and a head. Edges carry the producer's output bytes, or random bytes;
    with ``block_inputs`` every block also reads a model input."""
    rng = random.Random(seed)
    L, s = rng.randint(2, 5), rng.randint(2, 5)
    attrs = [dict(op=rng.choice(["matmul", "add", "relu"]), flops=rng.uniform(1e6, 1e8),
                  param_bytes=rng.choice([0, rng.randint(1000, 50000)]), output_bytes=rng.randint(100, 20000))
             for _ in range(s)]

    def eb(r: int) -> int:
        return attrs[r]["output_bytes"] if edge_bytes_like_outputs else rng.randint(100, 20000)

    internal = [(i, j, eb(i)) for i in range(s) for j in range(i + 1, s) if j == i + 1 or rng.random() < 0.3]
    pairs = {(s - 1, rng.randrange(s))} | {(rng.randrange(s), rng.randrange(s)) for _ in range(rng.randint(0, 2))}
    chain = [(rs, rd, eb(rs)) for rs, rd in sorted(pairs)]
    shared = [(rng.randrange(s), rng.randint(100, 5000)) for _ in range(rng.randint(0, 2))]
    emb = Node("emb", op="embedding", flops=1e5, param_bytes=rng.randint(0, 30000), output_bytes=rng.randint(100, 20000))
    nodes, edges, pro = [emb], [], {}
    for rs, _, _ in chain:  # the first block is entered as the others are: one prologue node per producer
        if rs not in pro:
            pro[rs] = f"p{rs}"
            nodes.append(Node(f"p{rs}", op="add", flops=1e4, output_bytes=attrs[rs]["output_bytes"]))
            edges.append(("emb", f"p{rs}", emb.output_bytes))
    if shared:
        nodes.append(Node("mask", op="mask", flops=1e3, output_bytes=5000))
        edges.append(("emb", "mask", emb.output_bytes))
    for q in range(L):
        nodes += [Node(f"b{q}_{r}", module_path=f"layers.{q}.n{r}", **attrs[r]) for r in range(s)]
        edges += [(f"b{q}_{i}", f"b{q}_{j}", b) for i, j, b in internal]
        edges += [(pro[rs] if q == 0 else f"b{q - 1}_{rs}", f"b{q}_{rd}", b) for rs, rd, b in chain]
        edges += [("mask", f"b{q}_{r}", b) for r, b in shared]
    nodes.append(Node("head", op="matmul", flops=1e6, param_bytes=rng.randint(0, 30000), output_bytes=1000))
    edges += [(f"b{L - 1}_{rs}", "head", b) for rs, _, b in chain]
    edges = [(u, v, b) for (u, v), b in {(u, v): b for u, v, b in edges}.items()]
    ins = [InputTensor("x", 800, ("emb",))]
    if block_inputs:
        r = rng.randrange(s)
        ins.append(InputTensor("pos", 3000, tuple(f"b{q}_{r}" for q in range(L))))
    return CostGraph(f"blocks{seed}", nodes, edges, ins, [("head", 1000)])


def spec(D: int, capacity: float) -> dict:
    devices = [{"id": "cpu0", "host": "h0", "kind": "cpu", "peak_flops": {"fp32": 1e11},
                "memory": {"capacity_bytes": 64e9, "bandwidth_Bps": 5e10}}]
    devices += [{"id": f"g{i}", "host": "h0", "kind": "gpu", "model": "m", "peak_flops": {"fp32": 1e12},
                 "memory": {"capacity_bytes": capacity, "bandwidth_Bps": 5e11}} for i in range(D)]
    links = [{"a": "cpu0", "b": f"g{i}", "bandwidth_Bps": 1e10, "latency_s": 5e-6} for i in range(D)]
    links += [{"a": f"g{i}", "b": f"g{j}", "bandwidth_Bps": 5e10, "latency_s": 2e-6}
              for i in range(D) for j in range(i + 1, D)]
    return {"name": "t", "host_device": "cpu0", "devices": devices, "links": links}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), like_outputs=st.booleans(), block_inputs=st.booleans(),
       cut_factor=st.sampled_from([0.0, 8.0]))
def test_a_stage_never_needs_more_than_the_dp_rule_says(seed, like_outputs, block_inputs, cut_factor):
    p = Problem(block_graph(seed, like_outputs, block_inputs), parse_spec(spec(5, 1e9)), "latency")
    bl, why = find_blocks(p, cut_factor)
    assert bl is not None, why
    bounds = [0, *bl.cuts, bl.size]
    units = [list(bl.prologue)] + [list(blk[a:b]) for blk in bl.blocks for a, b in zip(bounds, bounds[1:])] \
        + [list(bl.epilogue)]
    E = len(units)
    need = _stage_need(*_stage_memory(p, bl, units))
    rng = random.Random(seed)
    for _ in range(10):  # contiguous stages on distinct devices, each run in index order (as the DP expands them)
        k = rng.randint(1, min(5, E))
        cuts = sorted(rng.sample(range(1, E), k - 1))
        stages = list(zip((0, *cuts), (*cuts, E)))
        devs = rng.sample(range(1, p.D), k)
        pl = np.zeros(p.n, dtype=np.int64)
        for (j, kk), d in zip(stages, devs):
            for u in units[j:kk]:
                pl[u] = d
        order = tuple(tuple(int(i) for i in np.flatnonzero(pl == d)) for d in range(p.D))
        ev = evaluate(p, Plan(tuple(int(x) for x in pl), order))
        for (j, kk), d in zip(stages, devs):
            assert ev.memory_peak[d] <= need[j, kk] * (1 + 1e-9), (j, kk, E)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), objective=st.sampled_from(["latency", "throughput"]), groups=st.booleans())
def test_the_dp_plans_fit_where_the_dp_says_they_fit(seed, objective, groups):
    rng = random.Random(seed)
    g = block_graph(seed, rng.random() < 0.5, rng.random() < 0.5)
    total = sum(n.param_bytes + n.output_bytes for n in g.nodes)
    p = Problem(g, parse_spec(spec(4, total * rng.uniform(0.3, 0.7))), objective)
    plan = solve(p, "symmetry", Settings(options={"symmetry": {"polish": False, "groups": groups, "fallback": "greedy"}}))
    if "symmetry_info" not in plan.info:  # the DP's own plan (not the fallback's)
        ev = evaluate(p, plan)
        assert ev.feasible, ev.violations
