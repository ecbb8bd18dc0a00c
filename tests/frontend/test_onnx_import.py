"""ONNX front end: costs by hand on a small hand-built model, shared weights, bad files, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from partitioner.cli.main import app
from partitioner.errors import GraphError, UsageError
from partitioner.frontend.load import load_model
from partitioner.frontend.onnx import from_onnx, load_onnx


def small_model() -> onnx.ModelProto:
    """x(1,3,8,8) -> Conv(4 out, 3x3, pad 1) -> Relu -> Flatten -> Gemm(256 -> 10) -> y; W shared? no."""
    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    b = numpy_helper.from_array(np.zeros((4,), np.float32), "b")
    fc = numpy_helper.from_array(np.zeros((10, 256), np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
             helper.make_node("Add", ["c", "c"], ["z"], name="double")]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])],
                          initializer=[w, b, fc])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_costs_by_hand():
    g = from_onnx(small_model(), "small")
    n = {x.id: x for x in g.nodes}
    assert n["conv"].op == "conv2d" and n["fc"].op == "linear" and n["relu"].op == "relu"
    assert n["conv"].flops == 2 * (4 * 8 * 8) * (3 * 3 * 3)
    assert n["fc"].flops == 2 * 10 * 256
    assert n["relu"].flops == 4 * 8 * 8 and n["flat"].flops == 0
    assert n["conv"].param_bytes == (4 * 3 * 3 * 3 + 4) * 4 and n["fc"].param_bytes == 10 * 256 * 4
    assert n["conv"].output_bytes == 4 * 8 * 8 * 4
    assert {(u, v) for u, v, _ in g.edges()} == {("conv", "relu"), ("relu", "flat"), ("flat", "fc"),
                                                 ("conv", "double")}
    assert [(t.name, t.bytes, t.dsts) for t in g.inputs] == [("x", 3 * 8 * 8 * 4, ("conv",))]
    assert sorted(g.outputs) == [("double", 4 * 8 * 8 * 4.0), ("fc", 40.0)]


def test_shared_weight_is_charged_once(tmp_path):
    m = small_model()
    m.graph.node.append(helper.make_node("Gemm", ["f", "fc"], ["y2"], name="fc2", transB=1))
    m.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 10]))
    g = from_onnx(m)
    assert sum(x.param_bytes for x in g.nodes) == (4 * 27 + 4 + 2560) * 4


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_onnx(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(UsageError, match="not a readable ONNX model"):
        load_onnx(tmp_path / "junk.onnx")
    m = small_model()
    m.graph.node.append(helper.make_node("Relu", ["ghost"], ["g2"], name="orphan"))
    with pytest.raises(GraphError, match="'ghost' that nothing produces"):
        from_onnx(m)


def test_compile_an_onnx_file(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(small_model(), str(path))
    assert len(load_model(str(path)).graph) == 5
    r = CliRunner().invoke(app, ["compile", str(path), "--solver", "heft", "--out", str(tmp_path / "o"),
                                 "--no-gantt"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "plan.json").is_file()
