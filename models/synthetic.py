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


def training_graph(graph: CostGraph, loss_bytes: int = 4) -> CostGraph:
    """The training step of a forward cost graph: forward, a loss node, then the backward pass.

    Every forward node ``v`` gets a backward node ``v.bwd`` in the same co-location group
    (``group="fb:<v>"``: a layer's gradients live where its weights do), with twice the
    forward FLOPs and bytes moved, the gradient buffers of ``v``'s parameters as its own
    ``param_bytes`` and the gradient of ``v``'s input as its output. Edges: every forward
    edge ``u -> v`` (``b`` bytes) gives the gradient edge ``v.bwd -> u.bwd`` and the saved
    input ``u -> v.bwd`` (both ``b`` bytes), and ``v -> v.bwd`` saves ``v``'s output. The
    model outputs feed a ``loss`` node (on any device) that starts the backward pass and
    returns ``loss_bytes`` to the host. Node order: forward, loss, backward in reverse.

    Parameters
    ----------
    graph : CostGraph
        An inference (forward) graph.
    loss_bytes : int
        Bytes of the loss sent to the host.
    """
    fwd = graph.nodes
    edges = graph.edges()
    in_b: dict[str, float] = {}
    for u, v, b in edges:
        in_b[v] = max(in_b.get(v, 0.0), b)
    for t in graph.inputs:
        for v in t.dsts:
            in_b[v] = max(in_b.get(v, 0.0), float(t.bytes))
    nodes = [Node(id=n.id, op=n.op, flops=n.flops, param_bytes=n.param_bytes, output_bytes=n.output_bytes,
                  bytes_moved=n.bytes_moved, time_s=n.time_s, supported_on=n.supported_on, group=f"fb:{n.id}",
                  dtype=n.dtype, module_path=n.module_path, fx_name=n.fx_name) for n in fwd]
    nodes.append(Node(id="loss", op="loss", flops=float(sum(b for _, b in graph.outputs)),
                      output_bytes=loss_bytes))
    for n in reversed(fwd):
        moved = graph.bytes_moved(n.id)
        nodes.append(Node(id=f"{n.id}.bwd", op=f"{n.op}_backward", flops=2.0 * n.flops, param_bytes=n.param_bytes,
                          output_bytes=int(in_b.get(n.id, 0.0)), bytes_moved=int(2 * moved),
                          supported_on=n.supported_on, group=f"fb:{n.id}", dtype=n.dtype,
                          module_path=n.module_path))
    out = list(edges)
    out += [(f"{v}.bwd", f"{u}.bwd", b) for u, v, b in edges]
    out += [(u, f"{v}.bwd", b) for u, v, b in edges]
    out += [(n.id, f"{n.id}.bwd", n.output_bytes) for n in fwd]
    for s, b in graph.outputs:
        out += [(s, "loss", b), ("loss", f"{s}.bwd", b)]
    return CostGraph(f"{graph.name}-train", nodes, out, list(graph.inputs), [("loss", loss_bytes)])
