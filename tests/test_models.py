"""Model builders: shapes, init schemes, seeding without the global RNG."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geocomplexity.models import PreActResNet18, cnn, mlp


@pytest.mark.parametrize(
    ("init", "var"),
    [
        ("glorot", lambda i, o: 2 / (i + o)),
        ("lecun", lambda i, o: 1 / i),
        ("he", lambda i, o: 2 / i),
    ],
)
def test_mlp_init_variances_and_zero_biases(init, var):
    model = mlp(300, [400], 200, init=init, seed=1)
    for lin in (m for m in model if isinstance(m, nn.Linear)):
        o, i = lin.weight.shape
        assert lin.weight.var().item() == pytest.approx(var(i, o), rel=0.05)
        assert lin.bias.abs().max() == 0


def test_mlp_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = mlp(5, [7, 7], 3, seed=4), mlp(5, [7, 7], 3, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(
        torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
    assert mlp(5, [7], 3, activation="tanh")(torch.randn(2, 5)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown init"):
        mlp(5, [7], 3, init="orthogonal")
    with pytest.raises(ValueError, match="unknown activation"):
        mlp(5, [7], 3, activation="swish")


def test_builders_leave_the_cuda_generators_alone(monkeypatch):
    # torch.manual_seed would reseed every CUDA generator too (or queue it
    # until CUDA starts), and fork_rng(devices=[]) puts back the CPU's only
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    a, b = cnn(1, 3, width=4, seed=2), cnn(1, 3, width=4, seed=2)
    mlp(5, [7], 3, seed=1)
    assert seeded == []
    assert all(
        torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def test_preact_resnet18_widths():
    small, big = PreActResNet18(k=2), PreActResNet18(k=4)
    assert small(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(big) > 3 * count(small)


def test_cnn_shapes_seed_and_exact_gc_against_brute_force():
    from reference import per_sample_sq_norms

    from geocomplexity import jacobian_sq_norms
    from geocomplexity.models import cnn

    state = torch.get_rng_state()
    a, b = cnn(3, 10, width=4, seed=1), cnn(3, 10, width=4, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert all(
        torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
    assert a(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    small = cnn(1, 10, width=4, batch_norm=True, seed=0).double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert small(x).shape == (3, 10)
    torch.testing.assert_close(
        jacobian_sq_norms(small, x), per_sample_sq_norms(small, x), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda s: mlp(20, [64] * 10, 10, seed=s),
        lambda s: cnn(3, 10, width=8, seed=s),
    ],
    ids=["mlp", "cnn"],
)
def test_models_built_in_several_threads_at_once_are_their_seeds(build):
    # the builders seed the one global CPU generator inside fork_rng: a
    # thread building another model reseeded it between this one's layers
    # (9 of 20 mlps came out as no seed's), and the global state put back at
    # the end was another thread's snapshot
    import sys
    import threading

    n = 6
    want = [build(s) for s in range(n)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a busy machine may
    try:
        for _ in range(20):
            got = [None] * n
            start = threading.Barrier(n)

            def work(i, got=got, start=start):
                start.wait()
                got[i] = build(i)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for w, g in zip(want, got, strict=True):
                assert all(
                    torch.equal(p, q)
                    for p, q in zip(w.parameters(), g.parameters(), strict=True)
                )
    finally:
        sys.setswitchinterval(interval)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("init", ["default", "he"])
@pytest.mark.parametrize(
    ("d_in", "widths", "d_out"), [(4, [0], 3), (0, [8], 3), (4, [8, -1], 3)]
)
def test_mlp_refuses_a_layer_size_below_one(init, d_in, widths, d_out):
    """A width of 0 (say, a sweep's int(k * 0.1) for small k) built a network
    whose output is its last bias alone, GC 0 on any data, with the default
    init; the others raised a bare ZeroDivisionError from the init's 1/fan_in,
    and a negative size torch's 'Trying to create tensor with negative
    dimension'.
    """
    with pytest.raises(ValueError, match="layer sizes must be integers >= 1"):
        mlp(d_in, widths, d_out, init=init)


def test_mlp_says_widths_is_a_sequence_when_given_one_integer():
    # mlp(4, 8, 3) raised Python's "Value after * must be an iterable"
    with pytest.raises(TypeError, match=r"\[8\] for one hidden layer"):
        mlp(4, 8, 3)
    assert len(mlp(4, [8], 3)) == 3
