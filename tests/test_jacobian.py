"""Per-sample Jacobian norms against brute force, closed forms and estimators."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from conftest import (
    CASES,
    DictOut,
    batchnorm_mlp,
    in_two_threads,
    jvp_and_finite_difference,
    make_case,
)
from reference import diagonal_block_sq_norms, inner_sq_norms, per_sample_sq_norms
from torch import nn

import geocomplexity as gcx


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_exact_matches_brute_force(case, chunk_size):
    model, x = case
    got = gcx.jacobian_sq_norms(model, x, chunk_size=chunk_size)
    assert got.shape == (x.shape[0],)
    assert got.dtype == torch.float64
    assert rel(got, per_sample_sq_norms(model, x)) < 1e-10


def test_exact_forward_mode_path_is_used_and_exact(monkeypatch):
    model, x = make_case("wide_output")  # d = 2 < k = 30
    from geocomplexity import jacobian

    calls = []
    real = jacobian._forward_mode
    monkeypatch.setattr(
        jacobian, "_forward_mode", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    got = gcx.jacobian_sq_norms(model, x)
    assert calls, "the forward-mode path was not taken for d < k"
    assert rel(got, per_sample_sq_norms(model, x)) < 1e-10


def test_affine_closed_form():
    torch.manual_seed(1)
    lin = nn.Linear(11, 5).double()
    x = torch.randn(13, 11, dtype=torch.float64)
    expected = lin.weight.pow(2).sum()
    for method in ("exact", "projection", "jvp", "finite_difference"):
        gc = gcx.geometric_complexity(
            lin,
            x,
            method=method,
            num_probes=4000,
            generator=torch.Generator().manual_seed(0),
        )
        tol = 1e-12 if method == "exact" else 0.03
        assert abs(gc.item() / expected.item() - 1) < tol, method


def test_input_scaling_divides_by_c_squared():
    model, x = make_case("mlp")
    c = 3.5

    class Scaled(nn.Module):  # h(z) = g(z / c): same function of x = z / c
        def __init__(self) -> None:
            super().__init__()
            self.g = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.g(z / c)

    gc = gcx.geometric_complexity(model, x)
    gc_scaled = gcx.geometric_complexity(Scaled(), x * c)
    assert abs(gc_scaled.item() * c**2 / gc.item() - 1) < 1e-12


def test_per_sample_equals_batch(case):
    model, x = case
    batch = gcx.jacobian_sq_norms(model, x)
    alone = torch.cat([gcx.jacobian_sq_norms(model, xi[None]) for xi in x])
    assert rel(batch, alone) < 1e-12


def test_train_mode_takes_diagonal_blocks_not_the_batch_sum():
    model, x = make_case("batchnorm")
    model[3].p = 0.0  # dropout off so the reference is deterministic
    want = diagonal_block_sq_norms(model, x)
    got = gcx.jacobian_sq_norms(model, x, mode="train")
    assert rel(got, want) < 1e-10
    # the batch-sum trick would be wrong here: coupling through the statistics
    xs = x.clone().requires_grad_(True)
    out = model(xs)
    wrong = sum(
        torch.autograd.grad(out[:, j].sum(), xs, retain_graph=True)[0].pow(2).sum(1)
        for j in range(out.shape[1])
    )
    assert rel(wrong, want) > 1e-3
    # and eval mode gives yet another (the running-statistics) function
    assert rel(gcx.jacobian_sq_norms(model, x), want) > 1e-3


def all_at_once_sq_norms(model: nn.Module, x: torch.Tensor, side: str) -> torch.Tensor:
    """What a probe of every sample at once estimates where samples are coupled.

    Output side (the batch-sum projection): Σ_j ‖∂g(x)_j/∂x_i‖²; input side
    (jvp, finite differences): Σ_j ‖∂g(x)_i/∂x_j‖². Buffers are restored.
    """
    B = x.shape[0]
    saved = [b.clone() for b in model.buffers()]
    J = torch.autograd.functional.jacobian(
        lambda z: model(z.reshape(x.shape)).reshape(B, -1), x.reshape(B, -1)
    )  # (B, k, B, d)
    for b, b0 in zip(model.buffers(), saved, strict=True):
        b.copy_(b0)
    return J.pow(2).sum((0, 1, 3) if side == "output" else (1, 2, 3))


@pytest.mark.parametrize("method", ["projection", "jvp", "finite_difference"])
def test_train_mode_probes_are_unbiased_where_probing_all_at_once_is_not(method):
    """Two passes a probe, the second with each sample's probe sign-flipped
    (output side for projection, input side for jvp and finite differences):
    the cross-sample blocks cancel in expectation, per sample, not only on
    average."""
    model, x = make_case("batchnorm")  # 6 samples: strong coupling
    model[3].p = 0.0
    stats = [b.clone() for b in model.buffers()]
    want = diagonal_block_sq_norms(model, x)
    side = "output" if method == "projection" else "input"
    all_at_once = all_at_once_sq_norms(model, x, side)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            gcx.jacobian_sq_norms(
                model, x, method=method, mode="train", num_probes=25, generator=g
            )
            for _ in range(40)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - want).abs() < 4 * se).all(), ((mean - want) / se).tolist()
    # the test has the power to see the bias of probing all at once
    assert ((mean - all_at_once).abs() > 4 * se).any()
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats, strict=True))


def test_train_mode_passes_share_one_dropout_mask():
    # jvp's and the finite difference's two (three) passes draw the same
    # dropout mask: with the same probes the finite difference is the jvp to
    # O(eps); passes with masks of their own would differ at O(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.5),
        nn.Linear(16, 3),
    ).double()  # fmt: skip
    x = torch.randn(8, 5, dtype=torch.float64)
    jvp, fd = jvp_and_finite_difference(model, x, mode="train")
    assert rel(fd, jvp) < 1e-5


@pytest.mark.parametrize("generator", ["own", "global"])
def test_train_mode_wrt_passes_share_one_dropout_mask(generator):
    # the same with the probes entering at a submodule (wrt=), and with the
    # global generator as the probes' source: drawing probes from it between
    # the passes must not move the state the passes replay
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.Tanh(),
        nn.Dropout(0.5), nn.Linear(16, 3),
    ).double()  # fmt: skip
    x = torch.randn(8, 5, dtype=torch.float64)
    values = []
    for method in ("jvp", "finite_difference"):
        gen = torch.Generator().manual_seed(1)
        if generator == "global":
            torch.manual_seed(1)
            gen = torch.default_generator
        values.append(
            gcx.jacobian_sq_norms(
                model,
                x,
                method=method,
                mode="train",
                wrt="1",
                num_probes=3,
                generator=gen,
            )
        )
    assert rel(values[1], values[0]) < 1e-5


@pytest.mark.parametrize("method", ["projection", "jvp", "finite_difference"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_global_generator_draws_fresh_probes_on_every_coupled_call(method, mode):
    # the global generator as the probes' source, where the call restores the
    # global RNG (train mode) or replays it (coupled jvp and finite
    # differences): it still moves past what it seeded, so that successive
    # calls draw new probes (measure's pilot compares two), reproducibly
    # from torch.manual_seed
    model, x = make_case("batchnorm")
    if mode == "eval":  # a BatchNorm without running statistics couples here
        model[1].running_mean = model[1].running_var = None
    kwargs = dict(method=method, mode=mode, generator=torch.default_generator)
    torch.manual_seed(0)
    first = gcx.jacobian_sq_norms(model, x, **kwargs)
    second = gcx.jacobian_sq_norms(model, x, **kwargs)
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(gcx.jacobian_sq_norms(model, x, **kwargs), first)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
def test_train_mode_projection_is_the_plain_one_on_independent_samples(chunk_size):
    # no coupling (no BatchNorm, no dropout): the flipped VJP is t_i times the
    # plain one, so the estimate is the plain ‖Jᵀu‖² for the same probes
    model, x = make_case("mlp")
    kwargs = dict(method="projection", num_probes=3)
    a = gcx.jacobian_sq_norms(
        model,
        x,
        mode="train",
        chunk_size=chunk_size,
        generator=torch.Generator().manual_seed(4),
        **kwargs,
    )
    b = gcx.jacobian_sq_norms(
        model, x, generator=torch.Generator().manual_seed(4), **kwargs
    )
    assert rel(a, b) < 1e-12


def test_output_callable_and_submodule():
    torch.manual_seed(0)
    model = DictOut().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    got = gcx.jacobian_sq_norms(model, x, output=lambda o: o["logits"])
    assert rel(got, per_sample_sq_norms(model, x, lambda o: o["logits"])) < 1e-10
    feats = gcx.jacobian_sq_norms(model, x, output="features")
    assert rel(feats, per_sample_sq_norms(model.features, x)) < 1e-10
    soft = gcx.jacobian_sq_norms(model, x, output=lambda o: o["logits"].softmax(-1))
    want = per_sample_sq_norms(model, x, lambda o: o["logits"].softmax(-1))
    assert rel(soft, want) < 1e-10


def test_output_independent_of_input_gives_zero():
    class Const(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b.expand(x.shape[0], 3) + 0 * x[:, :1]

    x = torch.randn(4, 2, dtype=torch.float64)
    assert gcx.jacobian_sq_norms(Const(), x).abs().max() == 0


@pytest.mark.parametrize("method", ["exact", "projection"])
def test_a_forward_pass_under_no_grad_is_refused_not_read_as_zero(method):
    # a model whose forward runs under torch.no_grad() (a frozen feature
    # extractor, a predict-style wrapper) gives autograd no path from x to
    # the output: exact and projection read GC = 0 ± 0 where it is ‖W‖_F²
    # (jvp and finite differences, which no_grad does not stop, got it)
    class NoGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        @torch.no_grad()
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    class Zeros(nn.Module):  # truly constant: GC 0, no error
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(x.shape[0], 3)

    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no_grad.*method='jvp'"):
        gcx.jacobian_sq_norms(NoGrad().double(), x, method=method)
    with pytest.raises(ValueError, match=r"no_grad"):
        gcx.measure(NoGrad().double(), x, progress=False)
    assert gcx.jacobian_sq_norms(Zeros(), x, method=method).abs().max() == 0


@pytest.mark.parametrize(
    ("method", "distribution"),
    [
        ("projection", "rademacher"),
        ("projection", "gaussian"),
        ("projection", "sphere"),
        ("jvp", "rademacher"),
        ("jvp", "gaussian"),
        ("jvp", "sphere"),
        ("finite_difference", "rademacher"),
        ("finite_difference", "gaussian"),
    ],
)
@pytest.mark.parametrize("name", ["mlp", "multidim"])
def test_estimators_unbiased_by_convergence(method, distribution, name):
    """Mean of many independent draws lies within 3 standard errors of exact."""
    model, x = make_case(name)
    exact = gcx.jacobian_sq_norms(model, x)
    g = torch.Generator().manual_seed(123)
    draws = torch.stack(
        [
            gcx.jacobian_sq_norms(
                model, x, method=method, distribution=distribution, generator=g
            )
            for _ in range(400)
        ]
    )  # (draws, B)
    mean, se = draws.mean(0), draws.std(0) / 400**0.5
    z = (mean - exact) / se
    assert z.abs().max() < 4.0, z  # max over B samples: allow a little more than 3
    assert ((mean - exact).abs() / se).mean() < 1.5
    # the draws really are random, and probes are not shared across samples
    assert (draws.std(0) > 0).all()


def test_rademacher_has_lower_variance_than_gaussian():
    model, x = make_case("mlp")

    def spread(dist: str) -> float:
        g = torch.Generator().manual_seed(0)
        d = torch.stack(
            [
                gcx.jacobian_sq_norms(
                    model, x, method="projection", distribution=dist, generator=g
                )
                for _ in range(300)
            ]
        )
        return d.var(0).mean().item()

    assert spread("rademacher") < spread("gaussian")


def test_generator_makes_estimates_reproducible():
    model, x = make_case("mlp")
    a = gcx.jacobian_sq_norms(
        model, x, method="projection", generator=torch.Generator().manual_seed(5)
    )
    b = gcx.jacobian_sq_norms(
        model, x, method="projection", generator=torch.Generator().manual_seed(5)
    )
    c = gcx.jacobian_sq_norms(
        model, x, method="projection", generator=torch.Generator().manual_seed(6)
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_without_a_generator_draws_differ_and_a_fork_reseeds(monkeypatch):
    """No generator: one private stream per process, never the global RNG; a
    forked child (another pid) seeds its own instead of repeating the parent's."""
    from geocomplexity import probes

    model, x = make_case("mlp")
    rng = torch.get_rng_state()
    a = gcx.jacobian_sq_norms(model, x, method="projection")
    b = gcx.jacobian_sq_norms(model, x, method="projection")
    assert not torch.equal(a, b)  # successive draws of the stream
    assert torch.equal(torch.get_rng_state(), rng)
    parent = probes.resolve_generator(None, x.device)
    assert probes.resolve_generator(None, x.device) is parent
    state = parent.get_state()
    monkeypatch.setattr(probes.os, "getpid", lambda: -1)  # as in a forked child
    child = probes.resolve_generator(None, x.device)
    assert child is not parent
    assert not torch.equal(child.get_state(), state)


def test_without_a_generator_each_thread_draws_from_its_own():
    # one private generator per process: a coupled measurement redraws its
    # probes from a copy of the generator's state, so another thread drawing
    # from the same generator in between made both return the same probes
    # (two jvp measurements gave the identical tensor)
    import threading

    from geocomplexity import probes

    device = torch.device("cpu")
    here = probes.resolve_generator(None, device)
    assert probes.resolve_generator(None, device) is here
    there = []
    thread = threading.Thread(
        target=lambda: there.extend(
            [probes.resolve_generator(None, device) for _ in range(2)]
        )
    )
    thread.start()
    thread.join(10)
    assert there[0] is there[1] and there[0] is not here
    assert not torch.equal(there[0].get_state(), here.get_state())


@pytest.mark.parametrize("method", ["exact", "projection", "jvp"])
def test_create_graph_gives_parameter_gradients(method):
    """The penalty's parameter gradient matches the brute-force one (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    params = list(model.parameters())

    def reference_gc() -> torch.Tensor:
        total = 0
        for xi in x:
            J = torch.autograd.functional.jacobian(
                lambda z: model(z[None])[0], xi, create_graph=True
            )
            total = total + J.pow(2).sum()
        return total / len(x)

    want = torch.autograd.grad(
        reference_gc(), params, allow_unused=True, materialize_grads=True
    )
    if method == "exact":
        gc = gcx.geometric_complexity(model, x, create_graph=True)
        got = torch.autograd.grad(gc, params, allow_unused=True, materialize_grads=True)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    else:  # unbiased gradient: average many draws
        g = torch.Generator().manual_seed(0)
        acc = [torch.zeros_like(p) for p in params]
        n = 600
        for _ in range(n):
            gc = gcx.geometric_complexity(
                model, x, method=method, create_graph=True, generator=g
            )
            for a, b in zip(
                acc,
                torch.autograd.grad(
                    gc, params, allow_unused=True, materialize_grads=True
                ),
                strict=True,
            ):
                a += b / n
        flat = torch.cat([a.flatten() for a in acc])
        ref = torch.cat([b.flatten() for b in want])
        assert rel(flat, ref) < 0.1


def test_gradcheck_exact_penalty():
    torch.manual_seed(0)
    x = torch.randn(3, 3, dtype=torch.float64)
    w0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def gc_of(w: torch.Tensor) -> torch.Tensor:
        class M(nn.Module):
            def forward(self, z: torch.Tensor) -> torch.Tensor:
                return torch.tanh(z @ w.T)

        return gcx.geometric_complexity(M(), x, create_graph=True)

    assert torch.autograd.gradcheck(gc_of, (w0,))


def test_float32_close_to_float64(case):
    model, x = case
    want = gcx.jacobian_sq_norms(model, x)
    got = gcx.jacobian_sq_norms(model.float(), x.float())
    assert rel(got.double(), want) < 1e-4


@pytest.mark.parametrize("name", CASES)
def test_no_side_effects(name):
    model, x = make_case(name)
    x.requires_grad_(False)
    # a mix of states to restore: some .grad set, some None, one frozen parameter
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])
    params[-1].requires_grad_(False)
    model.train()
    if len(list(model.children())) > 1:
        next(iter(model.children())).eval()
    flags = [m.training for m in model.modules()]
    buffers = [b.clone() for b in model.buffers()]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    req = [p.requires_grad for p in params]
    rng = torch.get_rng_state()
    for kwargs in (
        {"method": "exact"},
        {"method": "projection"},
        {"method": "jvp"},
        {"method": "finite_difference"},
        {"method": "exact", "mode": "train"},
        {"method": "projection", "mode": "train", "create_graph": True},
    ):
        gcx.jacobian_sq_norms(model, x, **kwargs)
        assert [m.training for m in model.modules()] == flags, kwargs
        for b, b0 in zip(model.buffers(), buffers, strict=True):
            assert torch.equal(b, b0), kwargs
        for p, g0, r0 in zip(params, grads, req, strict=True):
            assert (p.grad is None) == (g0 is None), kwargs
            assert g0 is None or torch.equal(p.grad, g0), kwargs
            assert p.requires_grad == r0, kwargs
        assert not x.requires_grad and x.grad is None
        assert torch.equal(torch.get_rng_state(), rng), kwargs


class Counted(nn.Module):
    """A linear layer that counts its calls in a buffer, in any mode."""

    def __init__(self, in_place: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.in_place = in_place
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_place:
            self.calls += 1
        else:
            self.calls = self.calls + 1
        return self.lin(x)


@pytest.mark.parametrize("method", ["exact", "projection", "jvp", "finite_difference"])
def test_a_buffer_a_forward_pass_writes_is_put_back(method):
    # a module that writes a buffer in every forward pass (a call counter, an
    # EMA of its inputs, a quantization observer): an eval-mode measurement
    # left it moved by its passes (1, 2, 3 or 5 calls counted); a buffer
    # replaced by a new tensor was not put back in train mode either
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    for in_place in (True, False):
        model = Counted(in_place).double()
        calls = model.calls
        for mode in ("eval", "train"):
            gcx.jacobian_sq_norms(model, x, method=method, mode=mode, num_probes=2)
            assert model.calls is calls and calls.item() == 0, (in_place, mode)
            gcx.measure(model, x, method=method, mode=mode, progress=False)
            assert model.calls is calls and calls.item() == 0, (in_place, mode)


def test_train_mode_passes_start_from_the_buffers_found():
    # spectral normalisation runs a power iteration on its buffers in every
    # train-mode pass, so each pass of jvp or finite differences had a weight
    # of its own: the finite difference took the change of weight between
    # its passes for a derivative (400x the GC), and exact's forward-mode
    # passes (d < k) measured other weights than its reverse-mode pass
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(
        spectral_norm(nn.Linear(3, 16)), nn.Tanh(), nn.Linear(16, 10)
    ).double()  # fmt: skip
    x = torch.randn(6, 3, dtype=torch.float64)
    kwargs = dict(mode="train", coupled=False)
    jvp, fd = jvp_and_finite_difference(model, x, **kwargs)
    assert rel(fd, jvp) < 1e-5
    forward = gcx.jacobian_sq_norms(model, x, **kwargs)  # d = 3 < k = 10
    reverse = gcx.jacobian_sq_norms(model, x, mode="train")  # one pass
    assert rel(forward, reverse) < 1e-12


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_torchscript_model_is_measured_and_left_as_found(mode):
    # its modules keep their buffers in no plain dict, and take no hooks
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)
    ).double()  # fmt: skip
    x = torch.randn(6, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script
        scripted = torch.jit.script(model)
    stats = [b.clone() for b in scripted.buffers()]
    for method in ("exact", "finite_difference"):
        got, want = (
            gcx.jacobian_sq_norms(
                m,
                x,
                method=method,
                mode=mode,
                generator=torch.Generator().manual_seed(0),
            )
            for m in (scripted, model)
        )
        assert rel(got, want) < (1e-12 if method == "exact" else 1e-6)
    assert all(
        torch.equal(a, b) for a, b in zip(scripted.buffers(), stats, strict=True)
    )


class Checkpointed(nn.Module):
    """An MLP whose dropout runs inside activation checkpointing, or not."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.block = nn.Sequential(nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = self.inp(x)
        if self.checkpointed:
            return checkpoint(self.block, h, use_reentrant=False)
        return self.block(h)


@pytest.mark.parametrize("method", ["exact", "projection"])
def test_train_mode_through_activation_checkpointing_with_dropout(method):
    # checkpointing recomputes the block, dropout included, in the backward
    # pass, where batched VJPs cannot draw random numbers: the default chunk
    # failed with vmap's "We do not yet support calling random operations".
    # The call now takes its VJPs one at a time there (the recomputation
    # replays the forward pass's mask), and an explicit chunk_size > 1 is
    # told to use 1
    torch.manual_seed(0)
    model = Checkpointed(True).double()
    plain = Checkpointed(False).double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(6, 5, dtype=torch.float64)
    values = []
    for m in (plain, model):
        torch.manual_seed(1)
        gen = torch.Generator().manual_seed(2)
        values.append(
            gcx.jacobian_sq_norms(m, x, method=method, mode="train", generator=gen)
        )
    assert rel(values[1], values[0]) < 1e-12
    with pytest.raises(ValueError, match="chunk_size=1"):
        gcx.jacobian_sq_norms(model, x, method=method, mode="train", chunk_size=4)


@pytest.mark.parametrize("method", ["exact", "projection"])
def test_penalty_through_activation_checkpointing_with_dropout(method):
    # the GC penalty batches its VJPs by the same default chunk (on a GPU
    # through convolutions too, since the CUDA rule), and failed there with
    # vmap's "We do not yet support calling random operations": it now takes
    # them one at a time, with the same probes, as jacobian_sq_norms does
    from geocomplexity.regularizers import GeometricComplexity

    torch.manual_seed(0)
    model = Checkpointed(True).double().train()
    plain = Checkpointed(False).double().train()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(6, 5, dtype=torch.float64)
    values, grads = [], []
    for m in (plain, model):
        torch.manual_seed(1)
        gen = torch.Generator().manual_seed(2)
        term = GeometricComplexity(1.0, method=method, num_probes=4, generator=gen)
        v = term(m, x)
        values.append(v.detach())
        grads.append(torch.autograd.grad(v, m.inp.weight)[0])
    assert rel(values[1], values[0]) < 1e-12
    assert rel(grads[1], grads[0]) < 1e-12


def test_train_mode_penalty_graph_survives_and_stats_stay():
    """mode='train' with create_graph: the result can be backpropagated (no
    buffer saved in its graph was written to) and running stats do not move."""
    model, x = make_case("batchnorm")
    model[3].p = 0.0
    stats = [b.clone() for b in model.buffers()]
    v = gcx.jacobian_sq_norms(model, x, mode="train", create_graph=True)
    v.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats, strict=True))
    assert model[0].weight.grad is not None


def test_train_mode_writes_back_no_unchanged_buffer_that_holds_a_nan():
    """An unchanged buffer holding a NaN (running statistics after an overflow)
    is not copied back: the write would bump its version and break the task
    loss's graph, where BatchNorm saved it."""
    from geocomplexity.state import preserved

    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_var[0] = math.nan
    x = torch.randn(4, 3, requires_grad=True)
    loss = bn(x).pow(2).sum()
    version = bn.running_var._version
    with preserved(bn, mode="train"):
        bn(x)
    assert bn.running_var._version == version
    loss.backward()
    assert x.grad is not None


def test_batchnorm_without_running_stats_takes_diagonal_blocks_in_eval_mode():
    # track_running_stats=False normalises by the batch in eval mode too
    model = batchnorm_mlp(5, track=False)
    x = torch.randn(6, 5, dtype=torch.float64)
    want = diagonal_block_sq_norms(model, x)
    all_at_once = all_at_once_sq_norms(model, x, "input")  # jvp, uncoupled
    assert rel(all_at_once, want) > 0.2
    probes = {"exact": 1, "projection": 3000, "jvp": 500}  # jvp: 2 passes a probe
    for method, n in probes.items():
        kwargs = {"num_probes": n}
        got = gcx.jacobian_sq_norms(
            model,
            x,
            method=method,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        assert rel(got, want) < (1e-10 if method == "exact" else 0.1), method
    assert not model.training


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_measures_inside_inference_mode_and_no_grad(context):
    # a Lightning validation step runs in inference mode, where enable_grad
    # alone records nothing: every autograd method would read 0
    model, x = make_case("mlp")
    want = per_sample_sq_norms(model, x)
    ctx = torch.inference_mode if context == "inference_mode" else torch.no_grad
    with ctx():
        xi = x.clone()  # an inference tensor under inference_mode
        for method in ("exact", "projection", "jvp"):
            got = gcx.jacobian_sq_norms(
                model,
                xi,
                method=method,
                num_probes=4000,
                generator=torch.Generator().manual_seed(0),
            )
            tol = 1e-10 if method == "exact" else 0.1
            assert rel(got.mean(), want.mean()) < tol, method
        assert gcx.measure(model, xi, progress=False).value > 0


def test_measures_under_anomaly_detection():
    # set_detect_anomaly(True) checks each backward node for NaN with .item(),
    # which has no batching rule: every batched VJP (exact's, projection's)
    # failed with "Batching rule not implemented for aten::item"
    model, x = make_case("mlp")
    want = per_sample_sq_norms(model, x)
    with torch.autograd.set_detect_anomaly(True):
        for method in ("exact", "projection"):
            got = gcx.jacobian_sq_norms(
                model,
                x,
                method=method,
                num_probes=4000,
                chunk_size=8,
                generator=torch.Generator().manual_seed(0),
            )
            tol = 1e-10 if method == "exact" else 0.1
            assert rel(got.mean(), want.mean()) < tol, method
        coupled = gcx.jacobian_sq_norms(model, x, coupled=True, chunk_size=8)
        assert rel(coupled, want) < 1e-10
        assert torch.is_anomaly_check_nan_enabled()  # as the caller set it


def test_jvp_refuses_a_scripted_model_whose_tangents_torchscript_drops():
    # TorchScript drops forward-mode tangents: a scripted MLP's jvp GC read
    # 5e-5 on the first call and 0 on every call after (exact: 0.0045)
    model, x = make_case("mlp")
    scripted = torch.jit.script(model)
    inside = nn.Sequential(torch.jit.script(copy.deepcopy(model)))
    for m in (scripted, inside):
        with pytest.raises(ValueError, match=r"torch.jit.script.*'exact'"):
            gcx.jacobian_sq_norms(m, x, method="jvp")
        exact = gcx.jacobian_sq_norms(m, x, method="exact")
        assert rel(exact, per_sample_sq_norms(model, x)) < 1e-10
    # a traced model keeps its tangents, and is measured
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's
        traced = torch.jit.trace(model, x)
    for _ in range(3):  # past the profiling runs
        got = gcx.jacobian_sq_norms(
            traced, x, method="jvp", generator=torch.Generator().manual_seed(0)
        )
        want = gcx.jacobian_sq_norms(
            model, x, method="jvp", generator=torch.Generator().manual_seed(0)
        )
        assert rel(got, want) < 1e-10


def test_a_model_built_under_inference_mode_is_refused_with_the_fix():
    # its weights are inference tensors, which cannot be saved for backward:
    # PyTorch's error named no fix (and BatchNorm's buffers another one)
    torch.manual_seed(0)
    with torch.inference_mode():
        f64 = torch.float64
        model = nn.Sequential(
            nn.Linear(3, 5, dtype=f64), nn.BatchNorm1d(5, dtype=f64), nn.Tanh()
        ).eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    for method in ("exact", "projection", "jvp"):
        with pytest.raises(RuntimeError, match=r"inference_mode.*deepcopy"):
            gcx.jacobian_sq_norms(model, x, method=method)
    fd = gcx.jacobian_sq_norms(  # no autograd: measured
        model,
        x,
        method="finite_difference",
        num_probes=4000,
        generator=torch.Generator().manual_seed(0),
    )
    model = copy.deepcopy(model)  # the fix the message names
    assert rel(fd.mean(), per_sample_sq_norms(model, x).mean()) < 0.1
    assert rel(gcx.jacobian_sq_norms(model, x), per_sample_sq_norms(model, x)) < 1e-10


def test_jvp_inside_an_open_dual_level_is_refused_with_the_fix():
    import torch.autograd.forward_ad as fwAD

    model, x = make_case("mlp")
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=r"dual_level.*'exact'"):
            gcx.jacobian_sq_norms(model, x, method="jvp")
        exact = gcx.jacobian_sq_norms(model, x)
    assert rel(exact, per_sample_sq_norms(model, x)) < 1e-10


def test_one_unbatched_sample_is_refused_when_input_and_output_sizes_agree():
    # a Linear autoencoder accepts an unbatched (6,) sample and returns (6,),
    # which passes the batch-dimension check; it must not give a number
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6)).double()
    sample = torch.randn(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x\[None\]"):
        gcx.jacobian_sq_norms(model, sample)
    # a genuine batch of scalars still works
    scalar = nn.Sequential(nn.Unflatten(0, (-1, 1)), nn.Linear(1, 4)).double()
    with torch.no_grad():
        scalar[1].weight.copy_(torch.arange(4.0)[:, None])
    got = gcx.jacobian_sq_norms(scalar, sample)
    assert torch.allclose(got, torch.full((6,), 14.0, dtype=torch.float64))


def test_scalar_to_scalar_models_on_a_1d_batch():
    # (B,) -> (B,): a function of one variable, the 1-D case
    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    for model, slope in (
        (nn.Tanh(), 1 - torch.tanh(x) ** 2),
        (_Squeezed(nn.Linear(1, 1).double()), None),
    ):
        got = gcx.jacobian_sq_norms(model, x)
        if slope is None:
            slope = model.net.weight.detach().reshape(()).expand(7)
        assert torch.allclose(got, slope**2, rtol=1e-12), model
        assert gcx.measure(model, x, progress=False).value > 0
    # train-mode BatchNorm batches scalars too; the check leaves no trace
    bn = _Squeezed(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))
    bn = bn.double()
    stats = [b.clone() for b in bn.buffers()]
    state = torch.get_rng_state()
    gcx.jacobian_sq_norms(bn, x, mode="train")
    assert all(torch.equal(a, b) for a, b in zip(bn.buffers(), stats, strict=True))
    assert torch.equal(torch.get_rng_state(), state)


class _Squeezed(nn.Module):
    """``net(x[:, None]).squeeze(-1)``: a (B,) -> (B,) model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, None]).squeeze(-1)


def test_default_chunk_is_bounded_for_many_outputs():
    from geocomplexity.jacobian import _default_chunk

    model = nn.Sequential(nn.Linear(2000, 8), nn.Linear(8, 1000))
    x = torch.zeros(64, 2000)
    assert _default_chunk(model, 10, x, 10) == 10  # few outputs: all batched
    assert _default_chunk(model, 1000, x, 1000) == 32  # at most 32 directions
    big = torch.zeros(4096, 2000)
    assert _default_chunk(model, 1000, big, 1000) == 8  # 2**26 // (4096 * 2000)
    assert _default_chunk(model, 1000, torch.zeros(1 << 20, 100), 1000) == 1


def test_default_chunk_batches_convolutions_on_a_gpu_only():
    # measured on an H200 (benchmarks/gpu_check.sh): a loop of VJPs through
    # convolutions was 2.2x slower than chunks of 10 on the CNN; on the CPU,
    # the loop is the faster
    import types

    from geocomplexity.jacobian import _default_chunk

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    x = torch.zeros(8, 3, 6, 6)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"), shape=x.shape)
    assert _default_chunk(model, 10, x, 10) == 1
    assert _default_chunk(model, 10, on_gpu, 10) == 10
    assert _default_chunk(model, 1, on_gpu, 10) == 1


def _out_of_memory_above(monkeypatch, module, limit: int) -> list[int]:
    """``module.reverse_sq_norms`` raising OutOfMemoryError above ``limit``."""
    real, tried = module.reverse_sq_norms, []

    def fake(*args, chunk_size=1, **kwargs):
        tried.append(chunk_size)
        if chunk_size > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(module, "reverse_sq_norms", fake)
    return tried


def _assert_halved(tried: list[int], limit: int) -> None:
    """The default chunk first, then halves, until one fits under ``limit``."""
    assert tried[0] > limit and tried[-1] <= limit < tried[-2]
    assert all(b == a // 2 for a, b in itertools.pairwise(tried))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_default_chunk_out_of_gpu_memory_starts_over_with_half(monkeypatch, mode):
    import geocomplexity.jacobian as jac

    # more inputs than outputs: the reverse-mode path, whose VJPs are chunked
    model = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 10)
    ).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    want = gcx.jacobian_sq_norms(model, x, mode=mode, chunk_size=1)
    tried = _out_of_memory_above(monkeypatch, jac, 2)
    got = gcx.jacobian_sq_norms(model, x, mode=mode)
    _assert_halved(tried, limit=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # the same probes as a call given the chunk it ended with
    kw = dict(method="projection", num_probes=8, mode=mode)
    tried.clear()
    g = torch.Generator().manual_seed(3)
    got = gcx.jacobian_sq_norms(model, x, generator=g, **kw)
    _assert_halved(tried, limit=2)
    g.manual_seed(3)
    want = gcx.jacobian_sq_norms(model, x, generator=g, chunk_size=tried[-1], **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a chunk the caller chose
        gcx.jacobian_sq_norms(model, x, chunk_size=10)


def test_the_exact_penalty_out_of_gpu_memory_starts_over_with_half(monkeypatch):
    import geocomplexity.regularizers.geometric_complexity as module
    from geocomplexity.regularizers import GeometricComplexity

    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    want = GeometricComplexity(1.0, method="exact")(model, x)
    (want_grad,) = torch.autograd.grad(want, model[0].weight)
    tried = _out_of_memory_above(monkeypatch, module, 3)
    got = GeometricComplexity(1.0, method="exact")(model, x)
    _assert_halved(tried, limit=3)
    (grad,) = torch.autograd.grad(got, model[0].weight)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rademacher_signs_are_fair_independent_coins(dtype):
    # the signs come eight to a random byte, through a table of each byte's
    # bits: every position in the byte must be a fair coin, independent of the
    # others, and all 256 patterns equally likely (a wrong table row, a stuck
    # bit or a skewed byte would show here)
    from geocomplexity.probes import draw_probes

    def draw(shape, seed):
        return draw_probes(
            "rademacher",
            shape,
            dtype=dtype,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(seed),
        )

    groups = 25_600
    v = draw((groups * 8,), 0)
    assert v.dtype == dtype and set(v.float().unique().tolist()) == {-1.0, 1.0}
    bits = v.float().reshape(groups, 8)  # row = one random byte
    assert bits.mean(0).abs().max() < 5 / groups**0.5
    corr = (bits.T @ bits / groups).fill_diagonal_(0)
    assert corr.abs().max() < 5 / groups**0.5
    # the byte each row spells: chi-square over 256 patterns, 255 degrees of
    # freedom (mean 255, sd 22.6): 400 is beyond six standard deviations
    weights = 2 ** torch.arange(8)
    pattern = ((bits > 0).long() * weights).sum(1)
    counts = torch.bincount(pattern, minlength=256).double()
    expected = groups / 256
    assert ((counts - expected) ** 2 / expected).sum() < 400
    # consecutive bytes are independent
    assert (bits[1:] * bits[:-1]).mean(0).abs().max() < 5 / groups**0.5
    assert torch.equal(v, draw((groups * 8,), 0))  # seeded
    assert not torch.equal(v, draw((groups * 8,), 1))
    # any shape and size, a partial byte at the end included
    for shape in [(1,), (7,), (3, 5, 11), (2, 4097)]:
        w = draw(shape, 2)
        assert w.shape == shape and w.abs().eq(1).all()
        assert torch.equal(w.reshape(-1), draw((math.prod(shape),), 2))


def test_sign_table_is_built_on_the_draw_device_and_never_caches_a_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from geocomplexity import probes

    g = torch.Generator().manual_seed(0)
    key = (torch.float16, torch.device("cpu"))
    probes._SIGNS.pop(key, None)
    with FakeTensorMode():  # tracing: the table made here must not be kept
        probes.draw_probes(
            "rademacher", (3, 9), dtype=torch.float16, device="cpu", generator=g
        )
    assert key not in probes._SIGNS
    with torch.device("meta"):  # a default device elsewhere does not leak in
        v = probes.draw_probes(
            "rademacher", (3, 9), dtype=torch.float16, device=None, generator=g
        )
    assert v.device.type == "cpu" and v.abs().eq(1).all()
    assert type(probes._SIGNS[key]) is torch.Tensor


def test_projection_with_many_outputs_is_unbiased():
    # k = 600 outputs, B = 8: 4800 probe entries per draw, 600 random bytes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 600)).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    want = per_sample_sq_norms(model, x)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            gcx.jacobian_sq_norms(model, x, method="projection", generator=g)
            for _ in range(400)
        ]
    )
    se = draws.std(0) / 400**0.5
    assert ((draws.mean(0) - want).abs() < 4 * se).all()


class _Tokens(nn.Module):
    """Token ids (B, T) -> embedding (B, T, 6) -> a smooth head with 3 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 6)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * 6, 16), nn.Tanh(), nn.Linear(16, 3)
        )
        self.unused = nn.Linear(2, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(t))


def _tokens() -> tuple[_Tokens, torch.Tensor]:
    torch.manual_seed(0)
    return _Tokens().double(), torch.randint(0, 50, (9, 4))


def test_wrt_an_embedding_measures_the_head_on_token_ids():
    model, t = _tokens()
    want = per_sample_sq_norms(model.head, model.embed(t).detach())
    got = gcx.jacobian_sq_norms(model, t, wrt="embed")
    assert torch.allclose(got, want, rtol=1e-10, atol=0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            gcx.jacobian_sq_norms(
                model, t, wrt="embed", method="projection", generator=g
            )
            for _ in range(400)
        ]
    )
    se = draws.std(0) / 400**0.5
    assert ((draws.mean(0) - want).abs() < 4 * se).all()
    r = gcx.measure(model, t, wrt="embed", batch_size=4, progress=False)
    assert r.method == "exact" and r.num_samples == 9
    assert math.isclose(r.value, want.mean().item(), rel_tol=1e-10)
    # measuring leaves the embedding as it was
    assert model.embed.weight.grad is None and model.embed.weight.requires_grad
    # a frozen embedding (no graph to it) works the same
    model.embed.weight.requires_grad_(False)
    assert torch.allclose(gcx.jacobian_sq_norms(model, t, wrt="embed"), want)
    assert not model.embed.weight.requires_grad


def test_wrt_penalty_gradient_reaches_the_embedding_weights():
    # GC with respect to e = embed(t) depends on the embedding weights through
    # e's value: the penalty's gradient must include that path (finite
    # differences of the exact GC, float64, smooth head)
    from geocomplexity.regularizers import GeometricComplexity

    model, t = _tokens()
    term = GeometricComplexity(1.0, method="exact", wrt="embed")
    model.zero_grad()
    term(model, t).backward()
    W = model.embed.weight
    analytic = W.grad.clone()

    def gc() -> float:
        with torch.no_grad():
            return gcx.geometric_complexity(model, t, wrt="embed").item()

    rows = t.unique()[:3].tolist()
    h = 1e-6
    for row in rows:
        for col in (0, 5):
            with torch.no_grad():
                W[row, col] += h
            up = gc()
            with torch.no_grad():
                W[row, col] -= 2 * h
            down = gc()
            with torch.no_grad():
                W[row, col] += h
            assert math.isclose(
                analytic[row, col].item(),
                (up - down) / (2 * h),
                rel_tol=1e-5,
                abs_tol=1e-9,
            )
    assert analytic[rows].abs().sum() > 0
    assert not term.reuses_input_grad and "wrt='embed'" in repr(term)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"wrt": "nope"}, ValueError, r"wrt='nope' names no submodule.*embed"),
        ({"wrt": "unused"}, ValueError, r"did not run"),
        ({"wrt": "head.3", "output": "head.1"}, ValueError, r"did not run"),
        ({"wrt": ""}, ValueError, r"whole model"),
        ({}, TypeError, r"int64.*wrt='<name of the embedding"),
    ],
)
def test_wrt_errors_name_the_fix(kwargs, error, match):
    model, t = _tokens()
    with pytest.raises(error, match=match):
        gcx.jacobian_sq_norms(model, t, **kwargs)


def test_wrt_refuses_a_submodule_that_runs_twice():
    lin = nn.Linear(3, 3).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    with pytest.raises(ValueError, match=r"more than once"):
        gcx.jacobian_sq_norms(model, torch.randn(4, 3, dtype=torch.float64), wrt="0")


def test_wrt_in_train_mode_takes_the_diagonal_blocks_after_the_embedding():
    torch.manual_seed(0)
    head = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
    )
    model = nn.Sequential(nn.Embedding(20, 4), head).double()
    t = torch.randint(0, 20, (6, 3))
    want = diagonal_block_sq_norms(head.train(), model[0](t).detach())
    got = gcx.jacobian_sq_norms(model, t, wrt="0", mode="train")
    assert torch.allclose(got, want, rtol=1e-10, atol=0)


def test_wrt_on_a_transformer_encoder_and_its_penalty():
    # attention, LayerNorm and a learned position table after the embedding;
    # the penalty double-backpropagates through attention, in train mode
    from geocomplexity.regularizers import GeometricComplexity

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(40, 16)
            self.pos = nn.Parameter(0.1 * torch.randn(6, 16))
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 4)

        def after_embedding(self, e: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(e + self.pos).mean(1))

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.after_embedding(self.embed(t))

    torch.manual_seed(0)
    model = TinyLM().double()
    t = torch.randint(0, 40, (5, 6))

    class Rest(nn.Module):
        def forward(self, e: torch.Tensor) -> torch.Tensor:
            return model.after_embedding(e)

    model.eval()
    want = per_sample_sq_norms(Rest(), model.embed(t).detach())
    model.train()
    got = gcx.jacobian_sq_norms(model, t, wrt="embed")  # eval mode by default
    assert torch.allclose(got, want, rtol=1e-10, atol=0) and model.training
    penalty = GeometricComplexity(1e-2, wrt="embed")(model, t)
    penalty.backward()
    assert torch.isfinite(penalty) and model.embed.weight.grad.abs().sum() > 0


def test_wrt_holds_when_the_forward_pass_changes_the_variable_in_place():
    # x *= sqrt(d) after an embedding, or ReLU(inplace=True) after the named
    # layer: the Jacobian is still taken against the submodule's own output
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 4)
            self.pos = nn.Parameter(torch.randn(3, 4))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh())

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            e = self.embed(t)
            e *= 3.0
            e += self.pos
            return self.head(e)

    torch.manual_seed(0)
    model = Scaled().double()
    t = torch.randint(0, 20, (6, 3))
    e = model.embed(t).detach()
    want = per_sample_sq_norms(_Call(lambda z: model.head(3.0 * z + model.pos)), e)
    assert torch.allclose(gcx.jacobian_sq_norms(model, t, wrt="embed"), want)
    model.requires_grad_(False)  # a frozen embedding: the variable is a leaf
    assert torch.allclose(gcx.jacobian_sq_norms(model, t, wrt="embed"), want)

    relu = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    relu = relu.double()
    x = torch.randn(7, 5, dtype=torch.float64)
    h = relu[0](x).detach()
    want = per_sample_sq_norms(_Call(lambda z: relu[2](torch.relu(z))), h)
    assert torch.allclose(gcx.jacobian_sq_norms(relu, x, wrt="0"), want)
    from geocomplexity.regularizers import GeometricComplexity

    penalty = GeometricComplexity(1.0, method="exact", wrt="0")(relu, x)
    assert torch.isclose(penalty, want.mean())


class _Call(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)


def test_wrt_with_forward_mode_and_finite_difference_probes():
    # the probes enter at the embedding's output: a tangent for jvp, a step
    # for finite differences; both estimate the exact value
    from geocomplexity.regularizers import GeometricComplexity

    model, t = _tokens()
    want = gcx.jacobian_sq_norms(model, t, wrt="embed")
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            gcx.jacobian_sq_norms(model, t, wrt="embed", method="jvp", generator=g)
            for _ in range(300)
        ]
    )
    se = draws.std(0) / 300**0.5
    assert ((draws.mean(0) - want).abs() < 4 * se).all()

    # finite differences along the same probes as jvp: equal to O(eps)
    def along(method: str) -> torch.Tensor:
        g5 = torch.Generator().manual_seed(5)
        return gcx.jacobian_sq_norms(
            model, t, wrt="embed", method=method, num_probes=3, generator=g5
        )

    assert torch.allclose(along("finite_difference"), along("jvp"), rtol=1e-6)
    r = gcx.measure(model, t, wrt="embed", method="jvp", num_probes=4, progress=False)
    assert r.method == "jvp" and r.num_samples == 9
    # the jvp penalty: unbiased value, gradient into the embedding weights
    term = GeometricComplexity(1.0, method="jvp", wrt="embed", generator=g)
    values = torch.stack([term(model, t).detach() for _ in range(300)])
    assert abs(values.mean() - want.mean()) < 4 * values.std() / 300**0.5
    model.zero_grad()
    term(model, t).backward()
    assert model.embed.weight.grad.abs().sum() > 0
    assert model.embed.weight.requires_grad


def test_wrt_probes_leave_the_input_alone_when_the_submodule_returns_it():
    # Identity returns its input: without a copy, `e *= 3` after it wrote into
    # x (finite differences then ran on 3x, 9x, ...; jvp overflowed), and a
    # Tanh followed by an in-place op broke the jvp penalty's backward
    from geocomplexity.regularizers import GeometricComplexity

    class Net(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.lin = inner, nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e = self.inner(x)
            e *= 3.0
            return torch.tanh(self.lin(e))

    torch.manual_seed(0)
    model = Net(nn.Identity()).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    before = x.clone()
    want = gcx.jacobian_sq_norms(model, x, wrt="inner")

    def along(method: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return gcx.jacobian_sq_norms(
            model, x, wrt="inner", method=method, num_probes=4000, generator=g
        )

    jvp, fd = along("jvp"), along("finite_difference")
    assert torch.equal(x, before)
    assert torch.allclose(fd, jvp, rtol=1e-6)
    assert torch.allclose(jvp, want, rtol=0.1)  # 4000 probes: a few % noise
    torch.manual_seed(0)
    tanh = Net(nn.Tanh()).double()
    penalty = GeometricComplexity(1.0, method="jvp", wrt="inner")(tanh, x)
    penalty.backward()  # a Tanh's backward reads its output, kept unmodified
    assert torch.isfinite(penalty) and tanh.lin.weight.grad is not None


class _BatchCentred(nn.Module):
    """Subtracts the batch mean after a layer: samples coupled, no BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        return self.head(h - h.mean(0, keepdim=True))


def test_coupled_option_for_layers_that_mix_samples_without_batchnorm():
    """A layer of another type that mixes samples is not recognised; with
    coupled=True every path takes the diagonal blocks (measure, the metric
    and the penalty too), and coupled=False where BatchNorm couples is refused."""
    from geocomplexity.integrations.torchmetrics import (
        GeometricComplexity as GeometricComplexityMetric,
    )
    from geocomplexity.regularizers import GeometricComplexity

    torch.manual_seed(0)
    model = _BatchCentred().double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    want = diagonal_block_sq_norms(model, x)
    assert rel(all_at_once_sq_norms(model, x, "output"), want) > 0.01
    assert rel(gcx.jacobian_sq_norms(model, x, coupled=True), want) < 1e-10
    g = torch.Generator().manual_seed(0)
    for method in ("projection", "jvp", "finite_difference"):
        est = torch.stack(
            [
                gcx.jacobian_sq_norms(
                    model, x, method=method, coupled=True, num_probes=20, generator=g
                )
                for _ in range(20)
            ]
        )
        se = est.std(0) / math.sqrt(len(est))
        assert ((est.mean(0) - want).abs() < 4.5 * se).all(), method
    r = gcx.measure(model, x, batch_size=6, coupled=True, progress=False)
    assert r.method == "exact" and math.isclose(
        r.value, want.mean().item(), rel_tol=1e-10
    )
    metric = GeometricComplexityMetric(model, coupled=True)
    metric.update(x)
    assert math.isclose(metric.compute().item(), want.mean().item(), rel_tol=1e-10)
    pen = GeometricComplexity(1.0, method="exact", coupled=True)(model, x)
    assert torch.isclose(pen, want.mean(), rtol=1e-10)
    assert "coupled=True" in repr(GeometricComplexity(1.0, coupled=True))
    bn = batchnorm_mlp(4, track=False)
    with pytest.raises(ValueError, match="coupled=False"):
        gcx.jacobian_sq_norms(bn, x, coupled=False)
    with pytest.raises(ValueError, match="coupled=False"):
        GeometricComplexity(1.0, coupled=False)(bn, x)


def test_coupled_false_in_train_mode_for_dropout_alone():
    # train mode is taken as coupled when not told otherwise; a model whose
    # only train-mode layer is dropout may say coupled=False: the batch-sum
    # trick with one mask, exactly the diagonal blocks (here they are all)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)
    ).double()  # fmt: skip
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.manual_seed(1)
    fast = gcx.jacobian_sq_norms(model, x, mode="train", coupled=False)
    torch.manual_seed(1)
    slow = gcx.jacobian_sq_norms(model, x, mode="train")
    assert rel(fast, slow) < 1e-12
    r = gcx.measure(model, x, mode="train", coupled=False, progress=False)
    assert r.method == "exact"  # auto: k = 3 VJPs, not k·B
    bn, xb = make_case("batchnorm")
    with pytest.raises(ValueError, match="coupled=False"):
        gcx.jacobian_sq_norms(bn, xb, mode="train", coupled=False)
    with pytest.raises(ValueError, match="coupled=False"):
        gcx.measure(bn, xb, mode="train", coupled=False, progress=False)


@pytest.mark.parametrize("method", ["exact", "jvp", "finite_difference"])
def test_coupled_false_in_train_mode_passes_share_one_dropout_mask(method):
    # with coupled=False the passes of jvp and finite differences, and exact's
    # forward-mode passes (d < k), still run the network of one dropout mask:
    # for a model whose only train-mode layer is dropout, the values are those
    # of the coupled estimators, which replay one mask (the same probes; for
    # independent samples t_i·<a_i, t_i·a_i> = ‖a_i‖²). Each pass with its
    # own mask made the finite difference 1e15 and exact up to 2x off
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 10)
    ).double()  # fmt: skip
    x = torch.randn(6, 3, dtype=torch.float64)
    values = []
    for coupled in (None, False):
        torch.manual_seed(1)
        values.append(
            gcx.jacobian_sq_norms(
                model,
                x,
                method=method,
                mode="train",
                coupled=coupled,
                num_probes=3,
                generator=torch.Generator().manual_seed(2),
            )
        )
    tol = 1e-6 if method == "finite_difference" else 1e-12
    assert rel(values[1], values[0]) < tol


@pytest.mark.parametrize("method", ["exact", "projection", "jvp", "finite_difference"])
def test_half_precision_sums_over_probes_keep_their_precision(method):
    # the per-sample sum over probes (over output chunks for exact) runs in
    # float32: a bfloat16 running sum stops growing once its spacing exceeds
    # the terms (here 500 probes lost a tenth of their sum; 2,000, half)
    torch.manual_seed(0)
    # exact: d = k = 400, so 400 reverse-mode directions, one at a time
    d = 400 if method == "exact" else 8
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 400))
    model = model.to(torch.bfloat16)
    x = torch.randn(5, d).to(torch.bfloat16)
    wide = copy.deepcopy(model).double()  # the same weights, in float64

    def measured(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)  # the same probes for both
        return gcx.jacobian_sq_norms(
            m, z, method=method, num_probes=500, chunk_size=1, generator=g
        )

    got, want = measured(model, x), measured(wide, x.double())
    assert got.dtype == torch.bfloat16
    # finite differences in bfloat16 carry their own O(sqrt(eps)) error
    assert rel(got.double(), want) < (0.04 if method == "finite_difference" else 0.01)


def test_float16_finite_difference_step_beyond_256():
    # the default step's RMS of x is taken in float32: in float16 x**2
    # overflowed beyond |x| = 256, and the step became inf
    torch.manual_seed(0)
    model = nn.Linear(2, 1).half()
    x = torch.full((3, 2), 300.0, dtype=torch.float16)

    def measured(method: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return gcx.jacobian_sq_norms(
            model, x, method=method, num_probes=5, generator=g
        ).float()

    assert torch.allclose(measured("finite_difference"), measured("jvp"), rtol=0.05)


def test_finite_difference_step_follows_autocast():
    # a float32 input through a bfloat16 autocast model: float32's step,
    # divided by its square, turned bfloat16 round-off into 50 times the GC
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(5, 6)

    def measured() -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return gcx.jacobian_sq_norms(
            model, x, method="finite_difference", num_probes=200, generator=g
        )

    want = measured()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = measured()
    assert rel(got, want) < 0.1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"coupled": "no"}, TypeError, "coupled must be None, True or False"),
        ({"coupled": 0}, TypeError, "coupled must be None, True or False"),
        ({"num_probes": True}, ValueError, "num_probes must be a positive"),
    ],
)
def test_malformed_options_are_refused(kwargs, error, match):
    # bool("no") is True, and coupled=0 passed the BatchNorm check, giving the
    # batch-sum trick on coupled samples
    model = batchnorm_mlp(5, track=False)
    x = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(error, match=match):
        gcx.jacobian_sq_norms(model, x, method="projection", **kwargs)


def test_meta_inputs_are_refused_with_a_clear_error():
    model = nn.Linear(4, 3, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        gcx.jacobian_sq_norms(model, torch.randn(5, 4, device="meta"))


def test_a_generator_that_is_not_a_torch_generator_is_refused():
    # generator=0 (a seed where a Generator belongs) raised AttributeError:
    # 'int' object has no attribute 'device' from deep in the probe code
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        gcx.jacobian_sq_norms(model, x, method="projection", generator=0)


@pytest.mark.parametrize("method", ["exact", "projection", "jvp", "finite_difference"])
def test_float16_squares_are_taken_in_float32(method):
    # a float16 square below 2**-14 is subnormal, a multiple of 2**-24: the
    # Jacobian entries 1.5e-4 (a GC of 4e-7) squared to 0, and every method
    # read GC = 0 (jvp's and projection's sums of entries to a few times that,
    # rounded to 1-2 units of 2**-24; finite differences' steps to 0)
    lin = nn.Linear(6, 3, bias=False).half()
    nn.init.constant_(lin.weight, 1.5e-4)
    wide = copy.deepcopy(lin).double()
    x = torch.randn(5, 6)

    def measured(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)  # the same probes for both
        return gcx.jacobian_sq_norms(m, z, method=method, num_probes=16, generator=g)

    got, want = measured(lin, x.half()), measured(wide, x.double())
    assert got.dtype == torch.float16
    # returned in float16, whose subnormals hold 4e-7 to a few percent
    assert rel(got.double(), want) < 0.1
    g = torch.Generator().manual_seed(0)
    r = gcx.measure(
        lin, x.half(), method=method, num_probes=16, generator=g, progress=False
    )
    tol = 0.02 if method == "finite_difference" else 1e-3  # its step's rounding
    assert r.value == pytest.approx(want.mean().item(), rel=tol)
    assert r.stderr == pytest.approx(want.std().item() / 5**0.5, rel=0.1, abs=1e-12)


def test_float16_norms_beyond_its_range():
    # Jacobian entries of 100: GC = 18 * 100**2 = 180000 > 65504, float16's
    # largest value (entries beyond 256 overflow when squared). measure read
    # it as a non-finite Jacobian ("check for NaN weights")
    lin = nn.Linear(6, 3, bias=False).half()
    nn.init.constant_(lin.weight, 100.0)
    x = torch.randn(4, 6).half()
    for method in ("exact", "projection", "jvp", "finite_difference"):
        g = torch.Generator().manual_seed(0)
        with pytest.raises(ValueError, match="beyond float16's range"):
            gcx.jacobian_sq_norms(lin, x, method=method, num_probes=16, generator=g)
    for method in ("auto", "exact"):
        r = gcx.measure(lin, x, method=method, progress=False, per_sample=True)
        assert r.value == 180000 and r.method == "exact"
        assert r.per_sample.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    # A^T v = 100 (Σv) 1 for a probe v: the 16-probe mean, as in float64
    r = gcx.measure(
        lin, x, method="projection", num_probes=16, generator=g, progress=False
    )
    g = torch.Generator().manual_seed(0)
    want = gcx.measure(
        lin.double(), x.double(), method="projection", num_probes=16, generator=g,
        progress=False,
    )  # fmt: skip
    assert r.value == pytest.approx(want.value, rel=1e-6)


@pytest.mark.parametrize(
    ("dtype", "layer", "scale", "wrt"),
    [
        (torch.float32, 2, 1e-3, None),
        (torch.bfloat16, 2, 1.0, None),
        (torch.float32, 2, 1e-3, "0"),
        (torch.float16, 0, 1e-2, None),  # every difference exactly 0
    ],
)
def test_finite_differences_lost_in_rounding_are_refused(dtype, layer, scale, wrt):
    # an output (about 100) far larger than its change over a step: the
    # differences were a few units of the output's rounding, or none, and
    # finite differences read 50-170 (float32), 20 (bfloat16) or 0 (float16)
    # times the GC, silently
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        model[layer].weight.mul_(scale)
        model[2].bias.fill_(100.0)
    model = model.to(dtype)
    x = torch.randn(32, 6).to(dtype)
    g = torch.Generator().manual_seed(0)
    kwargs = {"num_probes": 8, "generator": g, "wrt": wrt}
    for mode in ("eval", "train"):
        with pytest.raises(ValueError, match="lost in the rounding of the output"):
            gcx.jacobian_sq_norms(
                model, x, method="finite_difference", mode=mode, **kwargs
            )
    gcx.jacobian_sq_norms(model, x, method="jvp", **kwargs)  # unaffected
    # a constant output: differences of exactly 0 are its GC, not noise
    nn.init.zeros_(model[2].weight)
    got = gcx.jacobian_sq_norms(model, x, method="finite_difference", **kwargs)
    assert torch.equal(got, torch.zeros_like(got))


def test_finite_differences_of_masked_logits_are_not_refused():
    # logits masked to -1e9 (classes not allowed) differ by exactly 0 at any
    # step and carry no rounding into the estimate; the rounding check counted
    # them (a floor of 2.3e5 against a mean square of 1.7e-7) and refused
    # finite differences that read 0.199 against exact's 0.190 (64 probes)
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
            self.register_buffer("mask", torch.tensor([0, 0, 0, 1, 1]).bool())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).masked_fill(self.mask, -1e9)

    torch.manual_seed(0)
    model = Masked()
    x = torch.randn(8, 6)
    for mode, wrt in (("eval", None), ("train", None), ("eval", "net.0")):
        want = gcx.jacobian_sq_norms(model, x, mode=mode, wrt=wrt).mean()
        g = torch.Generator().manual_seed(0)
        got = gcx.jacobian_sq_norms(
            model, x, method="finite_difference", mode=mode, wrt=wrt,
            num_probes=256, generator=g,
        ).mean()  # fmt: skip
        torch.testing.assert_close(got, want, rtol=0.1, atol=0)
    # the entries that move still set the floor: an offset on them is refused
    with torch.no_grad():
        model.net[2].weight.mul_(1e-3)
        model.net[2].bias.fill_(100.0)
    with pytest.raises(ValueError, match="lost in the rounding of the output"):
        gcx.jacobian_sq_norms(model, x, method="finite_difference")


def test_jvp_of_an_expanded_input():
    # x[:1].expand(B, d) (one point measured B times, or a broadcast feature):
    # forward-mode AD refuses a primal whose elements share memory, so jvp
    # and the jvp penalty crashed ("more than one element of the written-to
    # tensor refers to a single memory location") where the other methods ran
    from geocomplexity.regularizers import GeometricComplexity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    point = torch.randn(1, 6, dtype=torch.float64)
    for x in (point.expand(4, 6), point[:, :1].expand(4, 6)):
        dense = x.contiguous()

        def measured(z: torch.Tensor) -> torch.Tensor:
            g = torch.Generator().manual_seed(0)
            return gcx.jacobian_sq_norms(
                model, z, method="jvp", num_probes=4, generator=g
            )

        assert torch.equal(measured(x), measured(dense))
        g = torch.Generator().manual_seed(0)
        penalty = GeometricComplexity(1.0, method="jvp", generator=g)(model, x)
        g = torch.Generator().manual_seed(0)
        want = GeometricComplexity(1.0, method="jvp", generator=g)(model, dense)
        assert torch.equal(penalty, want)
        penalty.backward()  # differentiable in the parameters


def test_output_and_wrt_hooks_act_in_the_measuring_thread_alone():
    # output= and wrt= hook a submodule of the caller's model for the length
    # of a measurement; a thread serving predictions with the same eval-mode
    # model meanwhile ran into them: its model(x) raised the hook's internal
    # _Captured, and its pass through the wrt= submodule counted as the
    # measurement's second ("ran more than once in the forward pass")
    import threading

    inside, go_on = threading.Event(), threading.Event()

    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if threading.current_thread().name == "measuring":
                inside.set()
                go_on.wait(10)
            return x

    torch.manual_seed(0)
    model = nn.Sequential(Gate(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    model = model.double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        served = model(x)
    for option in ({"output": "1"}, {"wrt": "1"}):
        alone = gcx.jacobian_sq_norms(model, x, **option)
        inside.clear()
        go_on.clear()
        got: list[torch.Tensor | BaseException] = []

        def measure(option=option, got=got) -> None:
            try:
                got.append(gcx.jacobian_sq_norms(model, x, **option))
            except BaseException as err:  # handed to the test
                got.append(err)

        thread = threading.Thread(target=measure, name="measuring")
        thread.start()
        try:
            assert inside.wait(10)  # the hook is on, the pass held before it
            with torch.no_grad():
                torch.testing.assert_close(model(x), served, rtol=0, atol=0)
        finally:
            go_on.set()
            thread.join(20)
        assert isinstance(got[0], torch.Tensor), (option, got)
        torch.testing.assert_close(got[0], alone, rtol=1e-12, atol=0)
        assert all(not m._forward_hooks for m in model.modules())


def test_jvp_measurements_in_two_threads_do_not_refuse_each_other():
    # PyTorch's forward-mode levels are one for the process: a jvp
    # measurement in one thread found another thread's dual_level open and
    # refused, saying the call was "inside a dual_level already open" (it
    # was not); entering a level meanwhile fails in PyTorch itself
    import threading

    a_in, b_done = threading.Event(), threading.Event()

    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if threading.current_thread().name == "A" and not a_in.is_set():
                a_in.set()  # inside A's dual level
                b_done.wait(3)
            return x

    torch.manual_seed(0)
    model_a = nn.Sequential(Gate(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    model_b = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    model_a, model_b = model_a.double(), model_b.double()
    x = torch.randn(6, 5, dtype=torch.float64)

    def measure(model: nn.Module) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return gcx.jacobian_sq_norms(model, x, method="jvp", generator=g)

    alone = {"A": measure(model_a), "B": measure(model_b)}
    got = in_two_threads(measure, model_a, model_b, a_in, {"B": b_done})
    for name in "AB":
        torch.testing.assert_close(got[name], alone[name], rtol=1e-12, atol=0)


class _Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(t)).mean(1)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("inner", [False, True])
def test_jvp_measuring_does_not_hold_every_probes_graph(monkeypatch, mode, inner):
    # the jvp passes run with grad on (a transformer's fused no-grad path has
    # no forward-mode derivative), so each pass records an autograd graph of
    # the weights. Measuring (create_graph=False) kept every probe's graph
    # alive in the running sum until the end: memory grew with num_probes (a
    # small transformer, wrt="embed", T=1024: 1.1 GB at 1 probe, 4.1 GB at 4).
    # The terms summed are checked for a graph
    torch.manual_seed(0)
    if inner:
        model, x, wrt = _Embedded(), torch.randint(0, 10, (4, 5)), "embed"
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        x, wrt = torch.randn(4, 5), None

    from geocomplexity import jacobian

    graphs = []
    for name in ("_sq_sum", "_dot_sum"):
        real = getattr(jacobian, name)

        def spy(*tensors, real=real, **kwargs):
            graphs.extend(t.requires_grad for t in tensors if torch.is_tensor(t))
            return real(*tensors, **kwargs)

        monkeypatch.setattr(jacobian, name, spy)
    measure = dict(method="jvp", num_probes=8, wrt=wrt, mode=mode)
    measure["coupled"] = mode == "train"  # two passes a probe, signs flipped
    gcx.jacobian_sq_norms(model, x, **measure)
    assert graphs and not any(graphs)  # each pass's graph went with the pass
    # a penalty keeps them: its value is differentiated
    assert gcx.jacobian_sq_norms(model, x, create_graph=True, **measure).requires_grad


@pytest.mark.parametrize("method", ["jvp", "finite_difference"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_input_probes_are_drawn_one_pass_at_a_time(monkeypatch, method, mode):
    # the passes take one probe each, but all num_probes × B × d probes were
    # drawn before the first: an MLP on B=256 inputs of 3072 with 256 probes
    # held 805 MB of probes (finite differences: 869 MiB above the start,
    # 20 MiB at 1 probe); 3×224×224 images at B=64 and 64 probes, 2.5 GB
    from geocomplexity import jacobian

    drawn = []
    real = jacobian.input_probes

    def spy(distribution, x, num_probes, generator):
        drawn.append(num_probes)
        return real(distribution, x, num_probes, generator)

    monkeypatch.setattr(jacobian, "input_probes", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    gcx.jacobian_sq_norms(
        model, x, method=method, num_probes=8, mode=mode, coupled=mode == "train"
    )
    assert drawn and max(drawn) == 1


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_many_projection_probes_are_drawn_chunk_by_chunk(monkeypatch, chunk_size):
    # chunk_size bounds memory, but all num_probes × B × k output probes were
    # drawn before the first VJP: an MLP 784-256-1000 at B=2048 with 128
    # probes and chunk_size=1 took 1143 MiB above the start (73 MiB at 1
    # probe), the probes alone 1 GB; coupled, their sign-flipped copy too.
    # Beyond _PROBES_AT_ONCE elements they are drawn as the VJPs take them
    from geocomplexity import jacobian

    drawn = []
    real = jacobian.draw_probes

    def spy(distribution, shape, **kwargs):
        drawn.append(shape)
        return real(distribution, shape, **kwargs)

    monkeypatch.setattr(jacobian, "draw_probes", spy)
    # these probes are many (raising=False: a bound the unfixed code lacked)
    monkeypatch.setattr(jacobian, "_PROBES_AT_ONCE", 0, raising=False)
    model, x = make_case("mlp")
    values = {}
    for mode in ("eval", "train"):
        drawn.clear()
        values[mode] = gcx.jacobian_sq_norms(
            model,
            x,
            method="projection",
            num_probes=8,
            chunk_size=chunk_size,
            mode=mode,  # train: coupled, two VJPs a probe
            generator=torch.Generator().manual_seed(4),
        )
        probes = [s for s in drawn if len(s) == 3]  # signs are (n, B)
        assert probes and max(s[0] for s in probes) <= chunk_size
    # the same probes, coupled or not: on independent samples, the same values
    assert rel(values["train"], values["eval"]) < 1e-12


def _spy_batched_forward_mode(monkeypatch) -> list[bool]:
    """Records each batched forward-mode attempt: True where it gave values."""
    from geocomplexity import jacobian

    taken: list[bool] = []
    real = jacobian._batched_forward_mode

    def spy(*args, **kwargs):
        values, drawn = real(*args, **kwargs)
        taken.append(values is not None)
        return values, drawn

    monkeypatch.setattr(jacobian, "_batched_forward_mode", spy)
    return taken


@pytest.mark.parametrize("case", ["wide_output", "conv"])
def test_exact_forward_mode_batches_its_jvps_and_stays_exact(monkeypatch, case):
    # d < k: d JVPs, chunk_size of them a pass (vmap over torch.func.jvp, the
    # primal run once a pass); convolutions batch too in forward mode. A loop
    # of dual passes (chunk_size=1) reruns the primal for every direction
    torch.manual_seed(0)
    if case == "conv":
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1),
            nn.Flatten(),
        ).double()  # fmt: skip
        x = torch.randn(5, 1, 4, 4, dtype=torch.float64)  # d = 16 < k = 64
    else:
        model, x = make_case("wide_output")
    taken = _spy_batched_forward_mode(monkeypatch)
    want = per_sample_sq_norms(model, x)
    assert rel(gcx.jacobian_sq_norms(model, x), want) < 1e-10
    assert taken == [True]
    looped = gcx.jacobian_sq_norms(model, x, chunk_size=1)
    assert taken == [True], "chunk_size=1 loops"
    assert rel(looped, want) < 1e-10
    # a chunk that leaves a remainder (d = 2 or 16 directions, 3 a pass)
    assert rel(gcx.jacobian_sq_norms(model, x, chunk_size=3), want) < 1e-10


class _OldStyleCube(torch.autograd.Function):
    """x³ with a forward-mode formula, but no setup_context: vmap refuses it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


class _Cubed(nn.Module):
    """3 → 8 → x³ (:class:`_OldStyleCube`) → ``k``: no vmap rule in it."""

    def __init__(self, k: int):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, k)

    def forward(self, x):
        return self.b(_OldStyleCube.apply(self.a(x)))


def test_exact_forward_mode_loops_where_the_model_cannot_be_batched(monkeypatch):
    # a custom autograd.Function without setup_context has no vmap rule: the
    # batched passes fail, and one dual pass a direction measures it exactly
    torch.manual_seed(0)
    model = _Cubed(20).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    taken = _spy_batched_forward_mode(monkeypatch)
    got = gcx.jacobian_sq_norms(model, x)
    assert taken == [False]
    assert rel(got, per_sample_sq_norms(model, x)) < 1e-10


def test_jvp_probes_share_batched_passes_with_the_same_probes(monkeypatch):
    # several jvp probes a pass when measuring: the probes are drawn in the
    # order the loop draws them, so the values are the loop's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    taken = _spy_batched_forward_mode(monkeypatch)

    def jvp(chunk_size):
        g = torch.Generator().manual_seed(3)
        return gcx.jacobian_sq_norms(
            model, x, method="jvp", num_probes=7, generator=g, chunk_size=chunk_size
        )

    batched, looped = jvp(None), jvp(1)
    assert taken == [True]
    torch.testing.assert_close(batched, looped, rtol=1e-13, atol=0)
    # and many probes converge to exact
    g = torch.Generator().manual_seed(4)
    many = gcx.jacobian_sq_norms(model, x, method="jvp", num_probes=4000, generator=g)
    assert rel(many, per_sample_sq_norms(model, x)) < 0.1


def _spied_vmap(monkeypatch, most: int | None = None) -> list[int]:
    """The directions each batched pass holds, recorded; above ``most``, the
    pass runs out of GPU memory (simulated)."""
    real = torch.func.vmap
    sizes: list[int] = []

    def vmap(f, *args, **kwargs):
        batched = real(f, *args, **kwargs)

        def run(u):
            sizes.append(len(u))
            if most is not None and len(u) > most:
                raise torch.cuda.OutOfMemoryError("simulated")
            return batched(u)

        return run

    monkeypatch.setattr(torch.func, "vmap", vmap)
    return sizes


def test_jvp_probes_a_pass_are_bounded_by_the_output_size(monkeypatch):
    # a decoder (d small, k large), where jvp's variance is low: chunk·B·max(d, k)
    # stays within the bound exact keeps (_CHUNK_ELEMENTS), k counted though
    # jvp runs no forward pass before its probes. Here the bound allows 4
    # directions a pass (8 · 200 · 4 = 6,400); d alone allowed all 16
    from geocomplexity import jacobian

    monkeypatch.setattr(jacobian, "_CHUNK_ELEMENTS", 6400)
    sizes = _spied_vmap(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 200)).double()
    x = torch.randn(8, 4, dtype=torch.float64)

    def jvp(chunk_size):
        g = torch.Generator().manual_seed(3)
        return gcx.jacobian_sq_norms(
            model, x, method="jvp", num_probes=16, generator=g, chunk_size=chunk_size
        )

    batched = jvp(None)
    assert sizes and sum(sizes) == 16
    assert max(sizes) * 8 * 200 <= 6400, sizes
    torch.testing.assert_close(batched, jvp(1), rtol=1e-13, atol=0)


def test_jvp_probes_of_a_failed_batched_pass_are_the_loops(monkeypatch):
    # a model vmap cannot batch: the loop that takes over drew fresh probes
    # in place of those the failed pass had drawn, so the values were not
    # chunk_size=1's with the same generator
    torch.manual_seed(0)
    model = _Cubed(4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    taken = _spy_batched_forward_mode(monkeypatch)

    def jvp(chunk_size):
        g = torch.Generator().manual_seed(3)
        return gcx.jacobian_sq_norms(
            model, x, method="jvp", num_probes=6, generator=g, chunk_size=chunk_size
        )

    fallback = jvp(4)
    assert taken == [False]
    torch.testing.assert_close(fallback, jvp(1), rtol=1e-13, atol=0)


def test_batched_forward_mode_halves_its_passes_when_gpu_memory_runs_out(
    monkeypatch,
):
    # an out-of-memory error in the first batched pass fell back to one dual
    # pass a direction (a later one to reverse mode); now the same directions
    # are taken again in halves, as the VJPs' chunks are. Out of memory is
    # simulated (a pass of more than 2 directions raises it)
    sizes = _spied_vmap(monkeypatch, most=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 30)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    got = gcx.jacobian_sq_norms(model, x)  # d = 6 < k = 30: forward mode
    assert sizes[:3] == [6, 3, 1] and set(sizes[3:]) == {1}  # 6 // 2, 3 // 2
    assert rel(got, per_sample_sq_norms(model, x)) < 1e-10
    # jvp probes: the same probes as a loop, whatever the passes held
    sizes.clear()

    def jvp(chunk_size):
        g = torch.Generator().manual_seed(5)
        return gcx.jacobian_sq_norms(
            model, x, method="jvp", num_probes=7, generator=g, chunk_size=chunk_size
        )

    halved = jvp(None)
    assert max(sizes) > 2 and sizes[-1] <= 2
    torch.testing.assert_close(halved, jvp(1), rtol=1e-13, atol=0)
    # a chunk the caller chose is kept: its error is raised (exact then
    # measures in reverse mode, which raises it too)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gcx.jacobian_sq_norms(model, x, method="jvp", num_probes=7, chunk_size=4)


def test_finite_difference_refuses_a_model_that_draws_noise_in_eval_mode():
    # dropout forced on (Monte Carlo dropout) in eval mode: each pass saw
    # another mask, and the difference quotient measured the masks (GC read
    # 10^5-10^7 times the exact value, another number on every call)
    class MCDropout(nn.Module):
        def forward(self, h):
            return nn.functional.dropout(h, 0.2, training=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), MCDropout(), nn.Linear(16, 3))
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="draws random numbers in eval mode"):
        gcx.jacobian_sq_norms(model, x, method="finite_difference")
    # the one-pass methods measure it (one mask), and train mode replays one
    gcx.jacobian_sq_norms(model, x, method="exact")
    gcx.jacobian_sq_norms(model, x, method="finite_difference", mode="train")


def test_finite_difference_is_not_refused_for_another_thread_s_draws(monkeypatch):
    # the global RNG moving during the base pass (another thread training
    # with dropout, say) is no noise of this model: a second pass decides
    from geocomplexity import jacobian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)

    def fd():
        g = torch.Generator().manual_seed(1)
        return gcx.jacobian_sq_norms(model, x, method="finite_difference", generator=g)

    quiet = fd()
    states = iter(range(1000))  # a state that moves on every read
    monkeypatch.setattr(jacobian, "_rng_states", lambda x: [torch.tensor(next(states))])
    torch.testing.assert_close(fd(), quiet, rtol=0, atol=0)


def test_train_mode_exact_keeps_no_block_results_to_the_end(monkeypatch):
    # exact on coupled samples takes k VJPs per sample in blocks of chunk_size,
    # and kept each block's small result tensors in a list until the last
    # block: between the blocks' large cotangents they fragmented the CPU
    # heap, so that a decoder of an 8-d latent to k = 784 outputs at B = 64 in
    # train mode peaked at 4.8 GB (455 MB once each block is added at once;
    # k = 3072, B = 16: 8.4 GB). At each backward pass, at most the block
    # before is alive
    import weakref

    from geocomplexity import jacobian

    results: list[weakref.ref] = []
    alive: list[int] = []
    real_sq_sum, real_grad = jacobian._sq_sum, torch.autograd.grad

    def sq_sum(*args, **kwargs):
        t = real_sq_sum(*args, **kwargs)
        results.append(weakref.ref(t))
        return t

    def grad(*args, **kwargs):
        alive.append(sum(r() is not None for r in results))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(jacobian, "_sq_sum", sq_sum)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 10)
    ).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    got = gcx.jacobian_sq_norms(model, x, mode="train", chunk_size=3)
    monkeypatch.undo()
    assert len(alive) == math.ceil(10 * 4 / 3)  # the blocks' backward passes
    assert max(alive) <= 1
    assert rel(got, diagonal_block_sq_norms(model.train(), x)) < 1e-10


def test_train_mode_exact_makes_its_one_hot_directions_as_it_takes_them(monkeypatch):
    # exact on coupled samples made all k one-hot directions at once, (k, B, k):
    # k² × B elements whatever chunk_size, 157 MB for k = 784 outputs at B = 64
    # in float32, 4.3 GB for k = 4096, where the blocks themselves hold
    # chunk_size × B × k. A decoder from an 8-d latent to k = 3072 outputs at
    # B = 16 peaked at 874 MB; one direction at a time, 315 MB
    from geocomplexity import jacobian

    made: list[int] = []
    real = jacobian._onehot

    def onehot(B, k, like):
        make = real(B, k, like)
        return lambda start, stop: made.append(stop - start) or make(start, stop)

    monkeypatch.setattr(jacobian, "_onehot", onehot)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 10)
    ).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    for chunk_size in (1, 3, 8):
        made.clear()
        got = gcx.jacobian_sq_norms(model, x, mode="train", chunk_size=chunk_size)
        assert made and max(made) <= chunk_size
        assert rel(got, diagonal_block_sq_norms(model.train(), x)) < 1e-10
        model.eval()


def test_exact_with_d_below_k_measures_one_draw_of_eval_mode_noise():
    # g(x) = A(x ∘ r), r drawn on every pass: exact's forward-mode passes
    # (d < k) each drew another r, and the sum over directions mixed the
    # draws (20.8 where one draw gives 29.2, 37.6 or 24.9); reverse mode
    # measures the draw of its one forward pass, as where d >= k
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 20, bias=False)

        def forward(self, x):
            return self.a(x * torch.rand(x.shape[1], dtype=x.dtype))

    torch.manual_seed(0)
    model = Noisy().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.manual_seed(7)
    r = torch.rand(4, dtype=torch.float64)  # the draw of the first pass
    want = (model.a.weight * r).pow(2).sum().expand(3)
    torch.manual_seed(7)
    got = gcx.jacobian_sq_norms(model, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("norm", "mode", "chunk_size"),
    [
        ("layer", "eval", 1),
        ("layer", "train", None),
        ("batch", "eval", 1),
        ("batch", "train", None),
    ],
)
def test_jvp_measurement_under_autocast_through_a_mixed_precision_norm(
    norm, mode, chunk_size
):
    # under bfloat16 autocast the fused layer and batch norms take bfloat16
    # input with float32 parameters and returned a bfloat16 value with a
    # float32 forward-mode derivative: the one-probe-a-pass jvp measurement
    # (chunk_size=1, or train mode's replayed passes) raised "expected m1 and
    # m2 to have the same dtype" at the next Linear
    torch.manual_seed(0)
    layer = nn.LayerNorm(8) if norm == "layer" else nn.BatchNorm1d(8)
    model = nn.Sequential(nn.Linear(6, 8), layer, nn.Tanh(), nn.Linear(8, 3))
    if norm == "batch":
        with torch.no_grad():
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    # a batch of 16: train mode's statistics over 5 samples amplified
    # bfloat16's round-off to 5% in exact as well (a conditioning matter)
    x = torch.randn(16, 6)

    def measured(autocast: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return gcx.jacobian_sq_norms(
                model,
                x,
                method="jvp",
                mode=mode,
                num_probes=4,
                chunk_size=chunk_size,
                generator=torch.Generator().manual_seed(1),
            )

    want = measured(autocast=False)
    got = measured(autocast=True)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=3e-2)
    # exact (d > k: reverse mode) agrees under autocast too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = gcx.jacobian_sq_norms(model, x, method="exact", mode=mode)
    assert torch.allclose(
        exact, gcx.jacobian_sq_norms(model, x, method="exact", mode=mode), rtol=3e-2
    )


@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_exact_forward_mode_under_autocast_through_a_norm(norm, mode):
    # d < k: exact takes d forward-mode passes, which through a fused norm
    # under autocast may fail and fall back to k VJPs; either way the value
    # is float32's to bfloat16 round-off
    torch.manual_seed(0)
    layer = nn.LayerNorm(16) if norm == "layer" else nn.BatchNorm1d(16)
    model = nn.Sequential(nn.Linear(3, 16), layer, nn.Tanh(), nn.Linear(16, 10))
    x = torch.randn(5, 3)
    want = gcx.jacobian_sq_norms(model, x, method="exact", mode=mode)
    for chunk_size in (1, None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = gcx.jacobian_sq_norms(
                model, x, method="exact", mode=mode, chunk_size=chunk_size
            )
        assert torch.allclose(got, want, rtol=3e-2)


def test_finite_differences_of_a_piecewise_constant_output_say_so():
    # one_hot(argmax(logits)): every other method gives GC 0, and finite
    # differences, all exactly 0 while a step the size of the input crosses
    # a jump, are refused (the rounding check stands); the refusal said only
    # that they were lost in the rounding of the output, and advised a larger
    # eps=, which measures the jumps
    class Decided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot(self.net(x).argmax(-1), 4).float()

    torch.manual_seed(0)
    model = Decided()
    x = torch.randn(8, 6)
    for method in ("exact", "projection", "jvp"):
        got = gcx.jacobian_sq_norms(model, x, method=method)
        assert torch.equal(got, torch.zeros_like(got))
    for mode, wrt in (("eval", None), ("train", None), ("eval", "net")):
        with pytest.raises(ValueError, match="piecewise constant") as caught:
            gcx.jacobian_sq_norms(
                model, x, method="finite_difference", mode=mode, wrt=wrt,
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
        message = str(caught.value)
        assert "piecewise constant" in message
        assert "give its GC, 0" in message
        assert "lost in the rounding of the output" in message  # still possible


class _Scaled(nn.Module):
    """Multiplies by its call count, counted before: the first pass from the
    buffer found (0) computes x · 1. A stand-in for a module whose eval-mode
    forward pass writes a buffer it then reads (a running normaliser, a
    quantization observer's range)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.calls


@pytest.mark.parametrize("d", [4, 2])  # d = 2 < k = 3: exact's forward mode
def test_eval_mode_passes_start_from_the_buffers_found(d):
    # in eval mode every pass of jvp, finite differences and exact's forward
    # mode ran from the buffers the pass before it had left: the finite
    # difference's step pass computed 2·g, and read GC ~1e14 where it is 1.3
    # (jvp: the mean of 2², 3², ... times the GC; exact, d < k: 4 and 9 times)
    torch.manual_seed(0)
    layers = [nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 3)]
    model = nn.Sequential(layers[0], _Scaled(), *layers[1:]).double()
    x = torch.randn(8, d, dtype=torch.float64)
    plain = nn.Sequential(*layers)  # the first pass's g
    want = per_sample_sq_norms(plain, x)
    assert rel(gcx.jacobian_sq_norms(model, x), want) < 1e-10
    assert rel(gcx.jacobian_sq_norms(model, x, chunk_size=1), want) < 1e-10
    jvp, fd = jvp_and_finite_difference(model, x)
    assert rel(fd, jvp) < 1e-5
    for wrt, reference in ((None, want), ("0", inner_sq_norms(plain, x, "0"))):
        jvp = gcx.jacobian_sq_norms(
            model,
            x,
            method="jvp",
            wrt=wrt,
            num_probes=2000,
            generator=torch.Generator().manual_seed(0),
        )
        assert rel(jvp, reference) < 0.1, wrt
    jvp, fd = jvp_and_finite_difference(model, x, wrt="0")
    assert rel(fd, jvp) < 1e-5
    assert model[1].calls.item() == 0


class _HalvesItsInput(nn.Module):
    """Normalises its input in place (``x /= 2``), as preprocessing does."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x /= 2
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("d", [5, 2])  # d = 2 < k = 4: exact's forward mode
def test_a_model_that_writes_its_input_in_place(d):
    # jvp and finite differences halved the caller's x once a pass (left at
    # x/2), and finite differences read 8e14 where the GC is 0.22: a base
    # pass at x/2, a step pass at x/4. Exact and projection raised torch's
    # "a leaf Variable that requires grad is being used in an in-place
    # operation" alone; now with what to change (a copy there would be a
    # non-leaf input, of which a compiled model warns)
    torch.manual_seed(0)
    model = _HalvesItsInput(d, 4).double()
    x = torch.randn(6, d, dtype=torch.float64)
    found = x.clone()
    halved = copy.deepcopy(model.lin)
    want = per_sample_sq_norms(nn.Sequential(halved, nn.Tanh()), x / 2) / 4
    for method in ("exact", "projection"):
        with pytest.raises(RuntimeError, match="writes its input in place"):
            gcx.jacobian_sq_norms(model, x, method=method)
    jvp, fd = jvp_and_finite_difference(model, x)
    assert rel(fd, jvp) < 1e-5
    got = gcx.jacobian_sq_norms(
        model,
        x,
        method="jvp",
        num_probes=2000,
        generator=torch.Generator().manual_seed(0),
    )
    assert rel(got, want) < 0.1
    assert torch.equal(x, found)


def test_complex_inputs_and_outputs_are_refused_with_a_real_fix():
    # a complex x was told to convert "with x.float()", which drops its
    # imaginary part; a complex output got "non-floating dtype" alone
    model = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.complex128)
    with pytest.raises(TypeError, match="view_as_real") as err:
        gcx.jacobian_sq_norms(model, x)
    assert "x.float()" not in str(err.value)

    class Phase(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(1j * x)

    real = torch.randn(5, 4, dtype=torch.float64)
    for method in ("exact", "jvp"):
        with pytest.raises(TypeError, match=r"output=torch\.view_as_real"):
            gcx.jacobian_sq_norms(Phase(), real, method=method)
        # the fix it names: |d e^{ix}/dx|² = 1 for each of the 4 entries
        got = gcx.jacobian_sq_norms(
            Phase(), real, method=method, output=torch.view_as_real
        )
        assert torch.allclose(got, torch.full_like(got, 4.0))


def _raises_sections(doc: str) -> dict[str, str]:
    """A Google-style docstring's Raises entries: exception name -> its text."""
    import re

    body = doc.split("Raises:")[1].split("\n\n")[0]
    parts = re.split(r"\n\s{8}(\w+):", "\n" + body)
    return {parts[i]: " ".join(parts[i + 1].split()) for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("name", ["jacobian_sq_norms", "measure"])
def test_raises_sections_name_the_type_each_bad_input_raises(name):
    # the Raises sections listed bad input under ValueError and TypeError for
    # integer input alone, so `except ValueError` around a measurement missed
    # a numpy array, a complex or float64 batch, all TypeErrors
    fn = getattr(gcx, name)
    call = (lambda m, x: fn(m, x, progress=False)) if name == "measure" else fn
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    cases = [
        ("numpy", x.numpy(), model, TypeError),
        ("complex", torch.randn(5, 4, dtype=torch.cfloat), model, TypeError),
        ("dtype", x.double(), model, TypeError),
        ("nn.Module", x, lambda z: z, TypeError),
        ("integer", x.long(), model, TypeError),
        ("NaN", x.clone().fill_(math.nan), model, ValueError),
        ("scalar", torch.tensor(1.0), model, ValueError),
    ]
    sections = _raises_sections(fn.__doc__)
    for word, bad, m, error in cases:
        with pytest.raises(error):
            call(m, bad)
        assert word in sections[error.__name__], (word, error.__name__)
