"""Trace an ``nn.Module`` into a ``torch.fx.GraphModule`` whose nodes carry shapes and costs.

Two frontends turn the model into a graph:

``"fx"``
    :func:`torch.fx.symbolic_trace` semantics (a :class:`torch.fx.Tracer` that also treats
    the classes in ``leaf_modules`` as leaves). Nodes are Python-level: ``call_module``
    for ``nn.Conv2d``, ``call_function`` for ``torch.cat``, ``call_method`` for
    ``x.view``...
``"export"``
    :func:`torch.export.export` then ``.module()``: an ATen-level graph whose parameters
    are ``get_attr`` nodes and whose operators are ``call_function`` nodes on ATen
    overloads (named by their overload packet: ``aten.conv2d.default`` -> ``"conv2d"``).
    The guard node that ``.module()`` inserts (``_guards_fn``) is removed.

Shapes and costs then come from running the graph once on the example inputs (a
:class:`torch.fx.Interpreter`, under ``torch.no_grad()``; buffers are restored
afterwards, so batch-norm statistics of a model in training mode are not changed). Every
node but ``output`` gets a :class:`NodeCost` in ``node.meta["partitioner"]``; the fx
frontend also fills ``node.meta["tensor_meta"]`` as :class:`~torch.fx.passes.shape_prop.ShapeProp`
does.

FLOPs
-----
Each node runs inside :class:`torch.utils.flop_counter.FlopCounterMode`, which counts
the ATen operators it has a formula for (convolutions, ``mm``/``addmm``/``bmm``/
``baddbmm``, the fused attention kernels of CUDA...). Every other ATen operator the node
executes is seen by a second dispatch mode beneath the counter and priced by this
documented fallback (``flops_source="fallback"`` on any node with a fallback term):

* operators without a floating-point (or complex) tensor output: 0;
* views, copies, layout and data movement (``view``, ``reshape``, ``permute``,
  ``transpose``, ``expand``, ``squeeze``/``unsqueeze``, ``split``/``chunk``/``unbind``,
  ``slice``/``select``, ``cat``/``stack``, ``clone``/``copy``/``_to_copy``,
  ``embedding``/``index_select``/``gather``, padding, dropout, tensor creation): 0;
* ``dot``/``mv``/``addmv`` (matrix products without a counter formula, e.g. a vector
  ``@`` a matrix): 2 x K per output element, K the contracted length;
* ``scaled_dot_product_attention`` kernels without a counter formula (the CPU kernel):
  2·B·L·S·E + 2·B·L·S·Ev, as the counter charges the CUDA kernels;
* reductions (``mean``, ``sum``, ``amax``, ``max.dim``, ``var``, ``norm``...) and
  pooling (``max_pool2d``, ``avg_pool2d``, ``adaptive_avg_pool2d``...): one per input
  element;
* normalisations, softmax and smooth activations (``batch_norm``, ``layer_norm``,
  ``group_norm``, ``rms_norm``, ``softmax``, ``log_softmax``, ``gelu``, ``silu``,
  ``mish``): 5 per output element;
* every other operator (elementwise arithmetic, ``relu``, ``sigmoid``, ``where``...): one
  per output element.

The fused "fast path" kernels of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
are disabled during this run (``torch.backends.mha.set_fastpath_enabled(False)``, restored
afterwards) so that their matrix products are counted. Pricing at the ATen level (rather than per node) keeps the two frontends consistent and
prices a leaf module made of a convolution and an activation as the sum of both.

Bytes
-----
``output_bytes`` sums every distinct tensor in the node's (nested) output;
``input_bytes`` sums the ``output_bytes`` of the nodes it reads; ``param_bytes`` is the
bytes of the parameters and buffers a ``call_module`` owns (recursively) or of the tensor a
``get_attr`` fetches, charged once per storage, at its first user in topological order
(tied weights count once); ``bytes_moved = input_bytes + output_bytes + param_bytes``.
"""

from __future__ import annotations

import logging
import operator
import os
import sysconfig
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import TraceError
from .flops import _FallbackFlops, _tensor_leaves  # the FLOP fallback, moved unchanged

logger = logging.getLogger(__name__)

__all__ = ["NodeCost", "trace", "node_cost", "FRONTENDS"]

FRONTENDS = ("fx", "export")

_CONTROL_FLOW_HINT = ("the forward has data-dependent control flow; try `--frontend export`, or rewrite "
                      "the branch with torch.where / torch.cond, or mark the module as a leaf")
_FX_HINT = ("torch.fx symbolic tracing cannot follow this code; try `--frontend export`, or mark "
            "the module as a leaf (leaf_modules=...)")
_EXPORT_HINT = ("check that example_inputs match the forward's signature and shapes; rewrite "
                "data-dependent branches with torch.cond or torch.where; or try `--frontend fx` "
                "(with leaf modules for the untraceable parts)")
_SHAPE_HINT = ("check that example_inputs have the shapes and dtypes the model expects "
               "(one tensor per forward argument, batch dimension included)")


@dataclass(frozen=True)
class NodeCost:
    """Shapes and costs of one fx node, stored in ``node.meta["partitioner"]``.

    Attributes
    ----------
    op : str
        Canonical lowercase operator name: the module class for ``call_module``
        (``"conv2d"``, ``"linear"``), the function name for ``call_function`` (``"add"``,
        ``"cat"``, ``"getitem"``; the overload packet for ATen ops), the method name for
        ``call_method`` (``"view"``), ``"input"`` for placeholders and ``"get_attr"``.
    flops : float
        Floating-point operations of one forward of this node.
    param_bytes : int
        Bytes of the parameters and buffers the node owns (counted once per storage).
    output_bytes : int
        Bytes of every tensor in the node's output (0 for non-tensor outputs).
    input_bytes : int
        Bytes of the tensor outputs of the nodes it reads.
    bytes_moved : int
        ``input_bytes + output_bytes + param_bytes``: memory traffic for a roofline.
    shapes : tuple
        Output tensor shapes, one tuple of ints per tensor of the flattened output.
    dtype : str
        Dtype of the first output tensor (``"float32"``), ``""`` when there is none.
    module_path : str
        Qualified name of the (innermost) ``nn.Module`` the node belongs to, ``""`` for the
        root or when unknown.
    flops_source : str
        ``"counter"`` when every FLOP came from ``torch.utils.flop_counter``,
        ``"fallback"`` when part of them came from the documented fallback.
    """

    op: str
    flops: float
    param_bytes: int
    output_bytes: int
    input_bytes: int
    bytes_moved: int
    shapes: tuple
    dtype: str
    module_path: str
    flops_source: str


def node_cost(node: torch.fx.Node) -> NodeCost:
    """Return the :class:`NodeCost` that :func:`trace` stored on ``node``.

    Parameters
    ----------
    node : torch.fx.Node
        A node of a graph returned by :func:`trace` (any op but ``output``).

    Returns
    -------
    NodeCost

    Raises
    ------
    TraceError
        When the node carries no annotation.
    """
    cost = node.meta.get("partitioner")
    if not isinstance(cost, NodeCost):
        raise TraceError(f"fx node {node.name!r} ({node.op}) has no cost annotation",
                         hint="trace the model with partitioner.frontend.trace.trace(); the output node has none")
    return cost


def trace(model: nn.Module, example_inputs: tuple, *, frontend: str = "fx",
          leaf_modules: tuple[type, ...] = ()) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule whose nodes carry :class:`NodeCost` annotations.

    Parameters
    ----------
    model : nn.Module
        The model to trace. It is not modified (buffers changed by the shape-propagation
        run, e.g. batch-norm statistics in training mode, are restored).
    example_inputs : tuple
        Positional inputs of ``model.forward`` (a single tensor is accepted too).
    frontend : {"fx", "export"}
        ``"fx"``: ``torch.fx`` symbolic tracing; ``"export"``: ``torch.export.export``
        then ``.module()`` (ATen-level graph).
    leaf_modules : tuple of type
        Module classes the fx tracer keeps as single ``call_module`` nodes (ignored by
        ``"export"``).

    Returns
    -------
    torch.fx.GraphModule
        Computes the same outputs as ``model``; every node but ``output`` has
        ``node.meta["partitioner"]`` (see :func:`node_cost`).

    Raises
    ------
    TraceError
        When tracing, exporting or the shape-propagation run fails; the message names the
        model, the offending source line or node, and the input shapes.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"can only trace an nn.Module, got {type(model).__name__}",
                         hint="pass the model object (an nn.Module instance)")
    inputs = _as_tuple(example_inputs)
    leaf_modules = tuple(leaf_modules or ())
    bad = [t for t in leaf_modules if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad:
        raise TraceError(f"leaf_modules must be nn.Module classes, got {bad!r}",
                         hint="pass classes, e.g. leaf_modules=(MyBlock,)")
    name = type(model).__name__
    if frontend == "fx":
        gm = _trace_fx(model, name, leaf_modules)
    elif frontend == "export":
        if leaf_modules:
            logger.warning("leaf_modules is ignored by the export frontend")
        gm = _trace_export(model, name, inputs)
    else:
        raise TraceError(f"unknown frontend {frontend!r}", hint=f"use one of {', '.join(FRONTENDS)}")
    _propagate(gm, name, inputs, frontend)
    return gm


# ---- frontends ---------------------------------------------------------------------------
class _LeafTracer(torch.fx.Tracer):
    """A ``torch.fx.Tracer`` that also keeps instances of ``leaf_types`` as leaves."""

    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_fx(model: nn.Module, name: str, leaf_modules: tuple[type, ...]) -> torch.fx.GraphModule:
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
        gm = torch.fx.GraphModule(tracer.root, graph, name)
    except Exception as err:  # noqa: BLE001 - every tracing failure becomes a TraceError
        reason = _first_line(err)
        loc = _user_frame(err)
        control = isinstance(err, torch.fx.proxy.TraceError) or "control flow" in str(err)
        msg = f"torch.fx cannot trace {name}: {reason}"
        if loc:
            msg += f"\n  at {loc}"
        raise TraceError(msg, hint=_CONTROL_FLOW_HINT if control else _FX_HINT) from err
    logger.debug("fx traced %s: %d nodes", name, len(gm.graph.nodes))
    return gm


def _trace_export(model: nn.Module, name: str, inputs: tuple) -> torch.fx.GraphModule:
    try:
        ep = torch.export.export(model, inputs)
        gm = ep.module()
    except Exception as err:  # noqa: BLE001
        loc = _user_frame(err)
        msg = (f"torch.export could not export {name} with example inputs {_describe_values(inputs)}: "
               f"{type(err).__name__}: {_first_line(err)}")
        if loc:
            msg += f"\n  at {loc}"
        raise TraceError(msg, hint=_EXPORT_HINT) from err
    if not isinstance(gm, torch.fx.GraphModule):  # pragma: no cover - torch always returns one today
        raise TraceError(f"torch.export returned a {type(gm).__name__} for {name}, not a GraphModule",
                         hint="use --frontend fx")
    removed = [n for n in gm.graph.nodes
               if n.op == "call_module" and n.target == "_guards_fn" and not n.users]
    for n in removed:
        gm.graph.erase_node(n)
    if removed:
        gm.recompile()
    logger.debug("exported %s: %d nodes", name, len(gm.graph.nodes))
    return gm


# ---- shape and cost propagation ----------------------------------------------------------
def _propagate(gm: torch.fx.GraphModule, name: str, inputs: tuple, frontend: str) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(inputs)
    if frontend == "export":
        flat = pytree.tree_leaves(inputs)
    varargs = any(str(n.target).startswith("*") for n in placeholders)
    if len(flat) > len(placeholders) and not varargs:
        raise TraceError(f"{name} takes {len(placeholders)} input(s) "
                         f"({', '.join(n.name for n in placeholders)}), got {len(flat)} example inputs "
                         f"{_describe_values(inputs)}", hint=_SHAPE_HINT)
    flat = [a.detach() if isinstance(a, torch.Tensor) else a for a in flat]
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    # Under no_grad nothing is recorded anyway; parameters that require grad only make
    # FlopCounterMode's module tracker register autograd hooks, which fails inside
    # higher-order ops such as torch.cond (torch 2.13).
    frozen = [p for p in gm.parameters() if p.requires_grad]
    # nn.MultiheadAttention / nn.TransformerEncoderLayer take fused "fast path" kernels
    # in eval mode under no_grad; the counter has no formula for them, so run the
    # composite path, whose matmuls it counts.
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    interp = _CostInterpreter(gm, name)
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        for p in frozen:
            p.requires_grad_(False)
        with torch.no_grad():
            interp.run(*flat)
    except TraceError:
        raise
    except Exception as err:  # noqa: BLE001
        raise TraceError(f"shape propagation of {name} failed: {type(err).__name__}: {_first_line(err)}",
                         hint=_SHAPE_HINT) from err
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
        for p in frozen:
            p.requires_grad_(True)
        with torch.no_grad():
            for buf, copy in saved:
                if buf.shape == copy.shape:
                    buf.copy_(copy)
    annotated = [n.meta["partitioner"] for n in gm.graph.nodes if "partitioner" in n.meta]
    logger.info("traced %s (%s): %d nodes, %.4g FLOPs, %d bytes of parameters, %d nodes priced by the "
                "FLOP fallback", name, frontend, len(annotated), sum(c.flops for c in annotated),
                sum(c.param_bytes for c in annotated),
                sum(c.flops_source == "fallback" for c in annotated))


class _CostInterpreter(torch.fx.Interpreter):
    """Runs the graph once, storing a :class:`NodeCost` on every node it executes."""

    def __init__(self, gm: torch.fx.GraphModule, model_name: str):
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False
        self.model_name = model_name
        self.charged: dict[Any, int] = {}  # storage key -> bytes already charged

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            with _FallbackFlops() as fallback, FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
        except TraceError:
            raise
        except Exception as err:  # noqa: BLE001
            raise self._failure(n, err) from err
        if n.op != "output":
            n.meta["partitioner"] = self._annotate(n, result, float(counter.get_total_flops()), fallback)
            if "tensor_meta" not in n.meta:
                _set_tensor_meta(n, result)
        return result

    # -- annotation
    def _annotate(self, n: torch.fx.Node, result: Any, counted: float, fallback: _FallbackFlops) -> NodeCost:
        tensors = _tensor_leaves(result)
        output_bytes = sum(_nbytes(t) for t in tensors)
        shapes = tuple(tuple(int(s) for s in t.shape) for t in tensors)
        dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else ""
        input_bytes = 0
        for a in n.all_input_nodes:
            c = a.meta.get("partitioner")
            if isinstance(c, NodeCost):
                input_bytes += c.output_bytes
        param_bytes = 0
        if n.op == "call_module":
            mod = self.submodules.get(n.target)
            if mod is not None:
                param_bytes = self._charge(_module_tensors(mod))
        elif n.op == "get_attr":
            if isinstance(result, torch.Tensor):
                param_bytes = self._charge([result])
            elif isinstance(result, nn.Module):
                param_bytes = self._charge(_module_tensors(result))
        flops = counted + fallback.flops
        if fallback.flops:
            logger.debug("node %s: %.4g FLOPs from the fallback (%s)", n.name, fallback.flops,
                         ", ".join(sorted(fallback.ops)))
        return NodeCost(op=_op_name(n, self.submodules), flops=float(flops), param_bytes=int(param_bytes),
                        output_bytes=int(output_bytes), input_bytes=int(input_bytes),
                        bytes_moved=int(input_bytes + output_bytes + param_bytes), shapes=shapes,
                        dtype=dtype, module_path=_module_path(n),
                        flops_source="fallback" if fallback.flops else "counter")

    def _charge(self, tensors) -> int:
        """Bytes of ``tensors`` not yet charged to an earlier node (per storage)."""
        total = 0
        for t in tensors:
            nb = _nbytes(t)
            if nb == 0:
                continue
            try:
                storage = t.untyped_storage()
                ptr = storage.data_ptr() if t.device.type != "meta" else 0
                # meta storages all have data pointer 0: tell them apart by their StorageImpl
                # (views and tied weights of one storage still share it, so count once)
                key = (str(t.device), ptr) if ptr else (str(t.device), "impl", storage._cdata)
                cap = storage.nbytes()
            except Exception:  # noqa: BLE001 - meta/fake/sparse tensors: identity only
                key, cap = ("id", id(t)), nb
            done = self.charged.get(key, 0)
            add = max(0, min(nb, cap - done))
            if add:
                self.charged[key] = done + add
                total += add
        return total

    # -- failures
    def _failure(self, n: torch.fx.Node, err: Exception) -> TraceError:
        reason = f"{type(err).__name__}: {_first_line(err)}"
        if n.op == "placeholder":
            n_inputs = sum(1 for p in self.graph.nodes if p.op == "placeholder")
            return TraceError(f"shape propagation of {self.model_name} failed at input {n.name!r} "
                              f"(the graph takes {n_inputs} input(s)): {reason}", hint=_SHAPE_HINT)
        op = _op_name(n, self.submodules)
        where = f"node {n.name!r} ({n.op} {op}"
        path = n.target if n.op == "call_module" else _module_path(n)
        if path:
            where += f" in module {path!r}"
        where += ")"
        shapes = ", ".join(f"{a.name}: {_describe_shapes(a)}" for a in n.all_input_nodes) or "none"
        return TraceError(f"shape propagation of {self.model_name} failed at {where} with input shapes "
                          f"[{shapes}]: {reason}", hint=_SHAPE_HINT)


# ---- naming ------------------------------------------------------------------------------
_INPLACE_OPERATORS = {f"i{n}": n for n in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
    "lshift", "rshift", "concat")}


def _op_name(n: torch.fx.Node, submodules: dict[str, nn.Module]) -> str:
    if n.op == "placeholder":
        return "input"
    if n.op == "get_attr":
        return "get_attr"
    if n.op == "output":
        return "output"
    if n.op == "call_module":
        mod = submodules.get(n.target)
        return type(mod).__name__.lower() if mod is not None else str(n.target).rsplit(".", 1)[-1].lower()
    if n.op == "call_method":
        return str(n.target).lower()
    target = n.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__.lower()
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__.lower()
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name().lower()
    name = getattr(target, "__name__", None) or type(target).__name__
    name = name.lower()
    if getattr(operator, name, None) is target:
        name = _INPLACE_OPERATORS.get(name, name)
    return name


def _module_path(n: torch.fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    if stack:
        try:
            last = next(reversed(stack.values()))
            path = last[0] if isinstance(last, tuple) else str(last)
            return str(path)
        except (StopIteration, TypeError, IndexError):
            pass
    if n.op == "get_attr":
        return str(n.target).rpartition(".")[0]
    return ""


# ---- helpers -----------------------------------------------------------------------------
def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.numel()) * int(t.element_size())
    except Exception:  # noqa: BLE001
        return 0


def _module_tensors(mod: nn.Module) -> list[torch.Tensor]:
    return [*mod.parameters(recurse=True), *mod.buffers(recurse=True)]


def _set_tensor_meta(n: torch.fx.Node, result: Any) -> None:
    try:
        from torch.fx.node import map_aggregate
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        found = False

        def extract(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
    except Exception:  # noqa: BLE001 - optional metadata
        logger.debug("no tensor_meta for %s", n.name, exc_info=True)


def _describe_shapes(a: torch.fx.Node) -> str:
    c = a.meta.get("partitioner")
    if not isinstance(c, NodeCost):
        return "?"
    if not c.shapes:
        return "non-tensor"
    if len(c.shapes) == 1:
        return str(c.shapes[0])
    return "[" + ", ".join(str(s) for s in c.shapes) + "]"


def _describe_values(values: tuple) -> str:
    parts = []
    for v in values:
        if isinstance(v, torch.Tensor):
            parts.append(f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}")
        else:
            parts.append(type(v).__name__)
    return "[" + ", ".join(parts) + "]"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths().get("stdlib", "/nonexistent")) + os.sep


def _user_frame(err: BaseException) -> str:
    """``"file:line: code"`` of the last traceback frame outside torch, the stdlib and this file."""
    here = os.path.abspath(__file__)
    best = ""
    for fr in traceback.extract_tb(err.__traceback__):
        fn = os.path.abspath(fr.filename) if not fr.filename.startswith("<") else fr.filename
        if fn.startswith("<") or fn == here or fn.startswith(_TORCH_DIR):
            continue
        if fn.startswith(_STDLIB_DIR) and "-packages" + os.sep not in fn:
            continue
        best = f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    return best
