"""Load a model for planning: a zoo name, ``file.py:factory``, a cost-graph JSON, an ONNX file, or an nn.Module."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import progress
from ..errors import UsageError
from ..ir import graph as graphmod


@dataclass
class LoadedModel:
    """A model ready for planning: the cost graph, and the fx graph when traced."""

    graph: graphmod.CostGraph
    gm: Any = None  # torch.fx.GraphModule
    example_inputs: tuple | None = None
    source: str = ""


def _load_factory(ref: str):
    path, _, fn = ref.rpartition(":")
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"model file {path!r} does not exist", hint="use path/to/file.py:factory")
    spec = importlib.util.spec_from_file_location(f"_partitioner_user_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as err:  # user code: report, don't crash
        raise UsageError(f"importing {path} failed: {type(err).__name__}: {err}", hint="fix the model file") from None
    factory = getattr(mod, fn, None)
    if not callable(factory):
        raise UsageError(f"{path} has no callable {fn!r}", hint="factory() must return (model, example_inputs)")
    try:
        out = factory()
    except Exception as err:
        raise UsageError(f"{ref}() failed: {type(err).__name__}: {err}", hint="fix the factory") from None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise UsageError(f"{ref}() must return (model, example_inputs_tuple)", hint="return a 2-tuple")
    model, inputs = out
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def load_model(ref: Any, example_inputs: tuple | None = None, *, frontend: str = "fx",
               model_kwargs: dict | None = None) -> LoadedModel:
    """Load a model from a zoo name, ``file.py:factory``, a cost-graph JSON, an ONNX file, or an
    nn.Module.

    Parameters
    ----------
    ref : str or nn.Module or CostGraph
    example_inputs : tuple, optional
        Required when ``ref`` is an nn.Module.
    frontend : {"fx", "export"}
    model_kwargs : dict, optional
        Keyword arguments of a zoo factory (e.g. ``{"nodes": 200}`` for RandWire).
    """
    if isinstance(ref, graphmod.CostGraph):
        return LoadedModel(ref, source="cost graph")
    if isinstance(ref, (str, Path)) and str(ref).endswith(".json"):
        return LoadedModel(graphmod.load(ref), source=str(ref))
    if isinstance(ref, (str, Path)) and str(ref).endswith(".onnx"):
        from .onnx import load_onnx

        return LoadedModel(load_onnx(ref), source=str(ref))
    from .trace import trace

    if isinstance(ref, str):
        if ref.endswith(".py") or ".py:" in ref:
            if ":" not in ref:
                raise UsageError(f"{ref!r} names no factory", hint="use path/to/file.py:factory")
            model, inputs = _load_factory(ref)
            name = ref.rpartition(":")[2]
        else:
            import partitioner.zoo as models

            if ref not in models.ZOO:
                names = ", ".join(n for n, _ in models.list_models())
                raise UsageError(f"unknown model {ref!r}",
                                 hint=f"zoo models: {names}; or path/to/file.py:factory; or a cost-graph .json")
            model, inputs = _zoo_model(models, ref, dict(model_kwargs or {}))
            name = ref
    else:
        if example_inputs is None:
            raise UsageError("an nn.Module needs example_inputs", hint="pass example_inputs=(tensor, ...)")
        model, inputs, name = ref, tuple(example_inputs), type(ref).__name__
    progress.step(f"tracing {name} ({frontend})")
    gm = trace(model, inputs, frontend=frontend)
    return LoadedModel(graphmod.from_fx(gm, name), gm, inputs, source=str(name))


def _zoo_model(models, name: str, kwargs: dict):
    """Build zoo model ``name`` with factory arguments ``kwargs`` (from ``--model-arg``): an
    argument the factory does not take, or a value of the wrong type or range, is a
    UsageError that lists the factory's arguments and their defaults."""
    import inspect

    factory = models.ZOO[name]
    params = {k: p for k, p in inspect.signature(factory).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepted = ", ".join(f"{k}={p.default!r}" if p.default is not p.empty else k for k, p in params.items())
    hint = f"{name} takes: {accepted}" if accepted else f"{name} takes no arguments"
    for k, v in kwargs.items():
        if k not in params:
            raise UsageError(f"model {name!r} has no argument {k!r} (--model-arg {k}=...)", hint=hint)
        default = params[k].default
        int_for_float = isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool)
        if isinstance(default, (bool, int, float, str)) and not isinstance(v, type(default)) and not int_for_float:
            raise UsageError(f"--model-arg {k}={v!r}: model {name!r} expects a value of type {type(default).__name__} "
                             f"(default {default!r})", hint=hint)
    if not kwargs:
        return models.get_model(name)
    try:
        return models.get_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError, ZeroDivisionError, IndexError, RuntimeError) as err:
        args = " ".join(f"--model-arg {k}={v}" for k, v in kwargs.items())
        raise UsageError(f"model {name!r} cannot be built with {args}: {err}", hint=hint) from None
