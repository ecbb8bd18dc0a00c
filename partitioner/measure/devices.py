"""The local devices that nodes are timed on: ``"cpu:1t,cpu:2t,cuda:0"`` parsed into :class:`LocalDevice`."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError

log = logging.getLogger(__name__)


_DEVICE_HINT = "use cpu, cpu:Nt (a logical CPU with N intra-op threads, e.g. cpu:1t), cuda or cuda:K"


# ---- devices -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalDevice:
    """A device of this machine that nodes are timed on."""

    id: str  # "cpu:2t", "cuda:0"
    kind: str  # "cpu" | "gpu"
    model: str  # "cpu-2t", "cuda-nvidia-h100-80gb-hbm3": the key of times in a profile
    torch_device: str  # "cpu", "cuda:0"
    threads: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "torch_device": self.torch_device, "threads": self.threads}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_devices(devices: str | list[str]) -> list[LocalDevice]:
    """Parse ``"cpu:1t,cpu:2t,cuda:0"`` (or a list of such strings) into local devices.

    Raises
    ------
    UsageError
        An unknown device string, a bad thread count, a duplicate, or CUDA that is not there.
    """
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    items = [s.strip() for s in items if s and s.strip()]
    if not items:
        raise UsageError("no device to profile on", hint=_DEVICE_HINT)
    out: list[LocalDevice] = []
    for s in items:
        low = s.lower()
        m_cpu = re.fullmatch(r"cpu(?::(\d+)t?)?", low)
        m_gpu = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", low)
        if m_cpu:
            n = int(m_cpu.group(1)) if m_cpu.group(1) else torch.get_num_threads()
            if n < 1:
                raise UsageError(f"device {s!r}: a logical CPU needs at least 1 thread", hint=_DEVICE_HINT)
            if n > (os.cpu_count() or 1):
                log.warning("device %s asks for %d threads but this machine has %s cores: timings will be "
                            "oversubscribed", s, n, os.cpu_count())
            dev = LocalDevice(f"cpu:{n}t", "cpu", f"cpu-{n}t", "cpu", n)
        elif m_gpu:
            k = int(m_gpu.group(1) or 0)
            if not torch.cuda.is_available():
                raise UsageError(f"device {s!r}: CUDA is not available on this machine",
                                 hint="profile on cpu devices only, or run on a machine with a GPU")
            if k >= torch.cuda.device_count():
                raise UsageError(f"device {s!r}: only {torch.cuda.device_count()} CUDA device(s) exist",
                                 hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
            dev = LocalDevice(f"cuda:{k}", "gpu", "cuda-" + _slug(torch.cuda.get_device_name(k)), f"cuda:{k}")
        else:
            raise UsageError(f"unknown device {s!r}", hint=_DEVICE_HINT)
        if any(d.id == dev.id for d in out):
            raise UsageError(f"device {dev.id!r} is listed twice", hint="list each device once")
        out.append(dev)
    return out
