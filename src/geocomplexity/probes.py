r"""Random probe vectors for the stochastic estimators.

Every distribution here has :math:`\mathbb{E}[v v^\top] = I` along its last
dimension, which is all the Hutchinson argument needs:
:math:`\mathbb{E}\|J^\top v\|^2 = \operatorname{tr}(J J^\top) = \|J\|_F^2`.

- ``"rademacher"``: entries ±1. The lowest variance of the three for a fixed
  Jacobian (its variance is :math:`2\sum_{a\ne b}(JJ^\top)_{ab}^2`, the Gaussian's
  :math:`2\|JJ^\top\|_F^2`), so the default.
- ``"gaussian"``: entries N(0, 1).
- ``"sphere"``: uniform on the sphere of radius :math:`\sqrt{n}` (Hoffman et al.).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

__all__ = [
    "DISTRIBUTIONS",
    "check_distribution",
    "draw_probes",
    "input_probes",
    "resolve_generator",
]

DISTRIBUTIONS = ("rademacher", "gaussian", "sphere")


def check_distribution(distribution: str) -> None:
    """Raise a clear error for an unknown probe distribution.

    Raises:
        ValueError: ``distribution`` is not one of :data:`DISTRIBUTIONS`.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown probe distribution {distribution!r}; "
            f"choose one of {', '.join(map(repr, DISTRIBUTIONS))}"
        )


def resolve_generator(
    generator: torch.Generator | None, device: torch.device
) -> torch.Generator:
    """The generator to draw from; this process's private one when ``None``.

    The private generator (one per device and process) is seeded from the
    operating system when first used, so the global RNG state is never read or
    advanced, and calls without a generator draw independent probes. A forked
    child seeds its own rather than repeating its parent's draws. Creating and
    seeding a generator on every call cost as much as the probe draw itself on
    a small model. Pass a generator for reproducible draws.

    Returns:
        ``generator`` itself, or the private one on ``device``.
    """
    if generator is not None:
        return generator
    device = torch.device(device)
    key = (os.getpid(), device.type, device.index)
    private = _PRIVATE.get(key)
    if private is None:
        private = torch.Generator(device=device)
        private.seed()
        _PRIVATE[key] = private
    return private


# (pid, device type, index) -> generator; the pid keeps a fork from inheriting
# its parent's stream
_PRIVATE: dict[tuple[int, str, int | None], torch.Generator] = {}


def draw_probes(
    distribution: str,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> Tensor:
    """Draw probes of ``shape`` with identity second moment along the last dim.

    Args:
        distribution: one of :data:`DISTRIBUTIONS`.
        shape: ``(..., n)``; each length-``n`` row is one probe.
        dtype: floating dtype of the result.
        device: device of the result.
        generator: the source of randomness (drawn on its own device, then moved).

    Returns:
        Tensor of ``shape``.
    """
    check_distribution(distribution)
    where = generator.device
    if distribution == "rademacher":
        v = _rademacher(shape, dtype, where, generator)
    else:
        v = torch.randn(shape, generator=generator, device=where, dtype=dtype)
        if distribution == "sphere":
            n = shape[-1]
            v = v * (n**0.5 / v.norm(dim=-1, keepdim=True))
    return v.to(device=device, dtype=dtype)


# from this many entries on, Rademacher signs are unpacked from random words
_BITS_FROM = 4096
_WORD_BITS = 63  # an int64 random_() is uniform on [0, 2**63): 63 random bits


def _rademacher(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> Tensor:
    """Independent ±1 entries of ``shape``.

    One generator call per entry (``randint``) costs about 15 ns each on a CPU:
    for a large draw that dominates (7 ms for 512,000 signs). Unpacking 63 signs
    from each random int64 makes 63× fewer calls (1.1 ms there); below a few
    thousand entries the unpacking's fixed cost of a handful of kernels loses.

    Returns:
        Tensor of ``shape``, on ``device``, in ``dtype``.
    """
    n = math.prod(shape)
    if n < _BITS_FROM:
        v = torch.randint(0, 2, shape, generator=generator, device=device, dtype=dtype)
        return v.mul_(2).sub_(1)
    words = torch.empty(-(-n // _WORD_BITS), dtype=torch.int64, device=device)
    words.random_(generator=generator)
    shifts = torch.arange(_WORD_BITS, device=device)
    bits = (words.unsqueeze(1) >> shifts).bitwise_and_(1).reshape(-1)[:n]
    return bits.to(dtype).mul_(2).sub_(1).reshape(shape)


def input_probes(
    distribution: str, x: Tensor, num_probes: int, generator: torch.Generator
) -> Tensor:
    """Input-side probes for a batch ``x`` of shape ``(B, *in_shape)``.

    Drawn flat, so that a sphere probe is normalised over the whole sample, then
    shaped like ``x``.

    Returns:
        Tensor of shape ``(num_probes, B, *in_shape)``.
    """
    B = x.shape[0]
    flat = draw_probes(
        distribution,
        (num_probes, B, x[0].numel()),
        dtype=x.dtype,
        device=x.device,
        generator=generator,
    )
    return flat.reshape(num_probes, *x.shape)
