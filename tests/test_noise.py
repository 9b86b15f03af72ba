"""Input noise and GC (Bishop 1995): the paper's "noise regularizes GC".

Gaussian input noise of variance σ² adds (σ²/2)·GC to a squared-error loss
½‖g(x) − y‖² near interpolation: ½E‖g(x + σε) − y‖² = ½‖g(x) − y‖²
+ (σ²/2)·‖J(x)‖_F² + (terms that vanish at interpolation) + O(σ⁴).
"""

from __future__ import annotations

import torch
from torch import nn

import geocomplexity as gcx


def _noisy_excess(model, x, y, sigma, draws, generator):
    """Per draw, the batch mean of ½‖g(x + σε) − y‖² − ½‖g(x) − y‖², antithetic
    (ε and −ε averaged, so odd orders in σ cancel within each draw)."""
    with torch.no_grad():
        base = 0.5 * (model(x) - y).pow(2).sum(1)
        out = []
        for _ in range(draws):
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            plus = 0.5 * (model(x + sigma * eps) - y).pow(2).sum(1)
            minus = 0.5 * (model(x - sigma * eps) - y).pow(2).sum(1)
            out.append(((plus + minus) / 2 - base).mean())
    return torch.stack(out)


def test_input_noise_adds_half_sigma_squared_gc_for_an_affine_model():
    # exact for an affine map at any σ and any residual: the excess is
    # ½σ²‖Aε‖², whose mean is ½σ²‖A‖_F²
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randn(32, 4, dtype=torch.float64)  # far from interpolation
    sigma = 0.3
    excess = _noisy_excess(model, x, y, sigma, 4000, torch.Generator().manual_seed(1))
    want = 0.5 * sigma**2 * gcx.geometric_complexity(model, x)
    se = excess.std() / len(excess) ** 0.5
    assert abs(excess.mean() - want) < 4 * se
    assert abs(excess.mean() / want - 1) < 0.05


def test_input_noise_adds_half_sigma_squared_gc_near_interpolation():
    # a smooth nonlinear model with targets it fits exactly: the residual term
    # vanishes and the excess over σ² tends to GC/2 as σ → 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(24, 5, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    gc = gcx.geometric_complexity(model, x)
    gen = torch.Generator().manual_seed(2)
    for sigma in (1e-2, 1e-3):
        excess = _noisy_excess(model, x, y, sigma, 3000, gen) / sigma**2
        se = excess.std() / len(excess) ** 0.5
        assert abs(excess.mean() - gc / 2) < 4 * se + 1e-3 * gc, sigma
    # away from interpolation the second-order term is GC/2 plus the residual
    # term ½(g − y)·Δg (Δ the input Laplacian of each output): GC alone is the
    # whole penalty only where the model fits its targets
    lap = torch.stack(
        [
            torch.func.hessian(model)(xi).detach().diagonal(dim1=1, dim2=2).sum(1)
            for xi in x
        ]
    )  # (B, k)
    far = y + 5.0
    residual = (0.5 * ((y - far) * lap).sum(1)).mean()
    excess = _noisy_excess(model, x, far, 1e-2, 3000, gen) / 1e-4
    se = excess.std() / len(excess) ** 0.5
    assert abs(excess.mean() - (gc / 2 + residual)) < 4 * se + 1e-3 * gc
    assert abs(residual) > 5 * se  # the check above tells the two apart
