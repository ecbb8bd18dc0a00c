"""What every solver accepts: the common settings, and each solver's own options, typed.

The common settings (seed, time limit, threads, MILP backend, warm start) are fields of
:class:`Settings`. A solver's own options are a frozen dataclass that the solver module
defines, documents in a NumPy "Attributes" section (the first sentence of each entry is its
one-line help) and names by the class attribute ``solver`` (the section they are set under:
``split.restarts``). :attr:`Settings.options` holds the raw values per section,
``{"split": {"restarts": 8}}``; a solver reads them typed with
``settings.options_of(SplitOptions)``, which rejects an unknown key or a value of the wrong
type with a :class:`~partitioner.errors.UsageError` naming the valid options and their
defaults. The CLI's ``--option split.restarts=8`` and the torch.compile option
``"split.restarts": 8`` are the same key, dotted (:func:`nest_options`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import math
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple, TypeVar, Union

from ..errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """What every solver accepts.

    Attributes
    ----------
    seed : int
        Every random choice derives from it: same input and seed, same plan.
    time_limit : float or None
        Seconds (None: no limit). A safety cap for the work-budgeted heuristics.
    threads : int
        Solver threads (MILP backends; CP-SAT's parallel mode).
    milp_backend : str
        ``"highs"`` or ``"cbc"``.
    warm_start : bool
        Start the MILP from the best heuristic plan.
    interrupt_fallback : bool
        On Ctrl-C, return the HEFT plan when the solver has none (False: re-raise).
    strict_time_limit : bool
        Stop at the time limit even before a first plan (raising ``NoSolutionError``)
        instead of finishing it: for a solve run as one start among others (split's
        baselines), whose caller has plans of its own. Honoured by the list schedulers.
    options : mapping
        Each solver's own options, ``{solver: {key: value}}``; see :meth:`options_of`.
    """

    seed: int = 0
    time_limit: float | None = 60.0
    threads: int = 1
    milp_backend: str = "highs"  # highs | cbc
    warm_start: bool = True
    interrupt_fallback: bool = True
    strict_time_limit: bool = False
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.options, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Mapping) for k, v in self.options.items()):
            raise UsageError(f"Settings.options must map a solver name to its options, got {self.options!r}",
                             hint='e.g. Settings(options={"split": {"restarts": 8}})')

    def deadline(self) -> float:
        """``time.perf_counter()`` value when the time limit, counted from now, runs out (inf: none)."""
        return math.inf if self.time_limit is None else time.perf_counter() + float(self.time_limit)

    def options_of(self, cls: type[T]) -> T:
        """The typed options of ``cls.solver``: ``cls``'s defaults overridden by
        ``self.options[cls.solver]`` (an unknown key or a bad value raises UsageError)."""
        return make_options(cls, self.options.get(cls.solver, {}))

    def with_options(self, cls: type, **values: Any) -> Settings:
        """A copy whose options for ``cls.solver`` are updated with ``values`` (checked)."""
        make_options(cls, values)
        sec = cls.solver
        return replace(self, options={**self.options, sec: {**self.options.get(sec, {}), **values}})


class OptionInfo(NamedTuple):
    """One option of a solver, for help and error messages."""

    name: str
    type: str
    default: Any
    doc: str


def nest_options(dotted: Mapping[str, Any], what: str = "option") -> dict[str, dict[str, Any]]:
    """``{"split.restarts": 8}`` -> ``{"split": {"restarts": 8}}`` (keys are ``SOLVER.KEY``)."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in dotted.items():
        sec, dot, key = str(name).partition(".")
        if not dot or not sec or not key:
            raise UsageError(f"{what} {name!r} is not SOLVER.KEY",
                             hint="e.g. split.restarts (see `partitioner solvers --options split`)")
        out.setdefault(sec, {})[key] = value
    return out


def make_options(cls: type[T], raw: Mapping[str, Any]) -> T:
    """Build ``cls`` from ``raw``: every key must be a field, every value of the field's type
    (an int is accepted for a float, a list for a tuple)."""
    hints = _hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            guess = f"; did you mean {cls.solver}.{close[0]}?" if close else ""
            raise UsageError(f"unknown option {cls.solver}.{key}{guess}", hint=_valid(cls))
        try:
            values[key] = _coerce(value, hints[key])
        except ValueError:
            info = next(o for o in describe_options(cls) if o.name == key)
            raise UsageError(f"option {cls.solver}.{key} must be {info.type}, got {value!r}",
                             hint=f"{cls.solver}.{key}: {info.doc} (default {json.dumps(info.default)})") from None
    return cls(**values)


def describe_options(cls: type) -> list[OptionInfo]:
    """Every option of ``cls``: name, type, default and the first sentence of its doc."""
    docs = _attribute_docs(cls.__doc__ or "")
    return [OptionInfo(f.name, _type_name(_hints(cls)[f.name]), _default(f), docs.get(f.name, ""))
            for f in dataclasses.fields(cls)]


def _valid(cls: type) -> str:
    shown = ", ".join(f"{o.name}={json.dumps(o.default)}" for o in describe_options(cls))
    return f"options of {cls.solver} (defaults): {shown}; see `partitioner solvers --options {cls.solver}`"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif origin in (Union, types.UnionType):
        for a in args:
            try:
                return _coerce(value, a)
            except ValueError:
                continue
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            elem = args[0] if len(args) == 2 and args[1] is Ellipsis else None
            if elem is not None:
                return tuple(_coerce(v, elem) for v in value)
            if len(args) == len(value):
                return tuple(_coerce(v, a) for v, a in zip(value, args))
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(value)


def _type_name(tp: Any) -> str:
    """``tp`` in the words of the values one types (JSON): ``int | null``, ``"cpsat" | "milp"``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"tuple[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _attribute_docs(doc: str) -> dict[str, str]:
    """The first sentence of each entry of a NumPy "Attributes" section."""
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, list[str]] = {}
    cur = None
    inside = False
    for i, line in enumerate(lines):
        if line.strip() == "Attributes" and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            inside = True
            continue
        if not inside or set(line.strip()) == {"-"}:
            continue
        if line and not line[0].isspace():
            if i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"} and lines[i + 1].strip():
                break  # the next section
            cur = line.split(":")[0].strip()
            out[cur] = []
        elif cur is not None and line.strip():
            out[cur].append(line.strip())
    first = {}
    for name, parts in out.items():
        text = " ".join(parts).replace("``", "")
        end = text.find(". ")
        first[name] = text if end < 0 else text[:end + 1]
    return first
