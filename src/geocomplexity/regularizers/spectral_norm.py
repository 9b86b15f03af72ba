r"""Spectral-norm penalty (Yoshida & Miyato 2017) by persistent power iteration.

.. math::  R(\theta) = \lambda \sum_{l} \sigma_{\max}(W_l)^2

over the model's ``Linear`` and convolution layers (any other layer with a
weight matrix, a transposed convolution, a recurrent, bilinear or embedding
layer, is left out and named in a warning). For a ReLU network,
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

import contextlib
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNormHook
from torch.nn.utils.weight_norm import WeightNorm as _WeightNormHook

from geocomplexity.jacobian import as_int
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
from geocomplexity.state import in_this_thread, preserved, put_back, snapshot

__all__ = ["SpectralNorm", "spectral_norms"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PENALISED = (nn.Linear, *_CONV)


class SpectralNorm(Regularizer):
    """``strength · Σ_l σ_max(W_l)²`` over Linear and Conv layers.

    The power step runs without a graph, in float32 at least and with autocast
    off (half-precision weights and mixed-precision training included); its
    vectors are state (:meth:`state_dict`). In a training step,
    :meth:`backward` writes each leaf weight's gradient ``2λ·(A v)vᵀ`` by hand.

    Args:
        strength: λ ≥ 0.
        conv: ``"operator"`` (the convolution's operator norm at the input
            size the layer had on the first call; later ``inputs`` of another
            size do not change it: make a new term, or :meth:`seed` it, for
            another size) or ``"reshaped"`` (the reshaped kernel's norm).
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
        power_iterations = as_int(power_iterations)  # np.int64 from a NumPy sweep
        if not isinstance(power_iterations, int) or power_iterations < 1:
            raise ValueError("power_iterations must be a positive integer")
        self.conv, self.power_iterations = conv, power_iterations
        self._given = generator is not None
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
            ``{layer name: σ}``, each differentiable in that layer's weight;
            the name within the module that a ``torch.compile``,
            ``DataParallel`` or DDP wrapper runs (the state's key, which
            serves the model wrapped or not).

        Raises:
            ValueError: an operator-norm conv layer whose input size is unknown.
        """
        out = {}
        kept: list[Any] = []
        try:
            layers = self._layers(model, inputs, kept)
            with _read_once(layers, kept):
                for name, m, operator in layers:
                    if operator:
                        out[name] = self._operator(name, m)
                    else:
                        out[name] = self._dense(name, m)
        finally:
            put_back(kept)
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
        # parametrization, a weight-norm hook), one with a hook on its gradient
        # or a conv with another padding mode goes through autograd with the
        # task loss instead.
        # a list: the parameters are walked twice (an iterator would be spent)
        params = trainable(model) if params is None else list(params)
        kept: list[Any] = []
        try:
            layers = self._layers(model, inputs, kept)
            with _read_once(layers, kept):
                return self._backward(loss, params, layers)
        finally:
            put_back(kept)

    def _backward(
        self,
        loss: Tensor,
        params: list[Tensor],
        layers: list[tuple[str, nn.Module, bool]],
    ) -> Tensor:
        if not layers:
            raise ValueError("the model has no Linear or Conv layer to penalise")
        # a leaf weight's gradient can be written directly, unless a hook on
        # it must see the whole gradient
        hand: list[tuple[str, nn.Module, bool]] = []
        rest: list[tuple[str, nn.Module, bool]] = []
        for layer in layers:
            _, m, op = layer
            W = m.weight
            leaf = W.grad_fn is None and (not op or _plain(m)) and not hooked(W)
            (hand if leaf else rest).append(layer)
        graph = [
            (self._operator(n, m) if op else self._dense(n, m)).pow(2)
            for n, m, op in rest
        ]
        total = loss + self.strength * sum(graph) if graph else loss
        backward_into(total, params)
        # the hand-made steps after the task backward: their temporaries (a
        # conv's patches) are not held through it
        wanted = {id(p) for p in params}
        with torch.no_grad(), _full_precision(layers):
            Avs, vs, cols, sq = self._hand_steps(hand)
            for (_, m, operator), Av, v, patches in zip(
                hand, Avs, vs, cols, strict=True
            ):
                W = m.weight
                if id(W) not in wanted:
                    continue
                grad = grad_buffer(W)
                if Av.dtype != grad.dtype:  # a half-precision weight
                    Av, v = Av.to(grad.dtype), v.to(grad.dtype)
                if operator:
                    self._add_operator_grad(m, Av, v, patches)
                elif grad.is_contiguous():
                    # every call skipped counts on a small model (see
                    # _hand_steps): a Linear's gradient is already 2-D
                    g2 = grad if grad.dim() == 2 else grad.view(W.shape[0], -1)
                    g2.addr_(Av, v, alpha=2 * self.strength)
                else:
                    grad += (2 * self.strength * torch.outer(Av, v)).view_as(W)
            value = sq if hand else loss.new_zeros(())  # Σσ², as in __call__
        if graph:
            value = value + sum(g.detach() for g in graph)
        return self.strength * value

    def _layers(
        self, model: nn.Module, inputs: Tensor | None, kept: list[Any]
    ) -> list[tuple[str, nn.Module, bool]]:
        """``(name, module, operator norm?)`` of every Linear and Conv layer.

        ``kept`` gets a snapshot of the buffers of the layers' weight
        parametrizations, taken before any weight is read, for the caller to
        put back: reading a weight computed by torch's ``spectral_norm``
        parametrization in train mode runs a power step on its buffers, which
        would change the model's function.

        Raises:
            ValueError: an operator-norm conv layer whose input size is unknown.
        """
        layers: list[tuple[str, nn.Module, bool]] = []
        skipped: list[str] = []
        operator = self.conv == "operator"
        known = self._vectors.keys() | self._shapes.keys()
        for n, raw, m in _named_modules(model):  # one walk: this runs every step
            if isinstance(m, _PENALISED):
                if n != raw and n not in known and raw in known:
                    self._rename(raw, n)  # a state saved under wrapped names
                layers.append((n, m, operator and not isinstance(m, nn.Linear)))
                if parametrize.is_parametrized(m, "weight"):
                    kept.extend(snapshot(m.parametrizations.weight.modules()))
            elif not self._warned:  # named once, in the warning below
                left_out = _left_out(m, n)
                if left_out is not None:
                    skipped.append(left_out)
        known = self._vectors.keys() | self._shapes.keys()  # renamed ones too
        if known and layers and known.isdisjoint(n for n, _, _ in layers):
            # a model wrapped by a module this walk does not see through (or
            # another model): each layer would start afresh, silently
            raise ValueError(
                "SpectralNorm's power-iteration state is for layers "
                f"{sorted(known)[:4]}, and none of this model's layers "
                f"{[n for n, _, _ in layers][:4]}: it belongs to another model, "
                "or to this one wrapped otherwise (the names of torch.compile's, "
                "DataParallel's and DistributedDataParallel's wrappers are left "
                "out, no other). Penalise the model the state was made with (the "
                "wrapped module), or use a new term (or call seed())"
            )
        if skipped and not self._warned:
            self._warned = True
            more = f" and {len(skipped) - 6} more" if len(skipped) > 6 else ""
            warnings.warn(
                "SpectralNorm leaves out transposed convolutions, attention's "
                "input projections and every other layer with weight matrices "
                "but no Linear or Conv type (recurrent, bilinear, embedding) "
                f"({skipped[:6]}{more}): their norms are not in the penalty, nor "
                "in the GC bound",
                stacklevel=3,
            )
        if any(op and n not in self._shapes for n, _, op in layers):
            if inputs is None:
                raise ValueError(
                    "the operator norm of a conv layer depends on its input size: "
                    "pass a batch of inputs on the first call"
                )
            self._record_shapes(model, inputs[:1])
            # a conv layer the forward pass does not call has no input size
            # (None): it is left out, as it is out of the function and its GC
            unseen = [n for n, _, op in layers if op and n not in self._shapes]
            if unseen:
                self._shapes.update(dict.fromkeys(unseen))
                warnings.warn(
                    "SpectralNorm leaves out conv layers that the forward pass did "
                    f"not call ({unseen[:4]}): their operator norm depends on an "
                    "input size",
                    stacklevel=3,
                )
        if None in self._shapes.values():
            layers = [
                (n, m, op)
                for n, m, op in layers
                if not op or self._shapes[n] is not None
            ]
        # first vectors drawn in layer order, whatever order the steps run in
        vectors = self._vectors
        for name, m, operator in layers:
            W = m.weight
            dtype, uv = at_least_float32(W.dtype), vectors.get(name)
            shape = self._shapes[name] if operator else None
            if uv is not None and not _fits(uv, m, W, shape):
                raise ValueError(
                    f"SpectralNorm's power-iteration vectors for layer {name!r} "
                    f"(shapes {tuple(uv[1].shape)} -> {tuple(uv[0].shape)}) do "
                    f"not fit its weight {tuple(W.shape)}: the term's state "
                    "belongs to another model. Use a new term (or call seed()) "
                    "for this model"
                )
            if uv is not None and all(
                t.dtype == dtype and t.device == W.device for t in uv
            ):
                continue  # every step after the first: nothing to set up
            W = W.detach().to(dtype)
            if operator:
                self._init(name, self._out_shape(name, m), (1, *self._shapes[name]), W)
            else:
                self._init(name, (W.shape[0],), (math.prod(W.shape[1:]),), W)
        # from here on every layer's (u, v) is in self._vectors, on W's device
        # and in the step's dtype
        return layers

    def _record_shapes(self, model: nn.Module, x: Tensor) -> None:
        # a layer called more than once (one weight at two scales) keeps the
        # size of its first call, as documented; the others are named
        seen: dict[str, list[tuple[int, ...]]] = {}

        def hook(name: str):
            def record(_m: nn.Module, args: tuple[Any, ...]) -> None:
                sizes = seen.setdefault(name, [])
                if (shape := tuple(args[0].shape[1:])) not in sizes:
                    sizes.append(shape)

            return record

        handles = [
            m.register_forward_pre_hook(in_this_thread(hook(n)))
            for n, _, m in _named_modules(model)
            if isinstance(m, _CONV)
        ]
        # a weight_norm or spectral_norm hook sets its weight in each pass: here
        # one with no graph, which the caller's weight would be left as
        computed = [
            (m, h.name, getattr(m, h.name))
            for m in model.modules()
            for h in _weight_hooks(m)
        ]
        try:
            with preserved(model, mode="eval"), torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
            for m, name, weight in computed:
                setattr(m, name, weight)
        self._shapes.update({n: sizes[0] for n, sizes in seen.items()})
        several = {n: sizes for n, sizes in seen.items() if len(sizes) > 1}
        if several:
            warnings.warn(
                "SpectralNorm takes a conv layer's operator norm at the input size "
                "of its first call; these layers are called at several sizes "
                f"({dict(list(several.items())[:4])}), and their norms at the "
                "other sizes are not in the penalty",
                stacklevel=4,
            )

    def _rename(self, old: str, new: str) -> None:
        """Move a layer's vectors and input size from key ``old`` to ``new``."""
        if old in self._vectors:
            self._vectors[new] = self._vectors.pop(old)
        if old in self._shapes:
            self._shapes[new] = self._shapes.pop(old)

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

    def _hand_steps(
        self, layers: list[tuple[str, nn.Module, bool]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], Tensor]:
        """One power-iteration step on each layer, called without grad.

        ``v ← (Aᵀu + εv)/‖·‖`` and ``u ← A v``, kept unnormalised (only the
        direction of ``Aᵀu`` is used), so ``σ = ‖u‖``. The shift ``ε``
        (:func:`_trace`) leaves the singular vectors as they are and keeps a
        zero weight (a zero-initialised layer) from zeroing the vectors for
        good. The step runs in float32 at least, with autocast off: in half
        precision ``Aᵀu ≈ σ²v`` overflows, and ``ε`` would be large.

        On a small model the cost is each kernel's fixed cost, not flops: the
        layers' norms and divisions are one foreach call each, and a small
        plain ``Conv2d`` takes ``A v`` as the kernel matrix times ``v``'s
        unfolded patches, which the weight gradient then reuses (on one small
        image, three convolution calls cost more than an unfold and two matrix
        products).

        Args:
            layers: ``(name, module, operator norm?)``, set up by :meth:`_layers`.

        Returns:
            Lists over the layers of ``A v``, ``v``, and ``v``'s patches
            ``unfold(v)`` of shape ``(C_in·k_h·k_w, L)`` (``None`` where the
            layer is not unfolded); and ``Σσ²``. Stores the new ``(u, v)``.
        """
        # (name, module, operator?, the weight as the step reads it)
        steps = []
        for n, m, op in layers:
            W = m.weight.detach()
            if W.dtype != (dtype := at_least_float32(W.dtype)):
                W = W.to(dtype)
            if not op and W.dim() != 2:
                W = W.flatten(1)
            steps.append((n, m, op, W))
        us = [self._vectors[n][0] for n, *_ in steps]
        vs = [self._vectors[n][1] for n, *_ in steps]
        Avs: list[Tensor] = []
        cols: list[Tensor | None] = [None] * len(steps)
        for _ in range(self.power_iterations):
            # Aᵀu + εv, then all normalised at once
            vs = [
                _adjoint(m, W, u, (1, *self._shapes[n])).add_(v, alpha=_trace(W.dtype))
                if op
                else torch.addmv(v, W.T, u, beta=_trace(W.dtype))
                for (n, m, op, W), u, v in zip(steps, us, vs, strict=True)
            ]
            if not vs:
                break
            torch._foreach_div_(vs, torch._foreach_norm(vs))
            Avs = []
            # u (the last A v) has A v's shape
            for i, ((_, m, op, W), u, v) in enumerate(zip(steps, us, vs, strict=True)):
                if not op:
                    Avs.append(torch.mv(W, v))
                elif _unfolds(m, u):
                    cols[i] = F.unfold(v, **_patches(m))[0]
                    Avs.append(torch.mm(W.flatten(1), cols[i]).view(u.shape))
                else:
                    Avs.append(m._conv_forward(v, W, None))
            us = Avs  # kept unnormalised: only Aᵀu's direction is used
        for (n, *_), u, v in zip(steps, us, vs, strict=True):
            self._vectors[n] = (u, v)
        if not Avs:
            return [], [], [], torch.zeros(())
        # Σσ² = Σ‖A v‖²: one concatenation and one dot product, half the cost
        # of a norm per layer summed
        flat = torch.cat([Av.flatten() for Av in Avs])
        return Avs, vs, cols, torch.dot(flat, flat)

    def _dense(self, name: str, m: nn.Module) -> Tensor:
        """σ of a matrix (or a reshaped kernel), differentiable in the weight."""
        layer = [(name, m, False)]
        with torch.no_grad(), _full_precision(layer):
            v = self._hand_steps(layer)[1][0]
        W = m.weight.flatten(1)
        # ∂‖Wv‖/∂W = u vᵀ with u = Wv/‖Wv‖: the gradient of u·(Wv) at fixed u;
        # in the step's precision, not autocast's (as the fused step's value)
        with _full_precision(layer):
            return torch.linalg.vector_norm(torch.mv(W.to(v.dtype), v))

    def _operator(self, name: str, m: nn.Module) -> Tensor:
        """σ of a convolution operator, differentiable in the weight."""
        layer = [(name, m, True)]
        with torch.no_grad(), _full_precision(layer):
            v = self._hand_steps(layer)[1][0]
        # in the step's precision: under autocast the convolution ran in
        # bfloat16, and σ came out 2e-3 off the fused step's
        with _full_precision(layer):
            Av = m._conv_forward(v, m.weight.to(v.dtype), None)
            return torch.linalg.vector_norm(Av)

    def _out_shape(self, name: str, m: nn.Module) -> tuple[int, ...]:
        """The layer's output shape for one input of the recorded size."""
        if name in self._vectors:  # u has it: no probe forward every call
            return tuple(self._vectors[name][0].shape)
        with torch.no_grad():
            zero = torch.zeros((1, *self._shapes[name])).to(m.weight)
            return tuple(m._conv_forward(zero, m.weight, None).shape)

    def _add_operator_grad(
        self, m: nn.Module, Av: Tensor, v: Tensor, cols: Tensor | None
    ) -> None:
        """``W.grad += 2λσ ∂σ/∂W = 2λ·conv*_weight(v, A v)``.

        With ``v``'s patches, that is ``2λ (A v)·patchesᵀ`` on the flattened
        kernel, accumulated in place.
        """
        W = m.weight
        if cols is not None and W.grad.is_contiguous():
            grad = W.grad.view(W.shape[0], -1)
            patches = cols.T.to(grad.dtype)
            grad.addmm_(Av.view(W.shape[0], -1), patches, alpha=2 * self.strength)
            return
        g = _helper(m, "weight")(v, W.shape, Av, **_options(m))
        W.grad.add_(g, alpha=2 * self.strength)

    def state_dict(self) -> dict[str, Any]:
        """Power-iteration vectors and conv input sizes.

        Returns:
            ``{"vectors": {name: (u, v)}, "shapes": {name: shape}}``: ``v`` a
            unit vector, ``u = W v`` (unnormalised; only its direction is used);
            the shape ``None`` for a conv layer the forward pass does not call;
            keyed by the names :meth:`sigmas` gives (wrappers' left out).
        """
        return {
            "vectors": {
                n: (u.clone(), v.clone()) for n, (u, v) in self._vectors.items()
            },
            "shapes": dict(self._shapes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: the state lacks ``"vectors"`` or ``"shapes"``
                (another term's).
        """
        missing = [k for k in ("vectors", "shapes") if k not in state]
        if missing:
            raise ValueError(
                f"the state has no {' or '.join(map(repr, missing))} (keys "
                f"{sorted(state)}): it is not a SpectralNorm term's state but "
                "another term's (or another combination of terms'); load the "
                "state this term's state_dict() returned"
            )
        self._vectors = {
            n: (u.clone(), v.clone()) for n, (u, v) in state["vectors"].items()
        }
        self._shapes = dict(state["shapes"])

    def seed(self, generator: torch.Generator) -> None:
        """Start afresh, as :func:`~geocomplexity.training.fit` does per run.

        The power-iteration vectors and conv input sizes of an earlier run
        are dropped (they belong to another model or input size), and a term
        built without a generator starts its own again, so one term reused
        across runs gives each run the numbers a new term would.
        """
        del generator  # the vectors' start is this term's own, as when built
        self._vectors.clear()
        self._shapes.clear()
        if not self._given:
            self.generator = torch.Generator().manual_seed(0)

    def __repr__(self) -> str:
        return (
            f"SpectralNorm({self.strength!r}, conv={self.conv!r}, "
            f"power_iterations={self.power_iterations})"
        )


@contextlib.contextmanager
def _read_once(layers: list[tuple[str, nn.Module, bool]], kept: list[Any]) -> Any:
    """Each computed weight computed once, from the buffers found.

    ``kept`` is :meth:`SpectralNorm._layers`' snapshot of the parametrizations'
    buffers (empty where none has any). Put back first (the layers were read
    once already), then every weight read in the block is one tensor, computed
    with grad as the model's next forward pass would compute it: a power step
    of torch's ``spectral_norm`` per read would give each read another weight.

    A ``torch.nn.utils.weight_norm`` or ``spectral_norm`` hook leaves in
    ``m.weight`` what the last forward pass computed, whose graph may be freed
    (a penalty taken before the step's forward pass) or never made (under
    no_grad): the block sees it computed afresh, and it is put back after.
    """
    computed = [
        (m, h, m.weight)
        for _, m, _ in layers
        if m._forward_pre_hooks
        for h in _weight_hooks(m)
    ]
    if not kept and not computed:
        yield
        return
    try:
        for m, h, _ in computed:
            if isinstance(h, _SpectralNormHook):
                # as the pass in m's mode: in train mode a power step (whose
                # u, v the weight's graph holds cloned: the next pass writes
                # the buffers in place), on buffers put back after
                saved = snapshot([m])
                fresh = h.compute_weight(m, do_power_iteration=m.training)
                put_back(saved)
            else:
                fresh = h.compute_weight(m)
            setattr(m, h.name, fresh)
        if not kept:
            yield
            return
        put_back(kept)
        with parametrize.cached():
            for _, m, _ in layers:
                if parametrize.is_parametrized(m, "weight"):
                    m.weight  # noqa: B018 - computed into the cache, with grad
            yield
    finally:
        for m, h, weight in computed:
            setattr(m, h.name, weight)


def _named_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, named_modules()'s name, module)``, wrappers' names left out.

    The state is keyed by the first name: a layer's name in the module that
    ``torch.compile`` (``_orig_mod.``), ``DataParallel`` or
    ``DistributedDataParallel`` (``module.``) wraps, at any depth, so one
    state serves the model wrapped or not. Each module once, as in
    ``named_modules``.
    """
    out: list[tuple[str, str, nn.Module]] = []
    seen: set[int] = set()

    def walk(m: nn.Module, name: str, raw: str) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        out.append((name, raw, m))
        inner = _wrapped_attribute(m)
        for key, child in m._modules.items():
            if child is not None:
                full = f"{raw}.{key}" if raw else key
                mine = name if key == inner else f"{name}.{key}" if name else key
                walk(child, mine, full)

    walk(model, "", "")
    return out


def _left_out(m: nn.Module, name: str) -> str | None:
    """How the warning names ``m`` (at ``name``) if it has weights left out."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return name
    if isinstance(m, nn.MultiheadAttention):
        # its output projection is a Linear (penalised); the query, key and
        # value projections are bare parameters
        return f"{name} (query/key/value projections)"
    if _own_matrices(m, name):
        # recurrent, bilinear and embedding layers, a module's own weight
        # matrix: no operator norm this term computes
        return f"{name or '<root>'} ({type(m).__name__})"
    return None


def _own_matrices(m: nn.Module, name: str) -> bool:
    """Whether ``m`` holds a parameter of two or more dimensions of its own.

    A parametrized one included (held by its ``ParametrizationList``, which is
    not counted itself, nor anything inside one: a penalised layer's
    parametrized weight is penalised).
    """
    if isinstance(m, parametrize.ParametrizationList) or ".parametrizations." in (
        f".{name}."
    ):
        return False
    if any(p is not None and p.dim() > 1 for p in m._parameters.values()):
        return True
    return parametrize.is_parametrized(m) and any(
        p.dim() > 1 for p in m.parametrizations.parameters()
    )


def _wrapped_attribute(m: nn.Module) -> str | None:
    """The attribute holding the module that a known wrapper ``m`` runs."""
    if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module"
    # the type's name first: a missing attribute costs a Module an exception
    if type(m).__name__ == "OptimizedModule" and "_orig_mod" in m._modules:
        return "_orig_mod"
    return None


def _weight_hooks(m: nn.Module) -> list[Any]:
    """``m``'s ``torch.nn.utils`` ``weight_norm``/``spectral_norm`` hooks on weight."""
    return [
        h
        for h in m._forward_pre_hooks.values()
        if isinstance(h, (_WeightNormHook, _SpectralNormHook)) and h.name == "weight"
    ]


def _fits(
    uv: tuple[Tensor, Tensor],
    m: nn.Module,
    W: Tensor,
    shape: tuple[int, ...] | None,
) -> bool:
    """Whether ``(u, v)`` fit the layer: its weight ``W``'s rows and columns.

    For a conv (``shape`` its recorded input size ``(C_in, *spatial)``), its
    input ``(1, *shape)`` and its output there: the output's size is the
    layer's, not the kernel's (a conv replaced by one with another stride,
    kernel or dilation has a kernel of the same shape). By arithmetic each
    call; where that disagrees (a subclass that convolves otherwise), by a
    forward pass on zeros before refusing.
    """
    u, v = uv
    if shape is not None:
        if tuple(v.shape) != (1, *shape) or shape[0] != m.in_channels:
            return False
        if tuple(u.shape) == _out_size(m, shape):
            return True
        with torch.no_grad():
            zero = torch.zeros((1, *shape), dtype=W.dtype, device=W.device)
            try:
                out = m._conv_forward(zero, W, None)
            except RuntimeError:  # a kernel larger than the padded input
                return False
        return u.shape == out.shape
    return u.shape == (W.shape[0],) and v.shape == (math.prod(W.shape[1:]),)


def _out_size(m: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The conv's output shape for one input of shape ``shape``, by arithmetic.

    ``⌊(n + 2p − d(k − 1) − 1)/s⌋ + 1`` per spatial size (``p`` 0 for
    ``"valid"``; ``"same"`` keeps ``n``); other padding modes pad by the same
    ``p`` before an unpadded convolution, so the size is the same.
    """
    out = []
    for i, n in enumerate(shape[1:]):
        if m.padding == "same":
            out.append(n)
            continue
        p = 0 if m.padding == "valid" else m.padding[i]
        k, s, d = m.kernel_size[i], m.stride[i], m.dilation[i]
        out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return (1, m.out_channels, *out)


def _plain(m: nn.Module) -> bool:
    """Zero padding given as numbers: what ``torch.nn.grad``'s helpers handle."""
    return m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _unfolds(m: nn.Module, u: Tensor) -> bool:
    """Whether to unfold: a plain, ungrouped Conv2d whose patches are small.

    ``u`` is the layer's output for one input; the patches have
    ``C_in·k_h·k_w`` rows and one column per output position. Past about 4 MB
    (in float32) a convolution call costs less than building them.
    """
    if len(m.kernel_size) != 2 or m.groups != 1 or not _plain(m):
        return False
    rows = m.in_channels * math.prod(m.kernel_size)
    return rows * math.prod(u.shape[2:]) <= 1 << 20


def _patches(m: nn.Module) -> dict[str, Any]:
    """``F.unfold``'s options for the layer (which has ``groups == 1``)."""
    options = _options(m)
    del options["groups"]  # unfold takes none
    return {"kernel_size": m.kernel_size, **options}


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


def _adjoint(m: nn.Module, W: Tensor, u: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``Aᵀu`` for the layer's convolution ``A`` (kernel ``W``) at size ``shape``."""
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


def _trace(dtype: torch.dtype) -> float:
    """ε of the shifted power step ``Aᵀu + εv``: the smallest normal ** ¼.

    With ``u = A v_old``, ``Aᵀu + εv_old = (AᵀA + ε)v_old``: the same singular
    vectors, so the iteration converges where it did (at a rate changed by
    less than ε/σ², about 3e-10/σ² in float32). For a zero weight it leaves
    ``v`` as it was, and ``‖εv‖²`` is a normal number even for a long ``v``
    (no underflow, also where denormals are flushed to zero).
    """
    return torch.finfo(dtype).tiny ** 0.25


def _full_precision(layers: list[tuple[str, nn.Module, bool]]) -> Any:
    """Autocast off on the layers' device, where it is on."""
    device = layers[0][1].weight.device.type if layers else "cpu"
    try:
        on = torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 asks about CUDA only: switch it off anyway
        on = True
    return torch.autocast(device, enabled=False) if on else contextlib.nullcontext()
