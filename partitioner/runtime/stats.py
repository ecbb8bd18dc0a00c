"""Measured times of a run of an emitted plan: per action, per device, end to end, and of a
stream of samples (what :class:`partitioner.runtime.local.LocalRuntime`, the ONNX Runtime
executor and the fidelity report use)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..ir.schedule import Schedule


@dataclass(frozen=True)
class ActionTime:
    """Measured wall-clock interval of one action (seconds from the run's start)."""

    device: str
    index: int
    op: str
    name: str
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class RunStats:
    """Measured times of one run."""

    wall_s: float
    actions: list[ActionTime] = field(default_factory=list)

    def busy_s(self) -> dict[str, float]:
        """Total compute time per spec device."""
        out: dict[str, float] = {}
        for a in self.actions:
            if a.op == "compute":
                out[a.device] = out.get(a.device, 0.0) + a.duration_s
        return out

    def fidelity(self, schedule: Schedule) -> list[dict[str, Any]]:
        """Per segment: predicted and measured compute time and finish."""
        measured = {a.name: a for a in self.actions if a.op == "compute"}
        rows = []
        for s in schedule.segments:
            m = measured.get(s.id)
            rows.append({"segment": s.id, "device": s.device, "nodes": len(s.nodes),
                         "predicted_compute_s": s.predicted_compute_s, "predicted_end_s": s.predicted_end_s,
                         "measured_compute_s": m.duration_s if m else math.nan,
                         "measured_end_s": m.end_s if m else math.nan})
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "busy_s": self.busy_s(),
                "actions": [{"device": a.device, "index": a.index, "op": a.op, "name": a.name,
                             "start_s": a.start_s, "end_s": a.end_s} for a in self.actions]}


@dataclass
class StreamStats:
    """Measured throughput of a stream of samples (see :meth:`LocalRuntime.stream`).

    Attributes
    ----------
    samples : int
    wall_s : float
        From submitting the first sample to the last one's outputs.
    starts_s, ends_s : list of float
        Per sample: its first action's start and its last action's end (from the stream's start).
    predicted_samples_per_s : float
        ``1 / meta["predicted_period_s"]`` of the schedule (summed over replicas); NaN when unknown.
    actions : list of list of ActionTime
        Per sample, every action's interval (from the stream's start; one runtime only).
    """

    samples: int
    wall_s: float
    starts_s: list[float]
    ends_s: list[float]
    predicted_samples_per_s: float = math.nan
    actions: list[list[ActionTime]] = field(default_factory=list, repr=False)

    @property
    def samples_per_s(self) -> float:
        """Samples over the whole wall time (pipeline fill and drain included)."""
        return self.samples / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def steady_samples_per_s(self) -> float:
        """Rate between the first and the last completion (excludes the pipeline fill)."""
        if self.samples < 2:
            return self.samples_per_s
        span = max(self.ends_s) - min(self.ends_s)
        return (self.samples - 1) / span if span > 0 else math.nan

    @property
    def latencies_s(self) -> list[float]:
        return [e - s for s, e in zip(self.starts_s, self.ends_s)]

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "wall_s": self.wall_s, "samples_per_s": self.samples_per_s,
                "steady_samples_per_s": self.steady_samples_per_s,
                "predicted_samples_per_s": self.predicted_samples_per_s,
                "starts_s": self.starts_s, "ends_s": self.ends_s}


def _predicted_rate(schedule: Schedule) -> float:
    p = schedule.meta.get("predicted_period_s")
    return 1.0 / p if isinstance(p, (int, float)) and p > 0 and math.isfinite(p) else math.nan
