"""The options of the ``cpsat`` solver (``--option cpsat.KEY=VALUE``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class CpsatOptions:
    """Options of ``cpsat`` (see "Settings" in :mod:`partitioner.solvers.cpsat.solver`).

    Attributes
    ----------
    deterministic : bool
        Reproducible: one interleaved worker, stopped by CP-SAT's deterministic clock. False:
        a parallel portfolio of ``threads`` workers on the wall clock (faster, not reproducible).
    det_ratio : float
        Deterministic time limit per second of ``time_limit``. CP-SAT's work clock ran at
        0.03-0.2 units per wall second in our measurements, so this clock usually stops the
        search first.
    deterministic_time : float or None
        The deterministic time limit itself, in CP-SAT units (None: ``det_ratio * time_limit``).
    log : bool
        Print CP-SAT's search log.
    """

    solver: ClassVar[str] = "cpsat"

    deterministic: bool = True
    det_ratio: float = 0.05
    deterministic_time: float | None = None
    log: bool = False
