import math

import pytest

from partitioner.errors import CostModelError, GraphError
from partitioner.ir import graph as G
from partitioner.ir.spec import parse_spec
from partitioner.machine.cost import cost_matrix, roofline_time

SPEC = parse_spec({"name": "s", "devices": [
    {"id": "cpu0", "host": "h", "kind": "cpu", "model": "xeon", "peak_flops": {"fp32": 1e12},
     "memory": {"capacity_bytes": 1e10, "bandwidth_Bps": 1e11}, "efficiency": {"compute": 0.5, "memory": 0.5},
     "launch_overhead_s": 1e-5},
    {"id": "gpu0", "host": "h", "kind": "gpu", "model": "a100", "peak_flops": {"fp32": 2e13, "fp16": 8e13},
     "memory": {"capacity_bytes": 1e10, "bandwidth_Bps": 2e12}},
    {"id": "npu0", "host": "h", "kind": "accelerator", "model": "dla", "peak_flops": {"fp32": 1e13},
     "memory": {"capacity_bytes": 1e10, "bandwidth_Bps": 1e11}, "unsupported_ops": ["softmax"]},
], "links": [{"a": "cpu0", "b": "gpu0", "bandwidth_Bps": 1e10}, {"a": "cpu0", "b": "npu0", "bandwidth_Bps": 1e10}]})


def graph(nodes):
    return G.from_json({"format": "partitioner.costgraph/1", "nodes": nodes})


def test_roofline_formula_compute_and_memory_bound():
    cpu = SPEC.devices[0]
    assert roofline_time(1e9, 0, cpu) == pytest.approx(1e-5 + 1e9 / (1e12 * 0.5))
    assert roofline_time(0, 1e9, cpu) == pytest.approx(1e-5 + 1e9 / (1e11 * 0.5))
    gpu = SPEC.devices[1]
    assert roofline_time(1e9, 0, gpu, "float16") == pytest.approx(1e9 / (8e13 * 0.5))


def test_measured_times_most_specific_wins_and_unsupported_is_inf():
    g = graph([{"id": "a", "op": "matmul", "flops": 1e9, "time_s": {"cpu": 0.5, "xeon": 0.25, "gpu": 0.1, "gpu0": 0.01}},
               {"id": "s", "op": "softmax", "flops": 1e6},
               {"id": "only", "op": "conv2d", "flops": 1e6, "supported_on": ["gpu"]},
               {"id": "free", "op": "getitem"}])
    T = cost_matrix(g, SPEC)
    i = g.index
    assert T[i["a"]].tolist()[:2] == [0.25, 0.01]
    assert T[i["a"], 2] == pytest.approx(1e9 / (1e13 * 0.5))
    assert math.isinf(T[i["s"], 2]) and math.isfinite(T[i["s"], 0])
    assert math.isinf(T[i["only"], 0]) and math.isinf(T[i["only"], 2]) and math.isfinite(T[i["only"], 1])
    assert T[i["free"]].tolist() == [0, 0, 0]


def test_unknown_time_keys_are_errors():
    with pytest.raises(GraphError, match="match no device"):
        cost_matrix(graph([{"id": "a", "time_s": {"tpu": 1.0}}]), SPEC)


def test_missing_peak_without_measurement():
    spec = parse_spec({"name": "p", "devices": [{"id": "c", "host": "h", "kind": "cpu",
                                                  "memory": {"capacity_bytes": 1e9}}]})
    assert cost_matrix(graph([{"id": "a", "time_s": {"c": 1.0}}]), spec)[0, 0] == 1.0
    with pytest.raises(CostModelError, match="no peak_flops"):
        cost_matrix(graph([{"id": "a", "flops": 1.0}]), spec)
