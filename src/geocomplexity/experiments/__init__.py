"""One experiment per claim of the paper, a resumable runner, claims, a report.

``EXPERIMENTS`` maps each command-line name to its experiment.
"""

from geocomplexity.experiments.arc_length import ArcLengthExperiment
from geocomplexity.experiments.base import PRESETS, Experiment, Outcome, reproduce_one
from geocomplexity.experiments.claims import Claim, spearman
from geocomplexity.experiments.init_depth import InitDepth
from geocomplexity.experiments.lr_batch import LrBatch
from geocomplexity.experiments.regularizers import Regularizers
from geocomplexity.experiments.resnet_width import ResNetDoubleDescent
from geocomplexity.experiments.runner import Context, DataMismatch, Run, run_sweep
from geocomplexity.experiments.transfer import Transfer
from geocomplexity.experiments.width_sweep import DoubleDescent, UCurve

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        ArcLengthExperiment(),
        InitDepth(),
        DoubleDescent(),
        UCurve(),
        LrBatch(),
        Regularizers(),
        Transfer(),
        ResNetDoubleDescent(),
    )
}

__all__ = [
    "EXPERIMENTS",
    "PRESETS",
    "Claim",
    "Context",
    "DataMismatch",
    "Experiment",
    "Outcome",
    "Run",
    "reproduce_one",
    "run_sweep",
    "spearman",
]
