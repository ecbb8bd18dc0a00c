"""Synthetic DNN-shaped cost graphs of any size (no PyTorch module behind them).

Used by the scaling benchmarks and tests, where a 10,000-node graph must be built in
milliseconds: mostly a chain with skip connections inside a short window, like a
deep CNN or transformer lowered to operators, with random FLOPs, parameters and
tensor sizes that the roofline model then prices per device.
"""

from __future__ import annotations

import random

from partitioner.ir.graph import CostGraph, InputTensor, Node

_OPS = ("conv2d", "matmul", "relu", "add", "layernorm", "linear")
_HEAVY = ("conv2d", "matmul", "linear")


def dnn_cost_graph(n: int, seed: int = 0, ops: tuple[str, ...] = _OPS) -> CostGraph:
    """A deterministic DNN-like cost graph of ``n`` nodes for ``seed``."""
    rng = random.Random(seed)
    nodes = []
    for i in range(n):
        op = rng.choice(ops)
        heavy = op in _HEAVY
        nodes.append(Node(id=f"v{i}", op=op, flops=rng.uniform(1e7, 2e9) if heavy else rng.uniform(1e4, 1e6),
                          param_bytes=rng.randint(10_000, 4_000_000) if heavy else 0,
                          output_bytes=rng.choice([200_000, 800_000, 3_000_000])))
    edges = []
    for i in range(1, n):
        preds = {i - 1} if rng.random() < 0.85 else {max(0, i - rng.randint(1, 12))}
        while rng.random() < 0.15:
            preds.add(max(0, i - rng.randint(2, 12)))
        edges += [(f"v{u}", f"v{i}", nodes[u].output_bytes) for u in sorted(preds)]
    has_succ = {u for u, _, _ in edges}
    outs = [(x.id, x.output_bytes) for x in nodes if x.id not in has_succ]
    return CostGraph(f"dnn{n}", nodes, edges, [InputTensor("x", 600_000, ("v0",))], outs)
