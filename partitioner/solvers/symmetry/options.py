"""The options of the ``symmetry`` solver (``--option symmetry.KEY=VALUE``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class SymmetryOptions:
    """Options of ``symmetry`` (see :mod:`partitioner.solvers.symmetry.solver` for the steps they tune).

    Attributes
    ----------
    fallback : str
        Solver of the full problem when symmetry does not hold.
    replicate : bool
        Throughput: split the devices into data-parallel replicas.
    groups : bool
        Latency: group stages (a pattern of blocks placed at operator level on several devices).
    pattern_blocks : list of int
        Blocks per group-stage pattern.
    pattern_memory : list of int
        Divisors f: also solve each pattern for ceil(L / (p f)) repetitions (memory-limited groups).
    pattern_solvers : list of str
        Solvers that place a group-stage pattern.
    max_group : int
        Most devices in a group stage.
    main_ratio : float
        Main device classes: a block takes at most this many times the fastest class's time.
    cut_factor : float
        A cut inside a block is kept when the tensors crossing it weigh at most this many times a block boundary's.
    max_positions : int or None
        Cap on DP positions, blocks times segments per block (None: 4 per block, 480 for throughput without the polish).
    max_lattice : int
        Give up (fall back) above this many lattice points of device-class counts.
    per_first_class : bool
        Price shared tensors per first class (False: the largest).
    polish : bool
        Polish the DP's plans on the full problem (False: the best expanded DP plan).
    polish_work : float or None
        Polish budget in work units (None: 10 per node for latency, 150 for throughput, plus 5,000).
    """

    solver: ClassVar[str] = "symmetry"

    fallback: str = "heft"
    replicate: bool = True
    groups: bool = True
    pattern_blocks: tuple[int, ...] = (1,)
    pattern_memory: tuple[int, ...] = ()
    pattern_solvers: tuple[str, ...] = ("heft", "peft")
    max_group: int = 8
    main_ratio: float = 2.0
    cut_factor: float = 8.0
    max_positions: int | None = None
    max_lattice: int = 20000
    per_first_class: bool = False
    polish: bool = True
    polish_work: float | None = None
