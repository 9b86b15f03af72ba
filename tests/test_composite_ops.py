"""Composite operations: same values and buffers, right jvp-penalty gradients."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_central_differences, jvp_and_finite_difference
from torch import nn

import geocomplexity as gcx
from geocomplexity.composite_ops import composite_ops
from geocomplexity.regularizers import GeometricComplexity


def _norms() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    layers = {
        "layer_norm": (nn.LayerNorm(6), torch.randn(5, 6)),
        "layer_norm_2d": (nn.LayerNorm((3, 4)), torch.randn(5, 2, 3, 4)),
        "layer_norm_plain": (
            nn.LayerNorm(6, elementwise_affine=False),
            torch.randn(5, 6),
        ),
        "batch_norm_train": (nn.BatchNorm1d(6).train(), torch.randn(5, 6)),
        "batch_norm2d_train": (nn.BatchNorm2d(3).train(), torch.randn(4, 3, 5, 5)),
        "batch_norm_eval": (nn.BatchNorm1d(6).eval(), torch.randn(5, 6)),
        "batch_norm_untracked": (
            nn.BatchNorm1d(6, track_running_stats=False).eval(),
            torch.randn(5, 6),
        ),
        "batch_norm_cumulative": (
            nn.BatchNorm1d(6, momentum=None).train(),
            torch.randn(5, 6),
        ),
        "instance_norm": (nn.InstanceNorm1d(3, affine=True), torch.randn(4, 3, 7)),
        "instance_norm_tracked": (
            nn.InstanceNorm2d(3, affine=True, track_running_stats=True).train(),
            torch.randn(4, 3, 5, 5),
        ),
        "instance_norm_running": (
            nn.InstanceNorm1d(3, track_running_stats=True).eval(),
            torch.randn(4, 3, 7),
        ),
    }
    for module, _ in layers.values():
        module.double()
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
            for name, b in module.named_buffers():
                if name == "running_mean":
                    b.normal_()
                elif name == "running_var":
                    b.uniform_(0.5, 2.0)
    return {k: (m, x.double() * 2 + 1) for k, (m, x) in layers.items()}


NORMS = list(_norms())


@pytest.mark.parametrize("name", NORMS)
def test_same_values_and_running_statistics_as_the_fused_kernels(name):
    module, x = _norms()[name]
    fused = copy.deepcopy(module)
    with composite_ops():
        got = module(x)
        got = module(x + 0.5)  # twice: the running statistics move on
    fused(x)
    want = fused(x + 0.5)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for (n, a), b in zip(module.named_buffers(), fused.buffers(), strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-12), n


def _softmax_family() -> dict[str, object]:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    q, k, v = (torch.randn(2, 3, 4, 8, dtype=torch.float64) for _ in range(3))
    k1, v1 = (torch.randn(2, 1, 6, 8, dtype=torch.float64) for _ in range(2))
    keep = torch.rand(4, 4) > 0.3
    keep[:, 0] = True  # every query sees a key ...
    blind = keep.clone()
    blind[2] = False  # ... but here query 2 sees none: its output is 0
    bias = torch.randn(4, 4, dtype=torch.float64)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    t = torch.randn(2, 5, 8, dtype=torch.float64)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True  # the second sequence is all padding
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc.double()
    return {
        "F.softmax": lambda: F.softmax(x, -1),
        "F.softmax dtype": lambda: F.softmax(x.float(), 1, dtype=torch.float64),
        "torch.softmax": lambda: torch.softmax(x, 1, torch.float64),
        "Tensor.softmax": lambda: x.softmax(0),
        "F.log_softmax": lambda: F.log_softmax(x, -1),
        "torch.log_softmax": lambda: torch.log_softmax(x, 0),
        "Tensor.log_softmax": lambda: x.log_softmax(1),
        "torch.logsumexp": lambda: torch.logsumexp(x, -1),
        "Tensor.logsumexp": lambda: x.logsumexp((1, 2), keepdim=True),
        "logsumexp -inf": lambda: (
            torch.tensor([[-torch.inf] * 3, [0.0, 1, 2]]).double().logsumexp(1)
        ),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa bool mask": lambda: F.scaled_dot_product_attention(q, k, v, keep),
        "sdpa query that sees no key": lambda: F.scaled_dot_product_attention(
            q, k, v, blind
        ),
        "MultiheadAttention padded key": lambda: mha(
            t, t, t, key_padding_mask=pad, need_weights=False
        )[0],
        "sdpa float mask, scale": lambda: F.scaled_dot_product_attention(
            q, k, v, bias, scale=0.3
        ),
        "sdpa grouped": lambda: F.scaled_dot_product_attention(
            q, k1, v1, enable_gqa=True
        ),
        "sdpa grouped, 1 key head, 3 value heads": lambda: (
            F.scaled_dot_product_attention(
                q, k1, v1.expand(2, 3, 6, 8), enable_gqa=True
            )
        ),
        "sdpa with no keys": lambda: F.scaled_dot_product_attention(
            q, k[..., :0, :], v[..., :0, :]
        ),
        "softmax over an empty dim": lambda: x[..., :0].softmax(-1),
        "logsumexp over an empty dim": lambda: x[..., :0].logsumexp(-1),
        "torch.special.softmax": lambda: torch.special.softmax(x, 1),
        "torch.special.log_softmax": lambda: torch.special.log_softmax(x, 0),
        "torch.special.logsumexp": lambda: torch.special.logsumexp(x, (0, 2)),
        "F.softmin": lambda: F.softmin(x, -1),
        "F.gumbel_softmax": lambda: _seeded(lambda: F.gumbel_softmax(x, 0.5)),
        "F.gumbel_softmax hard": lambda: _seeded(
            lambda: F.gumbel_softmax(x, hard=True, dim=1)
        ),
        "torch.logsumexp out=": lambda: torch.logsumexp(
            x, -1, out=torch.empty(3, 4, dtype=torch.float64)
        ),
        "sdpa causal, 4 queries 6 keys": lambda: F.scaled_dot_product_attention(
            q, k1.expand(2, 3, 6, 8), v1.expand(2, 3, 6, 8), is_causal=True
        ),
        "MultiheadAttention": lambda: mha(t, t, t, need_weights=False)[0],
        "MultiheadAttention weights": lambda: mha(t, t, t)[1],
        "TransformerEncoderLayer": lambda: enc(t),
    }


def _seeded(draw: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return draw()


@pytest.mark.parametrize("name", list(_softmax_family()))
def test_softmax_and_attention_give_the_fused_values(name):
    call = _softmax_family()[name]
    want = call()
    with composite_ops():
        got = call()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # the functional names point at torch's own functions again
    assert F.softmax.__module__ == "torch.nn.functional"
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_batch_of_one_in_train_mode_is_refused_as_by_torch():
    with composite_ops(), pytest.raises(ValueError, match="more than 1 value"):
        nn.BatchNorm1d(3).train()(torch.randn(1, 3))


def test_one_spatial_element_is_refused_as_by_torch():
    # instance statistics over one value: torch refuses; the composite gave
    # the bias and a NaN running variance
    norm = nn.InstanceNorm1d(3, track_running_stats=True).train()
    with composite_ops(), pytest.raises(ValueError, match="more than 1 spatial"):
        norm(torch.randn(4, 3, 1))
    assert torch.equal(norm.running_var, torch.ones(3))


@pytest.mark.parametrize(
    "call",
    [
        lambda: F.batch_norm(torch.randn(2, 3), torch.zeros(3), None, training=True),
        lambda: F.batch_norm(torch.randn(2, 3), None, None, training=False),
        lambda: F.batch_norm(torch.randn(2, 3), None, None, training=True, eps=0.0),
        lambda: F.instance_norm(torch.randn(2, 3, 4), None, torch.ones(3)),
        lambda: F.layer_norm(torch.randn(2, 3), (4,)),
        lambda: F.layer_norm(torch.randn(2, 3), (3,), torch.ones(1)),
        lambda: F.layer_norm(torch.randn(2, 3), ()),
    ],
    ids=[
        "running mean without variance",
        "eval without running statistics",
        "eps 0 in training",
        "running variance without mean",
        "normalized_shape not the input's",
        "weight not of normalized_shape",
        "empty normalized_shape",
    ],
)
def test_arguments_torch_refuses_are_refused(call):
    with pytest.raises((ValueError, RuntimeError)) as fused:
        call()
    with (
        composite_ops(),
        pytest.raises(fused.type, match=re.escape(str(fused.value)[:30])),
    ):
        call()


@pytest.mark.parametrize("layer", ["batch_norm", "instance_norm"])
def test_empty_batch_leaves_running_statistics_as_torch_does(layer):
    norm = {
        "batch_norm": nn.BatchNorm1d(3),
        "instance_norm": nn.InstanceNorm1d(3, track_running_stats=True),
    }[layer].train()
    x = torch.randn(0, 3, 5) if layer == "batch_norm" else torch.randn(2, 3, 0)
    with composite_ops():
        assert norm(x).shape == x.shape
    assert torch.equal(norm.running_mean, torch.zeros(3))
    assert torch.equal(norm.running_var, torch.ones(3))


def test_softmax_edge_rows_as_torch():
    inf = float("inf")
    x = torch.tensor([[1.0, inf], [-inf, -inf], [0.0, -inf], [2.0, 1.0]])
    for f in (
        lambda: F.softmax(x, -1),
        lambda: F.log_softmax(x, -1),
        lambda: x.logsumexp(-1),
    ):
        with composite_ops():
            got = f()
        assert torch.allclose(got, f(), equal_nan=True)


class _Attend(nn.Module):
    """Embedding-free attention block on (B, 5, 4) inputs, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def _model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 model through the named operation, its input, a weight."""
    torch.manual_seed(1)
    if name == "attention":
        model = _Attend().double().eval()
        x = torch.randn(3, 5, 4, dtype=torch.float64)
        return model, x, model.enc.self_attn.in_proj_weight  # before the softmax
    if name == "log_softmax":
        first = nn.Linear(4, 5)
        model = nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(-1))
        return model.double(), torch.randn(4, 4, dtype=torch.float64), first.weight
    norm, x = _norms()[name]
    d = x.shape[1]
    first = nn.Linear(d, d) if x.dim() == 2 else nn.Conv1d(d, d, 3, padding=1)
    head = (
        nn.Linear(d, 2)
        if x.dim() == 2
        else nn.Sequential(nn.Flatten(), nn.Linear(d * x.shape[2], 2))
    )
    return nn.Sequential(first, norm, nn.Tanh(), head).double(), x, first.weight


@pytest.mark.parametrize(
    "name",
    [
        "layer_norm",
        "batch_norm_train",
        "instance_norm",
        "batch_norm_eval",
        "log_softmax",
        "attention",
    ],
)
def test_jvp_penalty_gradient_matches_central_differences(name):
    """∂/∂θ of the jvp penalty with its probes fixed, against central
    differences: wrong by O(1) through the fused layer, batch (batch
    statistics) and instance norm, and failing through softmax, without the
    composite forms."""
    model, x, weight = _model(name)
    stats = {n: b.clone() for n, b in model.named_buffers()}

    def penalty() -> torch.Tensor:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(stats[n])
        term = GeometricComplexity(
            1.0, method="jvp", num_probes=2, generator=torch.Generator().manual_seed(3)
        )
        return term(model, x)

    n = weight.numel()
    assert_central_differences(penalty, weight, range(0, n, max(1, n // 6)))


def test_patched_names_come_back_after_an_error():
    from geocomplexity.composite_ops import _functional_patched

    before = F.scaled_dot_product_attention
    with pytest.raises(KeyError), _functional_patched():
        assert F.scaled_dot_product_attention is not before
        raise KeyError
    assert F.scaled_dot_product_attention is before


def test_jvp_measurement_needs_no_composite_forms():
    # first-order forward AD through the fused kernels is right: measuring
    # with jvp (no create_graph) runs them as they are
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2))
    model.double()
    x = torch.randn(5, 4, dtype=torch.float64)
    jvp, fd = jvp_and_finite_difference(model, x)
    assert torch.allclose(jvp, fd, rtol=1e-6)


def _ops() -> dict[str, object]:
    """Common layers and functions, each on (B, C, L) = (3, 4, 6) float64."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 3, batch_first=True).double()
    gru = nn.GRU(4, 3, batch_first=True).double()
    mha = nn.MultiheadAttention(6, 2, batch_first=True).double()
    kernel = torch.randn(2, 4, 3, dtype=torch.float64)
    return {
        "gelu": F.gelu,
        "gelu tanh": lambda h: F.gelu(h, approximate="tanh"),
        "silu": F.silu,
        "elu": F.elu,
        "selu": F.selu,
        "softplus": F.softplus,
        "mish": F.mish,
        "leaky_relu": lambda h: F.leaky_relu(h, 0.1),
        "logsigmoid": F.logsigmoid,
        "hardswish": F.hardswish,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "erf": torch.erf,
        "softmax": lambda h: F.softmax(h, -1),
        "log_softmax": lambda h: h.log_softmax(1),
        "logsumexp": lambda h: h.logsumexp(-1),
        "max_pool1d": lambda h: F.max_pool1d(torch.tanh(h), 2),
        "avg_pool1d": lambda h: F.avg_pool1d(torch.tanh(h), 2),
        "adaptive_avg_pool1d": lambda h: F.adaptive_avg_pool1d(torch.tanh(h), 4),
        "conv1d": lambda h: F.conv1d(torch.tanh(h), kernel, padding=1),
        "interpolate": lambda h: F.interpolate(torch.tanh(h), scale_factor=2),
        "normalize": lambda h: F.normalize(h, dim=1),
        "special.logsumexp": lambda h: torch.special.logsumexp(h, -1),
        "softmin": lambda h: F.softmin(h, 1),
        "gumbel_softmax": lambda h: _seeded(lambda: F.gumbel_softmax(h)),
        "layer_norm": lambda h: F.layer_norm(h, (6,)),
        "torch.layer_norm": lambda h: torch.layer_norm(h, (6,)),
        "group_norm": lambda h: F.group_norm(h, 2),
        "rms_norm": lambda h: F.rms_norm(h, (6,)),
        "batch_norm (batch statistics)": lambda h: F.batch_norm(
            h, None, None, training=True
        ),
        "torch.batch_norm (batch statistics)": lambda h: torch.batch_norm(
            h, None, None, None, None, True, 0.1, 1e-5, False
        ),
        "instance_norm": F.instance_norm,
        "torch.instance_norm": lambda h: torch.instance_norm(
            h, None, None, None, None, True, 0.1, 1e-5, False
        ),
        "lstm": lambda h: lstm(h.transpose(1, 2))[0],
        "gru": lambda h: gru(h.transpose(1, 2))[0],
        "multihead attention": lambda h: mha(h, h, h, need_weights=False)[0],
        "attention": lambda h: F.scaled_dot_product_attention(h, h, h),
        "cumsum": lambda h: torch.tanh(h).cumsum(-1),
        "prod": lambda h: torch.tanh(h).prod(-1),
        "var": lambda h: h.var(-1),
    }


class _Op(nn.Module):
    """``z ↦ f(A z)`` over channels, with the mixing matrix A as the parameter."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = f
        self.mix = nn.Parameter(torch.randn(4, 4, dtype=torch.float64) / 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.f(torch.einsum("cd,bdl->bcl", self.mix, z))


@pytest.mark.parametrize("method", ["jvp", "projection"])
@pytest.mark.parametrize("op", list(_ops()))
def test_penalty_gradients_through_common_ops(op, method):
    """Both penalties' parameter gradients through each op, against central
    differences. It guards the torch a user brings (pyproject allows a range)
    against second-order derivatives that are silently wrong, as the fused
    norms' are for the jvp penalty in torch 2.13."""
    model = _Op(_ops()[op])
    x = torch.randn(
        3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )

    def penalty() -> torch.Tensor:
        term = GeometricComplexity(
            1.0, method=method, generator=torch.Generator().manual_seed(2)
        )
        return term(model, x)

    # entries (0, 0), (1, 2) and (3, 1) of the 4 × 4 mixing matrix
    assert_central_differences(penalty, model.mix, [0, 6, 13])


@pytest.mark.parametrize("layer", ["layer_norm", "batch_norm", "instance_norm"])
def test_half_precision_input_keeps_its_dtype_with_float32_weights(layer):
    # mixed precision: bfloat16 activations, float32 norm weights; the fused
    # kernels return bfloat16, computed in float32
    torch.manual_seed(0)
    norm = {
        "layer_norm": nn.LayerNorm(6),
        "batch_norm": nn.BatchNorm1d(6).train(),
        "instance_norm": nn.InstanceNorm1d(6, affine=True),
    }[layer]
    x = torch.randn(4, 6, 5) if layer == "instance_norm" else torch.randn(4, 6)
    x = x.bfloat16()
    fused = copy.deepcopy(norm)
    with composite_ops():
        got = norm(x)
    want = fused(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=1e-2)
    for a, b in zip(norm.buffers(), fused.buffers(), strict=True):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "attention"])
def test_half_precision_softmax_counts_in_float32(op, dtype):
    # as the fused kernels: counted in float32, rounded once to the dtype
    torch.manual_seed(0)
    x = (torch.randn(6, 37) * 4).to(dtype)
    q, k, v = (torch.randn(2, 2, 9, 16).to(dtype) for _ in range(3))
    call = {
        "softmax": lambda t: F.softmax(t(x), -1),
        "log_softmax": lambda t: F.log_softmax(t(x), -1),
        "attention": lambda t: F.scaled_dot_product_attention(t(q), t(k), t(v)),
    }[op]
    exact = call(lambda t: t.float())
    want = call(lambda t: t)
    with composite_ops():
        got = call(lambda t: t)
    assert got.dtype == want.dtype == dtype
    fused_error = (want.float() - exact).abs().max()
    assert (got.float() - exact).abs().max() <= 1.25 * fused_error


def test_running_statistics_of_a_half_precision_model_round_once():
    # as the fused kernel: (1 - m)·running + m·batch counted in float32,
    # rounded once (three roundings in float16 were an ulp off)
    dtype = torch.float16
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(3).to(dtype).train()
    with torch.no_grad():
        norm.running_mean.normal_()
    fused = copy.deepcopy(norm)
    for seed in range(5):
        x = torch.randn(8, 3, 5, generator=torch.Generator().manual_seed(seed))
        with composite_ops():
            norm(x.to(dtype))
        fused(x.to(dtype))
    for a, b in zip(norm.buffers(), fused.buffers(), strict=True):
        assert torch.equal(a, b)


def test_jvp_penalty_on_attention_with_a_fully_padded_sequence_is_finite():
    # a query that may see no key: the fused kernel gives it 0; 0/0 in a
    # composite softmax would make the penalty NaN
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2] = True

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    x = torch.randn(3, 5, 4, dtype=torch.float64)
    model = Padded()
    for method in ("jvp", "projection"):
        term = GeometricComplexity(1.0, method=method)
        value = term(model, x)
        (grad,) = torch.autograd.grad(value, mha.in_proj_weight)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), method


def test_patching_survives_overlapping_threads():
    # two overlapping blocks (threads): the first in patches, the last out
    # restores; a naive save-and-restore would leave the composites in place
    import threading

    from geocomplexity.composite_ops import _functional_patched

    original = F.scaled_dot_product_attention
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _functional_patched():
            inside.set()
            release.wait(5)

    worker = threading.Thread(target=hold)
    worker.start()
    inside.wait(5)
    with _functional_patched():
        assert F.scaled_dot_product_attention is not original
    assert F.scaled_dot_product_attention is not original  # the worker is inside
    release.set()
    worker.join(5)
    assert F.scaled_dot_product_attention is original


# torch 2.11 on a machine with a GPU: DataParallel's CPU gather warns of its own
@pytest.mark.filterwarnings("ignore:Using -1 to represent CPU tensor:FutureWarning")
def test_jvp_penalty_refuses_data_parallel():
    # its replicas run in threads of their own, which the rerouting does not
    # reach: the fused norms there would give wrong gradients, silently
    model = nn.DataParallel(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        GeometricComplexity(1.0, method="jvp")(model, x)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        gcx.jacobian_sq_norms(model, x, method="jvp", create_graph=True)
    assert torch.isfinite(GeometricComplexity(1.0)(model, x))  # projection


# nn.InstanceNorm without affine warns of the count, and goes on
@pytest.mark.filterwarnings("ignore:input's size at dim=1 does not match:UserWarning")
@pytest.mark.parametrize(
    "layer",
    ["batch_norm", "batch_norm_untracked", "instance_norm", "one_element_weight"],
)
def test_parameters_of_another_channel_count_are_refused_as_by_torch(layer):
    # a one-channel input to a three-channel norm: torch refuses it ("weight
    # should contain 1 elements not 3"); the composite broadcast the
    # per-channel weight over the one channel, returned (4, 3, 5), and
    # wrote that channel's mean into all three running means
    norm, x = {
        "batch_norm": (nn.BatchNorm1d(3), torch.randn(4, 1, 5)),
        "batch_norm_untracked": (
            nn.BatchNorm1d(3, track_running_stats=False),
            torch.randn(4, 1, 5),
        ),
        "instance_norm": (  # nn.InstanceNorm checks the count only if affine
            nn.InstanceNorm1d(3, track_running_stats=True),
            torch.randn(4, 1, 5),
        ),
        "one_element_weight": (nn.BatchNorm1d(1), torch.randn(4, 3)),
    }[layer]
    norm.train()
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    fused = copy.deepcopy(norm)
    with pytest.raises((ValueError, RuntimeError)) as refused:
        fused(x)
    with (
        composite_ops(),
        pytest.raises(refused.type, match=re.escape(str(refused.value))),
    ):
        norm(x)
    for (n, a), b in zip(norm.named_buffers(), fused.buffers(), strict=True):
        assert torch.equal(a, b), n
