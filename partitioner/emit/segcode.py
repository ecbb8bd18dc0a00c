"""Segments as data: an fx GraphModule <-> ``program.json`` + ``weights.safetensors`` (+ ``module.py``).

:func:`describe` turns a segment into a program (:mod:`partitioner.emit.program`: its leaf
``torch.nn`` modules as constructor arguments, its tensors, its fx nodes), and
:func:`write_segment` / :func:`load_segment` write and read the folder; weights go through
safetensors (tensors that share storage stored once), and ``module.py`` is the same segment
as readable Python, documentation only, never imported. The folder loads in a fresh process
without the model's source, without pickle and without running Python from the artifact. A
segment with a module that its ``extra_repr()`` cannot rebuild exactly, or a function
outside the allow-list, is stored as its :func:`torch.export.export` ATen graph instead
(format ``"aten"``, :func:`export_flat`).
"""

from __future__ import annotations

import ast
import json
import keyword
import logging
import re
from pathlib import Path

import torch
import torch.fx
from torch import nn

from ..errors import ArtifactError
from . import program

log = logging.getLogger(__name__)

__all__ = ["NotPortable", "describe", "rebuild", "write_segment", "load_segment", "export_flat"]

PROGRAM_FILE = "program.json"
WEIGHTS_FILE = "weights.safetensors"
DOC_FILE = "module.py"
SEGMENT_FILES = (PROGRAM_FILE, WEIGHTS_FILE, DOC_FILE)
_MAX_PROGRAM_BYTES = 256 << 20
_SKIP_ATTRS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
               "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
               "_is_full_backward_hook", "call_super_init", "_compiled_call_impl"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class NotPortable(Exception):
    """A segment cannot be stored as a program (the reason names the module or function)."""


# ---- writing -----------------------------------------------------------------------------
def _ident(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "attr"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = "_" + base
    if base.startswith("__") and base.endswith("__"):
        base = "m" + base
    out, k = base, 1
    while out in taken:
        out, k = f"{base}_{k}", k + 1
    taken.add(out)
    return out


def _literal(node: ast.expr):
    if isinstance(node, ast.Name) and node.id in ("inf", "nan"):
        return float(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch" \
            and isinstance(getattr(torch, node.attr, None), torch.dtype):
        return getattr(torch, node.attr)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Name):
        return -_literal(node.operand)
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    return ast.literal_eval(node)


def _ctor(m: nn.Module) -> dict:
    """Constructor data that rebuilds leaf module ``m`` exactly, or raise :class:`NotPortable`."""
    cls = type(m)
    qual = f"{cls.__module__}.{cls.__name__}"
    try:
        program.leaf_class(cls.__name__)
    except program.NotAllowed:
        raise NotPortable(f"module {qual} is not a public torch.nn leaf class") from None
    if getattr(nn, cls.__name__) is not cls:
        raise NotPortable(f"module {qual} is not a public torch.nn class")
    if any(True for _ in m.children()):
        raise NotPortable(f"module {qual} has child modules")
    if any(getattr(m, h, None) for h in _HOOKS):
        raise NotPortable(f"module {qual} has hooks")
    text = m.extra_repr()
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        args = [_literal(a) for a in call.args]
        kwargs = {k.arg: _literal(k.value) for k in call.keywords}
        if any(k is None for k in kwargs):
            raise ValueError("**kwargs")
        data = {"class": cls.__name__, "args": program.encode(args), "kwargs": program.encode(kwargs)["dict"],
                "training": m.training}
        rebuilt = program.on_meta(cls, args, kwargs)
    except Exception as err:  # noqa: BLE001 - any failure means "not rebuildable"
        raise NotPortable(f"module {qual}: ({text}) does not rebuild it ({type(err).__name__}: {err})") from None
    mine = {k: v for k, v in vars(m).items() if k not in _SKIP_ATTRS}
    theirs = {k: v for k, v in vars(rebuilt).items() if k not in _SKIP_ATTRS}
    try:
        same = mine.keys() == theirs.keys() and all(_same(mine[k], theirs[k]) for k in mine)
    except Exception:  # noqa: BLE001
        same = False
    if not same:
        raise NotPortable(f"module {qual}: ({text}) rebuilds it with other attributes")
    for kind in ("_parameters", "_buffers"):
        a, b = getattr(m, kind), getattr(rebuilt, kind)
        if a.keys() != b.keys() or any((a[k] is None) != (b[k] is None) or
                                       (a[k] is not None and tuple(a[k].shape) != tuple(b[k].shape))
                                       for k in a):
            raise NotPortable(f"module {qual}: ({text}) rebuilds it with other tensors")
    if m._non_persistent_buffers_set != rebuilt._non_persistent_buffers_set:
        raise NotPortable(f"module {qual}: other non-persistent buffers")
    return data


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


def _flatten(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Copy ``gm`` so that every call_module/get_attr target is a top-level attribute."""
    root = nn.Module()
    root.training = gm.training
    graph = torch.fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    taken = {"self", "torch", "forward", "training"} | set(dir(nn.Module))
    by_target: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        if node.target in by_target:
            node.target = by_target[node.target]
            continue
        obj = gm.get_submodule(node.target) if node.op == "call_module" else _get_attr(gm, node.target)
        flat = _ident(str(node.target), taken)
        if isinstance(obj, nn.Module):
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
    flat_gm = torch.fx.GraphModule(root, graph, class_name="Segment")
    flat_gm.training = gm.training
    return flat_gm


def _get_attr(mod: nn.Module, target: str):
    obj = mod
    for atom in str(target).split("."):
        obj = getattr(obj, atom)
    return obj


def _node(n: torch.fx.Node) -> dict:
    name = lambda x: x.name  # noqa: E731
    out: dict = {"op": n.op, "name": n.name}
    if n.op == "placeholder":
        if n.args:
            raise NotPortable(f"input {n.name!r} has a default value")
        return out
    if n.op == "output":
        return {"op": "output", "args": program.encode(tuple(n.args), name)}
    if n.op == "call_function":
        try:
            out["target"] = program.function_name(n.target)
        except program.NotAllowed as why:
            raise NotPortable(str(why)) from None
        if n.target is getattr and not (len(n.args) >= 2 and program.attribute_allowed(n.args[1])):
            raise NotPortable(f"getattr of {n.args[1:2]} (only tensor data attributes)")
    elif n.op == "call_method":
        if not program.method_allowed(n.target):
            raise NotPortable(f"method {n.target!r} is not an allowed tensor method")
        out["target"] = n.target
    else:
        out["target"] = n.target
    try:
        out["args"] = program.encode(tuple(n.args), name)
        out["kwargs"] = program.encode(dict(n.kwargs), name)
    except program.NotAllowed as why:
        raise NotPortable(f"node {n.name}: {why}") from None
    return out


def describe(gm: torch.fx.GraphModule, header: str = "") -> tuple[dict, dict[str, torch.Tensor], str]:
    """Store ``gm`` as data.

    Returns
    -------
    prog : dict
        The program (:mod:`partitioner.emit.program`), JSON-ready.
    tensors : dict of str to Tensor
        Every parameter and buffer by its dotted name in the program.
    doc : str
        The readable ``module.py`` (documentation only).

    Raises
    ------
    NotPortable
        A child module cannot be rebuilt from literal constructor arguments, or the graph
        uses a function, method or value outside the allow-lists.
    """
    flat = _flatten(gm)
    modules = {name: _ctor(m) for name, m in flat.named_children()}
    nodes = [_node(n) for n in flat.graph.nodes]
    specs: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for n, p in flat.named_parameters(remove_duplicate=False):
        tensors[n] = p
        specs[n] = {"kind": "parameter", "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                    "requires_grad": bool(p.requires_grad)}
    for n, b in flat.named_buffers(remove_duplicate=False):
        tensors[n] = b
        owner, _, leaf = n.rpartition(".")
        persistent = leaf not in (flat.get_submodule(owner) if owner else flat)._non_persistent_buffers_set
        specs[n] = {"kind": "buffer", "shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch."),
                    "persistent": persistent}
    prog = {"format": program.FORMAT, "training": bool(flat.training), "modules": modules, "tensors": specs,
            "nodes": nodes}
    return prog, tensors, _doc(flat, modules, header)


def _doc(flat: torch.fx.GraphModule, modules: dict, header: str) -> str:
    lines = [f'"""{header}', "", "Documentation only: partitioner never imports or executes this file; it loads",
             f'{PROGRAM_FILE} (checked against an allow-list) and {WEIGHTS_FILE}."""', "", "import torch", "",
             "", "class Segment(torch.nn.Module):", "    # children, built on the meta device; weights from "
             f"{WEIGHTS_FILE}"]
    for name, m in modules.items():
        args = [repr(a) for a in program.decode(m["args"])] + \
            [f"{k}={program.decode(v)!r}" for k, v in m["kwargs"].items()]
        lines.append(f"    # self.{name} = torch.nn.{m['class']}({', '.join(args)})")
    lines += ["", *[("    " + ln) if ln.strip() else "" for ln in flat.code.strip("\n").splitlines()], ""]
    return "\n".join(lines)


def rebuild(prog: dict, tensors: dict[str, torch.Tensor], where: str = "segment") -> torch.fx.GraphModule:
    """Build the module a stored program describes, exactly as loading does (the program
    goes through its JSON text first)."""
    return program.build(json.loads(program.dumps(prog)), dict(tensors), where)


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


def write_segment(folder: Path, prog: dict, tensors: dict[str, torch.Tensor], doc: str) -> list[Path]:
    """Write ``program.json``, ``weights.safetensors`` and ``module.py`` into ``folder``; return the paths."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    unique, aliases = _dedupe(tensors)
    (folder / PROGRAM_FILE).write_text(program.dumps(dict(prog, aliases=aliases)))
    save_file(unique, str(folder / WEIGHTS_FILE))
    (folder / DOC_FILE).write_text(doc)
    return [folder / f for f in SEGMENT_FILES]


def load_segment(folder: Path, name: str) -> torch.fx.GraphModule:
    """Load a folder written by :func:`write_segment`: the program is checked against the
    allow-lists before anything runs; ``module.py`` is not read."""
    from safetensors.torch import load_file

    where = f"segment {name!r}"
    p_file, w_file = folder / PROGRAM_FILE, folder / WEIGHTS_FILE
    for f in (p_file, w_file):
        if not f.is_file():
            raise ArtifactError(f"{where}: missing file {f}",
                                hint="the artifact is incomplete; copy the whole directory or emit the plan again")
    try:
        if p_file.stat().st_size > _MAX_PROGRAM_BYTES:
            raise ValueError(f"larger than {_MAX_PROGRAM_BYTES >> 20} MiB")
        prog = json.loads(p_file.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ArtifactError(f"{where}: {p_file} is not a valid program: {type(err).__name__}: {err}",
                            hint="the file is corrupted, or was written by an older partitioner; emit the plan "
                                 "again") from None
    try:
        tensors = load_file(str(w_file), device="cpu")
    except Exception as err:  # noqa: BLE001
        raise ArtifactError(f"{where}: cannot read {w_file}: {type(err).__name__}: {err}",
                            hint="the weights file is corrupted; emit the plan again") from None
    aliases = prog.pop("aliases", {}) if isinstance(prog, dict) else {}
    if not isinstance(aliases, dict):
        raise ArtifactError(f"{where}: malformed aliases in {p_file}", hint="emit the plan again")
    for alias, canon in aliases.items():
        if canon not in tensors:
            raise ArtifactError(f"{where}: alias {alias!r} of missing tensor {canon!r}",
                                hint="the weights file is corrupted; emit the plan again")
        tensors[alias] = tensors[canon]
    return program.build(prog, tensors, where)
