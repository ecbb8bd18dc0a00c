"""Transfer latency and bandwidth between local devices (part of :mod:`partitioner.profile`).

:func:`measure_transfers` times copies between every pair of profiled devices and fits
``t = latency + bytes / bandwidth``; between two logical CPUs of one process values are
passed by reference, so the figure is the thread hand-off latency (ping-pong).
"""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import torch

from .profile import LocalDevice, Profile, _sync_for, _time_call, parse_devices

__all__ = ["measure_transfers", "add_transfers"]

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
                rec.update(mode="reference", latency_s=_handoff_latency(200), copy_latency_s=lat,
                           copy_bandwidth_Bps=bw)
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
