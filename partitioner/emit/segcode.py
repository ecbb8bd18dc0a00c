"""Segments as code: an fx GraphModule <-> a standalone ``module.py`` + ``weights.safetensors``.

:meth:`torch.fx.GraphModule.to_folder` pickles every child module it cannot write as a
constructor call (anything but Linear/Conv/BatchNorm), loads them with
``weights_only=False`` and hard-codes the absolute folder path. This module writes a
folder that loads in a fresh process without the model's source and without pickle:

``module.py``
    ``class Segment(torch.nn.Module)`` whose ``__init__`` builds every child on the
    ``meta`` device from its constructor call (``torch.nn.Conv2d(3, 64, kernel_size=...)``)
    and declares every tensor attribute with its shape and dtype, and whose ``forward`` is
    the fx code of the segment. It imports only torch and the standard library.
``weights.safetensors``
    Every parameter and buffer (persistent or not), loaded with
    :func:`safetensors.torch.load_file` and assigned in place of the meta tensors. Tensors
    that share storage are stored once; the aliases are listed in the file's metadata.

A child module is written as a constructor call only when it is a leaf ``torch.nn``
module whose ``extra_repr()`` is a valid argument list that rebuilds it exactly (same
attributes, same tensor names, shapes, no hooks). A segment with any other module (an
``nn.MultiheadAttention`` leaf, say) or with a function from outside torch and the
standard library is first exported with :func:`torch.export.export` (an ATen-level graph
of ``get_attr`` and ``call_function`` nodes only), and that graph is written instead
(format ``"aten"``). Loading executes ``module.py``: an artifact is code, load only
artifacts you trust (its files carry sha256 checksums in ``schedule.json``).
"""

from __future__ import annotations

import builtins
import importlib
import json
import keyword
import logging
import re
import types
from pathlib import Path

import torch
import torch.fx
from torch import nn

from ..errors import ArtifactError

log = logging.getLogger(__name__)

__all__ = ["NotPortable", "write_segment", "load_segment", "portable_source", "export_flat", "instantiate"]

MODULE_FILE = "module.py"
WEIGHTS_FILE = "weights.safetensors"
CLASS_NAME = "Segment"
_SAFE_MODULES = ("torch", "operator", "_operator", "math", "builtins", "typing", "collections", "functools",
                 "itertools", "numbers")
_SKIP_ATTRS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
               "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
               "_is_full_backward_hook", "call_super_init", "_compiled_call_impl"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class NotPortable(Exception):
    """A segment cannot be written as fx code (the reason names the module or function)."""


# ---- writing -----------------------------------------------------------------------------
def _ident(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "attr"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = "_" + base
    out, k = base, 1
    while out in taken:
        out, k = f"{base}_{k}", k + 1
    taken.add(out)
    return out


def _ctor_source(m: nn.Module) -> str:
    """Constructor call that rebuilds ``m`` exactly, or raise :class:`NotPortable`."""
    cls = type(m)
    qual = f"{cls.__module__}.{cls.__name__}"
    if not cls.__module__.startswith("torch.nn.") or getattr(nn, cls.__name__, None) is not cls:
        raise NotPortable(f"module {qual} is not a public torch.nn class")
    if any(True for _ in m.children()):
        raise NotPortable(f"module {qual} has child modules")
    if any(getattr(m, h, None) for h in _HOOKS):
        raise NotPortable(f"module {qual} has hooks")
    src = f"torch.nn.{cls.__name__}({m.extra_repr()})"
    try:
        with torch.device("meta"):
            rebuilt = eval(src, {"torch": torch, "inf": float("inf"), "nan": float("nan")})  # noqa: S307
    except Exception as err:  # noqa: BLE001 - any failure means "not rebuildable"
        raise NotPortable(f"module {qual}: {src} does not rebuild it ({type(err).__name__}: {err})") from None
    mine = {k: v for k, v in vars(m).items() if k not in _SKIP_ATTRS}
    theirs = {k: v for k, v in vars(rebuilt).items() if k not in _SKIP_ATTRS}
    try:
        same = mine.keys() == theirs.keys() and all(_same(mine[k], theirs[k]) for k in mine)
    except Exception:  # noqa: BLE001
        same = False
    if not same:
        raise NotPortable(f"module {qual}: {src} rebuilds it with other attributes")
    for kind in ("_parameters", "_buffers"):
        a, b = getattr(m, kind), getattr(rebuilt, kind)
        if a.keys() != b.keys() or any((a[k] is None) != (b[k] is None) or
                                       (a[k] is not None and tuple(a[k].shape) != tuple(b[k].shape))
                                       for k in a):
            raise NotPortable(f"module {qual}: {src} rebuilds it with other tensors")
    if m._non_persistent_buffers_set != rebuilt._non_persistent_buffers_set:
        raise NotPortable(f"module {qual}: other non-persistent buffers")
    return src


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


def _flatten(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """Copy ``gm`` so that every call_module/get_attr target is a top-level attribute.

    Returns the new module and ``{flat name: constructor source}`` for its children.
    """
    root = nn.Module()
    root.training = gm.training
    graph = torch.fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    taken = {"self", "torch", "forward", "training"} | set(dir(nn.Module))
    by_target: dict[str, str] = {}
    ctors: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        if node.target in by_target:
            node.target = by_target[node.target]
            continue
        obj = gm.get_submodule(node.target) if node.op == "call_module" else _get_attr(gm, node.target)
        flat = _ident(str(node.target), taken)
        if isinstance(obj, nn.Module):
            ctors[flat] = _ctor_source(obj)
            root.add_module(flat, obj)
        elif isinstance(obj, nn.Parameter):
            root.register_parameter(flat, obj)
        elif isinstance(obj, torch.Tensor):
            if obj.is_sparse or obj.is_quantized or type(obj) is not torch.Tensor:
                raise NotPortable(f"attribute {node.target!r} is a {type(obj).__name__} ({obj.layout})")
            root.register_buffer(flat, obj)
        else:
            raise NotPortable(f"attribute {node.target!r} is a {type(obj).__name__}, not a tensor or module")
        by_target[node.target] = flat
        node.target = flat
    flat_gm = torch.fx.GraphModule(root, graph, class_name=CLASS_NAME)
    flat_gm.training = gm.training
    return flat_gm, ctors


def _get_attr(mod: nn.Module, target: str):
    obj = mod
    for atom in str(target).split("."):
        obj = getattr(obj, atom)
    return obj


def _imports(globals_: dict) -> list[str]:
    from torch.fx.graph import _custom_builtins

    lines = ["import torch"]
    for name, obj in sorted(globals_.items()):
        if name == "torch":
            continue
        if name in _custom_builtins:
            lines.append(_custom_builtins[name].import_str)
        elif isinstance(obj, (str, int, float, bool, type(None))):
            lines.append(f"{name} = {obj!r}")
        elif isinstance(obj, types.ModuleType):
            if not obj.__name__.split(".")[0] in _SAFE_MODULES:
                raise NotPortable(f"the code uses module {obj.__name__}")
            lines.append(f"import {obj.__name__} as {name}" if obj.__name__ != name else f"import {name}")
        else:
            lines.append(_import_object(name, obj))
    return lines


def _import_object(name: str, obj) -> str:
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if mod is None or qual is None or "<" in qual:
        raise NotPortable(f"the code uses {obj!r}, which has no importable name")
    if mod.split(".")[0] not in _SAFE_MODULES:
        raise NotPortable(f"the code uses {mod}.{qual}, from outside torch and the standard library")
    try:
        found = importlib.import_module(mod)
        for atom in qual.split("."):
            found = getattr(found, atom)
    except (ImportError, AttributeError):
        found = None
    if found is not obj:
        raise NotPortable(f"the code uses {mod}.{qual}, which does not import as itself")
    if mod == "builtins" and getattr(builtins, name, None) is obj:
        return f"# {name}: builtin"
    return f"from {mod} import {qual.split('.')[0]} as _{name}_root\n{name} = _{name}_root" + \
        "".join(f".{a}" for a in qual.split(".")[1:])


def portable_source(gm: torch.fx.GraphModule, header: str = "") -> tuple[str, dict[str, torch.Tensor], dict]:
    """Write ``gm`` as a standalone module.

    Returns
    -------
    source : str
        The text of ``module.py`` (class :data:`CLASS_NAME`).
    tensors : dict of str to Tensor
        Every parameter and buffer by its dotted name in the class.
    info : dict
        ``params`` (names that are Parameters, with ``requires_grad``).

    Raises
    ------
    NotPortable
        A child module cannot be rebuilt from a constructor call, or the code uses an
        object from outside torch and the standard library.
    """
    flat, ctors = _flatten(gm)
    code = flat.graph.python_code(root_module="self")
    imports = _imports(code.globals)
    tab = " " * 4
    lines = [f'"""{header}"""' if header else '"""Generated by partitioner.emit.build."""', "", *imports, "", "",
             f"class {CLASS_NAME}(torch.nn.Module):",
             f"{tab}def __init__(self):",
             f"{tab * 2}super().__init__()",
             f"{tab * 2}with torch.device('meta'):"]
    body = []
    for name, src in ctors.items():
        body.append(f"self.{name} = {src}")
        body.append(f"self.{name}.train({getattr(flat, name).training})")
    for name, p in flat._parameters.items():
        body.append(f"self.{name} = torch.nn.Parameter(torch.empty({list(p.shape)}, dtype={p.dtype}), "
                    f"requires_grad={p.requires_grad})")
    for name, b in flat._buffers.items():
        persistent = name not in flat._non_persistent_buffers_set
        body.append(f"self.register_buffer({name!r}, torch.empty({list(b.shape)}, dtype={b.dtype}), "
                    f"persistent={persistent})")
    lines += [tab * 3 + b for b in body] or [tab * 3 + "pass"]
    lines.append(f"{tab * 2}self.training = {flat.training}")
    fwd = code.src.strip("\n")
    lines += ["", *[(tab + ln) if ln.strip() else "" for ln in fwd.splitlines()], ""]
    tensors: dict[str, torch.Tensor] = {}
    params: dict[str, bool] = {}
    for n, p in flat.named_parameters(remove_duplicate=False):
        tensors[n] = p
        params[n] = bool(p.requires_grad)
    for n, b in flat.named_buffers(remove_duplicate=False):
        tensors[n] = b
    return "\n".join(lines), tensors, {"params": params}


def export_flat(gm: nn.Module, args: tuple) -> torch.fx.GraphModule:
    """Export ``gm`` (with ``torch.export``) to an ATen GraphModule taking the flat
    ``args`` and returning a flat tuple (requires tensor inputs and outputs)."""
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise NotPortable("torch.export fallback needs tensor inputs")
    try:
        ep = torch.export.export(gm, tuple(args), strict=False)
    except Exception as err:  # noqa: BLE001
        raise NotPortable(f"torch.export failed: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    out = ep.module()
    for n in list(out.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            out.graph.erase_node(n)
    info = getattr(out.graph._codegen, "pytree_info", None)
    out.graph._codegen = torch.fx.graph.CodeGen()
    node = next(n for n in out.graph.nodes if n.op == "output")
    res = node.args[0]
    if info is not None and info.out_spec is not None:  # re-nest outputs (tuples, None) as the segment returns them
        import torch.utils._pytree as pytree

        res = pytree.tree_unflatten(list(res) if isinstance(res, (list, tuple)) else [res], info.out_spec)
    node.args = (tuple(res) if isinstance(res, (list, tuple)) else (res,),)
    out.recompile()
    return out


# ---- files -------------------------------------------------------------------------------
def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each storage-identical tensor once: (unique tensors, alias -> canonical)."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        t = t.detach()
        key = None
        if t.numel() and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.to("cpu").contiguous()
    # safetensors refuses tensors that share memory: copy any remaining overlaps
    ptrs: set[int] = set()
    for name, t in unique.items():
        if t.numel():
            p = t.untyped_storage().data_ptr()
            if p in ptrs:
                unique[name] = t.clone()
            ptrs.add(p)
    return unique, aliases


def write_segment(folder: Path, source: str, tensors: dict[str, torch.Tensor], info: dict) -> list[Path]:
    """Write ``module.py`` and ``weights.safetensors`` into ``folder``; return the paths."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    unique, aliases = _dedupe(tensors)
    meta = {"partitioner": json.dumps({"aliases": aliases, "params": info.get("params", {})})}
    (folder / MODULE_FILE).write_text(source)
    save_file(unique, str(folder / WEIGHTS_FILE), metadata=meta)
    return [folder / MODULE_FILE, folder / WEIGHTS_FILE]


def instantiate(source: str, tensors: dict[str, torch.Tensor], params: dict[str, bool] | None = None,
                name: str = "segment", filename: str | None = None) -> nn.Module:
    """Execute ``source`` in a fresh namespace, build :data:`CLASS_NAME` and assign ``tensors``."""
    mod = types.ModuleType(name)
    mod.__file__ = filename or f"<{name}>"
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - artifact code, see module docstring
    cls = getattr(mod, CLASS_NAME, None)
    if cls is None:
        raise ArtifactError(f"{mod.__file__} defines no class {CLASS_NAME}", hint="emit the plan again")
    module = cls()
    _assign(module, tensors, params or {}, mod.__file__)
    return module


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], params: dict[str, bool], where: str) -> None:
    for name, t in tensors.items():
        owner_path, _, leaf = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_path) if owner_path else module
        except AttributeError:
            raise ArtifactError(f"{where}: weights name {name!r}, which the module does not have",
                                hint="the weights belong to another segment; emit the plan again") from None
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            _check_shape(name, old, t, where)
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=params.get(name, old.requires_grad))
        elif leaf in owner._buffers:
            _check_shape(name, owner._buffers[leaf], t, where)
            owner._buffers[leaf] = t
        else:
            raise ArtifactError(f"{where}: weights name {name!r}, which is no parameter or buffer of the module",
                                hint="the weights belong to another segment; emit the plan again")
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ArtifactError(f"{where}: no weights for {left[:5]}", hint="the weights file is incomplete; emit again")


def _check_shape(name: str, old, new: torch.Tensor, where: str) -> None:
    if old is not None and tuple(old.shape) != tuple(new.shape):
        raise ArtifactError(f"{where}: weight {name!r} has shape {tuple(new.shape)}, the module expects "
                            f"{tuple(old.shape)}", hint="the weights belong to another segment; emit the plan again")


def load_segment(folder: Path, name: str) -> nn.Module:
    """Load a folder written by :func:`write_segment` (weights without pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    src_file, w_file = folder / MODULE_FILE, folder / WEIGHTS_FILE
    for f in (src_file, w_file):
        if not f.is_file():
            raise ArtifactError(f"segment {name!r}: missing file {f}",
                                hint="the artifact is incomplete; copy the whole directory or emit the plan again")
    try:
        tensors = load_file(str(w_file), device="cpu")
        with safe_open(str(w_file), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("partitioner", "{}"))
    except Exception as err:  # noqa: BLE001
        raise ArtifactError(f"segment {name!r}: cannot read {w_file}: {type(err).__name__}: {err}",
                            hint="the weights file is corrupted; emit the plan again") from None
    for alias, canon in meta.get("aliases", {}).items():
        if canon not in tensors:
            raise ArtifactError(f"segment {name!r}: alias {alias!r} of missing tensor {canon!r}",
                                hint="the weights file is corrupted; emit the plan again")
        tensors[alias] = tensors[canon]
    safe = re.sub(r"\W", "_", name)
    modname = f"partitioner_segment_{safe}_{abs(hash(str(folder.resolve())))}"
    try:
        return instantiate(src_file.read_text(), tensors, meta.get("params", {}), modname, str(src_file))
    except ArtifactError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ArtifactError(f"segment {name!r}: {src_file} does not load: {type(err).__name__}: {err}",
                            hint="the code file is corrupted or needs another torch version; emit the plan again"
                            ) from err

