"""Random and hand-made instances shared by the tests."""

from __future__ import annotations

import random

import networkx as nx

from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.spec import Spec, parse_spec

OPS = ("conv2d", "matmul", "relu", "add", "softmax", "layernorm")


def random_graph(seed: int, n: int, p: float = 0.3, with_params: bool = True) -> CostGraph:
    """A random DAG (edges low -> high index) with random FLOPs, bytes and ops."""
    rng = random.Random(seed)
    g = nx.gnp_random_graph(n, p, seed=seed, directed=True)
    nodes = [Node(id=f"n{i}", op=rng.choice(OPS), flops=rng.uniform(1e6, 5e9),
                  param_bytes=rng.randint(0, 4_000_000) if with_params else 0,
                  output_bytes=rng.randint(1_000, 4_000_000)) for i in range(n)]
    out_b = {n_.id: n_.output_bytes for n_ in nodes}
    edges = [(f"n{u}", f"n{v}", out_b[f"n{u}"]) for u, v in sorted(g.edges()) if u < v]
    has_pred = {v for _, v, _ in edges}
    has_succ = {u for u, _, _ in edges}
    srcs = [x.id for x in nodes if x.id not in has_pred]
    sinks = [x.id for x in nodes if x.id not in has_succ]
    inputs = [InputTensor("x", 600_000, tuple(srcs))]
    outputs = [(s, out_b[s]) for s in sinks]
    return CostGraph(f"rand{seed}", nodes, edges, inputs, outputs)


def random_spec(seed: int, n_devices: int, unsupported: bool = True, capacity: float = 64e9) -> Spec:
    """A random spec: cpu0 host plus gpus/accelerators; some pairs only linked via the host."""
    rng = random.Random(seed)
    devices = [{"id": "cpu0", "host": "h0", "kind": "cpu", "model": "cpu-x",
                "peak_flops": {"fp32": rng.uniform(2e11, 2e12)},
                "memory": {"capacity_bytes": capacity, "bandwidth_Bps": 1e11}, "launch_overhead_s": 5e-6}]
    for k in range(1, n_devices):
        kind = "accelerator" if (unsupported and k == n_devices - 1 and n_devices > 2) else "gpu"
        devices.append({"id": f"d{k}", "host": "h0", "kind": kind, "model": f"m{k}",
                        "peak_flops": {"fp32": rng.uniform(2e12, 2e13)},
                        "memory": {"capacity_bytes": capacity, "bandwidth_Bps": rng.uniform(3e11, 2e12)},
                        "launch_overhead_s": rng.uniform(1e-6, 1e-5),
                        "unsupported_ops": ["softmax", "layernorm"] if kind == "accelerator" else []})
    links = [{"a": "cpu0", "b": f"d{k}", "bandwidth_Bps": rng.uniform(5e9, 3e10),
              "latency_s": rng.uniform(1e-6, 2e-5)} for k in range(1, n_devices)]
    for a in range(1, n_devices):
        for b in range(a + 1, n_devices):
            if rng.random() < 0.5:
                links.append({"a": f"d{a}", "b": f"d{b}", "bandwidth_Bps": rng.uniform(2e10, 1e11),
                              "latency_s": rng.uniform(1e-6, 1e-5)})
    return parse_spec({"name": f"rspec{seed}", "devices": devices, "links": links})


def two_gpu_spec(gpu_flops: float = 1e13, cpu_flops: float = 1e11, capacity: float = 1e10,
                 gpu_link: bool = False, comm_blocks: bool = False) -> Spec:
    """cpu0 + two identical GPUs, each linked to the CPU (and to each other if asked)."""
    dev = lambda i, k, f, bw: {"id": i, "host": "h", "kind": k, "peak_flops": {"fp32": f},  # noqa: E731
                               "memory": {"capacity_bytes": capacity, "bandwidth_Bps": bw}}
    links = [{"a": "cpu0", "b": "gpu0", "bandwidth_Bps": 1e10, "latency_s": 1e-5},
             {"a": "cpu0", "b": "gpu1", "bandwidth_Bps": 1e10, "latency_s": 1e-5}]
    if gpu_link:
        links.append({"a": "gpu0", "b": "gpu1", "bandwidth_Bps": 5e10, "latency_s": 2e-6})
    return parse_spec({"name": "two-gpu", "comm_blocks_device": comm_blocks, "devices": [
        dev("cpu0", "cpu", cpu_flops, 1e11), dev("gpu0", "gpu", gpu_flops, 1e12), dev("gpu1", "gpu", gpu_flops, 1e12)],
        "links": links})


def _torch_chain():
    import torch
    from torch import nn

    class Chain(nn.Module):
        """A small MLP chain with skip connections and two outputs (runtime tests)."""

        def __init__(self, n=6, w=12):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(n))

        def forward(self, x):
            skip = x
            for i, layer in enumerate(self.layers):
                x = torch.relu(layer(x))
                if i % 2:
                    x, skip = x + skip, x
            return x, skip.sum()

    return Chain


Chain = _torch_chain()
