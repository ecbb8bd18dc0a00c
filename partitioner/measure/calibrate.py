"""Calibration of a spec from a profile, and predicted-vs-measured fidelity of a run.

Calibration
-----------
For a spec device matched to a profiled device (:func:`partitioner.measure.profile.match_devices`),
the roofline of :mod:`partitioner.machine.cost`::

    t(v) = L + max(F(v) / (P * f_c), B(v) / (W * f_m))

(``F`` FLOPs, ``B`` bytes moved, ``P`` the spec's peak for the op's dtype, ``W`` its memory
bandwidth) is fitted to the profile's median times (plus the device model's per-node overhead from the
profile's whole passes, :func:`samples_for`) by weighted least squares on log time
(:func:`scipy.optimize.least_squares`, started from the best point of a log-spaced grid,
so the non-smooth ``max`` does not trap it): parameters ``log f_c``, ``log f_m`` and
``log L`` (unless ``fit_overhead=False``), weights the number of graph nodes that share an
op signature, plus a weak pull (weight ``REG``) of ``f_c, f_m`` towards the spec's own
efficiencies so a factor the data cannot identify (no memory-bound op) stays put. The
fitted factors become ``efficiency.compute = min(f_c, 1)`` (and memory alike); a factor
above 1 means the spec's peak (bandwidth) is too low for this machine: the peak
(bandwidth) is scaled up by it and the efficiency set to 1. Spec devices no profiled
device matches get the factors of a fitted device of the same kind (same model first),
so unmeasured devices of a measured kind get calibrated predictions. Links between
matched devices take the profile's transfer measurements (two logical devices on one
torch device pass values by reference: the link is the thread hand-off latency and
``REFERENCE_BANDWIDTH_BPS``, or the measured ``clone`` with ``copy_same_device``).

The fit error is the relative error ``|predicted - measured| / measured`` over ops,
weighted by node count (median, 90th percentile, max), and the error of the sum over
all nodes, before (the spec as given) and after calibration.

Fidelity
--------
:func:`fidelity_report` compares an evaluated plan with measured runs of the local
runtime: end-to-end latency (median wall time of the runs) and per-device busy time
(sum of compute actions), with relative errors; :func:`predict_schedule` predicts the
latency of the emitted schedule itself (segment-level sends), which is what the runtime
measures, optionally with the measured slowdown of logical devices that compute at the
same time on shared cores (``contention``).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.optimize import least_squares

from ..errors import CostModelError
from ..ir.spec import Device, Spec, parse_spec
from ..machine.cost import FREE_OPS
from ..machine.replay import predict_schedule
from .apply import match_devices
from .handoff import alternation_excess
from .links import REFERENCE_BANDWIDTH_BPS
from .profile import Profile, load_profile

log = logging.getLogger(__name__)

__all__ = ["Samples", "ErrorStats", "DeviceFit", "Calibration", "samples_for", "predict", "error_stats",
           "fit_device", "calibrate", "write_spec_yaml", "fidelity_report"]

#: Weight of the pull of the fitted factors towards the spec's efficiencies (per unit of node weight).
REG = 1e-2
_BOUNDS = (math.log(1e-4), math.log(100.0))  # fitted factors f_c, f_m
_L_BOUNDS = (math.log(1e-9), math.log(1e-1))


@dataclass(frozen=True)
class Samples:
    """Measured ops of one profiled device model: FLOPs, bytes, dtype, seconds, node weight."""

    keys: tuple[str, ...]
    flops: np.ndarray
    bytes_moved: np.ndarray
    dtypes: tuple[str, ...]
    times: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class ErrorStats:
    """Relative errors |pred - meas| / meas, weighted by node count; ``total``: error of the sum."""

    median: float
    p90: float
    max: float
    total: float
    n: int

    def to_json(self) -> dict[str, float]:
        return {"median": self.median, "p90": self.p90, "max": self.max, "total": self.total, "n": self.n}


@dataclass(frozen=True)
class DeviceFit:
    """The calibration of one spec device."""

    device: str
    source: str  # profiled device id, or "from <spec device>" for a transferred fit
    factor_compute: float  # f_c: achieved FLOP/s over the spec's peak
    factor_memory: float
    launch_overhead_s: float
    before: ErrorStats | None
    after: ErrorStats | None

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "source": self.source, "factor_compute": self.factor_compute,
                "factor_memory": self.factor_memory, "launch_overhead_s": self.launch_overhead_s,
                "error_before": self.before.to_json() if self.before else None,
                "error_after": self.after.to_json() if self.after else None}


@dataclass(frozen=True)
class Calibration:
    """A calibrated spec, one fit per calibrated device, and the links that were replaced."""

    spec: Spec
    fits: dict[str, DeviceFit]
    links: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.name, "fits": {k: f.to_json() for k, f in self.fits.items()},
                "links": self.links}


# ---- samples and predictions -------------------------------------------------------------
def samples_for(profile: Profile, model: str, *, overhead: bool = True) -> Samples:
    """The profile's measured ops on device model ``model`` (free ops left out).

    With ``overhead``, every time carries the model's per-node overhead from the profile's
    whole passes (:func:`partitioner.measure.profile.node_overhead`, the median over its graphs), as
    :func:`partitioner.measure.profile.apply_profile` charges it: the roofline is then fitted to
    what a node costs when the runtime runs it.
    """
    from .profile import MIN_CORRECTED_FRACTION, node_overhead

    o = (node_overhead(profile, None, model) or 0.0) if overhead else 0.0
    counts = profile.counts()
    keys, F, B, dt, T, W = [], [], [], [], [], []
    for k in sorted(profile.ops):
        op = profile.ops[k]
        t = op["times"].get(model)
        if t is None or op.get("op") in FREE_OPS:
            continue
        keys.append(k)
        F.append(float(op.get("flops", 0.0)))
        B.append(float(op.get("bytes_moved", 0.0)))
        dt.append(str(op.get("dtype") or "float32"))
        T.append(max(float(t["median_s"]) + o, MIN_CORRECTED_FRACTION * float(t["median_s"])))
        W.append(float(counts.get(k, 1)))
    return Samples(tuple(keys), np.array(F), np.array(B), tuple(dt), np.array(T), np.array(W))


def _peaks(dev: Device, s: Samples) -> tuple[np.ndarray, float]:
    peaks = [dev.peak(d) for d in s.dtypes]
    bw = dev.memory.bandwidth_Bps
    if any(p is None for p in peaks) or bw is None:
        raise CostModelError(f"device {dev.id!r} has no peak_flops or memory.bandwidth_Bps to calibrate",
                             hint="give the spec device a roofline (peak_flops.fp32, memory.bandwidth_Bps)")
    return np.array(peaks, dtype=float), float(bw)


def predict(dev: Device, s: Samples) -> np.ndarray:
    """Roofline times of the sampled ops on ``dev`` (as :func:`partitioner.machine.cost.roofline_time`)."""
    P, W = _peaks(dev, s)
    return dev.launch_overhead_s + np.maximum(s.flops / (P * dev.efficiency.compute),
                                              s.bytes_moved / (W * dev.efficiency.memory))


def error_stats(pred: np.ndarray, s: Samples) -> ErrorStats:
    """Weighted relative errors of ``pred`` against the measured times."""
    rel = np.abs(pred - s.times) / s.times
    order = np.argsort(rel, kind="stable")
    cw = np.cumsum(s.weights[order]) / s.weights.sum()

    def q(p: float) -> float:
        return float(rel[order][min(int(np.searchsorted(cw, p)), len(rel) - 1)])

    total = float(abs(np.dot(pred, s.weights) - np.dot(s.times, s.weights)) / np.dot(s.times, s.weights))
    return ErrorStats(q(0.5), q(0.9), float(rel.max()), total, len(s))


# ---- fitting -----------------------------------------------------------------------------
def _model_log(x: np.ndarray, P: np.ndarray, W: float, s: Samples, L_fixed: float | None) -> np.ndarray:
    fc, fm = np.exp(x[0]), np.exp(x[1])
    L = L_fixed if L_fixed is not None else np.exp(x[2])
    return np.log(L + np.maximum(s.flops / (P * fc), s.bytes_moved / (W * fm)) + 1e-15)


def fit_device(dev: Device, s: Samples, *, fit_overhead: bool = True) -> tuple[Device, DeviceFit]:
    """Fit ``dev``'s efficiencies (and launch overhead) to the samples (module docstring).

    Returns
    -------
    (Device, DeviceFit)
        The calibrated device and the fit with its errors before and after.

    Raises
    ------
    CostModelError
        Fewer than 3 samples, or a device without a roofline.
    """
    if len(s) < 3:
        raise CostModelError(f"only {len(s)} measured ops for device {dev.id!r}: too few to calibrate",
                             hint="profile a model with more operators on the matching device")
    P, W = _peaks(dev, s)
    logt = np.log(s.times)
    sw = np.sqrt(s.weights)
    x0 = np.log([dev.efficiency.compute, dev.efficiency.memory])
    lam = REG * math.sqrt(float(s.weights.sum()))
    L_fixed = None if fit_overhead else dev.launch_overhead_s

    def resid(x):
        r = sw * (_model_log(x, P, W, s, L_fixed) - logt)
        return np.concatenate([r, lam * (x[:2] - x0)])

    grid_f = np.linspace(*_BOUNDS, 13)
    grid_L = np.log([1e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4]) if fit_overhead else [0.0]
    cands = []
    for a in grid_f:
        for b in grid_f:
            for c in grid_L:
                x = np.array([a, b, c]) if fit_overhead else np.array([a, b])
                cands.append((float(np.sum(resid(x) ** 2)), tuple(x)))
    cands.sort()
    lo = [_BOUNDS[0], _BOUNDS[0]] + ([_L_BOUNDS[0]] if fit_overhead else [])
    hi = [_BOUNDS[1], _BOUNDS[1]] + ([_L_BOUNDS[1]] if fit_overhead else [])
    best = None
    for _, x in cands[:3]:
        r = least_squares(resid, np.clip(np.array(x), lo, hi), bounds=(lo, hi), method="trf")
        if best is None or r.cost < best.cost - 1e-15:
            best = r
    fc, fm = float(np.exp(best.x[0])), float(np.exp(best.x[1]))
    L = float(np.exp(best.x[2])) if fit_overhead else dev.launch_overhead_s
    new = _apply_factors(dev, fc, fm, L)
    fit = DeviceFit(dev.id, "", fc, fm, L, error_stats(predict(dev, s), s), error_stats(predict(new, s), s))
    return new, fit


def _apply_factors(dev: Device, fc: float, fm: float, L: float) -> Device:
    peaks = {k: v * max(fc, 1.0) for k, v in dev.peak_flops.items()}
    mem = dev.memory.model_copy(update={"bandwidth_Bps": dev.memory.bandwidth_Bps * max(fm, 1.0)})
    eff = dev.efficiency.model_copy(update={"compute": min(fc, 1.0), "memory": min(fm, 1.0)})
    return dev.model_copy(update={"peak_flops": peaks, "memory": mem, "efficiency": eff, "launch_overhead_s": L})


def calibrate(spec: Spec, profile: Profile | str | os.PathLike, *, device_map: dict[str, str] | None = None,
              fit_overhead: bool = True, links: bool = True, copy_same_device: bool = False,
              strict: bool = True, graph: str | None = None) -> Calibration:
    """Calibrate every device of ``spec`` that the profile measures or shares a kind with.

    A link between two logical devices of one profiled device (a same-device transfer
    record: values pass by reference) takes the measured hand-off latency plus, when the
    profile ran the alternation probe (:mod:`partitioner.measure.handoff`), its measured
    excess per transfer, for ``graph`` when measured on it, else the median over the
    profile's graphs.

    With ``strict=False`` (how :func:`partitioner.api.compile_plan` uses it), a device that
    cannot be fitted (too few measured ops, no roofline in the spec) keeps its numbers, with
    a warning, and a spec no profiled device matches comes back unchanged.

    Raises
    ------
    CostModelError
        (``strict``) No spec device matches a profiled device, or a matched device has too
        few samples or no roofline.
    """
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    matched = match_devices(spec, prof, device_map)
    if not matched and not strict:
        log.warning("no device of spec %s matches a profiled device: nothing to calibrate", spec.name)
        return Calibration(spec, {})
    if not matched:
        raise CostModelError(f"no device of spec {spec.name!r} matches a profiled device "
                             f"({', '.join(prof.devices) or 'none'})",
                             hint="map them explicitly (--map cpu0=cpu:1t), or set `threads`/`model` in the spec")
    devices: dict[str, Device] = {}
    fits: dict[str, DeviceFit] = {}
    for dev in spec.devices:
        if dev.id in matched:
            s = samples_for(prof, prof.model_of(matched[dev.id]))
            try:
                new, fit = fit_device(dev, s, fit_overhead=fit_overhead)
            except CostModelError as err:
                if strict:
                    raise
                log.warning("not calibrating %s: %s", dev.id, err.message)
                devices[dev.id] = dev
                continue
            devices[dev.id], fits[dev.id] = new, DeviceFit(**{**fit.__dict__, "source": matched[dev.id]})
    for dev in spec.devices:
        if dev.id in fits or dev.id in devices:
            continue
        donors = [d for d in spec.devices if d.id in fits and d.kind == dev.kind]
        donors.sort(key=lambda d: d.model != dev.model)
        if not donors or dev.peak("float32") is None or dev.memory.bandwidth_Bps is None:
            devices[dev.id] = dev
            continue
        f = fits[donors[0].id]
        devices[dev.id] = _apply_factors(dev, f.factor_compute, f.factor_memory, f.launch_overhead_s)
        fits[dev.id] = DeviceFit(dev.id, f"from {donors[0].id}", f.factor_compute, f.factor_memory,
                                 f.launch_overhead_s, None, None)
    new_links, changed = [], {}
    for ln in spec.links:
        rec = prof.transfer(matched[ln.a], matched[ln.b]) if links and ln.a in matched and ln.b in matched else None
        if rec is None:
            new_links.append(ln)
            continue
        if rec.get("mode") == "reference":
            lat = rec["latency_s"] + (rec.get("copy_latency_s", 0.0) if copy_same_device else 0.0)
            if prof.model_of(matched[ln.a]) == prof.model_of(matched[ln.b]):
                lat += alternation_excess(prof, graph, prof.model_of(matched[ln.a]))
            bw = rec.get("copy_bandwidth_Bps", math.inf) if copy_same_device else REFERENCE_BANDWIDTH_BPS
        else:
            lat, bw = rec["latency_s"], rec.get("bandwidth_Bps", math.inf)
        bw = bw if math.isfinite(bw) else REFERENCE_BANDWIDTH_BPS
        new_links.append(ln.model_copy(update={"latency_s": float(lat), "bandwidth_Bps": float(bw)}))
        changed[f"{ln.a}-{ln.b}"] = {"latency_s": float(lat), "bandwidth_Bps": float(bw)}
    data = spec.model_dump(mode="python")
    data["devices"] = [devices[d.id].model_dump(mode="python") for d in spec.devices]
    data["links"] = [ln.model_dump(mode="python") for ln in new_links]
    data["name"] = spec.name if spec.name.endswith("-calibrated") else f"{spec.name}-calibrated"
    for k, f in fits.items():
        if f.after is not None:
            log.info("calibrated %s from %s: f_c %.3g, f_m %.3g, L %.3g s; median error %.1f%% -> %.1f%%", k, f.source,
                     f.factor_compute, f.factor_memory, f.launch_overhead_s, 100 * f.before.median,
                     100 * f.after.median)
    return Calibration(parse_spec(data, f"calibrated {spec.name}"), fits, changed)


def write_spec_yaml(cal: Calibration, path: str | os.PathLike, *, profile_path: str = "") -> Path:
    """Write the calibrated spec as YAML, its provenance and fit errors in a header comment.

    The file loads with :func:`partitioner.ir.spec.load_spec`.
    """
    spec = cal.spec
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    head = [f"# Calibrated by `partitioner calibrate` on {when} from profile {profile_path or '(in memory)'}.",
            "# efficiency / launch_overhead_s of calibrated devices are least-squares fits (log time) to measured",
            "# per-op medians on this machine; a peak or bandwidth above the original spec's was scaled by a fitted",
            "# factor > 1. Other numbers are the original spec's (see its sources)."]
    for k, f in cal.fits.items():
        if f.after is not None:
            head.append(f"# {k} <- {f.source}: f_c={f.factor_compute:.4g} f_m={f.factor_memory:.4g} "
                        f"L={f.launch_overhead_s:.3g}s; rel. error median {100 * f.before.median:.1f}% -> "
                        f"{100 * f.after.median:.1f}%, p90 {100 * f.before.p90:.1f}% -> {100 * f.after.p90:.1f}% "
                        f"(n={f.after.n})")
        else:
            head.append(f"# {k}: factors taken {f.source} (no measurement of its own)")
    for k, v in cal.links.items():
        head.append(f"# link {k}: latency {v['latency_s']:.3g} s, bandwidth {v['bandwidth_Bps']:.3g} B/s (measured)")
    data = spec.model_dump(mode="json", exclude_none=True)
    text = "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


def _rel(pred: float | None, meas: float) -> float:
    return (pred - meas) / meas if pred is not None and meas > 0 and math.isfinite(pred) else math.nan


def fidelity_report(schedule, runs: list, *, problem=None, loads: list[float] | None = None,
                    run_overhead_s: float = 0.0, contention: dict[str, float] | None = None) -> dict[str, Any]:
    """Predicted vs measured figures of an emitted plan run on the local runtime.

    Parameters
    ----------
    schedule : Schedule
        Of the artifact that ran (its ``meta`` holds the evaluator's predicted latency and
        period; its segments their predicted compute times).
    runs : list of RunStats
        Measured runs (:class:`partitioner.runtime.local.RunStats`), warm-up excluded.
    problem : Problem, optional
        The problem the plan was made for (transfer times of :func:`predict_schedule`).
    loads : list of float, optional
        The 1-minute load average around the runs.
    run_overhead_s : float
        The runtime's per-run overhead, for the schedule's prediction (:func:`predict_schedule`).
    contention : dict, optional
        Co-run slowdown per device, for the schedule's prediction (:func:`predict_schedule`).

    Returns
    -------
    dict
        ``latency``: ``predicted_s`` (the evaluator's, plan), ``predicted_schedule_s``
        (:func:`predict_schedule`), ``measured_median_s``, ``measured_s`` (every run),
        ``rel_error`` and ``rel_error_schedule`` ((predicted - measured) / measured);
        ``throughput``: one sample at a time, as the runtime runs (1 / latency), predicted
        and measured, and the plan's pipelined ``predicted_pipelined_per_s`` (1 / period);
        ``devices``: per device predicted and measured (median) busy time and error.
    """
    if not runs:
        raise CostModelError("no measured run to compare with", hint="run the plan at least once")
    walls = [float(r.wall_s) for r in runs]
    med = float(np.median(walls))
    pred = schedule.meta.get("predicted_latency_s")
    sched = predict_schedule(schedule, problem, run_overhead_s=run_overhead_s, contention=contention)["latency_s"]
    busy_pred: dict[str, float] = {}
    for s in schedule.segments:
        c = s.predicted_compute_s
        busy_pred[s.device] = busy_pred.get(s.device, 0.0) + (float(c) if math.isfinite(c) else 0.0)
    devices = {}
    for d in schedule.devices:
        if d not in busy_pred:
            continue
        meas = float(np.median([r.busy_s().get(d, 0.0) for r in runs]))
        devices[d] = {"predicted_busy_s": busy_pred[d], "measured_busy_s": meas, "rel_error": _rel(busy_pred[d], meas)}
    period = schedule.meta.get("predicted_period_s")
    out = {"latency": {"predicted_s": pred, "predicted_schedule_s": sched, "measured_median_s": med,
                       "measured_s": walls, "rel_error": _rel(pred, med), "rel_error_schedule": _rel(sched, med)},
           "throughput": {"predicted_per_s": 1.0 / pred if pred else math.nan, "measured_per_s": 1.0 / med,
                          "rel_error": _rel(1.0 / pred if pred else None, 1.0 / med),
                          "predicted_pipelined_per_s": 1.0 / period if period else math.nan},
           "devices": devices, "runs": len(runs)}
    if loads:
        out["load1"] = {"median": float(np.median(loads)), "min": float(min(loads)), "max": float(max(loads))}
    return out
