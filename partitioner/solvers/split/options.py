"""The options of the ``split`` solver (``--option split.KEY=VALUE``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass(frozen=True)
class SplitOptions:
    """Options of ``split`` (see :mod:`partitioner.solvers.split.solver` for the steps they tune).

    Attributes
    ----------
    module_size : int or None
        Most nodes in a module (None: 24, or 16 above 4 devices).
    module_solver : {"cpsat", "milp"}
        Exact solver of the module and window subproblems.
    module_det_time : float
        CP-SAT deterministic time per module or window solve.
    module_time : float
        Seconds per MILP module solve (``module_solver="milp"``; not reproducible when it stops).
    module_pass_nodes : int
        Latency: DiviML's module pass runs up to this many nodes.
    windows : int or None
        Latency: exact window re-solves along the critical path (None: 4 for 40 < n <= 500, else 0).
    window_size : int
        Nodes per window.
    effort : float
        Scales the default local-search budget.
    search_work : float or None
        Local-search budget in work units (None: effort * (1000 n + 500,000), about 1 s at 1,000 nodes).
    restarts : int or None
        Starts of the iterated local search, up to 500 nodes (None: 3); above 500 nodes the best start only.
    replicate : bool
        Throughput: search data-parallel replicas over device groups (2 to 6 devices).
    baselines : list of str or None
        Solvers whose plans are starting plans (None: heft, peft, greedy, first-fit, balanced, pipeline-dp, metis; for throughput also single).
    exact_nodes : int
        Graphs up to this many nodes end with a whole-problem CP-SAT solve.
    exact_det_time : float
        CP-SAT deterministic time of that final solve (about 0.2 s).
    tie_tolerance : float
        Ties go to the simpler plan: a relative value growth that still counts as equal when transfers drop.
    handoff_allowance_s : float
        Seconds of value a simpler plan may add per transfer it removes (a hand-off's cost beyond the model).
    multilevel : bool
        Add the multilevel start: coarsen to ml_nodes clusters, solve them with split, expand.
    ml_nodes : int
        Clusters of the multilevel start's coarse graph.
    ml_margin : float
        Share of each capacity the coarse problem leaves free (activations inside clusters).
    """

    solver: ClassVar[str] = "split"

    module_size: int | None = None
    module_solver: Literal["cpsat", "milp"] = "cpsat"
    module_det_time: float = 0.01
    module_time: float = 0.5
    module_pass_nodes: int = 200
    windows: int | None = None
    window_size: int = 16
    effort: float = 1.0
    search_work: float | None = None
    restarts: int | None = None
    replicate: bool = True
    baselines: tuple[str, ...] | None = None
    exact_nodes: int = 60
    exact_det_time: float = 0.05
    tie_tolerance: float = 1e-4
    handoff_allowance_s: float = 0.0
    multilevel: bool = False
    ml_nodes: int = 48
    ml_margin: float = 0.1
