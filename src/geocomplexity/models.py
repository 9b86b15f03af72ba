"""Model builders for the experiments.

The builder functions (:func:`mlp`, :func:`cnn`) take a seed and leave the
global RNG alone; :class:`PreActResNet18` is a module class, initialised from
the global RNG as any ``nn.Module`` is (seed it inside
``torch.random.fork_rng()``, as the ResNet experiment does).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geocomplexity.state import cpu_seeded

__all__ = ["INITS", "PreActResNet18", "cnn", "initialize", "mlp"]

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
        ValueError: unknown activation or init; a size that is not an
            integer >= 1.
        TypeError: ``widths`` is one integer, not a sequence of them.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; "
            f"choose one of {', '.join(_ACTIVATIONS)}"
        )
    if isinstance(widths, numbers.Integral):  # "Value after * must be an iterable"
        raise TypeError(
            f"widths must be a sequence of hidden sizes, got {widths!r}: "
            f"[{widths!r}] for one hidden layer of that width, [] for none"
        )
    sizes = [d_in, *widths, d_out]
    # a width of 0 built a network whose output is its last bias alone (GC 0
    # on any data) under the default init, and divided by a zero fan_in under
    # the others; any integer type (np.int64 from a sweep), not 2.0 or True
    if not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1
        for s in sizes
    ):
        raise ValueError(
            f"layer sizes must be integers >= 1, got d_in={d_in!r}, "
            f"widths={list(widths)!r}, d_out={d_out!r}"
        )
    layers: list[nn.Module] = []
    with cpu_seeded(seed):  # PyTorch's default init draws from it
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
    model = nn.Sequential(*layers)
    initialize(model, init, torch.Generator().manual_seed(seed))
    return model


def cnn(
    in_channels: int,
    num_classes: int,
    *,
    width: int = 32,
    batch_norm: bool = False,
    seed: int = 0,
) -> nn.Sequential:
    """A small convolutional classifier for images of any size.

    Two stages of ``conv 3×3 → [BN] → ReLU → 2×2 max-pool`` with ``width`` and
    ``2·width`` channels, a global average pool and a linear head. Inputs are
    ``(B, in_channels, H, W)`` with ``H, W ≥ 4``; outputs ``(B, num_classes)``.

    Args:
        in_channels: input channels (1 for digits, 3 for CIFAR-10).
        num_classes: output size (the logits).
        width: channels of the first stage.
        batch_norm: BatchNorm after each convolution.
        seed: the initialization's seed (the global RNG is left alone).

    Returns:
        The ``nn.Sequential``.
    """

    def stage(cin: int, cout: int) -> list[nn.Module]:
        norm: list[nn.Module] = [nn.BatchNorm2d(cout)] if batch_norm else []
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm),
            *norm,
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    with cpu_seeded(seed):
        return nn.Sequential(
            *stage(in_channels, width),
            *stage(width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )


def initialize(model: nn.Module, scheme: str, generator: torch.Generator) -> None:
    """Re-initialise every Linear layer in place.

    - ``"default"``: leave PyTorch's default (Kaiming-uniform with a = √5, i.e.
      weights U(±1/√fan_in), and its bias init).
    - ``"glorot"``: N(0, 2/(fan_in + fan_out)), zero biases.
    - ``"lecun"``: N(0, 1/fan_in), zero biases.
    - ``"he"``: N(0, 2/fan_in), zero biases.

    The draws come from ``generator`` on its own device and are copied to the
    weights', so a seed gives the same weights on the CPU and on a GPU.

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
                if m.weight.device == generator.device:
                    m.weight.normal_(0.0, math.sqrt(var), generator=generator)
                else:  # a CPU generator for CUDA weights: the same draws, moved
                    w = torch.empty(
                        m.weight.shape, dtype=m.weight.dtype, device=generator.device
                    )
                    m.weight.copy_(w.normal_(0.0, math.sqrt(var), generator=generator))
                if m.bias is not None:
                    m.bias.zero_()


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-ReLU-conv, twice."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output, same spatial size or halved by the stride."""
        out = F.relu(self.bn1(x))
        # the projection shortcut takes the pre-activated input, as in the paper
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 3×32×32 inputs with base width ``k`` (k, 2k, 4k, 8k).

    The width-``k`` family of Nakkiran et al. (2019), used for the paper's
    double-descent sweep (k = 1…64; k = 64 is the standard ResNet-18).
    """

    def __init__(self, k: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, k, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = k
        for i, cout in enumerate((k, 2 * k, 4 * k, 8 * k)):
            for j in range(2):
                blocks.append(PreActBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 3, 32, 32)``."""
        out = self.blocks(self.conv(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
