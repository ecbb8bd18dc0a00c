"""Segments run as TorchScript traces, so that a worker thread computes without holding
the interpreter lock (``LocalRuntime(..., segments="traced")``).

A segment's module runs its ops from Python: between two ops the worker holds the
interpreter lock, so two workers of one process that run models made of many small ops
(BERT) wait for each other. A TorchScript trace runs the whole segment in C++ with the
lock released. :class:`TracedSegment` traces its module on the first call with each
input signature (shapes, dtypes and strides of the tensor inputs), checks the trace's
outputs against the module's on those inputs, and falls back to the module itself, for
good, when the segment cannot be traced faithfully: inputs or outputs that are not
tensors, Python control flow on tensor values (a tracer warning), outputs that differ,
grad mode on, or more than ``MAX_SIGNATURES`` signatures. ``torch.jit.trace`` is
deprecated upstream in favour of ``torch.compile``/``torch.export``, which do not release
the lock for a whole segment without a C++ compiler at run time; see docs/runtime.md.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["TracedSegment", "MAX_SIGNATURES", "SEGMENT_MODES"]

#: input signatures traced per segment before it stays eager
MAX_SIGNATURES = 4
#: how segments run: their modules as emitted, or TorchScript traces of them
SEGMENT_MODES = ("eager", "traced")
#: one trace at a time in a process (the warning filters that catch a tracer warning are process-wide)
_TRACING = threading.Lock()


def _signature(args: tuple) -> tuple | None:
    if not all(isinstance(a, torch.Tensor) and a.layout == torch.strided for a in args):
        return None
    return tuple((tuple(a.shape), a.dtype, a.stride(), a.device) for a in args)


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class TracedSegment:
    """Callable like segment ``sid``'s ``module``; runs a trace of it where that is faithful.

    Parameters
    ----------
    module : torch.nn.Module
        The segment's module (called with the segment's inputs, returning a tuple).
    sid : str
        The segment's id (for the log).
    """

    def __init__(self, module: torch.nn.Module, sid: str):
        self.module, self.sid = module, sid
        self.traces: dict[tuple, Any] = {}
        self.eager = False  # the segment stays eager from now on
        self.lock = threading.Lock()

    def __call__(self, *args):
        if self.eager or torch.is_grad_enabled():
            return self.module(*args)
        key = _signature(args)
        fn = self.traces.get(key) if key is not None else None
        if fn is None:
            with self.lock:
                fn = self.traces.get(key) if key is not None else None
                if fn is None:
                    return self._trace(args, key)
        return fn(*args)

    def _trace(self, args: tuple, key: tuple | None):
        """Trace on copies of ``args``, run the trace on other copies, then run the module on
        ``args`` itself (once, last: a segment may change an input in place) and keep the
        trace when both agree. Returns the module's outputs."""
        if key is None or len(self.traces) >= MAX_SIGNATURES:
            why = "inputs that are not tensors" if key is None else f"more than {MAX_SIGNATURES} input signatures"
            return self._give_up(why, self.module(*args))
        try:
            with _TRACING, warnings.catch_warnings():
                warnings.simplefilter("error", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=DeprecationWarning)
                with torch.inference_mode(False), torch.no_grad():
                    fn = torch.jit.trace(self.module, tuple(a.clone() for a in args), check_trace=False)
                out = fn(*(a.clone() for a in args))
        except Exception as err:  # noqa: BLE001 - any failure leaves the segment eager
            return self._give_up(_why(err), self.module(*args))
        ref = self.module(*args)
        try:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        except Exception as err:  # noqa: BLE001
            return self._give_up(_why(err), ref)
        self.traces[key] = fn
        log.debug("segment %s traced for inputs %s", self.sid, key)
        return ref

    def _give_up(self, why: str, ref):
        self.eager = True
        self.traces.clear()
        log.info("segment %s runs eagerly (not traced): %s", self.sid, why)
        return ref
