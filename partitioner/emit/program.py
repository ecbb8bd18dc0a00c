"""A segment as data: the JSON program of an fx graph, and the allow-lists it is checked against.

A program (``program.json``, format ``partitioner.program/1``) lists a segment's leaf
``torch.nn`` modules as constructor data, its tensors (names, shapes, dtypes; the values are
in ``weights.safetensors``) and its fx nodes in order. :func:`build` rebuilds the graph with
:class:`torch.fx.Graph` without running any Python from the artifact: every
``call_function`` target is resolved by name against a fixed allow-list, every
``call_method`` must be a public tensor method, every module a leaf ``torch.nn`` class
built from literal arguments, and every argument a literal or a reference to an earlier
node; anything else is refused before a node runs. What is allowed and what is excluded on
purpose: docs/trust.md; the format: docs/formats.md.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import json
import keyword
import math
import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import ArtifactError

__all__ = ["FORMAT", "encode", "decode", "function_name", "method_allowed", "attribute_allowed", "leaf_class",
           "build", "NotAllowed", "on_meta"]

FORMAT = "partitioner.program/1"
_OPERATOR = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "invert", "and_", "or_",
             "xor", "lshift", "rshift", "matmul", "lt", "le", "eq", "ne", "gt", "ge", "not_", "truth", "is_", "is_not",
             "contains", "getitem", "setitem", "index", "concat", "iadd", "isub", "imul", "itruediv", "ifloordiv",
             "imod", "ipow", "iand", "ior", "ixor", "ilshift", "irshift", "imatmul", "iconcat")
_BUILTINS = ("getattr", "len", "int", "float", "bool", "abs", "min", "max", "round", "pow", "divmod", "sum", "all",
             "any", "tuple", "list", "slice", "range")
_DENIED = frozenset({"from_file", "from_numpy", "frombuffer", "set_", "_print", "_from_blob", "_unsafe_index",
                     "_unsafe_index_put", "_unsafe_masked_index", "_unsafe_masked_index_put_accumulate",
                     "_nested_view_from_buffer", "_nested_view_from_buffer_copy"})
_DENIED_METHODS = frozenset({"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
                             "retain_grad", "storage", "untyped_storage", "share_memory_", "numpy", "backward",
                             "data_ptr", "const_data_ptr", "set_", "record_stream", "as_subclass", "module_load",
                             "storage_type"})
#: private ATen operators that exported graphs and decompositions use (every other ``aten::_name`` is refused)
_PRIVATE_ATEN = frozenset({"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "_to_copy", "_softmax",
                           "_log_softmax", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                           "_native_batch_norm_legit_functional", "_scaled_dot_product_flash_attention_for_cpu",
                           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                           "_scaled_dot_product_cudnn_attention", "_unsafe_view", "_adaptive_avg_pool2d",
                           "_adaptive_avg_pool3d", "_embedding_bag", "_cdist_forward", "_pdist_forward",
                           "_weight_norm_interface", "_fft_r2c", "_fft_c2r", "_fft_c2c", "_local_scalar_dense",
                           "_convolution"})
#: ATen's bitwise and shift operators, registered under Python's dunder names (``aten::__and__``):
#: ordinary tensor operators despite the underscores (traced Hugging Face masks use them)
_DUNDER_ATEN = frozenset({"__and__", "__or__", "__xor__", "__lshift__", "__rshift__", "__iand__", "__ior__",
                          "__ixor__", "__ilshift__", "__irshift__"})


def _denied(name: str) -> bool:
    """Names excluded wherever they appear: file or raw-memory access, and sparse tensors
    (built without index checks by default, so a later op could write out of bounds)."""
    return name in _DENIED or "sparse" in name
_EXTRA_ATTRS = frozenset({"is_floating_point", "is_complex", "is_signed", "type", "index"})  # of dtypes, devices
_CONTAINERS = frozenset({"Module", "Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict",
                         "Container"})
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_SCALAR_TAGS = ("dtype", "device", "memory_format", "layout")


class NotAllowed(Exception):
    """A graph uses something no program may hold (the reason names it)."""


_INIT_OPS = frozenset({"normal_", "uniform_", "zero_", "fill_", "exponential_", "bernoulli_", "random_", "erfinv_",
                       "mul_", "add_", "sub_", "div_", "clamp_", "copy_", "log_normal_", "cauchy_", "geometric_"})


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Skip the value-only in-place ops of weight initialisation on meta tensors (they have
    no values; on meta, ``normal_`` alone imports torch._dynamo, seconds on first use)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))  # torch.nn.init.* pass tensor=
        name = getattr(func, "__name__", "")
        init = name in _INIT_OPS or (getattr(func, "__module__", "") == "torch.nn.init" and name.endswith("_"))
        if init and isinstance(t, torch.Tensor) and t.is_meta:
            return t
        return func(*args, **kwargs)


def on_meta(cls: type, args: list, kwargs: dict) -> nn.Module:
    """``cls(*args, **kwargs)`` with its tensors on the meta device, without initialising them."""
    with torch.device("meta"), _SkipMetaInit():
        return cls(*args, **kwargs)


# ---- the allow-lists ---------------------------------------------------------------------
@functools.cache
def _functions() -> dict[str, Any]:
    """Allowed call_function targets other than ``torch.ops.aten``, by the name a program uses."""
    import torch.functional as tfunc
    import torch.nn.functional as F

    table: dict[str, Any] = {}
    vf = torch._C._VariableFunctions
    for name in dir(vf):
        if not name.startswith("_") and not _denied(name) and getattr(torch, name, None) is getattr(vf, name):
            table[f"torch.{name}"] = getattr(vf, name)
    for name in tfunc.__all__:
        table.setdefault(f"torch.{name}", getattr(torch, name))
    table["torch._assert"] = torch._assert
    for name in dir(torch._C._nn):
        obj = getattr(torch._C._nn, name)
        if not name.startswith("_") and not _denied(name) and inspect.isbuiltin(obj):
            table[f"torch._C._nn.{name}"] = obj
    for name in dir(F):
        obj = getattr(F, name)
        if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == "torch.nn.functional":
            table[f"torch.nn.functional.{name}"] = obj
    for name in dir(math):
        if not name.startswith("_") and callable(getattr(math, name)):
            table[f"math.{name}"] = getattr(math, name)
    for name in _OPERATOR:
        table[f"operator.{name}"] = getattr(operator, name)
    for name in _BUILTINS:
        table[f"builtins.{name}"] = getattr(builtins, name)
    return table


@functools.cache
def _names_by_id() -> dict[int, str]:
    out: dict[int, str] = {}
    for name, obj in _functions().items():
        out.setdefault(id(obj), name)
    return out


@functools.cache
def _tensor_members() -> tuple[frozenset, frozenset]:
    """(public tensor methods a program may call, attributes ``getattr`` may read)."""
    methods, attrs = set(), set()
    for name in dir(torch.Tensor):
        if name.startswith("_"):
            continue
        (methods if callable(getattr(torch.Tensor, name)) else attrs).add(name)
    methods = {m for m in methods if m not in _DENIED_METHODS and not _denied(m)}
    return frozenset(methods), frozenset((attrs - {"grad_fn", "volatile"}) | _EXTRA_ATTRS)


def method_allowed(name: str) -> bool:
    """Whether ``call_method`` may call ``name`` (a public tensor method, not one that takes
    callables or exposes storage)."""
    return isinstance(name, str) and name.isidentifier() and name in _tensor_members()[0]


def attribute_allowed(name: str) -> bool:
    """Whether ``getattr(x, name)`` may appear in a program (data attributes of tensors,
    dtypes and devices)."""
    return isinstance(name, str) and name in _tensor_members()[1]


def function_name(fn: Any) -> str:
    """The name under which a program stores call_function target ``fn``.

    Raises
    ------
    NotAllowed
        ``fn`` is not on the allow-list.
    """
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        packet = fn.overloadpacket if isinstance(fn, torch._ops.OpOverload) else fn
        ns, _, op = packet._qualified_op_name.partition("::")
        name = f"torch.ops.{ns}.{op}" + (f".{fn._overloadname}" if isinstance(fn, torch._ops.OpOverload) else "")
        if _resolve(name) is not fn:
            raise NotAllowed(f"operator {name} is not allowed (only registered torch.ops.aten operators)")
        return name
    name = _names_by_id().get(id(fn))
    if name is None:
        mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", repr(fn))
        raise NotAllowed(f"function {mod}.{qual} is not on the allow-list")
    return name


def _resolve(name: str) -> Any:
    """The call_function target a program names, or raise :class:`NotAllowed`."""
    if not isinstance(name, str):
        raise NotAllowed(f"function name {name!r} is not a string")
    if name.startswith("torch.ops."):
        parts = name.split(".")
        if len(parts) not in (4, 5) or parts[2] != "aten" or not all(p.isidentifier() for p in parts[3:]):
            raise NotAllowed(f"operator {name!r} is not allowed (only torch.ops.aten.OP[.OVERLOAD])")
        if _denied(parts[3]) or (parts[3].startswith("_") and parts[3] not in _PRIVATE_ATEN | _DUNDER_ATEN):
            raise NotAllowed(f"operator {name!r} is excluded (private, or it reads files or memory unchecked)")
        try:
            obj = getattr(torch.ops.aten, parts[3])
            if len(parts) == 5:
                obj = getattr(obj, parts[4])
        except (AttributeError, RuntimeError):
            raise NotAllowed(f"operator {name!r} is not registered in this torch") from None
        if not isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise NotAllowed(f"{name!r} is not an operator")
        return obj
    obj = _functions().get(name)
    if obj is None:
        raise NotAllowed(f"function {name!r} is not on the allow-list")
    return obj


def leaf_class(name: str) -> type:
    """The ``torch.nn`` leaf module class a program names, or raise :class:`NotAllowed`."""
    cls = getattr(nn, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.modules.")
            and name not in _CONTAINERS):
        raise NotAllowed(f"module class {name!r} is not a public torch.nn leaf module")
    return cls


# ---- values ------------------------------------------------------------------------------
def encode(x: Any, node_name=None) -> Any:
    """JSON form of an fx argument; ``node_name(node)`` names a referenced node.

    Raises
    ------
    NotAllowed
        A value of another type (a tensor, a function, an object).
    """
    if isinstance(x, torch.fx.Node):
        if node_name is None:
            raise NotAllowed("a node reference where only literals are allowed")
        return {"node": node_name(x)}
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"float": repr(x)}
    if isinstance(x, complex):
        return {"complex": [encode(x.real), encode(x.imag)]}
    if isinstance(x, tuple):
        return {"tuple": [encode(v, node_name) for v in x]}
    if isinstance(x, list):
        return [encode(v, node_name) for v in x]
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise NotAllowed("a dict with non-string keys")
        return {"dict": {k: encode(v, node_name) for k, v in x.items()}}
    if isinstance(x, slice):
        return {"slice": [encode(x.start, node_name), encode(x.stop, node_name), encode(x.step, node_name)]}
    if x is Ellipsis:
        return {"ellipsis": None}
    if isinstance(x, torch.dtype):
        return {"dtype": str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"device": str(x)}
    if isinstance(x, torch.memory_format):
        return {"memory_format": str(x).removeprefix("torch.")}
    if isinstance(x, torch.layout):
        return {"layout": str(x).removeprefix("torch.")}
    raise NotAllowed(f"an argument of type {type(x).__name__}")


def decode(j: Any, node=None) -> Any:
    """Inverse of :func:`encode`; ``node(name)`` returns an earlier node. Raises ValueError."""
    if j is None or isinstance(j, (bool, str, int, float)):
        return j
    if isinstance(j, list):
        return [decode(v, node) for v in j]
    if not isinstance(j, dict) or len(j) != 1:
        raise ValueError(f"malformed value {str(j)[:80]}")
    (tag, v), = j.items()
    if tag == "node" and node is not None and isinstance(v, str):
        return node(v)
    if tag == "float" and v in ("inf", "-inf", "nan"):
        return float(v)
    if tag == "complex" and isinstance(v, list) and len(v) == 2:
        return complex(decode(v[0]), decode(v[1]))
    if tag == "tuple" and isinstance(v, list):
        return tuple(decode(x, node) for x in v)
    if tag == "dict" and isinstance(v, dict):
        return {k: decode(x, node) for k, x in v.items()}
    if tag == "slice" and isinstance(v, list) and len(v) == 3:
        return slice(*(decode(x, node) for x in v))
    if tag == "ellipsis" and v is None:
        return Ellipsis
    if tag == "device" and isinstance(v, str):
        return torch.device(v)
    if tag in _SCALAR_TAGS and isinstance(v, str) and v.isidentifier():
        obj = getattr(torch, v, None)
        if isinstance(obj, getattr(torch, tag)):
            return obj
    raise ValueError(f"malformed value {str(j)[:80]}")


# ---- building a segment from its program -------------------------------------------------
def build(prog: Any, tensors: dict[str, torch.Tensor], where: str) -> torch.fx.GraphModule:
    """Rebuild the GraphModule of a program (see the module docstring) with ``tensors``.

    Raises
    ------
    ArtifactError
        The program is malformed or names something outside the allow-lists (checked
        before anything runs), or the tensors do not match it.
    """
    try:
        return _build(prog, tensors)
    except NotAllowed as err:
        raise ArtifactError(f"{where}: refused: {err}", hint="the artifact holds something partitioner never "
                            "writes; emit the plan again from a trusted source") from None
    except ArtifactError as err:
        raise ArtifactError(f"{where}: {err.message}", hint=err.hint) from None
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise ArtifactError(f"{where}: malformed program: {type(err).__name__}: {err}",
                            hint="the file is corrupted or needs another torch version; emit the plan again") from None


def _ident(x: Any, what: str) -> str:
    if not isinstance(x, str) or not x.isidentifier() or keyword.iskeyword(x) or (x.startswith("__") and
                                                                                  x.endswith("__")):
        raise ValueError(f"{what} {str(x)[:60]!r} is not an identifier")
    return x


def _build(prog: Any, tensors: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    if not isinstance(prog, dict) or prog.get("format") != FORMAT:
        raise ValueError(f"format is not {FORMAT}")
    modules, specs, nodes = prog.get("modules"), prog.get("tensors"), prog.get("nodes")
    if not isinstance(modules, dict) or not isinstance(specs, dict) or not isinstance(nodes, list):
        raise ValueError("modules, tensors or nodes missing")
    root = nn.Module()
    requires_grad: dict[str, bool] = {}
    for name, m in modules.items():
        _ident(name, "module name")
        if not isinstance(m, dict) or not isinstance(m.get("args"), list) or not isinstance(m.get("kwargs"), dict):
            raise ValueError(f"module {name}: malformed")
        cls = leaf_class(m.get("class"))
        if "device" in m["kwargs"]:
            raise NotAllowed(f"module {name}: a device argument (modules are built on the meta device)")
        child = on_meta(cls, decode(m["args"]), {_ident(k, "argument"): decode(v) for k, v in m["kwargs"].items()})
        if any(True for _ in child.children()):
            raise NotAllowed(f"module {name} ({cls.__name__}) has child modules")
        child.train(bool(m.get("training", False)))
        root.add_module(name, child)
    with torch.device("meta"):
        for name, s in specs.items():
            if not isinstance(s, dict) or not isinstance(s.get("shape"), list):
                raise ValueError(f"tensor {name}: malformed")
            requires_grad[name] = bool(s.get("requires_grad", False))
            if "." in name:
                continue  # a leaf module's own tensor
            dtype = decode({"dtype": s.get("dtype")})
            empty = torch.empty([int(d) for d in s["shape"]], dtype=dtype)
            if s.get("kind") == "parameter":
                root.register_parameter(_ident(name, "tensor name"), nn.Parameter(empty, requires_grad=False))
            else:
                root.register_buffer(_ident(name, "tensor name"), empty, persistent=bool(s.get("persistent", True)))
    assign(root, tensors, requires_grad, "the weights file")
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}

    def ref(name: str) -> torch.fx.Node:
        if name not in env:
            raise ValueError(f"node {name!r} is used before it is defined")
        return env[name]

    children, attrs = dict(root.named_children()), {*root._parameters, *root._buffers}
    for k, n in enumerate(nodes):
        if not isinstance(n, dict) or n.get("op") not in _OPS:
            raise ValueError(f"node {k}: malformed")
        op, target = n["op"], n.get("target")
        args = decode(n.get("args", {"tuple": []}), ref)
        kwargs = decode(n.get("kwargs", {"dict": {}}), ref)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ValueError(f"node {k}: malformed arguments")
        for key in kwargs:
            _ident(key, "keyword")
        if op == "output":
            if k != len(nodes) - 1 or len(args) != 1 or kwargs:
                raise ValueError("the output node must come last, with one argument")
            graph.output(args[0])
            break
        name = _ident(n.get("name"), "node name")
        if name in env:
            raise ValueError(f"node {name!r} is defined twice")
        if op == "placeholder":
            if args or kwargs:
                raise ValueError(f"placeholder {name} has arguments")
            target = name
        elif op in ("call_module", "get_attr"):
            if target not in (children if op == "call_module" else attrs):
                raise ValueError(f"{op} {str(target)[:60]!r} names no {'module' if op == 'call_module' else 'tensor'}")
        elif op == "call_method":
            if not method_allowed(target):
                raise NotAllowed(f"method {str(target)[:60]!r} is not an allowed tensor method")
        else:
            target = _resolve(target)
            if target is builtins.getattr and (len(args) not in (2, 3) or not attribute_allowed(args[1])):
                raise NotAllowed(f"getattr of {str(args[1:2])[:60]} (only tensor data attributes)")
        env[name] = graph.create_node(op, target, args, kwargs, name=name)
    else:
        raise ValueError("the program has no output node")
    gm = torch.fx.GraphModule(root, graph, class_name="Segment")
    gm.train(bool(prog.get("training", False)))
    for name, m in modules.items():  # GraphModule.train() reset the leaves: restore their own flags
        getattr(gm, name).train(bool(m.get("training", False)))
    return gm


def assign(module: nn.Module, tensors: dict[str, torch.Tensor], requires_grad: dict[str, bool], where: str) -> None:
    """Put ``tensors`` in place of ``module``'s meta parameters and buffers (same names and shapes)."""
    for name, t in tensors.items():
        owner_path, _, leaf = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_path) if owner_path else module
        except AttributeError:
            owner = None
        if owner is not None and leaf in owner._parameters and owner._parameters[leaf] is not None:
            _check_shape(name, owner._parameters[leaf], t, where)
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=requires_grad.get(name, False))
        elif owner is not None and leaf in owner._buffers and owner._buffers[leaf] is not None:
            _check_shape(name, owner._buffers[leaf], t, where)
            owner._buffers[leaf] = t
        else:
            raise ArtifactError(f"{where} holds tensor {name!r}, which is no parameter or buffer of the segment",
                                hint="the weights belong to another segment; emit the plan again")
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ArtifactError(f"{where} has no tensors {left[:5]}", hint="the weights file is incomplete; emit again")


def _check_shape(name: str, old: torch.Tensor, new: torch.Tensor, where: str) -> None:
    if tuple(old.shape) != tuple(new.shape):
        raise ArtifactError(f"{where}: tensor {name!r} has shape {tuple(new.shape)}, the segment expects "
                            f"{tuple(old.shape)}", hint="the weights belong to another segment; emit the plan again")


def dumps(prog: dict) -> str:
    """The text of ``program.json`` (one node per line, so diffs stay readable)."""
    head = {k: v for k, v in prog.items() if k != "nodes"}
    body = ",\n".join(json.dumps(n, allow_nan=False) for n in prog["nodes"])
    return json.dumps(head, allow_nan=False)[:-1] + ', "nodes": [\n' + body + "\n]}\n"
