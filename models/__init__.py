"""The benchmark model zoo, in plain torch (no torchvision, no downloads).

Every factory returns ``(model, example_inputs)``: the model in ``eval()`` mode
with deterministic weights (built under a fixed torch seed, without disturbing
the caller's RNG state) and a tuple of deterministic example inputs. Every
model is traceable by ``torch.fx.symbolic_trace``.

Examples
--------
>>> from models import get_model, list_models
>>> model, inputs = get_model("resnet50", batch=2, image=64)
>>> model(*inputs).shape
torch.Size([2, 1000])
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from .bert import bert, bert_base
from .gpt2 import gpt2
from .inception import inception
from .llama import llama
from .randwire import randwire
from .resnet import resnet18, resnet50

__all__ = ["ZOO", "DESCRIPTIONS", "get_model", "list_models"]

Factory = Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]

#: Model name -> factory returning ``(model, example_inputs)``.
ZOO: dict[str, Factory] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "inception": inception,
    "bert": bert,
    "bert-base": bert_base,
    "randwire-ws": partial(randwire, generator="ws"),
    "randwire-er": partial(randwire, generator="er"),
    "randwire-ba": partial(randwire, generator="ba"),
    "llama-125m": partial(llama, "llama-125m"),
    "llama-1b": partial(llama, "llama-1b"),
    "llama-7b": partial(llama, "llama-7b"),
    "llama-13b": partial(llama, "llama-13b"),
    "llama-70b": partial(llama, "llama-70b"),
    "gpt2": partial(gpt2, "gpt2"),
    "gpt2-medium": partial(gpt2, "gpt2-medium"),
    "gpt2-large": partial(gpt2, "gpt2-large"),
    "gpt2-xl": partial(gpt2, "gpt2-xl"),
}

#: Model name -> one-line description.
DESCRIPTIONS: dict[str, str] = {
    "resnet18": "ResNet-18 (BasicBlock [2,2,2,2]), 224x224 image, 11.7M params",
    "resnet50": "ResNet-50 (Bottleneck [3,4,6,3], torchvision layout), 224x224 image, 25.6M params",
    "inception": "GoogLeNet / Inception-v1 multi-branch CNN (9 inception modules), 224x224 image",
    "bert": "BERT encoder, small: 4 layers, hidden 256, 4 heads, seq 128, operator-level attention",
    "bert-base": "BERT-base encoder: 12 layers, hidden 768, 12 heads, seq 128",
    "randwire-ws": "RandWire small regime, Watts-Strogatz WS(4, 0.75), 32 nodes/stage, C=78",
    "randwire-er": "RandWire small regime, Erdos-Renyi ER(0.2), 32 nodes/stage, C=78",
    "randwire-ba": "RandWire small regime, Barabasi-Albert BA(5), 32 nodes/stage, C=78",
    "llama-125m": "Llama-style decoder, 12 layers, dim 768, 12 heads, SwiGLU 2048, seq 128 (fp16)",
    "llama-1b": "Llama-style decoder (TinyLlama shape), 22 layers, dim 2048, GQA 32/4 heads, meta device",
    "llama-7b": "Llama-2-7B shape: 32 layers, dim 4096, 32 heads, SwiGLU 11008, meta device",
    "llama-13b": "Llama-2-13B shape: 40 layers, dim 5120, 40 heads, SwiGLU 13824, meta device",
    "llama-70b": "Llama-2-70B shape: 80 layers, dim 8192, GQA 64/8 heads, SwiGLU 28672, meta device",
    "gpt2": "GPT-2 small decoder: 12 layers, dim 768, 12 heads, seq 128 (fp16), tied head",
    "gpt2-medium": "GPT-2 medium: 24 layers, dim 1024, 16 heads",
    "gpt2-large": "GPT-2 large: 36 layers, dim 1280, 20 heads, meta device",
    "gpt2-xl": "GPT-2 XL: 48 layers, dim 1600, 25 heads, meta device",
}


def list_models() -> list[tuple[str, str]]:
    """List the zoo.

    Returns
    -------
    list[tuple[str, str]]
        ``(name, one-line description)`` for every model, in registry order.
    """
    return [(name, DESCRIPTIONS[name]) for name in ZOO]


def get_model(name: str, **kwargs: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a zoo model and its example inputs.

    Parameters
    ----------
    name : str
        A name from :data:`ZOO` (see :func:`list_models`).
    **kwargs : Any
        Passed to the factory, e.g. ``batch``, ``image``, ``seq``, ``nodes``, ``seed``.

    Returns
    -------
    tuple[nn.Module, tuple[torch.Tensor, ...]]
        The model in eval mode and its example inputs.

    Raises
    ------
    KeyError
        If ``name`` is not in the zoo; the message lists the valid names.
    TypeError
        If the factory does not accept one of ``kwargs``.
    """
    try:
        factory = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(sorted(ZOO))}") from None
    model, inputs = factory(**kwargs)
    return model.eval(), tuple(inputs)
