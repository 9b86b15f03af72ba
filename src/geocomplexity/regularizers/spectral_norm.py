r"""Spectral-norm penalty (Yoshida & Miyato 2017) by persistent power iteration.

.. math::  R(\theta) = \lambda \sum_{l} \sigma_{\max}(W_l)^2

over the model's ``Linear`` and convolution layers. For a ReLU network,
:math:`\mathrm{GC}\le\min(d,k)\prod_l\sigma_{\max}(W_l)^2`, so the penalty
controls GC through the Lipschitz constant.

For a convolution, ``conv="operator"`` (default) uses the norm of the linear
map the layer applies to its input (at the input size it was first seen with,
padding and stride included), found by power iteration with the convolution and
its adjoint. ``conv="reshaped"`` uses the kernel reshaped to
``(out_channels, in_channels·k…)``, as ``torch.nn.utils.spectral_norm`` does;
that is a different number (neither a bound nor the operator norm in general)
and is named as such.

One power-iteration step per call, from the vectors the last call left: with
slowly moving weights the estimate tracks :math:`\sigma_{\max}` closely, and the
penalty's gradient is :math:`2\lambda\sigma\,u v^\top`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from geocomplexity.regularizers.base import (
    LossFn,
    Regularizer,
    check_strength,
    trainable,
)
from geocomplexity.state import preserved

__all__ = ["SpectralNorm", "spectral_norms"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SpectralNorm(Regularizer):
    """``strength · Σ_l σ_max(W_l)²`` over Linear and Conv layers.

    Args:
        strength: λ ≥ 0.
        conv: ``"operator"`` (the convolution's operator norm) or ``"reshaped"``
            (the reshaped kernel's norm).
        power_iterations: steps per call (1 follows the paper's recipe).
        generator: randomness for the initial vectors.
    """

    def __init__(
        self,
        strength: float,
        conv: str = "operator",
        power_iterations: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        self.strength = check_strength(strength)
        if conv not in ("operator", "reshaped"):
            raise ValueError(f"unknown conv {conv!r}; choose 'operator' or 'reshaped'")
        if not isinstance(power_iterations, int) or power_iterations < 1:
            raise ValueError("power_iterations must be a positive integer")
        self.conv, self.power_iterations = conv, power_iterations
        self.generator = generator or torch.Generator().manual_seed(0)
        self._vectors: dict[str, tuple[Tensor, Tensor]] = {}
        self._warned = False
        self._shapes: dict[str, tuple[int, ...]] = {}

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        *,
        outputs: Tensor | None = None,
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        """The penalty; ``inputs`` is needed once to learn conv input sizes.

        Returns:
            A scalar tensor, differentiable in the weights.
        """
        sigmas = self.sigmas(model, inputs)
        if not sigmas:
            raise ValueError("the model has no Linear or Conv layer to penalise")
        return self.strength * sum(s.pow(2) for s in sigmas.values())

    def sigmas(
        self, model: nn.Module, inputs: Tensor | None = None
    ) -> dict[str, Tensor]:
        """One power-iteration step per layer; the largest singular values.

        Args:
            model: the model.
            inputs: a batch, used (one sample of it) the first time a conv layer
                is met, to learn its input size.

        Returns:
            ``{layer name: σ}``, each differentiable in that layer's weight.

        Raises:
            ValueError: an operator-norm conv layer whose input size is unknown.
        """
        out = {}
        for name, m, operator in self._layers(model, inputs):
            if operator:
                out[name] = self._operator(name, m)
            else:
                out[name] = self._dense(name, m.weight.flatten(1))
        return out

    def backward(  # noqa: D102 - see Regularizer.backward
        self,
        loss: Tensor,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor | None = None,
        *,
        outputs: Tensor | None = None,
        loss_fn: LossFn | None = None,
        params: list[Tensor] | None = None,
    ) -> Tensor:
        # Dense (and reshaped-kernel) layers and zero-padded operator-norm
        # convolutions by hand: a power step without a graph, then the
        # gradient 2λ·(Wv)vᵀ (or 2λ·conv_weight(v, Av)) straight into W.grad,
        # with no temporary to add. A weight that is computed (a
        # parametrization, a weight-norm hook) or a conv with another padding
        # mode goes through autograd with the task loss instead.
        if params is None:
            params = trainable(model)
        wanted = {id(p) for p in params}
        layers = self._layers(model, inputs)
        if not layers:
            raise ValueError("the model has no Linear or Conv layer to penalise")
        by_hand: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        graph: list[Tensor] = []
        for name, m, operator in layers:
            W = m.weight
            step = None
            if W.grad_fn is None:  # a leaf: its gradient can be written directly
                step = (
                    self._operator_step(name, m)
                    if operator
                    else self._dense_step(name, W.flatten(1))
                )
            if step is not None:
                by_hand[name] = step
            elif operator:
                graph.append(self._operator(name, m).pow(2))
            else:
                graph.append(self._dense(name, W.flatten(1)).pow(2))
        total = loss + self.strength * sum(graph) if graph else loss
        total.backward(inputs=params)
        value = sum(g.detach() for g in graph) if graph else loss.new_zeros(())
        with torch.no_grad():
            for name, m, operator in layers:
                if name not in by_hand:
                    continue
                Av, v, sq = by_hand[name]
                value = value + sq  # σ² = ‖A v‖², as in __call__
                W = m.weight
                if id(W) not in wanted:
                    continue
                if W.grad is None:
                    W.grad = torch.zeros_like(W)
                if operator:
                    self._add_operator_grad(m, Av, v)
                elif W.grad.is_contiguous():
                    W.grad.view(W.shape[0], -1).addr_(Av, v, alpha=2 * self.strength)
                else:
                    W.grad += (2 * self.strength * torch.outer(Av, v)).view_as(W)
        return self.strength * value

    def _layers(
        self, model: nn.Module, inputs: Tensor | None
    ) -> list[tuple[str, nn.Module, bool]]:
        """``(name, module, operator norm?)`` of every Linear and Conv layer.

        Raises:
            ValueError: an operator-norm conv layer whose input size is unknown.
        """
        layers: list[tuple[str, nn.Module, bool]] = []
        skipped: list[str] = []
        for n, m in model.named_modules():  # one walk: this runs every step
            if isinstance(m, (nn.Linear, *_CONV)):
                layers.append((n, m, isinstance(m, _CONV) and self.conv == "operator"))
            elif isinstance(m, nn.modules.conv._ConvTransposeNd):
                skipped.append(n)
        if skipped and not self._warned:
            self._warned = True
            warnings.warn(
                f"SpectralNorm leaves out transposed convolutions ({skipped[:4]}): "
                "their norms are not in the penalty, nor in the GC bound",
                stacklevel=3,
            )
        if any(op and n not in self._shapes for n, _, op in layers):
            if inputs is None:
                raise ValueError(
                    "the operator norm of a conv layer depends on its input size: "
                    "pass a batch of inputs on the first call"
                )
            self._record_shapes(model, inputs[:1])
        # first vectors drawn in layer order, whatever order the steps run in
        for name, m, operator in layers:
            W = m.weight.detach()
            if operator:
                self._init(name, self._out_shape(name, m), (1, *self._shapes[name]), W)
            else:
                self._init(name, (W.shape[0],), (math.prod(W.shape[1:]),), W)
        return layers

    def _record_shapes(self, model: nn.Module, x: Tensor) -> None:
        def hook(name: str):
            def record(_m: nn.Module, args: tuple[Any, ...]) -> None:
                self._shapes[name] = tuple(args[0].shape[1:])

            return record

        handles = [
            m.register_forward_pre_hook(hook(n))
            for n, m in model.named_modules()
            if isinstance(m, _CONV)
        ]
        try:
            with preserved(model, mode="eval"), torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()

    def _init(
        self,
        name: str,
        shape_u: tuple[int, ...],
        shape_v: tuple[int, ...],
        like: Tensor,
    ) -> tuple[Tensor, Tensor]:
        if name not in self._vectors:
            g = self.generator
            u = torch.randn(shape_u, generator=g, device=g.device).to(like)
            v = torch.randn(shape_v, generator=g, device=g.device).to(like)
            self._vectors[name] = (u / u.norm(), v / v.norm())
        u, v = self._vectors[name]
        if u.device != like.device or u.dtype != like.dtype:  # loaded on the CPU
            u, v = u.to(like), v.to(like)
            self._vectors[name] = (u, v)
        return u, v

    def _right_vector(self, name: str, W: Tensor) -> Tensor:
        """Power iteration on a matrix up to the last half-step: ``v``.

        ``σ = ‖W v‖ = u·(W v)`` with ``u = W v/‖W v‖``: the caller takes that
        last product (with or without grad), so W is read twice per call.
        """
        u, v = self._init(name, (W.shape[0],), (W.shape[1],), W)
        with torch.no_grad():
            for _ in range(self.power_iterations - 1):
                v = _unit(W.T @ u)
                u = _unit(W @ v)
            return _unit(W.T @ u)

    def _dense_step(self, name: str, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One power step without grad: ``(W v, v, σ²)``, ``σ = ‖W v‖``."""
        v = self._right_vector(name, W)
        with torch.no_grad():
            Wv = W @ v
            norm = torch.linalg.vector_norm(Wv)
            self._vectors[name] = (Wv / norm.clamp_min(1e-12), v)
        return Wv, v, norm * norm

    def _dense(self, name: str, W: Tensor) -> Tensor:
        v = self._right_vector(name, W)
        Wv = W @ v
        u = _unit(Wv.detach().clone())
        self._vectors[name] = (u, v)
        return u @ Wv

    def _operator(self, name: str, m: nn.Module) -> Tensor:
        _, v, _ = self._power_operator(name, m)
        u = self._vectors[name][0]
        return (u * m._conv_forward(v, m.weight, None)).sum()

    def _out_shape(self, name: str, m: nn.Module) -> tuple[int, ...]:
        """The layer's output shape for one input of the recorded size."""
        if name in self._vectors:  # u has it: no probe forward every call
            return tuple(self._vectors[name][0].shape)
        with torch.no_grad():
            zero = torch.zeros((1, *self._shapes[name])).to(m.weight)
            return tuple(m._conv_forward(zero, m.weight, None).shape)

    def _operator_step(
        self, name: str, m: nn.Module
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """One power step on a convolution for the hand-made gradient.

        Returns:
            ``(A v, v, σ²)``, or ``None`` where ``torch.nn.grad``'s weight
            gradient does not apply (non-zero padding modes, string padding):
            the caller then uses :meth:`_operator`.
        """
        if not _plain(m):
            return None
        Av, v, norm = self._power_operator(name, m)
        return Av, v, norm * norm

    def _power_operator(self, name: str, m: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Power iteration on the convolution ``A`` at its recorded input size.

        Without a graph; stores the new ``(u, v)``.

        Returns:
            ``(A v, v, ‖A v‖)``; ``σ = ‖A v‖ = u·(A v)``.
        """
        shape = (1, *self._shapes[name])
        W = m.weight.detach()
        u, v = self._init(name, self._out_shape(name, m), shape, W)
        with torch.no_grad():
            for _ in range(self.power_iterations):
                v = _unit(_adjoint(m, u, shape))  # Aᵀu, normalised
                Av = m._conv_forward(v, W, None)
                norm = torch.linalg.vector_norm(Av)
                u = Av / norm.clamp_min(1e-12)
        self._vectors[name] = (u, v)
        return Av, v, norm

    def _add_operator_grad(self, m: nn.Module, Av: Tensor, v: Tensor) -> None:
        """``W.grad += 2λ ∂(u·A_W v)σ/∂W = 2λ·conv*_weight(v, A v)``."""
        W = m.weight
        g = _helper(m, "weight")(v, W.shape, Av, **_options(m))
        W.grad.add_(g, alpha=2 * self.strength)

    def state_dict(self) -> dict[str, Any]:
        """Power-iteration vectors and conv input sizes.

        Returns:
            ``{"vectors": {name: (u, v)}, "shapes": {name: shape}}``.
        """
        return {
            "vectors": {
                n: (u.clone(), v.clone()) for n, (u, v) in self._vectors.items()
            },
            "shapes": dict(self._shapes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self._vectors = {
            n: (u.clone(), v.clone()) for n, (u, v) in state["vectors"].items()
        }
        self._shapes = dict(state["shapes"])

    def __repr__(self) -> str:
        return f"SpectralNorm({self.strength!r}, conv={self.conv!r})"


def _plain(m: nn.Module) -> bool:
    """Zero padding given as numbers: what ``torch.nn.grad``'s helpers handle."""
    return m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _options(m: nn.Module) -> dict[str, Any]:
    return {
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "groups": m.groups,
    }


def _helper(m: nn.Module, kind: str) -> Any:
    # by the kernel's rank, so subclasses (and parametrized convs) work too
    return getattr(torch.nn.grad, f"conv{len(m.kernel_size)}d_{kind}")


def _adjoint(m: nn.Module, u: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``Aᵀu`` for the layer's convolution ``A`` at input size ``shape``."""
    W = m.weight.detach()
    if _plain(m):
        with torch.no_grad():
            return _helper(m, "input")(shape, W, u, **_options(m))
    # other padding modes pad inside the forward: let autograd transpose it
    with torch.enable_grad():
        v = torch.zeros(shape, dtype=W.dtype, device=W.device, requires_grad=True)
        (adj,) = torch.autograd.grad(m._conv_forward(v, W, None), v, u)
    return adj


def spectral_norms(
    model: nn.Module,
    inputs: Tensor | None = None,
    *,
    conv: str = "operator",
    iterations: int = 200,
) -> dict[str, float]:
    """Converged largest singular values of every Linear/Conv layer.

    Args:
        model: the model.
        inputs: a batch (needed for conv operator norms).
        conv: as in :class:`SpectralNorm`.
        iterations: power-iteration steps.

    Returns:
        ``{layer name: σ_max}``.
    """
    term = SpectralNorm(1.0, conv=conv, power_iterations=iterations)
    return {n: s.item() for n, s in term.sigmas(model, inputs).items()}


def _unit(v: Tensor) -> Tensor:
    """``v / max(‖v‖, 1e-12)`` in place: F.normalize's value in two kernels.

    On a small model the power step's cost is per-kernel overhead, not flops.
    """
    return v.div_(torch.linalg.vector_norm(v).clamp_min_(1e-12))
