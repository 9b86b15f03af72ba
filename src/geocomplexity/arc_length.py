r"""Arc length of a function of one variable, and its Dirichlet approximation.

For :math:`f:[a,b]\to\mathbb{R}`,

.. math::

    L(f) = \int_a^b \sqrt{1 + f'(x)^2}\,dx
         \;\le\; (b - a) + \tfrac12\int_a^b f'(x)^2\,dx,

since :math:`\sqrt{1+s^2}\le 1+s^2/2`, with equality to second order in the slope.
The right-hand side is the Dirichlet energy that geometric complexity
discretises, so minimising GC in 1-D approximately minimises arc length.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from geocomplexity.jacobian import _SHAPE_MESSAGES, ForwardFailed
from geocomplexity.state import preserved

__all__ = ["ArcLength", "arc_length"]


@dataclass(frozen=True)
class ArcLength:
    r"""Arc length of a curve on ``[a, b]`` and its Dirichlet upper bound.

    Attributes:
        length: :math:`\int_a^b\sqrt{1+f'^2}`, the length of the polyline
            through ``num_points`` equally spaced points (exact for a piecewise
            linear ``f`` whose kinks fall on the grid, a lower bound otherwise,
            converging as the grid is refined).
        dirichlet: :math:`(b-a)+\frac12\int_a^b f'^2` on the same polyline; never
            below ``length``.
        a: left end.
        b: right end.
        num_points: grid size.
    """

    length: float
    dirichlet: float
    a: float
    b: float
    num_points: int

    @property
    def relative_gap(self) -> float:
        """``dirichlet / length − 1``: how loose the quadratic approximation is."""
        return self.dirichlet / self.length - 1


def arc_length(
    f: Callable[[Tensor], Tensor] | nn.Module,
    a: float,
    b: float,
    *,
    num_points: int = 10_001,
    dtype: torch.dtype | None = None,
) -> ArcLength:
    r"""Arc length of ``f`` on ``[a, b]`` with the Dirichlet approximation beside it.

    Args:
        f: a scalar function of one variable. A ``nn.Module`` is called on a
            ``(num_points, 1)`` column in eval mode and left as found; any other
            callable on a ``(num_points,)`` vector. Either must return
            ``num_points`` values.
        a: left end of the interval.
        b: right end, greater than ``a``.
        num_points: grid points, at least 2.
        dtype: grid dtype; default the module's parameter dtype, else float64.

    Returns:
        An :class:`ArcLength`.

    Raises:
        ValueError: ``b <= a`` or an infinite end, fewer than 2 points, grid
            points that repeat in ``dtype``, wrong output size, or a
            non-finite value.
        ForwardFailed: a module that refuses the ``(num_points, 1)`` column
            (it takes more than one input feature) or a ``dtype`` other than
            its parameters'; a ``RuntimeError``, torch's message kept.

    Example:
        >>> r = arc_length(lambda t: 0.75 * t, 0.0, 4.0)  # a 3-4-5 triangle
        >>> round(r.length, 12), round(r.dirichlet, 12)
        (5.0, 5.125)
    """
    a, b = float(a), float(b)  # a 0-d tensor would make the sums tensors
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"the interval must be finite, got a={a}, b={b}")
    if not b > a:
        raise ValueError(f"need a < b, got a={a}, b={b}")
    # any integer type (np.int64 from a NumPy sweep of grid sizes), not 2.5
    try:
        n = None if isinstance(num_points, bool) else operator.index(num_points)
    except TypeError:
        n = None
    if n is None or n < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    num_points = n
    if isinstance(f, nn.Module):
        p = next(iter(f.parameters()), None)
        dtype = dtype or (p.dtype if p is not None else torch.float64)
        device = p.device if p is not None else torch.device("cpu")
        t = torch.linspace(a, b, num_points, dtype=dtype, device=device)
    else:
        t = torch.linspace(a, b, num_points, dtype=dtype or torch.float64)
    if not (steps := t.diff() > 0).all():
        # repeated points make Δx = 0 and the Dirichlet sum 0/0
        raise ValueError(
            f"only {int(steps.sum()) + 1} of the {num_points} grid points on "
            f"[{a}, {b}] are distinct in {t.dtype}; use fewer points "
            "(num_points=...) or a wider dtype"
        )
    # f gets a copy: one that writes to its input (an in-place activation)
    # would otherwise move the grid the length and Dirichlet sums run over
    if isinstance(f, nn.Module):
        with preserved(f, mode="eval"), torch.no_grad():
            try:
                y = f(t.clone()[:, None])
            except RuntimeError as err:
                raise _module_failed(err, t, p) from err
    else:
        with torch.no_grad():
            y = f(t.clone())
    if not isinstance(y, Tensor) or y.numel() != num_points:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(
            f"f must return one value per point ({num_points}), got {shape}; "
            "arc length is defined for scalar functions of one variable"
        )
    y = y.reshape(-1).to(torch.float64)
    t = t.to(torch.float64)
    if not torch.isfinite(y).all():
        raise ValueError("f returned NaN or infinite values on [a, b]")
    dt, dy = t.diff(), y.diff()
    segment = torch.sqrt(dt**2 + dy**2)  # (num_points - 1,) chord lengths
    # segment by segment, Δt + Δy²/(2Δt) ≥ √(Δt² + Δy²) (√(1+s²) ≤ 1+s²/2);
    # rounding can put a nearly flat segment's side an ulp below its chord,
    # so it is kept at least the chord, and both sides are summed in one order
    # (rounded addition is monotone): the Dirichlet side is never below the
    # length. Its span is Σ Δt, the grid's own (in float32 the ends are a and
    # b rounded), not t[-1] - t[0], which differs from Σ Δt by rounding in
    # float64: 1.8e-15 below the length for f = 0 on [-3, 7], 101 points
    bound = torch.maximum(dt + 0.5 * dy**2 / dt, segment)
    length = segment.sum().item()
    dirichlet = bound.sum().item()
    return ArcLength(length, dirichlet, a, b, num_points)


def _module_failed(
    err: RuntimeError, t: Tensor, p: nn.Parameter | None
) -> RuntimeError:
    """``err`` saying what arc_length gave the module, where that is the fault.

    torch's own messages ("mat1 and mat2 shapes cannot be multiplied", "must
    have the same dtype") name neither the grid nor the fix; they are kept.
    """
    if type(err) is RuntimeError and _SHAPE_MESSAGES.search(str(err)):
        return ForwardFailed(
            f"arc_length calls the module on a column of points, shape "
            f"{tuple(t[:, None].shape)}: it must take one input feature (a "
            f"scalar function of one variable); the forward pass failed: {err}"
        )
    if (
        type(err) is RuntimeError
        and "dtype" in str(err)
        and p is not None
        and p.dtype != t.dtype
    ):
        return ForwardFailed(
            f"the grid has dtype={t.dtype} but the module's parameters are "
            f"{p.dtype}; leave dtype out to use theirs, or convert the module "
            f"(f.to({t.dtype})); the forward pass failed: {err}"
        )
    return err
