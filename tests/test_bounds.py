"""The transfer theorem and the norm bounds against brute force."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import per_sample_sq_norms
from torch import nn
from torch.func import functional_call, grad, vmap

import geocomplexity as gcx
from geocomplexity.bounds import norm_bounds, transfer_bound


def mlp(act: type[nn.Module], bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 16, bias=bias),
        act(),
        nn.Linear(16, 12, bias=bias),
        act(),
        nn.Linear(12, 3, bias=bias),
    ).double()


def param_grad_sq_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}
    cols = []
    for j in range(3):

        def f(p, xi, j=j):
            return functional_call(model, p, (xi[None],))[0, j]

        g = vmap(grad(f), in_dims=(None, 0))(params, x)
        cols.append(sum(v.pow(2).flatten(1).sum(1) for v in g.values()))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.GELU])
@pytest.mark.parametrize("bias", [True, False])
def test_transfer_sides_against_brute_force_and_inequality_holds(act, bias):
    model = mlp(act, bias)
    x = torch.randn(200, 5, dtype=torch.float64) * 2
    t = transfer_bound(model, x)
    assert t.input_grad_sq.shape == (200, 3) and t.t_sq.shape == (200, 3)
    assert torch.allclose(
        t.param_grad_sq, param_grad_sq_reference(model, x), rtol=1e-10
    )
    assert torch.allclose(
        t.input_grad_sq.sum(1), per_sample_sq_norms(model, x), rtol=1e-10
    )
    assert t.holds.all()
    assert (t.tightness <= 1 + 1e-6).all() and (t.tightness > 0).all()


def test_transfer_is_exact_for_one_linear_layer():
    """f_j = w_j·x + b_j: the right side is ‖W‖₂² for every j and sample."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    t = transfer_bound(lin, x)
    w2 = torch.linalg.matrix_norm(lin[0].weight, ord=2) ** 2
    assert torch.allclose(t.bound, w2.expand(10, 3), rtol=1e-12)
    assert torch.allclose(t.input_grad_sq, lin[0].weight.pow(2).sum(1).expand(10, 3))


def test_transfer_detects_a_violation_when_fed_a_false_bound():
    """The check can fail: scaling the right side below the left is caught."""
    model = mlp(nn.ReLU)
    t = transfer_bound(model, torch.randn(50, 5, dtype=torch.float64))
    fake = type(t)(t.input_grad_sq, t.param_grad_sq, t.t_sq, t.input_grad_sq * 0.9)
    assert not fake.holds.any()


def test_transfer_leaves_model_as_found_and_rejects_other_models():
    model = mlp(nn.ReLU).train()
    x = torch.randn(8, 5, dtype=torch.float64)
    before = [p.clone() for p in model.parameters()]
    transfer_bound(model, x)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True)
    )
    with pytest.raises(TypeError, match="dense"):
        transfer_bound(nn.Sequential(nn.Conv1d(1, 2, 3)), x[:, None, :])
    with pytest.raises(TypeError, match="Sequential"):
        transfer_bound(nn.Linear(5, 2).double(), x)


def test_norm_bounds_refuse_activations_steeper_than_one():
    with pytest.raises(TypeError, match="GELU"):
        norm_bounds(mlp(nn.GELU))


def test_norm_bounds_dominate_gc_in_order():
    for seed in range(3):
        model = mlp(nn.ReLU, seed=seed)
        x = torch.randn(300, 5, dtype=torch.float64) * 3
        gc = gcx.geometric_complexity(model, x).item()
        b = norm_bounds(model)
        assert gc <= b["frobenius_spectral"] <= b["frobenius"]
        assert gc <= b["lipschitz"]


def test_transfer_holds_where_a_bias_free_layer_is_dead():
    """A dead ReLU layer without biases: f is flat in x, T_l = ∞ (not 0/0 = NaN)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 3, bias=False),
        nn.ReLU(), nn.Linear(3, 2, bias=False),
    ).double()  # fmt: skip
    with torch.no_grad():  # the second layer's units are dead on every input
        model[2].weight.copy_(-model[0].weight.abs().sum(1).expand(3, 3).T)
    x = torch.randn(20, 4, dtype=torch.float64)
    t = transfer_bound(model, x)
    assert (t.input_grad_sq == 0).all() and not t.t_sq.isnan().any()
    assert t.holds.all() and (t.bound == 0).all()
    # x = 0 without biases: every h_l = 0 and T_l = 0; the bound is vacuous
    t = transfer_bound(model, torch.zeros(2, 4, dtype=torch.float64))
    assert t.holds.all() and not t.bound.isnan().any()


def test_norm_bounds_refuse_an_elu_steeper_than_one():
    model = nn.Sequential(nn.Linear(1, 1), nn.ELU(alpha=3.0), nn.Linear(1, 1))
    with pytest.raises(TypeError, match="ELU"):
        norm_bounds(model)
    norm_bounds(nn.Sequential(nn.Linear(1, 1), nn.ELU(), nn.Linear(1, 1)))


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Hardtanh])
def test_transfer_with_inplace_activations_matches_brute_force(act):
    """An in-place activation rewrites the Linear output the theorem reads δ_l on.

    Retaining the gradient of that tensor gave ∂f/∂σ(z_l) instead of ∂f/∂z_l:
    the parameter side came out up to 2.4x too large.
    """

    def net(inplace: bool) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(5, 16), act(inplace=inplace), nn.Linear(16, 12),
            act(inplace=inplace), nn.Linear(12, 3),
        ).double()  # fmt: skip

    model = net(inplace=True)
    x = torch.randn(50, 5, dtype=torch.float64) * 2
    t, want = transfer_bound(model, x), transfer_bound(net(inplace=False), x)
    ref = param_grad_sq_reference(model, x)
    assert torch.allclose(t.param_grad_sq, ref, rtol=1e-10)
    for got, exp in zip(vars(t).values(), vars(want).values(), strict=True):
        if isinstance(got, torch.Tensor):
            assert torch.allclose(got, exp, rtol=1e-12)
        else:  # rtol
            assert got == exp


def test_norm_bounds_of_float32_weights_are_not_rounded_to_float32():
    """One Linear layer: GC = ‖W‖_F² exactly, and every bound is tight or above.

    Computed in float32, the smallest bound fell below the exact GC (the double
    model's) for 6 of these 20 float32 layers, by up to about 1e-7 relative.
    """
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(7, 5))
        w = model[0].weight.detach().double()
        exact = gcx.geometric_complexity(model.double(), torch.randn(3, 7).double())
        b = norm_bounds(model.float())
        assert b["frobenius"] == pytest.approx(w.pow(2).sum().item(), rel=1e-14)
        assert b["frobenius_spectral"] == b["frobenius"]
        spec = torch.linalg.matrix_norm(w, ord=2).item() ** 2
        assert b["lipschitz"] == pytest.approx(5 * spec, rel=1e-14)
        assert min(b.values()) >= exact.item() * (1 - 1e-15)


def test_transfer_refuses_a_layer_used_twice():
    """Shared weights (one Linear twice) are outside the theorem: ∇_W f is then a
    sum over uses. It failed with zip()'s "argument 2 is longer than argument 1".
    """
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(4, 2)).double()
    with pytest.raises(TypeError, match="more than once"):
        transfer_bound(model, torch.randn(3, 4, dtype=torch.float64))


def test_transfer_bound_names_a_wrong_input_shape():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(
        RuntimeError, match=r"forward pass failed on inputs of shape \(8, 5\)"
    ):
        transfer_bound(net, torch.randn(8, 5))


def test_transfer_bound_names_a_dtype_mismatch():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the model"):
        transfer_bound(net, x)


def test_norm_bounds_leave_a_spectral_norm_parametrization_as_found():
    """torch's spectral_norm parametrization runs a power step on every read of
    the weight in train mode. norm_bounds read it so: a train-mode model's
    ``_u`` moved by 0.019 (top singular values 1 and 0.9) and its eval output
    by 2.3e-4, and the bounds were of that stepped weight, not of the model's.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    U, _, Vh = torch.linalg.svd(torch.randn(4, 5, dtype=torch.float64), False)
    s = torch.tensor([1.0, 0.9, 0.5, 0.1], dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(U @ torch.diag(s) @ Vh)
    torch.nn.utils.parametrizations.spectral_norm(model[0])
    sn = model[0].parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()
    b = norm_bounds(model)
    assert model.training and model[0].parametrizations.training
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)
    assert b == norm_bounds(model.eval())  # the model's own weight, as in eval


def test_transfer_bound_and_a_jvp_measurement_in_two_threads_take_turns():
    # transfer_bound's per-layer Jacobians (torch.func.jacfwd) open one of
    # PyTorch's forward-mode levels, which are one for the process: a jvp
    # measurement in another thread meanwhile found it open and refused
    # ("inside a torch.autograd.forward_ad.dual_level() already open")
    import threading

    import torch.autograd.forward_ad as fwAD
    from conftest import in_two_threads

    a_in, b_done = threading.Event(), threading.Event()

    def hold(_m, _args, _out) -> None:
        if threading.current_thread().name == "A" and fwAD._current_level >= 0:
            a_in.set()  # A inside jacfwd's level
            b_done.wait(3)

    torch.manual_seed(0)
    net_a = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    net_b = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    alone = {
        "A": transfer_bound(net_a, x).bound,
        "B": gcx.jacobian_sq_norms(net_b, x, method="jvp", num_probes=64,
                                   generator=torch.Generator().manual_seed(1)),
    }  # fmt: skip
    handle = net_a[1].register_forward_hook(hold)

    def run(net: nn.Module) -> torch.Tensor:
        if net is net_a:
            return transfer_bound(net, x).bound
        return gcx.jacobian_sq_norms(
            net, x, method="jvp", num_probes=64,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip

    try:
        got = in_two_threads(run, net_a, net_b, a_in, {"B": b_done})
    finally:
        handle.remove()
    torch.testing.assert_close(got["A"], alone["A"], rtol=1e-12, atol=0)
    torch.testing.assert_close(got["B"], alone["B"], rtol=1e-12, atol=0)


def test_transfer_reads_an_activation_before_the_first_linear_layer():
    """h_1 = σ(x), not x, where the network opens with an activation.

    ‖∇_x h_1‖ was taken as 1 (h_1 = x) whatever came before the first Linear
    layer: with LeakyReLU(3) first and x < 0 it is 3, so T_1² came out 9x too
    large, the bound 9x too small, and the theorem "failed" on every pair.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.LeakyReLU(3.0), nn.Linear(5, 3)).double()
    x = -torch.rand(6, 5, dtype=torch.float64) - 0.1  # σ'(x) = 3 everywhere
    t = transfer_bound(model, x)
    w2 = torch.linalg.matrix_norm(model[1].weight, ord=2) ** 2
    # one layer: the bound is ‖W‖₂² ‖∇_x h_1‖₂² = 9 ‖W‖₂² exactly
    assert torch.allclose(t.bound, 9 * w2.expand(6, 3), rtol=1e-12)
    assert t.holds.all()


def test_norm_bounds_lipschitz_counts_the_inputs_of_a_flatten_after_a_linear():
    """A Linear layer on a (B, 3, 4) input, then Flatten: d is 12, not 4.

    min(d, k) bounds the rank of the Jacobian; with d read as the first Linear
    layer's in_features (4), the Lipschitz bound of this identity map was 4,
    below its GC of 12. The rank is at most the in_features of the first
    Linear after the last Flatten (12).
    """
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Flatten(), nn.Linear(12, 12))
    with torch.no_grad():
        m[0].weight.copy_(torch.eye(4))
        m[0].bias.fill_(10.0)  # every unit on: the net is x + const
        m[3].weight.copy_(torch.eye(12))
    m = m.double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    gc = gcx.geometric_complexity(m, x).item()
    assert gc == pytest.approx(12.0)
    b = norm_bounds(m)
    assert min(b.values()) >= gc * (1 - 1e-12)
    assert b["lipschitz"] == pytest.approx(12.0)


def test_transfer_refuses_a_linear_layer_on_a_multi_axis_input():
    """Linear(4, 4) on (B, 3, 4) inputs, then Flatten: the layer's weight is
    shared by 3 rows, outside the theorem (∇_W f is a sum over them). The
    inputs were flattened to (B, 12) first, and the error blamed their shape:
    "forward pass failed on inputs of shape (5, 12)", a shape never given.
    """
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randn(5, 3, 4)
    net(x)  # the model takes these inputs
    with pytest.raises(TypeError, match="last axis"):
        transfer_bound(net, x)


def test_transfer_on_float32_is_not_refuted_by_its_own_rounding():
    """One Linear layer with one output is the theorem's equality case.

    Its sides were summed in float32 and ‖W‖₂ taken by a float32 SVD: the
    left side came out up to 1.5e-6 above the right, beyond the 1e-6 slack of
    ``holds``, on every sample of 3 of these 60 models (d from 300 to 3000).
    """
    for seed in range(60):
        torch.manual_seed(seed)
        d = torch.randint(300, 3000, ()).item()
        model = nn.Sequential(nn.Linear(d, 1, bias=seed % 2 == 0))
        x = torch.randn(64, d) * torch.rand(()) * 10
        t = transfer_bound(model, x)
        assert t.holds.all(), seed
        assert torch.allclose(t.tightness, torch.ones_like(t.tightness), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transfer_on_half_precision_is_not_refuted_by_its_own_rounding(dtype):
    """Two Linear layers, the second along the first's top left singular
    vector: both layers are tight, so the sides are equal but for rounding.

    The passes run in the model's dtype; ``holds`` allowed 1e-6 relative
    slack whatever it was, and reported the theorem violated on most samples
    of a bfloat16 or float16 model (its left side up to 9e-4 above the right
    in bfloat16, 1e-4 in float16: a fraction of either dtype's eps).
    """
    for seed in range(10):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(200, 100), nn.Identity(), nn.Linear(100, 1))
        net = net.double()
        u = torch.linalg.svd(net[0].weight.detach())[0][:, 0]
        with torch.no_grad():
            net[2].weight.copy_(0.7 * u[None])
        net = net.to(dtype)
        t = transfer_bound(net, torch.randn(32, 200, dtype=dtype))
        assert t.holds.all(), seed
        # a right side 10% short is still caught
        assert not dataclasses.replace(t, bound=t.bound * 0.9).holds.any()
