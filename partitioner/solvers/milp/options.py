"""The options of the ``milp`` solvers (``--option milp.KEY=VALUE``; ``milp-cbc`` and
``milp-highs`` share them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class MilpOptions:
    """Options of ``milp``, ``milp-cbc`` and ``milp-highs`` (the backend is the common
    setting ``milp_backend``, ``--backend``).

    Attributes
    ----------
    nogood_rounds : int
        Latency: re-solves with a no-good cut when the relaxed model's plan fails the memory check.
    replicate : bool
        Throughput: enumerate device groups for data-parallel replicas.
    max_replica_devices : int
        Throughput: enumerate groups up to this many devices; above it, one replica on all devices.
    """

    solver: ClassVar[str] = "milp"

    nogood_rounds: int = 8
    replicate: bool = True
    max_replica_devices: int = 6
