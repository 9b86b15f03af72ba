"""Composite normalisations: same values and buffers, right jvp-penalty gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import geocomplexity as gcx
from geocomplexity.composite_norms import composite_norms
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
    with composite_norms():
        got = module(x)
        got = module(x + 0.5)  # twice: the running statistics move on
    fused(x)
    want = fused(x + 0.5)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for (n, a), b in zip(module.named_buffers(), fused.buffers(), strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-12), n


def test_batch_of_one_in_train_mode_is_refused_as_by_torch():
    with composite_norms(), pytest.raises(ValueError, match="more than 1 value"):
        nn.BatchNorm1d(3).train()(torch.randn(1, 3))


@pytest.mark.parametrize(
    "name", ["layer_norm", "batch_norm_train", "instance_norm", "batch_norm_eval"]
)
def test_jvp_penalty_gradient_matches_central_differences(name):
    """∂/∂θ of the jvp penalty with its probes fixed, against central
    differences: wrong by O(1) through the fused layer, batch (batch
    statistics) and instance norm without the composite forms."""
    norm, x = _norms()[name]
    torch.manual_seed(1)
    d = x.shape[1]
    first = nn.Linear(d, d) if x.dim() == 2 else nn.Conv1d(d, d, 3, padding=1)
    head = (
        nn.Linear(d, 2)
        if x.dim() == 2
        else nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
    )
    model = nn.Sequential(first, norm, nn.Tanh(), head).double()
    model(x)  # materialise the lazy layer
    stats = {n: b.clone() for n, b in model.named_buffers()}

    def penalty() -> torch.Tensor:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(stats[n])
        term = GeometricComplexity(
            1.0, method="jvp", num_probes=2, generator=torch.Generator().manual_seed(3)
        )
        return term(model, x)

    weight = first.weight
    (grad,) = torch.autograd.grad(penalty(), weight)
    h = 1e-6
    flat = weight.detach().view(-1)
    for i in range(0, flat.numel(), max(1, flat.numel() // 6)):
        with torch.no_grad():
            flat[i] += h
        up = penalty().item()
        with torch.no_grad():
            flat[i] -= 2 * h
        down = penalty().item()
        with torch.no_grad():
            flat[i] += h
        fd = (up - down) / (2 * h)
        assert abs(grad.view(-1)[i].item() - fd) < 1e-5 * (1 + abs(fd)), (i, fd)


def test_jvp_measurement_needs_no_composite_forms():
    # first-order forward AD through the fused kernels is right: measuring
    # with jvp (no create_graph) runs them as they are
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2))
    model.double()
    x = torch.randn(5, 4, dtype=torch.float64)
    kw = dict(num_probes=3)
    jvp = gcx.jacobian_sq_norms(
        model, x, method="jvp", generator=torch.Generator().manual_seed(0), **kw
    )
    fd = gcx.jacobian_sq_norms(
        model,
        x,
        method="finite_difference",
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    assert torch.allclose(jvp, fd, rtol=1e-6)
