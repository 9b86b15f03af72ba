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

Under ``DistributedDataParallel`` the step follows the ranks' mean gradient
:math:`\bar g`, so the penalty is :math:`\lambda\|\bar g\|^2`, the same
value and the same averaged gradient as one process on the whole batch: the
ranks' gradients are averaged (by a differentiable all-reduce for double
backprop) before they are squared. The mean of the ranks' own
:math:`\|g_r\|^2` would be larger by their variance.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.stateless import _reparametrize_module
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map_only

from geocomplexity.jacobian import _autocast_dtype
from geocomplexity.regularizers.base import (
    LossFn,
    Regularizer,
    at_least_float32,
    check_batch,
    check_strength,
    hooked,
    refuse_reentrant_checkpoint,
    trainable,
)
from geocomplexity.state import (
    compiled,
    differentiable_attention,
    eager,
    kept_buffers,
    put_back,
    written_buffers,
)

__all__ = ["GradientNorm"]


def _param_grads(
    loss: Tensor, params: list[Tensor], **kwargs: Any
) -> tuple[list[Tensor], list[bool]]:
    """``∂loss/∂params``, zeros where the loss does not use a parameter.

    Plain ``autograd.grad`` refuses such a parameter (an idle head). A sparse
    gradient (an ``Embedding(sparse=True)``) comes back dense: the norms and
    sums of the finite difference have no sparse kernels.

    Returns:
        The gradients, and which parameters the loss uses.

    Raises:
        RuntimeError: a parameter only looks unused, hidden in a block
            checkpointed with ``use_reentrant=True``.
        ValueError: the loss uses none of ``params``.
    """
    grads = (
        torch.autograd.grad(loss, params, allow_unused=True, **kwargs)
        if loss.requires_grad
        else [None] * len(params)
    )
    used = [g is not None for g in grads]
    if not all(used):  # unused, or hidden in a reentrant checkpoint
        if loss.grad_fn is not None:
            refuse_reentrant_checkpoint(loss)
        if not any(used):
            raise ValueError(
                "the task loss depends on none of the model's trainable "
                "parameters, so its gradient norm would be 0: were the outputs "
                "handed over computed with other parameters (by "
                "torch.func.functional_call, or a copy of the model) or "
                "detached? Hand over model(inputs)'s, or leave outputs= out. "
                "(Under torch.no_grad() no loss has a gradient: take the "
                "penalty outside it.)"
            )
    return [
        torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g
        for p, g in zip(params, grads, strict=True)
    ], used


def _ddp_group(model: nn.Module) -> Any:
    """The process group whose mean gradient a DDP model steps on, or ``None``.

    ``None`` also for a group of one rank, where the mean is the gradient.
    """
    if not isinstance(model, DistributedDataParallel) or not dist.is_initialized():
        return None
    group = model.process_group
    return group if dist.get_world_size(group) > 1 else None


def _rank_mean(grads: list[Tensor], group: Any, differentiable: bool) -> list[Tensor]:
    """The ranks' mean of ``grads``: one all-reduce of their concatenation.

    ``differentiable``: through an all-reduce whose backward all-reduces the
    incoming gradient, so that ``‖ḡ‖²`` backpropagates
    ``2 H_r ḡ`` on each rank (and DDP's average of those is ``2 H ḡ``).
    """
    flat = torch.cat([g.reshape(-1) for g in grads])
    if differentiable:
        # the functional collective has an autograd formula (a sum all-reduce
        # of the incoming gradient); torch.distributed.nn's is deprecated
        from torch.distributed import _functional_collectives as funcol

        flat = funcol.wait_tensor(funcol.all_reduce(flat, "sum", group))
    else:
        flat = flat.clone()
        dist.all_reduce(flat, group=group)
    flat = flat / dist.get_world_size(group)
    return [
        t.view_as(g)
        for t, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
    ]


class GradientNorm(Regularizer):
    """``strength · ‖∇_θ loss_fn(model(inputs), targets)‖²``.

    Under ``DistributedDataParallel`` (``model`` the DDP wrapper), ``∇_θ`` is
    the ranks' mean gradient, the one the step takes, so penalty and averaged
    gradient equal one process's on the whole batch.

    On a model with ``torch.nn.utils`` weight norm, ``"double_backprop"`` runs
    a forward pass of its own rather than reuse ``outputs``, with the weight
    norm written from primitives: PyTorch's fused one has a wrong double
    backward, which made the penalty's gradient wrong.
    On a ``torch.compile``-d model it runs its own forward pass eagerly: a
    compiled graph's backward cannot be differentiated again.

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

    @property
    def reaches_tensors_outside_model(self) -> bool:  # type: ignore[override]  # noqa: D102
        return self.method != "finite_difference"

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

        Under ``torch.no_grad()`` or ``torch.inference_mode()`` (logging a
        validation value, say) gradients are turned back on for the term
        alone, as for the GC term: the value is right either way. Outputs
        computed there have no graph, so the term runs a forward pass of its
        own.

        Returns:
            A scalar tensor; its parameter gradient is ``2 λ H g``.

        Raises:
            ValueError: no targets, or no trainable parameters.
        """
        check_batch(inputs, "GradientNorm", tensor=False)
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return self._penalty(model, inputs, targets, outputs, loss_fn)
        with torch.inference_mode(False), torch.enable_grad():
            # an inference tensor cannot be saved for the backward pass
            inputs, targets = tree_map_only(
                Tensor,
                lambda t: t.clone() if t.is_inference() else t,
                (inputs, targets),
            )
            if not any(
                t.requires_grad
                for t in tree_flatten(outputs)[0]
                if isinstance(t, Tensor)
            ):
                outputs = None  # computed without a graph: a pass of its own
            return self._penalty(model, inputs, targets, outputs, loss_fn)

    def _penalty(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor | None,
        outputs: Tensor | None,
        loss_fn: LossFn | None,
    ) -> Tensor:
        loss_fn, params, loss = self._task(model, inputs, targets, outputs, loss_fn)
        group = _ddp_group(model)
        if self.method == "double_backprop":
            grads, _ = _param_grads(loss, params, create_graph=True)
            if group is not None:
                grads = _rank_mean(grads, group, differentiable=True)
            # squared and summed in float32 at least: a float16 model's ‖g‖²
            # passes 65504 (and one entry's square does past 256) long before
            # its gradient does, and read inf
            return self.strength * sum(
                g.to(at_least_float32(g.dtype)).pow(2).sum() for g in grads
            )
        # the caller's backward still needs this graph: retain it
        grads, used = _param_grads(loss, params, retain_graph=True)
        # under DDP the step (and so the shift) is along the ranks' mean ḡ;
        # this rank's difference (g_r' − g_r)/r is its H_r ḡ, which DDP averages
        direction = grads if group is None else _rank_mean(grads, group, False)
        sq, r, shifted = self._shifted_gradient(
            model, inputs, targets, loss_fn, direction
        )
        # r·Hg; none taken at a flat point or a diverged step (inf − inf
        # would make the value nan)
        hg = (
            torch._foreach_sub(shifted, grads)
            if shifted is not grads
            else [torch.zeros_like(g) for g in grads]
        )
        # value λ‖g‖², gradient 2λHg, without a second-order graph (a parameter
        # the loss does not use stays out of it, its .grad untouched)
        link = sum(
            (p * h).sum() for p, h, u in zip(params, hg, used, strict=True) if u
        ) * (2 / r)
        return self.strength * (sq + link - link.detach())

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
        check_batch(inputs, "GradientNorm", tensor=False)
        own = trainable(model)
        # a list: the parameters are walked twice (an iterator would be spent)
        params = own if params is None else list(params)
        # the hand-assembled .grad below would bypass DDP's all-reduce (and its
        # reducer, which waits for a backward pass), and the hooks on the
        # parameters' gradients: those take the surrogate
        if (
            self.method != "finite_difference"
            or [id(p) for p in params] != [id(p) for p in own]
            or _ddp_group(model) is not None
            or any(hooked(p) for p in params)
        ):
            return super().backward(
                loss,
                model,
                inputs,
                targets,
                outputs=outputs,
                loss_fn=loss_fn,
                params=params,
            )
        # The task gradient g is the first of the two gradients the finite
        # difference needs: take it once, and assemble g + 2λHg by hand. Two
        # forward and two backward passes, where the surrogate of __call__
        # needs a third backward (the caller's, which recomputes g).
        loss_fn = self._checked(model, targets, loss_fn)
        grads, used = _param_grads(loss, params)
        sq, r, shifted = self._shifted_gradient(model, inputs, targets, loss_fn, grads)
        # g + 2λHg = g + c (g' − g) with c = 2λ/r: one lerp per tensor
        with torch.no_grad():
            total = torch._foreach_lerp(grads, shifted, 2 * self.strength / r)
            for p, t, u in zip(params, total, used, strict=True):
                if not u:  # unused by the loss: .grad left as backward leaves it
                    continue
                if p.grad is None:
                    p.grad = t
                elif p.grad.is_sparse:  # made dense, as autograd's sum would be
                    p.grad = t.add_(p.grad)
                else:
                    p.grad += t
        return (self.strength * sq).detach()

    def _task(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor | None,
        outputs: Tensor | None,
        loss_fn: LossFn | None,
    ) -> tuple[LossFn, list[Tensor], Tensor]:
        loss_fn = self._checked(model, targets, loss_fn)
        params = trainable(model)
        if not params:
            raise ValueError("the model has no trainable parameters")
        # PyTorch's fused weight norm has a wrong double backward: the
        # parameter gradient of ‖∇L‖² through it is off. Double backprop then
        # runs a forward pass of its own with the composite weight norm
        composite = self.method == "double_backprop" and _weight_normed(model)
        # a compiled graph's backward cannot be differentiated again: double
        # backprop runs a forward pass of its own, eagerly
        uncompiled = self.method == "double_backprop" and compiled(model)
        if outputs is None or composite or uncompiled:
            # running statistics put back: the caller's step counts the batch;
            # attention by its math kernel, which has a double backward
            with (
                kept_buffers(model),
                differentiable_attention(),
                _CompositeWeightNorm() if composite else nullcontext(),
                eager() if uncompiled else nullcontext(),
            ):
                outputs = model(inputs)
        return loss_fn, params, loss_fn(outputs, targets)

    def _checked(
        self, model: nn.Module, targets: Tensor | None, loss_fn: LossFn | None
    ) -> LossFn:
        """The task loss function, after the checks every path needs.

        Raises:
            ValueError: no targets, or dropout that the finite difference
                cannot difference through.
        """
        if targets is None:
            raise ValueError("GradientNorm needs the batch's targets for the loss")
        if self.method == "finite_difference":
            _refuse_random_forward(model)
            _refuse_half_precision(model)
        return loss_fn or F.cross_entropy

    def _shifted_gradient(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        grads: list[Tensor],
    ) -> tuple[Tensor, float, list[Tensor]]:
        """``‖g‖²``, ``r = eps / ‖g‖`` and ``g' = ∇L(θ + r g)``.

        ``Hg ≈ (g' − g) / r``. The foreach ops touch every tensor in one call:
        on small models, per-tensor calls cost more than the arithmetic. A DDP
        model's shifted pass runs the module it wraps: DDP's own forward would
        broadcast buffers and prepare its reducer for a backward pass of the
        shifted graph, which with ``find_unused_parameters`` finds none of the
        real parameters used.
        """
        # norms in float32 at least: a float16 ‖g‖ underflows long before g does
        norms = [
            n.to(torch.promote_types(n.dtype, torch.float32))
            for n in torch._foreach_norm(grads)
        ]
        sq = torch.stack(norms).pow(2).sum()
        norm = sq.sqrt().item()
        if norm == 0:  # a flat point: Hg·0 = 0, and no step to take
            return sq, 1.0, grads
        if not math.isfinite(norm):
            # a diverged step (the loss or ‖g‖² overflowed): no step to take
            # (eps/inf = 0 divided by zero); the value is inf or nan and the
            # gradient g's, not finite either, as double backprop's would be
            return sq, 1.0, grads
        r = self.eps / norm
        # θ + r·g swapped in as functional_call does: no in-place change to the
        # parameters, whose versions the caller's graph checks; running
        # statistics restored
        if isinstance(model, DistributedDataParallel):
            model = model.module
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            moved = torch._foreach_add([p for _, p in named], grads, alpha=r)
        shifted_params = {
            n: t.requires_grad_(True) for (n, _), t in zip(named, moved, strict=True)
        }
        # g went through the hooks on the parameters' gradients: g' must too
        for (_, p), t in zip(named, moved, strict=True):
            for hook in (p._backward_hooks or {}).values():
                t.register_hook(hook)
        # a buffer the shifted pass writes (a write bumps its version) was
        # another in that pass than in the caller's
        versions = [b._version for b in model.buffers()]
        # and on refusal, or on any failure of the pass, put back as found:
        # the call raises, so its own pass must leave no trace (BatchNorm
        # writes nothing, see kept_buffers)
        saved = written_buffers(model.modules())
        try:
            # the backward pass inside the block too: activation checkpointing
            # recomputes a block's forward pass there, with the parameters
            # the module holds then
            with (
                kept_buffers(model),
                torch.enable_grad(),
                _reparametrize_module(model, shifted_params, tie_weights=True),
            ):
                out = model(inputs)
                shifted, _ = _param_grads(loss_fn(out, targets), moved)
            _refuse_written_buffers(model, versions)
        except BaseException:
            put_back(saved)
            raise
        return sq, r, shifted

    def __repr__(self) -> str:
        return (
            f"GradientNorm({self.strength!r}, method={self.method!r}, eps={self.eps!r})"
        )


_PARAMETRIZED_WEIGHT_NORM = getattr(
    torch.nn.utils.parametrizations, "_WeightNorm", WeightNorm
)


def _weight_normed(model: nn.Module) -> bool:
    """Whether ``model`` computes a weight by ``torch.nn.utils`` weight norm."""
    return any(
        isinstance(m, _PARAMETRIZED_WEIGHT_NORM)
        or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())
        for m in model.modules()
    )


class _CompositeWeightNorm(TorchFunctionMode):
    """``torch._weight_norm`` from primitives, whose double backward is right.

    The fused kernel (``dim`` first or last) saves the norms it computes and
    its double backward takes them as constants: the second derivative in
    ``v`` comes out wrong (``gradgradcheck`` fails, PyTorch 2.13), and with it
    the gradient of ``‖∇L‖²``. This is the formula PyTorch itself uses for the
    other dims.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


def _refuse_random_forward(model: nn.Module) -> None:
    """The finite difference compares two forward passes: they must agree.

    Raises:
        ValueError: a dropout layer in train mode would draw a different mask
            for the shifted pass, and (g' − g)/r would be mask noise. So
            would the dropout inside attention and stacked recurrent layers,
            and RReLU's random slopes.
    """
    live = [name for name, m in model.named_modules() if m.training and _random(m)]
    if live:
        raise ValueError(
            f"GradientNorm(method='finite_difference') differences two forward "
            f"passes, and dropout in train mode ({', '.join(live[:4])}) draws a "
            "new mask (RReLU new slopes) for the second: use "
            "method='double_backprop', or put those layers in eval mode"
        )


def _refuse_half_precision(model: nn.Module) -> None:
    """The finite difference needs float32 gradients at least.

    Raises:
        ValueError: trainable parameters in float16 or bfloat16, or autocast
            to one of them on their device. Each gradient's round-off,
            divided by the step, swamps ``Hg``: the penalty's gradient came
            out 0.4-2 times its size off at the default step, and no step
            gave better than 7%.
    """
    params = trainable(model)
    coarse = [
        p.dtype
        for p in params
        if p.is_floating_point() and torch.finfo(p.dtype).bits < 32
    ]
    if params and not coarse:
        autocast = _autocast_dtype(params[0])
        if autocast is not None and torch.finfo(autocast).bits < 32:
            coarse = [autocast]
    if coarse:
        raise ValueError(
            "GradientNorm(method='finite_difference') differences two gradients, "
            f"which are computed in {coarse[0]} here (the parameters' dtype or "
            "autocast's): their round-off, divided by the step, swamps the "
            "Hessian-vector product. Use method='double_backprop', or train in "
            "float32"
        )


def _refuse_written_buffers(model: nn.Module, versions: list[int]) -> None:
    """The finite difference's second pass must use the first pass's buffers.

    Raises:
        ValueError: the forward pass wrote a buffer (``versions`` are the
            buffers' versions before it): spectral norm's power iteration or
            a running statistic of a custom layer, in train mode. The shifted
            pass then ran with other buffers than the caller's, and
            (g' − g)/r differenced that change too: the gradient was off by
            up to thousands of times its size. (BatchNorm writes nothing
            there: see :func:`~geocomplexity.state.kept_buffers`.)
    """
    written = [
        name
        for (name, b), v in zip(model.named_buffers(), versions, strict=True)
        if b._version != v
    ]
    if written:
        raise ValueError(
            "GradientNorm(method='finite_difference') differences two forward "
            f"passes, and the model's forward pass updates buffers "
            f"({', '.join(written[:4])}): the second pass ran with other "
            "buffers than the first (spectral norm's power iteration, a running "
            "statistic). Use method='double_backprop', or put those layers in "
            "eval mode"
        )


def _random(m: nn.Module) -> bool:
    """Whether ``m`` (in train mode) draws random numbers in its forward pass."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout > 0
    if isinstance(m, nn.RNNBase):  # dropout between stacked layers only
        return m.dropout > 0 and m.num_layers > 1
    return isinstance(m, nn.RReLU)
