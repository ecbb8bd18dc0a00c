"""Shared helpers for the model zoo: deterministic construction and weight init."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

#: Seed used for every zoo model's weights and example inputs.
DEFAULT_SEED = 0


@contextlib.contextmanager
def seeded(seed: int = DEFAULT_SEED) -> Iterator[None]:
    """Seed torch's global CPU generator inside the block, restoring it afterwards.

    Parameters
    ----------
    seed : int
        Seed for ``torch.manual_seed`` within the block.

    Yields
    ------
    None
        The caller's global RNG state is restored on exit, so building a zoo
        model has no side effect on other random draws.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def generator(seed: int = DEFAULT_SEED) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded with ``seed`` (for example inputs).

    Parameters
    ----------
    seed : int
        The generator's seed.

    Returns
    -------
    torch.Generator
        A fresh, seeded CPU generator.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def image_input(batch: int, image: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Return a deterministic ``(batch, 3, image, image)`` float image batch.

    Parameters
    ----------
    batch : int
        Batch size.
    image : int
        Height and width in pixels.
    seed : int
        Seed of the generator that draws the values (standard normal).

    Returns
    -------
    torch.Tensor
        The example input.
    """
    if batch < 1 or image < 1:
        raise ValueError(f"batch and image must be positive, got batch={batch}, image={image}")
    return torch.randn(batch, 3, image, image, generator=generator(seed))


def init_cnn(module: nn.Module) -> None:
    """Torchvision-style initialisation: Kaiming-normal (fan_out) convs, unit BN, small fc.

    Parameters
    ----------
    module : nn.Module
        The model whose sub-modules are initialised in place.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
