"""The project's error hierarchy.

Every error names the stage, the node, device or constraint at fault, and carries a
``hint`` that says how to fix it. The CLI prints ``str(err)`` and exits with code 2.
"""

from __future__ import annotations


class PartitionerError(Exception):
    """Base of every error partitioner raises; ``hint`` says how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f"\nHint: {self.hint}" if self.hint else "")


class TraceError(PartitionerError):
    """The model could not be traced to a graph."""


class GraphError(PartitionerError):
    """A cost graph is malformed (unknown ids, cycles, bad numbers)."""


class SpecError(PartitionerError):
    """A hardware spec is invalid (unknown device kind, missing link, bad numbers)."""


class CostModelError(PartitionerError):
    """The cost model cannot price a node on a device."""


class InfeasibleError(PartitionerError):
    """No plan satisfies the constraints (support, memory, floors and ceilings)."""


class SolverError(PartitionerError):
    """A solver failed or returned figures the evaluator does not confirm."""


class NoSolutionError(SolverError):
    """A solver stopped (time limit, or a conservative model that rejects every plan tried)
    with no feasible plan, and without proving that none exists: status "no_solution"."""


class PlanError(PartitionerError):
    """A plan is malformed (unplaced nodes, unknown devices, bad order)."""


class ArtifactError(PartitionerError):
    """An emitted artifact is missing, corrupted or inconsistent."""


class RuntimeFailure(PartitionerError):
    """Executing a plan failed (a worker died, a peer timed out)."""


class UsageError(PartitionerError):
    """A command-line argument is invalid."""
