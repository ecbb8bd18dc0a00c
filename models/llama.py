"""A Llama-style decoder (Touvron et al. 2023) written at operator level.

Every step is a separate operator in the traced graph: RMSNorm (``pow``, ``mean``,
``add``, ``rsqrt``, ``mul``, ``mul`` by the weight), the q/k/v ``Linear`` projections,
rotary position embedding (``x * cos + rotate_half(x) * sin``, with ``rotate_half`` as
``chunk`` / ``neg`` / ``cat``), grouped-query attention (k/v heads repeated with
``repeat_interleave``), ``matmul``, scale, additive causal mask, ``softmax``,
``matmul``, merge heads, output ``Linear``, residual ``add``; then the SwiGLU MLP
(``silu(gate(x)) * up(x)`` then ``down``) and its residual ``add``. The final RMSNorm
and an untied ``lm_head`` give the logits.

Positions come from the token ids by tensor operators (``ones_like(ids).cumsum(1) - 1``),
so the traced graph has no Python-level size queries; the rotary tables are gathered
with ``embedding`` and the causal mask is built once per forward from the positions.

KV cache
--------
``kv_cache_tokens = L > 0`` models a decoding step with ``L`` cached tokens per sequence:
every attention layer holds buffers ``k_cache`` and ``v_cache`` of shape
``(batch, kv_heads, L, head_dim)`` and attends over the ``L`` cached plus the ``seq`` new
tokens (``cat`` along the sequence; the mask is padded on the left with ``L`` zero
columns; the new tokens take positions ``L .. L+seq-1``). The tracer charges a buffer's
bytes as ``param_bytes`` of the ``get_attr`` node that reads it (one per layer and per
k/v), so the cost graph records the cache as parameter-like bytes resident on the device
that runs that layer, and attention FLOPs include the cached tokens. (The evaluator also
counts the ``get_attr`` output as live from that node to the ``cat``, which over-counts
by at most one layer's cache per device.)

Large configurations
--------------------
Configurations above ``META_PARAMS`` parameters (everything from ``llama-1b`` up) are
built on the ``meta`` device by default: no weights are allocated and the example inputs
are meta tensors, so tracing only propagates shapes. :func:`cost_graph` traces such a
model into a :class:`~partitioner.ir.graph.CostGraph` (see there for the meta-tensor
parameter accounting it corrects).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import DEFAULT_SEED, generator, seeded

__all__ = ["LlamaConfig", "CONFIGS", "META_PARAMS", "RMSNorm", "LlamaAttention", "LlamaMLP", "LlamaLayer",
           "LlamaModel", "llama", "cost_graph", "causal_mask", "param_count"]

#: Configurations with more parameters than this are built on the meta device by default.
META_PARAMS = 600_000_000


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-style decoder.

    Parameters
    ----------
    vocab : int
        Vocabulary size (embedding rows and logits).
    dim : int
        Model width; must be divisible by ``heads``.
    layers : int
        Number of decoder layers.
    heads : int
        Query heads per layer.
    kv_heads : int
        Key/value heads (grouped-query attention); must divide ``heads``.
    ffn : int
        Inner width of the SwiGLU MLP.
    max_position : int
        Rows of the rotary tables (longest ``kv_cache_tokens + seq`` accepted).
    rope_theta : float
        Rotary base.
    norm_eps : float
        RMSNorm epsilon.
    """

    vocab: int = 32000
    dim: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    ffn: int = 11008
    max_position: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if min(self.vocab, self.dim, self.layers, self.heads, self.kv_heads, self.ffn, self.max_position) < 1:
            raise ValueError("Llama sizes must be positive")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if (self.dim // self.heads) % 2:
            raise ValueError("the head dimension must be even (rotary embedding)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


#: Named configurations. Sizes follow the published models (Llama-2 7B/13B/70B, TinyLlama 1.1B);
#: ``llama-125m`` is a 125M-class width-768 model; ``llama-tiny`` is for tests.
CONFIGS: dict[str, LlamaConfig] = {
    "llama-tiny": LlamaConfig(vocab=256, dim=64, layers=4, heads=4, kv_heads=2, ffn=128, max_position=512),
    "llama-125m": LlamaConfig(vocab=32000, dim=768, layers=12, heads=12, kv_heads=12, ffn=2048),
    "llama-1b": LlamaConfig(vocab=32000, dim=2048, layers=22, heads=32, kv_heads=4, ffn=5632),
    "llama-7b": LlamaConfig(vocab=32000, dim=4096, layers=32, heads=32, kv_heads=32, ffn=11008),
    "llama-13b": LlamaConfig(vocab=32000, dim=5120, layers=40, heads=40, kv_heads=40, ffn=13824),
    "llama-70b": LlamaConfig(vocab=32000, dim=8192, layers=80, heads=64, kv_heads=8, ffn=28672),
}


def param_count(cfg: LlamaConfig) -> int:
    """Parameters of a :class:`LlamaModel` with this configuration (untied head)."""
    hd = cfg.head_dim
    attn = cfg.dim * cfg.dim * 2 + cfg.dim * cfg.kv_heads * hd * 2
    mlp = 3 * cfg.dim * cfg.ffn
    return cfg.layers * (attn + mlp + 2 * cfg.dim) + 2 * cfg.vocab * cfg.dim + cfg.dim


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), one operator per step."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


#: Additive mask value: finite in every float dtype, and ``exp`` of it underflows to 0.
MASK_VALUE = -1.0e4


def causal_mask(pos: torch.Tensor, past: int, like: torch.Tensor) -> torch.Tensor:
    """Additive causal mask ``(B, 1, S, past + S)`` from positions ``pos`` ``(B, S)`` (0..S-1).

    Key ``j`` of the new tokens is masked for query ``i`` when ``j > i`` (``MASK_VALUE``, in the
    dtype of ``like``); the ``past`` cached keys are visible to every query (zero columns
    padded on the left).
    """
    mask = (pos[:, None, :] > pos[:, :, None]).type_as(like) * MASK_VALUE
    if past:
        mask = F.pad(mask, (past, 0))
    return mask.unsqueeze(1)


class LlamaAttention(nn.Module):
    """Rotary grouped-query self-attention at operator level (optionally with a KV cache)."""

    def __init__(self, cfg: LlamaConfig, batch: int = 1, kv_cache_tokens: int = 0) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, hd
        self.rep = cfg.heads // cfg.kv_heads
        self.scale = 1.0 / math.sqrt(hd)
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.heads * hd, cfg.dim, bias=False)
        self.past = int(kv_cache_tokens)
        if self.past:
            shape = (batch, cfg.kv_heads, self.past, hd)
            self.register_buffer("k_cache", torch.zeros(shape))
            self.register_buffer("v_cache", torch.zeros(shape))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.past:
            k = torch.cat((self.k_cache, k), dim=2)
            v = torch.cat((self.v_cache, v), dim=2)
        if self.rep > 1:
            k = k.repeat_interleave(self.rep, dim=1)
            v = v.repeat_interleave(self.rep, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        probs = torch.softmax(scores + mask, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).flatten(2)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (Shazeer 2020)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``."""

    def __init__(self, cfg: LlamaConfig, batch: int = 1, kv_cache_tokens: int = 0) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = LlamaAttention(cfg, batch, kv_cache_tokens)
        self.post_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.input_norm(x), cos, sin, mask)
        return h + self.mlp(self.post_norm(h))


class LlamaModel(nn.Module):
    """Token ids ``(B, S)`` -> logits ``(B, S, vocab)``.

    Parameters
    ----------
    cfg : LlamaConfig
    batch : int
        Batch size of the KV cache buffers (only with ``kv_cache_tokens``).
    kv_cache_tokens : int
        Cached tokens per sequence (see the module docstring); 0: no cache.
    """

    def __init__(self, cfg: LlamaConfig, batch: int = 1, kv_cache_tokens: int = 0) -> None:
        super().__init__()
        if kv_cache_tokens < 0:
            raise ValueError(f"kv_cache_tokens must be >= 0, got {kv_cache_tokens}")
        self.cfg = cfg
        self.past = int(kv_cache_tokens)
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(LlamaLayer(cfg, batch, kv_cache_tokens) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        hd = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(cfg.max_position, dtype=torch.float32), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("rope_cos", ang.cos(), persistent=False)
        self.register_buffer("rope_sin", ang.sin(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.ones_like(ids).cumsum(1) - 1
        h = self.embed(ids)
        rope_pos = pos + self.past if self.past else pos
        cos = F.embedding(rope_pos, self.rope_cos).unsqueeze(1)
        sin = F.embedding(rope_pos, self.rope_sin).unsqueeze(1)
        mask = causal_mask(pos, self.past, h)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.lm_head(self.norm(h))


def _init_llama(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)


def build(cfg: LlamaConfig, *, model_cls=LlamaModel, init=None, batch: int, seq: int, kv_cache_tokens: int,
          dtype: torch.dtype | str | None, device: str | torch.device | None, seed: int,
          n_params: int, vocab: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Shared factory body: build on ``device`` (meta for large models), cast, make inputs."""
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    if kv_cache_tokens + seq > cfg.max_position:
        cfg = dataclasses.replace(cfg, max_position=kv_cache_tokens + seq)
    if device is None:
        device = "meta" if n_params > META_PARAMS else "cpu"
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.float16 if n_params > 10_000_000 else torch.float32
    with seeded(seed), torch.device(device):
        model = model_cls(cfg, batch=batch, kv_cache_tokens=kv_cache_tokens)
        if device.type != "meta" and init is not None:
            init(model)
    model = model.to(dtype).eval()
    if device.type == "meta":
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    else:
        ids = torch.randint(0, vocab, (batch, seq), generator=generator(seed)).to(device)
    return model, (ids,)


def llama(config: str | LlamaConfig = "llama-125m", batch: int = 1, seq: int = 128, *, kv_cache_tokens: int = 0,
          layers: int | None = None, dtype: torch.dtype | str | None = None,
          device: str | torch.device | None = None, seed: int = DEFAULT_SEED) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Build a Llama-style decoder and its example token ids.

    Parameters
    ----------
    config : str or LlamaConfig
        A name from :data:`CONFIGS` (``llama-tiny``, ``llama-125m``, ``llama-1b``, ``llama-7b``,
        ``llama-13b``, ``llama-70b``) or a configuration.
    batch, seq : int
        Shape of the example input ``(batch, seq)`` (token ids).
    kv_cache_tokens : int
        Cached tokens per sequence held by every layer (see the module docstring).
    layers : int, optional
        Override the number of layers (e.g. a 4-layer slice of a 70B-wide model).
    dtype : torch.dtype or str, optional
        Weight and activation dtype; default ``float16`` (as served) for models above 10M
        parameters, ``float32`` for the tiny ones.
    device : str or torch.device, optional
        Default ``"meta"`` above :data:`META_PARAMS` parameters (nothing allocated), else CPU.
    seed : int
        Seed of the weights and the example ids.

    Returns
    -------
    (LlamaModel, (ids,))
        The model in eval mode; ids of shape ``(batch, seq)``.
    """
    cfg = CONFIGS[config] if isinstance(config, str) else config
    if isinstance(config, str) and config not in CONFIGS:  # pragma: no cover - KeyError above
        raise KeyError(config)
    if layers is not None:
        cfg = dataclasses.replace(cfg, layers=int(layers))
    return build(cfg, init=_init_llama, batch=batch, seq=seq, kv_cache_tokens=kv_cache_tokens, dtype=dtype,
                 device=device, seed=seed, n_params=param_count(cfg), vocab=cfg.vocab)


# ---- cost graphs (meta-safe) ----------------------------------------------------------------
def cost_graph(model: nn.Module, inputs: tuple, name: str | None = None, frontend: str = "fx"):
    """Trace ``model`` at operator level into a :class:`~partitioner.ir.graph.CostGraph`.

    Works on the meta device: :func:`partitioner.frontend.trace.trace` charges parameter bytes once
    per storage keyed by ``(device, data_ptr)``, and every meta tensor has data pointer 0,
    so on meta it would charge one storage's worth in all. When the model has meta
    parameters or buffers this function recomputes ``param_bytes`` of every
    ``call_module`` / ``get_attr`` node with storages told apart by their ``StorageImpl``
    (tied weights still count once) and lowers the corrected graph.

    Parameters
    ----------
    model : nn.Module
    inputs : tuple
        Example inputs (meta tensors for a meta model).
    name : str, optional
        Cost-graph name (default: the model's class name).
    frontend : {"fx", "export"}

    Returns
    -------
    CostGraph
    """
    from partitioner.frontend.trace import trace
    from partitioner.ir.graph import from_fx

    gm = trace(model, inputs, frontend=frontend)
    tensors = [*gm.parameters(), *gm.buffers()]
    if any(t.device.type == "meta" for t in tensors):
        fix_meta_param_bytes(gm)
    return from_fx(gm, name or type(model).__name__)


def fix_meta_param_bytes(gm) -> None:
    """Recompute ``param_bytes`` (and ``bytes_moved``) of a traced GraphModule whose tensors are
    on the meta device, charging each storage once at its first user in topological order."""
    from partitioner.frontend.trace import NodeCost

    modules = dict(gm.named_modules())
    charged: dict[int, int] = {}

    def charge(ts) -> int:
        total = 0
        for t in ts:
            if not isinstance(t, torch.Tensor):
                continue
            nb = int(t.numel()) * int(t.element_size())
            if nb == 0:
                continue
            st = t.untyped_storage()
            key, cap = st._cdata, int(st.nbytes())
            done = charged.get(key, 0)
            add = max(0, min(nb, cap - done))
            if add:
                charged[key] = done + add
                total += add
        return total

    for n in gm.graph.nodes:
        cost = n.meta.get("partitioner")
        if not isinstance(cost, NodeCost):
            continue
        if n.op == "call_module":
            mod = modules.get(n.target)
            pb = charge([*mod.parameters(), *mod.buffers()]) if mod is not None else 0
        elif n.op == "get_attr":
            obj = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            pb = charge([*obj.parameters(), *obj.buffers()] if isinstance(obj, nn.Module) else [obj])
        else:
            continue
        if pb != cost.param_bytes:
            n.meta["partitioner"] = dataclasses.replace(
                cost, param_bytes=pb, bytes_moved=cost.input_bytes + cost.output_bytes + pb)
