r"""Random probe vectors for the stochastic estimators.

Every distribution here has :math:`\mathbb{E}[v v^\top] = I` along its last
dimension, which is all the Hutchinson argument needs:
:math:`\mathbb{E}\|J^\top v\|^2 = \operatorname{tr}(J J^\top) = \|J\|_F^2`.

- ``"rademacher"``: entries ±1, the default. Never above the Gaussian's
  variance for a fixed Jacobian: with :math:`A=JJ^\top`, it is
  :math:`2\sum_{a\ne b}A_{ab}^2`, the Gaussian's :math:`2\|A\|_F^2`.
- ``"gaussian"``: entries N(0, 1).
- ``"sphere"``: uniform on the sphere of radius :math:`\sqrt{n}` (Hoffman et al.).
  Its variance, :math:`\frac{2n}{n+2}(\|A\|_F^2-\operatorname{tr}(A)^2/n)`, is
  below the Gaussian's too, and may be above or below Rademacher's: it is
  zero where :math:`A` is a multiple of :math:`I`, Rademacher's where
  :math:`A` is diagonal; for :math:`A=\mathbf{1}\mathbf{1}^\top` (n = 4) the
  sphere's is 16.0, Rademacher's 24.0.
"""

from __future__ import annotations

import math
import os
import threading

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

    The private generator (one per device, process and thread) is seeded from
    the operating system when first used, so the global RNG state is never
    read or advanced, and calls without a generator draw independent probes.
    A forked child seeds its own rather than repeating its parent's draws.
    Each thread has its own: a coupled measurement redraws its probes from a
    copy of the generator's state, so a thread drawing from the same one in
    between would hand both the same probes (a generator you pass and share
    between threads measuring at once does that too: give each thread its
    own). Creating and seeding a generator on every call cost as much as the
    probe draw itself on a small model. Pass a generator for reproducible
    draws.

    Returns:
        ``generator`` itself, or the private one on ``device``.
    """
    if generator is not None:
        return generator
    device = torch.device(device)
    key = (os.getpid(), device.type, device.index)
    private = _PRIVATE.generators.get(key)
    if private is None:
        private = torch.Generator(device=device)
        private.seed()
        _PRIVATE.generators[key] = private
    return private


class _PerThread(threading.local):
    """Each thread's private generators: (pid, device type, index) -> generator.

    The pid keeps a fork from inheriting its parent's stream; a thread's
    generators go when it ends.
    """

    def __init__(self) -> None:
        self.generators: dict[tuple[int, str, int | None], torch.Generator] = {}


_PRIVATE = _PerThread()


def draw_probes(
    distribution: str,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device | str | None,
    generator: torch.Generator,
) -> Tensor:
    """Draw probes of ``shape`` with identity second moment along the last dim.

    Args:
        distribution: one of :data:`DISTRIBUTIONS`.
        shape: ``(..., n)``; each length-``n`` row is one probe.
        dtype: floating dtype of the result.
        device: device of the result (``None``: the generator's).
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
    # already in dtype; moved only if the generator lives elsewhere (a no-op
    # .to() still costs a dispatch, noticeable on a small model)
    return v if device is None or where == torch.device(device) else v.to(device)


# every byte's eight signs, one row per byte value: row b holds +1 where bit
# i of b is set (8 KiB in float32), per (dtype, device)
_SIGNS: dict[tuple[torch.dtype, torch.device], Tensor] = {}
_SIGNS_PER_DRAW = 8


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The (256, 8) table of ±1 whose row ``b`` spells the bits of ``b``."""
    key = (dtype, device)
    table = _SIGNS.get(key)
    if table is None:
        byte = torch.arange(256, device=device).unsqueeze(1)
        bits = byte >> torch.arange(_SIGNS_PER_DRAW, device=device)
        table = (bits & 1).to(dtype).mul_(2).sub_(1)
        # kept only if it is a plain tensor made outside a CUDA graph capture:
        # a FakeTensor (tracing) or a capture's private memory would break
        # every later draw
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if type(table) is Tensor and not capturing:
            _SIGNS[key] = table
    return table


def _rademacher(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> Tensor:
    """Independent ±1 entries of ``shape``.

    One uniform byte per eight entries, looked up in a table of each byte's
    eight signs: two kernels whatever the size. ``randint(0, 2)`` makes one
    generator call per entry (about 15 ns each on a CPU) and its ``* 2 - 1``
    two more kernels; unpacking bits from random words by shifts and masks
    makes fewer calls but six kernels, each of which costs more inside a
    training step than timed alone. Measured on 2 CPU threads: 5,120 signs in
    25 µs (unpacked words 68, ``randint`` 90); 512,000 in 1.0 ms (1.0, 6.7).

    Returns:
        Tensor of ``shape``, on ``device``, in ``dtype``.
    """
    n = math.prod(shape)
    # random_(0, 256) on int32 takes one 32-bit draw per byte; 256 divides
    # 2**32, so each byte, and each of its bits, is exactly uniform
    index = torch.empty(-(-n // _SIGNS_PER_DRAW), dtype=torch.int32, device=device)
    index.random_(0, 256, generator=generator)
    signs = _sign_table(dtype, device).index_select(0, index)
    if n % _SIGNS_PER_DRAW:  # a partial last byte: drop its extra signs
        signs = signs.reshape(-1)[:n]
    return signs.reshape(shape)


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
