"""``resnet-double-descent``: the paper's width sweep, PreAct ResNet-18 on CIFAR-10.

Nakkiran et al.'s protocol, which the paper follows: PreAct ResNet-18 with stage
widths ``[k, 2k, 4k, 8k]`` (``k = 64`` is the standard network), CIFAR-10 with
15% of the training labels relabelled uniformly (fixed per seed), random crops
and flips, Adam at lr 1e-4, batch 128. Nakkiran et al. train 4000 epochs; the
``paper`` preset trains 1000 (their epoch-wise curves already show test-loss
double descent there) and a published reproduction trained 500.

The claims are ``double-descent``'s: test loss peaks at the interpolation
threshold and descends again past it, GC peaks at the same width, and
Spearman(GC, test loss) ≥ 0.7.

CIFAR-10 is read from ``--data-dir`` (the python-version folder), never
downloaded. Runs train on ``--device`` (CUDA when present with ``auto``) and
checkpoint every few epochs next to their result file, so a killed sweep
resumes mid-run. The checkpoints stay: they hold the trained networks.
"""

from __future__ import annotations

import functools
import json
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from geocomplexity.atomic import write_text
from geocomplexity.data import Split, cifar10_with_fingerprint, random_crop_flip
from geocomplexity.experiments.runner import Context, DataMismatch, Run
from geocomplexity.experiments.width_sweep import DoubleDescent, sweep_result
from geocomplexity.models import PreActResNet18
from geocomplexity.state import cpu_seeded
from geocomplexity.training import fit

_PRESETS: dict[str, dict[str, Any]] = {
    # the test suite's: a generated folder of a few images
    "smoke": {"widths": [1, 2, 4], "n": None, "epochs": 2, "seeds": 1, "gc": 16},
    # for a GPU: a 5000-image subset sharpens the threshold
    "quick": {
        "widths": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32],
        "n": 5000,
        "epochs": 200,
        "seeds": 1,
        "gc": 1000,
    },
    "paper": {
        "widths": [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32, 40, 48, 64],
        "n": None,
        "epochs": 1000,
        "seeds": 1,
        "gc": 1000,
    },
}
_NOISE = 0.15


def _cifar(data_dir: str | Path) -> Split:
    """CIFAR-10 from ``data_dir``, once per folder in the process.

    Keyed by the resolved folder: ``./cifar`` and its absolute path held two
    copies of the 0.7 GB of tensors for the life of a worker.
    """
    return _cifar_cached(_folder(data_dir))[0]


def _folder(data_dir: str | Path) -> str:
    """``data_dir`` absolute, ``~`` expanded first.

    As :func:`~geocomplexity.data.load_cifar10` expands it: resolved first,
    ``~/data`` was ``CWD/~/data``.
    """
    return str(Path(data_dir).expanduser().resolve())


def _check_same_data(here: dict[str, str], sweep: dict[str, str]) -> None:
    """Refuse to train on other data than the sweep's (a Ray node's own copy).

    Raises:
        DataMismatch: naming both fingerprints, the machine, and the fix.
    """
    if here["fingerprint"] == sweep["fingerprint"]:
        return
    raise DataMismatch(
        f"this run read {here['folder']} on {platform.node()} ({here['fingerprint']}), "
        f"but the sweep is made on {sweep['folder']} ({sweep['fingerprint']}): "
        "every machine of the sweep must hold the same CIFAR-10 at --data-dir "
        "(copy the driver's folder there); nothing was trained"
    )


def _fingerprint(data_dir: str | Path) -> str:
    """The fingerprint of the CIFAR-10 in ``data_dir``, hashed with its load."""
    fingerprint = _cifar_cached(_folder(data_dir))[1]
    assert fingerprint is not None
    return fingerprint


@functools.lru_cache(maxsize=2)
def _cifar_cached(data_dir: str) -> tuple[Split, str | None]:
    return cifar10_with_fingerprint(data_dir)


def _check_checkpoint_data(checkpoint: Path, data: dict[str, str]) -> None:
    """Refuse to resume a checkpoint trained on other data; label a new one.

    A run killed mid-training leaves its checkpoint and no run file, so the
    stored runs' fingerprints cannot tell: the data's is kept beside it, in
    ``<key>.pt.data``, written before the first epoch. A checkpoint without
    one (from before) resumes as old run files are reused: with a warning,
    since the run file it ends in records ``data``; it is labelled then, so
    the warning is given once.

    Raises:
        DataMismatch: the checkpoint was trained on other data.
    """
    label = checkpoint.with_name(checkpoint.name + ".data")
    if not checkpoint.exists():
        write_text(label, json.dumps(data))
        return
    try:
        theirs = json.loads(label.read_text())
    except FileNotFoundError:
        warnings.warn(
            f"checkpoint {checkpoint} does not record the data it was trained "
            f"on (written before data fingerprints): resumed as trained on "
            f"{data['folder']}; delete it if it was not",
            stacklevel=2,
        )
        write_text(label, json.dumps(data))
        return
    except (OSError, ValueError):
        return
    if isinstance(theirs, dict) and theirs.get("fingerprint") != data["fingerprint"]:
        raise DataMismatch(
            f"checkpoint {checkpoint} was trained on {theirs.get('folder')} "
            f"({theirs.get('fingerprint')}), not on {data['folder']} "
            f"({data['fingerprint']}); it is not resumed. Write this sweep "
            "elsewhere (another --out), or delete it (and its .pt.data) to "
            "train the run again on this data"
        )


class ResNetDoubleDescent(DoubleDescent):
    """Test loss and GC of PreAct ResNet-18 (width k) peak together on CIFAR-10."""

    name = "resnet-double-descent"
    claim = (
        "PreAct ResNet-18 on CIFAR-10 (15% label noise, Adam): test loss and GC "
        "peak together at the interpolation threshold of the width sweep"
    )
    uses_dataset = False
    data_label = "cifar10"
    needs_data_dir = True
    folder_data = ("CIFAR-10", 50000, 10000)
    in_all = ("paper",)
    _presets = _PRESETS

    def check(self, context: Context) -> None:
        """Load CIFAR-10 once up front, so a bad folder fails before any run.

        Raises:
            FileNotFoundError: no ``--data-dir`` or a missing batch.
            ValueError: a malformed batch.
        """
        if context.data_dir is None:
            raise FileNotFoundError(
                f"{self.name} reads CIFAR-10 from a local folder: pass --data-dir "
                "PATH (the python-version folder cifar-10-batches-py)"
            )
        _cifar(context.data_dir)

    def data_fingerprint(self, context: Context) -> dict[str, str] | None:
        """The CIFAR-10 folder and the fingerprint of the data in it.

        The folder is not in a run's config (moving CIFAR-10 recomputes
        nothing): the fingerprint is what tells runs made on a generated
        folder from runs on the real one.
        """
        assert context.data_dir is not None  # check() ran
        return {
            "folder": _folder(context.data_dir),
            "fingerprint": _fingerprint(context.data_dir),
        }

    def runs(self, preset: str, dataset: str, seeds: int | None) -> list[Run]:  # noqa: D102
        p = self._presets[preset]
        return [
            Run.make(
                self.name,
                seed,
                dataset="cifar10",
                width=k,
                n=p["n"],
                epochs=p["epochs"],
                lr=1e-4,
                batch=128,
                gc_samples=p["gc"],
                label_noise=_NOISE,
            )
            for k in p["widths"]
            for seed in range(seeds or p["seeds"])
        ]

    def execute(self, run: Run, context: Context) -> dict[str, Any]:  # noqa: D102
        assert context.data_dir is not None  # check() ran
        data = _cifar(context.data_dir)
        here = self.data_fingerprint(context)
        if context.data is not None and here is not None:
            _check_same_data(here, context.data)
        x, y = data.x_train, data.y_train
        if run["n"] is not None and run["n"] < len(x):
            g = torch.Generator().manual_seed(run.seed)
            idx = torch.randperm(len(x), generator=g)[: run["n"]]
            x, y = x[idx], y[idx]
        with cpu_seeded(run.seed):  # the initialization, on the CPU
            model = PreActResNet18(run["width"], data.num_classes)
        checkpoint = context.checkpoint(run)
        if checkpoint is not None:
            assert here is not None
            _check_checkpoint_data(checkpoint, here)
        epochs = run["epochs"]
        history = fit(
            model,
            (x, y),
            (data.x_test, data.y_test),
            optimizer="adam",
            lr=run["lr"],
            batch_size=run["batch"],
            epochs=epochs,
            label_noise=run["label_noise"],
            num_classes=data.num_classes,
            augment=random_crop_flip,
            seed=run.seed,
            eval_every=max(1, epochs // 20),
            checkpoint=checkpoint,
            checkpoint_every=max(1, epochs // 100),
            device=context.device,
            progress=None,
        )
        m = run["gc_samples"]
        return {
            **sweep_result(model, history, x[:m], data.x_test[:m]),
            "n_train": len(x),
            "device": context.device,
            "curve": [
                {k: r[k] for k in ("epoch", "train_loss", "test_loss", "train_acc")}
                for r in history.records
            ],
        }

    def plot(  # noqa: D102
        self, records: Sequence[dict[str, Any]], directory: Path, suffix: str
    ) -> list[Path]:
        path = directory / f"resnet_double_descent{suffix}.png"
        return [self._plot_sweep(records, path)]
