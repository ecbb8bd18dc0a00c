"""Transfer latency and bandwidth between local devices, and how logical devices that share a
machine slow each other down (part of :mod:`partitioner.measure.profile`).

:func:`measure_transfers` times copies between every pair of profiled devices and fits
``t = latency + bytes / bandwidth``; between two logical CPUs of one process values are
passed by reference, so the figure is the thread hand-off latency as the local runtime
meets it (:func:`runtime_handoff_latency`: a receiver asleep in its recv while the sender
computed, and a sender that goes on computing; a hot ping-pong is kept as
``pingpong_latency_s``).

:func:`measure_corun` (:func:`add_corun` stores it in a profile, :func:`corun_slowdown`
reads it back) times whole passes of a graph on two logical CPUs alone and at the same
time: the slowdown that :func:`partitioner.measure.calibrate.predict_schedule` applies while two
devices compute at once (shared cores, caches, memory bandwidth and the GIL).
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time

import numpy as np
import torch

from .devices import LocalDevice, parse_devices
from .profile import Profile
from .timing import _sync_for, _time_call, least_contended_median

#: Bandwidth written for a link between logical devices that pass values by reference.
REFERENCE_BANDWIDTH_BPS = 1.0e13

__all__ = ["measure_transfers", "add_transfers", "runtime_handoff_latency", "measure_corun", "add_corun",
           "corun_slowdown"]


def _fit_affine(sizes: list[float], times: list[float]) -> tuple[float, float]:
    """Least squares ``t = lat + bytes / bw`` (lat >= 0); returns (lat, bw)."""
    A = np.stack([np.ones(len(sizes)), np.asarray(sizes, float)], axis=1)
    (lat, inv), *_ = np.linalg.lstsq(A, np.asarray(times, float), rcond=None)
    if inv <= 0:
        return float(max(lat, 0.0)), math.inf
    if lat < 0:
        inv = float(np.dot(sizes, times) / np.dot(sizes, sizes))
        lat = 0.0
    return float(lat), float(1.0 / inv)


def _handoff_latency(rounds: int) -> float:
    """Half the median round trip of a ping-pong between two threads (threading.Event)."""
    ping, pong = threading.Event(), threading.Event()

    def echo():
        for _ in range(rounds):
            ping.wait()
            ping.clear()
            pong.set()

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    rts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ping.set()
        pong.wait()
        pong.clear()
        rts.append(time.perf_counter() - t0)
    th.join(timeout=5)
    return float(np.median(rts)) / 2


def measure_transfers(devices: list[LocalDevice], sizes: tuple[int, ...] = (1 << 12, 1 << 16, 1 << 20, 1 << 23),
                      repeats: int = 10) -> list[dict]:
    """Latency and bandwidth between every pair of ``devices``, a device with itself included
    (two logical devices of that model); see the module docstring."""
    out = []
    same_dev: dict[str, dict] = {}
    for i, a in enumerate(devices):
        for b in devices[i:]:
            load = round(os.getloadavg()[0], 2)
            same = a.torch_device == b.torch_device
            if same and a.torch_device in same_dev:
                out.append(dict(same_dev[a.torch_device], src=a.id, dst=b.id))
                continue
            samples = []
            prev = torch.get_num_threads()
            if a.threads is not None:
                torch.set_num_threads(a.threads)  # the sender copies with its own budget
            try:
                for nb in sizes:
                    x = torch.empty(nb // 4, dtype=torch.float32, device=a.torch_device).uniform_()
                    sync = _sync_for(b if b.kind == "gpu" else a)
                    fn = (lambda: x.clone()) if same else (lambda: x.to(b.torch_device))  # noqa: E731
                    s, _, _ = _time_call(fn, sync, 2, repeats, 2e-4)
                    samples.append([nb, float(np.median(s))])
            finally:
                torch.set_num_threads(prev)
            lat, bw = _fit_affine([s[0] for s in samples], [s[1] for s in samples])
            rec = {"src": a.id, "dst": b.id, "samples": samples, "load1": load}
            if same:
                # the runtime passes the value by reference: the cost is the hand-off to a receiver
                # that has been asleep in its recv while the sender computed (runtime_handoff_latency);
                # the hot ping-pong is kept for reference
                hand = runtime_handoff_latency(threads=a.threads or 1)
                rec.update(mode="reference", latency_s=hand["latency_s"], handoff=hand,
                           pingpong_latency_s=_handoff_latency(200), copy_latency_s=lat, copy_bandwidth_Bps=bw)
                same_dev[a.torch_device] = rec
            else:
                rec.update(mode="copy", latency_s=lat, bandwidth_Bps=bw)
            out.append(rec)
    return out


def add_transfers(profile: Profile, devices: str | list, **kw) -> Profile:
    """Measure transfers between ``devices`` (:func:`measure_transfers`) into ``profile``,
    replacing earlier measurements of the same pairs."""
    devs = devices if isinstance(devices, list) and all(isinstance(d, LocalDevice) for d in devices) \
        else parse_devices(devices)
    for d in devs:
        profile.devices[d.id] = d.to_json()
    recs = measure_transfers(devs, **kw)
    pairs = {frozenset((r["src"], r["dst"])) for r in recs}
    profile.transfers = [t for t in profile.transfers if frozenset((t["src"], t["dst"])) not in pairs] + recs
    return profile


def _spin_torch(seconds: float, a: torch.Tensor, w: torch.Tensor) -> None:
    """Small matmuls for ``seconds`` (wall): kernels release the GIL, the loop holds it in between,
    as a segment of small ops does."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, w)


def runtime_handoff_latency(rounds: int = 40, busy_s: float = 1e-3, threads: int = 1) -> dict:
    """One-way hand-off latency as the local runtime meets it: the receiver has been blocked
    in ``threading.Event.wait`` (a recv) while the sender computed for ``busy_s``; the sender
    then posts the value (``Event.set``) and goes on computing (its next action), and the
    latency is the time until the receiver runs again (woken, and holding the GIL).

    A ping-pong (:func:`_handoff_latency`) measures two threads that wake each other at
    once, with no computation in between: a hot hand-off, which the runtime rarely sees.

    Returns
    -------
    dict
        ``latency_s`` (median), ``p25_s``, ``p75_s``, ``p90_s``, ``rounds``, ``busy_s``.
    """
    a, w = torch.randn(64, 256), torch.randn(256, 256)
    evs = [threading.Event() for _ in range(rounds)]
    t_set = [0.0] * rounds
    lat: list[float] = []

    def recv():
        prev_r = torch.get_num_threads()
        torch.set_num_threads(threads)
        for i in range(rounds):
            evs[i].wait(timeout=10.0)
            lat.append(time.perf_counter() - t_set[i])
            _spin_torch(busy_s / 4, a, w)  # its segment, then back to waiting
        torch.set_num_threads(prev_r)

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    th = threading.Thread(target=recv, daemon=True, name="partitioner-handoff-probe")
    th.start()
    try:
        for i in range(rounds):
            _spin_torch(busy_s, a, w)
            t_set[i] = time.perf_counter()
            evs[i].set()
        _spin_torch(busy_s, a, w)
        th.join(timeout=10.0)
    finally:
        torch.set_num_threads(prev)
    x = np.asarray(lat) if lat else np.asarray([math.nan])
    return {"latency_s": float(np.median(x)), "p25_s": float(np.percentile(x, 25)),
            "p75_s": float(np.percentile(x, 75)), "p90_s": float(np.percentile(x, 90)), "rounds": len(lat),
            "busy_s": busy_s}


def _thread_wait_s() -> float | None:
    """Run-queue wait (seconds) of the calling thread (Linux ``/proc/thread-self/schedstat``)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) * 1e-9
    except (OSError, ValueError, IndexError):
        return None


def _pass_loop(module, inputs, threads: int | None, n: int, start: threading.Barrier | None, out: list,
               grad: bool) -> None:
    """``n`` whole passes of ``module`` on the calling thread (budget ``threads``): appends
    (wall, run-queue wait fraction) per pass; with ``start``, every pass begins at a barrier."""
    if threads is not None:
        torch.get_num_threads()
        torch.set_num_threads(threads)
    with torch.set_grad_enabled(grad):
        for _ in range(n):
            if start is not None:
                start.wait(timeout=60.0)
            w0 = _thread_wait_s()
            t0 = time.perf_counter()
            module(*inputs)
            dt = time.perf_counter() - t0
            w1 = _thread_wait_s()
            out.append((dt, (w1 - w0) / dt if w0 is not None and w1 is not None and dt > 0 else 0.0))


def measure_corun(gm, example_inputs: tuple, devices: str | list, *, rounds: int = 8, warmup: int = 1,
                  clean_wait: float = 0.02) -> list[dict]:
    """Slowdown of logical CPU devices that compute at the same time (shared cores, caches,
    memory bandwidth, the GIL).

    For every pair of CPU devices (a device with itself included: two logical devices of
    one model, as in ``hw_specs/cpu-threads-2.yaml``) whose thread budgets fit in the
    machine's cores, each device runs whole passes of the graph's own code (a deep copy
    for the second device, so the two read different weights, as two segments do) alone
    on a worker thread, and both together (started at a barrier), in interleaved rounds.
    Passes whose thread waited for a CPU more than ``clean_wait`` of their time are left
    out when enough remain (else the least contended half is kept). ``slowdown[model]`` is the median together-pass time over the
    median alone-pass time: how much slower a device computes while the other computes.

    Returns
    -------
    list of dict
        ``a``, ``b`` (device ids), ``models`` ([model a, model b]), ``alone_s``,
        ``together_s`` and ``slowdown`` (keyed ``"a"``/``"b"``), ``rounds``, ``clean``.
    """
    devs = devices if isinstance(devices, list) and all(isinstance(d, LocalDevice) for d in devices) \
        else parse_devices(devices)
    cpus = [d for d in devs if d.kind == "cpu"]
    flat = [x.detach() if isinstance(x, torch.Tensor) else x for x in example_inputs]
    grad = False
    cores = os.cpu_count() or 1
    out = []
    other = copy.deepcopy(gm)
    for i, a in enumerate(cpus):
        for b in cpus[i:]:
            if (a.threads or 1) + (b.threads or 1) > cores:
                continue
            res: dict[str, list] = {"alone_a": [], "alone_b": [], "tog_a": [], "tog_b": []}
            for r in range(warmup + rounds):
                sink = {k: [] for k in res}
                for mod, dev, key in ((gm, a, "alone_a"), (other, b, "alone_b")):
                    th = threading.Thread(target=_pass_loop, args=(mod, flat, dev.threads, 1, None, sink[key], grad))
                    th.start()
                    th.join()
                bar = threading.Barrier(2)
                ths = [threading.Thread(target=_pass_loop, args=(mod, flat, dev.threads, 1, bar, sink[key], grad))
                       for mod, dev, key in ((gm, a, "tog_a"), (other, b, "tog_b"))]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
                if r >= warmup:
                    for k in res:
                        res[k] += sink[k]

            m = {k: least_contended_median(v, clean_wait) for k, v in res.items()}
            n_clean = min(sum(1 for _, f in v if f <= clean_wait) for v in res.values())
            out.append({"a": a.id, "b": b.id, "models": [a.model, b.model],
                        "alone_s": {"a": m["alone_a"], "b": m["alone_b"]},
                        "together_s": {"a": m["tog_a"], "b": m["tog_b"]},
                        "slowdown": {"a": m["tog_a"] / m["alone_a"], "b": m["tog_b"] / m["alone_b"]},
                        "rounds": rounds, "clean": n_clean, "load1": round(os.getloadavg()[0], 2)})
    return out


def add_corun(profile: Profile, gm, example_inputs: tuple, devices: str | list, name: str | None = None,
              **kw) -> Profile:
    """:func:`measure_corun` for graph ``name`` (default ``gm``'s class name) into
    ``profile.graphs[name]["corun"]`` (replacing earlier pairs of the same models); the
    graph must have been profiled (:func:`partitioner.measure.profile.profile_graph`)."""
    name = name or type(gm).__name__
    if name not in profile.graphs:
        from ..errors import CostModelError

        raise CostModelError(f"the profile holds no graph {name!r}", hint="profile the graph first (profile_graph)")
    with torch.no_grad():
        recs = measure_corun(gm, example_inputs, devices, **kw)
    store = profile.graphs[name].setdefault("corun", [])
    pairs = {tuple(r["models"]) for r in recs}
    profile.graphs[name]["corun"] = [r for r in store if tuple(r["models"]) not in pairs] + recs
    return profile


def corun_slowdown(profile: Profile, graph: str | None, model_a: str, model_b: str) -> tuple[float, float] | None:
    """Measured slowdown ``(of a, of b)`` of device models ``a`` and ``b`` computing at the same
    time (:func:`measure_corun`), for ``graph`` when the profile has it, else the median
    over the profile's graphs; None when never measured."""
    def find(recs):
        for r in recs:
            ma, mb = r["models"]
            if (ma, mb) == (model_a, model_b):
                return r["slowdown"]["a"], r["slowdown"]["b"]
            if (mb, ma) == (model_a, model_b):
                return r["slowdown"]["b"], r["slowdown"]["a"]
        return None

    if graph is not None and graph in profile.graphs:
        hit = find(profile.graphs[graph].get("corun", []))
        if hit is not None:
            return hit
    hits = [h for g in profile.graphs.values() if (h := find(g.get("corun", []))) is not None]
    if not hits:
        return None
    return float(np.median([h[0] for h in hits])), float(np.median([h[1] for h in hits]))
