"""Plans per input shape, for the drop-in module and the torch.compile backend.

A plan is made for the shapes of its example inputs; a graph from ``torch.export`` or
dynamo is even specialised to them. A call with other shapes (another batch size or
sequence length) therefore gets its own plan, made on first use and kept in a
:class:`PlanCache` keyed by :func:`shape_key`: the exact shapes and dtypes of the
call's tensors and the values of its scalars (the "bucket" is the exact signature:
padding inputs up to a larger bucket would change what a model without a mask computes).
The least recently used plan is dropped (and its runtime closed) beyond ``max_plans``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

log = logging.getLogger(__name__)

__all__ = ["PlanCache", "shape_key", "describe_key"]


def shape_key(args: tuple, kwargs: dict | None = None) -> tuple:
    """A hashable signature of a call: per input leaf, ``(shape, dtype)`` of a tensor or the
    value of a scalar (anything else by its type); keyword inputs by name."""

    def one(x):
        if isinstance(x, torch.Tensor):
            return (tuple(int(s) for s in x.shape), str(x.dtype).removeprefix("torch."))
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        return type(x).__name__

    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    return (str(spec), tuple(one(x) for x in leaves))


def describe_key(key: tuple) -> str:
    """The shapes of a :func:`shape_key`, for log lines: ``"(2, 8) int64, (2, 8) int64"``."""
    parts = []
    for x in key[1]:
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple):
            parts.append(f"{x[0]} {x[1]}")
        else:
            parts.append(repr(x))
    return ", ".join(parts)


class PlanCache:
    """Least-recently-used plans by :func:`shape_key`.

    Parameters
    ----------
    build : callable
        ``build(args, kwargs) -> entry``: plans the model for a call; an entry whose last
        item has ``close()`` (a runtime) is closed when dropped.
    max_plans : int
        Plans kept at once (at least 1).
    name : str
        The model's name, for the log.
    """

    def __init__(self, build: Callable[[tuple, dict], Any], max_plans: int = 8, name: str = "model"):
        self.build = build
        self.max_plans = max(1, int(max_plans))
        self.name = name
        self.entries: OrderedDict[tuple, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, key: tuple, entry: Any) -> Any:
        """Keep ``entry`` for ``key`` (most recent) and return it."""
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_plans:
            old_key, old = self.entries.popitem(last=False)
            log.info("plan cache of %s: dropped the plan for shapes %s (max_plans=%d)", self.name,
                     describe_key(old_key), self.max_plans)
            close = getattr(old[-1], "close", None) if isinstance(old, tuple) else None
            if close is not None:
                close()
        return entry

    def get(self, args: tuple, kwargs: dict | None = None, key: tuple | None = None) -> Any:
        """The entry for this call's shapes, planned now if there is none (``key``: the
        call's :func:`shape_key` when the caller computed it, e.g. on the inputs bound
        positionally, so that ``f(x, mask=m)`` and ``f(x=x, mask=m)`` share a plan)."""
        key = key if key is not None else shape_key(args, kwargs)
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        log.info("plan cache of %s: planning for new input shapes %s (%d plan(s) cached)", self.name,
                 describe_key(key), len(self.entries))
        return self.put(key, self.build(tuple(args), dict(kwargs or {})))
