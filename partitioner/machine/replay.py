"""Replay of an emitted schedule under the cost model: what the runtime should measure.

The evaluator (:mod:`.evaluate`) times a *plan*, node by node; the runtime executes the
*schedule*, segment by segment. :func:`predict_schedule` replays the schedule's actions with
the predicted times, the transfer rule of :mod:`.links` (through ``problem.comm``), and the
measured overheads a profile provides (run overhead, co-run contention).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import CostModelError


# ---- fidelity ------------------------------------------------------------------------------
def predict_schedule(schedule, problem=None, *, run_overhead_s: float = 0.0,
                     contention: dict[str, float] | None = None) -> dict[str, Any]:
    """Latency of an emitted :class:`~partitioner.ir.schedule.Schedule` under the cost model.

    The evaluator times the *plan* (a value leaves as soon as its node finishes); the
    runtime executes the *schedule*, where a segment's outputs are sent only when the whole
    segment has finished and a segment starts only when all its inputs are there. This
    replays the schedule's actions with the predicted times: a compute lasts the
    segment's ``predicted_compute_s``; a send is posted at the sender's current time and
    arrives after the transfer time (``problem.comm(src, dst, bytes)`` when ``problem`` is
    given, with ``comm_blocks_device`` the sender is busy for that time too; else the
    transfer's own predicted duration); a recv waits for the arrival. The latency is the
    time the last device finishes (what the runtime's wall time measures).

    ``run_overhead_s`` is added once: the runtime's cost of starting its worker threads
    on a run and collecting them (two thread hand-offs, ``2 * latency_s`` of a profile's
    same-device transfer record).

    ``contention`` (spec device id -> factor >= 1, e.g. from
    :func:`partitioner.measure.links.measure_corun`) models devices that share a
    machine's cores, caches and memory bandwidth: while two or more of the listed devices
    compute at the same time, each of them progresses at ``1 / factor`` of its speed
    (devices not listed are never slowed, and never slow the others). Without it the
    replay is the plain one above.

    Returns
    -------
    dict
        ``latency_s``, ``device_end_s`` per device and ``overlap_s`` (time during which two
        or more contending devices computed at once).
    """
    idx = {d: i for i, d in enumerate(problem.devices)} if problem is not None else {}
    segs = {s.id: s for s in schedule.segments}
    xfer = {t.tag: t for t in schedule.transfers}
    devs = list(schedule.devices)
    slow = {d: max(1.0, float(f)) for d, f in (contention or {}).items() if d in devs and math.isfinite(f)}
    blocks = bool(problem is not None and problem.spec.comm_blocks_device)

    def duration(t) -> float:
        if problem is not None:
            return float(problem.comm(idx[t.src], idx[t.dst], t.bytes))
        dt = t.predicted_arrival_s - t.predicted_start_s
        return float(dt) if math.isfinite(dt) and dt > 0 else 0.0

    pos = {d: 0 for d in devs}
    clock = {d: 0.0 for d in devs}
    # what a device does now: ("compute", remaining alone-seconds) or ("busy", until) or None
    doing: dict[str, tuple[str, float] | None] = {d: None for d in devs}
    arrival: dict[int, float] = {}
    now, overlap = 0.0, 0.0
    while True:
        # start every action that can start at `now`
        progressed = True
        while progressed:
            progressed = False
            for d in devs:
                acts = schedule.actions.get(d, ())
                while doing[d] is None and pos[d] < len(acts):
                    a = acts[pos[d]]
                    if a.op != "recv" or (a.tag in arrival and arrival[a.tag] <= now):
                        clock[d] = max(clock[d], now)
                    if a.op == "compute":
                        c = segs[a.segment].predicted_compute_s
                        c = float(c) if math.isfinite(c) else 0.0
                        pos[d] += 1
                        if c > 0:
                            doing[d] = ("compute", c)
                        progressed = True
                    elif a.op == "send":
                        dt = duration(xfer[a.tag])
                        arrival[a.tag] = now + dt
                        pos[d] += 1
                        if blocks and dt > 0:
                            doing[d] = ("busy", now + dt)
                        progressed = True
                    else:
                        if a.tag not in arrival or arrival[a.tag] > now:
                            break
                        pos[d] += 1
                        progressed = True
        computing = [d for d in devs if doing[d] is not None and doing[d][0] == "compute"]
        contended = [d for d in computing if d in slow]
        crowded = len(contended) >= 2
        rate = {d: (1.0 / slow[d] if crowded and d in slow else 1.0) for d in computing}
        events = [now + doing[d][1] / rate[d] for d in computing]
        events += [doing[d][1] for d in devs if doing[d] is not None and doing[d][0] == "busy"]
        for d in devs:
            acts = schedule.actions.get(d, ())
            if doing[d] is None and pos[d] < len(acts) and acts[pos[d]].op == "recv":
                t = arrival.get(acts[pos[d]].tag)
                if t is not None:
                    events.append(t)
        if not events:
            break
        nxt = max(now, min(events))
        dt = nxt - now
        if crowded:
            overlap += dt
        for d in computing:
            finish = now + doing[d][1] / rate[d]
            if finish <= nxt + 1e-12 * max(1.0, finish):
                doing[d], clock[d] = None, nxt
            else:
                doing[d] = ("compute", doing[d][1] - dt * rate[d])
        for d in devs:
            if doing[d] is not None and doing[d][0] == "busy" and doing[d][1] <= nxt:
                doing[d] = None
                clock[d] = nxt
        now = nxt
    stuck = [d for d in devs if pos[d] < len(schedule.actions.get(d, ()))]
    if stuck:
        raise CostModelError(f"the schedule deadlocks on {stuck}", hint="emit the plan again")
    return {"latency_s": max(clock.values()) + float(run_overhead_s), "device_end_s": dict(clock),
            "overlap_s": overlap}
