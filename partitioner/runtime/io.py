"""Files of a run: call inputs and outputs (``.pt`` or ``.safetensors``), and ``SPEC_DEVICE=VALUE`` maps.

``.pt``: ``torch.save`` of a tensor or a tuple/list of them (read with ``weights_only=True``);
outputs are written as plain containers (a model's output class, e.g. a Hugging Face
``ModelOutput``, as a dict; a named tuple as a tuple), so that ``torch.load(path,
weights_only=True)`` reads them back without the code that made them.
``.safetensors``: tensors named after the schedule's inputs, or ``input_0``, ``input_1``...
(outputs are written as ``output_0``...).
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """Write outputs to ``.pt`` (as :func:`plain` containers) or ``.safetensors`` (flat tensors)."""
    import torch
    import torch.utils._pytree as pytree

    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"output_{k}": t.detach().cpu().contiguous() for k, t in enumerate(leaves)}, str(path))
    else:
        data = plain(outputs)  # may refuse: before anything is written
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)


def plain(obj: Any) -> Any:
    """``obj`` with every container made a dict, list or tuple and every tensor detached:
    what ``torch.load(..., weights_only=True)`` reads back. Objects that torch's pytree can
    flatten (e.g. a model's cache) become the list of their leaves; anything else is an
    error naming its type."""
    import torch
    import torch.utils._pytree as pytree

    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if obj is None or isinstance(obj, (bool, int, float, complex, str, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [plain(v) for v in obj] if isinstance(obj, list) else tuple(plain(v) for v in obj)
    leaves, _ = pytree.tree_flatten(obj)
    if leaves != [obj]:
        return [plain(v) for v in leaves]
    raise UsageError(f"the model's outputs hold a {type(obj).__qualname__}, which cannot be written to a .pt "
                     "file readable with weights_only=True", hint="write tensors only: pass --out FILE.safetensors")


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
