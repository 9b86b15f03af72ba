r"""Operations rewritten from primitives, for the jvp penalty.

A ``"jvp"`` GC penalty pushes a tangent through the model by forward-mode AD and
then backpropagates the tangent's norm to the parameters. For some of PyTorch's
fused kernels that second step is wrong or fails (PyTorch 2.13):

- ``layer_norm``, ``batch_norm`` with batch statistics and ``instance_norm``:
  their forward-mode derivatives are right, but the mean and inverse standard
  deviation they save enter the backward pass as constants, so the parameter
  gradients come out wrong, silently (the gradient of :math:`\|Ju\|^2` through
  a ``LayerNorm`` was off by a factor of three against central differences;
  pytorch/pytorch#196699, #196700);
- ``softmax``, ``log_softmax`` and ``logsumexp`` fail ("modified by an inplace
  operation"), and with them ``scaled_dot_product_attention`` and every
  transformer.

Their double backward (the ``"projection"`` and ``"exact"`` penalties) is
right, and so are ``group_norm``, ``rms_norm``, ``batch_norm`` with running
statistics and the activations, pools, convolutions and recurrent layers
checked against central differences.

:func:`composite_ops` reroutes the affected functions, for the duration of a
block, to the same arithmetic written with primitive operations (mean,
variance, reciprocal square root, exponential, matrix products), whose
derivatives of every order autograd knows. The rerouting works on the
functional calls (``torch.nn.functional``, ``torch``, ``torch.special``,
``Tensor`` methods), so it covers the ``torch.nn`` modules and custom modules
that call them; an operation called from inside another C++ kernel is out of
its reach. The rerouting holds in the thread that enters the block:
``nn.DataParallel``, which runs its replicas in threads of their own, is
refused when the block is entered for a model (``composite_ops(model)``).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["composite_ops"]


# the functions as torch defines them, captured before any block patches them
_F_SOFTMAX, _F_LOG_SOFTMAX, _F_SOFTMIN = F.softmax, F.log_softmax, F.softmin
_F_BATCH_NORM, _F_INSTANCE_NORM = F.batch_norm, F.instance_norm
_F_GROUP_NORM = F.group_norm
_TORCH_LAYER_NORM = torch.layer_norm
_TORCH_BATCH_NORM, _TORCH_INSTANCE_NORM = torch.batch_norm, torch.instance_norm


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 where it is a narrower float, as the fused kernels count.

    Also what :mod:`geocomplexity.jacobian` sums half-precision terms in.
    """
    return x.float() if x.is_floating_point() and x.dtype.itemsize < 4 else x


def _wide_unless_autocast(x: Tensor) -> Tensor:
    """:func:`_wide`, except under autocast, whose casts the primitives follow.

    The fused softmax and attention count half precision in float32 and
    return it; under autocast (CUDA's runs softmax in float32) the
    primitives are left to autocast's own casts.
    """
    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 asks about CUDA only: as if on
        autocast = True
    except RuntimeError:  # a device without autocast (meta)
        autocast = False
    return x if autocast else _wide(x)


def _normalise(x: Tensor, dims: Sequence[int], eps: float) -> tuple[Tensor, Tensor]:
    """``(x − mean)/√(var + eps)`` over ``dims`` (biased variance), and the mean.

    Half-precision ``x`` is normalised in float32; the callers cast the result
    back to ``x``'s dtype, as the fused kernels return it.
    """
    x = _wide(x)
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


def _update(running: Tensor | None, value: Tensor, momentum: float) -> None:
    """``running ← (1 − m)·running + m·value``, as BatchNorm does; in place.

    Counted in float32 at least and rounded once, as the fused kernels do
    half-precision running statistics.
    """
    if running is not None:
        with torch.no_grad():
            wide = _wide(running)
            running.copy_(wide * (1 - momentum) + value.to(wide.dtype) * momentum)


def _matched(fused: Any, input: Tensor, *params: Tensor | None) -> Tensor:
    """``fused(input)``, on ``input`` cast to wider parameters' dtype and back.

    Under autocast a fused norm (group norm; batch and instance norm with
    running statistics) takes half-precision input with float32 parameters
    and running statistics, which autocast leaves as they are, and returns
    its value in the input's dtype but its forward-mode derivative in the
    parameters' (PyTorch 2.13, CPU): the next layer refused the mix ("Input
    type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the
    same"). Cast up, the kernel computes as it did (in float32), and the
    cast back takes value and derivative to the input's dtype.
    """
    wide = [
        p.dtype
        for p in params
        if p is not None
        and input.is_floating_point()
        and input.dtype.itemsize < 4  # half precision: what kernels mix
        and p.is_floating_point()
        and p.dtype.itemsize > input.dtype.itemsize
    ]
    if not wide:
        return fused(input)
    return fused(input.to(wide[0])).to(input.dtype)


def _layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    shape = tuple(normalized_shape)
    if (
        not shape
        or input.dim() < len(shape)
        or tuple(input.shape[input.dim() - len(shape) :]) != shape
        or any(p is not None and tuple(p.shape) != shape for p in (weight, bias))
    ):  # shapes torch refuses: its own error
        return _TORCH_LAYER_NORM(input, normalized_shape, weight, bias, eps)
    dims = tuple(range(-len(shape), 0))
    out, _ = _normalise(input, dims, eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out.to(input.dtype)


def _torch_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    cudnn_enable: bool = True,
) -> Tensor:
    return _layer_norm(input, normalized_shape, weight, bias, eps)


def _to_fused(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    dims: Sequence[int],
) -> bool:
    """Whether batch or instance norm, batch statistics over ``dims``, is torch's.

    Where torch refuses the arguments (its own error then), where nothing is
    normalised (an empty input, whose running statistics torch leaves as they
    are, or not, for an empty batch of instances), and where each statistic
    is over one value (the output is the bias, and no derivative goes through
    the statistics). Torch refuses per-channel tensors of other than
    ``input.shape[1]`` elements, which the composite would broadcast: a
    one-channel input to a three-channel norm came out with three channels,
    and its one mean was written into all three running means.
    """
    return (
        input.dim() < 2
        or input.dim() <= max(dims)
        or momentum is None
        or (running_mean is None) != (running_var is None)
        or any(
            p is not None and p.numel() != input.shape[1]
            for p in (weight, bias, running_mean, running_var)
        )
        or input.numel() == 0
        or math.prod(input.shape[d] for d in dims) == 1
    )


def _torch_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> Tensor:
    """``torch.batch_norm``'s argument order; no checks of its own, as torch's."""
    dims = (0, *range(2, max(input.dim(), 2)))
    if not training or _to_fused(
        input, weight, bias, running_mean, running_var, momentum, dims
    ):
        # running statistics: an affine map, whose fused formulas are right
        return _matched(
            lambda z: _TORCH_BATCH_NORM(
                z, weight, bias, running_mean, running_var, training, momentum,
                eps, cudnn_enabled,
            ),
            input, weight, bias, running_mean, running_var,
        )  # fmt: skip
    out, mean = _normalise(input, dims, eps)
    var = _wide(input.detach()).var(dims, unbiased=True)
    _update(running_mean, mean.detach().flatten(), momentum)
    _update(running_var, var, momentum)
    return _affine(out, weight, bias).to(input.dtype)


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if (
        not training
        or input.dim() < 2
        or eps <= 0
        or input.shape[0] * math.prod(input.shape[2:]) == 1
    ):  # running statistics (an affine map), or what F.batch_norm refuses
        return _matched(
            lambda z: _F_BATCH_NORM(
                z, running_mean, running_var, weight, bias, training, momentum, eps
            ),
            input, weight, bias, running_mean, running_var,
        )  # fmt: skip
    return _torch_batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )


def _torch_instance_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> Tensor:
    """``torch.instance_norm``'s argument order; no checks of its own."""
    dims = tuple(range(2, max(input.dim(), 3)))
    if not use_input_stats or _to_fused(
        input, weight, bias, running_mean, running_var, momentum, dims
    ):  # running statistics: an affine map
        return _matched(
            lambda z: _TORCH_INSTANCE_NORM(
                z, weight, bias, running_mean, running_var, use_input_stats,
                momentum, eps, cudnn_enabled,
            ),
            input, weight, bias, running_mean, running_var,
        )  # fmt: skip
    out, mean = _normalise(input, dims, eps)
    # the running statistics average each sample's (as aten::instance_norm)
    if running_mean is not None and running_var is not None:
        var = _wide(input.detach()).var(dims, unbiased=True).mean(0)
        _update(running_mean, mean.detach().flatten(1).mean(0), momentum)
        _update(running_var, var, momentum)
    return _affine(out, weight, bias).to(input.dtype)


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
    if not use_input_stats or math.prod(input.shape[2:]) == 1:
        # running statistics (an affine map), or one spatial element, which
        # F.instance_norm refuses
        return _matched(
            lambda z: _F_INSTANCE_NORM(
                z, running_mean, running_var, weight, bias, use_input_stats,
                momentum, eps,
            ),
            input, weight, bias, running_mean, running_var,
        )  # fmt: skip
    return _torch_instance_norm(
        input, weight, bias, running_mean, running_var, use_input_stats,
        momentum, eps,
    )  # fmt: skip


def _top(input: Tensor, dim: Any) -> Tensor:
    """The max along ``dim`` (kept), held constant; 0 along an empty ``dim``."""
    if input.numel() == 0:
        return input.detach().sum(dim, keepdim=True)
    return input.detach().amax(dim, keepdim=True)


def _shifted(input: Tensor, dim: int) -> Tensor:
    """``input − max`` along ``dim``, the max held constant (it cancels).

    As in the fused kernels, a row of ``-inf`` is shifted by 0 and one with
    ``+inf`` by ``+inf`` (NaN then, as torch gives it).
    """
    top = _top(input, dim)
    return input - top.masked_fill(top == float("-inf"), 0)


def _exp_normalised(
    input: Tensor, dim: int, dtype: torch.dtype | None, log: bool
) -> Tensor:
    """Softmax (or, with ``log``, log-softmax) along ``dim`` from primitives.

    Cast to ``dtype`` first, as torch does; half precision is counted in
    float32 outside autocast and rounded once at the end.
    """
    if dtype is not None:
        input = input.to(dtype)
    x = _wide_unless_autocast(input)
    z = _shifted(x, dim)
    if log:
        out = z - z.exp().sum(dim, keepdim=True).log()
    else:
        e = z.exp()
        out = e / e.sum(dim, keepdim=True)
    return out if x is input else out.to(input.dtype)


def _softmax(
    input: Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> Tensor:
    if dim is None:  # the deprecated implicit dimension: left to torch
        return _F_SOFTMAX(input, dim, _stacklevel, dtype)
    return _exp_normalised(input, dim, dtype, log=False)


def _log_softmax(
    input: Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> Tensor:
    if dim is None:
        return _F_LOG_SOFTMAX(input, dim, _stacklevel, dtype)
    return _exp_normalised(input, dim, dtype, log=True)


def _softmin(
    input: Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> Tensor:
    if dim is None:
        return _F_SOFTMIN(input, dim, _stacklevel, dtype)
    return _softmax(-input, dim, dtype=dtype)


def _gumbel_softmax(
    logits: Tensor,
    tau: float = 1,
    hard: bool = False,
    eps: float = 1e-10,
    dim: int = -1,
) -> Tensor:
    """``F.gumbel_softmax`` (same draws), its softmax the composite one."""
    if eps != 1e-10:
        warnings.warn("`eps` parameter is deprecated and has no effect.", stacklevel=3)
    fresh = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format)
    soft = _softmax((logits - fresh.exponential_().log()) / tau, dim)
    if not hard:
        return soft
    index = soft.max(dim, keepdim=True)[1]
    one_hot = torch.zeros_like(
        logits, memory_format=torch.legacy_contiguous_format
    ).scatter_(dim, index, 1.0)
    return one_hot - soft.detach() + soft


def _softmax_method(
    input: Tensor, dim: int, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.softmax`` and ``Tensor.softmax``: no ``_stacklevel``."""
    return _softmax(input, dim, dtype=dtype)


def _log_softmax_method(
    input: Tensor, dim: int, dtype: torch.dtype | None = None
) -> Tensor:
    return _log_softmax(input, dim, dtype=dtype)


def _logsumexp(input: Tensor, dim: Any, keepdim: bool = False) -> Tensor:
    """As ``aten::logsumexp`` counts it, in ``input``'s dtype."""
    top = _top(input, dim)
    top = top.masked_fill(~torch.isfinite(top), 0)
    out = (input - top).exp().sum(dim, keepdim=True).log() + top
    return out if keepdim else out.squeeze(dim)


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``softmax(q kᵀ · scale + mask) v``, as PyTorch's math kernel computes it."""
    L, S = query.shape[-2], key.shape[-2]
    if enable_gqa and key.dim() >= 3:  # each key and value head serves a group
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    dtype = query.dtype
    query = _wide_unless_autocast(query)
    if query.dtype != dtype:  # half precision, counted in float32
        key, value = key.to(query.dtype), value.to(query.dtype)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    # a query that may see no key gets zero output, as the fused kernels give
    # it, not softmax's 0/0; its scores are filled first, so no NaN reaches
    # the backward pass either
    blind = (scores.detach() == float("-inf")).all(-1, keepdim=True)
    weights = _softmax(scores.masked_fill(blind, 0), -1).masked_fill(blind, 0)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    out = weights @ value
    return out if query.dtype == dtype else out.to(dtype)


_COMPOSITES = {
    F.layer_norm: _layer_norm,
    torch.layer_norm: _torch_layer_norm,
    F.batch_norm: _batch_norm,
    torch.batch_norm: _torch_batch_norm,
    F.instance_norm: _instance_norm,
    torch.instance_norm: _torch_instance_norm,
    F.softmax: _softmax,
    torch.softmax: _softmax_method,
    Tensor.softmax: _softmax_method,
    torch.special.softmax: _softmax_method,
    F.log_softmax: _log_softmax,
    torch.log_softmax: _log_softmax_method,
    Tensor.log_softmax: _log_softmax_method,
    torch.special.log_softmax: _log_softmax_method,
    F.softmin: _softmin,
    F.gumbel_softmax: _gumbel_softmax,
    torch.logsumexp: _logsumexp,
    Tensor.logsumexp: _logsumexp,
    torch.special.logsumexp: _logsumexp,
    F.scaled_dot_product_attention: _attention,
}


#: Python functions of ``torch.nn.functional`` that call the functions above by
#: their module-level names: a mode does not see calls made inside a call it
#: handles, so these run with those names pointing at the composites.
_DECOMPOSED = {F.multi_head_attention_forward}
_PATCHED = {
    name: _COMPOSITES[getattr(F, name)]
    for name in (
        "layer_norm",
        "batch_norm",
        "instance_norm",
        "softmax",
        "log_softmax",
        "scaled_dot_product_attention",
    )
}


_PATCH_LOCK = threading.Lock()
_patch_depth: dict[str, int] = {}
_unpatched: dict[str, Any] = {}


@contextlib.contextmanager
def _patched(patches: dict[str, Any]) -> Iterator[None]:
    """``torch.nn.functional``'s names in ``patches`` point at their values.

    Process-wide while it lasts: another thread calling these functions
    meanwhile gets the replacements too, which compute the same values.
    Overlapping blocks (threads, nesting) count per name: the first one in
    patches, the last one out restores.
    """
    with _PATCH_LOCK:
        for name, replacement in patches.items():
            if not _patch_depth.get(name):
                _unpatched[name] = getattr(F, name)
                setattr(F, name, replacement)
            _patch_depth[name] = _patch_depth.get(name, 0) + 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            for name in patches:
                _patch_depth[name] -= 1
                if not _patch_depth[name]:
                    setattr(F, name, _unpatched.pop(name))


def _functional_patched() -> contextlib.AbstractContextManager[None]:
    """``torch.nn.functional``'s names for the fused ops point at composites.

    For one call of a :data:`_DECOMPOSED` function (see :func:`_patched`).
    """
    return _patched(_PATCHED)


def _contiguous_group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.group_norm`` of a contiguous copy of ``input`` where it is not one.

    In the dtype of wider parameters (autocast's float32 ones), as
    :func:`_matched`.
    """
    return _matched(
        lambda z: _F_GROUP_NORM(z.contiguous(), num_groups, weight, bias, eps),
        input,
        weight,
        bias,
    )


def contiguous_group_norm() -> contextlib.AbstractContextManager[None]:
    """A block in which ``F.group_norm`` (``nn.GroupNorm``) takes contiguous input.

    PyTorch's forward-mode derivative of ``group_norm`` views its input and
    tangent as ``(1, N·groups, -1)``, which fails on a channels-last tensor
    ("view size is not compatible with input tensor's size and stride",
    PyTorch 2.13): a channels-last input, or a model converted with
    ``model.to(memory_format=torch.channels_last)``, stopped ``"jvp"`` at its
    first ``GroupNorm``. The values are the same; the block's forward-mode
    passes (``"jvp"``, the jvp penalty) run in it. Process-wide while it
    lasts, as :func:`_patched`.
    """
    return _patched({"group_norm": _contiguous_group_norm})


class _Composites(TorchFunctionMode):
    """Reroutes the fused operations to :data:`_COMPOSITES`."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        composite = _COMPOSITES.get(func)
        if composite is not None and kwargs.get("out") is None:
            return composite(*args, **kwargs)
        if func in _DECOMPOSED:  # nn.MultiheadAttention's functional form
            with _functional_patched():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _refuse_other_threads(model: torch.nn.Module) -> None:
    """Refuse a model whose forward pass runs in other threads (DataParallel).

    Raises:
        ValueError: ``model`` contains an ``nn.DataParallel``.
    """
    if any(isinstance(m, torch.nn.DataParallel) for m in model.modules()):
        raise ValueError(
            "the 'jvp' GC penalty reroutes the fused layer, batch and instance "
            "norm and softmax, whose forward-mode derivatives PyTorch "
            "backpropagates wrongly, in the thread that runs it; "
            "nn.DataParallel runs its replicas in threads of their own, where "
            "the fused kernels would give wrong gradients: use "
            "DistributedDataParallel, or method='projection'"
        )


def composite_ops(model: torch.nn.Module | None = None) -> _Composites:
    """A block in which normalisations, softmax and attention run as composites.

    For passes whose forward-mode derivative is backpropagated (the ``"jvp"``
    GC penalty): see the module docstring. Outside such passes the fused
    kernels are right and faster.

    Args:
        model: the model the block will run, if it is to be checked: one
            whose forward pass runs in other threads (``nn.DataParallel``),
            which the rerouting does not reach, is refused.

    Returns:
        A context manager.

    Raises:
        ValueError: ``model`` contains an ``nn.DataParallel``.

    Example:
        >>> import torch
        >>> ln = torch.nn.LayerNorm(4)
        >>> x = torch.randn(3, 4)
        >>> with composite_ops():
        ...     y = ln(x)
        >>> torch.allclose(y, ln(x), atol=1e-6)
        True
    """
    if model is not None:
        _refuse_other_threads(model)
    return _Composites()
