"""What every solver accepts: the common settings (seed, time limit, threads, MILP backend, warm start)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Settings:
    """What every solver accepts. ``time_limit`` in seconds (None: no limit)."""

    seed: int = 0
    time_limit: float | None = 60.0
    threads: int = 1
    milp_backend: str = "highs"  # highs | cbc
    warm_start: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.extra.get(key, default)
