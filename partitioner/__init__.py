"""partitioner: a heterogeneous DNN partitioning compiler.

Trace a model, price every operator on every device of a hardware spec, place and order
the operators with an exact or heuristic solver graded against a proven lower bound,
and emit per-device subgraphs that run.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    # keep `import partitioner` light: the API (and torch) load on first use
    if name == "compile":  # the nn.Module drop-in
        from .dropin import compile

        return compile
    if name in ("compile_plan", "compare"):
        from . import api

        return getattr(api, name)
    if name == "load_artifact":
        from .emit.artifact import load_artifact

        return load_artifact
    raise AttributeError(name)
