"""Hardware specs: the YAML format (pydantic models), loading and validation, the shipped specs.

A spec (format in docs/formats.md) lists devices, each on a host, and undirected links
between them; every pair of devices must be joined by some chain of links. Transfer times
over those links are the machine model's business (:mod:`partitioner.machine.links`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import SpecError

DeviceKind = Literal["cpu", "gpu", "accelerator"]

def _shipped_dir() -> Path:
    # the package partitioner.hw_specs (the repository's hw_specs/, mapped there by pyproject.toml)
    env = os.environ.get("PARTITIONER_SPECS")
    if env:
        return Path(env)
    found = importlib.util.find_spec("partitioner.hw_specs")
    if found is not None and found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent.parent / "hw_specs"  # a source tree on sys.path, not installed


#: Where the shipped specs live; ``PARTITIONER_SPECS`` overrides.
SPEC_DIR = _shipped_dir()


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

    def check_connected(self) -> None:
        """Raise :class:`SpecError` naming two devices that no chain of links joins."""
        ids = self.device_ids
        adj: dict[str, set[str]] = {d: set() for d in ids}
        for ln in self.links:
            adj[ln.a].add(ln.b)
            adj[ln.b].add(ln.a)
        seen, stack = {ids[0]}, [ids[0]]
        while stack:
            for v in adj[stack.pop()] - seen:
                seen.add(v)
                stack.append(v)
        lost = [d for d in ids if d not in seen]
        if lost:
            raise SpecError(f"spec {self.name!r}: no route between devices {ids[0]!r} and {lost[0]!r}",
                            hint="add a link between them, or between their hosts (e.g. a network link)")


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
    spec.check_connected()
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


