"""Progress events from long steps, for whoever is listening.

Library code reports what it is doing (:func:`step`) and, inside a solver, each better plan
it finds (:func:`incumbent`); the CLI installs a sink (:func:`listen`) that renders them with
rich. Without a sink the calls only log at DEBUG level, so library users pay nothing.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

Sink = Callable[..., None]
_sink: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("partitioner_progress", default=None)


def step(description: str) -> None:
    """A new long step begins (tracing, bounding, solving with X, local search, ...)."""
    log.debug("step: %s", description)
    fn = _sink.get()
    if fn is not None:
        fn("step", description=description)


def incumbent(value: float, bound: float | None = None, **info: Any) -> None:
    """A solver found a plan of objective ``value`` (seconds); ``bound`` its proven bound."""
    log.debug("incumbent %.6g (bound %s)", value, bound)
    fn = _sink.get()
    if fn is not None:
        fn("incumbent", value=value, bound=bound, **info)


def bound(value: float) -> None:
    """The proven lower bound that incumbents will be graded against."""
    fn = _sink.get()
    if fn is not None:
        fn("bound", value=value)


def active() -> bool:
    """Whether anybody listens (solvers may skip work that only feeds progress)."""
    return _sink.get() is not None


@contextmanager
def listen(sink: Sink) -> Iterator[None]:
    """Send progress events to ``sink(kind, **data)`` inside the block."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


@contextmanager
def muted() -> Iterator[None]:
    """Silence progress inside the block (e.g. the many module solves inside a heuristic,
    whose incumbents are not the whole problem's)."""
    token = _sink.set(None)
    try:
        yield
    finally:
        _sink.reset(token)
