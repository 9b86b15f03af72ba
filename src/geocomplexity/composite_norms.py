r"""Normalisation layers as composite operations, for the jvp penalty.

A ``"jvp"`` GC penalty pushes a tangent through the model by forward-mode AD and
then backpropagates the tangent's norm to the parameters. PyTorch's fused
``layer_norm``, ``batch_norm`` with batch statistics and ``instance_norm`` have
forward-mode derivatives that are right, but that cannot be backpropagated: the
mean and inverse standard deviation they save enter as constants, so the
parameter gradients come out wrong, silently (in PyTorch 2.13: the gradient of
:math:`\|Ju\|^2` through a ``LayerNorm`` was off by a factor of three against
central differences; pytorch/pytorch#196699 and #196700). Their double backward
(the ``"projection"`` and ``"exact"`` penalties) is right, and so are
``group_norm``, ``rms_norm`` and ``batch_norm`` with running statistics (an
affine map).

:func:`composite_norms` reroutes the affected functions, for the duration of a
block, to the same arithmetic written with primitive operations (mean,
variance, reciprocal square root), whose derivatives of every order autograd
knows. The rerouting works on the functional calls, so it covers the
``torch.nn`` modules and any custom module that calls the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["composite_norms"]


def _normalise(x: Tensor, dims: Sequence[int], eps: float) -> tuple[Tensor, Tensor]:
    """``(x − mean)/√(var + eps)`` over ``dims`` (biased variance), and the mean."""
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps), mean


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Per-channel scale and shift; channels on dim 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        x = x * weight.reshape(shape)
    if bias is not None:
        x = x + bias.reshape(shape)
    return x


def _update(running: Tensor | None, value: Tensor, momentum: float | None) -> None:
    """``running ← (1 − m)·running + m·value``, as BatchNorm does; in place."""
    if running is not None:
        with torch.no_grad():
            running.mul_(1 - (momentum or 0.0)).add_(
                value.to(running.dtype), alpha=momentum or 0.0
            )


def _layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    out, _ = _normalise(input, dims, eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if not training and running_mean is not None and running_var is not None:
        # running statistics: an affine map, whose fused formulas are right
        return F.batch_norm(
            input, running_mean, running_var, weight, bias, False, momentum, eps
        )
    per_channel = input.numel() // input.shape[1]
    if training and per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input "
            f"size {tuple(input.shape)}"
        )
    dims = (0, *range(2, input.dim()))
    out, mean = _normalise(input, dims, eps)
    if training:
        var = input.detach().var(dims, unbiased=True)
        _update(running_mean, mean.detach().flatten(), momentum)
        _update(running_var, var, momentum)
    return _affine(out, weight, bias)


def _instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if not use_input_stats:  # running statistics: an affine map
        return F.instance_norm(
            input, running_mean, running_var, weight, bias, False, momentum, eps
        )
    dims = tuple(range(2, input.dim()))
    out, mean = _normalise(input, dims, eps)
    # the running statistics average each sample's (as aten::instance_norm)
    _update(running_mean, mean.detach().flatten(1).mean(0), momentum)
    if running_var is not None:
        var = input.detach().var(dims, unbiased=True).mean(0)
        _update(running_var, var, momentum)
    return _affine(out, weight, bias)


_COMPOSITES = {
    F.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
}


class _CompositeNorms(TorchFunctionMode):
    """Reroutes the fused normalisations to :data:`_COMPOSITES`."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        composite = _COMPOSITES.get(func)
        return (composite or func)(*args, **(kwargs or {}))


def composite_norms() -> _CompositeNorms:
    """A block in which layer, batch and instance norm run as composite ops.

    For passes whose forward-mode derivative is backpropagated (the ``"jvp"``
    GC penalty): see the module docstring. Outside such passes the fused
    kernels are right and faster.

    Returns:
        A context manager.

    Example:
        >>> import torch
        >>> ln = torch.nn.LayerNorm(4)
        >>> x = torch.randn(3, 4)
        >>> with composite_norms():
        ...     y = ln(x)
        >>> torch.allclose(y, ln(x), atol=1e-6)
        True
    """
    return _CompositeNorms()
