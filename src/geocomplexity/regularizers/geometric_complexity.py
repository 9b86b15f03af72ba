r"""Explicit geometric-complexity penalty.

.. math::  R(\theta) = \lambda\,\frac1B\sum_{i}\|\partial g(x_i)/\partial x_i\|_F^2

differentiable in the parameters (double backward for the reverse-mode methods,
reverse-over-forward for ``"jvp"``). One Rademacher projection is unbiased and
costs about one extra VJP plus its backward; ``subsample`` penalises a random
fraction of the batch through its own smaller forward pass.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from geocomplexity.composite_ops import composite_ops, contiguous_group_norm
from geocomplexity.jacobian import (
    Output,
    _check_scalar_batch,
    _coupled,
    _default_chunk,
    _flat_output,
    _input_side,
    _probes_at,
    _select,
    _select_wrt,
    _shrinking_chunk,
    _vjp_count,
    as_int,
    check_differentiable_model,
    check_options,
    reverse_sq_norms,
    sequence_along_batch,
    unwrapped,
    wide_results,
)
from geocomplexity.probes import resolve_generator
from geocomplexity.regularizers.base import (
    LossFn,
    Regularizer,
    check_batch,
    check_strength,
)
from geocomplexity.state import (
    batch_norm_couples,
    compiled,
    differentiable_attention,
    eager,
    kept_buffers,
)

__all__ = ["GeometricComplexity"]


class GeometricComplexity(Regularizer):
    """``strength · GC(model, batch)``, differentiable in the parameters.

    Args:
        strength: λ ≥ 0.
        method: ``"projection"`` (default), ``"exact"`` or ``"jvp"``. Finite
            differences are refused: their parameter gradients are wrong on
            ReLU networks (see :mod:`geocomplexity.jacobian`).
        num_probes: probes per sample for the stochastic methods.
        subsample: fraction of the batch in (0, 1] to penalise; below 1 the term
            runs its own forward pass on ``ceil(subsample·B)`` samples, drawn
            uniformly without replacement: an unbiased estimate of the
            batch's GC in eval mode. Under train-mode BatchNorm that pass
            normalises by the subset's own statistics, so the estimate is of
            the mean over subsets of each subset's diagonal-block GC; coupled
            samples take a subset of 2 at least (BatchNorm cannot normalise
            one sample by its batch).
            It saves less than the fraction suggests where small batches run
            inefficiently: on a 2-core CPU, 0.25 made a training step 1.6–2.1×
            a plain one against 2.1–2.4× for the whole batch (``benchmarks/``).
        distribution: probe distribution.
        generator: randomness for probes and the subsample.
        wrt: a submodule whose output the Jacobian is taken against, such as
            a token embedding (see ``jacobian_sq_norms``): the penalty then
            runs its own forward pass, and the inputs may be integer. The
            gradient reaches the embedding's weights through that output.
        coupled: whether the samples of a batch interact (see
            ``jacobian_sq_norms``): ``None`` recognises BatchNorm with batch
            statistics; ``True`` for a layer of another type that mixes
            samples.
        output: what is differentiated, as in ``jacobian_sq_norms``: the
            model's output (``None``), a function of it (a dict entry:
            ``lambda o: o["logits"]``), applied to ``outputs`` when they are
            handed over, or the name of a submodule, whose output needs a
            forward pass of the term's own.

    BatchNorm in train mode couples the samples, so there the term takes the
    per-sample diagonal blocks rather than the batch-sum trick: ``"exact"``
    with one VJP per sample and output (B times the VJPs), ``"projection"``
    with two sign-paired VJPs per probe, unbiased (see
    :func:`geocomplexity.jacobian._decoupled_vjp_sq_norms`), and ``"jvp"``
    with two sign-paired dual passes per probe. A 1-probe step on a
    train-mode ResNet-18 costs about 4.3–4.6× a plain step this way, against
    about 53–56× with one VJP per sample (``benchmarks/bench_coupled.py``).

    The ``"jvp"`` penalty runs layer, batch and instance norm as composite
    operations (:mod:`geocomplexity.composite_ops`): backpropagating
    PyTorch's fused kernels' forward-mode derivatives gives wrong gradients.

    On a ``torch.compile``-d model (a wrapper, or a module compiled in place)
    the term runs a forward pass of its own, eagerly, and does not reuse
    ``outputs``: a compiled graph's backward cannot be differentiated again,
    and through it the penalty had no parameter gradient at all.
    """

    def __init__(
        self,
        strength: float,
        method: str = "projection",
        num_probes: int = 1,
        subsample: float = 1.0,
        distribution: str = "rademacher",
        generator: torch.Generator | None = None,
        wrt: str | None = None,
        coupled: bool | None = None,
        output: Output = None,
    ) -> None:
        self.strength = check_strength(strength)
        if method == "finite_difference":
            raise ValueError(
                "a finite-difference GC penalty has wrong parameter gradients on "
                "non-smooth (ReLU) networks: kink crossings dominate and grow as the "
                "step shrinks; use method='projection' (cheap, unbiased) or 'exact'"
            )
        if method not in ("projection", "exact", "jvp"):
            raise ValueError(
                f"unknown method {method!r}; choose 'projection', 'exact' or 'jvp'"
            )
        if not 0 < subsample <= 1:
            raise ValueError(f"subsample must be in (0, 1], got {subsample!r}")
        num_probes = as_int(num_probes)  # np.int64 from a NumPy sweep
        check_options(
            method=method,
            num_probes=num_probes,
            distribution=distribution,
            generator=generator,
            wrt=wrt,
            output=output,
            coupled=coupled,
        )
        self.wrt, self.coupled, self.output = wrt, coupled, output
        self.method, self.num_probes, self.subsample = method, num_probes, subsample
        self.distribution, self.generator = distribution, generator
        self._fallback: torch.Generator | None = None

    @property
    def reuses_input_grad(self) -> bool:  # type: ignore[override]  # noqa: D102
        return (
            self.method != "jvp"
            and self.subsample == 1
            and self.wrt is None
            and not isinstance(self.output, str)
        )

    def seed(self, generator: torch.Generator) -> None:  # noqa: D102
        self._fallback = generator

    def state_dict(self) -> dict[str, Any]:
        """The state of the term's own generator, if it was given one.

        Returns:
            ``{"generator": ByteTensor}`` or ``{}``.
        """
        return (
            {} if self.generator is None else {"generator": self.generator.get_state()}
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a resumed run draws the same).

        Raises:
            ValueError: state of another kind of term (other keys), or of a
                term built otherwise: a generator's state for a term without
                its own generator, or none for a term with one (either way
                the probes would go on from another stream than the saved
                run's, silently).
        """
        unknown = sorted(set(state) - {"generator"})
        if unknown:
            raise ValueError(
                f"{self!r} keeps only its generator's state, but was given keys "
                f"{unknown}: the state comes from another term; load it into "
                "the one it was saved from"
            )
        if ("generator" in state) != (self.generator is not None):
            saved = "holds a" if "generator" in state else "holds no"
            mine = "has none" if self.generator is None else "has one"
            raise ValueError(
                f"the state {saved} generator's state, and this term {mine}: "
                "it was saved from a term built with another generator= "
                "setting; build the term as it was when saved"
            )
        if self.generator is not None:
            self.generator.set_state(state["generator"].cpu())

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
        alone: the value is right either way.

        Returns:
            A scalar tensor, differentiable in the parameters.
        """
        check_batch(inputs, "GeometricComplexity")
        if inputs.dim() == 0:  # as in measuring; inputs.shape[0] would fail
            raise ValueError(
                "inputs are a scalar; give a batch of shape (B, *input_shape)"
            )
        if self.wrt is None and not torch.is_floating_point(inputs):
            raise TypeError(
                f"inputs have dtype {inputs.dtype}, but the GC penalty "
                "differentiates with respect to them; for token ids take it at "
                "the embeddings: GeometricComplexity(..., wrt='<embedding "
                "submodule>')"
            )
        if (
            torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled()
            and not inputs.is_inference()
        ):
            with differentiable_attention():  # its own passes are differentiated twice
                return self._penalty(model, inputs, outputs)  # a training step
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            differentiable_attention(),
        ):
            if inputs.is_inference():
                inputs = inputs.clone()  # an inference tensor cannot require grad
            return self._penalty(model, inputs, outputs)

    def _penalty(
        self, model: nn.Module, inputs: Tensor, outputs: Tensor | None
    ) -> Tensor:
        if self.method == "jvp" and _sinks_outputs(model):
            raise ValueError(
                "the jvp GC penalty runs a forward-mode pass through the model, "
                "and DistributedDataParallel with find_unused_parameters=True or "
                "static_graph=True passes the outputs through a hook that has no "
                "forward-mode derivative; use method='projection' or 'exact' "
                "(they reuse the task loss's outputs), or find_unused_parameters="
                "False"
            )
        modules = list(model.modules())
        check_differentiable_model(modules, self.method)
        coupled = _coupled(self.coupled, batch_norm_couples(modules))
        # backpropagating a tangent through PyTorch's fused layer, batch or
        # instance norm gives wrong gradients: the jvp passes run composites
        # (and group_norm on contiguous input: channels last has no tangent)
        norms = composite_ops(model) if self.method == "jvp" else nullcontext()
        group_norm = contiguous_group_norm() if self.method == "jvp" else nullcontext()
        # a compiled graph's VJP is not differentiable again (nor does it have
        # a forward-mode derivative): outputs from it would give a penalty with
        # no parameter gradient, so the term's own passes run eagerly
        stance = nullcontext()
        if compiled(modules):
            outputs, stance = None, eager()
        try:
            # half-precision norms as summed, in float32, as measure keeps
            # them: cast back to float16 before the mean and the strength, a
            # norm beyond 65504 made the penalty inf where its value is not
            with norms, group_norm, stance, wide_results():
                if inputs.dim() == 1 and inputs.shape[0] > 1:
                    # a batch of scalars, or one unbatched sample that a model
                    # of equal input and output sizes maps to a "batch" (a
                    # wrong number, silently): refused as in measuring
                    inner, output, _ = unwrapped(model, self.output)
                    _check_scalar_batch(inner, inputs, output)
                return self.strength * self._values(
                    model, modules, inputs, outputs, coupled
                )
        except NotImplementedError as err:
            if self.method == "jvp" and "custom autograd.Function" in str(err):
                raise NotImplementedError(
                    f"{err}\n\nThe model runs a custom autograd.Function without a "
                    "forward-mode derivative, which the 'jvp' GC penalty needs: "
                    "one of your own, or one PyTorch adds (a module with a full "
                    "backward hook, register_full_backward_hook; a block under "
                    "torch.utils.checkpoint with use_reentrant=True). Use "
                    "method='projection' or 'exact' (and checkpoint with "
                    "use_reentrant=False)."
                ) from err
            raise

    def _values(
        self,
        model: nn.Module,
        modules: list[nn.Module],
        inputs: Tensor,
        outputs: Tensor | None,
        coupled: bool,
    ) -> Tensor:
        """The batch mean of the per-sample norms, by the term's method."""
        B = inputs.shape[0]
        gen = resolve_generator(self.generator or self._fallback, inputs.device)
        x = inputs
        if self.subsample < 1:
            # coupled samples (train-mode BatchNorm) take 2 at least: one
            # sample alone cannot be normalised by its batch (BatchNorm raises)
            m = min(B, max(2 if coupled else 1, math.ceil(self.subsample * B)))
            idx = torch.randperm(B, generator=gen, device=gen.device)[:m]
            x, outputs = inputs[idx.to(inputs.device)], None
        values: Tensor | None = None
        if self.wrt is not None:  # the inner variable comes from a pass of its own
            with kept_buffers(model), self._sequence_checked(model, modules, x):
                if self.method == "jvp":
                    values = _probes_at(
                        model, x, self.output, self.wrt, "jvp", self.distribution,
                        self.num_probes, None, gen, coupled,
                    )  # fmt: skip
                else:
                    e, out = _select_wrt(model, x, self.output, self.wrt)
                    values = self._norms(model, e, out, gen, coupled, strict=True)
        elif (out := self._reused(x, outputs)) is not None:
            # the task loss's forward pass
            values = self._norms(model, x, out, gen, coupled, strict=True)
            if not values.requires_grad and any(
                p.requires_grad for m in modules for p in m.parameters(recurse=False)
            ):
                # a graph whose VJPs are not differentiable again: a function
                # compiled around the model (torch.compile(lambda x: model(x)),
                # which compiled() does not see), whose batched backward
                # returned the right value with no graph, so the penalty
                # moved nothing. A pass of the term's own instead
                values = None
        if values is None:
            # a forward pass of its own, in the model's current mode; running
            # statistics are put back so the batch is not counted twice
            xg = x.detach().requires_grad_(self.method != "jvp")
            with kept_buffers(model), self._sequence_checked(model, modules, x):
                if self.method == "jvp":
                    values = _input_side(
                        lambda z: _select(model, z, self.output), xg, "jvp",
                        self.distribution, self.num_probes, None, gen, coupled,
                    )  # fmt: skip
                else:
                    out = _select(model, xg, self.output)
                    # a model that cuts the path from x (no_grad inside) would
                    # read as a penalty of 0, whatever its GC: refused
                    values = self._norms(model, xg, out, gen, coupled, strict=True)
        return values.mean()

    def _sequence_checked(
        self, model: nn.Module, modules: list[nn.Module], x: Tensor
    ) -> AbstractContextManager[Any]:
        """The term's own passes refuse a sequence layer run along the batch.

        See :func:`geocomplexity.jacobian.sequence_along_batch`; not for
        ``coupled=True``. The task's forward pass, when it is reused, runs
        before the term is called, and is not checked.
        """
        if self.coupled is True:
            return nullcontext()
        return sequence_along_batch(model, modules, x.shape[0])

    def _reused(self, x: Tensor, outputs: Any) -> Tensor | None:
        """The handed-over ``outputs`` as ``(B, k)``, where they can be reused.

        They can where the inputs required grad in that forward pass and the
        method is a reverse-mode one; ``output=`` a callable is applied to
        them (a submodule's output is not among them).
        """
        if (
            outputs is None
            or self.method == "jvp"
            or isinstance(self.output, str)
            or not x.requires_grad
        ):
            return None
        picked = outputs if self.output is None else self.output(outputs)
        B = x.shape[0]
        if isinstance(picked, Tensor) and (picked.dim() == 0 or picked.shape[0] != B):
            # the model maps batches fine: the outputs are another batch's
            raise ValueError(
                f"outputs= has shape {tuple(picked.shape)}, but the inputs are a "
                f"batch of {B}: hand over the outputs of model(inputs) for this "
                "batch (or leave outputs= out)"
            )
        out = _flat_output(picked, B)
        return out if out.grad_fn is not None else None

    def _norms(
        self,
        model: nn.Module,
        x: Tensor,
        out: Tensor,
        gen: torch.Generator,
        coupled: bool,
        strict: bool = False,
    ) -> Tensor:
        chunk = _default_chunk(
            model,
            _vjp_count(self.method, out.shape, self.num_probes, coupled),
            x,
            out.shape[1],
        )
        drawn = gen.get_state() if chunk > 1 else None

        def norms(chunk: int) -> Tensor:
            return reverse_sq_norms(
                x,
                out,
                method=self.method,
                coupled=coupled,
                num_probes=self.num_probes,
                distribution=self.distribution,
                chunk_size=chunk,
                generator=gen,
                create_graph=True,
                strict=strict,
            )

        def restart() -> None:  # the same probes again, with a smaller chunk
            if drawn is not None:
                gen.set_state(drawn)

        # a retry reuses the graph: create_graph keeps it whole
        return _shrinking_chunk(norms, chunk, fixed=False, restart=restart)

    def __repr__(self) -> str:
        return (
            f"GeometricComplexity({self.strength!r}, method={self.method!r}, "
            f"num_probes={self.num_probes}, subsample={self.subsample}, "
            f"distribution={self.distribution!r}"
            # only when set: checkpoints and run configs are keyed by this
            # string, and those saved before the option existed still match
            + ("" if self.wrt is None else f", wrt={self.wrt!r}")
            + ("" if self.coupled is None else f", coupled={self.coupled!r}")
            + ("" if self.output is None else f", output={_named(self.output)}")
            + ")"
        )


def _sinks_outputs(model: nn.Module) -> bool:
    """Whether a DDP model runs its outputs through its ``_DDPSink`` function.

    It does to find unused parameters, and under a static graph (its first
    iteration at least); the function has no forward-mode derivative.
    """
    return isinstance(model, nn.parallel.DistributedDataParallel) and bool(
        model.find_unused_parameters or model.static_graph
    )


def _named(output: Output) -> str:
    """``output`` as the repr shows it: a function by its qualified name.

    Not its default repr, whose memory address would change from run to run
    and key a resumed run's checkpoint apart from the run that wrote it.
    """
    if isinstance(output, str):
        return repr(output)
    module = getattr(output, "__module__", None)
    name = getattr(output, "__qualname__", None) or type(output).__qualname__
    return f"{module}.{name}" if module else name
