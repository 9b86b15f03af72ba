"""Model builders for the experiments, seeded without touching the global RNG."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["INITS", "initialize", "mlp"]

INITS = ("default", "glorot", "lecun", "he")
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def mlp(
    d_in: int,
    widths: Sequence[int],
    d_out: int,
    *,
    activation: str = "relu",
    init: str = "default",
    bias: bool = True,
    seed: int = 0,
) -> nn.Sequential:
    """A dense network ``d_in → widths… → d_out``.

    Args:
        d_in: input size.
        widths: hidden layer sizes.
        d_out: output size (the logits).
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        init: one of :data:`INITS` (see :func:`initialize`).
        bias: whether layers have biases.
        seed: the initialization's seed (the global RNG is left alone).

    Returns:
        The ``nn.Sequential``.

    Raises:
        ValueError: unknown activation or init.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; "
            f"choose one of {', '.join(_ACTIVATIONS)}"
        )
    sizes = [d_in, *widths, d_out]
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # PyTorch's default init draws from the global RNG
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
    model = nn.Sequential(*layers)
    initialize(model, init, torch.Generator().manual_seed(seed))
    return model


def initialize(model: nn.Module, scheme: str, generator: torch.Generator) -> None:
    """Re-initialise every Linear layer in place.

    - ``"default"``: leave PyTorch's default (Kaiming-uniform with a = √5, i.e.
      weights U(±1/√fan_in), and its bias init).
    - ``"glorot"``: N(0, 2/(fan_in + fan_out)), zero biases.
    - ``"lecun"``: N(0, 1/fan_in), zero biases.
    - ``"he"``: N(0, 2/fan_in), zero biases.

    Raises:
        ValueError: unknown scheme.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INITS)}")
    if scheme == "default":
        return
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                fan_out, fan_in = m.weight.shape
                var = {
                    "glorot": 2 / (fan_in + fan_out),
                    "lecun": 1 / fan_in,
                    "he": 2 / fan_in,
                }[scheme]
                m.weight.normal_(0.0, math.sqrt(var), generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
