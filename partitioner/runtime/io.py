"""Files of a run: call inputs and outputs (``.pt`` or ``.safetensors``), and ``SPEC_DEVICE=VALUE`` maps.

``.pt``: ``torch.save`` of a tensor or a tuple/list of them (read with ``weights_only=True``).
``.safetensors``: tensors named after the schedule's inputs, or ``input_0``, ``input_1``...
(outputs are written as ``output_0``...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError


def read_inputs(path: Path, input_names: tuple[str, ...] = ()) -> tuple:
    """Read call inputs from a ``.pt`` or ``.safetensors`` file (see the module docstring)."""
    import torch

    if not path.is_file():
        raise UsageError(f"inputs file {str(path)!r} does not exist", hint="pass --inputs FILE (.pt or .safetensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise UsageError(f"{path}: not a readable safetensors file: {err}", hint="write it with "
                             "safetensors.torch.save_file") from None
        if input_names and set(input_names) <= set(data):
            return tuple(data[n] for n in input_names)
        keys = sorted(data, key=lambda k: (len(k), k))
        return tuple(data[k] for k in keys)
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"{path}: cannot read it as torch.save data with weights_only=True: "
                         f"{type(err).__name__}: {str(err).splitlines()[0]}",
                         hint="save a tensor or a tuple of tensors with torch.save") from None
    if isinstance(obj, (tuple, list)):
        return tuple(obj)
    return (obj,)


def write_outputs(path: Path, outputs: Any) -> None:
    """Write outputs to ``.pt`` (the structure as is) or ``.safetensors`` (flat tensors)."""
    import torch
    import torch.utils._pytree as pytree

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
        save_file({f"output_{k}": t.detach().cpu().contiguous() for k, t in enumerate(leaves)}, str(path))
    else:
        torch.save(outputs, path)


def parse_device_map(items: list[str] | None, option: str = "--map", value: str = "TORCH_DEVICE",
                     example: str = "gpu0=cuda:0") -> dict[str, str]:
    """``["gpu0=cuda:0", ...]`` -> ``{"gpu0": "cuda:0"}`` (spec device id -> ``value``); {} when empty."""
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k or not v:
            raise UsageError(f"{option} {it!r} is not SPEC_DEVICE={value}", hint=f"e.g. {option} {example}")
        out[k] = v
    return out
