"""The regularizer protocol: one call signature, composition with ``+`` and ``*``.

Every term is called as ``term(model, inputs, targets, outputs=..., loss_fn=...)``
and returns a differentiable scalar already multiplied by its strength, so a
training step is ``loss = task_loss + term(model, x, y, outputs=out)``. Terms
reuse ``outputs`` when the caller ran the forward pass already.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LossFn",
    "Regularizer",
    "at_least_float32",
    "backward_into",
    "grad_buffer",
    "hooked",
    "refuse_reentrant_checkpoint",
    "trainable",
]

#: ``loss_fn(outputs, targets) -> scalar``; cross-entropy when not given.
LossFn = Callable[[Tensor, Tensor], Tensor]


def trainable(model: nn.Module) -> list[Tensor]:
    """The parameters a penalty differentiates: those that require grad."""
    return [p for p in model.parameters() if p.requires_grad]


def grad_buffer(tensor: Tensor) -> Tensor:
    """``tensor.grad``, a zero one made first where there is none.

    For the terms that add a gradient by hand after the task's backward pass.
    """
    if tensor.grad is None:
        tensor.grad = torch.zeros_like(tensor)
    return tensor.grad


def hooked(tensor: Tensor) -> bool:
    """Whether a hook is registered on ``tensor``'s gradient.

    ``register_hook`` (a rescaling, a gradient mask) or
    ``register_post_accumulate_grad_hook`` (an optimizer step in the backward
    pass). A term that writes a gradient into ``.grad`` by hand would bypass
    them: where there is one, it goes through autograd instead.
    """
    return bool(tensor._backward_hooks or tensor._post_accumulate_grad_hooks)


def backward_into(loss: Tensor, params: list[Tensor]) -> None:
    """``loss.backward(inputs=params)``, which refuses what it cannot see through.

    A block run by ``torch.utils.checkpoint`` with ``use_reentrant=True``
    hides its parameters from a backward pass told its inputs: they get no
    gradient, silently. A parameter whose ``.grad`` the pass left as it was
    (the same tensor at the same version) sends this to look for one.

    Raises:
        RuntimeError: see :func:`refuse_reentrant_checkpoint`.
    """
    before = [(g := p.grad, None if g is None else g._version) for p in params]
    loss.backward(inputs=params)
    for p, (g, version) in zip(params, before, strict=True):
        if p.grad is g and (g is None or g._version == version):
            refuse_reentrant_checkpoint(loss)
            return


def refuse_reentrant_checkpoint(root: Tensor) -> None:
    """Refuse a graph with a block checkpointed by ``use_reentrant=True``.

    Such a block runs its forward pass without a graph, and its parameters
    are reached only by a plain ``backward()``: ``torch.autograd.grad`` and
    ``backward(inputs=...)``, which the terms take, skip them (PyTorch
    raises only where the block lies on the way to a requested tensor).

    Raises:
        RuntimeError: ``root``'s graph has such a block.
    """
    seen, stack = set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            raise RuntimeError(
                "the model runs torch.utils.checkpoint with use_reentrant=True, "
                "whose checkpointed parameters a gradient taken for chosen "
                "tensors (a penalty's autograd.grad, backward(inputs=params)) "
                "does not reach: they would get no gradient. Pass "
                "use_reentrant=False to checkpoint"
            )
        stack.extend(n for n, _ in node.next_functions)


def explained(err: RuntimeError) -> RuntimeError:
    """``err`` with the fix added, where it is a known limit of autograd.

    Two failures of a penalty's backward pass on attention models come from
    PyTorch, not from the model: the fused attention kernels have no double
    backward, and softmax's forward-mode derivative cannot be backpropagated
    (the ``"jvp"`` GC penalty, which reroutes the softmax calls it can reach
    to a composite, :mod:`geocomplexity.composite_ops`, but not one made
    inside another C++ kernel). A third: activation checkpointing recomputes
    a block's forward pass without the ``"jvp"`` penalty's tangents.
    Anything else comes back unchanged.

    Returns:
        A ``RuntimeError`` naming the fix, or ``err`` itself.
    """
    message = str(err)
    if "scaled_dot_product" in message and "not implemented" in message:
        return RuntimeError(
            f"{message}\n\nThe forward pass ran attention through a fused kernel, "
            "which has no second derivative. Run it under "
            "geocomplexity.state.differentiable_attention() (fit does), or "
            "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)."
        )
    if "modified by an inplace operation" in message and "output 0 of Exp" in message:
        return RuntimeError(
            f"{message}\n\nIf the penalty is GeometricComplexity(method='jvp') on a "
            "model with softmax: PyTorch cannot backpropagate the fused softmax's "
            "forward-mode derivative, and this one runs inside a kernel that "
            "geocomplexity.composite_ops cannot reroute; use method='projection'."
        )
    if "torch.utils.checkpoint" in message and "recomputation" in message:
        return RuntimeError(
            f"{message}\n\nIf the penalty is GeometricComplexity(method='jvp') on "
            "a model with activation checkpointing: the checkpointed blocks "
            "recompute their forward pass in the backward pass without the jvp "
            "passes' tangents; use method='projection' or 'exact'."
        )
    return err


def check_batch(inputs: Any, term: str, *, tensor: bool = True) -> None:
    """Refuse what is no batch: a loader where a tensor belongs, an empty batch.

    From the shape alone (no device sync).

    Args:
        inputs: the batch handed to the term.
        term: the term's name, for the message.
        tensor: whether ``inputs`` must be a tensor (a term that only hands
            them to the model may take a dict of tensors).

    Raises:
        TypeError: ``inputs`` is no tensor where one is needed.
        ValueError: an empty batch (no sample).
    """
    if not isinstance(inputs, Tensor):
        if tensor:
            raise TypeError(
                f"{term} takes inputs as a tensor batch (B, *in_shape), got "
                f"{type(inputs).__name__}; for a DataLoader, call the term on "
                "each batch: for x, y in loader: term(model, x, y)"
            )
        return
    if inputs.dim() > 0 and inputs.shape[0] == 0:
        raise ValueError(
            f"{term} got an empty batch (inputs of shape {tuple(inputs.shape)}): "
            "the penalty is a mean over the batch and has no value on no "
            "sample; skip empty batches"
        )


def check_strength(strength: float) -> float:
    """Validate a penalty strength.

    Returns:
        ``strength`` as a float.

    Raises:
        ValueError: negative or not finite.
    """
    s = float(strength)
    if not s >= 0 or s == float("inf"):
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    return s


def at_least_float32(*dtypes: torch.dtype) -> torch.dtype:
    """The dtypes promoted with float32, where a penalty sums or steps.

    Half precision overflows beyond 65504: a float16 model's sum of squared
    weights, or the σ² of its power iteration.
    """
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


class Regularizer(abc.ABC):
    """Abstract base of every penalty term.

    Subclasses implement :meth:`__call__`; they may carry state (power-iteration
    vectors), saved and restored with :meth:`state_dict` / :meth:`load_state_dict`.
    """

    #: The term differentiates through the caller's forward pass with respect to
    #: the inputs, so a training loop should hand it inputs that require grad.
    reuses_input_grad: bool = False

    #: The term's gradient reaches every tensor its value depends on, not only
    #: the model's parameters (the finite-difference gradient norm shifts the
    #: parameters alone: a tensor outside the model, a temperature in
    #: ``loss_fn``, gets none of its gradient).
    reaches_tensors_outside_model: bool = True

    def seed(self, generator: torch.Generator) -> None:
        """Give a term that was built without a generator a seeded fallback.

        :func:`geocomplexity.training.fit` calls this so that a run is
        reproducible from its seed; a generator passed to the term wins.
        """
        del generator

    @abc.abstractmethod
    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor | None = None,
        *,
        outputs: Tensor | None = None,
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        """The penalty, a differentiable scalar already scaled by its strength.

        Args:
            model: the model being trained.
            inputs: the batch ``(B, *in_shape)``.
            targets: the batch's targets (for terms that need the task loss).
            outputs: ``model(inputs)`` if the caller has it; reused where the
                term can (for the GC term, ``inputs`` must then require grad).
            loss_fn: the task loss ``loss_fn(outputs, targets)``.
        """

    def backward(
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
        """Backpropagate ``loss`` plus this term into the parameters' ``.grad``.

        What a training step does with a term; :func:`~geocomplexity.training.fit`
        calls it. The default adds :meth:`__call__` to ``loss`` and runs one
        backward pass; a term whose gradient is cheaper to assemble by hand (the
        finite-difference gradient norm, which needs the task gradient itself)
        overrides it. Gradients accumulate into ``.grad`` as ``backward()`` does.

        Args:
            loss: the task loss, a scalar on the graph of ``outputs``.
            model: the model being trained.
            inputs: the batch.
            targets: the batch's targets.
            outputs: ``model(inputs)``, the graph ``loss`` was computed on.
            loss_fn: the task loss function.
            params: the tensors to differentiate (default: the trainable
                parameters).

        Returns:
            The penalty's value, detached.
        """
        # a list: backward_into walks the parameters twice (an iterator,
        # model.parameters(), would be spent before the backward pass)
        params = trainable(model) if params is None else list(params)
        penalty = self(model, inputs, targets, outputs=outputs, loss_fn=loss_fn)
        # only the parameters: a penalty may have made the inputs require grad,
        # and their gradient would cost a full extra product per layer
        try:
            backward_into(loss + penalty, params)
        except RuntimeError as err:
            raise explained(err) from err
        return penalty.detach()

    def state_dict(self) -> dict[str, Any]:
        """Persistent state (empty for stateless terms).

        Returns:
            A dict of tensors and plain values.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: state where this term keeps none (another term's).
        """
        if state:
            raise ValueError(
                f"{self!r} keeps no state, but was given state with keys "
                f"{sorted(state)}: the state comes from another term (or "
                "another combination of terms); load it into the one it was "
                "saved from"
            )

    def __add__(self, other: Regularizer) -> Regularizer:
        if not isinstance(other, Regularizer):
            return NotImplemented
        return Sum((self, other))

    def __radd__(self, other: Any) -> Regularizer:
        # 0 + term: the start of sum(terms)
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, factor: float) -> Regularizer:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Scaled(self, float(factor))

    __rmul__ = __mul__


class Sum(Regularizer):
    """The sum of terms (built by ``a + b``)."""

    def __init__(self, terms: tuple[Regularizer, ...]) -> None:
        flat: list[Regularizer] = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, Sum) else (t,))
        self.terms = tuple(flat)

    def __call__(self, model, inputs=None, targets=None, *, outputs=None, loss_fn=None):
        return sum(
            t(model, inputs, targets, outputs=outputs, loss_fn=loss_fn)
            for t in self.terms
        )

    @property
    def reuses_input_grad(self) -> bool:  # type: ignore[override]
        return any(t.reuses_input_grad for t in self.terms)

    @property
    def reaches_tensors_outside_model(self) -> bool:  # type: ignore[override]
        return all(t.reaches_tensors_outside_model for t in self.terms)

    def seed(self, generator: torch.Generator) -> None:
        for t in self.terms:
            t.seed(generator)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): t.state_dict() for i, t in enumerate(self.terms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = [str(i) for i in range(len(self.terms))]
        if sorted(state) != sorted(expected):
            missing = [k for k in expected if k not in state]
            raise ValueError(
                f"the state holds terms {sorted(state)}, but {self!r} has "
                f"{len(self.terms)} ({expected}; missing {missing}): the state "
                "comes from another combination of terms; load it into the "
                "sum it was saved from"
            )
        for i, t in enumerate(self.terms):
            try:
                t.load_state_dict(state[str(i)])
            except (KeyError, ValueError) as err:
                raise ValueError(
                    f"term {i} ({t!r}) of {self!r} cannot load its part of the "
                    f"state: {err}; the state comes from another combination "
                    "of terms"
                ) from err

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.terms))


class Scaled(Regularizer):
    """A term times a constant (built by ``c * term``)."""

    def __init__(self, term: Regularizer, factor: float) -> None:
        self.term, self.factor = term, check_strength(factor)

    def __call__(self, model, inputs=None, targets=None, *, outputs=None, loss_fn=None):
        return self.factor * self.term(
            model, inputs, targets, outputs=outputs, loss_fn=loss_fn
        )

    @property
    def reuses_input_grad(self) -> bool:  # type: ignore[override]
        return self.term.reuses_input_grad

    @property
    def reaches_tensors_outside_model(self) -> bool:  # type: ignore[override]
        return self.term.reaches_tensors_outside_model

    def seed(self, generator: torch.Generator) -> None:
        self.term.seed(generator)

    def state_dict(self) -> dict[str, Any]:
        return self.term.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.term.load_state_dict(state)

    def __repr__(self) -> str:
        # a sum in parentheses: fit's checkpoints are keyed by this string
        term = repr(self.term)
        if isinstance(self.term, Sum):
            term = f"({term})"
        return f"{self.factor!r} * {term}"
