"""JSON in and out for every file format of the project: standard JSON only, bounded nesting.

Writing: :func:`dumps` turns non-finite floats (and NumPy scalars) into standard values
(``null`` for ``inf``/``nan``) and never writes ``Infinity``/``NaN``. Reading: :func:`loads`
and :func:`read` turn bad JSON, undecodable bytes and nesting deeper than Python's parser
allows into one error of the caller's class, and :func:`check_depth` bounds the nesting
of a parsed part that is walked recursively afterwards (an output tree, a wire header).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import PartitionerError

__all__ = ["MAX_DEPTH", "finite", "dumps", "loads", "read", "check_depth"]

#: The deepest nesting a walked part of a document may have (our formats need under 20).
MAX_DEPTH = 100


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, NumPy scalars and arrays made
    Python values, and tuples made lists (what :func:`dumps` writes)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, type(None))):  # bool is an int
        return obj
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    item = getattr(obj, "tolist", None)  # NumPy scalars and arrays
    if callable(item):
        return finite(item())
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` of :func:`finite` ``(obj)`` with ``allow_nan=False``: standard JSON."""
    return json.dumps(finite(obj), allow_nan=False, **kw)


def loads(text: str | bytes, *, source: str, error: type[PartitionerError], hint: str) -> Any:
    """Parse JSON ``text`` (from ``source``); raise ``error(..., hint=hint)`` for bad syntax,
    bad encoding or nesting too deep for the parser."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{source} is not valid JSON: {err}", hint=hint) from None
    except RecursionError:
        raise error(f"{source} is nested too deeply to be read (JSON arrays/objects inside each other)",
                    hint=hint) from None


def read(path: str | os.PathLike, *, error: type[PartitionerError], hint: str) -> Any:
    """Read and parse the JSON file ``path`` (see :func:`loads`); an unreadable file is ``error`` too."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise error(f"cannot read {p}: {err.strerror or err}", hint=hint) from None
    return loads(data, source=str(p), error=error, hint=hint)


def check_depth(obj: Any, *, what: str, error: type[PartitionerError], hint: str, limit: int = MAX_DEPTH) -> None:
    """Raise ``error`` when lists/dicts in ``obj`` nest deeper than ``limit`` (checked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            x = list(x.values())
        elif not isinstance(x, (list, tuple)):
            continue
        if d > limit:
            raise error(f"{what} is nested more than {limit} levels deep", hint=hint)
        stack.extend((y, d + 1) for y in x)
