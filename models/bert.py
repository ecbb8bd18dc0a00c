"""A BERT-style Transformer encoder (Devlin et al. 2019) written at operator level.

Every step of self-attention is a separate operator in the traced graph:
q/k/v ``Linear``, split into heads (``unflatten`` + ``permute``), ``matmul``,
scale, ``softmax``, ``matmul``, merge heads (``permute`` + ``flatten``), output
``Linear``, residual add + ``LayerNorm``, then the FFN (``Linear`` -> GELU ->
``Linear``) with residual add + ``LayerNorm``.

Position and token-type ids are computed from the token ids by tensor
operators (``ones_like(ids).cumsum(1) - 1`` and ``zeros_like(ids)``), so the
traced graph has no Python-level size queries and accepts any batch size and
any sequence length up to ``max_position``. Dropout is omitted (inference).
The parameter count matches Hugging Face's ``BertModel`` (bert-base:
109,482,240 parameters with the pooler, 108,891,648 without).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import generator, seeded

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertSelfAttention",
    "BertLayer",
    "BertModel",
    "bert",
    "bert_base",
]


class BertConfig:
    """Hyper-parameters of a BERT encoder.

    Parameters
    ----------
    vocab : int
        Token vocabulary size.
    hidden : int
        Model width; must be divisible by ``heads``.
    layers : int
        Number of encoder layers.
    heads : int
        Attention heads per layer.
    intermediate : int or None
        FFN inner width; ``None`` means ``4 * hidden``.
    max_position : int
        Size of the position-embedding table (longest sequence accepted).
    type_vocab : int
        Number of token types (segments).
    layer_norm_eps : float
        LayerNorm epsilon.
    pooler : bool
        Whether the model ends with the pooler (``tanh(Linear(h[:, 0]))``) and
        returns its ``(batch, hidden)`` output instead of the sequence output.
    """

    def __init__(
        self,
        vocab: int = 30522,
        hidden: int = 768,
        layers: int = 12,
        heads: int = 12,
        intermediate: int | None = None,
        max_position: int = 512,
        type_vocab: int = 2,
        layer_norm_eps: float = 1e-12,
        pooler: bool = False,
    ) -> None:
        if hidden % heads != 0:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if min(vocab, hidden, layers, heads, max_position, type_vocab) < 1:
            raise ValueError("BERT sizes must be positive")
        self.vocab = vocab
        self.hidden = hidden
        self.layers = layers
        self.heads = heads
        self.intermediate = 4 * hidden if intermediate is None else intermediate
        self.max_position = max_position
        self.type_vocab = type_vocab
        self.layer_norm_eps = layer_norm_eps
        self.pooler = pooler

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"BertConfig({fields})"


class BertEmbeddings(nn.Module):
    """Token + position + token-type embeddings followed by LayerNorm.

    Parameters
    ----------
    cfg : BertConfig
        Model configuration.
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``(batch, seq)`` token ids into ``(batch, seq, hidden)``."""
        position_ids = torch.ones_like(input_ids).cumsum(1) - 1
        token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention, one operator per step.

    Parameters
    ----------
    cfg : BertConfig
        Model configuration.
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.scale = math.sqrt(self.head_dim)
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``(batch, seq, hidden)``; returns the merged heads, same shape."""
        # (b, s, hidden) -> (b, s, heads, d) -> (b, heads, s, d)
        q = self.query(x).unflatten(-1, (self.heads, self.head_dim)).permute(0, 2, 1, 3)
        # keys go straight to (b, heads, d, s) for q @ k^T
        k = self.key(x).unflatten(-1, (self.heads, self.head_dim)).permute(0, 2, 3, 1)
        v = self.value(x).unflatten(-1, (self.heads, self.head_dim)).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k)
        scores = scores / self.scale
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v)
        # (b, heads, s, d) -> (b, s, heads, d) -> (b, s, hidden)
        return ctx.permute(0, 2, 1, 3).flatten(2)


class BertLayer(nn.Module):
    """One encoder layer: attention + output projection + add & norm, FFN + add & norm.

    Parameters
    ----------
    cfg : BertConfig
        Model configuration.
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(cfg)
        self.attention_output = nn.Linear(cfg.hidden, cfg.hidden)
        self.attention_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden, cfg.intermediate)
        self.activation = nn.GELU()
        self.output = nn.Linear(cfg.intermediate, cfg.hidden)
        self.output_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``(batch, seq, hidden)``."""
        a = self.attention_output(self.attention(x))
        x = self.attention_norm(a + x)
        f = self.output(self.activation(self.intermediate(x)))
        return self.output_norm(f + x)


class BertModel(nn.Module):
    """BERT encoder: embeddings, ``layers`` encoder layers, optional pooler.

    Parameters
    ----------
    cfg : BertConfig
        Model configuration.
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.layers)])
        self.pooler: nn.Linear | None = nn.Linear(cfg.hidden, cfg.hidden) if cfg.pooler else None
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encode ``(batch, seq)`` int64 token ids.

        Returns
        -------
        torch.Tensor
            ``(batch, seq, hidden)`` sequence output, or ``(batch, hidden)``
            pooled output when the model has a pooler.
        """
        x = self.embeddings(input_ids)
        for layer in self.encoder:
            x = layer(x)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x[:, 0]))
        return x


def bert(
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    seq: int = 128,
    batch: int = 1,
    intermediate: int | None = None,
    vocab: int = 30522,
    max_position: int = 512,
    pooler: bool = False,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A BERT encoder and example token ids.

    The defaults give a small model (4 layers, width 256, 4 heads, FFN 1024)
    with BERT's exact structure; ``bert(layers=12, hidden=768, heads=12)`` is
    bert-base.

    Parameters
    ----------
    layers : int
        Number of encoder layers.
    hidden : int
        Model width.
    heads : int
        Attention heads (must divide ``hidden``).
    seq : int
        Sequence length of the example input (at most ``max_position``).
    batch : int
        Batch size of the example input.
    intermediate : int or None
        FFN inner width; ``None`` means ``4 * hidden``.
    vocab : int
        Vocabulary size.
    max_position : int
        Size of the position-embedding table.
    pooler : bool
        End with the pooler and return ``(batch, hidden)``.

    Returns
    -------
    tuple[nn.Module, tuple[torch.Tensor, ...]]
        The model in eval mode and ``(input_ids,)``, an int64 tensor of shape
        ``(batch, seq)`` with values in ``[0, vocab)``.
    """
    if not 1 <= seq <= max_position:
        raise ValueError(f"seq must be in [1, max_position={max_position}], got {seq}")
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    cfg = BertConfig(
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        max_position=max_position,
        pooler=pooler,
    )
    with seeded():
        model = BertModel(cfg).eval()
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator(), dtype=torch.long)
    return model, (input_ids,)


def bert_base(
    seq: int = 128, batch: int = 1, pooler: bool = False
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """bert-base (12 layers, width 768, 12 heads, FFN 3072) and example token ids.

    Parameters
    ----------
    seq : int
        Sequence length of the example input.
    batch : int
        Batch size of the example input.
    pooler : bool
        End with the pooler and return ``(batch, hidden)``.

    Returns
    -------
    tuple[nn.Module, tuple[torch.Tensor, ...]]
        The model in eval mode and ``(input_ids,)`` of shape ``(batch, seq)``.
    """
    return bert(layers=12, hidden=768, heads=12, seq=seq, batch=batch, pooler=pooler)
