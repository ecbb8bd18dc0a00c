"""The graph-capturing frontends behind :func:`partitioner.frontend.trace.trace`, and call inputs.

:func:`export_graph` (``torch.export.export``, ``strict=False``, functionalised when the
graph holds in-place or pre-dispatch ops) and :func:`dynamo_graph` (``torch._dynamo.export``)
capture a model; both graphs take its inputs, keyword ones included, positionally in the
order of ``forward`` (:func:`call_inputs`) and return its output structure. :func:`no_cache`
turns a Hugging Face ``use_cache`` off for the trace (unless the caller passed it), since no
graph can return a cache object. Details: docs/architecture.md (From a model to a cost graph).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import sysconfig
import traceback
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import TraceError

log = logging.getLogger(__name__)

__all__ = ["FRONTENDS", "CACHE_HINT", "split_inputs", "no_cache", "functorch_restored", "export_graph", "dynamo_graph", "call_inputs",
           "input_names", "materialise_constant_outputs", "first_line", "user_frame", "describe_values"]

#: the frontends of :func:`partitioner.frontend.trace.trace`; ``"auto"`` tries fx, export, dynamo in turn
FRONTENDS = ("auto", "fx", "export", "dynamo")

_EXPORT_HINT = ("check that example_inputs match the forward's signature and shapes; rewrite "
                "data-dependent branches with torch.cond or torch.where; or try `--frontend fx` "
                "(with leaf modules for the untraceable parts)")
CACHE_HINT = ("the model returns a cache object (past_key_values): call it with use_cache=False, or leave "
               "use_cache out of the example inputs (the trace then turns it off by itself)")
_DYNAMO_HINT = ("dynamo could not capture the model as one graph (a graph break); use the torch.compile "
                "backend (torch.compile(model, backend='partitioner')), which plans each captured graph")


def split_inputs(example_inputs: Any, example_kwargs: Mapping | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call: a tuple or list is positional, a dict holds keyword
    inputs (``{"input_ids": ..., "attention_mask": ...}``, as ``model(**inputs)``), anything
    else is one positional input; ``example_kwargs`` adds keyword inputs."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif example_inputs is None:
        args, kwargs = (), {}
    else:
        args, kwargs = (example_inputs,), {}
    if example_kwargs:
        both = sorted(set(kwargs) & set(example_kwargs))
        if both:
            raise TraceError(f"keyword input(s) {both} given twice", hint="pass each input once")
        kwargs.update(example_kwargs)
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise TraceError(f"keyword inputs must have str keys, got {bad!r}",
                         hint="pass {'input_ids': tensor, ...}; a dict passed positionally goes in a tuple: (d,)")
    return args, kwargs


@contextlib.contextmanager
def no_cache(model: nn.Module, kwargs: Mapping):
    """Turn ``use_cache`` off on every config of ``model`` for the trace (restored after).

    Yields the note that was logged, or None when nothing was changed (no config with
    ``use_cache`` on, or the caller passed ``use_cache`` itself).
    """
    changed = []
    if "use_cache" not in kwargs:
        seen = set()
        for mod in model.modules():
            cfg = getattr(mod, "config", None)
            if cfg is None or id(cfg) in seen:
                continue
            seen.add(id(cfg))
            if getattr(cfg, "use_cache", None) is True:
                changed.append(cfg)
    note = None
    if changed:
        note = (f"use_cache disabled for the trace of {type(model).__name__}: the compiled model returns no "
                "past_key_values (cache outputs dropped); it plans one full forward pass")
        log.info(note)
    try:
        for cfg in changed:
            cfg.use_cache = False
        yield note
    finally:
        for cfg in changed:
            cfg.use_cache = True


@contextlib.contextmanager
def functorch_restored():
    """Undo functorch layers a failed trace left pushed: fx runs the ``vmap`` nesting calls of
    Hugging Face's attention masks for real, and a trace that fails between the increment
    and the decrement would leave every later torch call inside a vmap."""
    fc = getattr(torch._C, "_functorch", None)
    depth = fc.get_dynamic_layer_stack_depth() if fc is not None else 0
    try:
        yield
    finally:
        if fc is not None and fc.get_dynamic_layer_stack_depth() > depth:
            log.debug("undoing %d functorch layer(s) left by a failed trace", fc.get_dynamic_layer_stack_depth() - depth)
            fc.pop_dynamic_layer_stack_and_undo_to_depth(depth)


def export_graph(model: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """``torch.export.export(model, args, kwargs, strict=False).module()``, functionalised
    where needed, without its guard node and input-check hook (see the module docstring).

    Raises
    ------
    TraceError
        Naming the model, the example inputs and the user line that failed.
    """
    noise = io.StringIO()
    try:
        # a failed export prints its partial graph to stderr: kept for the debug log only
        with contextlib.redirect_stderr(noise):
            ep = torch.export.export(model, args, kwargs or None, strict=False)
        why = _impure(ep.graph_module)
        if why:
            log.info("functionalising the exported graph of %s (%s)", name, why)
            ep = ep.run_decompositions({})
        gm = ep.module()
    except Exception as err:  # noqa: BLE001 - every export failure becomes a TraceError
        if noise.getvalue():
            log.debug("torch.export printed:\n%s", noise.getvalue())
        raise _capture_error("torch.export could not export", name, args, kwargs, err) from err
    if noise.getvalue():
        log.info("torch.export printed while exporting %s:\n%s", name, noise.getvalue().rstrip())
    return _clean(gm, name, "exported")


def dynamo_graph(model: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """:func:`torch._dynamo.export` of ``model`` (one graph of torch-level ops)."""
    try:
        out = torch._dynamo.export(model)(*args, **kwargs)
        gm = out.graph_module if hasattr(out, "graph_module") else out[0]
    except Exception as err:  # noqa: BLE001
        raise _capture_error("dynamo could not capture", name, args, kwargs, err, hint=_DYNAMO_HINT) from err
    return _clean(gm, name, "dynamo captured")


def _capture_error(what: str, name: str, args: tuple, kwargs: dict, err: Exception, hint: str = _EXPORT_HINT):
    text = f"{type(err).__name__}: {first_line(err)}"
    if "Cache" in text and "output" in text:
        hint = CACHE_HINT
    msg = f"{what} {name} with example inputs {describe_values(args, kwargs)}: {text}"
    loc = user_frame(err)
    if loc:
        msg += f"\n  at {loc}"
    return TraceError(msg, hint=hint)


def _impure(gm: torch.fx.GraphModule) -> str:
    """Why an exported graph needs functionalising ("" when it does not)."""
    import operator

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        if isinstance(t, torch._ops.OpOverload):
            args = t._schema.arguments
            if any(a.alias_info is not None and a.alias_info.is_write for a in args):
                return f"in-place op {t}"
        elif t is not operator.getitem:
            return f"call of {getattr(t, '__name__', t)}"
    return ""


def _clean(gm: torch.fx.GraphModule, name: str, verb: str) -> torch.fx.GraphModule:
    """Drop the guard node and the input-check hooks (the runtime binds inputs itself)."""
    if not isinstance(gm, torch.fx.GraphModule):  # pragma: no cover - torch always returns one today
        raise TraceError(f"torch returned a {type(gm).__name__} for {name}, not a GraphModule",
                         hint="use --frontend fx")
    removed = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn" and not n.users]
    for n in removed:
        gm.graph.erase_node(n)
    if removed:
        gm.recompile()
    gm._forward_pre_hooks.clear()
    log.debug("%s %s: %d nodes", verb, name, len(gm.graph.nodes))
    return gm


def input_names(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the graph's ``forward`` parameters, one per positional input."""
    params = inspect.signature(gm.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def call_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: Mapping, name: str = "the model") -> tuple:
    """The positional inputs of ``gm`` for a call ``model(*args, **kwargs)``: keyword
    inputs go to the parameter of their name; a gap before the last input given takes the
    parameter's default.

    Raises
    ------
    TraceError
        An unknown keyword, an input given twice, or a gap without a default.
    """
    if not kwargs:
        return tuple(args)
    sig = inspect.signature(gm.forward).parameters
    names = input_names(gm)
    slots: dict[int, Any] = dict(enumerate(args))
    for k, v in kwargs.items():
        if k not in names:
            raise TraceError(f"{name} has no input {k!r} (inputs: {', '.join(names)})",
                             hint="pass the keyword inputs the model's forward takes")
        i = names.index(k)
        if i in slots:
            raise TraceError(f"input {k!r} of {name} given twice", hint="pass it positionally or by keyword")
        slots[i] = v
    out = []
    for i in range(max(slots) + 1):
        if i in slots:
            out.append(slots[i])
            continue
        default = sig[names[i]].default
        if default is inspect.Parameter.empty:
            raise TraceError(f"input {names[i]!r} of {name} is missing",
                             hint=f"pass it (inputs: {', '.join(names)})")
        out.append(default)
    return tuple(out)


def materialise_constant_outputs(gm: torch.fx.GraphModule) -> int:
    """Return every output that is a constant attribute (``get_attr``) through a clone, so
    that a node of the plan computes it; returns how many were rewritten."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    consts = [n for n in out_node.all_input_nodes if n.op == "get_attr"]
    for c in consts:
        with gm.graph.inserting_before(out_node):
            clone = gm.graph.call_function(torch.clone, (c,))
        clone.meta = dict(c.meta)
        out_node.replace_input_with(c, clone)
    if consts:
        gm.recompile()
        log.info("%d model output(s) are constant attributes (%s): returned through a clone",
                 len(consts), ", ".join(c.name for c in consts))
    return len(consts)


# ---- messages ----------------------------------------------------------------------------
def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def describe_values(values: tuple, kwargs: Mapping | None = None) -> str:
    """``"[(2, 8) int64, ...]"``: shapes and dtypes of call inputs, keyword ones by name."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        return type(v).__name__

    parts = [one(v) for v in values] + [f"{k}={one(v)}" for k, v in (kwargs or {}).items()]
    return "[" + ", ".join(parts) + "]"


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths().get("stdlib", "/nonexistent")) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the package


def user_frame(err: BaseException) -> str:
    """``"file:line: code"`` of the last traceback frame outside torch, the stdlib and partitioner."""
    best = ""
    for fr in traceback.extract_tb(err.__traceback__):
        fn = os.path.abspath(fr.filename) if not fr.filename.startswith("<") else fr.filename
        if fn.startswith("<") or fn.startswith(_OWN_DIR) or fn.startswith(_TORCH_DIR):
            continue
        if fn.startswith(_STDLIB_DIR) and "-packages" + os.sep not in fn:
            continue
        best = f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    return best
