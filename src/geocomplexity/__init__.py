"""geocomplexity: the geometric complexity of neural networks.

GC(g, D) = mean over x in D of ‖∂g(x)/∂x‖_F² (Dherin, Munn, Rosca, Barrett,
"Why neural networks find simple solutions: the many regularizers of geometric
complexity", NeurIPS 2022).
"""

from geocomplexity.arc_length import ArcLength, arc_length
from geocomplexity.jacobian import jacobian_sq_norms
from geocomplexity.measure import GCResult, geometric_complexity, measure

__version__ = "0.1.0"

__all__ = [
    "ArcLength",
    "GCResult",
    "__version__",
    "arc_length",
    "geometric_complexity",
    "jacobian_sq_norms",
    "measure",
]
