"""Hardware specs: loading, validation and the pairwise link table.

A spec (YAML, schema in DESIGN.md) lists devices, each on a host, and undirected links
between them. :class:`LinkTable` answers ``transfer_time(a, b, bytes)`` for every device
pair: where no direct link exists, the transfer takes the route of least total time for
the bytes moved, store and forward (every hop's ``latency + bytes / bandwidth`` adds up).
The best route depends on the size of the tensor, so for every ordered pair the table
keeps all Pareto-optimal routes in (total latency, total inverse bandwidth) and takes
the minimum over them.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError

DeviceKind = Literal["cpu", "gpu", "accelerator"]

#: Where the shipped specs live (the repository's ``hw_specs/``); ``PARTITIONER_SPECS`` overrides.
SPEC_DIR = Path(os.environ.get("PARTITIONER_SPECS", Path(__file__).resolve().parent.parent / "hw_specs"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite_positive(v: float, what: str) -> float:
    if v is None:
        return v
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {v}")
    return v


class Memory(_Strict):
    capacity_bytes: float
    bandwidth_Bps: float | None = None

    @field_validator("capacity_bytes", "bandwidth_Bps")
    @classmethod
    def _pos(cls, v, info):
        return _finite_positive(v, info.field_name)


class Efficiency(_Strict):
    compute: float = 0.5
    memory: float = 0.7

    @field_validator("compute", "memory")
    @classmethod
    def _frac(cls, v, info):
        if not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"efficiency.{info.field_name} must be in (0, 1], got {v}")
        return v


class Device(_Strict):
    id: str
    host: str
    kind: DeviceKind
    model: str = ""
    peak_flops: dict[str, float] = Field(default_factory=dict)
    memory: Memory
    efficiency: Efficiency = Efficiency()
    launch_overhead_s: float = 0.0
    unsupported_ops: tuple[str, ...] = ()
    threads: int | None = None  # CPU logical devices: intra-op thread budget

    @field_validator("peak_flops")
    @classmethod
    def _peaks(cls, v):
        for k, x in v.items():
            _finite_positive(x, f"peak_flops.{k}")
        return v

    @field_validator("launch_overhead_s")
    @classmethod
    def _overhead(cls, v):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"launch_overhead_s must be a finite number >= 0, got {v}")
        return v

    def peak(self, dtype: str) -> float | None:
        """Peak FLOP/s for a dtype name ("float32" or "fp32"); falls back to fp32."""
        key = _DTYPE_KEYS.get(dtype, dtype)
        return self.peak_flops.get(key) or self.peak_flops.get("fp32")


_DTYPE_KEYS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
               "int8": "int8", "": "fp32"}


class Link(_Strict):
    a: str
    b: str
    bandwidth_Bps: float
    latency_s: float = 0.0

    @field_validator("bandwidth_Bps")
    @classmethod
    def _bw(cls, v):
        return _finite_positive(v, "bandwidth_Bps")

    @field_validator("latency_s")
    @classmethod
    def _lat(cls, v):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"latency_s must be a finite number >= 0, got {v}")
        return v


class Spec(_Strict):
    name: str
    description: str = ""
    host_device: str | None = None
    comm_blocks_device: bool = False
    memory_reserve: float = 0.0
    devices: tuple[Device, ...]
    links: tuple[Link, ...] = ()

    @field_validator("memory_reserve")
    @classmethod
    def _reserve(cls, v):
        if not (0 <= v < 1):
            raise ValueError(f"memory_reserve must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if not self.devices:
            raise ValueError("a spec needs at least one device")
        ids = [d.id for d in self.devices]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate device ids: {dup}")
        known = set(ids)
        seen = set()
        for ln in self.links:
            for end in (ln.a, ln.b):
                if end not in known:
                    raise ValueError(f"link {ln.a}-{ln.b} names unknown device {end!r} (devices: {ids})")
            if ln.a == ln.b:
                raise ValueError(f"link {ln.a}-{ln.b} connects a device to itself")
            key = frozenset((ln.a, ln.b))
            if key in seen:
                raise ValueError(f"link {ln.a}-{ln.b} is listed twice")
            seen.add(key)
        if self.host_device is not None and self.host_device not in known:
            raise ValueError(f"host_device {self.host_device!r} is not a device (devices: {ids})")
        if self.host_device is None and not any(d.kind == "cpu" for d in self.devices):
            raise ValueError("no host_device given and no cpu device to default to")
        return self

    @property
    def host(self) -> str:
        """The device where model inputs come from and outputs go."""
        if self.host_device is not None:
            return self.host_device
        return next(d.id for d in self.devices if d.kind == "cpu")

    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def device(self, device_id: str) -> Device:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise SpecError(f"spec {self.name!r} has no device {device_id!r}",
                        hint=f"devices are: {', '.join(self.device_ids)}")

    @cached_property
    def links_table(self) -> "LinkTable":
        return LinkTable(self)


def _format_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "literal_error" and loc.endswith("kind"):
            msg = f"unknown device kind {e.get('input')!r}; expected cpu, gpu or accelerator"
        elif e["type"] == "extra_forbidden":
            msg = f"unknown key {loc.split('.')[-1]!r}"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_spec(data: dict, source: str = "<spec>") -> Spec:
    """Validate a spec given as a dict; raise :class:`SpecError` naming every problem."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping, got {type(data).__name__}",
                        hint="see the spec format in the README")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"invalid hardware spec {source}: {_format_validation(err)}",
                        hint="fix the spec; the format is documented in the README (Hardware spec YAML)") from None
    except ValueError as err:  # pragma: no cover - pydantic wraps these
        raise SpecError(f"invalid hardware spec {source}: {err}") from None
    spec.links_table  # noqa: B018 - builds routes, raises SpecError for unreachable pairs
    return spec


def list_specs() -> list[str]:
    """Names of the shipped specs."""
    if not SPEC_DIR.is_dir():
        return []
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def spec_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a spec name (shipped) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in str(name_or_path):
        if not p.is_file():
            raise SpecError(f"hardware spec file {str(p)!r} does not exist",
                            hint="give a path to a YAML file or the name of a shipped spec (`partitioner specs`)")
        return p
    cand = SPEC_DIR / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    raise SpecError(f"unknown hardware spec {str(name_or_path)!r}",
                    hint=f"shipped specs: {', '.join(list_specs()) or '(none found)'}; or give a path to a YAML file")


def load_spec(name_or_path: str | os.PathLike) -> Spec:
    """Load and validate a shipped spec by name, or a YAML file by path."""
    path = spec_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}", hint="fix the YAML syntax") from None
    return parse_spec(data, str(path))


@dataclass(frozen=True)
class Route:
    """A chain of links from one device to another (store and forward)."""

    hops: tuple[tuple[int, int], ...]  # (from device index, to device index)
    latency_s: float  # sum of hop latencies
    inv_bw: float  # sum of 1 / bandwidth over hops (seconds per byte)

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes * self.inv_bw


class LinkTable:
    """Pairwise transfer times, routed through intermediate devices where needed.

    Parameters
    ----------
    spec : Spec
        The hardware spec.

    Raises
    ------
    SpecError
        When some pair of devices has no route at all.
    """

    def __init__(self, spec: Spec):
        self.spec = spec
        self.ids = spec.device_ids
        n = len(self.ids)
        idx = {d: i for i, d in enumerate(self.ids)}
        self.index = idx
        adj: list[list[tuple[int, float, float]]] = [[] for _ in range(n)]
        self.hop: dict[tuple[int, int], tuple[float, float]] = {}
        for ln in spec.links:
            a, b = idx[ln.a], idx[ln.b]
            adj[a].append((b, ln.latency_s, 1.0 / ln.bandwidth_Bps))
            adj[b].append((a, ln.latency_s, 1.0 / ln.bandwidth_Bps))
            self.hop[(a, b)] = self.hop[(b, a)] = (ln.latency_s, 1.0 / ln.bandwidth_Bps)
        self.routes: dict[tuple[int, int], list[Route]] = {}
        for s in range(n):
            labels = self._pareto_from(s, adj)
            for t in range(n):
                if t == s:
                    continue
                if not labels[t]:
                    raise SpecError(
                        f"spec {spec.name!r}: no route between devices {self.ids[s]!r} and {self.ids[t]!r}",
                        hint="add a link between them, or between their hosts (e.g. a network link)")
                self.routes[(s, t)] = labels[t]
        rmax = max((len(r) for r in self.routes.values()), default=1)
        self._L = np.full((n, n, rmax), np.inf)
        self._I = np.zeros((n, n, rmax))  # padding: latency inf, inv_bw 0 (no inf * 0)
        for (s, t), rs in self.routes.items():
            for k, r in enumerate(rs):
                self._L[s, t, k] = r.latency_s
                self._I[s, t, k] = r.inv_bw
        for s in range(n):
            self._L[s, s, 0] = 0.0
            self._I[s, s, 0] = 0.0

    @staticmethod
    def _pareto_from(s: int, adj) -> list[list[Route]]:
        """Bi-criteria label setting: all routes from ``s`` not dominated in (latency, inv_bw)."""
        n = len(adj)
        labels: list[list[Route]] = [[] for _ in range(n)]
        heap = [(0.0, 0.0, (), s)]
        while heap:
            lat, inv, hops, u = heapq.heappop(heap)
            if any(r.latency_s <= lat + 1e-18 and r.inv_bw <= inv + 1e-30 for r in labels[u]) and u != s:
                continue
            if u == s and hops:
                continue
            if u != s:
                labels[u].append(Route(hops, lat, inv))
            visited = {h[0] for h in hops} | {u}
            for v, l, i in adj[u]:
                if v in visited:
                    continue
                heapq.heappush(heap, (lat + l, inv + i, hops + ((u, v),), v))
        return labels

    def time_idx(self, a: int, b: int, nbytes: float) -> float:
        """Transfer time between device indices ``a`` and ``b``."""
        if a == b:
            return 0.0
        return min(r.time(nbytes) for r in self.routes[(a, b)])

    def transfer_time(self, a: str, b: str, nbytes: float) -> float:
        """Seconds to move ``nbytes`` from device ``a`` to device ``b`` (0 when ``a == b``)."""
        try:
            return self.time_idx(self.index[a], self.index[b], nbytes)
        except KeyError as err:
            raise SpecError(f"unknown device {err.args[0]!r}", hint=f"devices are: {', '.join(self.ids)}") from None

    def route(self, a: int, b: int, nbytes: float) -> Route | None:
        """The fastest route for ``nbytes`` from ``a`` to ``b`` (None when ``a == b``)."""
        if a == b:
            return None
        return min(self.routes[(a, b)], key=lambda r: (r.time(nbytes), len(r.hops)))

    def matrix(self, nbytes: float) -> np.ndarray:
        """``D x D`` matrix of transfer times for one tensor size (diagonal 0)."""
        return np.min(self._L + nbytes * self._I, axis=2)
