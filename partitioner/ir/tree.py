"""Output trees: how a model's (nested) outputs are written in a schedule (:mod:`partitioner.ir.schedule`).

A tree node is ``{"value": NAME}``, ``{"const": X}``, ``{"tuple": [...]}``, ``{"list":
[...]}``, ``{"dict": [[KEY, TREE], ...]}`` or ``{"object": {"type": "MODULE:QUALNAME", "dict":
[[KEY, TREE], ...]}}``: a mapping of another class than ``dict`` (a Hugging Face
``ModelOutput``, an ``OrderedDict``), rebuilt as that class when it can be found (see
:func:`resolve_type`), else as a plain ``dict``. This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

from ..errors import ArtifactError

log = logging.getLogger(__name__)

__all__ = ["json_scalar", "tree_encode", "tree_leaves", "tree_unflatten", "resolve_type", "type_name",
           "IMPORTABLE_PACKAGES", "PLAIN_MAPPINGS"]

#: packages whose modules :func:`resolve_type` may import to find an output class; a class of
#: any other package is found only when its module is already imported
IMPORTABLE_PACKAGES = ("collections", "transformers")
#: mapping classes written as a plain ``{"dict"}`` node (torch.fx returns dict literals as these)
PLAIN_MAPPINGS = frozenset({"torch.fx.immutable_collections:immutable_dict"})

HINT = "the schedule is corrupted or was edited by hand: emit the plan again (partitioner compile ... --out DIR)"


def json_scalar(x: Any) -> bool:
    """Whether ``x`` can be a ``{"const": x}`` leaf (None, bool, int, str, finite float)."""
    return x is None or isinstance(x, (bool, int, str)) or (isinstance(x, float) and math.isfinite(x))


def tree_encode(obj: Any, leaf, fail, sequences: tuple = (tuple,)) -> dict:
    """Encode ``obj`` as an output tree: ``leaf(x)`` returns the node for a leaf (or None if
    ``x`` is not one); ``sequences`` become ``{"tuple"}``, lists ``{"list"}``, dicts with
    str/int keys ``{"dict"}``, JSON scalars ``{"const"}``; anything else calls ``fail(x)``
    (which raises)."""

    def enc(x):
        node = leaf(x)
        if node is not None:
            return node
        if isinstance(x, sequences):
            return {"tuple": [enc(y) for y in x]}
        if isinstance(x, list):
            return {"list": [enc(y) for y in x]}
        if isinstance(x, dict) and all(isinstance(k, (str, int)) for k in x):
            items = [[k, enc(y)] for k, y in x.items()]
            if type(x) is dict or type_name(type(x)) in PLAIN_MAPPINGS:
                return {"dict": items}
            return {"object": {"type": type_name(type(x)), "dict": items}}
        if json_scalar(x):
            return {"const": x}
        return fail(x)

    return enc(obj)


def tree_leaves(tree: Any) -> list[dict]:
    """Leaves (``{"value": ...}`` or ``{"const": ...}``) of an output tree, in order."""
    out: list[dict] = []

    def walk(t):
        if not isinstance(t, Mapping) or len(t) != 1:
            raise ArtifactError(f"malformed output tree node {t!r}", hint=HINT)
        (k, v), = t.items()
        if k in ("value", "const"):
            out.append(t)
        elif k in ("tuple", "list"):
            for x in v:
                walk(x)
        elif k == "dict":
            for _, x in v:
                walk(x)
        elif k == "object" and isinstance(v, Mapping) and isinstance(v.get("type"), str) and "dict" in v:
            for _, x in v["dict"]:
                walk(x)
        else:
            raise ArtifactError(f"unknown output tree node kind {k!r}", hint=HINT)

    walk(tree)
    return out


def tree_unflatten(tree: Any, lookup) -> Any:
    """Build the output object: ``lookup(name)`` gives each ``{"value": name}`` leaf."""
    (k, v), = tree.items()
    if k == "value":
        return lookup(v)
    if k == "const":
        return v
    if k == "tuple":
        return tuple(tree_unflatten(x, lookup) for x in v)
    if k == "list":
        return [tree_unflatten(x, lookup) for x in v]
    if k == "object":
        return _rebuild(v["type"], {key: tree_unflatten(x, lookup) for key, x in v["dict"]})
    return {key: tree_unflatten(x, lookup) for key, x in v}


def type_name(cls: type) -> str:
    """``"module:qualname"`` of a class (the ``type`` of an ``{"object"}`` node)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_type(name: str) -> type | None:
    """The mapping class named ``"module:qualname"``, or None when it cannot be found.

    The module is taken from ``sys.modules``; it is imported only when its top-level
    package is one of :data:`IMPORTABLE_PACKAGES` (an artifact names the class, it never
    makes an arbitrary module run). Only subclasses of ``dict`` are returned.
    """
    module, _, qualname = name.partition(":")
    mod = sys.modules.get(module)
    if mod is None and module.partition(".")[0] in IMPORTABLE_PACKAGES:
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - not installed or broken: fall back to dict
            log.debug("cannot import %s", module, exc_info=True)
            mod = None
    obj: Any = mod
    for atom in qualname.split(".") if mod is not None else ():
        obj = getattr(obj, atom, None)
    return obj if isinstance(obj, type) and issubclass(obj, dict) else None


_warned: set[str] = set()


def _rebuild(name: str, items: dict) -> Any:
    cls = resolve_type(name)
    if cls is not None:
        try:
            return cls(**items) if dataclasses.is_dataclass(cls) else cls(items)
        except Exception:  # noqa: BLE001 - a class whose constructor takes other arguments
            log.debug("cannot rebuild %s", name, exc_info=True)
    if name not in _warned:
        _warned.add(name)
        log.warning("outputs of type %s are returned as a plain dict (import %s first to get the class back)",
                    name, name.partition(":")[0])
    return dict(items)
