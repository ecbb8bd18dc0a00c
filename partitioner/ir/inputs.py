"""Call inputs of an emitted plan: keyword inputs put at their parameter's place, and the
check that a plan specialised to its example shapes is called with those shapes, and
:func:`bind_inputs` (call arguments -> the schedule's input values). ``meta["input_names"]`` of the schedule names
the model's parameters, one per input; this module does not import torch.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArtifactError

__all__ = ["with_keywords", "check_shapes", "bind_inputs"]


def with_keywords(schedule: Any, args: tuple, kwargs: dict) -> tuple:
    """Positional inputs with the keyword ones put at their parameter's place; a gap before
    the last input given takes the input's default (``meta["input_defaults"]``).

    Raises
    ------
    ArtifactError
        An unknown keyword, an input given twice, or a missing input without a default.
    """
    names = list(schedule.meta.get("input_names") or schedule.inputs)
    defaults = schedule.meta.get("input_defaults", {})
    slots = dict(enumerate(args))
    for k, v in kwargs.items():
        if k not in names:
            raise ArtifactError(f"the model has no input {k!r} (inputs: {', '.join(names)})",
                                hint="pass the same inputs as the example inputs the plan was compiled with")
        if names.index(k) in slots:
            raise ArtifactError(f"input {k!r} given twice", hint="pass it positionally or by keyword")
        slots[names.index(k)] = v
    out = []
    for i in range(max(slots) + 1):
        if i not in slots and schedule.inputs[i] not in defaults:
            raise ArtifactError(f"input {names[i]!r} is missing (inputs: {', '.join(names)})",
                                hint="pass the same inputs as the example inputs the plan was compiled with")
        out.append(slots[i] if i in slots else defaults[schedule.inputs[i]])
    return tuple(out)


def check_shapes(schedule: Any, env: dict[str, Any]) -> None:
    """Raise :class:`ArtifactError` naming every input whose shape differs from the shape
    the plan was compiled for (``schedule.values[input].shapes``)."""
    bad = []
    for n in schedule.inputs:
        v, want = env.get(n), schedule.values[n].shapes if n in schedule.values else ()
        if hasattr(v, "shape") and hasattr(v, "dtype") and len(want) == 1 and tuple(v.shape) != tuple(want[0]):
            bad.append(f"{n}: {tuple(v.shape)} (compiled for {tuple(want[0])})")
    if bad:
        raise ArtifactError(f"this plan was compiled for other input shapes ({schedule.meta.get('frontend')} "
                            f"graphs are specialised to the example shapes): {'; '.join(bad)}",
                            hint="compile again with example inputs of these shapes; a module from "
                            "partitioner.compile(...) re-plans by itself for new shapes")


def bind_inputs(schedule: Any, args: tuple, kwargs: dict | None = None) -> dict[str, Any]:
    """Map call arguments (positional, and keyword ones by the model's parameter names) to
    the schedule's input values (flattening them if required).

    Raises
    ------
    ArtifactError
        Too many, unknown or missing inputs; or, for a graph specialised to its example
        shapes (``meta["shape_specialised"]``: the export and dynamo frontends), inputs of
        other shapes (see :mod:`partitioner.ir.inputs`).
    """
    if kwargs:
        args = with_keywords(schedule, tuple(args), kwargs)
    if schedule.flatten_inputs:
        import torch.utils._pytree as pytree

        flat = pytree.tree_leaves(list(args))
    else:
        flat = list(args)
    names = schedule.inputs
    defaults = schedule.meta.get("input_defaults", {})
    if len(flat) > len(names) or any(n not in defaults for n in names[len(flat):]):
        raise ArtifactError(f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(flat)}",
                            hint="pass the same inputs as the example inputs the plan was compiled with")
    env = dict(zip(names, flat))
    for n in names[len(flat):]:
        env[n] = defaults[n]
    if schedule.meta.get("shape_specialised"):
        check_shapes(schedule, env)
    return env
