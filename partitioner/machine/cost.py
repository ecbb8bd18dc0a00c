"""Cost models: per-(node, device) times.

The roofline model prices node ``v`` on device ``d`` as::

    t(v, d) = launch_overhead(d) + max(flops(v) / (peak(d, dtype) * eff_compute(d)),
                                       bytes_moved(v) / (mem_bw(d) * eff_memory(d)))

and ``inf`` where ``d`` cannot run ``v`` (the op is in the device's ``unsupported_ops``,
or the node's ``supported_on`` does not name the device's id, model or kind). Measured
times in a node's ``time_s`` override the roofline; a key names a device id, else a
device model, else a device kind (most specific wins).

Ops that only rename or select (``getitem``, ``size``, ``get_attr``) cost 0: a backend
never launches a kernel for them.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import CostModelError, GraphError
from ..ir.graph import CostGraph
from ..ir.spec import Device, Spec

#: Ops that never launch a kernel.
FREE_OPS = frozenset({"getitem", "size", "get_attr", "input"})


def _matches(key: str, dev: Device) -> bool:
    return key in (dev.id, dev.model, dev.kind)


def supports(node, dev: Device) -> bool:
    """Whether ``dev`` may run ``node`` (support list and the device's unsupported ops)."""
    if node.op in dev.unsupported_ops:
        return False
    if node.supported_on is not None and not any(_matches(k, dev) for k in node.supported_on):
        return False
    return True


def measured_time(node, dev: Device) -> float | None:
    """The most specific measured time for ``node`` on ``dev`` (id > model > kind), if any."""
    for key in (dev.id, dev.model, dev.kind):
        if key and key in node.time_s:
            return float(node.time_s[key])
    return None


def roofline_time(flops: float, bytes_moved: float, dev: Device, dtype: str = "float32") -> float:
    """Roofline time of an op on a device (see the module docstring)."""
    peak = dev.peak(dtype)
    bw = dev.memory.bandwidth_Bps
    if peak is None or bw is None:
        missing = "peak_flops" if peak is None else "memory.bandwidth_Bps"
        raise CostModelError(f"device {dev.id!r} has no {missing}, and the node carries no measured time for it",
                             hint=f"add {missing} to the spec, or `time_s` for {dev.id!r} to every node")
    return dev.launch_overhead_s + max(flops / (peak * dev.efficiency.compute),
                                       bytes_moved / (bw * dev.efficiency.memory))


def check_time_keys(graph: CostGraph, spec: Spec) -> None:
    """Every ``time_s`` and ``supported_on`` key must name a device id or model of the spec, or a
    device kind (cpu, gpu, accelerator): a misspelt key is an error, not a silent roofline."""
    known = {k for d in spec.devices for k in (d.id, d.model) if k} | {"cpu", "gpu", "accelerator"}
    for n in graph.nodes:
        for what, keys in (("time_s", n.time_s.keys()), ("supported_on", n.supported_on or ())):
            bad = sorted(set(keys) - known)
            if bad:
                raise GraphError(
                    f"node {n.id!r}: {what} keys {bad} match no device id, model or kind of spec {spec.name!r}",
                    hint=f"use one of: {', '.join(sorted(known))}")


def cost_matrix(graph: CostGraph, spec: Spec) -> np.ndarray:
    """Times ``T[i, j]`` of node ``graph.order[i]`` on device ``spec.devices[j]`` (``inf``: unsupported)."""
    check_time_keys(graph, spec)
    devs = spec.devices
    T = np.empty((len(graph), len(devs)))
    for i, v in enumerate(graph.order):
        n = graph.node(v)
        moved = None
        for j, dev in enumerate(devs):
            if not supports(n, dev):
                T[i, j] = math.inf
                continue
            t = measured_time(n, dev)
            if t is None:
                if n.op in FREE_OPS:
                    t = 0.0
                else:
                    if moved is None:
                        moved = graph.bytes_moved(v)
                    t = roofline_time(n.flops, moved, dev, n.dtype)
            T[i, j] = t
    return T
