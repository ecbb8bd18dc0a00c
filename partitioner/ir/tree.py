"""Output trees: how a model's (nested) outputs are written in a schedule (:mod:`partitioner.ir.schedule`).

A tree node is ``{"value": NAME}``, ``{"const": X}``, ``{"tuple": [...]}``, ``{"list":
[...]}`` or ``{"dict": [[KEY, TREE], ...]}``. This module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import ArtifactError

__all__ = ["json_scalar", "tree_encode", "tree_leaves", "tree_unflatten"]

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
            return {"dict": [[k, enc(y)] for k, y in x.items()]}
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
    return {key: tree_unflatten(x, lookup) for key, x in v}
