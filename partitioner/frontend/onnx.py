"""ONNX model -> :class:`~partitioner.ir.graph.CostGraph` (the same form a traced model lowers to).

Every ONNX node becomes an operator; every tensor one node produces and others consume an
edge carrying its bytes; graph inputs that are not initializers become model inputs (from
the host) and graph outputs model outputs (to the host). Shapes come from the model's
``value_info`` after :func:`onnx.shape_inference.infer_shapes`; a tensor whose shape stays
unknown counts 0 bytes and is reported once in the log.

Costs per node (the roofline's inputs, see :mod:`partitioner.machine.cost`):

* ``flops``: ``Conv``/``ConvTranspose`` ``2 · N · C_out · prod(out spatial) · C_in/groups ·
  prod(kernel)``; ``Gemm``/``MatMul`` ``2 · M · N · K`` (times the broadcast batch);
  ``Attention``-free elementwise and reduction ops one FLOP per output element (the
  tracer's fallback rule); shape-only ops (``Reshape``, ``Shape``, ``Gather`` of
  indices, ...) zero.
* ``param_bytes``: the initializers a node reads, each charged to its first consumer (a
  weight shared by several nodes is stored once).
* ``output_bytes``: the bytes of the node's outputs.

ONNX op types are renamed to the tracer's vocabulary (``Conv`` -> ``conv2d``, ``Gemm`` ->
``linear``, ``LayerNormalization`` -> ``layernorm``, ...) so spec ``unsupported_ops`` and the
coarsening rules apply to both front ends alike.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..errors import GraphError, UsageError
from ..ir.graph import CostGraph, InputTensor, Node

log = logging.getLogger(__name__)

#: ONNX op type -> the tracer's op name (lowercase torch names); others: op_type.lower()
OP_NAMES = {
    "Conv": "conv2d", "ConvTranspose": "conv_transpose2d", "Gemm": "linear", "MatMul": "matmul",
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Gelu": "gelu", "Softmax": "softmax",
    "LogSoftmax": "log_softmax", "LayerNormalization": "layernorm", "BatchNormalization": "batchnorm2d",
    "GroupNormalization": "group_norm", "MaxPool": "maxpool2d", "AveragePool": "avgpool2d",
    "GlobalAveragePool": "adaptiveavgpool2d", "Concat": "cat", "Transpose": "permute", "Gather": "embedding",
    "Flatten": "flatten", "Reshape": "reshape", "Add": "add", "Mul": "mul", "Sub": "sub", "Div": "div",
}
#: ops that only move or describe data: no arithmetic
SHAPE_OPS = frozenset({"Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant",
                       "ConstantOfShape", "Cast", "Transpose", "Slice", "Concat", "Split", "Expand", "Range"})

_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def load_onnx(path: str | Path, name: str | None = None) -> CostGraph:
    """Read an ONNX file and lower it to a cost graph.

    Raises
    ------
    UsageError
        The file is missing or not an ONNX model.
    GraphError
        The graph is malformed (a tensor consumed but never produced, a cycle).
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"ONNX file {str(path)!r} does not exist", hint="check the path")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - protobuf raises several types
        raise UsageError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})",
                         hint="export the model with torch.onnx.export, or pass a cost-graph .json") from None
    return from_onnx(model, name or path.stem)


def from_onnx(model, name: str = "onnx-model") -> CostGraph:
    """Lower an in-memory ``onnx.ModelProto`` (see :func:`load_onnx`)."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as err:  # noqa: BLE001
        log.warning("ONNX shape inference failed (%s); using the shapes the file declares", err)
    g = model.graph
    shapes: dict[str, tuple[list[int | None], int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        shapes[vi.name] = (dims, _DTYPE_BYTES.get(tt.elem_type, 4))
    inits = {t.name: t for t in g.initializer}
    for t in inits.values():
        shapes.setdefault(t.name, (list(t.dims), _DTYPE_BYTES.get(t.data_type, 4)))
    unknown: set[str] = set()

    def nbytes(tensor: str) -> float:
        dims, size = shapes.get(tensor, (None, 4))
        if dims is None or any(d is None for d in dims):
            unknown.add(tensor)
            return 0.0
        return float(math.prod(dims) * size)

    producer: dict[str, str] = {}
    ids: list[str] = []
    used_ids: set[str] = set()
    for k, n in enumerate(g.node):
        nid = n.name or f"{n.op_type.lower()}_{k}"
        while nid in used_ids:
            nid = f"{nid}_{k}"
        used_ids.add(nid)
        ids.append(nid)
        for o in n.output:
            if o:
                producer[o] = nid
    graph_inputs = [i.name for i in g.input if i.name not in inits]
    charged: set[str] = set()
    nodes, edges = [], []
    in_dsts: dict[str, list[str]] = {i: [] for i in graph_inputs}
    for nid, n in zip(ids, g.node):
        params = 0.0
        for i in n.input:
            if not i:
                continue
            if i in inits:
                if i not in charged:
                    charged.add(i)
                    params += nbytes(i)
            elif i in producer:
                if producer[i] == nid:
                    raise GraphError(f"ONNX graph {name!r}: node {nid!r} consumes its own output {i!r}",
                                     hint="the ONNX graph must be acyclic")
                edges.append((producer[i], nid, nbytes(i)))
            elif i in in_dsts:
                in_dsts[i].append(nid)
            else:
                raise GraphError(f"ONNX graph {name!r}: node {nid!r} reads tensor {i!r} that nothing produces",
                                 hint="check the model with onnx.checker.check_model")
        out_b = sum(nbytes(o) for o in n.output if o)
        nodes.append(Node(id=nid, op=OP_NAMES.get(n.op_type, n.op_type.lower()), flops=_flops(n, shapes),
                          param_bytes=int(params), output_bytes=int(out_b), fx_name=None))
    # one edge per (producer, consumer): the largest tensor between them
    merged: dict[tuple[str, str], float] = {}
    for u, v, b in edges:
        merged[(u, v)] = max(merged.get((u, v), 0.0), b)
    inputs = [InputTensor(i, int(nbytes(i)), tuple(dict.fromkeys(d))) for i, d in in_dsts.items() if d]
    outputs = [(producer[o.name], nbytes(o.name)) for o in g.output if o.name in producer]
    if unknown:
        log.info("ONNX graph %s: %d tensors of unknown shape count 0 bytes (e.g. %s)", name, len(unknown),
                 sorted(unknown)[0])
    return CostGraph(name, nodes, [(u, v, b) for (u, v), b in merged.items()], inputs, outputs)


def _attr(n, key: str, default):
    for a in n.attribute:
        if a.name == key:
            if a.ints:
                return list(a.ints)
            return a.i if a.type == 2 else a.f if a.type == 1 else default
    return default


def _flops(n, shapes) -> float:
    def dims(t):
        d = shapes.get(t, (None, 4))[0]
        return None if d is None or any(x is None for x in d) else d

    out = dims(n.output[0]) if n.output else None
    if n.op_type in ("Conv", "ConvTranspose"):
        w = dims(n.input[1]) if len(n.input) > 1 else None
        if out is None or w is None:
            return 0.0
        # weight: Conv (C_out, C_in/groups, k...), ConvTranspose (C_in, C_out/groups, k...)
        per_out = w[1] * math.prod(w[2:]) if n.op_type == "Conv" else w[0] / max(out[1], 1) * w[1] * math.prod(w[2:])
        return 2.0 * math.prod(out) * per_out
    if n.op_type in ("Gemm", "MatMul"):
        a = dims(n.input[0])
        if a is None or out is None:
            return 0.0
        k = a[-1] if not (n.op_type == "Gemm" and _attr(n, "transA", 0)) else a[0]
        return 2.0 * math.prod(out) * k
    if n.op_type in SHAPE_OPS or out is None:
        return 0.0
    return float(np.prod(out, dtype=np.float64))


__all__ = ["OP_NAMES", "from_onnx", "load_onnx"]
