"""What a hand-off between two logical CPUs costs on a model's own segments, run by the runtime.

The profile's same-device link (:func:`partitioner.measure.links.runtime_handoff_latency`)
times one wake-up: a receiver asleep in its recv while the sender computes a small matmul
loop on its own data. A plan pays more at each hand-off than that: the receiver's first ops
read activations that sit in the other core's caches, the runtime's per-action bookkeeping
runs, and short segments run slower than they do inside one long pass. None of this is in
the per-node times (timed inside whole passes on one thread) nor in the wake-up probe, and
on a model of small ops it adds up: on the 2-core VM this project is built on, a 16-segment
BERT plan ran 10-29% slower than its prediction with the wake-up latency alone (earlier
runs of ``bench/fidelity.py``).

:func:`measure_alternation` measures it on the model itself, before any plan is made:
the graph is cut into ``chunks`` contiguous pieces of its topological order (equal
predicted time) that alternate between two logical devices of one local device model,
and this *probe plan* and the whole model on one device are emitted and run by
:class:`~partitioner.runtime.local.LocalRuntime`, in alternating blocks of back-to-back
runs (a block's first run is a warm-up: a deployed plan follows runs of itself). Both are
also predicted with the profile's costs (:func:`partitioner.measure.calibrate.predict_schedule`).
What the probe plan measured beyond its prediction, less what the single-device run
measured beyond its own (the node times' drift, scaled to the probe's length), divided
by the probe plan's transfers, is the *excess per transfer*: stored under
``profile.graphs[name]["alternation"]`` and added to the same-model link's latency when a
spec is calibrated from the profile for that graph (:func:`alternation_excess`,
:func:`partitioner.measure.calibrate.calibrate`), so that planners see what a hand-off costs and
predictions include it. The probe plan is fixed by the graph and the profile, never by
the plan being predicted.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch

from ..errors import PartitionerError
from .devices import LocalDevice, parse_devices
from .profile import Profile
from .timing import least_contended_median, runqueue_wait_s

log = logging.getLogger(__name__)

__all__ = ["measure_alternation", "add_alternation", "alternation_excess"]

#: Runs whose threads waited for a CPU more than this share of their wall time are contended.
CLEAN_WAIT = 0.05


def _pair_spec(device: LocalDevice, latency_s: float):
    """A spec of two logical devices ``a`` and ``b`` of ``device``'s model on one host, joined
    by a link of ``latency_s`` that passes values by reference (as calibrated from a
    same-device transfer record; the roofline figures are placeholders: the profile's times
    replace them)."""
    from ..ir.spec import parse_spec
    from .links import REFERENCE_BANDWIDTH_BPS

    dev = {"host": "node0", "kind": "cpu", "model": device.model, "threads": device.threads or 1,
           "peak_flops": {"fp32": 1.0e11}, "memory": {"capacity_bytes": 1.0e12, "bandwidth_Bps": 1.0e10},
           "efficiency": {"compute": 0.5, "memory": 0.7}, "launch_overhead_s": 5e-6, "unsupported_ops": []}
    data = {"name": f"alternation-probe-{device.model}", "host_device": "a", "comm_blocks_device": True,
            "memory_reserve": 0.0, "devices": [{"id": "a", **dev}, {"id": "b", **dev}],
            "links": [{"a": "a", "b": "b", "bandwidth_Bps": REFERENCE_BANDWIDTH_BPS, "latency_s": latency_s}]}
    return parse_spec(data, "alternation probe")


def _chunks(times: np.ndarray, chunks: int) -> tuple[int, ...]:
    """Device (0/1) of every node: ``chunks`` contiguous pieces of equal total time, alternating."""
    cum = np.cumsum(times)
    total = float(cum[-1]) if len(cum) else 0.0
    if total <= 0:
        piece = np.arange(len(times)) * chunks // max(1, len(times))
    else:
        piece = np.minimum((cum - times / 2) / total * chunks, chunks - 1).astype(int)
    return tuple(int(p % 2) for p in piece)


def measure_alternation(profile: Profile, loaded, device: str | LocalDevice, *, chunks: int = 16, rounds: int = 10,
                        per_block: int = 3, max_s: float = 20.0) -> dict[str, Any] | None:
    """Excess cost per transfer of alternating between two logical ``device``\\ s on ``loaded``'s
    own segments (see the module docstring). ``loaded`` is a
    :class:`~partitioner.api.LoadedModel` whose graph ``profile`` has timed on ``device``.
    ``rounds`` blocks of ``per_block`` timed runs (after one warm-up run) of each variant,
    fewer (at least 3) when the runs pass ``max_s`` seconds.

    ``chunks`` is capped at half the graph's nodes. Returns None when the probe cannot run
    here (not a CPU device, two of it do not fit in this machine's cores, a graph of fewer
    than 4 nodes, or a cut that moves no value).

    Returns
    -------
    dict
        ``device``, ``model``, ``chunks``, ``transfers`` (of the probe plan), ``single_s`` and
        ``alternating_s`` (measured medians), ``predicted_single_s``, ``predicted_alternating_s``,
        ``excess_s`` (total), ``excess_per_transfer_s`` (>= 0), ``runs``, ``clean`` (runs of
        each variant that were not contended), ``load1``.
    """
    from ..emit.build import emit
    from ..grade import grade
    from ..ir.plan import Objective, Plan
    from ..machine.problem import Problem
    from ..machine.replay import predict_schedule
    from ..runtime.local import LocalRuntime
    from .apply import with_profile

    dev = device if isinstance(device, LocalDevice) else parse_devices(device)[0]
    threads = dev.threads or 1
    if dev.kind != "cpu" or 2 * threads > (os.cpu_count() or 1):
        return None
    link = profile.transfer(dev.id, dev.id)
    if link is None:
        return None
    # predict with the wake-up probe's latency alone (never with an earlier run of this probe)
    h = float(link["latency_s"])
    spec = _pair_spec(dev, h)
    measured = with_profile(loaded, spec, profile, device_map={"a": dev.id, "b": dev.id})
    problem = Problem(measured.graph, spec, Objective("latency"))
    times = _node_times(problem)
    chunks = max(2, min(chunks, problem.n // 2))
    if problem.n < 4:
        return None
    alt = grade(problem, Plan(_chunks(times, chunks), status="heuristic", solver="alternation-probe"), model=measured)
    one = grade(problem, Plan((0,) * problem.n, status="heuristic", solver="alternation-probe"), model=measured)
    arts = {"alternating": emit(alt), "single": emit(one)}
    pred = {k: predict_schedule(a.schedule, problem, run_overhead_s=2 * h)["latency_s"] for k, a in arts.items()}
    n_x = sum(1 for t in arts["alternating"].schedule.transfers if t.src != t.dst)
    if n_x == 0:
        return None
    inputs = measured.example_inputs
    walls: dict[str, list[tuple[float, float]]] = {k: [] for k in arts}
    rts = {}
    try:
        with torch.no_grad():
            for k, a in arts.items():
                rts[k] = LocalRuntime(a, threads={"a": threads, "b": threads})
            t_start = time.perf_counter()
            for r in range(rounds):
                if r >= 3 and time.perf_counter() - t_start > max_s:
                    break
                order = list(arts) if r % 2 == 0 else list(arts)[::-1]
                for k in order:
                    for j in range(per_block + 1):
                        w0 = runqueue_wait_s()
                        t0 = time.perf_counter()
                        rts[k].run(*inputs)
                        dt = time.perf_counter() - t0
                        w1 = runqueue_wait_s()
                        if j:  # the block's first run is its warm-up
                            walls[k].append((dt, (w1 - w0) / dt if w0 is not None and w1 is not None else 0.0))
    finally:
        for rt in rts.values():
            rt.close()

    m = {k: least_contended_median(v, CLEAN_WAIT) for k, v in walls.items()}
    drift = (m["single"] - pred["single"]) * (pred["alternating"] / pred["single"]) if pred["single"] > 0 else 0.0
    excess = (m["alternating"] - pred["alternating"]) - drift
    per = max(0.0, excess / n_x)
    rec = {"device": dev.id, "model": dev.model, "chunks": chunks, "transfers": n_x,
           "single_s": m["single"], "alternating_s": m["alternating"],
           "predicted_single_s": pred["single"], "predicted_alternating_s": pred["alternating"],
           "excess_s": excess, "excess_per_transfer_s": per, "link_latency_s": h,
           "runs": len(walls["single"]), "clean": {k: sum(1 for _, f in v if f <= CLEAN_WAIT) for k, v in walls.items()},
           "load1": round(os.getloadavg()[0], 2)}
    log.info("alternation probe on %s (%d chunks, %d transfers): %.2f ms measured vs %.2f ms predicted, single "
             "%.2f vs %.2f ms: %.1f us more per transfer than the %.1f us link", dev.id, chunks, n_x,
             1e3 * m["alternating"], 1e3 * pred["alternating"], 1e3 * m["single"], 1e3 * pred["single"],
             1e6 * per, 1e6 * h)
    return rec


def _node_times(problem) -> np.ndarray:
    """Predicted seconds of every node on device 0 (the cost model's compute time)."""
    t = np.asarray(problem.T[:, 0], dtype=float)
    return np.where(np.isfinite(t), t, 0.0)


def add_alternation(profile: Profile, loaded, devices: str | list, **kw) -> Profile:
    """:func:`measure_alternation` for every CPU device of ``devices`` into
    ``profile.graphs[loaded.graph.name]["alternation"]`` (replacing earlier records of the
    same device model). A probe that fails (the model cannot be emitted or run in pieces)
    is skipped with a warning: the profile stays valid without it."""
    name = loaded.graph.name
    if name not in profile.graphs:
        from ..errors import CostModelError

        raise CostModelError(f"the profile holds no graph {name!r}", hint="profile the graph first (profile_graph)")
    devs = devices if isinstance(devices, list) and all(isinstance(d, LocalDevice) for d in devices) \
        else parse_devices(devices)
    recs = []
    for d in devs:
        if d.kind != "cpu":
            continue
        try:
            r = measure_alternation(profile, loaded, d, **kw)
        except (PartitionerError, RuntimeError) as err:  # an optional refinement: never the end of a profile
            log.warning("hand-off probe on %s skipped: %s", d.id, getattr(err, "message", err))
            continue
        if r:
            recs.append(r)
    models = {r["model"] for r in recs}
    keep = [r for r in profile.graphs[name].get("alternation", []) if r.get("model") not in models]
    profile.graphs[name]["alternation"] = keep + recs
    return profile


def alternation_excess(profile: Profile, graph: str | None, model: str) -> float:
    """Measured excess seconds per transfer between two logical devices of ``model``
    (:func:`measure_alternation`) for ``graph`` when the profile has it, else the median over
    the profile's graphs; 0 when never measured."""
    def of(g):
        return [float(r["excess_per_transfer_s"]) for r in (g or {}).get("alternation", [])
                if r.get("model") == model and math.isfinite(float(r["excess_per_transfer_s"]))]

    own = of(profile.graphs.get(graph)) if graph is not None else []
    if own:
        return own[-1]
    every = [x for g in profile.graphs.values() for x in of(g)]
    return float(np.median(every)) if every else 0.0


def runtime_costs(profile: Profile, spec, matched: dict[str, str], graph: str | None) -> dict[str, Any]:
    """What the profile measured of the local runtime's own costs, for a spec whose devices
    ``matched`` maps to profiled ones: ``run_overhead_s`` (two hand-offs: the runtime wakes its
    workers and is woken by the last; from a same-device transfer record) and
    ``contention`` (spec device id -> co-run slowdown while another matched CPU device
    computes, :func:`partitioner.measure.links.measure_corun`), or empty.

    These are what :func:`partitioner.measure.calibrate.predict_schedule` takes to predict an
    emitted schedule from the profile; compiles store them with the plan
    (``schedule.meta["measured_costs"]``) so that ``partitioner run`` predicts the same way.
    """
    from .links import corun_slowdown

    out: dict[str, Any] = {}
    hand = [rec["latency_s"] for p in sorted(set(matched.values()))
            if (rec := profile.transfer(p, p)) is not None and rec.get("mode") == "reference"]
    if hand:
        out["run_overhead_s"] = 2.0 * float(min(hand))
    cpus = [d for d in spec.device_ids if d in matched and profile.devices.get(matched[d], {}).get("kind") == "cpu"]
    slow: dict[str, float] = {}
    for i, d in enumerate(cpus):
        for e in cpus[i + 1:]:  # (slowdown of d, of e); two devices of one model take a and b in spec order
            f = corun_slowdown(profile, graph, profile.model_of(matched[d]), profile.model_of(matched[e]))
            for x, v in zip((d, e), f or ()):
                if math.isfinite(v):
                    slow[x] = max(slow.get(x, 1.0), float(v))
    if slow:
        out["contention"] = slow
    return out
