r"""Flatness: the squared norm of the loss gradient in the parameters.

.. math::  R(\theta) = \lambda\,\|\nabla_\theta L(\theta)\|^2

Explicit gradient regularization. Implicit gradient regularization (Barrett &
Dherin 2021) says that gradient descent with step :math:`h` follows the modified
loss :math:`L + \frac h4\|\nabla_\theta L\|^2`, so plain GD at learning rate
:math:`h` already carries this term with :math:`\lambda = h/4`.

``method="double_backprop"`` differentiates the gradient norm directly (its
parameter gradient is :math:`2\lambda H g`). ``method="finite_difference"``
uses first-order autograd only: :math:`Hg \approx (\nabla L(\theta + r g) -
\nabla L(\theta))/r` with :math:`r = \varepsilon/\|g\|`, returned through a
surrogate whose value is :math:`\lambda\|g\|^2` and whose gradient is
:math:`2\lambda Hg` (the "gradient norm penalty" of Zhao et al. 2022 and SAM's
two-pass structure).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geocomplexity.regularizers.base import LossFn, Regularizer, check_strength
from geocomplexity.state import kept_buffers

__all__ = ["GradientNorm"]


class GradientNorm(Regularizer):
    """``strength · ‖∇_θ loss_fn(model(inputs), targets)‖²``.

    Args:
        strength: λ ≥ 0.
        method: ``"double_backprop"`` or ``"finite_difference"``.
        eps: parameter-space step of the finite difference (its length).
    """

    def __init__(
        self, strength: float, method: str = "double_backprop", eps: float = 1e-3
    ) -> None:
        self.strength = check_strength(strength)
        if method not in ("double_backprop", "finite_difference"):
            raise ValueError(
                f"unknown method {method!r}; choose 'double_backprop' or "
                "'finite_difference'"
            )
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.method, self.eps = method, eps

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor | None = None,
        *,
        outputs: Tensor | None = None,
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        """The penalty on this batch.

        Returns:
            A scalar tensor; its parameter gradient is ``2 λ H g``.

        Raises:
            ValueError: no targets, or no trainable parameters.
        """
        if targets is None:
            raise ValueError("GradientNorm needs the batch's targets for the loss")
        loss_fn = loss_fn or F.cross_entropy
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        if outputs is None:
            outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        if self.method == "double_backprop":
            grads = torch.autograd.grad(loss, params, create_graph=True)
            return self.strength * sum(g.pow(2).sum() for g in grads)
        # the caller's backward still needs this graph: retain it
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        sq = sum(g.pow(2).sum() for g in grads)
        r = self.eps / (sq.sqrt().item() + 1e-30)
        # θ + r·g through functional_call: no in-place change to the parameters,
        # whose versions the caller's graph checks; running statistics restored
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        shifted_params = {
            n: (p + r * g).detach().requires_grad_(True)
            for n, p, g in zip(names, params, grads, strict=True)
        }
        with kept_buffers(model), torch.enable_grad():
            out = torch.func.functional_call(model, shifted_params, (inputs,))
            shifted = torch.autograd.grad(
                loss_fn(out, targets), list(shifted_params.values())
            )
        hg = [(s - g) / r for s, g in zip(shifted, grads, strict=True)]
        # value λ‖g‖², gradient 2λHg, without a second-order graph
        link = sum((p * (2 * h)).sum() for p, h in zip(params, hg, strict=True))
        return self.strength * (sq + link - link.detach())

    def __repr__(self) -> str:
        return f"GradientNorm({self.strength!r}, method={self.method!r})"
