r"""Per-sample squared Frobenius norms of a model's input Jacobian.

For a model :math:`g:\mathbb{R}^d\to\mathbb{R}^k` and a batch :math:`x_1..x_B`,
:func:`jacobian_sq_norms` returns :math:`\|\partial g(x_i)/\partial x_i\|_F^2`
for each sample; non-batch dimensions of input and output are flattened. Four
methods share one signature:

``"exact"``
    One shared forward pass, then :math:`k` input-side vector-Jacobian products
    (reverse mode, :math:`\|J\|_F^2=\sum_j\|J^\top e_j\|^2`), or :math:`d`
    Jacobian-vector products (forward mode) when the input is smaller than the
    output. The :math:`k` products are batched into one backward pass in chunks of
    ``chunk_size``, or looped (``chunk_size=1``), whichever is faster for the
    model (:mod:`geocomplexity.tuning`). In eval mode samples are
    independent, so one backward pass of the batch-summed output gives every
    sample's row at once. The :math:`d` forward-mode products are batched too
    (``vmap`` of ``torch.func.jvp``: one primal pass carries ``chunk_size``
    tangents), where no pass replays the RNG (eval mode).

``"projection"``
    Output-side probes :math:`v` with :math:`\mathbb{E}[vv^\top]=I`:
    :math:`\mathbb{E}\|J^\top v\|^2=\|J\|_F^2`. One probe costs one VJP, less than
    a training step's backward pass (no weight gradients).

``"jvp"``
    Input-side probes :math:`u`: :math:`\mathbb{E}\|Ju\|^2=\|J\|_F^2`, by
    forward-mode AD. Its variance grows with the input dimension. Several
    probes share a batched pass in eval mode when no graph is kept. With
    ``create_graph=True`` its passes run layer, batch and instance norm as
    composite operations (:mod:`geocomplexity.composite_ops`), one probe a pass.

``"finite_difference"``
    :math:`\|g(x+\varepsilon u)-g(x)\|^2/\varepsilon^2` with input probes ``u``:
    first-order autograd only, for models whose double backward or forward AD is
    missing. Measurement only: on piecewise-linear (ReLU) networks its parameter
    gradient is dominated by kink crossings, an :math:`O(1)` jump in
    :math:`\partial g/\partial\theta` with probability :math:`O(\varepsilon)`
    divided by :math:`\varepsilon`, so its error grows as the step shrinks. It
    therefore refuses ``create_graph=True``.

Train mode (``mode="train"``) couples the samples of a batch through BatchNorm
statistics; the batch-sum trick would then add cross-sample terms
:math:`\partial g(x_j)/\partial x_i`. What is measured there is the diagonal
block :math:`\partial g(x_i)/\partial x_i` (batch held fixed). ``"exact"``
takes it with one VJP per sample and direction, :math:`B` times the cost.
``"projection"`` takes two VJPs per probe, the second with each sample's probe
sign-flipped at random, and multiplies them so that the cross-sample terms
cancel in expectation: unbiased, at twice the uncoupled cost (see
:func:`_decoupled_vjp_sq_norms`). ``"jvp"`` and ``"finite_difference"`` do the
same on the input side: two perturbed passes per probe, the second with each
sample's probe sign-flipped. Dropout is live in train mode, so every method
measures the network of one dropout mask: the reverse-mode methods run one
forward pass, and the passes of jvp and finite differences replay the same
random numbers.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import operator
import re
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from geocomplexity import tuning
from geocomplexity.composite_ops import _wide, composite_ops, contiguous_group_norm
from geocomplexity.probes import (
    check_distribution,
    draw_probes,
    input_probes,
    resolve_generator,
)
from geocomplexity.state import (
    _GLOBAL_RNG,
    batch_norm_couples,
    differentiable_attention,
    in_this_thread,
    kept_buffers,
    no_attention_fast_path,
    preserved,
    rewound,
    rng_carried_on,
)

__all__ = ["METHODS", "MODES", "Output", "jacobian_sq_norms", "reverse_sq_norms"]

METHODS = ("exact", "projection", "jvp", "finite_difference")
MODES = ("eval", "train")

#: What is differentiated: ``None`` (the model's output), a callable applied to
#: the output, or the name of a submodule whose output is taken.
Output = str | Callable[[Any], Tensor] | None


#: torch's messages for an input whose shape the model's layers cannot take
_SHAPE_MESSAGES = re.compile(
    r"cannot be multiplied|size mismatch|must match the size|expected input"
    r"|is invalid for input of size|should contain \d+ elements|channels"
    r"|Expected \d+D|to have \d+ channels|normalized_shape",
    re.IGNORECASE,
)


class ForwardFailed(RuntimeError):
    """The model's forward pass failed on the inputs' shape (torch's message kept)."""


def forward_failed(err: RuntimeError, x: Tensor) -> RuntimeError:
    """``err`` naming the inputs' shape, where torch refused it; else ``err``.

    A layer given inputs of the wrong shape (a wrong feature count) fails deep
    in torch ("mat1 and mat2 shapes cannot be multiplied") without saying that
    the input is at fault. The message is kept, so that a caller matching on
    it still matches.
    """
    if isinstance(err, ForwardFailed) or type(err) is not RuntimeError:
        return err
    if "leaf Variable that requires grad is being used in an in-place" in str(err):
        return ForwardFailed(
            f"the model writes its input in place: {err}. The reverse-mode "
            "methods ('exact', 'projection', the penalties) differentiate with "
            "respect to that input: make its first operation out of place "
            "(x = x / 255 for x /= 255, ReLU(inplace=False)) or start the "
            "forward with x = x.clone(); method='jvp' measures it as it is"
        )
    if not _SHAPE_MESSAGES.search(str(err)):
        return err
    return ForwardFailed(
        f"the model's forward pass failed on inputs of shape {tuple(x.shape)}: "
        f"{err}. Check the input's shape: it must be (B, *in_shape), a batch "
        "first, then the shape the model's first layer takes (e.g. (B, "
        "in_features) for a Linear)"
    )


#: Held by each forward-mode pass (:func:`_dual_level`). PyTorch's dual levels
#: are one for the process, not per thread: a jvp measurement in one thread
#: found another thread's level open and refused ("inside a dual_level already
#: open"), or failed entering its own; the passes take turns instead.
_FORWARD_AD = threading.RLock()


@contextlib.contextmanager
def _dual_level() -> Any:
    """``fwAD.dual_level()``, while no other thread's pass holds one."""
    with _FORWARD_AD, fwAD.dual_level():
        yield


class _Captured(Exception):
    """Stops the forward pass once the requested submodule has run."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


def _not_a_tensor_hint(x: Any) -> str:
    """The fix for inputs that are no tensor, as a clause for an error message."""
    if isinstance(x, nn.Module):
        return "; the arguments are (model, x), the model first"
    several = (
        ". A model of several inputs is measured as a module that takes one "
        "tensor: concatenate the inputs and split them in its forward pass (GC "
        "in all of them), or close over the ones held fixed"
    )
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, Tensor) for t in x):
        return (
            f" of {len(x)} tensors; pass the input tensor alone (an (inputs, "
            "targets) batch's first element), or torch.stack a list of samples"
            + several
        )
    if isinstance(x, dict):
        return several
    if isinstance(x, (tuple, list)) or hasattr(x, "__array__"):
        return "; convert it with torch.as_tensor(x, dtype=torch.float32)"
    if isinstance(x, (torch.utils.data.DataLoader, torch.utils.data.Dataset)):
        return (
            "; a batch goes here: for a whole data set, use "
            "geocomplexity.measure(model, data)"
        )
    return ""


def check_input(x: Any, *, differentiated: bool = True) -> Tensor:
    """Validate a batch of inputs.

    Args:
        x: the batch.
        differentiated: ``x`` is what the Jacobian is taken with respect to,
            so it must be floating point. ``False`` where ``wrt=`` names an
            inner variable instead (token ids into an embedding).

    Returns:
        ``x`` unchanged.

    Raises:
        TypeError: not a tensor, or not floating point where it must be.
        ValueError: no batch dimension, empty, or NaN/inf entries.
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"x must be a torch.Tensor of inputs, got {type(x).__name__}"
            + _not_a_tensor_hint(x)
        )
    if x.is_complex():  # x.float(), the fix below, would drop its imaginary part
        raise TypeError(
            f"x has complex dtype {x.dtype}; geometric complexity is the "
            "Jacobian norm of a real map. Measure the model on real inputs: "
            "pass torch.view_as_real(x) (a last dimension of 2, real and "
            "imaginary parts) and rebuild the complex tensor inside the model "
            "with torch.view_as_complex"
        )
    if differentiated and not torch.is_floating_point(x):
        raise TypeError(
            f"x has dtype {x.dtype}, but geometric complexity differentiates with "
            "respect to the input, which must be floating point. For token ids or "
            "other integer inputs, measure with respect to the embeddings: "
            "wrt='<name of the embedding submodule>' (e.g. wrt='embed'), or "
            "convert the input with x.float() if it is really continuous."
        )
    if x.dim() == 0:
        raise ValueError("x is a scalar; give a batch of shape (B, *input_shape)")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (B = 0); give at least one sample")
    if x.is_meta:
        raise ValueError(
            "x is on the meta device, which holds shapes but no values; "
            "materialise the model and its inputs on a real device"
        )
    if not torch.is_floating_point(x):  # token ids, with wrt=: always finite
        return x
    # one reduction: a NaN or inf anywhere makes the sum non-finite (a finite
    # sum that overflows only costs the exact count below); the scalar is
    # tested in Python, since torch.isfinite is four kernels even on one number
    if not math.isfinite(x.sum().item()) and (bad := (~torch.isfinite(x)).sum().item()):
        raise ValueError(
            f"x contains {bad} NaN or infinite entries (of {x.numel()}); "
            "clean or drop those samples before measuring"
        )
    return x


def check_differentiable_model(modules: list[nn.Module], method: str) -> None:
    """Clear errors for a model that a derivative through it silently misses.

    Two kinds are refused:

    * parameters or buffers created under ``torch.inference_mode()`` (a model
      built in an eval script): an inference tensor cannot be saved for
      backward, and PyTorch's error names no fix. Finite differences take no
      derivative and are left to run.
    * a ``torch.jit.script`` module for ``"jvp"``: the TorchScript executor
      drops forward-mode tangents (the output of a scripted MLP had a tangent
      on its first call and none after), so GC read 0, silently. Traced
      modules keep them.

    And for ``"jvp"`` inside a forward-mode level the caller has open, which
    PyTorch does not nest.

    Args:
        modules: the model's modules.
        method: the measuring method (``"jvp"``, ``"exact"``, ...).
    """
    if method != "finite_difference":
        for module in modules:
            tensors = (*module._parameters.values(), *module._buffers.values())
            if any(t is not None and t.is_inference() for t in tensors):
                raise RuntimeError(
                    "the model's parameters or buffers were created under "
                    "torch.inference_mode() (inference tensors), which cannot "
                    "take part in a differentiated computation; build or load "
                    "the model outside inference_mode, or measure a copy made "
                    "outside it (copy.deepcopy(model) holds normal tensors)"
                )
    if method != "jvp":
        return
    if any(isinstance(m, torch.jit.RecursiveScriptModule) for m in modules):
        raise ValueError(
            "method='jvp' cannot measure a torch.jit.script module: TorchScript "
            "drops forward-mode derivatives, and GC would read 0; use "
            "method='exact' or 'projection', or the module before scripting"
        )
    with _FORWARD_AD:  # a level open now is none of this library's passes
        open_already = fwAD._current_level >= 0
    if open_already:
        raise RuntimeError(
            "method='jvp' runs its own forward-mode passes, and this call is "
            "inside a torch.autograd.forward_ad.dual_level() already open, which "
            "PyTorch cannot nest; measure outside the dual_level, or use "
            "method='exact' or 'projection'"
        )


def _check_model_matches(model: nn.Module | list[nn.Module], x: Tensor) -> None:
    """Clear errors for a dtype or device mismatch between model and input.

    The first parameter stands for the model: a model that mixes dtypes or
    devices on purpose handles its own casts, and torch reports the rest.

    Args:
        model: the model, or its modules as :func:`preserved` yields them (the
            walk is then not repeated: inside a training step, where the
            interpreter's caches are cold, ``model.parameters()`` alone costs
            a few percent of a small model's projection).
        x: the inputs.
    """
    modules = model.modules() if isinstance(model, nn.Module) else model
    for module in modules:
        for p in module._parameters.values():
            if p is None:
                continue
            if p.is_floating_point() and x.is_floating_point() and p.dtype != x.dtype:
                raise TypeError(
                    f"x has dtype {x.dtype} but the model's parameters are "
                    f"{p.dtype}; convert one of them (e.g. x.to({p.dtype}) or "
                    f"model.to({x.dtype}))"
                )
            if p.is_meta:
                raise ValueError(
                    "the model is on the meta device, which holds shapes but no "
                    "values; materialise it (model.to_empty(device=...), then "
                    "load its weights)"
                )
            if p.device != x.device:
                raise ValueError(
                    f"x is on {x.device} but the model is on {p.device}; move one "
                    f"of them (e.g. x.to({str(p.device)!r}))"
                )
            return


def unwrapped(
    model: nn.Module, output: Output = None, wrt: str | None = None
) -> tuple[nn.Module, Output, str | None]:
    """The module a ``DistributedDataParallel`` or ``torch.compile`` wrapper runs.

    Both compute the same function as the module they wrap, but measuring
    through them goes wrong: DDP's forward pass broadcasts the buffers
    (a collective that hangs where ranks measure different numbers of batches,
    and overwrites this rank's BatchNorm statistics), and a compiled graph has
    no batched backward, no forward-mode derivative, and ignores hooks added
    after it was compiled (``output=``, ``wrt=``). Submodule names may be given
    with the wrapper's prefix (``"module.features"``) or without it.

    Returns:
        ``(module, output, wrt)``, the names relative to the module.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            inner, prefix = model.module, "module."
        # the type's name first: a missing attribute costs a Module an exception
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            inner, prefix = model._orig_mod, "_orig_mod."
        else:
            return model, output, wrt
        if isinstance(output, str) and output.startswith(prefix):
            output = output[len(prefix) :]
        if wrt is not None and wrt.startswith(prefix):
            wrt = wrt[len(prefix) :]
        model = inner


def _submodule(model: nn.Module, name: str, option: str) -> nn.Module:
    """``model.get_submodule(name)``, with an error listing valid names.

    Raises:
        ValueError: no submodule has that name.
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    # a wrapper's submodule named without its prefix ("2" for "module.2" of a
    # DDP model), as measuring takes it: the same module, so a hook on it runs
    # within the wrapper's forward pass (the penalty's, which DDP must run)
    inner = unwrapped(model)[0]
    if inner is not model:
        with contextlib.suppress(AttributeError):
            return inner.get_submodule(name)
    names = [n for n, _ in model.named_modules() if n]
    raise ValueError(
        f"{option}={name!r} names no submodule of the model; "
        f"valid names include {names[:12]}"
    )


def check_output(output: Any) -> None:
    """Refuse an ``output=`` that is not None, a callable or a submodule name.

    Raises:
        TypeError: anything else.
    """
    if not (output is None or isinstance(output, str) or callable(output)):
        raise TypeError(
            "output must be None, a callable on the model's output, or the "
            f"name of a submodule; got {type(output).__name__}"
        )


def _select(model: nn.Module, x: Tensor, output: Output) -> Tensor:
    """Run the model and return what is differentiated, flattened to (B, k).

    Where ``x`` needs no gradient (the passes of jvp and finite differences,
    which take it detached, not copied) the model runs on a copy: one that
    writes its input in place (``x /= 255``, a first ``ReLU(inplace=True)``)
    wrote into the caller's tensor and moved the point each later pass ran
    at. Not where ``x`` is the leaf the VJPs differentiate against: torch
    refuses to write that in place, which :func:`forward_failed` explains,
    and a copy would be a non-leaf input, of which a compiled model warns.
    """
    if not x.requires_grad:
        x = x.clone()
    if isinstance(output, str):
        sub = _submodule(model, output, "output")

        def hook(_module: nn.Module, _args: Any, result: Any) -> None:
            raise _Captured(result)

        handle = sub.register_forward_hook(in_this_thread(hook))
        try:
            model(x)
        except _Captured as captured:
            out = captured.value
        except RuntimeError as err:
            raise forward_failed(err, x) from err
        else:
            raise ValueError(
                f"submodule {output!r} did not run during the forward pass"
            )
        finally:
            handle.remove()
        if not isinstance(out, Tensor):  # output= callables act on the model's
            raise TypeError(
                f"submodule {output!r} returns a {type(out).__name__}, not a "
                "tensor; name a submodule that returns the tensor to measure, or "
                "pass output= a function of the model's output"
            )
    else:
        try:
            out = model(x)
        except RuntimeError as err:
            raise forward_failed(err, x) from err
        if output is not None:
            check_output(output)
            out = output(out)
    return _flat_output(out, x.shape[0])


def _flat_output(out: Any, B: int) -> Tensor:
    """The differentiated output ``(B, ...)`` checked and flattened to ``(B, k)``.

    Raises:
        TypeError: ``out`` is no tensor (a dict or tuple: the hint names
            ``output=``), or not floating point.
        ValueError: its first dimension is not the batch of size ``B``.
    """
    if not isinstance(out, Tensor):
        hint = ""
        if isinstance(out, dict):
            key = next(iter(out), "key")
            hint = f" (keys {list(out)[:8]}; e.g. output=lambda o: o[{key!r}])"
        elif isinstance(out, (tuple, list)):
            hint = f" of length {len(out)} (e.g. output=lambda o: o[0])"
        raise TypeError(
            f"the differentiated output is a {type(out).__name__}{hint}, not a tensor; "
            "pass output= to pick the tensor to measure"
        )
    if out.dim() == 0 or out.shape[0] != B:
        raise ValueError(
            f"the output has shape {tuple(out.shape)}, with no batch dimension of "
            f"size {B} first; the model must map (B, ...) inputs to (B, ...) outputs "
            "(if the input is one sample, add its batch dimension: x[None])"
        )
    if out.is_complex():
        raise TypeError(
            f"the output has complex dtype {out.dtype}; geometric complexity is "
            "the Jacobian norm of a real map: pass output=torch.view_as_real "
            "(real and imaginary parts, both counted) or output=torch.abs"
        )
    if not torch.is_floating_point(out):
        raise TypeError(f"the output has non-floating dtype {out.dtype}")
    return out if out.dim() == 2 else out.reshape(B, -1)


def _run_at(
    model: nn.Module,
    x: Tensor,
    output: Output,
    wrt: str,
    replace: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Run the model with submodule ``wrt``'s output ``e`` replaced by ``replace(e)``.

    Returns:
        ``(e, out)``: the submodule's own output and the differentiated output,
        flattened to ``(B, k)``.

    Raises:
        ValueError: the submodule does not run exactly once before the output
            is taken, or its output has no batch dimension of size B.
        TypeError: its output is not a floating-point tensor.
    """
    if not wrt:  # "" names the model itself: its output against itself
        raise ValueError("wrt='' names the whole model; name a submodule")
    sub = _submodule(model, wrt, "wrt")
    seen: list[Tensor] = []
    B = x.shape[0]

    def hook(_module: nn.Module, _args: Any, result: Any) -> Any:
        if seen:
            raise ValueError(
                f"submodule wrt={wrt!r} ran more than once in the forward pass, "
                "so its output is no single variable to differentiate against"
            )
        if not isinstance(result, Tensor) or not torch.is_floating_point(result):
            kind = result.dtype if isinstance(result, Tensor) else type(result)
            raise TypeError(
                f"submodule wrt={wrt!r} returns {kind}; the variable to "
                "differentiate against must be a floating-point tensor"
            )
        if result.dim() == 0 or result.shape[0] != B:
            raise ValueError(
                f"submodule wrt={wrt!r} returns shape {tuple(result.shape)}, with "
                f"no batch dimension of size {B} first"
            )
        seen.append(result)
        return replace(result)

    handle = sub.register_forward_hook(in_this_thread(hook))
    try:
        out = _select(model, x, output)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(
            f"submodule wrt={wrt!r} did not run before the differentiated output "
            "was taken; name a module the forward pass runs first"
        )
    return seen[0], out


def _select_wrt(
    model: nn.Module, x: Tensor, output: Output, wrt: str
) -> tuple[Tensor, Tensor]:
    """Run the model; return submodule ``wrt``'s output and the differentiated one.

    The submodule's output ``e`` (shape ``(B, ...)``) is the variable the
    Jacobian is taken against: ``∂g/∂e`` with everything before it fixed. It
    stays in the graph where it depends on parameters (an embedding's
    weights), so a penalty built on it is differentiable in them too, and is
    made a leaf that requires grad where it does not (a frozen embedding).

    Returns:
        ``(e, out)``, ``out`` flattened to ``(B, k)``.
    """
    held: list[Tensor] = []

    def replace(e: Tensor) -> Tensor:
        if not e.requires_grad:
            e = e.detach().requires_grad_(True)
        held.append(e)
        # the model goes on with a copy: an in-place operation later in the
        # forward pass (x *= sqrt(d), ReLU(inplace=True)) would otherwise
        # change the variable itself, and the Jacobian would be taken against
        # the changed value (off by the factor, or the ReLU mask dropped)
        return e.clone()

    _, out = _run_at(model, x, output, wrt, replace)
    return held[0], out


def _probes_at(
    model: nn.Module,
    x: Tensor,
    output: Output,
    wrt: str,
    method: str,
    distribution: str,
    num_probes: int,
    eps: float | None,
    generator: torch.Generator,
    coupled: bool = False,
    replay: bool = False,
    keep_graph: bool = True,
) -> Tensor:
    """``"jvp"`` or ``"finite_difference"`` with probes ``u`` at ``wrt``'s output.

    Each probe is drawn with the shape of the submodule's output ``e`` once it
    has run, and enters as ``e``'s tangent (a dual tensor) or as the step
    ``e + εu``; everything before ``e`` runs unperturbed. The model goes on
    with a copy of ``e`` (see :func:`_select_wrt`): an in-place operation
    after the submodule would otherwise write into ``e``, and through a
    submodule that returns its input (``Identity``, ``Flatten``) into ``x``.

    Args:
        model: the model.
        x: its input ``(B, ...)``.
        output: what is differentiated (see :func:`jacobian_sq_norms`).
        wrt: the submodule whose output is perturbed.
        method: ``"jvp"`` or ``"finite_difference"``.
        distribution: probe distribution.
        num_probes: probes per sample.
        eps: finite-difference step; ``None`` for ``sqrt(machine eps)``
            times the RMS of ``e``.
        generator: probe randomness.
        coupled: samples interact (train-mode BatchNorm after ``wrt``): two
            passes per probe, the second with each sample's probe
            sign-flipped, as in :func:`_forward_mode`.
        replay: every pass draws the random numbers the first drew (one
            dropout mask; train mode); implied by ``coupled``.
        keep_graph: keep each jvp pass's autograd graph of the weights (a
            penalty); ``False`` lets it go after the pass (measuring).

    Returns:
        Per-sample values ``(B,)``, the mean over probes.
    """
    B = x.shape[0]
    replay = replay or coupled
    if coupled:
        generator = _apart_from_global(generator)
    signs = _signs(num_probes, x, generator) if coupled else None
    values: Tensor | None = None
    if method == "jvp":
        # with grad on, as the caller runs it: under no_grad a transformer
        # layer takes its fused fast path, which has no forward-mode derivative
        def pushed(tangent: Callable[[Tensor], Tensor]) -> Tensor:
            with _dual_level():
                dual = lambda e: fwAD.make_dual(e.clone(), tangent(e))  # noqa: E731
                _, out = _run_at(model, x, output, wrt, dual)
                _, t = fwAD.unpack_dual(out)
            if t is None:
                return out.new_zeros(B, 1)
            # the pass ran with grad on: its graph of the weights, kept by t,
            # goes with the pass unless a penalty differentiates it
            return t.reshape(B, -1) if keep_graph else t.detach().reshape(B, -1)

        for i in range(num_probes):
            drawn: list[Tensor] = []

            def probe(e: Tensor, drawn: list[Tensor] = drawn) -> Tensor:
                # drawn once e's shape is known
                drawn.append(input_probes(distribution, e, 1, generator)[0])
                return drawn[0]

            if signs is None:
                with _replayed(x, replay, final=i == num_probes - 1):
                    a = pushed(probe)
                sq = _sq_sum(a)
            else:
                with _replayed(x, replay):
                    a = pushed(probe)
                v = drawn[0] * _per_sample(signs[i], drawn[0])
                with _replayed(x, replay, final=i == num_probes - 1):
                    b = pushed(lambda e, v=v: v)
                sq = _wide(signs[i]) * _dot_sum(a, b)
            values = sq if values is None else values + sq
        return _narrow(values / num_probes, a.dtype)  # type: ignore[operator]
    with torch.no_grad():
        with _replayed(x, replay):
            e, base = _run_at(model, x, output, wrt, lambda e: e.clone())
        step = _fd_step(e, eps, base)  # the input's rule, on e
        energy = None  # Σ‖Δ‖², for the rounding check
        for i in range(num_probes):
            u = input_probes(distribution, e, 1, generator)[0]
            last = signs is None and i == num_probes - 1
            with _replayed(x, replay, final=last):
                _, out = _run_at(model, x, output, wrt, lambda e, u=u: e + step * u)
            a = (out - base).reshape(B, -1)
            sq = _sq_sum(a)
            energy = sq.sum() + (0 if energy is None else energy)
            if signs is not None:
                v = u * _per_sample(signs[i], u)
                with _replayed(x, replay, final=i == num_probes - 1):
                    _, out = _run_at(model, x, output, wrt, lambda e, v=v: e + step * v)
                sq = _wide(signs[i]) * _dot_sum(a, (out - base).reshape(B, -1))
            values = sq if values is None else values + sq

        def far() -> Tensor:
            big = max(step, _rms(e))
            with _replayed(x, True):
                return _run_at(model, x, output, wrt, lambda e: e + big * u)[1]

        _check_resolved(energy, base, _unit_roundoff(e, base), num_probes, far)
    return _narrow(values / (num_probes * step**2), a.dtype)  # type: ignore[operator]


def _check_scalar_batch(model: nn.Module, x: Tensor, output: Output) -> None:
    """A 1-D ``x`` is a batch of scalars: check the model treats it as one.

    A model that also takes unbatched input (``nn.Linear``) maps one sample of
    size d to an output of size k; when d == k that passes every shape check
    and the result would be a wrong number. A forward pass on the first two
    scalars (one when B = 2) tells the two apart: an unbatched model fails on
    it. It runs without a graph, with the RNG and buffers put back, so it
    leaves no trace.

    Raises:
        ValueError: the model fails on the first scalars of ``x``.
    """
    m = 2 if x.shape[0] > 2 else 1
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=devices),
            kept_buffers(model),
        ):
            _select(model, x[:m], output)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"x has shape {tuple(x.shape)}, which is read as a batch of "
            f"{x.shape[0]} scalar inputs, but the model fails on x[:{m}] ({err}); "
            "if x is one sample, add its batch dimension (x[None])"
        ) from err


def _vjp_sq_norms(
    x: Tensor,
    out: Tensor,
    cotangents: Callable[[int, int], Tensor],
    n: int,
    chunk_size: int,
    create_graph: bool,
    strict: bool = False,
) -> Tensor:
    """Σ over n directions of ‖∂⟨out, c⟩/∂x‖² per sample, by the batch-sum trick.

    ``cotangents(start, stop)`` returns directions ``start..stop-1`` as a tensor
    of shape (stop - start, B, k). Valid only when samples are independent.
    """
    B = x.shape[0]
    if not out.requires_grad:  # the output does not depend on x at all
        return _unused(x, strict)
    if n == 1:  # one direction (one probe): no accumulator, fewest small ops
        (g,) = torch.autograd.grad(
            out,
            x,
            cotangents(0, 1)[0],
            retain_graph=create_graph,
            create_graph=create_graph,
            allow_unused=True,
        )
        if g is None:
            return _unused(x, strict)
        # each skipped view counts on a small model (see the README's
        # performance notes): inside a training step a call costs 5-40 µs
        return _narrow(_sq_sum(g if g.dim() == 2 else g.reshape(B, -1)), x.dtype)
    total = _accumulator(x, B)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        c = cotangents(start, stop)
        last = stop == n
        if stop - start == 1:
            (g,) = torch.autograd.grad(
                out,
                x,
                c[0],
                retain_graph=create_graph or not last,
                create_graph=create_graph,
                allow_unused=True,
            )
            if g is None:
                return _unused(x, strict)
            total = total + _sq_sum(g.reshape(B, -1))
        else:
            with _batched_anomaly():
                (g,) = torch.autograd.grad(
                    out,
                    x,
                    c,
                    retain_graph=create_graph or not last,
                    create_graph=create_graph,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            if g is None:
                return _unused(x, strict)
            total = total + _sq_sum(g.reshape(stop - start, B, -1), (0, 2))
    return _narrow(total, x.dtype)


def _batched_anomaly() -> contextlib.AbstractContextManager[Any]:
    """Anomaly mode without its NaN check, for a batched backward pass.

    Under ``torch.autograd.set_detect_anomaly(True)`` the engine checks each
    node's gradient for NaN with ``.item()``, which has no batching rule, so
    every batched VJP (``is_grads_batched``) failed ("Batching rule not
    implemented for aten::item"). The passes keep anomaly mode (its forward
    tracebacks) without that check; a NaN in the result is refused as a
    non-finite Jacobian all the same.
    """
    if torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled():
        return torch.autograd.set_detect_anomaly(True, check_nan=False)
    return contextlib.nullcontext()


def _sq_sum(t: Tensor, dim: int | tuple[int, ...] = 1) -> Tensor:
    """Σ t² over ``dim``, in float32 at least.

    A float16 square overflows beyond 256 (inf, though the Jacobian is
    finite), is subnormal below 2⁻⁷, a multiple of 2⁻²⁴ (3·10⁻⁴ squared
    comes out a third too large), and 0 below 1.7·10⁻⁴; a float16 sum
    overflows beyond 65504. So half-precision terms are squared and summed in
    float32 (bfloat16 keeps float32's range, but rounds each square to 8
    bits).
    """
    t = _wide(t)
    return (t * t).sum(dim)


def _dot_sum(a: Tensor, b: Tensor, dim: int = 1) -> Tensor:
    """Σ a·b over ``dim``, in float32 at least (see :func:`_sq_sum`)."""
    return (_wide(a) * _wide(b)).sum(dim)


#: Set by :func:`wide_results`: keep half-precision results in float32.
_KEEP_WIDE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "geocomplexity_keep_wide", default=False
)


@contextlib.contextmanager
def wide_results() -> Any:
    """Within it, half-precision norms come back in float32, not cast back.

    The norms are summed in float32 (:func:`_accumulator`); the public
    functions cast them to the input's dtype, where a float16 value beyond
    65504 is inf and one below 6·10⁻⁵ keeps only a few bits. ``measure`` and
    the torchmetrics metric average them in float64 and take them as summed.
    """
    token = _KEEP_WIDE.set(True)
    try:
        yield
    finally:
        _KEEP_WIDE.reset(token)


def _accumulator(like: Tensor, n: int) -> Tensor:
    """Zeros ``(n,)`` to sum per-sample terms over probes or directions in.

    In ``like``'s dtype, or float32 where that is narrower: a float16 or
    bfloat16 running sum stops growing once its spacing exceeds the terms
    added (2,000 bfloat16 jvp probes summed to less than half their total).
    :func:`_narrow` casts the result back.
    """
    return _wide(like.new_zeros(n))


def _narrow(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; no dispatch where it already is.

    Within :func:`wide_results`, ``t`` as it is.
    """
    return t if t.dtype == dtype or _KEEP_WIDE.get() else t.to(dtype)


def _unused(x: Tensor, strict: bool) -> Tensor:
    """Zeros for an output that does not depend on ``x``, or an error if strict.

    Raises:
        ValueError: ``strict``: a caller's ``out`` was expected to depend on x.
    """
    if strict:
        raise ValueError(
            "the outputs do not depend on the inputs as autograd sees them (it "
            "has no path from one to the other). Where the outputs were handed "
            "over: make the inputs require grad before the forward pass "
            "(x.requires_grad_() before model(x)), or leave outputs= out so the "
            "term runs its own. Where the model itself cuts the path (a forward "
            "pass under torch.no_grad(), a detach, an integer cast), the penalty "
            "cannot see GC through the cut and would be 0: take the cut out"
        )
    return x.new_zeros(x.shape[0])


def _diag_vjp_sq_norms(
    x: Tensor,
    out: Tensor,
    cotangents: Callable[[int, int], Tensor],
    n: int,
    chunk_size: int,
    create_graph: bool,
    strict: bool = False,
) -> Tensor:
    """Like :func:`_vjp_sq_norms`, but per sample: ∂⟨out_i, c_i⟩/∂x_i only.

    Correct when samples are coupled (train-mode BatchNorm): one VJP per sample
    and direction, ``chunk_size`` of them batched per backward pass.
    """
    B, k = out.shape
    if not out.requires_grad:
        return _unused(x, strict)
    total = _accumulator(x, B)
    # one direction at a time, as the blocks reach it: all n at once held
    # n × B × k (exact's k one-hot directions: k² × B, 157 MB for k = 784,
    # B = 64 in float32; 4.3 GB for k = 4096)
    held: list[Any] = [-1, None]  # the direction held, and it (B, k)

    def direction(p: int) -> Tensor:
        if held[0] != p:
            held[0], held[1] = p, cotangents(p, p + 1)[0]
        return held[1]

    jobs = [(p, i) for p in range(n) for i in range(B)]
    for start in range(0, len(jobs), chunk_size):
        block = jobs[start : start + chunk_size]
        last = start + chunk_size >= len(jobs)
        g_out = out.new_zeros(len(block), B, k)
        idx = torch.tensor([i for _, i in block], device=out.device)
        g_out[torch.arange(len(block)), idx] = torch.stack(
            [direction(p)[i] for p, i in block]
        )
        with _batched_anomaly():
            (g,) = torch.autograd.grad(
                out,
                x,
                g_out if len(block) > 1 else g_out[0],
                retain_graph=create_graph or not last,
                create_graph=create_graph,
                allow_unused=True,
                is_grads_batched=len(block) > 1,
            )
        if g is None:
            return _unused(x, strict)
        g = g.reshape(len(block), B, -1)
        # added now: kept to the end, these small tensors between the blocks'
        # large ones fragmented the CPU heap (k = 784 outputs, B = 64: 4.8 GB)
        val = _sq_sum(g[torch.arange(len(block)), idx])
        total = total.index_add(0, idx, val.to(total.dtype))
    return _narrow(total, x.dtype)


def _signs(n: int, like: Tensor, generator: torch.Generator) -> Tensor:
    """``(n, B)`` independent random signs, one per probe and sample."""
    return draw_probes(
        "rademacher",
        (n, like.shape[0]),
        dtype=like.dtype if like.is_floating_point() else torch.get_default_dtype(),
        device=like.device,
        generator=generator,
    )


def _decoupled_vjp_sq_norms(
    x: Tensor,
    out: Tensor,
    probes: Callable[[int, int], Tensor],
    signs: Tensor,
    chunk_size: int,
    create_graph: bool,
    strict: bool = False,
) -> Tensor:
    r"""Unbiased per-sample diagonal-block norms on a coupled batch: 2 VJPs a probe.

    With the batch Jacobian's blocks :math:`J_{ji}=\partial\,out_j/\partial x_i`,
    one VJP of the probes :math:`U` (independent across samples, zero mean,
    :math:`\mathbb{E}[U_iU_i^\top]=I`) gives :math:`w_i=\sum_j J_{ji}^\top U_j`,
    and a second one of the same probes with each sample's sign flipped at
    random, :math:`t\circ U`, gives :math:`w'_i=\sum_l t_l J_{li}^\top U_l`. Then

    .. math::
        \mathbb{E}_t\bigl[t_i\langle w_i, w'_i\rangle\bigr]
        =\sum_j \langle J_{ji}^\top U_j, J_{ii}^\top U_i\rangle,\qquad
        \mathbb{E}_U[\cdot]=\|J_{ii}\|_F^2,

    because :math:`\mathbb{E}[t_it_l]=\delta_{il}` and probes of different
    samples are independent. The cross-sample blocks the batch-sum trick
    would add cancel in expectation, at the cost of two VJPs per probe instead
    of one per probe and sample (:func:`_diag_vjp_sq_norms`). Where samples
    are in fact independent, :math:`w'_i=t_iw_i` and the estimate is the
    uncoupled one, :math:`\|w_i\|^2`, exactly.

    Args:
        x: inputs ``(B, ...)`` requiring grad.
        out: ``(B, k)``.
        probes: ``probes(start, stop)`` gives probes ``start..stop-1``,
            ``(stop - start, B, k)``, asked for once each, in order.
        signs: ``(n, B)`` of ±1, independent of ``probes``.
        chunk_size: VJPs per backward pass; pairs stay together (1 loops).
        create_graph: keep the result differentiable.
        strict: raise when ``out`` does not depend on ``x``.

    Returns:
        Per-sample estimates ``(B,)``, averaged over the ``n`` probes. Where
        samples are coupled one estimate can be negative (the cross terms have
        either sign); its expectation is the norm, which is not.
    """
    n, B = signs.shape
    if not out.requires_grad:
        return _unused(x, strict)
    pairs = max(1, chunk_size // 2)
    total = _accumulator(x, B)
    for start in range(0, n, pairs):
        stop = min(start + pairs, n)
        last = stop == n
        keep = create_graph or not last
        u = probes(start, stop)  # (stop - start, B, k)
        flipped = u * signs[start:stop, :, None]
        if chunk_size == 1:  # looped: two plain VJPs
            g = []
            for i, c in enumerate((u[0], flipped[0])):
                (gi,) = torch.autograd.grad(
                    out,
                    x,
                    c,
                    retain_graph=keep or i == 0,
                    create_graph=create_graph,
                    allow_unused=True,
                )
                if gi is None:
                    return _unused(x, strict)
                g.append(gi.reshape(B, -1))
            total = total + _wide(signs[start]) * _dot_sum(g[0], g[1])
            continue
        c = torch.stack((u, flipped), 1)
        with _batched_anomaly():
            (g,) = torch.autograd.grad(
                out,
                x,
                c.reshape(-1, *c.shape[2:]),  # (2m, B, k): pairs side by side
                retain_graph=keep,
                create_graph=create_graph,
                allow_unused=True,
                is_grads_batched=True,
            )
        if g is None:
            return _unused(x, strict)
        g = g.reshape(stop - start, 2, B, -1)
        products = _dot_sum(g[:, 0], g[:, 1], -1)  # (m, B)
        total = total + (_wide(signs[start:stop]) * products).sum(0)
    return _narrow(total / n, x.dtype)


def _onehot(B: int, k: int, like: Tensor) -> Callable[[int, int], Tensor]:
    def make(start: int, stop: int) -> Tensor:
        e = like.new_zeros(stop - start, B, k)
        # e[i, :, start + i] = 1: one fill of a strided view, where advanced
        # indexing would build two index tensors per call (k calls when looping)
        e.diagonal(offset=start, dim1=0, dim2=2).fill_(1)
        return e

    return make


# batched VJPs hold chunk copies of every activation: at most this many
# directions, and at most this many elements in chunk · B · max(d, k)
_MAX_CHUNK = 32
_CHUNK_ELEMENTS = 1 << 26


def _default_chunk(
    model: nn.Module,
    n: int,
    x: Tensor | None = None,
    k: int = 1,
    *,
    backward: bool = True,
) -> int:
    """How many VJPs to batch per backward pass when the caller does not say.

    Measured (benchmarks/): on the CPU, batching the k VJPs helps dense layers
    (larger matrix products), while convolutions' batching rules are slower
    than a loop. On a CUDA device, where small kernels cost their launches,
    batching won on every model, convolutions included (an H200: 2.2× faster
    than a loop on the CNN, 1.7× on ResNet-18 k=8). Memory grows with the chunk
    (each direction holds a copy of every activation), and beyond a few dozen
    directions batching gains nothing, so the chunk is capped at 32 directions
    and, given the input ``x`` and the output size ``k``, at 2²⁶ elements of
    chunk · B · max(d, k); a batched pass that runs out of GPU memory starts
    over with half the chunk (:func:`_shrinking_chunk`).

    With ``backward=False``, JVPs per batched forward-mode pass: there a
    convolution's batching rule is a convolution of a larger batch, and
    batching won on the CPU too (2.1× faster than a loop, 32 directions, on
    a three-layer CNN of 12×12 inputs and 1,152 outputs).
    """
    on_cpu = x is None or x.device.type != "cuda"
    convolutions = backward and on_cpu
    if n == 1 or (
        convolutions
        and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    ):
        return 1
    chunk = min(n, _MAX_CHUNK)
    return chunk if x is None else min(chunk, _chunk_bound(x, k))


def _chunk_bound(x: Tensor, k: int) -> int:
    """The most directions a pass may hold: 2²⁶ elements of chunk · B · max(d, k)."""
    width = max(math.prod(x.shape[1:]), k, 1)
    return max(1, _CHUNK_ELEMENTS // (x.shape[0] * width))


def _shrinking_chunk(
    run: Callable[[int], Tensor],
    chunk: int,
    *,
    fixed: bool,
    restart: Callable[[], None],
) -> Tensor:
    """``run(chunk)``, starting over with fewer VJPs per pass where it must.

    - Out of GPU memory: half the chunk. The default chunk bounds memory by
      the input's size, which says little of a convolutional network's
      activations; a GPU that cannot hold ``chunk`` copies of them raises
      ``OutOfMemoryError``, and fewer directions per pass need less.
    - A random operation in the backward pass (dropout, which activation
      checkpointing recomputes there) has no batching rule: one VJP at a time.

    A chunk the caller chose (``fixed``) is kept: its out-of-memory error is
    raised, and a batched pass that draws random numbers is refused, naming
    the fix.

    Args:
        run: computes the norms with the given chunk.
        chunk: the first chunk to try.
        fixed: the caller chose ``chunk``: never shrink it.
        restart: called before each new try (to draw the same probes, and
            the same dropout masks, again).

    Returns:
        What ``run`` returned.

    Raises:
        ValueError: a ``fixed`` chunk above 1 through a backward pass that
            draws random numbers.
    """
    while True:
        try:
            return run(chunk)
        except torch.cuda.OutOfMemoryError:
            if fixed or chunk == 1:
                raise
            smaller = max(1, chunk // 2)
        except RuntimeError as err:
            if chunk == 1 or "random operations inside of vmap" not in str(err):
                raise
            if fixed:
                raise ValueError(
                    f"chunk_size={chunk} batches the VJPs, but the backward "
                    "pass draws random numbers (dropout inside activation "
                    "checkpointing, recomputed there), which batched VJPs "
                    "cannot; pass chunk_size=1 (or leave it unset), or measure "
                    "in eval mode"
                ) from err
            smaller = 1
        # outside the handler: the error's traceback no longer holds the failed
        # pass's tensors, so the cache can give their memory back
        chunk = smaller
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        restart()


def _vjp_count(
    method: str, out_shape: torch.Size, num_probes: int, coupled: bool
) -> int:
    """How many VJPs :func:`reverse_sq_norms` takes on an output ``(B, k)``.

    Exact: k, or k per sample where samples are coupled; projection: one per
    probe, or two where coupled (see :func:`_decoupled_vjp_sq_norms`).
    """
    B, k = out_shape
    if method == "exact":
        return k * B if coupled else k
    return num_probes * (2 if coupled else 1)


def _forward_mode(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tangents: Callable[[int], Tensor],
    n: int,
    signs: Tensor | None = None,
    replay: bool = False,
    keep_graph: bool = True,
    chunk: int = 1,
    sized: bool = True,
    fixed: bool = False,
) -> Tensor:
    """Σ over n input directions of ‖J u‖² per sample, one dual forward each.

    With ``signs`` ``(n, B)`` (coupled samples): two dual passes per direction,
    ``t_i⟨(Ju)_i, (J(t∘u))_i⟩``, which is unbiased for the diagonal block (the
    input-side twin of :func:`_decoupled_vjp_sq_norms`). With ``signs`` or
    ``replay`` (train mode) the passes draw the same random numbers (one
    dropout mask). Where grad is on, each pass records a graph of the
    weights: ``keep_graph=False`` lets it go after the pass (measuring),
    rather than holding every pass's graph in the sum until the end.
    ``chunk`` > 1 batches that many directions per pass where the passes are
    independent (:func:`_batched_forward_mode`; not with ``signs`` or
    ``replay``, whose passes replay the RNG). ``sized=False``: ``chunk`` was
    not bounded by the output's size, which the first pass learns; ``fixed``:
    the caller chose ``chunk`` (kept on running out of GPU memory).
    """
    B = x.shape[0]
    total = _accumulator(x, B)
    if 0 in x.stride():
        # an expanded input (x[:1].expand(B, d), a broadcast): make_dual
        # refuses a primal whose elements share memory
        x = x.contiguous()

    def pushed(u: Tensor) -> Tensor | None:
        with _dual_level():
            _, t = fwAD.unpack_dual(fn(fwAD.make_dual(x, u)))
        if t is None:
            return None
        return t.reshape(B, -1) if keep_graph else t.detach().reshape(B, -1)

    replay = replay or signs is not None
    if chunk > 1 and not replay:
        batched, drawn = _batched_forward_mode(
            fn, x, tangents, n, chunk, keep_graph, sized, fixed
        )
        if batched is not None:
            return _narrow(batched, x.dtype)
        # the directions the failed batched pass drew, taken again: a probe
        # drawn from a generator is not drawn twice (the loop's probes are
        # the batched ones)
        tangents = _replaying(drawn, tangents)
    for i in range(n):
        u = tangents(i)
        if signs is None:
            with _replayed(x, replay, final=i == n - 1):
                t = pushed(u)
            if t is not None:
                total = total + _sq_sum(t)
            continue
        with _replayed(x, True):
            a = pushed(u)
        with _replayed(x, True, final=i == n - 1):
            b = pushed(u * _per_sample(signs[i], u))
        if a is not None and b is not None:
            total = total + _wide(signs[i]) * _dot_sum(a, b)
    return _narrow(total, x.dtype)


def _replaying(
    drawn: list[Tensor], tangents: Callable[[int], Tensor]
) -> Callable[[int], Tensor]:
    """``tangents``, its first ``len(drawn)`` directions taken from ``drawn``."""

    def again(i: int) -> Tensor:
        return drawn[i] if i < len(drawn) else tangents(i)

    return again


def _batched_forward_mode(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tangents: Callable[[int], Tensor],
    n: int,
    chunk: int,
    keep_graph: bool,
    sized: bool = True,
    fixed: bool = False,
) -> tuple[Tensor | None, list[Tensor]]:
    """Σ over n directions of ‖J u‖² per sample, ``chunk`` directions a pass.

    ``vmap`` over ``torch.func.jvp``: the primal runs once per pass and only the
    tangents carry the extra dimension, so c directions cost one forward plus c
    tangent propagations, where c dual passes each rerun the primal (2.9×
    slower on a 784-512-512-1000 MLP, d = 784 < k, on the CPU).
    ``(None, drawn)`` where the model cannot be batched so (an op with no
    batching rule that fails, data-dependent control flow, ``.item()``):
    the caller then takes one dual pass a direction, starting with the
    directions ``drawn`` here. Where samples are coupled or a pass draws
    random numbers the caller loops instead: the passes replay the RNG.

    ``sized=False``: ``chunk`` was bounded by the input's size alone (jvp
    probes, no forward pass before them); each direction's tangents hold
    chunk copies of the activations and of the output, so the first pass
    carries one direction, and the others as many as the bound of
    :func:`_default_chunk` allows given the output size it found. A pass
    that runs out of GPU memory is taken again with half the directions
    (the same ones), unless the caller chose ``chunk`` (``fixed``).

    Returns:
        ``(Σ, [])``, the sum of shape ``(B,)``; or ``(None, drawn)``.
    """
    B = x.shape[0]
    if 0 in x.stride():  # as in _forward_mode: no primal that shares memory
        x = x.contiguous()
    widths: list[int] = []

    def sq(u: Tensor) -> Tensor:  # (B, ...) → (B,)
        t = torch.func.jvp(fn, (x,), (u,))[1]
        if not widths:  # one direction's shape here: (B, *out_shape)
            widths.append(math.prod(t.shape[1:]))
        return _sq_sum(t if keep_graph else t.detach(), tuple(range(1, t.dim())))

    sq_many = torch.func.vmap(sq)
    total = _accumulator(x, B)
    step = chunk if sized else 1
    pending: list[Tensor] = []  # drawn, not yet pushed through
    taken = pushed = 0
    with _FORWARD_AD:  # torch.func.jvp opens the process's one dual level
        while pushed < n:
            while len(pending) < step and taken < n:
                pending.append(tangents(taken))
                taken += 1
            block = pending[:step]
            try:
                values = sq_many(torch.stack(block))
            except torch.cuda.OutOfMemoryError:
                if fixed or step == 1:
                    raise
                smaller = max(1, step // 2)
            except (NotImplementedError, RuntimeError):
                if pushed > 0:  # it ran: an error of this input, not of vmap
                    raise
                return None, pending
            else:
                del pending[: len(block)]
                pushed += len(block)
                total = total + values.sum(0)
                if not sized and widths:
                    step = min(chunk, _chunk_bound(x, widths[0]))
                continue
            # outside the handler, as in _shrinking_chunk: the failed pass's
            # tensors are let go before the cache gives memory back
            del block
            step = smaller
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
    return total, []


def _input_side(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    method: str,
    distribution: str,
    num_probes: int,
    eps: float | None,
    generator: torch.Generator,
    coupled: bool,
    replay: bool = False,
    keep_graph: bool = True,
    chunk: int = 1,
    sized: bool = True,
) -> Tensor:
    """``"jvp"`` or ``"finite_difference"`` with probes at the input, per sample.

    Coupled samples take two passes per probe, the second with each sample's
    probe sign-flipped (:func:`_forward_mode`, :func:`_finite_difference`).
    With ``replay`` (train mode) or ``coupled`` every pass draws the random
    numbers the first drew: one dropout mask. ``keep_graph=False`` lets each
    jvp pass's graph of the weights go after the pass (measuring). ``chunk``:
    jvp probes per batched pass (:func:`_batched_forward_mode`; ``sized=False``:
    not yet bounded by the output's size).

    Returns:
        The mean over ``num_probes`` probes, shape ``(B,)``.
    """
    signs, probes = None, generator
    if coupled:  # the passes replay the global RNG: draw apart from it
        generator = _apart_from_global(generator)
        # the signs come after the probes, as they were drawn uncoupled (the
        # same probes: on independent samples the two give the same values);
        # a copy of the generator draws them again, pass by pass
        probes = _skipped_past(
            generator, num_probes, lambda g: input_probes(distribution, x, 1, g)
        )
        signs = _signs(num_probes, x, generator)

    def draw(_i: int) -> Tensor:
        # one probe a pass, drawn as the pass takes it: all at once they
        # would hold num_probes × B × d at the same time
        return input_probes(distribution, x, 1, probes)[0]

    if method == "jvp":
        values = _forward_mode(
            fn,
            x,
            draw,
            num_probes,
            signs,
            replay,
            keep_graph,
            chunk,
            sized,
            fixed=sized,  # sized: the caller's chunk_size
        )
        return values / num_probes
    return _finite_difference(fn, x, draw, num_probes, eps, signs, replay)


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """``t`` ``(B,)`` viewed and cast to broadcast against ``like`` ``(B, ...)``."""
    return t.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)


#: layers that run along a sequence dimension of their input
_SEQUENCE_LAYERS = (nn.RNNBase, nn.MultiheadAttention)


def sequence_along_batch(
    model: nn.Module, modules: list[nn.Module], B: int
) -> contextlib.AbstractContextManager[Any]:
    """A block whose forward passes refuse a sequence layer run along the batch.

    A recurrent layer or ``nn.MultiheadAttention`` built with
    ``batch_first=False``, PyTorch's default, reads its input as ``(T, N, ...)``.
    Given batch-first inputs ``(B, T, ...)`` as they are, or given ``x``
    sequence-first, ``(T, B, ...)``, it runs its sequence along dim 0 of
    ``x``, the samples the measurement takes apart: they interact, and the
    batch-sum trick returned one wrong number per time step, silently. A
    forward pre-hook on each such layer refuses an input whose sequence
    dimension has the batch's size ``B`` where its batch dimension is no
    multiple of it (or, unbatched, 2-D, whose sequence has it). Where the
    batch dimension is ``B`` or ``B·k`` (a model that runs the layer over
    windows or rows of each sample) it cannot tell, and lets the input
    through.

    The caller leaves it out for ``coupled=True``: the samples do interact,
    and each one's diagonal block is asked for.

    Args:
        model: the model, for the layer's name in the message.
        modules: its modules, as :func:`preserved` yields them.
        B: the batch size.

    Returns:
        A context manager; a null one where there is no such layer or B = 1.
    """
    layers = [m for m in modules if isinstance(m, _SEQUENCE_LAYERS)] if B > 1 else []
    if not layers:
        return contextlib.nullcontext()

    def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inp = args[0] if args else kwargs.get("input", kwargs.get("query"))
        if not isinstance(inp, Tensor) or inp.dim() not in (2, 3) or inp.is_nested:
            return  # a PackedSequence, or a shape the layer refuses itself
        first = bool(getattr(module, "batch_first", False))
        if inp.dim() == 2:  # unbatched: one sequence
            seq, along = 0, inp.shape[0] == B
        else:
            seq, batch = (1, 0) if first else (0, 1)
            # a batch of B·k rows holds the samples (windows, rows of an
            # image, B·H sequences of length W): a length of B there is chance
            along = inp.shape[seq] == B and inp.shape[batch] % B != 0
        if not along:
            return
        name = next((n for n, m in model.named_modules() if m is module), "?")
        raise ValueError(
            f"{type(module).__name__} {name!r} (batch_first={first}) runs along "
            f"dim {seq} of its input of shape {tuple(inp.shape)}, which has the "
            f"batch's size {B}: it runs along the samples of the batch and mixes "
            "them, so each sample's GC would be wrong. x must be batch-first, "
            "(B, *in_shape): give a sequence-first x as x.transpose(0, 1) and "
            "transpose it back inside the model"
            + ("" if first else ", or build the layer with batch_first=True")
            + ". If the model does mix the samples (attention "
            "across the batch), pass coupled=True to measure each sample's "
            "diagonal block"
        )

    return _hooked(layers, check)


@contextlib.contextmanager
def _hooked(layers: list[nn.Module], check: Callable[..., None]) -> Any:
    """A block with ``check`` as a forward pre-hook (with kwargs) on ``layers``."""
    check = in_this_thread(check)
    handles = [m.register_forward_pre_hook(check, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_coupled(asked: Any) -> None:
    """Refuse a ``coupled=`` that is not ``None``, ``True`` or ``False``.

    Raises:
        TypeError: anything else (``bool("no")`` is True, and ``0`` would pass
            :func:`_coupled`'s BatchNorm check).
    """
    if asked is not None and not isinstance(asked, bool):
        raise TypeError(f"coupled must be None, True or False, got {asked!r}")


def _coupled(asked: bool | None, batch_norm: bool, train: bool = False) -> bool:
    """The ``coupled=`` option against what the model's layers say.

    Args:
        asked: the option; ``None`` decides from the other two.
        batch_norm: a BatchNorm normalises by the batch, a known coupling.
        train: train mode, taken as coupled when not told otherwise (a layer
            of any type may use batch statistics there); ``coupled=False``
            overrides it, for a model whose only train-mode layer is dropout.

    Raises:
        TypeError: ``asked`` is not ``None``, ``True`` or ``False``.
        ValueError: ``asked`` is ``False`` where BatchNorm couples the samples.
    """
    if asked is None:
        return batch_norm or train
    _check_coupled(asked)
    if asked is False and batch_norm:
        raise ValueError(
            "coupled=False, but a BatchNorm normalises by the batch (train mode, "
            "or no running statistics), which couples the samples; leave "
            "coupled unset, or measure in eval mode with running statistics"
        )
    return bool(asked)


def train_mode_rng(
    model: nn.Module, mode: str, method: str, generator: torch.Generator | None
) -> tuple[contextlib.AbstractContextManager[Any], torch.Generator | None]:
    """The RNG set-up of several train-mode calls that should draw apart.

    For the batches of ``measure`` and the updates of the torchmetrics metric:
    each call puts the global RNG back, so successive calls would draw the
    same dropout masks. In train mode the block is
    :func:`~geocomplexity.state.rng_carried_on` (it yields ``advance``, to
    call between two calls), and probes from the global generator take their
    one kept draw (:func:`_apart_from_global`) now, before the block puts the
    RNG back; in eval mode a null block that yields ``None``, and
    ``generator`` as given.

    Args:
        model: the model measured.
        mode: ``"eval"`` or ``"train"``.
        method: the measuring method (``"exact"`` draws no probes).
        generator: the probes' generator, or ``None``.

    Returns:
        The block, and the generator the calls take.
    """
    if mode != "train":
        return contextlib.nullcontext(None), generator
    if generator is not None and method != "exact":
        generator = _apart_from_global(generator)
    return rng_carried_on(model), generator


def _is_global(generator: torch.Generator | None) -> bool:
    """Whether ``generator`` is the global RNG of its device (CPU or CUDA)."""
    if generator is None:
        return False
    device = generator.device
    default = (
        torch.default_generator
        if device.type == "cpu"
        else torch.cuda.default_generators[device.index or 0]
        if device.type == "cuda" and torch.cuda.is_initialized()
        else None
    )
    return generator is default


def _apart_from_global(generator: torch.Generator) -> torch.Generator:
    """``generator``, or a private one seeded from it where it is the global RNG.

    The passes of a coupled jvp or finite difference replay the global RNG
    (:func:`_replayed`), and a train-mode call restores it afterwards
    (:func:`preserved`): probes drawn from the global generator there would be
    rolled back with it, so that the next pass, or the next call, drew the
    same ones again (and the pilot of ``measure(method="auto")`` saw no probe
    variance). One draw from the global generator, taken before any pass and
    kept, seeds a private generator instead: successive calls draw fresh
    probes, reproducibly from ``torch.manual_seed``, and the probes come from
    a stream apart from the one the passes' dropout masks replay.
    """
    if not _is_global(generator):
        return generator
    device = generator.device
    # the draw moves the global RNG: not between the replayed passes of a
    # train-mode measurement in another thread (see state._GLOBAL_RNG)
    with _GLOBAL_RNG:
        seed = torch.empty((), dtype=torch.int64, device=device).random_(
            generator=generator
        )
    return torch.Generator(device=device).manual_seed(int(seed.item()))


def _replayed(
    x: Tensor, replay: bool, final: bool = False
) -> contextlib.AbstractContextManager[Any]:
    """A block after which the global RNG (x's device's too) is as before it.

    The forward passes of a jvp or finite difference in train mode (coupled
    or not) or on coupled samples must share one dropout mask, as the single
    forward pass of the reverse-mode methods does: each runs in such a block,
    so each draws the random numbers the first drew. The ``final`` pass runs
    as it is, so the RNG moves on by one pass, as after any forward pass.
    Without ``replay`` (eval mode) the passes run as they are.
    """
    if not replay or final:
        return contextlib.nullcontext()
    if x.device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    # the CPU's RNG and that of x's accelerator (CUDA, MPS, XPU, ...)
    return torch.random.fork_rng(
        devices=[x.device.index or 0], device_type=x.device.type
    )


def as_int(value: Any) -> Any:
    """An integer of any type (``np.int64`` from a NumPy sweep) as an ``int``.

    Anything else (a bool, ``2.0``, ``None``) comes back as given, for the
    checks to take or refuse as they did.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return operator.index(value)
    return value


def check_options(
    *,
    method: str = "exact",
    mode: str = "eval",
    num_probes: int = 1,
    distribution: str = "rademacher",
    chunk_size: int | None = None,
    eps: float | None = None,
    generator: torch.Generator | None = None,
    create_graph: bool = False,
    wrt: str | None = None,
    output: Output = None,
    coupled: bool | None = None,
) -> None:
    """The checks of :func:`jacobian_sq_norms`' options that need no model or input.

    For code that takes these options now and measures later (the torchmetrics
    metric, the Lightning callback): a bad value fails where it is given.

    Raises:
        ValueError: an unknown method, mode or distribution; a count or step
            that is not positive.
        TypeError: a generator, ``wrt``, ``output`` or ``coupled`` of the
            wrong type.
    """
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(map(repr, METHODS))}"
            " (or 'auto' in geocomplexity.measure)"
        )
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose 'eval' or 'train'")
    check_distribution(distribution)
    num_probes, chunk_size = as_int(num_probes), as_int(chunk_size)
    if (
        not isinstance(num_probes, int)
        or isinstance(num_probes, bool)
        or num_probes < 1
    ):
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"chunk_size must be a positive integer or None, got {chunk_size!r}"
        )
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got "
            f"{type(generator).__name__}; for a seed, pass "
            f"torch.Generator().manual_seed({generator!r})"
        )
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be True or False, got {create_graph!r}")
    if method == "finite_difference" and create_graph:
        raise ValueError(
            "method='finite_difference' measures GC but gives wrong parameter "
            "gradients on non-smooth (ReLU) networks; use 'projection', 'exact' or "
            "'jvp' for a differentiable penalty"
        )
    check_output(output)
    _check_coupled(coupled)
    if wrt is not None and not isinstance(wrt, str):
        raise TypeError(f"wrt must be a submodule name, got {type(wrt).__name__}")


def check_names(
    model: nn.Module, output: Output = None, wrt: str | None = None
) -> None:
    """Refuse an ``output=`` or ``wrt=`` that names no submodule of ``model``.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: a name that is no submodule (the error lists valid ones).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, output, wrt = unwrapped(model, output, wrt)
    if isinstance(output, str):
        _submodule(model, output, "output")
    if wrt is not None:
        if not wrt:
            raise ValueError("wrt='' names the whole model; name a submodule")
        _submodule(model, wrt, "wrt")


def jacobian_sq_norms(
    model: nn.Module,
    x: Tensor,
    *,
    method: str = "exact",
    output: Output = None,
    mode: str = "eval",
    num_probes: int = 1,
    distribution: str = "rademacher",
    chunk_size: int | None = None,
    eps: float | None = None,
    generator: torch.Generator | None = None,
    create_graph: bool = False,
    wrt: str | None = None,
    coupled: bool | None = None,
) -> Tensor:
    r"""Per-sample :math:`\|\partial g(x_i)/\partial x_i\|_F^2` of a model.

    Args:
        model: maps a batch ``(B, *in_shape)`` to ``(B, *out_shape)`` (the logits
            for a classifier). Left exactly as found: modes, buffers, ``.grad``,
            ``requires_grad`` and the global RNG state.
        x: inputs of shape ``(B, *in_shape)``, floating point and finite.
        method: ``"exact"``, ``"projection"``, ``"jvp"`` or ``"finite_difference"``
            (see the module docstring). The first three differentiate what
            autograd sees: a model that detaches part of its computation from
            its input (a stop-gradient, ``x.detach()`` in ``forward``) has
            that part's dependence on the input left out, which
            ``"finite_difference"``, running the model alone, includes.
        output: what is differentiated. ``None``: the model's output. A callable:
            applied to the output (``torch.nn.Softmax(-1)``, ``lambda o: o["logits"]``).
            A string: the output of that submodule (``"features"``), for the GC
            of an embedding; the forward pass stops there, at its first call
            (a submodule the forward pass calls more than once, shared
            weights, is measured at that first call).
        mode: ``"eval"`` (default; BatchNorm uses running statistics, dropout is
            off, samples are independent) or ``"train"`` (batch statistics and
            one dropout mask; samples are coupled, and each sample's diagonal
            block is measured: exact takes k VJPs per sample, B times as many,
            the probe methods two passes per probe, twice as many). Train
            mode is what the model's own ``train()`` sets, where a module
            overrides it (a BatchNorm kept frozen stays frozen).
        num_probes: probes per sample for the stochastic methods.
        distribution: probe distribution, ``"rademacher"`` (default),
            ``"gaussian"`` or ``"sphere"``.
        chunk_size: VJPs batched into one backward pass (``1`` loops; smaller
            bounds memory), and JVPs into one forward-mode pass (exact's
            forward mode, and the probes of ``"jvp"`` when measuring).
            ``None`` picks by model type and device: up to 32 directions,
            except VJPs through convolutions on the CPU, which loop (their
            batching rules are slower than a loop there; on CUDA, and in
            forward mode, they batch). Where that batches the VJPs and no
            graph is kept, the first calls on ``model`` also time a loop, and
            later calls of the same shapes take the faster
            (:mod:`geocomplexity.tuning`).
        eps: finite-difference step; default ``sqrt(machine eps)`` times the RMS
            of ``x``, the machine eps of the coarsest precision the model
            computes in (``x``'s, its output's or autocast's): 3% of the RMS
            in float16, 9% in bfloat16, so that truncation error is large
            there on a steep model.
        generator: source of probe randomness; a private OS-seeded one if ``None``
            (the global RNG is never touched). Given the global generator
            (``torch.default_generator``) itself, the probes move it on: by
            their draws, or, where the call restores or replays the global
            RNG (train mode; coupled jvp and finite differences), by one draw
            that seeds them.
        create_graph: keep the graph so the result is differentiable in the
            parameters (for regularizers). Not for ``"finite_difference"``.
        wrt: the name of a submodule whose output ``e_i`` the Jacobian is
            taken against instead of ``x_i``: :math:`\|\partial g/\partial
            e_i\|_F^2`, everything before it held fixed. For token ids, name
            the embedding (``wrt="embed"``); ``x`` may then be integer. The
            submodule must run once per forward pass, before the output; the
            probes of ``"jvp"`` and ``"finite_difference"`` enter there.
        coupled: whether the samples of a batch interact, so that the
            per-sample diagonal blocks must be taken instead of the batch-sum
            trick. ``None`` (default): where ``mode="train"`` or a BatchNorm
            normalises by the batch. ``True``: for a layer of another type
            that mixes samples (a batch normalisation of your own, message
            passing between graph nodes), which is not recognised. ``False``:
            the batch-sum trick in train mode, for a model whose train-mode
            layers are dropout alone (B times faster for exact); refused
            where a BatchNorm couples the samples.

    Returns:
        Tensor of shape ``(B,)`` in ``x``'s dtype; each entry is the exact value,
        or an estimate averaged over ``num_probes`` probes (unbiased for
        ``"projection"`` and ``"jvp"``; ``"finite_difference"`` adds an
        O(``eps``) truncation error). Half-precision terms are squared and
        summed in float32, then cast: a float16 value beyond 65504 is an
        error (``measure`` keeps float32).

    Raises:
        ValueError: unknown method, mode or option; a scalar, empty or
            NaN/inf input, or one on another device than the model (see
            :func:`check_input`); a non-finite Jacobian, or a float16 norm
            beyond 65504; finite differences lost in the output's rounding.
        TypeError: an input that is not a tensor (a numpy array, a tuple or
            dict of inputs), integer input (without ``wrt=``), complex input,
            an input of another dtype than the model's parameters, a model
            that is not an ``nn.Module``, or a model output that is not a
            tensor.

    Example:
        >>> import torch
        >>> A = torch.randn(3, 5, dtype=torch.float64)
        >>> model = torch.nn.Linear(5, 3).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(A)
        >>> x = torch.randn(4, 5, dtype=torch.float64)
        >>> v = jacobian_sq_norms(model, x)
        >>> torch.allclose(v, A.pow(2).sum().expand(4))
        True
    """
    num_probes, chunk_size = as_int(num_probes), as_int(chunk_size)
    check_options(
        method=method,
        mode=mode,
        num_probes=num_probes,
        distribution=distribution,
        chunk_size=chunk_size,
        eps=eps,
        generator=generator,
        create_graph=create_graph,
        wrt=wrt,
    )
    check_input(x, differentiated=wrt is None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, output, wrt = unwrapped(model, output, wrt)

    d = math.prod(x.shape[1:])
    # inference mode (a Lightning validation step) records no graph even under
    # enable_grad, which would read as "the output does not depend on x"
    grad_on = (
        torch.inference_mode(False)
        if torch.is_inference_mode_enabled()
        else contextlib.nullcontext()
    )
    # a second derivative (create_graph) or a forward-mode one (jvp) through
    # attention needs its math kernel: the fused ones have neither. Every
    # method runs attention layers by their Python path: their fast path
    # (no grad: finite differences) computes another function on padded input
    attention = (
        differentiable_attention()
        if create_graph or method == "jvp"
        else no_attention_fast_path()
    )
    # a jvp penalty backpropagates forward-mode derivatives, which PyTorch's
    # fused layer, batch and instance norm get wrong (see composite_ops).
    # Under autocast a jvp measurement needs them too: given half-precision
    # input and float32 parameters, the fused norms return a half-precision
    # value with a float32 tangent (PyTorch 2.13, CPU), which the next layer
    # refused ("expected m1 and m2 to have the same dtype")
    norms = contextlib.nullcontext()
    if method == "jvp" and (create_graph or _autocast_dtype(x) is not None):
        norms = composite_ops(model)
    # and forward mode through group_norm fails on channels-last tensors
    group_norm = (
        contiguous_group_norm() if method == "jvp" else contextlib.nullcontext()
    )
    if mode == "train" and generator is not None and method != "exact":
        # the global RNG comes back as found (preserved): probes drawn from it
        # would be drawn again by the next call; one kept draw seeds them
        generator = _apart_from_global(generator)
    # before preserved(), which reads the version counters of the buffers
    check_differentiable_model(list(model.modules()), method)
    # probes drawn from the global RNG (eval mode; in train mode it is
    # replaced above): not between the replayed passes of a train-mode
    # measurement in another thread. Taken before the model's turn
    drawn_globally = _GLOBAL_RNG if _is_global(generator) else contextlib.nullcontext()
    with (
        drawn_globally,
        preserved(model, mode=mode) as modules,
        grad_on,
        torch.enable_grad(),
        norms,
        group_norm,
        attention,
        contextlib.ExitStack() as stack,
    ):
        _check_model_matches(modules, x)
        # a recurrent or attention layer whose sequence is the batch: refused
        if coupled is not True:
            stack.enter_context(sequence_along_batch(model, modules, x.shape[0]))
        # train mode couples samples through BatchNorm; so does a BatchNorm
        # without running statistics, which normalises by the batch in eval
        # mode too (here, in eval mode, the only way it can)
        coupled = _coupled(coupled, batch_norm_couples(modules), mode == "train")
        # the passes of the forward-mode and finite-difference methods run the
        # network of one dropout mask where dropout is live, coupled or not
        replay = coupled or mode == "train"
        # and each from the buffers found (a power iteration writes them in
        # train mode; a running normaliser or an observer in eval mode too,
        # where the step pass of a finite difference ran another function);
        # projection runs one pass
        if replay or method != "projection":
            stack.enter_context(rewound(model, modules))
        if x.is_inference():
            x = x.clone()  # an inference tensor cannot require grad
        if x.dim() == 1 and x.shape[0] > 1:
            _check_scalar_batch(model, x, output)
        fn = lambda z: _select(model, z, output)  # noqa: E731
        if method in ("exact", "projection"):

            def forward() -> tuple[Tensor, Tensor]:
                # replayed: the RNG after it is as before, so that exact's
                # forward-mode passes (d < k), or a pass that starts over,
                # share its dropout mask
                with _replayed(x, replay):
                    if wrt is None:
                        xg = x.detach().requires_grad_(True)
                        return xg, fn(xg)
                    # the variable is an inner one: e = submodule output
                    return _select_wrt(model, x, output, wrt)

            xg, out = forward()
            k = out.shape[1]
            if (
                method == "exact"
                and wrt is None
                and not coupled
                and d < k
                and not create_graph
            ):
                forward_chunk = chunk_size or _default_chunk(
                    model, d, x, k, backward=False
                )
                values = _exact_forward_or_none(
                    fn, x, d, replay, forward_chunk, fixed=chunk_size is not None
                )
                if values is not None:
                    return _finite(values)
            if wrt is None and not out.requires_grad:
                _check_cut_path(fn, x, out, replay)
            chunk = chunk_size or _default_chunk(
                model, _vjp_count(method, out.shape, num_probes, coupled), xg, k
            )
            timed = tuning.untimed
            if chunk_size is None and chunk > 1 and not create_graph and tuning.tuned():
                # batched or looped, whichever is faster here (geocomplexity.tuning)
                options = (method, num_probes, distribution, coupled, mode, wrt)
                shapes = (x.shape, out.shape, x.dtype, x.device)
                chunk, timed = tuning.chunk_for(model, (*options, *shapes), chunk)
            drawn = None
            if method == "projection":
                generator = resolve_generator(generator, xg.device)
                if chunk > 1:  # to draw the same probes if it starts over
                    drawn = generator.get_state()

            def reverse(xg: Tensor, out: Tensor, chunk: int) -> Tensor:
                return reverse_sq_norms(
                    xg,
                    out,  # (B, k) already
                    method=method,
                    coupled=coupled,
                    num_probes=num_probes,
                    distribution=distribution,
                    chunk_size=chunk,
                    generator=generator,
                    create_graph=create_graph,
                )

            def restart() -> None:
                if drawn is not None:
                    generator.set_state(drawn)  # type: ignore[union-attr]

            # a pass that failed part-way freed what the last chunk's backward
            # had used of the graph (no retain_graph): a retry runs the forward
            # again, under the same dropout mask
            passes = [(xg, out)]

            def again() -> None:
                passes.clear()  # the failed pass's graph goes first
                restart()
                passes.append(forward())

            del xg, out  # held by passes alone: a retry can let them go
            values = timed(
                lambda: _shrinking_chunk(
                    lambda c: reverse(*passes[0], c),
                    chunk,
                    fixed=chunk_size is not None,
                    restart=again,
                ),
                x.device,
            )
        elif wrt is not None:  # probes at the inner variable
            values = _probes_at(
                model,
                x,
                output,
                wrt,
                method,
                distribution,
                num_probes,
                eps,
                resolve_generator(generator, x.device),
                coupled,
                replay,
                keep_graph=create_graph,
            )
        else:
            values = _input_side(
                fn,
                x.detach(),
                method,
                distribution,
                num_probes,
                eps,
                resolve_generator(generator, x.device),
                coupled,
                replay,
                keep_graph=create_graph,
                # batched where no graph is kept: a penalty (create_graph)
                # backpropagates through one dual pass a probe
                chunk=1
                if create_graph
                else chunk_size or _default_chunk(model, num_probes, x, backward=False),
                # a chunk of its own (chunk_size=) is the caller's bound; the
                # default is bounded by the output size too, once it is known
                sized=chunk_size is not None,
            )
    if values.requires_grad and not create_graph:
        values = values.detach()
    return _finite(values)


def reverse_sq_norms(
    x: Tensor,
    out: Tensor,
    *,
    method: str = "exact",
    coupled: bool = False,
    num_probes: int = 1,
    distribution: str = "rademacher",
    chunk_size: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool = False,
    strict: bool = False,
) -> Tensor:
    """Reverse-mode per-sample norms on a graph the caller already built.

    The building block shared with the regularizers, which reuse the forward
    pass of the task loss: ``out = model(x)`` with ``x.requires_grad``.

    Args:
        x: the inputs ``(B, *in_shape)``, requiring grad.
        out: the differentiated output, flattened to ``(B, k)``.
        method: ``"exact"`` (k one-hot directions) or ``"projection"``.
        coupled: samples interact (train-mode BatchNorm): take per-sample
            diagonal blocks instead of the batch-sum trick; exact with one VJP
            per sample and direction, projection with two VJPs per probe
            (:func:`_decoupled_vjp_sq_norms`).
        num_probes: probes per sample for ``"projection"``.
        distribution: probe distribution.
        chunk_size: VJPs per backward pass (1 loops).
        generator: probe randomness.
        create_graph: keep the result differentiable in the parameters.
        strict: raise, rather than return zeros, when ``out`` does not depend
            on ``x`` (a caller's forward pass ran before ``x`` required grad).

    Returns:
        Per-sample values, shape ``(B,)``.

    Raises:
        ValueError: ``strict`` and ``out`` does not depend on ``x``.
    """
    B, k = out.shape
    if method == "exact":
        n, cot = k, _onehot(B, k, out)
    else:
        gen = resolve_generator(generator, x.device)
        n = num_probes
        if n == 1 or n * B * k <= _PROBES_AT_ONCE:  # few: in one draw
            probes = draw_probes(
                distribution,
                (n, B, k),
                dtype=out.dtype,
                device=out.device,
                generator=gen,
            )
            cot = lambda a, b: probes[a:b]  # noqa: E731
        elif coupled:
            # the signs come after the probes, as in one draw; a copy of the
            # generator draws the probes again, chunk by chunk
            source = _skipped_past(
                gen, n, lambda g: _probes_drawn_as_taken(distribution, out, g)(0, 1)
            )
            cot = _probes_drawn_as_taken(distribution, out, source)
        else:
            cot = _probes_drawn_as_taken(distribution, out, gen)
        if coupled:  # unbiased diagonal blocks from two VJPs per probe
            signs = _signs(num_probes, out, gen)
            return _decoupled_vjp_sq_norms(
                x, out, cot, signs, chunk_size, create_graph, strict
            )
    if coupled:
        values = _diag_vjp_sq_norms(x, out, cot, n, chunk_size, create_graph, strict)
    else:
        values = _vjp_sq_norms(x, out, cot, n, chunk_size, create_graph, strict)
    return values / num_probes if num_probes > 1 and method == "projection" else values


#: output probes drawn in one draw up to this many elements (num_probes · B · k);
#: beyond it, one probe at a time as the VJPs take them
_PROBES_AT_ONCE = 1 << 22


def _skipped_past(
    generator: torch.Generator, n: int, draw: Callable[[torch.Generator], Any]
) -> torch.Generator:
    """A copy of ``generator`` as it is now; ``generator`` moved past n draws.

    The copy draws those ``n`` probes again, one at a time as the passes take
    them, while ``generator`` goes on to the signs.
    """
    copy = torch.Generator(generator.device)
    copy.set_state(generator.get_state())
    for _ in range(n):
        draw(generator)
    return copy


def _probes_drawn_as_taken(
    distribution: str, out: Tensor, generator: torch.Generator
) -> Callable[[int, int], Tensor]:
    """Output probes ``start..stop-1``, ``(stop - start, B, k)``, on demand.

    Drawn one probe at a time as the VJPs take them, so that a chunk holds
    its own probes alone (all at once they held ``num_probes × B × k``,
    whatever the chunk), and the probes do not depend on the chunk size. Each
    must be asked for once, in order.
    """
    shape = (1, *out.shape)

    def draw(start: int, stop: int) -> Tensor:
        drawn = [
            draw_probes(
                distribution,
                shape,
                dtype=out.dtype,
                device=out.device,
                generator=generator,
            )
            for _ in range(start, stop)
        ]
        return drawn[0] if len(drawn) == 1 else torch.cat(drawn)

    return draw


def _check_cut_path(
    fn: Callable[[Tensor], Tensor], x: Tensor, out: Tensor, replay: bool
) -> None:
    """Refuse an output with no autograd path from ``x`` that moves with ``x``.

    The reverse-mode methods would read such an output's Jacobian as zero.
    One pass at ``x`` plus a small random step (the private generator's, so
    the global RNG is not drawn from) tells a constant output, whose GC is
    zero, from a forward pass that runs under ``torch.no_grad()`` or
    detaches.

    Raises:
        ValueError: the output changes with ``x``.
    """
    u = input_probes("gaussian", x, 1, resolve_generator(None, x.device))[0]
    with torch.no_grad(), _replayed(x, replay):
        moved = fn(x.detach() + _fd_step(x, None, out) * u)
    if not torch.equal(moved, out.detach()):
        raise ValueError(
            "the model's output changes with x but autograd has no path from x "
            "to it: its forward pass runs under torch.no_grad() or "
            "inference_mode, or detaches, so 'exact' and 'projection' would "
            "read GC = 0. Take the no_grad or detach out of the forward pass, "
            "or measure with method='jvp' (which no_grad does not stop) or "
            "method='finite_difference'"
        )


def _exact_forward_or_none(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    d: int,
    replay: bool = False,
    chunk: int = 1,
    fixed: bool = False,
) -> Tensor | None:
    """Exact norms by d forward-mode passes; ``None`` if forward AD is missing.

    ``chunk`` directions a pass (:func:`_batched_forward_mode`; ``fixed``:
    the caller's, kept on running out of GPU memory). With ``replay`` (train
    mode) the passes share one dropout mask, one at a time. ``None`` too
    where the passes drew random numbers in eval mode (dropout forced on, a
    noise layer): each pass saw another draw, and their sum mixed the
    draws; reverse mode's k VJPs measure the one draw of its forward pass,
    as where d ≥ k.
    """
    shape = x.shape

    def basis(i: int) -> Tensor:
        e = x.new_zeros(shape[0], d)
        e[:, i] = 1
        return e.reshape(shape)

    drawn = None if replay else _rng_states(x)
    try:
        with torch.no_grad():
            values = _forward_mode(
                fn, x.detach(), basis, d, replay=replay, chunk=chunk, fixed=fixed
            )
    except (NotImplementedError, RuntimeError):
        return None
    # (another thread's draws read as the model's: reverse mode, still exact)
    if drawn is not None and not _same_states(drawn, _rng_states(x)):
        return None
    return values


def forward_mode_runs(model: nn.Module, x: Tensor, output: Output) -> bool:
    """Whether one forward-mode pass runs through the model at ``x``.

    Where it cannot (an ``autograd.Function`` without ``jvp``, an op with no
    forward-mode formula), exact with d < k falls back to its k VJPs
    (:func:`_exact_forward_or_none`). Run by the caller in the measuring
    mode, with the model's state kept (``preserved``).
    """
    x = x.detach()
    if 0 in x.stride():  # as in _forward_mode: make_dual refuses it
        x = x.contiguous()
    try:
        with torch.no_grad(), _dual_level():
            _select(model, fwAD.make_dual(x, torch.ones_like(x)), output)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def _fd_step(x: Tensor, eps: float | None, out: Tensor | None = None) -> float:
    """The finite-difference step: ``eps``, or by default √(machine eps)·RMS(x).

    sqrt(machine eps) balances truncation (kinks crossed, curvature) against
    round-off; the RMS makes the step unit-free. The machine eps is that of
    the coarsest precision the pass computes in: ``x``'s, the output's, or
    autocast's (a float32 input through a bfloat16 autocast model, whose
    round-off float32's step, divided by its square, made 50 times the GC).
    """
    if eps is not None:
        return eps
    return math.sqrt(_unit_roundoff(x, out)) * _rms(x)


def _rms(x: Tensor) -> float:
    """The RMS of ``x``'s entries, 1 where they are all 0 (the scale of a step).

    In float32 at least: a float16 square overflows beyond |x| = 256.
    """
    return _wide(x).pow(2).mean().sqrt().item() or 1.0


def _unit_roundoff(x: Tensor, out: Tensor | None = None) -> float:
    """The machine eps of the coarsest precision a pass at ``x`` computes in.

    That of ``x``'s dtype, the output's or autocast's.
    """
    dtypes = (x.dtype, None if out is None else out.dtype, _autocast_dtype(x))
    return max(torch.finfo(d).eps for d in dtypes if d is not None)


def _check_resolved(
    energy: Tensor,
    base: Tensor,
    unit: float,
    n: int,
    far: Callable[[], Tensor],
) -> None:
    """Refuse finite differences lost in the rounding of the output.

    ``energy`` is Σ‖g(x + εu) − g(x)‖² over the ``n`` probes and the batch;
    each difference carries the output's rounding, about ``unit·|g|`` an
    entry. Where the differences are no larger than that (an output far
    larger than its change over a step: a large offset, a flat or saturated
    model, half precision) the estimate is rounding noise: 0.5 to 1000 times
    the GC in float16, bfloat16 and float32 alike, silently.

    Only there is ``far()``, the output after a step the size of the input,
    run: an entry it leaves exactly as it is (a logit masked to -1e9, a
    constant output) differs by exactly 0 at any step, carries no rounding
    into the estimate, and is left out of the floor. Differences of exactly
    zero everywhere are then a constant model's GC (0) where no entry moves.

    Raises:
        ValueError: the mean squared difference is below the squared rounding
            of the entries that move; where it is exactly 0, the message says
            that the output may be piecewise constant (argmax), GC 0.
    """

    def floor(keep: Tensor | None = None) -> float:
        g = _wide(base)
        if keep is not None:
            g = torch.where(keep, g, 0)
        return _sq_sum(unit * g.reshape(base.shape[0], -1)).sum().item()

    got = energy.item() / n
    if got >= floor():
        return
    under = floor(far() != base)
    if got < under:
        advice = (
            "Measure with method='jvp', 'projection' or 'exact', in a wider "
            "dtype, or with a larger eps="
        )
        if got == 0:
            # as likely a piecewise-constant output (argmax, one_hot, round)
            # as a change below the rounding: a larger eps crosses its jumps
            raise ValueError(
                "the finite differences are all exactly 0, yet a step the size "
                "of the input changes the output: either the output is "
                "piecewise constant (argmax, one_hot, round, a step function), "
                "whose Jacobian is 0 wherever it is defined (method='jvp', "
                "'projection' or 'exact' give its GC, 0; a larger eps= would "
                "measure its jumps), or its change over a step is lost in the "
                "rounding of the output, below one rounding error "
                f"({unit:.2g} relative) on outputs this large ({under:.3g}). " + advice
            )
        raise ValueError(
            "the finite differences are lost in the rounding of the output: "
            f"their mean square ({got:.3g}) is below that of one rounding "
            f"error ({unit:.2g} relative) on outputs this large ({under:.3g}), "
            "so the estimate would be noise. " + advice
        )


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on ``x``'s device; ``None`` where it is off."""
    device = x.device.type
    try:
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    except (TypeError, AttributeError):  # torch < 2.4 asks about CUDA only
        if device == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    except RuntimeError:  # a device without autocast
        pass
    return None


def _finite_difference(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    probes: Callable[[int], Tensor],
    n: int,
    eps: float | None,
    signs: Tensor | None = None,
    replay: bool = False,
) -> Tensor:
    """Mean over probes of ‖g(x + εu) − g(x)‖²/ε² per sample (no autograd).

    With ``signs`` ``(n, B)`` (coupled samples): ``t_i⟨Δ(u)_i, Δ(t∘u)_i⟩/ε²``
    with ``Δ(u) = g(x + εu) − g(x)``. With ``signs`` or ``replay`` (train
    mode) every pass draws the same random numbers (see
    :func:`_forward_mode`). ``probes(i)`` gives probe ``i`` of ``n``, shaped
    like ``x``, as its pass takes it.
    """
    B = x.shape[0]
    replay = replay or signs is not None
    with torch.no_grad():
        drawn = None if replay else _rng_states(x)
        with _replayed(x, replay):
            base = fn(x)
        if (
            drawn is not None
            and not _same_states(drawn, _rng_states(x))
            and _differs(fn(x), base)  # not another thread's draw
        ):
            # each pass would see other noise, whose difference swamps the
            # step's: a model with dropout forced on read GC 361,920 and
            # 624,232 on two calls, against 0.07 by exact
            raise ValueError(
                "the model draws random numbers in eval mode (dropout with "
                "training=True, a noise layer): each finite-difference pass "
                "would see other noise, and the difference quotient measures "
                "that noise. Measure with method='exact' or 'projection' (one "
                "pass), or mode='train' (the passes replay one draw)"
            )
        eps = _fd_step(x, eps, base)
        total = _accumulator(x, B)
        energy = total.new_zeros(())  # Σ‖Δ‖², for the rounding check
        for i in range(n):
            ui = probes(i)
            if i == 0:
                first = ui  # for the rounding check
            last = signs is None and i == n - 1
            with _replayed(x, replay, final=last):
                a = (fn(x + eps * ui) - base).reshape(B, -1)
            if signs is None:
                total = total + _sq_sum(a)
                continue
            energy = energy + _sq_sum(a).sum()
            with _replayed(x, replay, final=i == n - 1):
                flipped = x + eps * ui * _per_sample(signs[i], ui)
                b = (fn(flipped) - base).reshape(B, -1)
            total = total + _wide(signs[i]) * _dot_sum(a, b)

        def far() -> Tensor:
            with _replayed(x, True):
                return fn(x + max(eps, _rms(x)) * first)

        _check_resolved(
            total.sum() if signs is None else energy,
            base,
            _unit_roundoff(x, base),
            n,
            far,
        )
    return _narrow(total / (n * eps**2), x.dtype)


def _rng_states(x: Tensor) -> list[Tensor]:
    """The global RNG's state, and that of ``x``'s CUDA device if it is on one."""
    states = [torch.get_rng_state()]
    if x.device.type == "cuda":
        states.append(torch.cuda.get_rng_state(x.device))
    return states


def _same_states(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def _differs(again: Tensor, base: Tensor) -> bool:
    """Whether a second pass at the same input gave another output.

    Beyond 10⁻³ of its largest entry: a nondeterministic GPU kernel's
    rounding is not noise drawn by the model.
    """
    scale = base.detach().abs().max()
    return bool((again - base).abs().max() > 1e-3 * scale)


def _finite(values: Tensor) -> Tensor:
    """Refuse to return a non-finite number silently.

    Raises:
        ValueError: some per-sample value is NaN or infinite.
    """
    if math.isfinite(values.sum().item()):
        return values
    bad = (~torch.isfinite(values)).sum().item()
    if bad and values.dtype == torch.float16 and not values.isnan().any():
        raise ValueError(
            f"the squared Jacobian norm is beyond float16's range (65504) for "
            f"{bad} of {values.numel()} samples: the norms are summed in "
            "float32, but returned in the input's dtype. geocomplexity.measure "
            "and the torchmetrics metric keep them in float32; or measure in "
            "bfloat16 or float32 (or under torch.autocast)"
        )
    if bad:
        raise ValueError(
            f"the Jacobian norm is NaN or infinite for {bad} of {values.numel()} "
            "samples: the model's output or its derivative overflows there "
            "(check for NaN weights, or measure in float64)"
        )
    return values
