r"""L2 (parameter-norm) penalty.

.. math::  R(\theta) = \lambda \sum_{W} \|W\|_F^2

over weight matrices and kernels (biases only with ``include_biases=True``; the
paper's bound :math:`\mathrm{GC}\le\prod_i\|W_i\|_F^2` involves weights alone).
No ½: the gradient is :math:`2\lambda W`, so SGD with this penalty at
strength :math:`\lambda` equals SGD with ``weight_decay`` :math:`=2\lambda` on
the parameters the penalty covers: with ``include_biases=True``, on all
trainable ones (plain ``weight_decay=2λ``); by default, on the parameters of
two or more dimensions alone, in a parameter group of their own (the biases'
group at ``weight_decay=0``), as plain ``weight_decay`` decays the biases too.
So too for Adam's ``weight_decay``, which is added to the gradient; not for
AdamW's, which is decoupled from it.

Like weight decay, it acts on the trainable parameters as stored: a weight is
any parameter of two or more dimensions. For a parametrized weight
(``torch.nn.utils.parametrize``, ``weight_norm``) that is the parameters the
weight is computed from, not the computed weight, and weight norm's
``(out, 1, ...)`` scale counts as one; frozen parameters are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from geocomplexity.regularizers.base import (
    LossFn,
    Regularizer,
    at_least_float32,
    backward_into,
    check_strength,
    grad_buffer,
    hooked,
    trainable,
)

__all__ = ["L2"]


class L2(Regularizer):
    """``strength · Σ ‖W‖²`` over the model's weights.

    Args:
        strength: λ ≥ 0.
        include_biases: also penalise 1-D parameters (biases, norm scales).
    """

    def __init__(self, strength: float, include_biases: bool = False) -> None:
        self.strength = check_strength(strength)
        self.include_biases = include_biases

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        *,
        outputs: Tensor | None = None,
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        """The penalty; ``inputs``, ``targets``, ``outputs`` are not needed.

        Returns:
            A scalar tensor on the parameters' device, in float32 at least.
        """
        # each sum of squares in float32 at least: a float16 model's Σ‖W‖²
        # passes 65504 (an N(0, 1) embedding of 1000×128 alone) and read inf
        return self.strength * sum(
            p.pow(2).sum(dtype=at_least_float32(p.dtype)) for p in self._weights(model)
        )

    def backward(  # noqa: D102 - see Regularizer.backward
        self,
        loss: Tensor,
        model: nn.Module,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        *,
        outputs: Tensor | None = None,
        loss_fn: LossFn | None = None,
        params: list[Tensor] | None = None,
    ) -> Tensor:
        # the task loss alone through autograd, then 2λW added to each
        # weight's .grad in one fused call: no graph for the penalty, whose
        # nodes (and the sum of two gradients per weight) cost as much as the
        # penalty itself on a small model
        # a list: the parameters are walked twice (an iterator would be spent)
        params = trainable(model) if params is None else list(params)
        weights = self._weights(model)  # leaves: parameters() yields no others
        wanted = {id(p) for p in params}
        if any(hooked(w) for w in weights if id(w) in wanted):
            # a hook on a weight's gradient sees the whole of it: through autograd
            return super().backward(
                loss,
                model,
                inputs,
                targets,
                outputs=outputs,
                loss_fn=loss_fn,
                params=params,
            )
        backward_into(loss, params)
        with torch.no_grad():
            mine, grads = [], []
            for w in weights:
                if id(w) not in wanted:
                    continue
                grad = grad_buffer(w)
                if grad.is_sparse:  # a sparse embedding's: made dense, as
                    # autograd's sum with the penalty's gradient would be
                    w.grad = torch.mul(w, 2 * self.strength).add_(grad)
                else:
                    mine.append(w)
                    grads.append(grad)
            if mine:
                torch._foreach_add_(grads, mine, alpha=2 * self.strength)
            # as in __call__: in float32 at least (a float16 norm's square
            # overflows, and its 3 digits would not match the call's value)
            dtype = at_least_float32(*(w.dtype for w in weights))
            norms = torch._foreach_norm(weights, 2, dtype=dtype)
            value = torch.stack(norms).square().sum()
        return self.strength * value

    def _weights(self, model: nn.Module) -> list[Tensor]:
        weights = [
            p
            for p in model.parameters()
            if p.requires_grad and (self.include_biases or p.dim() > 1)
        ]
        if not weights:
            raise ValueError("the model has no trainable weights to penalise")
        return weights

    def __repr__(self) -> str:
        return f"L2({self.strength!r}, include_biases={self.include_biases})"
