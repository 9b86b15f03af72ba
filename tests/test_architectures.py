"""Architectures researchers use, measured and regularized.

Recurrent layers, transformers (eval mode's fused fast path and nested tensors
included), attention with masks held as buffers, token models through ``wrt=``,
group, instance and multi-dimensional layer norm, transposed and grouped
convolutions, upsampling, channel dropout, tied weights, nested outputs and
channels-last inputs. Each model is tiny and float64; every method and every
penalty is compared with the brute-force references of ``reference.py``, and
each call leaves the model as it found it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_central_differences, jvp_and_finite_difference
from reference import diagonal_block_sq_norms, inner_sq_norms, per_sample_sq_norms
from torch import nn

import geocomplexity as gcx
from geocomplexity.regularizers import GeometricComplexity, GradientNorm, SpectralNorm
from geocomplexity.state import differentiable_attention

# -- the models ---------------------------------------------------------------------


class Recurrent(nn.Module):
    """A batch-first recurrent layer on (B, T, 3), then a head on the last step,
    on every step, or on the final hidden state."""

    def __init__(self, layer: nn.RNNBase, read: str = "last") -> None:
        super().__init__()
        self.rnn, self.read = layer, read
        width = layer.hidden_size * (2 if layer.bidirectional else 1)
        self.head = nn.Linear(layer.hidden_size if read == "hidden" else width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h = self.rnn(x)
        if self.read == "hidden":
            h = h[0] if isinstance(h, tuple) else h  # an LSTM's is (h, c)
            return self.head(h[-1])
        return self.head(out if self.read == "all" else out[:, -1])


class SequenceFirstInside(nn.Module):
    """Batch-first x into a ``batch_first=False`` LSTM: the model transposes."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.transpose(0, 1))
        return self.head(out[-1])


class Encoder(nn.Module):
    """Two transformer layers (nested tensors enabled, PyTorch's default)."""

    def __init__(self, dropout: float = 0.0, norm_first: bool = False) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=dropout, batch_first=True, norm_first=norm_first
        )
        # nested tensors need norm_first=False (else a warning)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


class PaddedTokens(nn.Module):
    """Token ids (0 pads) into an encoder with a padding mask, then the mean over
    every position, the padded ones too. In eval mode without grad the encoder
    runs a nested tensor and returns zeros at the padded positions; with grad,
    what attention computes there: another function."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 2), nn.Linear(8, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.embed(t), src_key_padding_mask=t == 0)
        return self.head(h.mean(1))


class CausalAttention(nn.Module):
    """Self-attention with a causal mask held as a buffer, a head on every step."""

    def __init__(self, T: int = 5) -> None:
        super().__init__()
        self.attn, self.head = (
            nn.MultiheadAttention(6, 2, batch_first=True),
            nn.Linear(6, 2),
        )
        self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, attn_mask=self.mask, need_weights=False)
        return self.head(out)


class TiedLM(nn.Module):
    """A causal language model: embedding, a transformer layer under a causal
    mask buffer, and an output layer that shares the embedding's weight."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.pos = nn.Parameter(torch.randn(6, 8) / 4)
        self.enc = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=dropout, batch_first=True
        )
        self.register_buffer(
            "causal", nn.Transformer.generate_square_subsequent_mask(6)
        )
        self.lm = nn.Linear(8, 12, bias=False)
        self.lm.weight = self.embed.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.embed(t) + self.pos[: t.shape[1]]
        return self.lm(self.enc(h, src_mask=self.causal, is_causal=True))


class NestedOut(nn.Module):
    """Returns ``{"out": (logits, features), "aux": {...}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h = torch.tanh(self.features(x))
        return {"out": (self.head(h), h), "aux": {"features": h}}


class TiedLinear(nn.Module):
    """Two layers that share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 2)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _conv(*layers: nn.Module, flat: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), *layers, nn.Flatten(), nn.Linear(flat, 3)
    )


def _tokens(B: int = 3, T: int = 6) -> torch.Tensor:
    t = torch.randint(1, 12, (B, T))
    t[0, 4:] = 0  # padded
    t[2, 3:] = 0
    return t


_IMAGE = (3, 2, 6, 6)
_CL = torch.channels_last
_PICK = lambda o: o["out"][0]  # noqa: E731

#: name -> () -> (model, x, keyword arguments of the measurement)
ZOO: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, dict[str, Any]]]] = {
    "lstm last step": lambda: (
        Recurrent(nn.LSTM(3, 4, batch_first=True)),
        torch.randn(3, 4, 3),
        {},
    ),
    "gru bidirectional 2 layers, every step": lambda: (
        Recurrent(nn.GRU(3, 3, 2, batch_first=True, bidirectional=True), "all"),
        torch.randn(3, 4, 3),
        {},
    ),
    "rnn final hidden state": lambda: (
        Recurrent(nn.RNN(3, 4, 2, batch_first=True), "hidden"),
        torch.randn(3, 4, 3),
        {},
    ),
    "lstm batch_first=False, transposed inside": lambda: (
        SequenceFirstInside(),
        torch.randn(3, 4, 3),
        {},
    ),
    "transformer encoder": lambda: (Encoder(), torch.randn(3, 4, 8), {}),
    "transformer encoder norm_first": lambda: (
        Encoder(norm_first=True),
        torch.randn(3, 4, 8),
        {},
    ),
    "padded tokens, nested tensor": lambda: (
        PaddedTokens(),
        _tokens(),
        {"wrt": "embed"},
    ),
    "causal attention, mask buffer": lambda: (
        CausalAttention(),
        torch.randn(3, 5, 6),
        {},
    ),
    "tied language model": lambda: (TiedLM(), _tokens(), {"wrt": "embed"}),
    "tied language model, encoder output": lambda: (
        TiedLM(),
        _tokens(),
        {"wrt": "embed", "output": "enc"},
    ),
    "group norm": lambda: (
        _conv(nn.GroupNorm(2, 4), nn.SiLU(), flat=144),
        torch.randn(_IMAGE),
        {},
    ),
    "group norm, channels last": lambda: (
        _conv(nn.GroupNorm(2, 4), nn.SiLU(), flat=144).to(memory_format=_CL),
        torch.randn(_IMAGE).contiguous(memory_format=_CL),
        {},
    ),
    "instance norm 2d": lambda: (
        _conv(nn.InstanceNorm2d(4, affine=True), nn.Tanh(), flat=144),
        torch.randn(_IMAGE),
        {},
    ),
    "instance norm 2d, running statistics": lambda: (
        _conv(
            nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
            nn.Tanh(),
            flat=144,
        ),
        torch.randn(_IMAGE),
        {},
    ),
    "instance norm 1d, running statistics": lambda: (
        nn.Sequential(
            nn.Conv1d(3, 4, 3),
            nn.InstanceNorm1d(4, track_running_stats=True),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(20, 2),
        ),
        torch.randn(3, 3, 7),
        {},
    ),
    "layer norm over (C, H, W)": lambda: (
        _conv(nn.LayerNorm([4, 6, 6]), nn.GELU(), flat=144),
        torch.randn(_IMAGE),
        {},
    ),
    "layer norm over two dims": lambda: (
        nn.Sequential(
            nn.Linear(4, 4),
            nn.LayerNorm([3, 4]),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(12, 2),
        ),
        torch.randn(3, 3, 4),
        {},
    ),
    "transposed conv": lambda: (
        nn.Sequential(
            nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 12 * 12, 2),
        ),
        torch.randn(_IMAGE),
        {},
    ),
    "upsample and adaptive pool": lambda: (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(3),
            nn.Flatten(),
            nn.Linear(36, 3),
        ),
        torch.randn(_IMAGE),
        {},
    ),
    "grouped and depthwise conv": lambda: (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, groups=2),
            nn.ELU(),
            nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
            nn.Conv2d(4, 4, 1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        torch.randn(_IMAGE),
        {},
    ),
    "channel dropout": lambda: (
        _conv(nn.Dropout2d(0.3), nn.Tanh(), flat=144),
        torch.randn(_IMAGE),
        {},
    ),
    "conv output, no head": lambda: (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1)
        ),
        torch.randn(_IMAGE),
        {},
    ),
    "nested dict and tuple output": lambda: (
        NestedOut(),
        torch.randn(4, 5),
        {"output": _PICK},
    ),
    "tied linear layers": lambda: (TiedLinear(), torch.randn(4, 5), {}),
}


def _case(name: str) -> tuple[nn.Module, torch.Tensor, dict[str, Any]]:
    torch.manual_seed(0)
    model, x, kwargs = ZOO[name]()
    x = x.double() if x.is_floating_point() else x  # keeps channels last
    return model.double().eval(), x, kwargs


def _reference(
    model: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    output, wrt = kwargs.get("output"), kwargs.get("wrt")
    if isinstance(output, str):  # a submodule's output
        sub, seen = model.get_submodule(output), []
        select = lambda _out: seen.pop()  # noqa: E731
        handle = sub.register_forward_hook(lambda _m, _a, r: seen.append(r))
    else:
        select, handle = output, None
    try:
        if wrt is not None:
            return inner_sq_norms(model, x, wrt, select)
        return per_sample_sq_norms(model, x, select)
    finally:
        if handle is not None:
            handle.remove()


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "modes": [m.training for m in model.modules()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [
            None if p.grad is None else p.grad.clone() for p in model.parameters()
        ],
        "rng": torch.get_rng_state(),
    }


def _assert_as_found(
    model: nn.Module, before: dict[str, Any], rng: bool = True
) -> None:
    after = _state(model)
    assert after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    for name, b in before["buffers"].items():
        assert torch.equal(after["buffers"][name], b), name
    for g, h in zip(before["grads"], after["grads"], strict=True):
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h))
    if rng:
        assert torch.equal(after["rng"], before["rng"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- measuring ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ZOO))
def test_every_method_measures_the_reference(name):
    """Exact against the float64 brute force; jvp and finite differences on the
    same probes against each other (the same function: the padded encoder's
    fast path made finite differences 0.68 times jvp's value); the probe
    methods near the reference; auto picks exact; nothing moved."""
    model, x, kwargs = _case(name)
    want = _reference(model, x, kwargs)
    before = _state(model)
    torch.testing.assert_close(
        gcx.jacobian_sq_norms(model, x, **kwargs), want, rtol=1e-9, atol=1e-12
    )
    jvp, fd = jvp_and_finite_difference(model, x, **kwargs)
    torch.testing.assert_close(fd, jvp, rtol=1e-5, atol=1e-9)
    for method in ("projection", "jvp"):
        g = torch.Generator().manual_seed(0)
        est = gcx.jacobian_sq_norms(
            model, x, method=method, num_probes=64, generator=g, **kwargs
        )
        assert abs(est.mean() / want.mean() - 1) < 0.35, method
    # seeded: on 3 samples auto's two-probe pilot can read no probe noise
    # (Rademacher differences that all vanish) and pick too few probes, an
    # error past 10% for some states of the global RNG (a known limit of auto
    # on data shorter than its pilot)
    g = torch.Generator().manual_seed(0)
    result = gcx.measure(model, x, progress=False, generator=g, **kwargs)
    rel = 1e-9 if result.method == "exact" else 0.1  # k > 32: maybe projection
    assert result.value == pytest.approx(want.mean().item(), rel=rel)
    _assert_as_found(model, before)


TRAIN = [
    "lstm last step",
    "gru bidirectional 2 layers, every step",
    "transformer encoder",
    "causal attention, mask buffer",
    "group norm",
    "instance norm 2d, running statistics",
    "channel dropout",
]


@pytest.mark.parametrize("name", TRAIN)
def test_train_mode_measures_the_diagonal_blocks(name):
    """In train mode (one dropout mask: the global RNG seeded alike for both)
    exact is the reference's diagonal blocks; running statistics, RNG and
    modes come back."""
    model, x, kwargs = _case(name)
    if name.startswith("gru"):
        model.rnn.dropout = 0.3  # between its two layers
    if name == "transformer encoder":
        model = Encoder(dropout=0.2).double()
    model.train()
    torch.manual_seed(7)
    want = diagonal_block_sq_norms(model, x)
    torch.manual_seed(7)
    before = _state(model)
    got = gcx.jacobian_sq_norms(model, x, mode="train", **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    _assert_as_found(model, before)
    g = torch.Generator().manual_seed(0)
    for method in ("projection", "jvp", "finite_difference"):
        est = gcx.jacobian_sq_norms(
            model, x, mode="train", method=method, num_probes=8, generator=g
        )
        assert torch.isfinite(est).all(), method
        _assert_as_found(model, before)


# -- regularizing -------------------------------------------------------------------


def _run(
    model: nn.Module,
    x: torch.Tensor,
    wrt: str | None = None,
    e: torch.Tensor | None = None,
    output: Any = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``model(x)`` with submodule ``wrt``'s output replaced by ``e`` (if given):
    that submodule's own output, and what is differentiated."""
    seen: list[torch.Tensor] = []
    picked: list[torch.Tensor] = []
    handles = []
    if wrt is not None:

        def swap(_m: nn.Module, _a: Any, r: torch.Tensor) -> torch.Tensor | None:
            seen.append(r)
            return e

        handles.append(model.get_submodule(wrt).register_forward_hook(swap))
    if isinstance(output, str):
        sub = model.get_submodule(output)
        handles.append(sub.register_forward_hook(lambda _m, _a, r: picked.append(r)))
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if picked:
        out = picked[0]
    elif output is not None:
        out = output(out)
    return (seen[0] if seen else None), out


def _reference_penalty(
    model: nn.Module,
    x: torch.Tensor,
    kwargs: dict[str, Any],
    params: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact GC of the batch by full Jacobians kept in the graph, and its
    gradient in ``params`` (through the embedding's output too, for wrt=)."""
    wrt, output = kwargs.get("wrt"), kwargs.get("output")
    total = torch.zeros((), dtype=torch.float64)
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        if wrt is None:
            at = xi.reshape(-1)

            def f(z: torch.Tensor, xi: torch.Tensor = xi) -> torch.Tensor:
                return _run(model, z.reshape(xi.shape), output=output)[1].reshape(-1)

        else:
            e, _ = _run(model, xi, wrt)  # in the graph of the embedding's weight
            at = e.reshape(-1)

            def f(z: torch.Tensor, xi: torch.Tensor = xi, e: Any = e) -> torch.Tensor:
                swapped = z.reshape(e.shape)
                return _run(model, xi, wrt, swapped, output)[1].reshape(-1)

        J = torch.autograd.functional.jacobian(f, at, create_graph=True)
        total = total + J.pow(2).sum()
    value = total / x.shape[0]
    return value.detach(), _grads(value, params)


def _grads(value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(params, grads, strict=True)
        ]
    )


@pytest.mark.parametrize("name", list(ZOO))
def test_penalties(name):
    """The exact GC penalty (reusing the task's outputs where it can) and the
    gradient-norm penalty against brute force; the projection and jvp penalties
    (subsampled too) and the spectral one run and give finite gradients; the
    terms leave modes, buffers and requires_grad as they were."""
    model, x, kwargs = _case(name)
    params = [p for p in model.parameters() if p.requires_grad]
    with differentiable_attention():
        want, want_grad = _reference_penalty(model, x, kwargs, params)
    before = _state(model)
    exact = GeometricComplexity(1.0, method="exact", **kwargs)
    if "wrt" in kwargs:
        value = exact(model, x)
    else:
        xg = x.detach().requires_grad_(True)
        with differentiable_attention():  # the task's pass, differentiated twice
            out = model(xg)
        value = exact(model, xg, outputs=out)
    assert value.item() == pytest.approx(want.item(), rel=1e-9)
    assert _rel(_grads(value, params), want_grad) < 1e-8
    for method in ("projection", "jvp"):
        for subsample in (1.0, 0.5):
            term = GeometricComplexity(
                1.0,
                method=method,
                subsample=subsample,
                num_probes=2,
                generator=torch.Generator().manual_seed(1),
                **kwargs,
            )
            value = term(model, x)
            assert torch.isfinite(value) and torch.isfinite(_grads(value, params)).all()
    _assert_as_found(model, before)

    out = model(x)  # with grad: no fast path (a nested tensor warns)
    pick = kwargs.get("output") if callable(kwargs.get("output")) else None
    # the output's dtype: torch 2.11's mse_loss backward (create_graph) fails on a
    # float32 target for a float64 output ("Found dtype Float but expected Double")
    target = torch.randn((pick(out) if pick else out).shape, dtype=torch.float64)

    def loss_fn(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pick(o) if pick else o, t)

    with differentiable_attention():
        task = torch.autograd.grad(loss_fn(model(x), target), params, create_graph=True)
        want = sum(g.pow(2).sum() for g in task)
        want_grad = _grads(want, params)
    for method, rtol in (("double_backprop", 1e-9), ("finite_difference", 1e-2)):
        value = GradientNorm(1.0, method=method, eps=1e-4)(
            model, x, target, loss_fn=loss_fn
        )
        assert value.item() == pytest.approx(want.item(), rel=1e-9)
        assert _rel(_grads(value, params), want_grad) < rtol, method
    with warnings.catch_warnings():  # transposed convolutions and attention's
        warnings.simplefilter("ignore")  # projections are left out, and say so
        value = SpectralNorm(1.0)(model, x)
    assert torch.isfinite(value) and torch.isfinite(_grads(value, params)).all()
    _assert_as_found(model, before, rng=False)


# -- what the zoo found -------------------------------------------------------------


def test_frozen_transformer_jvp_and_finite_differences():
    """A frozen model (nothing requires grad) in eval mode: attention took its
    fused fast path in the jvp passes, which has no forward-mode derivative
    (NotImplementedError), and in the finite differences' no-grad passes."""
    model, x, _ = _case("transformer encoder")
    model.requires_grad_(False)
    want = per_sample_sq_norms(model, x)
    jvp, fd = jvp_and_finite_difference(model, x)
    torch.testing.assert_close(fd, jvp, rtol=1e-5, atol=1e-9)
    g = torch.Generator().manual_seed(0)
    est = gcx.jacobian_sq_norms(model, x, method="jvp", num_probes=64, generator=g)
    assert abs(est.mean() / want.mean() - 1) < 0.35
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on
    tokens = PaddedTokens().double().eval().requires_grad_(False)
    t = _tokens()
    jvp, fd = jvp_and_finite_difference(tokens, t, wrt="embed")
    torch.testing.assert_close(fd, jvp, rtol=1e-5, atol=1e-9)


def test_channels_last_group_norm_jvp_penalty_gradient():
    """PyTorch's forward-mode derivative of group_norm fails on channels-last
    tensors ("view size is not compatible"): the jvp penalty's gradient
    through it, against central differences."""
    model, x, _ = _case("group norm, channels last")
    assert x.is_contiguous(memory_format=_CL)

    def penalty() -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return GeometricComplexity(1.0, method="jvp", num_probes=2, generator=g)(
            model, x
        )

    # the conv's bias (its weight is channels last too) and the norm's weight
    for param in (model[0].bias, model[1].weight):
        assert_central_differences(penalty, param, range(param.numel()))
    assert F.group_norm.__module__ == "torch.nn.functional"  # put back


class TimeFirst(nn.Module):
    """A sequence layer left at batch_first=False, given what it is given."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "attention":
            self.layer = nn.MultiheadAttention(4, 2)
        elif kind == "transformer":
            self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)
        else:
            self.layer = getattr(nn, kind)(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, nn.MultiheadAttention):
            out, _ = self.layer(x, x, x)
        elif isinstance(self.layer, nn.RNNBase):
            out, _ = self.layer(x)
        else:
            out = self.layer(x)
        return self.head(out)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "attention", "transformer"])
def test_a_sequence_run_along_the_batch_is_refused(kind):
    """x sequence-first, (T, B, F), into a batch_first=False layer: the
    measurement took dim 0, the time steps, for samples, and returned one
    wrong number per step (the LSTM's mean 3% off, attention's twice the
    right one). Refused by every path that runs the model; batch-first
    data given to the same layer is the coupling the README names, measured
    with coupled=True as each sample's diagonal block."""
    torch.manual_seed(0)
    model = TimeFirst(kind).double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)  # (T, B, F)
    match = r"runs along dim 0 of its input of shape \(5, 3, 4\).*coupled=True"
    for method in ("exact", "projection", "jvp", "finite_difference"):
        with pytest.raises(ValueError, match=match):
            gcx.jacobian_sq_norms(model, x, method=method)
    with pytest.raises(ValueError, match=match):
        gcx.measure(model, x, progress=False)
    with pytest.raises(ValueError, match=match):
        GeometricComplexity(1.0, method="jvp")(model, x)
    # coupled=True: the samples as given interact, and each one's diagonal
    # block is measured
    got = gcx.jacobian_sq_norms(model, x, coupled=True)
    torch.testing.assert_close(
        got, diagonal_block_sq_norms(model, x), rtol=1e-9, atol=0
    )
    # batch-first into a model that transposes for the layer: accepted, right
    wrapped = _Transposed(model)
    xb = x.transpose(0, 1)
    torch.testing.assert_close(
        gcx.jacobian_sq_norms(wrapped, xb),
        per_sample_sq_norms(wrapped, xb),
        rtol=1e-9,
        atol=0,
    )


class _Transposed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


def test_instance_norm_running_statistics_are_counted_once():
    """In train mode InstanceNorm normalises by each sample and writes its
    running statistics: the penalties' own passes wrote them again (the batch
    counted twice, once more per jvp probe), and the finite-difference
    gradient norm refused the model for it."""
    model, x, _ = _case("instance norm 2d, running statistics")
    model.train()
    y = torch.randint(0, 3, (x.shape[0],))
    out = model(x)  # the task's pass: the one update
    stats = {n: b.clone() for n, b in model.named_buffers()}
    terms = [
        GeometricComplexity(1.0, method="jvp"),
        GeometricComplexity(1.0, subsample=0.5),
        GradientNorm(1.0),
        GradientNorm(1.0, method="finite_difference"),
    ]
    for term in terms:
        value = term(model, x, y)
        assert torch.isfinite(value)
        value.backward()
        for n, b in model.named_buffers():
            assert torch.equal(b, stats[n]), (term, n)
    GradientNorm(1.0, method="finite_difference").backward(
        F.cross_entropy(out, y), model, x, y, outputs=out
    )
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n


def test_a_model_of_several_inputs_is_told_how():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return self.a(pair[0]) + self.b(pair[1])

    x = (torch.randn(3, 4), torch.randn(3, 2))
    with pytest.raises(TypeError, match="takes one tensor"):
        gcx.jacobian_sq_norms(Pair(), x)


def test_a_sequence_layer_over_windows_of_each_sample_is_measured():
    """Attention and an LSTM along the rows of each sample, (B·H, W, C), with
    rows as long as the batch (W = B = 4): the samples are apart, but the
    sequence check read the length of 4 as the batch and refused the model,
    which every method measures right."""

    class Rows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
            self.lstm = nn.LSTM(4, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, H, W, C = x.shape
            rows = x.reshape(B * H, W, C)
            out, _ = self.att(rows, rows, rows)
            out, _ = self.lstm(out)
            return self.head(out.reshape(B, H * W, C).mean(1))

    torch.manual_seed(0)
    model = Rows().double().eval()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    want = per_sample_sq_norms(model, x)
    torch.testing.assert_close(gcx.jacobian_sq_norms(model, x), want, rtol=1e-9, atol=0)
    assert math.isclose(
        gcx.measure(model, x, progress=False).value, want.mean().item(), rel_tol=1e-9
    )
    GeometricComplexity(1.0, method="jvp")(model, x)  # its own passes too
