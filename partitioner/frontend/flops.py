"""The FLOP fallback of :mod:`partitioner.frontend.trace` (moved here unchanged): ATen operators
that ``torch.utils.flop_counter.FlopCounterMode`` has no formula for are priced by a
coarse rule (zero for views and data movement, one per input element for reductions and
pools, ``2 k`` per output element for matmuls, attention from its shapes, five per output
element for norms and activations, else one per output element).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Distinct tensors of a (nested) value, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    seen: set[int] = set()
    out = []
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor) and id(leaf) not in seen:
            seen.add(id(leaf))
            out.append(leaf)
    return out



_ZERO_OPS = frozenset("""
alias asstrided chunk clone constantpadnd contiguous copy detach diagonal dropout embedding empty
emptylike emptystrided expand expandas expandcopy featuredropout alphadropout fill flatten flip
full fulllike gather index indexput indexselect liftfresh liftfreshcopy maskedselect movedim narrow
nativedropout newempty newemptystrided newfull newones newzeros ones oneslike pad permute permutecopy
rand randint randlike randn randnlike randperm reflectionpad1d reflectionpad2d reflectionpad3d
replicationpad1d replicationpad2d replicationpad3d repeat reshape reshapealias resize roll scalartensor
scatter select selectcopy slice slicecopy split splitwithsizes squeeze squeezecopy stack cat t
tocopy transpose transposecopy unbind unflatten unfold unsafeview unsqueeze unsqueezecopy view
viewas viewcopy zero zeros zeroslike arange linspace bernoulli normal uniform exponential
""".split())
_REDUCTION_OPS = frozenset("""
mean nanmean sum nansum prod amax amin max min aminmax argmax argmin std var stdmean varmean norm
linalgvectornorm frobeniusnorm logsumexp all any countnonzero median nanmedian mode cumsum cumprod
""".split())
_MATMUL_OPS = frozenset("dot vdot mv addmv matmul mm bmm addmm baddbmm addbmm linear bilinear outer ger".split())
_NORM_LIKE = ("norm", "softmax", "softmin", "gelu", "silu", "swish", "mish")


def _op_key(name: str) -> str:
    return name.lower().strip("_").replace("_", "")


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _fallback_flops(key: str, args: tuple, kwargs: dict, out: Any) -> float:
    """FLOPs the fallback charges one ATen operator (key: :func:`_op_key` of its name)."""
    if key in _ZERO_OPS:
        return 0.0
    outs = [t for t in _tensor_leaves(out) if _is_float(t)]
    if not outs:
        return 0.0
    ins = _tensor_leaves((args, kwargs))
    if key in _REDUCTION_OPS or "pool" in key:
        return float(ins[0].numel()) if ins else float(outs[0].numel())
    if "scaleddotproduct" in key and "backward" not in key and len(ins) >= 3:
        q, k, v = ins[:3]
        if q.dim() >= 2 and k.dim() >= 2 and v.dim() >= 2:
            batch = q.numel() // max(1, q.shape[-2] * q.shape[-1])
            lq, e, s, ev = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
            return float(2 * batch * lq * s * e + 2 * batch * lq * s * ev)
    if key in _MATMUL_OPS:
        if key in ("outer", "ger"):
            return float(outs[0].numel())
        src = ins[1] if key.startswith("add") and len(ins) > 1 else (ins[0] if ins else None)
        k_len = int(src.shape[-1]) if src is not None and src.dim() >= 1 else 1
        return float(2 * k_len * outs[0].numel())
    if any(s in key for s in _NORM_LIKE):
        return 5.0 * outs[0].numel()
    return float(outs[0].numel())


class _FallbackFlops(TorchDispatchMode):
    """Prices the ATen ops that ``FlopCounterMode`` has no formula for.

    Entered *before* (beneath) ``FlopCounterMode``, so it sees every operator the counter
    executes after the counter's own decompositions.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0.0
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", None)
        if packet is not None and packet not in flop_registry:
            try:
                f = _fallback_flops(_op_key(packet.__name__), args, kwargs, out)
            except Exception:  # noqa: BLE001 - pricing must never break execution
                f = 0.0
            if f:
                self.flops += f
                self.ops.add(packet.__name__)
        return out
