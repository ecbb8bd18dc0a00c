"""A compile's time limit holds at any size (issue 21): a 50,000-node graph, bound and split."""

from __future__ import annotations

import pytest

from partitioner import api
from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.settings import Settings


def chain(n: int) -> CostGraph:
    nodes = [Node(id=f"n{i}", op="matmul", flops=1e6 * (1 + i % 7), param_bytes=1000 * (i % 5), output_bytes=4096)
             for i in range(n)]
    edges = [(f"n{i}", f"n{i + 1}", 4096) for i in range(n - 1)]
    return CostGraph(f"chain{n}", nodes, edges, [InputTensor("x", 4096, ("n0",))], [(f"n{n - 1}", 4096)])


@pytest.mark.slow  # about 15 s: building and grading 50,000 nodes
@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_a_50000_node_compile_keeps_its_time_limit(objective):
    """Before, split ran Louvain (minutes at 30,000 nodes) and every baseline before looking at
    the clock, and checked it only every 16 search steps: a 20 s limit ran past 300 s. The
    bound takes at most a quarter of the limit (skipping parts), split the rest; the margin
    allowed here (one starting plan and the modules, a few seconds) is what bench/scale.py
    measures at up to 100,000 nodes."""
    limit = 4.0
    res = api.compile_plan(chain(50_000), "server-cpu-2gpu", objective, "split", Settings(time_limit=limit))
    spent = res.bound.info["seconds"] + res.plan.solve_time_s
    assert spent <= limit + 5.0, (res.bound.info, res.plan.solve_time_s)
    assert res.evaluation.feasible and res.best_bound <= res.value * (1 + 1e-9)
    assert res.plan.info.get("hit_time_limit") or res.bound.info.get("skipped")
