"""Penalties that control geometric complexity, in one composable form.

``GeometricComplexity(1e-3) + L2(5e-4)`` is a term; every term is called as
``term(model, inputs, targets, outputs=..., loss_fn=...)``.
"""

from geocomplexity.regularizers.base import Regularizer
from geocomplexity.regularizers.geometric_complexity import GeometricComplexity
from geocomplexity.regularizers.gradient_norm import GradientNorm
from geocomplexity.regularizers.l2 import L2
from geocomplexity.regularizers.spectral_norm import SpectralNorm, spectral_norms

__all__ = [
    "L2",
    "GeometricComplexity",
    "GradientNorm",
    "Regularizer",
    "SpectralNorm",
    "spectral_norms",
]
