"""Predicted vs measured figures of a plan run by ``partitioner run``: a summary and a table.

``partitioner run DIR`` measures each action of the emitted schedule
(:class:`partitioner.runtime.local.RunStats`); :func:`fidelity_summary` compares those
runs with what the cost model predicted for the plan (through
:func:`partitioner.measure.calibrate.fidelity_report`): end-to-end latency (the evaluator's plan
latency, and the replay of the emitted schedule, :func:`partitioner.measure.calibrate.predict_schedule`),
one-at-a-time throughput, and every device's busy time (the sum of its compute actions),
each with the relative error ``(predicted - measured) / measured``.
:func:`fidelity_table` renders it with rich. Meaningful for plans made from measured costs
(``compile --profile``); :func:`from_profile` tells whether a schedule's plan was.

Wiring in ``partitioner/cli_run.py`` (``run``), keeping every run's stats::

    runs = []                                   # in the loop: runs.append(st)
    from .fidelity import fidelity_summary, fidelity_table, from_profile
    if from_profile(s): console.print(fidelity_table(s, runs))   # and summary["fidelity"] = fidelity_summary(s, runs)
"""

from __future__ import annotations

import math
from typing import Any

from .calibrate import fidelity_report

__all__ = ["as_runs", "from_profile", "fidelity_summary", "fidelity_table"]


class _Stats:
    """A measured run read back from ``--stats`` JSON (``wall_s``, ``busy_s``)."""

    def __init__(self, data: dict):
        self.wall_s = float(data["wall_s"])
        busy: dict[str, float] = {}
        for a in data.get("actions", []):
            if a.get("op") == "compute":
                busy[a["device"]] = busy.get(a["device"], 0.0) + float(a["end_s"]) - float(a["start_s"])
        self._busy = busy if data.get("actions") else dict(data.get("busy_s", {}))

    def busy_s(self) -> dict[str, float]:
        return dict(self._busy)


def as_runs(stats: Any) -> list:
    """A list of runs from a :class:`RunStats`, a list of them, or ``--stats`` JSON dicts."""
    items = stats if isinstance(stats, (list, tuple)) else [stats]
    return [_Stats(x) if isinstance(x, dict) else x for x in items]


def from_profile(schedule) -> bool:
    """Whether the schedule's plan was made from measured costs (``compile --profile``):
    the schedule's meta says so, or its spec is a calibrated one."""
    meta = getattr(schedule, "meta", {}) or {}
    return bool(meta.get("measured_costs")) or str(meta.get("spec", "")).endswith("-calibrated")


def fidelity_summary(schedule, stats: Any, *, problem=None, loads: list[float] | None = None,
                     run_overhead_s: float | None = None, contention: dict[str, float] | None = None) -> dict[str, Any]:
    """Predicted vs measured latency, throughput and per-device busy time of measured runs.

    Parameters
    ----------
    schedule : Schedule
        The artifact's schedule (its meta and segments carry the predictions).
    stats : RunStats, list of RunStats, or dict(s) as written by ``partitioner run --stats``
        Measured runs (medians are taken over them).
    problem, loads, run_overhead_s, contention
        As for :func:`partitioner.measure.calibrate.fidelity_report`. ``run_overhead_s`` and
        ``contention`` default to what the profile measured of the runtime when the plan was
        made from one (``schedule.meta["measured_costs"]["runtime"]``), else none.

    Returns
    -------
    dict
        :func:`partitioner.measure.calibrate.fidelity_report`'s figures plus ``from_profile``.
    """
    rt = ((getattr(schedule, "meta", {}) or {}).get("measured_costs") or {}).get("runtime") or {}
    if run_overhead_s is None:
        run_overhead_s = float(rt.get("run_overhead_s", 0.0))
    if contention is None:
        contention = rt.get("contention")
    rep = fidelity_report(schedule, as_runs(stats), problem=problem, loads=loads, run_overhead_s=run_overhead_s,
                          contention=contention)
    rep["from_profile"] = from_profile(schedule)
    return rep


def _pct(x: float | None) -> str:
    return f"{100 * x:+.1f}%" if x is not None and math.isfinite(x) else "-"


def _t(x: float | None) -> str:
    from ..report.render import fmt_time

    return "n/a" if x is None or not math.isfinite(x) else fmt_time(x)


def fidelity_table(schedule, stats: Any = None, *, summary: dict | None = None, **kw):
    """A rich Table of :func:`fidelity_summary` (pass ``summary`` to reuse one).

    Rows: each device's busy time, end-to-end latency (plan and schedule predictions),
    throughput; columns: predicted, measured (median), relative error.
    """
    from rich.table import Table

    rep = summary if summary is not None else fidelity_summary(schedule, stats, **kw)
    lat, thr = rep["latency"], rep["throughput"]
    src = "measured costs" if rep.get("from_profile") else "roofline costs"
    t = Table(title=f"predicted vs measured ({src}; median of {rep['runs']} run{'s' if rep['runs'] != 1 else ''})")
    for col in ("figure", "predicted", "measured", "error"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for d, v in rep["devices"].items():
        t.add_row(f"{d} busy", _t(v["predicted_busy_s"]), _t(v["measured_busy_s"]), _pct(v["rel_error"]))
    t.add_row("latency (plan)", _t(lat["predicted_s"]), _t(lat["measured_median_s"]), _pct(lat["rel_error"]))
    t.add_row("latency (schedule)", _t(lat["predicted_schedule_s"]), _t(lat["measured_median_s"]),
              _pct(lat["rel_error_schedule"]))
    pt, mt = thr["predicted_per_s"], thr["measured_per_s"]
    t.add_row("throughput, 1 at a time", f"{pt:.3g}/s" if math.isfinite(pt) else "n/a", f"{mt:.3g}/s",
              _pct(thr["rel_error"]))
    return t
