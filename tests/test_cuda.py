"""The same numbers on a CUDA device as on the CPU (skipped without CUDA).

CI has no GPU, so these run only where torch sees one: a session lent a GPU
machine runs them through ``benchmarks/gpu_check.sh``. Each compares a CUDA
computation in float64 with the CPU's, or checks a CUDA-only concern (the CUDA
RNG state, autocast on CUDA, device-side generators).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_central_differences, make_case
from torch import nn

import geocomplexity as gcx
from geocomplexity.models import mlp
from geocomplexity.regularizers import (
    L2,
    GeometricComplexity,
    GradientNorm,
    SpectralNorm,
)
from geocomplexity.training import fit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"
)

CUDA = torch.device("cuda")


def both(name: str) -> tuple[nn.Module, torch.Tensor, nn.Module, torch.Tensor]:
    """A float64 case on the CPU and a copy of it on the GPU."""
    model, x = make_case(name)
    model, x = model.double(), x.double()
    return model, x, copy.deepcopy(model).to(CUDA), x.to(CUDA)


@pytest.mark.parametrize(
    "name", ["mlp", "cnn", "residual", "layernorm_gelu", "batchnorm", "wide_output"]
)
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_exact_matches_the_cpu(name, chunk_size):
    cpu, x, gpu, xg = both(name)
    want = gcx.jacobian_sq_norms(cpu, x, chunk_size=chunk_size)
    got = gcx.jacobian_sq_norms(gpu, xg, chunk_size=chunk_size)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("method", ["projection", "jvp"])
def test_estimators_reproduce_with_a_cuda_generator_and_converge(method):
    _, _, gpu, xg = both("mlp")

    def draw(seed: int, probes: int) -> torch.Tensor:
        g = torch.Generator(device=CUDA).manual_seed(seed)
        return gcx.jacobian_sq_norms(
            gpu, xg, method=method, num_probes=probes, generator=g
        )

    assert torch.equal(draw(3, 4), draw(3, 4))
    exact = gcx.jacobian_sq_norms(gpu, xg)
    torch.testing.assert_close(draw(0, 4096), exact, rtol=0.1, atol=0)


def test_measuring_leaves_the_cuda_rng_and_buffers_alone():
    _, _, gpu, xg = both("batchnorm")
    buffers = {k: v.clone() for k, v in gpu.state_dict().items()}
    rng = torch.cuda.get_rng_state()
    gcx.jacobian_sq_norms(gpu, xg, mode="train")  # dropout draws on the GPU
    gcx.measure(gpu, xg, method="projection", generator=torch.Generator(CUDA))
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    for k, v in gpu.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    assert gpu.training  # left in the mode it was found in


def test_measure_moves_cpu_batches_to_the_model():
    cpu, x, gpu, _ = both("cnn")
    data = torch.utils.data.TensorDataset(x, torch.zeros(len(x)))
    got = gcx.measure(gpu, data, method="exact", batch_size=2)
    want = gcx.measure(cpu, data, method="exact", batch_size=2)
    assert abs(got.value / want.value - 1) < 1e-10


def conv_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3, padding=1, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(27, 5),
    ).double()
    return (
        model,
        torch.randn(6, 2, 6, 6, dtype=torch.float64),
        torch.randint(0, 5, (6,)),
    )


TERMS = {
    "gc_exact": lambda: GeometricComplexity(0.3, method="exact"),
    "gc_jvp": lambda: GeometricComplexity(
        0.3, method="jvp", generator=torch.Generator(CUDA).manual_seed(0)
    ),
    "l2": lambda: L2(0.3),
    "spectral": lambda: SpectralNorm(0.3, power_iterations=3),
    "spectral_reshaped": lambda: SpectralNorm(0.3, conv="reshaped"),
    "gradient_norm": lambda: GradientNorm(0.3),
    "gradient_norm_fd": lambda: GradientNorm(0.3, method="finite_difference"),
}


@pytest.mark.parametrize("kind", list(TERMS))
def test_training_step_gradients_match_the_cpu(kind):
    """A fused training step on the GPU gives the CPU's gradients and value.

    Terms whose randomness is drawn on the device (``gc_jvp``) are compared
    with the same term on the GPU through autograd instead.
    """
    model, x, y = conv_net()
    devices = [CUDA, CUDA] if kind == "gc_jvp" else ["cpu", CUDA]
    results = []
    for i, device in enumerate(devices):
        m = copy.deepcopy(model).to(device)
        xb, yb = x.to(device).requires_grad_(True), y.to(device)
        term = TERMS[kind]()
        out = m(xb)
        loss = F.cross_entropy(out, yb)
        if i == 0 and kind == "gc_jvp":
            value = term(m, xb, yb, outputs=out)
            (loss + value).backward(inputs=list(m.parameters()))
            value = value.detach()
        else:
            value = term.backward(loss, m, xb, yb, outputs=out)
        grads = torch.cat([p.grad.flatten() for p in m.parameters()])
        results.append((value.cpu(), grads.cpu()))
    (v1, g1), (v2, g2) = results
    torch.testing.assert_close(v2, v1, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(g2, g1, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_spectral_under_cuda_autocast_then_without(dtype):
    model, x, y = conv_net()
    model, x, y = model.float().to(CUDA), x.float().to(CUDA), y.to(CUDA)
    term = SpectralNorm(0.3)
    with torch.autocast("cuda", dtype=dtype):
        loss = F.cross_entropy(model(x).float(), y)
        term.backward(loss, model, x)
    vectors = term.state_dict()["vectors"].values()
    assert all(t.dtype == torch.float32 for uv in vectors for t in uv)
    value = term.backward(F.cross_entropy(model(x), y), model, x)
    assert torch.isfinite(value)


def test_fit_on_cuda_is_reproducible_and_lowers_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, 0] > 0).long()

    def run():
        model = mlp(10, [32], 2, seed=0)
        history = fit(
            model,
            (x, y),
            (x, y),
            optimizer="adam",
            lr=1e-2,
            batch_size=64,
            epochs=4,
            seed=3,
            regularizer=GeometricComplexity(1e-3) + SpectralNorm(1e-3),
            track_gc_every=2,
            device="cuda",
            progress=False,
        )
        assert next(model.parameters()).device.type == "cuda"
        return [{k: r[k] for k in r if k != "wall_time"} for r in history.records]

    first, second = run(), run()
    assert str(first) == str(second)  # str: the first epoch's penalty is NaN
    assert first[-1]["train_loss"] < first[0]["train_loss"]


def test_rademacher_signs_on_a_cuda_generator_are_fair_and_seeded():
    from geocomplexity.probes import draw_probes

    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator(device=CUDA).manual_seed(seed)
        return draw_probes(
            "rademacher", (4096, 8), dtype=torch.float64, device=CUDA, generator=g
        )

    v = draw(0)
    assert v.device.type == "cuda" and v.abs().eq(1).all()
    assert torch.equal(v, draw(0)) and not torch.equal(v, draw(1))
    assert v.mean(0).abs().max() < 5 / 4096**0.5  # each bit position fair
    # a CPU generator with a CUDA result: drawn there, then moved
    g = torch.Generator().manual_seed(0)
    w = draw_probes("rademacher", (7, 3), dtype=torch.float32, device=CUDA, generator=g)
    assert w.device.type == "cuda" and w.abs().eq(1).all()


def test_wrt_an_embedding_matches_the_cpu():
    torch.manual_seed(0)
    cpu = nn.Sequential(
        nn.Embedding(30, 4), nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()
    gpu = copy.deepcopy(cpu).to(CUDA)
    tokens = torch.randint(0, 30, (16, 3))
    for method in ("exact", "projection", "jvp"):
        kw = {"method": method, "wrt": "0"}
        if method != "exact":
            kw["generator"] = torch.Generator(device=CUDA).manual_seed(0)
            kw["num_probes"] = 512
        got = gcx.jacobian_sq_norms(gpu, tokens.to(CUDA), **kw)
        want = gcx.jacobian_sq_norms(cpu, tokens, wrt="0")
        tol = 1e-10 if method == "exact" else 0.3
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=0)
    penalty = GeometricComplexity(1.0, wrt="0")(gpu, tokens.to(CUDA))
    penalty.backward()
    assert gpu[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("wrt", [None, "1"])
def test_train_mode_passes_replay_the_cuda_rng(wrt):
    # dropout on the GPU draws from the CUDA generator: the passes of a
    # coupled jvp and finite difference must replay it, so both use one mask
    # and agree along the same probes (a CUDA generator for those, and the
    # global one, which they must not disturb)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.Tanh(),
        nn.Dropout(0.5), nn.Linear(16, 3),
    ).double().to(CUDA)  # fmt: skip
    x = torch.randn(8, 5, dtype=torch.float64, device=CUDA)
    for source in ("own", "global"):
        values = []
        for method in ("jvp", "finite_difference"):
            gen = torch.Generator(device=CUDA).manual_seed(1)
            if source == "global":
                torch.cuda.manual_seed(1)
                gen = torch.cuda.default_generators[0]
            values.append(
                gcx.jacobian_sq_norms(
                    model,
                    x,
                    method=method,
                    mode="train",
                    wrt=wrt,
                    num_probes=3,
                    generator=gen,
                )
            )
        assert torch.allclose(values[0], values[1], rtol=1e-5), source


def test_train_mode_projection_and_the_composite_jvp_penalty_on_cuda():
    # sign-paired VJPs on independent samples are the plain estimate exactly;
    # the jvp penalty through train-mode BatchNorm and LayerNorm (composite
    # ops) has the gradient central differences give
    mlp_model, x = make_case("mlp")
    mlp_model, x = mlp_model.double().to(CUDA), x.double().to(CUDA)
    seeded = lambda: torch.Generator(device=CUDA).manual_seed(4)  # noqa: E731
    kw = dict(method="projection", num_probes=3)
    paired = gcx.jacobian_sq_norms(mlp_model, x, mode="train", generator=seeded(), **kw)
    plain = gcx.jacobian_sq_norms(mlp_model, x, generator=seeded(), **kw)
    assert torch.allclose(paired, plain, rtol=1e-12)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8),
        nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3),
    ).double().to(CUDA).train()  # fmt: skip
    xb = torch.randn(6, 5, dtype=torch.float64, device=CUDA)
    stats = {n: b.clone() for n, b in model.named_buffers()}

    def penalty() -> torch.Tensor:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(stats[n])
        term = GeometricComplexity(1.0, method="jvp", num_probes=2, generator=seeded())
        return term(model, xb)

    weight = model[0].weight
    assert_central_differences(penalty, weight, range(0, weight.numel(), 7))


def test_initialize_with_a_cpu_generator_gives_cuda_weights_the_cpu_draws():
    # normal_ on CUDA weights refused a CPU generator ("Expected a 'cuda'
    # device type for generator"): the draws are now made on the generator's
    # device and copied, the same weights as on the CPU
    from geocomplexity.models import initialize

    cpu = nn.Linear(5, 7)
    gpu = nn.Linear(5, 7).cuda()
    for m in (cpu, gpu):
        initialize(m, "he", torch.Generator().manual_seed(3))
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=0, atol=0)
