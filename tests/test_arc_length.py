"""Arc length and the Dirichlet approximation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import geocomplexity as gcx


def test_straight_line_is_exact():
    r = gcx.arc_length(lambda t: 0.75 * t, 0.0, 4.0, num_points=7)
    assert math.isclose(r.length, 5.0, rel_tol=1e-14)
    assert math.isclose(r.dirichlet, 4.0 + 0.5 * 0.75**2 * 4.0, rel_tol=1e-14)


def test_smooth_curve_converges_to_the_integral():
    # f = cosh: the arc length on [0, 1] is sinh(1)
    r = gcx.arc_length(torch.cosh, 0.0, 1.0, num_points=20001)
    assert math.isclose(r.length, math.sinh(1.0), rel_tol=1e-8)
    dirichlet = 1.0 + 0.5 * (math.sinh(2.0) / 4 - 0.5)  # ∫ sinh² = sinh(2)/4 - 1/2
    assert math.isclose(r.dirichlet, dirichlet, rel_tol=1e-7)


def test_relu_network_with_kinks_on_the_grid():
    """A hand-built ReLU net is the polyline through (0,0), (1,2), (2,1), (4,1)."""
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0], [1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -1.0, -2.0]))
        net[2].weight.copy_(torch.tensor([[2.0, -3.0, 1.0]]))
        net[2].bias.zero_()
    net.train()
    r = gcx.arc_length(net, 0.0, 4.0, num_points=401)
    want = math.sqrt(5) + math.sqrt(2) + 2.0
    assert math.isclose(r.length, want, rel_tol=1e-12)
    assert math.isclose(r.dirichlet, 4.0 + 0.5 * (4 + 1 + 0), rel_tol=1e-12)
    assert net.training  # left as found


@pytest.mark.parametrize("slope", [1e-3, 1e-2, 0.1, 1.0, 3.0])
def test_dirichlet_bounds_length_and_is_tight_for_small_slopes(slope):
    r = gcx.arc_length(lambda t: slope * torch.sin(t), 0.0, 6.0, num_points=2001)
    assert r.dirichlet >= r.length
    # gap is fourth order in the slope: ∫ s⁴/8 against b - a
    if slope <= 0.1:
        assert r.relative_gap < slope**4
    else:
        assert r.relative_gap > 1e-3


def test_errors():
    with pytest.raises(ValueError, match="a < b"):
        gcx.arc_length(torch.sin, 1.0, 1.0)
    with pytest.raises(ValueError, match="num_points"):
        gcx.arc_length(torch.sin, 0.0, 1.0, num_points=1)
    with pytest.raises(ValueError, match="one value per point"):
        gcx.arc_length(lambda t: torch.stack([t, t], 1), 0.0, 1.0, num_points=5)
    with pytest.raises(ValueError, match="NaN"):
        gcx.arc_length(torch.log, -1.0, 1.0, num_points=5)
    for a, b in ((0.0, math.inf), (-math.inf, 0.0), (math.nan, 1.0)):
        with pytest.raises(ValueError, match="finite"):
            gcx.arc_length(torch.sin, a, b)


def test_tensor_ends_give_float64_numbers():
    """0-d tensor ends (``x.min()``, ``x.max()``) are numbers, not float32 tensors."""
    r = gcx.arc_length(lambda t: t**2, torch.tensor(0.0), torch.tensor(1.0))
    assert all(type(v) is float for v in (r.length, r.dirichlet, r.a, r.b))
    assert r.dirichlet == pytest.approx(1 + 2 / 3, rel=1e-8)


class _Flat(nn.Module):
    """f = 0 with one float32 parameter, so the grid is float32."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, 0] * self.w


@pytest.mark.parametrize("ends", [(1 / 3, 2 / 3), (-0.1, 0.2), (0.1, 0.7)])
def test_dirichlet_never_below_length_on_a_float32_grid(ends):
    """The grid's ends are a and b rounded to float32; both sides use that grid.

    The Dirichlet side used b - a while the length ran over the rounded grid:
    for f = 0 on [1/3, 2/3] it came out 3e-8 below the length.
    """
    r = gcx.arc_length(_Flat(), *ends, num_points=11)
    assert r.dirichlet == r.length and r.relative_gap == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_grid_the_dtype_cannot_resolve_is_an_error_not_nan(dtype):
    """10 001 points on [-1, 1] repeat in half precision: Δx = 0 gave a NaN."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)).to(dtype)
    with pytest.raises(ValueError, match=r"distinct.*fewer points"):
        gcx.arc_length(net, -1.0, 1.0)
    r = gcx.arc_length(net, -1.0, 1.0, num_points=101)
    assert math.isfinite(r.dirichlet) and r.dirichlet >= r.length


def test_a_module_with_more_than_one_input_is_named_as_such():
    """A two-input model failed with torch's bare 'mat1 and mat2 shapes'."""
    with pytest.raises(RuntimeError, match=r"\(10001, 1\).*one input feature"):
        gcx.arc_length(torch.nn.Linear(2, 1).double(), -1.0, 1.0)


def test_a_grid_dtype_other_than_the_modules_is_named_as_such():
    """dtype=float64 on a float32 model failed with torch's bare dtype message."""
    with pytest.raises(RuntimeError, match=r"dtype=torch.float64.*torch.float32"):
        gcx.arc_length(torch.nn.Linear(1, 1), -1.0, 1.0, dtype=torch.float64)


def test_a_numpy_integer_num_points_is_accepted():
    """np.int64(1001), from a NumPy sweep of grid sizes, was refused as 'not an
    integer >= 2'."""
    np = pytest.importorskip("numpy")
    r = gcx.arc_length(lambda t: 0.75 * t, 0.0, 4.0, num_points=np.int64(1001))
    assert r.num_points == 1001 and type(r.num_points) is int
    assert r.length == pytest.approx(5.0, rel=1e-12)
    with pytest.raises(ValueError, match="num_points"):
        gcx.arc_length(torch.sin, 0.0, 1.0, num_points=2.5)


class _ScalesItsInputInPlace(nn.Module):
    """f(t) = 2t, computed by doubling the input tensor in place."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.mul_(2.0)


@pytest.mark.parametrize(
    ("f", "a", "want"),
    [
        # nn.ReLU(inplace=True) on [-1, 1]: flat, then slope 1
        (nn.ReLU(inplace=True), -1.0, 1.0 + math.sqrt(2.0)),
        (torch.relu_, -1.0, 1.0 + math.sqrt(2.0)),
        # f = 2t on [0, 1]: the line from (0, 0) to (1, 2)
        (_ScalesItsInputInPlace(), 0.0, math.sqrt(5.0)),
    ],
)
def test_a_function_that_writes_to_its_input_leaves_the_grid_alone(f, a, want):
    """The function was given the grid itself: one that wrote to its input (an
    in-place activation) moved the grid, and the length came out as that of
    another curve (sqrt 2 for ReLU on [-1, 1], sqrt 8 for 2t on [0, 1]) with a
    NaN Dirichlet side where the grid collapsed."""
    r = gcx.arc_length(f, a, 1.0, num_points=11)
    assert r.length == pytest.approx(want, rel=1e-12)
    assert math.isfinite(r.dirichlet) and r.dirichlet >= r.length


@pytest.mark.parametrize(
    ("slope", "a", "b", "num_points"),
    [(0.0, -3.0, 7.0, 101), (1e-6, -3.0, 7.0, 1001), (1e-6, 0.1, 0.9, 10001)],
)
def test_dirichlet_never_below_length_for_a_nearly_flat_curve_on_a_float64_grid(
    slope, a, b, num_points
):
    """The Dirichlet side took the span t[-1] - t[0], the length the sum of the
    float64 steps Σ Δt, which rounds otherwise: for f = 0 on [-3, 7] with 101
    points it came out 1.8e-15 below the length (relative_gap -2.2e-16), the
    bound it is documented never to fall below."""
    r = gcx.arc_length(lambda t: slope * torch.sin(t), a, b, num_points=num_points)
    assert r.dirichlet >= r.length and r.relative_gap >= 0.0
    assert r.length == pytest.approx(b - a, rel=1e-10)
