"""Trace an ``nn.Module`` into a ``torch.fx.GraphModule`` whose nodes carry shapes and costs.

:func:`trace` captures the graph with a frontend: ``"fx"`` (:func:`torch.fx.symbolic_trace`
semantics; ``leaf_modules`` stay single nodes), ``"export"`` (:func:`torch.export.export`,
an ATen-level graph) or ``"dynamo"`` (:func:`torch._dynamo.export`); ``"auto"``, the
default, tries them in that order and records the one used in
``gm.meta["partitioner_frontend"]`` (the captures: :mod:`.capture`). Example inputs are
positional or keyword; the graph takes them positionally (``gm.meta["partitioner_inputs"]``).

One run of the graph on the example inputs (under ``torch.no_grad()``, buffers restored)
then stores a :class:`NodeCost` in ``node.meta["partitioner"]`` of every node: shapes,
FLOPs (``torch.utils.flop_counter`` plus the fallback of :mod:`.flops`), output, input and
parameter bytes. :func:`partitioner.ir.graph.from_fx` lowers the result to a cost graph.
How each figure is counted: docs/architecture.md (From a model to a cost graph).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import TraceError
from .capture import (
    CACHE_HINT,
    FRONTENDS,
    call_inputs,
    describe_values,
    dynamo_graph,
    export_graph,
    first_line,
    functorch_restored,
    materialise_constant_outputs,
    no_cache,
    split_inputs,
    user_frame,
)
from .flops import _FallbackFlops, _tensor_leaves  # the FLOP fallback

logger = logging.getLogger(__name__)

__all__ = ["NodeCost", "trace", "node_cost", "FRONTENDS"]

_CONTROL_FLOW_HINT = ("the forward has data-dependent control flow; try `--frontend export`, or rewrite "
                      "the branch with torch.where / torch.cond, or mark the module as a leaf")
_FX_HINT = ("torch.fx symbolic tracing cannot follow this code; try `--frontend export`, or mark "
            "the module as a leaf (leaf_modules=...)")
_AUTO_HINT = ("rewrite the data-dependent branch with torch.where / torch.cond (then fx or export can follow "
              "it), mark the untraceable module as a leaf (leaf_modules=..., `--frontend fx`), or compile the "
              "model with torch.compile(model, backend='partitioner'), which plans around graph breaks")
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


def trace(model: nn.Module, example_inputs: Any, *, frontend: str = "auto",
          leaf_modules: tuple[type, ...] = (), example_kwargs: dict | None = None) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule whose nodes carry :class:`NodeCost` annotations.

    Parameters
    ----------
    model : nn.Module
        The model to trace. It is not modified (buffers changed by the shape-propagation
        run, e.g. batch-norm statistics in training mode, are restored).
    example_inputs : tuple or dict or Tensor
        Positional inputs of ``model.forward`` (a tuple, or a single tensor), or keyword
        inputs (a dict, as in ``model(**inputs)``).
    frontend : {"auto", "fx", "export", "dynamo"}
        See the module docstring.
    leaf_modules : tuple of type
        Module classes the fx tracer keeps as single ``call_module`` nodes (ignored by
        the other frontends).
    example_kwargs : dict, optional
        Keyword inputs besides positional ``example_inputs``.

    Returns
    -------
    torch.fx.GraphModule
        Computes the same outputs as ``model``; every node but ``output`` has
        ``node.meta["partitioner"]`` (see :func:`node_cost`). ``gm.meta`` holds
        ``"partitioner_frontend"`` and ``"partitioner_inputs"`` (the example inputs as the
        graph takes them, positionally).

    Raises
    ------
    TraceError
        When tracing, exporting or the shape-propagation run fails; the message names the
        model, the offending source line or node, and the input shapes.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"can only trace an nn.Module, got {type(model).__name__}",
                         hint="pass the model object (an nn.Module instance)")
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    leaf_modules = tuple(leaf_modules or ())
    bad = [t for t in leaf_modules if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad:
        raise TraceError(f"leaf_modules must be nn.Module classes, got {bad!r}",
                         hint="pass classes, e.g. leaf_modules=(MyBlock,)")
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}", hint=f"use one of {', '.join(FRONTENDS)}")
    if leaf_modules and frontend in ("export", "dynamo"):
        logger.warning("leaf_modules is ignored by the %s frontend", frontend)
    name = type(model).__name__
    tried: list[tuple[str, TraceError]] = []
    with no_cache(model, kwargs) as cache_note:
        for fe in (("fx", "export", "dynamo") if frontend == "auto" else (frontend,)):
            try:
                with functorch_restored():
                    gm = _capture(fe, model, name, args, kwargs, leaf_modules)
                inputs = call_inputs(gm, args, kwargs, name)
                materialise_constant_outputs(gm)
                _propagate(gm, name, inputs, fe)
            except TraceError as err:
                if frontend != "auto":
                    raise
                logger.info("frontend auto: %s cannot trace %s (%s)", fe, name, err.message.splitlines()[0])
                tried.append((fe, err))
                continue
            if tried:
                logger.info("frontend auto: traced %s with %s (%s)", name, fe,
                            "; ".join(f"{f} failed: {e.message.splitlines()[0]}" for f, e in tried))
            gm.meta.update(partitioner_frontend=fe, partitioner_inputs=inputs, partitioner_cache_note=cache_note)
            return gm
    first = tried[0][1]
    detail = "\n".join(f"  {fe}: {err.message}" for fe, err in tried)
    hints = [err.hint for _, err in tried]
    hint = CACHE_HINT if CACHE_HINT in hints else first.hint if first.hint == _SHAPE_HINT else _AUTO_HINT
    raise TraceError(f"no frontend could trace {name} (tried {', '.join(fe for fe, _ in tried)}):\n{detail}",
                     hint=hint) from first


def _capture(fe: str, model: nn.Module, name: str, args: tuple, kwargs: dict,
             leaf_modules: tuple[type, ...]) -> torch.fx.GraphModule:
    if fe == "fx":
        return _trace_fx(model, name, leaf_modules, _concrete_args(model, args, kwargs))
    if fe == "export":
        return export_graph(model, name, args, kwargs)
    return dynamo_graph(model, name, args, kwargs)


def _concrete_args(model: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """With keyword inputs: the forward's other parameters fixed to their defaults."""
    if not kwargs:
        return None
    import inspect

    params = list(inspect.signature(model.forward).parameters.values())
    out = {}
    for k, p in enumerate(params):
        if k < len(args) or p.name in kwargs or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty:
            out[p.name] = p.default
    return out or None


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


def _trace_fx(model: nn.Module, name: str, leaf_modules: tuple[type, ...],
              concrete_args: dict | None = None) -> torch.fx.GraphModule:
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
        gm = torch.fx.GraphModule(tracer.root, graph, name)
    except Exception as err:  # noqa: BLE001 - every tracing failure becomes a TraceError
        reason = first_line(err)
        loc = user_frame(err)
        control = isinstance(err, torch.fx.proxy.TraceError) or "control flow" in str(err)
        msg = f"torch.fx cannot trace {name}: {reason}"
        if loc:
            msg += f"\n  at {loc}"
        raise TraceError(msg, hint=_CONTROL_FLOW_HINT if control else _FX_HINT) from err
    logger.debug("fx traced %s: %d nodes", name, len(gm.graph.nodes))
    return gm


# ---- shape and cost propagation ----------------------------------------------------------
def _propagate(gm: torch.fx.GraphModule, name: str, inputs: tuple, frontend: str) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(inputs)
    if frontend in ("export", "dynamo"):
        flat = pytree.tree_leaves(inputs)
    varargs = any(str(n.target).startswith("*") for n in placeholders)
    if len(flat) > len(placeholders) and not varargs:
        raise TraceError(f"{name} takes {len(placeholders)} input(s) "
                         f"({', '.join(n.name for n in placeholders)}), got {len(flat)} example inputs "
                         f"{describe_values(inputs)}", hint=_SHAPE_HINT)
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
        raise TraceError(f"shape propagation of {name} failed: {type(err).__name__}: {first_line(err)}",
                         hint=_SHAPE_HINT) from err
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
        for p in frozen:
            p.requires_grad_(True)
        _restore_buffers(saved, name)
    annotated = [n.meta["partitioner"] for n in gm.graph.nodes if "partitioner" in n.meta]
    logger.info("traced %s (%s): %d nodes, %.4g FLOPs, %d bytes of parameters, %d nodes priced by the "
                "FLOP fallback", name, frontend, len(annotated), sum(c.flops for c in annotated),
                sum(c.param_bytes for c in annotated),
                sum(c.flops_source == "fallback" for c in annotated))


def _restore_buffers(saved: list, name: str) -> None:
    """Put back the buffers the run changed (batch-norm statistics in training mode).

    Only changed buffers are written: a buffer may be a broadcast view (stride 0, e.g. a
    constant dynamo lifted), which ``copy_`` cannot write and the run cannot have changed.
    """
    with torch.no_grad():
        for buf, copy in saved:
            try:
                if buf.is_meta or buf.shape != copy.shape or torch.equal(buf, copy):
                    continue
                buf.copy_(copy)
            except Exception as err:  # noqa: BLE001 - never mask the run's own error
                logger.warning("tracing %s: could not restore a buffer of shape %s changed by the shape-propagation "
                               "run (%s); its values may differ from before", name, tuple(buf.shape), first_line(err))


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
        reason = f"{type(err).__name__}: {first_line(err)}"
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
