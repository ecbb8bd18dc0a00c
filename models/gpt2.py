"""A GPT-2-style decoder (Radford et al. 2019) written at operator level.

Pre-norm blocks: ``LayerNorm`` -> fused q/k/v ``Linear`` (``c_attn``) -> ``split`` ->
heads (``unflatten`` + ``transpose``) -> ``matmul`` -> scale -> additive causal mask ->
``softmax`` -> ``matmul`` -> merge heads -> ``c_proj`` -> residual ``add``; then
``LayerNorm`` -> ``c_fc`` -> GELU (tanh approximation) -> ``c_proj`` -> residual ``add``.
Learned position embeddings; the final ``LayerNorm`` and a language-model head tied to
the token embedding (``linear(h, wte.weight)``: the tracer charges the shared weight
once). Sizes follow the released GPT-2 models (``gpt2`` 124M, ``gpt2-medium`` 355M,
``gpt2-large`` 774M, ``gpt2-xl`` 1.5B); ``gpt2-tiny`` is for tests.

Positions come from the token ids (``ones_like(ids).cumsum(1) - 1``) and the causal mask
is built from them once per forward (:func:`models.llama.causal_mask`), so the graph has
no size queries. ``kv_cache_tokens`` works as in :mod:`models.llama`: every attention
layer holds ``k_cache`` / ``v_cache`` buffers ``(batch, heads, L, head_dim)`` (parameter-
like bytes on the ``get_attr`` nodes that read them) and attends over them. Models above
:data:`models.llama.META_PARAMS` parameters are built on the meta device by default;
trace them with :func:`models.llama.cost_graph`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import DEFAULT_SEED
from .llama import build, causal_mask

__all__ = ["GPT2Config", "CONFIGS", "GPT2Attention", "GPT2Block", "GPT2Model", "gpt2", "param_count"]


@dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of a GPT-2 decoder.

    Parameters
    ----------
    vocab : int
        Vocabulary size.
    dim : int
        Model width; must be divisible by ``heads``.
    layers : int
        Number of blocks.
    heads : int
        Attention heads.
    max_position : int
        Rows of the position-embedding table (longest ``kv_cache_tokens + seq``).
    norm_eps : float
        LayerNorm epsilon.
    """

    vocab: int = 50257
    dim: int = 768
    layers: int = 12
    heads: int = 12
    max_position: int = 1024
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if min(self.vocab, self.dim, self.layers, self.heads, self.max_position) < 1:
            raise ValueError("GPT-2 sizes must be positive")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


#: Named configurations (the released GPT-2 sizes; ``gpt2-tiny`` for tests).
CONFIGS: dict[str, GPT2Config] = {
    "gpt2-tiny": GPT2Config(vocab=256, dim=64, layers=4, heads=4, max_position=256),
    "gpt2": GPT2Config(vocab=50257, dim=768, layers=12, heads=12),
    "gpt2-medium": GPT2Config(vocab=50257, dim=1024, layers=24, heads=16),
    "gpt2-large": GPT2Config(vocab=50257, dim=1280, layers=36, heads=20),
    "gpt2-xl": GPT2Config(vocab=50257, dim=1600, layers=48, heads=25),
}


def param_count(cfg: GPT2Config) -> int:
    """Parameters of a :class:`GPT2Model` (tied head): 124,439,808 for ``gpt2``."""
    d = cfg.dim
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return cfg.layers * block + cfg.vocab * d + cfg.max_position * d + 2 * d


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention with a fused q/k/v projection (optionally a KV cache)."""

    def __init__(self, cfg: GPT2Config, batch: int = 1, kv_cache_tokens: int = 0) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dim = cfg.heads, cfg.head_dim, cfg.dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        self.past = int(kv_cache_tokens)
        if self.past:
            shape = (batch, cfg.heads, self.past, cfg.head_dim)
            self.register_buffer("k_cache", torch.zeros(shape))
            self.register_buffer("v_cache", torch.zeros(shape))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.dim, dim=-1)
        q = q.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        if self.past:
            k = torch.cat((self.k_cache, k), dim=2)
            v = torch.cat((self.v_cache, v), dim=2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        probs = torch.softmax(scores + mask, dim=-1)
        return self.c_proj(torch.matmul(probs, v).transpose(1, 2).flatten(2))


class GPT2Block(nn.Module):
    """``x + attn(ln_1(x))`` then ``h + mlp(ln_2(h))`` with a GELU (tanh) MLP of width 4d."""

    def __init__(self, cfg: GPT2Config, batch: int = 1, kv_cache_tokens: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, batch, kv_cache_tokens)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.c_fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.c_proj = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), mask)
        return h + self.c_proj(F.gelu(self.c_fc(self.ln_2(h)), approximate="tanh"))


class GPT2Model(nn.Module):
    """Token ids ``(B, S)`` -> logits ``(B, S, vocab)`` (head tied to the token embedding)."""

    def __init__(self, cfg: GPT2Config, batch: int = 1, kv_cache_tokens: int = 0) -> None:
        super().__init__()
        if kv_cache_tokens < 0:
            raise ValueError(f"kv_cache_tokens must be >= 0, got {kv_cache_tokens}")
        self.cfg = cfg
        self.past = int(kv_cache_tokens)
        self.wte = nn.Embedding(cfg.vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_position, cfg.dim)
        self.h = nn.ModuleList(GPT2Block(cfg, batch, kv_cache_tokens) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.ones_like(ids).cumsum(1) - 1
        x = self.wte(ids) + self.wpe(pos + self.past if self.past else pos)
        mask = causal_mask(pos, self.past, x)
        for block in self.h:
            x = block(x, mask)
        return F.linear(self.ln_f(x), self.wte.weight)


def _init_gpt2(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


def gpt2(config: str | GPT2Config = "gpt2", batch: int = 1, seq: int = 128, *, kv_cache_tokens: int = 0,
         layers: int | None = None, dtype: torch.dtype | str | None = None,
         device: str | torch.device | None = None, seed: int = DEFAULT_SEED) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Build a GPT-2-style decoder and its example token ids.

    Parameters
    ----------
    config : str or GPT2Config
        A name from :data:`CONFIGS` (``gpt2-tiny``, ``gpt2``, ``gpt2-medium``, ``gpt2-large``,
        ``gpt2-xl``) or a configuration.
    batch, seq : int
        Shape of the example ids.
    kv_cache_tokens : int
        Cached tokens per sequence held by every layer.
    layers : int, optional
        Override the number of blocks.
    dtype, device, seed
        As in :func:`models.llama.llama` (``float16`` above 10M parameters; meta above
        :data:`models.llama.META_PARAMS`).

    Returns
    -------
    (GPT2Model, (ids,))
    """
    cfg = CONFIGS[config] if isinstance(config, str) else config
    if layers is not None:
        cfg = dataclasses.replace(cfg, layers=int(layers))
    return build(cfg, model_cls=GPT2Model, init=_init_gpt2, batch=batch, seq=seq, kv_cache_tokens=kv_cache_tokens,
                 dtype=dtype, device=device, seed=seed, n_params=param_count(cfg), vocab=cfg.vocab)
