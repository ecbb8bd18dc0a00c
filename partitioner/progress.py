"""Progress events from long steps, for whoever is listening.

Library code reports what it is doing (:func:`step`) and, inside a solver, each better plan
it finds (:func:`incumbent`); the CLI installs a sink (:func:`listen`) that renders them with
rich. Without a sink the calls only log at DEBUG level, so library users pay nothing.

It also carries the one stop request of a solve (Ctrl-C, or :func:`request_stop`):
:func:`interruptible` around a solve, :func:`stop_requested` polled by solvers, and
:func:`on_stop` hooks for what polling cannot reach.
"""

from __future__ import annotations

import _thread
import contextvars
import logging
import signal
import socket
import threading
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


def reporter() -> Callable[..., None]:
    """``incumbent`` bound to the sink listening now, for callbacks that a solver library may
    run on another thread (where this context's sink is not visible)."""
    fn = _sink.get()

    def report(value: float, bound: float | None = None, **info: Any) -> None:
        log.debug("incumbent %.6g (bound %s)", value, bound)
        if fn is not None:
            fn("incumbent", value=value, bound=bound, **info)

    return report


# ---- stop requests (Ctrl-C) --------------------------------------------------------------------
# One process-wide flag: set by the first Ctrl-C during a solve (see :func:`interruptible`) or
# by :func:`request_stop`; solvers poll :func:`stop_requested` (budgets, solver callbacks) and
# return the best plan they have, and :func:`on_stop` hooks stop what polling cannot reach
# (CP-SAT's search, a CBC subprocess) at once.
_stop = threading.Event()
_lock = threading.RLock()
_hooks: list[Callable[[], None]] = []
_state = {"depth": 0, "seen": 0, "handled": 0}
_coop: list[bool] = []


def stop_requested() -> bool:
    """Whether the user asked the running solve to stop (Ctrl-C) and return its best plan."""
    return _stop.is_set()


def request_stop() -> None:
    """Ask the running solve to stop and return its best plan so far (what the first Ctrl-C
    does). Thread-safe; the :func:`on_stop` hooks run in the calling thread, once."""
    with _lock:
        first = not _stop.is_set()
        _stop.set()
        hooks = list(_hooks)
    if first:
        log.info("stop requested: solvers return their best plan so far")
        for fn in hooks:
            _call_hook(fn)


def _call_hook(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - a failing hook must not hide the others
        log.exception("stop hook %r failed", fn)


def interrupt_presses() -> int:
    """How many Ctrl-C the current solve has received."""
    return max(_state["seen"], _state["handled"])


@contextmanager
def on_stop(fn: Callable[[], None]) -> Iterator[None]:
    """Run ``fn()`` when a stop is requested inside the block (at once if one already was)."""
    with _lock:
        _hooks.append(fn)
        already = _stop.is_set()
    if already:
        _call_hook(fn)
    try:
        yield
    finally:
        with _lock:
            _hooks.remove(fn)


def _on_sigint(signum, frame) -> None:
    _state["handled"] += 1
    request_stop()
    if interrupt_presses() >= 2 or not (_coop[-1] if _coop else True):
        raise KeyboardInterrupt


def _watch(sock: socket.socket) -> None:
    """Reads the signal numbers Python's C-level handler writes to the wakeup fd: reacts to
    Ctrl-C while the main thread is blocked in a solver library (no Python code runs there)."""
    while True:
        try:
            data = sock.recv(64)
        except OSError:
            return
        if not data:
            return
        for b in data:
            if b == signal.SIGINT:
                _state["seen"] += 1
                request_stop()
                if _state["seen"] >= 2 and _state["handled"] < 2:
                    # two presses may reach the Python-level handler as one (signals coalesce
                    # while the main thread is inside a solver library): make it see the second
                    _thread.interrupt_main(signal.SIGINT)


@contextmanager
def interruptible(cooperative: bool = True) -> Iterator[None]:
    """The block is a solve that Ctrl-C asks to stop with its best plan.

    The outermost block clears the stop flag and, in the main thread, replaces the SIGINT
    handler: the first Ctrl-C sets the flag (:func:`stop_requested`) and runs the
    :func:`on_stop` hooks, from a watcher thread woken through ``signal.set_wakeup_fd``, so
    it acts even while the main thread is inside HiGHS or CP-SAT; a second Ctrl-C raises
    KeyboardInterrupt (abort). Where the innermost block is not ``cooperative`` (a solver
    that does not poll the flag), the first Ctrl-C raises KeyboardInterrupt as well. The
    previous handler and wakeup fd are restored on exit; nested blocks only stack their
    ``cooperative`` flag.
    """
    with _lock:
        outer = _state["depth"] == 0
        _state["depth"] += 1
        if outer:
            _stop.clear()
            _state["seen"] = _state["handled"] = 0
    _coop.append(bool(cooperative))
    installed = None
    try:
        if outer and threading.current_thread() is threading.main_thread():
            installed = _install()
        yield
    finally:
        if installed is not None:
            _uninstall(*installed)
        _coop.pop()
        with _lock:
            _state["depth"] -= 1


def _install():
    prev = signal.getsignal(signal.SIGINT)
    if prev in (signal.SIG_IGN, None):  # Ctrl-C ignored (a background job) or not set from Python
        return None
    rsock, wsock = socket.socketpair()
    wsock.setblocking(False)
    try:
        prev_fd = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        rsock.close()
        wsock.close()
        return None
    signal.signal(signal.SIGINT, _on_sigint)
    watcher = threading.Thread(target=_watch, args=(rsock,), name="partitioner-sigint", daemon=True)
    watcher.start()
    return prev, prev_fd, rsock, wsock, watcher


def _uninstall(prev, prev_fd, rsock, wsock, watcher) -> None:
    signal.signal(signal.SIGINT, prev)
    signal.set_wakeup_fd(prev_fd)
    try:
        rsock.shutdown(socket.SHUT_RDWR)  # wakes the watcher's recv
    except OSError:
        pass
    watcher.join(timeout=1.0)
    rsock.close()
    wsock.close()
