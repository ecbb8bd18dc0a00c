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


def mixed_graph(seed: int, n: int, p: float = 0.3) -> CostGraph:
    """:func:`random_graph` where the memory rules differ most: every edge carries its own bytes
    (so the largest edge to a device decides a transfer), two model inputs read by random
    nodes, and model outputs taken from random nodes (not only sinks)."""
    base = random_graph(seed, n, p)
    rng = random.Random(seed + 1)
    edges = [(u, v, rng.randint(1_000, 4_000_000)) for u, v, _ in base.edges()]
    ids = [x.id for x in base.nodes]
    inputs = [InputTensor(name, rng.randint(1_000, 2_000_000), tuple(sorted(rng.sample(ids, rng.randint(1, min(3, n))))))
              for name in ("x", "y")]
    outputs = sorted({(rng.choice(ids), rng.randint(1_000, 1_000_000)) for _ in range(rng.randint(1, 3))})
    return CostGraph(f"mixed{seed}", list(base.nodes), edges, inputs, outputs)


def random_plan(problem, seed: int):
    """A random plan: every node on a random allowed device (groups together), and each device's
    nodes in the order of one random topological order of the graph."""
    from partitioner.ir.plan import Plan

    rng = random.Random(seed)
    pl = [-1] * problem.n
    for v in range(problem.n):
        g = problem.group_of[v]
        mate = next((u for u in problem.groups[g] if pl[u] >= 0), None) if g >= 0 else None
        pl[v] = pl[mate] if mate is not None else int(rng.choice(problem.allowed_devices(v).tolist()))
    indeg = [len(ps) for ps in problem.preds]
    ready = [v for v in range(problem.n) if not indeg[v]]
    order: list[list[int]] = [[] for _ in range(problem.D)]
    while ready:
        v = ready.pop(rng.randrange(len(ready)))
        order[pl[v]].append(v)
        for w in problem.succs[v]:
            indeg[w] -= 1
            if not indeg[w]:
                ready.append(w)
    return Plan(tuple(pl), tuple(tuple(o) for o in order))


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


def tight_spec(weights: float, k: int, factor: float, blocks: bool = False, mixed: bool = False,
               ring: bool = False, name: str = "tight") -> Spec:
    """A slow, roomy host plus ``k`` accelerators whose memory totals ``factor * weights`` bytes
    (the memory-tight setting of issue 19, as in bench/memtight.py)."""
    cap = factor * weights / k
    devices = [{"id": "cpu0", "host": "h0", "kind": "cpu", "peak_flops": {"fp32": 5e11},
                "memory": {"capacity_bytes": 1e12, "bandwidth_Bps": 1e11}, "launch_overhead_s": 1e-5}]
    for i in range(k):
        s = (1.0, 0.5)[i % 2] if mixed else 1.0
        devices.append({"id": f"acc{i}", "host": "h0", "kind": "accelerator", "peak_flops": {"fp32": 2e13 * s},
                        "memory": {"capacity_bytes": cap, "bandwidth_Bps": 1.5e12 * s}, "launch_overhead_s": 5e-6})
    links = [{"a": "cpu0", "b": f"acc{i}", "bandwidth_Bps": 2.5e10, "latency_s": 5e-6} for i in range(k)]
    if ring:
        links += [{"a": f"acc{i}", "b": f"acc{(i + 1) % k}", "bandwidth_Bps": 5e10, "latency_s": 2e-6}
                  for i in range(k) if k > 2 or i == 0]
    return parse_spec({"name": name, "comm_blocks_device": blocks, "memory_reserve": 0.0,
                       "devices": devices, "links": links})


def chain_graph(seed: int, n: int, skip: float = 0.2) -> CostGraph:
    """A DNN-like chain: heavy nodes with parameters, light ones without, a few short skips."""
    rng = random.Random(seed)
    nodes = []
    for i in range(n):
        heavy = rng.random() < 0.5
        nodes.append(Node(id=f"n{i}", op="matmul" if heavy else "relu",
                          flops=rng.uniform(1e8, 4e9) if heavy else rng.uniform(1e5, 1e7),
                          param_bytes=rng.randint(1_000_000, 8_000_000) if heavy else 0,
                          output_bytes=rng.choice([100_000, 400_000, 1_600_000])))
    edges = []
    for i in range(1, n):
        edges.append((f"n{i - 1}", f"n{i}", nodes[i - 1].output_bytes))
        if i >= 3 and rng.random() < skip:
            j = i - rng.randint(2, 3)
            edges.append((f"n{j}", f"n{i}", nodes[j].output_bytes))
    return CostGraph(f"chain{seed}", nodes, edges, [InputTensor("x", 400_000, ("n0",))],
                     [(f"n{n - 1}", nodes[n - 1].output_bytes)])
