r"""The transfer theorem and the norm bounds on geometric complexity.

**Transfer theorem** (Dherin et al. 2022, Thm. 5.1, for a dense network with
biases). Let layer :math:`l` compute :math:`z_l = W_l h_l + b_l` from its input
:math:`h_l` (:math:`h_1 = x`), and let :math:`f` be any scalar output. Since
:math:`\partial f/\partial W_l = \delta_l h_l^\top` and
:math:`\partial f/\partial b_l = \delta_l` with
:math:`\delta_l=\partial f/\partial z_l`,

.. math::

    \|\nabla_\theta f\|^2 = \sum_l \|\delta_l\|^2 (1 + \|h_l\|^2), \qquad
    \|\nabla_x f\| \le \|\nabla_x h_l\|_2\,\|W_l\|_2\,\|\delta_l\|,

so :math:`T_l^2 \|\nabla_x f\|^2 \le \|\nabla_{\theta_l} f\|^2` for every layer with
:math:`T_l^2 = (1+\|h_l\|^2)/(\|W_l\|_2^2\,\|\nabla_x h_l\|_2^2)`, and summing over
layers

.. math::  \|\nabla_x f\|^2 \le \frac{\|\nabla_\theta f\|^2}{\sum_l T_l^2}.

Operator (spectral) norms give the tightest valid bound; without biases the
"1 +" drops out. Summed over the k outputs it bounds
:math:`\|\nabla_x g\|_F^2`.

**Norm bounds** (ReLU networks, :math:`|\sigma'|\le 1`):
:math:`\mathrm{GC} \le \|W_L\|_F^2\prod_{i<L}\|W_i\|_2^2 \le \prod_i\|W_i\|_F^2`
(the link to L2 regularization) and
:math:`\mathrm{GC} \le \min(d, k)\prod_i \|W_i\|_2^2` (the Lipschitz link to
spectral-norm regularization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from geocomplexity.jacobian import (
    _FORWARD_AD,
    _check_model_matches,
    check_input,
    forward_failed,
)
from geocomplexity.state import in_this_thread, preserved

__all__ = ["TransferBound", "norm_bounds", "transfer_bound"]

#: Elementwise activations the transfer theorem accepts between layers.
_ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Identity,
    nn.GELU,
    nn.Sigmoid,
    nn.ELU,
    nn.Softplus,
    nn.SiLU,
    nn.Hardtanh,
)


#: Those with |σ'| ≤ 1 everywhere, which the norm bounds need (GELU and SiLU
#: overshoot slightly).
_ONE_LIPSCHITZ = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Identity,
    nn.Sigmoid,
    nn.ELU,
    nn.Softplus,
    nn.Hardtanh,
)


def _linear_layers(
    model: nn.Module, allowed: tuple[type[nn.Module], ...] = _ACTIVATIONS
) -> list[nn.Linear]:
    """The Linear layers of a dense Sequential network, or a clear error.

    Raises:
        TypeError: not a Sequential of Linear layers and elementwise activations.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            "the bounds are stated for dense networks: give an nn.Sequential of "
            f"Linear layers and elementwise activations, not {type(model).__name__}"
        )
    layers = []
    for m in model:
        if isinstance(m, nn.Linear):
            layers.append(m)
        elif not isinstance(m, (*allowed, nn.Flatten)):
            raise TypeError(
                f"{type(m).__name__} is not a Linear layer or an accepted "
                "elementwise activation; these bounds cover dense networks with "
                f"{', '.join(a.__name__ for a in allowed)}"
            )
    if not layers:
        raise TypeError("the network has no Linear layer")
    return layers


@dataclass(frozen=True)
class TransferBound:
    r"""Both sides of the transfer theorem, per sample and per output.

    Every tensor is float64, whatever the model's dtype.

    Attributes:
        input_grad_sq: ``(B, k)`` — :math:`\|\nabla_x f_j(x_i)\|^2`.
        param_grad_sq: ``(B, k)`` — :math:`\|\nabla_\theta f_j(x_i)\|^2`.
        t_sq: ``(B, L)`` — :math:`T_l^2` per sample and layer.
        bound: ``(B, k)`` — :math:`\|\nabla_\theta f_j\|^2 / \sum_l T_l^2`.
        rtol: the relative slack of :attr:`holds`, for the rounding of the
            passes in the model's dtype: 1e-6, or 4 eps of that dtype where
            that is more (bfloat16's 0.031, float16's 0.0039).
    """

    input_grad_sq: Tensor
    param_grad_sq: Tensor
    t_sq: Tensor
    bound: Tensor
    rtol: float = 1e-6

    @property
    def holds(self) -> Tensor:
        """``(B, k)`` booleans: the inequality, with :attr:`rtol` relative slack."""
        return self.input_grad_sq <= self.bound * (1 + self.rtol) + 1e-30

    @property
    def tightness(self) -> Tensor:
        """``(B, k)``: left over right side; ≤ 1 where it holds, NaN for 0/0."""
        return self.input_grad_sq / self.bound


def transfer_bound(model: nn.Module, x: Tensor) -> TransferBound:
    """Evaluate the transfer theorem on a dense network, per sample and output.

    Args:
        model: an ``nn.Sequential`` of ``Linear`` layers, each used once, and
            elementwise activations; measured in eval mode and left as found.
        x: inputs ``(B, d)``.

    Returns:
        A :class:`TransferBound`.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 2))
        >>> bool(transfer_bound(net, torch.randn(16, 3)).holds.all())
        True
    """
    layers = _linear_layers(model)
    if len({id(lin) for lin in layers}) < len(layers):
        raise TypeError(
            "a Linear layer appears more than once in the network (shared "
            "weights); the transfer theorem needs every layer to have its own"
        )
    check_input(x)
    _check_model_matches(model, x)
    first = next(i for i, m in enumerate(model) if isinstance(m, nn.Linear))
    flattened = any(isinstance(m, nn.Flatten) for m in list(model)[:first])
    n = layers[0].in_features
    if x.dim() > 2 and not flattened and x.shape[-1] == n != x[0].numel():
        # the theorem's ∂f/∂W_l = δ_l h_lᵀ is for one vector h_l per sample;
        # a Linear on (B, ..., n) shares W_l over the other axes
        raise TypeError(
            f"the first Linear layer would act on the last axis of inputs of "
            f"shape {tuple(x.shape)}, its weight shared over the others; the "
            "transfer theorem covers dense networks whose Linear layers see "
            "one vector per sample"
        )
    x = x.detach().reshape(x.shape[0], -1)
    B = x.shape[0]
    h_in: list[Tensor] = []
    z_out: list[Tensor] = []

    def keep(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        h_in.append(args[0])
        out.retain_grad()
        z_out.append(out)
        # the rest of the network gets a copy: an in-place activation
        # (ReLU(inplace=True)) would otherwise overwrite z_l, and the gradient
        # retained on it would be ∂f/∂σ(z_l), not δ_l = ∂f/∂z_l
        return out.clone()

    with preserved(model, mode="eval"), torch.enable_grad():
        handles = [lin.register_forward_hook(in_this_thread(keep)) for lin in layers]
        try:
            xg = x.clone().requires_grad_(True)
            out = model(xg).reshape(B, -1)
        except RuntimeError as err:
            raise forward_failed(err, x) from err
        finally:
            for handle in handles:
                handle.remove()
        k = out.shape[1]
        # the sums and norms in float64 whatever the model's dtype (the
        # passes stay in it): in float32 they rounded the two sides of the
        # theorem's equality case (one layer, one output) up to 1.5e-6 apart,
        # past the slack of ``holds``
        f64 = torch.float64
        input_sq = x.new_zeros(B, k, dtype=f64)
        param_sq = x.new_zeros(B, k, dtype=f64)
        for j in range(k):
            for z in z_out:
                z.grad = None
            xg.grad = None
            out[:, j].sum().backward(retain_graph=j < k - 1, inputs=[xg, *z_out])
            # samples are independent in a dense network: row i is sample i's
            input_sq[:, j] = xg.grad.to(f64).pow(2).sum(1)
            for lin, h, z in zip(layers, h_in, z_out, strict=True):
                delta_sq = z.grad.to(f64).pow(2).sum(1)
                bias = 1.0 if lin.bias is not None else 0.0
                h_sq = h.detach().to(f64).pow(2).sum(1)
                param_sq[:, j] += delta_sq * (bias + h_sq)
        t_sq = torch.stack(
            [
                _t_sq(lin, h.detach().to(f64), _jacobian_opnorm(model, x, i))
                for i, (lin, h) in enumerate(zip(layers, h_in, strict=True))
            ],
            dim=1,
        )
    total = t_sq.sum(1, keepdim=True)
    # every T_l = 0 (no biases and every h_l = 0, so x = 0): then the gradient
    # with respect to the parameters vanishes too, and the theorem says 0 <= 0
    # of the input gradient, which it leaves unbounded
    bound = torch.where(total == 0, math.inf, param_sq / total)
    # the gradients are rounded in the passes' dtype: where the theorem is an
    # equality (every layer tight), the left side of chains of 1 to 4 such
    # layers came out up to 1.5e-3 above the right in bfloat16 (0.2 eps) and
    # 3.4e-4 in float16 (0.35 eps), against 1e-6 in float32 and below
    rtol = max(1e-6, 4 * torch.finfo(x.dtype).eps)
    return TransferBound(
        input_sq.detach(), param_sq.detach(), t_sq, bound.detach(), rtol
    )


def _t_sq(lin: nn.Linear, h: Tensor, jac_norm: Tensor) -> Tensor:
    """T_l² per sample.

    Infinite where h_l does not depend on x, or W_l = 0: then f does not
    depend on x either, and the bound is 0, equal to the left side. That holds
    for 0/0 too (a bias-free layer whose input is a dead ReLU layer's output),
    which division alone would make NaN.
    """
    w = torch.linalg.matrix_norm(lin.weight.detach().to(h.dtype), ord=2)
    bias = 1.0 if lin.bias is not None else 0.0
    den = w**2 * jac_norm**2
    return torch.where(den == 0, math.inf, (bias + h.pow(2).sum(1)) / den)


def _jacobian_opnorm(model: nn.Sequential, x: Tensor, layer: int) -> Tensor:
    """‖∂h_l/∂x‖₂ per sample (float64), h_l the input of Linear ``layer``."""
    seen = -1
    prefix = []
    for m in model:
        if isinstance(m, nn.Linear):
            seen += 1
            if seen == layer:
                break
        prefix.append(m)
    # h_1 = x (norm 1) only where nothing but Flatten (of the already flat x)
    # comes first; an activation there makes h_1 = σ(x), whose Jacobian is
    # diag σ'(x), of norm max|σ'| (3 for LeakyReLU(3), 0 for ReLU at x < 0)
    if all(isinstance(m, nn.Flatten) for m in prefix):
        return x.new_ones(x.shape[0], dtype=torch.float64)
    head = nn.Sequential(*prefix)

    def single(xi: Tensor) -> Tensor:
        return head(xi[None])[0]

    # jacfwd opens a forward-mode level, one for the process: not while
    # another thread's jvp pass holds one (see jacobian._FORWARD_AD)
    with _FORWARD_AD, torch.no_grad():
        J = torch.func.vmap(torch.func.jacfwd(single))(x)  # (B, d_l, d)
    return torch.linalg.matrix_norm(J.to(torch.float64), ord=2)


def norm_bounds(model: nn.Module) -> dict[str, float]:
    """Upper bounds on the GC of a dense network with 1-Lipschitz activations.

    Args:
        model: an ``nn.Sequential`` of ``Linear`` layers and such activations;
            its weights are read as in eval mode, and it is left as found.

    Returns:
        ``{"frobenius_spectral": ‖W_L‖_F² Π_{i<L} ‖W_i‖₂²,
        "frobenius": Π ‖W_i‖_F², "lipschitz": min(d, k) Π ‖W_i‖₂²}``; each is
        ≥ the GC on any data where the output is one vector per sample (a
        Linear layer on a multi-axis input with no Flatten after it repeats
        over the other axes, and the GC grows with their size).
    """
    layers = _linear_layers(model, _ONE_LIPSCHITZ)
    if any(isinstance(m, nn.LeakyReLU) and abs(m.negative_slope) > 1 for m in model):
        raise TypeError("a LeakyReLU with |slope| > 1 is not 1-Lipschitz")
    if any(isinstance(m, nn.ELU) and abs(m.alpha) > 1 for m in model):
        raise TypeError("an ELU with |alpha| > 1 is not 1-Lipschitz")
    # in eval mode, buffers put back: a weight computed by torch's
    # spectral_norm parametrization runs a power step on each read in train
    # mode, which would move its buffers and bound another weight than the
    # model's own
    with preserved(model, mode="eval"), torch.no_grad():
        # in float64 whatever the weights' dtype: float32 sums round the
        # bounds below the GC they bound where they are tight (one layer)
        weights = [lin.weight.to(torch.float64) for lin in layers]
        spec = [torch.linalg.matrix_norm(w, ord=2).item() ** 2 for w in weights]
        frob = [w.pow(2).sum().item() for w in weights]
    # the Jacobian's rank is at most k and the in_features of any Linear layer
    # after which nothing reshapes: the first one after the last Flatten (a
    # Linear before a Flatten acts on the last axis of a multi-axis input,
    # so the first layer's in_features can be less than d)
    mods = list(model)
    flat = [i for i, m in enumerate(mods) if isinstance(m, nn.Flatten)]
    after = [m for m in mods[flat[-1] if flat else 0 :] if isinstance(m, nn.Linear)]
    d, k = (after or layers)[0].in_features, layers[-1].out_features
    return {
        "frobenius_spectral": frob[-1] * math.prod(spec[:-1]),
        "frobenius": math.prod(frob),
        "lipschitz": min(d, k) * math.prod(spec),
    }
