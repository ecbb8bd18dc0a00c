"""Timing primitives of :mod:`partitioner.measure.profile`: repeated calls with a clean-sample
filter (run-queue wait from ``/proc``), and fx Interpreters that time every node of a graph
one by one (``_Timer``) or inside whole-model passes (``_ContextTimer``, with the graph's
own code timed as one pass right after each, for the per-node overhead)."""

from __future__ import annotations

import copy
import math
import operator
import os
import time
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.utils._pytree as pytree

from .. import progress
from .devices import LocalDevice

#: A timing sample is contended when the process waited for a CPU more than this fraction of it.
CLEAN_WAIT = 0.02
_INPLACE_FUNCS = {getattr(operator, f"i{n}") for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow",
                                                        "and_", "or_", "xor", "lshift", "rshift", "matmul")
                  if hasattr(operator, f"i{n}")}


def _sync_for(dev: LocalDevice):
    if dev.kind == "gpu":
        tdev = torch.device(dev.torch_device)
        return lambda: torch.cuda.synchronize(tdev)
    return lambda: None


def runqueue_wait_s() -> float | None:
    """Seconds the threads of this process have spent runnable but waiting for a CPU
    (Linux ``/proc/self/task/*/schedstat``, second field), or None where unavailable."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total = 0
    for t in tids:
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total * 1e-9


def _time_call(fn, sync, warmup: int, repeats: int, min_sample_s: float) -> tuple[list[float], int, dict]:
    """Samples of the mean time of ``number`` calls, after ``warmup`` calls.

    A sample during which this process's threads waited for a CPU for more than
    ``CLEAN_WAIT`` of its duration (another process held the cores) is *contended*.
    Sampling goes on until ``repeats`` clean samples are taken or ``3 * repeats`` in all;
    the clean ones are returned when there are at least half of ``repeats``, else all.
    """
    for _ in range(max(0, warmup)):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    number = 1 if one >= min_sample_s else min(1000, math.ceil(min_sample_s / max(one, 1e-7)))
    repeats = max(1, repeats)
    samples, clean, fracs = [], [], []
    while len(clean) < repeats and len(samples) < 3 * repeats:
        w0 = runqueue_wait_s()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        dt = time.perf_counter() - t0
        w1 = runqueue_wait_s()
        samples.append(dt / number)
        frac = (w1 - w0) / dt if w0 is not None and w1 is not None and dt > 0 else 0.0
        fracs.append(frac)
        if frac <= CLEAN_WAIT:
            clean.append(dt / number)
    kept = clean if len(clean) >= math.ceil(repeats / 2) else samples
    return kept, number, {"samples": len(samples), "clean": len(clean), "wait_frac": float(np.median(fracs))}


def _is_inplace(gm: torch.fx.GraphModule, n: torch.fx.Node) -> bool:
    if n.op == "call_module":
        return bool(getattr(gm.get_submodule(n.target), "inplace", False))
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    if n.target in _INPLACE_FUNCS:
        return True
    name = getattr(n.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or bool(n.kwargs.get("inplace", False))


def _to(value: Any, tdev: str, clone: bool) -> Any:
    def f(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(tdev)
        return t.clone() if clone else t
    return pytree.tree_map(f, value)


class _Timer(torch.fx.Interpreter):
    """Runs the graph once; times every node whose (key, model) is wanted on each device."""

    def __init__(self, gm, keys: dict[str, str], want: dict[str, list[LocalDevice]], warmup: int, repeats: int,
                 min_sample_s: float, sink):
        super().__init__(gm, garbage_collect_values=True)
        self.keys, self.want, self.sink = keys, want, sink
        self.warmup, self.repeats, self.min_sample_s = warmup, repeats, min_sample_s
        self.moved: dict[tuple[str, str], torch.nn.Module] = {}
        self.done = 0
        self.total = sum(len(v) for v in want.values())

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        key = self.keys.get(n.name)
        devs = self.want.pop(key, None) if key is not None else None
        if devs:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            clone = _is_inplace(self.module, n)
            for dev in devs:
                self._time(n, key, dev, args, kwargs, clone)
        return result

    def _time(self, n, key, dev: LocalDevice, args, kwargs, clone: bool) -> None:
        a, kw = _to((args, kwargs), dev.torch_device, clone)
        if n.op == "call_module":
            mod = self.module.get_submodule(n.target)
            if dev.torch_device != "cpu":
                mk = (n.target, dev.torch_device)
                if mk not in self.moved:
                    self.moved[mk] = copy.deepcopy(mod).to(dev.torch_device)
                mod = self.moved[mk]
            fn = lambda: mod(*a, **kw)  # noqa: E731
        elif n.op == "call_method":
            fn = lambda: getattr(a[0], n.target)(*a[1:], **kw)  # noqa: E731
        else:
            fn = lambda: n.target(*a, **kw)  # noqa: E731
        prev = torch.get_num_threads()
        if dev.threads is not None:
            torch.set_num_threads(dev.threads)
        try:
            samples, number, info = _time_call(fn, _sync_for(dev), self.warmup, self.repeats, self.min_sample_s)
        finally:
            if dev.threads is not None:
                torch.set_num_threads(prev)
        s = np.asarray(samples)
        self.sink(key, dev.model, {"median_s": float(np.median(s)), "p25_s": float(np.percentile(s, 25)),
                                   "p75_s": float(np.percentile(s, 75)), "repeats": len(samples), "number": number,
                                   **info, "load1": round(os.getloadavg()[0], 2)})
        self.done += 1
        if self.done % 25 == 0:
            progress.step(f"profiling: {self.done}/{self.total} (op, device) pairs timed")


class _ContextTimer(torch.fx.Interpreter):
    """Runs the whole graph; records the time of every node named in ``keys`` in ``self.times``."""

    def __init__(self, gm, keys: dict[str, str], sync):
        super().__init__(gm, garbage_collect_values=True)
        self.keys, self.sync = keys, sync
        self.times: dict[str, float] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name not in self.keys:
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            fn = getattr(self, n.op)
            self.sync()
            t0 = time.perf_counter()
            out = fn(n.target, args, kwargs)
            self.sync()
            self.times[n.name] = time.perf_counter() - t0
        return out


def _profile_in_context(gm, flat: list, keys: dict[str, str], dev: LocalDevice, warmup: int,
                        repeats: int) -> tuple[dict[str, dict], dict]:
    """Time every node of ``keys`` in whole-graph passes on ``dev`` (module docstring).

    Every timed pass (the :class:`_ContextTimer` interpreter) is followed by a *whole pass*:
    the GraphModule's own generated code called as one function, which is how the runtime
    runs a segment. Both see the same load; the whole passes give the device's real
    per-pass time (``whole_median_s``), from which :func:`whole_pass_record` derives the
    per-node overhead that per-node timing misses.

    Returns ``({op key: record}, pass info)``.
    """
    module = gm if dev.torch_device == "cpu" else copy.deepcopy(gm).to(dev.torch_device)
    sync = _sync_for(dev)
    timer = _ContextTimer(module, keys, sync)
    prev = torch.get_num_threads()
    if dev.threads is not None:
        torch.set_num_threads(dev.threads)
    passes: list[tuple[dict[str, float], float, float]] = []  # (node times, wait fraction, wall)
    wholes: list[tuple[float, float]] = []  # (wall, wait fraction) of whole passes

    def timed(fn) -> tuple[float, float]:
        w0 = runqueue_wait_s()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        w1 = runqueue_wait_s()
        return dt, ((w1 - w0) / dt if w0 is not None and w1 is not None and dt > 0 else 0.0)

    try:
        for _ in range(max(0, warmup)):
            timer.run(*_to(flat, dev.torch_device, True))
            module(*_to(flat, dev.torch_device, True))
        sync()
        n_clean = 0
        while n_clean < repeats and len(passes) < 3 * repeats:
            inputs = _to(flat, dev.torch_device, True)  # a pass may update its inputs in place
            timer.times = {}
            dt, frac = timed(lambda: timer.run(*inputs))
            passes.append((timer.times, frac, dt))
            n_clean += frac <= CLEAN_WAIT
            inputs = _to(flat, dev.torch_device, True)
            wholes.append(timed(lambda: module(*inputs)))
    finally:
        if dev.threads is not None:
            torch.set_num_threads(prev)
    half = math.ceil(repeats / 2)
    clean = [p for p in passes if p[1] <= CLEAN_WAIT]
    # too few clean passes: the least contended half (a whole pass takes every preemption in it,
    # a node's median hardly any, so both must come from the quietest passes to stay comparable)
    kept = clean if len(clean) >= half else sorted(passes, key=lambda p: p[1])[:half]
    clean_whole = [w for w, f in wholes if f <= CLEAN_WAIT]
    kept_whole = clean_whole if len(clean_whole) >= half else [w for w, _ in sorted(wholes, key=lambda x: x[1])[:half]]
    pooled: dict[str, list[float]] = {}
    for times, _, _ in kept:
        for node, t in times.items():
            pooled.setdefault(keys[node], []).append(t)
    load = round(os.getloadavg()[0], 2)
    info = {"samples": len(passes), "clean": len(clean), "wait_frac": float(np.median([p[1] for p in passes])),
            "method": "context"}
    out = {}
    for k, xs in pooled.items():
        a = np.asarray(xs)
        out[k] = {"median_s": max(float(np.median(a)), 1e-9), "p25_s": float(np.percentile(a, 25)),
                  "p75_s": float(np.percentile(a, 75)), "repeats": len(kept), "number": 1, "occurrences": len(a),
                  **info, "load1": load}
    return out, dict(info, pass_median_s=float(np.median([p[2] for p in kept])),
                     whole_median_s=float(np.median(kept_whole)), whole_samples=len(wholes),
                     whole_clean=len(clean_whole))


def least_contended_median(samples: list[tuple[float, float]], clean_wait: float) -> float:
    """Median of the ``(seconds, wait fraction)`` samples whose run-queue wait is at most
    ``clean_wait``, when at least 3 and half of them are; else of the least contended half."""
    clean = [t for t, f in samples if f <= clean_wait]
    least = [t for t, _ in sorted(samples, key=lambda x: x[1])[:max(1, (len(samples) + 1) // 2)]]
    return float(np.median(clean if len(clean) >= max(3, len(samples) // 2) else least))
