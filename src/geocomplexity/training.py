"""A small, explicit training loop: the one the experiments use.

Not a framework: one function, :func:`fit`, that trains a classifier with an
optional penalty, input noise and label noise, and records per epoch the
train/test loss and accuracy, the geometric complexity on fixed subsets, the
penalty and the wall time. Same seed, same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import numbers
import operator
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geocomplexity.atomic import write_text, write_with
from geocomplexity.measure import measure
from geocomplexity.regularizers.base import LossFn, Regularizer, trainable
from geocomplexity.state import differentiable_attention, preserved
from geocomplexity.tuning import fixed_chunks

__all__ = ["History", "apply_label_noise", "fit", "resolve_device"]

Callback = Callable[["History", nn.Module], None]
Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class History:
    """What :func:`fit` recorded: one dict per evaluated epoch, plus the setup.

    Attributes:
        records: per epoch: ``epoch``, ``step``, ``train_loss``, ``train_acc``,
            ``test_loss``, ``test_acc`` (NaN without test data; the accuracies
            are NaN unless the targets are class indices ``(N,)`` for
            ``(N, k)`` logits), ``gc_train``,
            ``gc_test`` (NaN when not tracked that epoch, or when the run
            diverged: non-finite weights or loss), ``penalty`` (mean
            over the steps since the previous record: the epoch's, unless
            ``eval_every > 1``), ``wall_time`` (seconds since the start).
        config: the options of the run.
        effective_label_noise: fraction of training labels that differ from the
            originals (uniform relabelling can draw the true label back).
    """

    records: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    effective_label_noise: float = 0.0

    def __getitem__(self, key: str) -> list[float]:
        """All epochs' values of one field, e.g. ``history["gc_train"]``."""
        return [r[key] for r in self.records]

    @property
    def final(self) -> dict[str, float]:
        """The last record."""
        return self.records[-1]

    def to_json(self) -> str:
        """Serialise as strict JSON.

        In the records, NaN is written as ``null`` and an infinity as the
        string ``"Infinity"`` or ``"-Infinity"`` (JSON has no token for
        either); :meth:`from_json` reads them back.

        A numpy scalar or a one-element tensor (a value a ``fit`` callback
        added to a record: ``np.float32``, ``np.int64``, ``w.norm()``) is
        written as the Python number it holds; ``fit`` serialises the history
        into every checkpoint, where such a value raised ``TypeError``.

        Returns:
            A JSON string.
        """
        clean = [
            {k: _encode(v) for k, v in ((k, _scalar(v)) for k, v in r.items())}
            for r in self.records
        ]
        return json.dumps(
            {**asdict(self), "records": clean}, indent=1, default=_json_scalar
        )

    @classmethod
    def from_json(cls, text: str) -> History:
        """Inverse of :meth:`to_json`.

        Returns:
            The history.
        """
        d = json.loads(text)
        d["records"] = [{k: _decode(v) for k, v in r.items()} for r in d["records"]]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically (temp file, then rename)."""
        write_text(Path(path), self.to_json())


#: A record's infinities in JSON, which has no token for them.
_INFINITIES = {"Infinity": math.inf, "-Infinity": -math.inf}


def _encode(value: Any) -> Any:
    """A record's value as strict JSON holds it: NaN as None, inf as a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    return value


def _decode(value: Any) -> Any:
    """Inverse of :func:`_encode`."""
    if value is None:
        return math.nan
    if isinstance(value, str) and value in _INFINITIES:
        return _INFINITIES[value]
    return value


def _scalar(value: Any) -> Any:
    """``value`` as a Python number where it is a numpy or tensor scalar.

    Anything else comes back as it is.
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _json_scalar(value: Any) -> Any:
    """``json.dumps``'s fallback: a numpy or tensor scalar as its number.

    Raises:
        TypeError: anything else JSON cannot hold, named.
    """
    plain = _scalar(value)
    if plain is value:
        raise TypeError(
            f"History holds a {type(value).__name__}, which JSON cannot hold: "
            "keep numbers (floats, ints) in its records and config"
        )
    return plain


def apply_label_noise(
    y: Tensor, fraction: float, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, float]:
    """Relabel a random ``fraction`` of ``y`` uniformly over all classes.

    As in Nakkiran et al. and the MNIST-1D notebook, a relabelled sample may draw
    its true class again, so the effective noise rate is below ``fraction``
    (by about ``fraction / num_classes``); it is returned.

    Returns:
        ``(noisy labels, effective rate)``.

    Raises:
        ValueError: ``fraction`` outside [0, 1], or ``y`` is not a vector of
            integer class indices.
    """
    if not 0 <= fraction <= 1:  # NaN too; a negative one sliced from the end
        raise ValueError(f"label noise fraction must be in [0, 1], got {fraction!r}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"label noise relabels class indices, a vector of integers; got "
            f"{y.dtype} targets of shape {tuple(y.shape)} (one-hot targets: "
            "pass y.argmax(1))"
        )
    n = len(y)
    chosen = torch.randperm(n, generator=generator)[: round(fraction * n)]
    noisy = y.clone()
    noisy[chosen] = torch.randint(
        0, num_classes, (len(chosen),), generator=generator
    ).to(y)
    return noisy, (noisy != y).double().mean().item()


#: What the input-noise generator's seed adds to ``fit``'s seed (so its
#: stream is not the shuffling generator's, nor another seed's).
_NOISE_SEED_OFFSET = 0x9E3779B97F4A7C15 >> 2


def _optimizer(
    optimizer: str | torch.optim.Optimizer | Callable[..., torch.optim.Optimizer],
    params: Sequence[nn.Parameter],
    lr: float,
) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        # a class is callable too, but params -> optimizer would build it at
        # its own default learning rate, not at lr
        return optimizer(params, lr=lr)
    if optimizer == "sgd":  # no momentum: implicit regularization depends on it
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if callable(optimizer):
        return optimizer(params)
    raise ValueError(
        f"unknown optimizer {optimizer!r}; choose 'sgd', 'adam', a torch optimizer "
        "or its class, or a function of the parameters that returns one"
    )


def _stepped_without_closure(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt``, refused if its ``step`` needs a closure, which ``fit`` never passes.

    Raises:
        ValueError: ``torch.optim.LBFGS`` (it failed at the first step with
            torch's "step() missing 1 required positional argument: 'closure'").
    """
    if isinstance(opt, torch.optim.LBFGS):
        raise ValueError(
            "fit steps the optimizer without a closure, and LBFGS needs one "
            "(it re-evaluates the loss); train it in a loop of your own, with "
            "the penalty inside the closure: loss + regularizer(model, x, y)"
        )
    return opt


#: The optimizer settings a resumed run must share with its checkpoint (an
#: optimizer's load_state_dict would quietly put the checkpoint's back).
_HYPERPARAMETERS = (
    "lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps",
    "alpha", "centered", "amsgrad", "maximize",
)  # fmt: skip


def _hyperparameters(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: g[k] for k in _HYPERPARAMETERS if k in g} for g in groups]


def _digest(*tensors: Tensor | None) -> str:
    """A hash of the tensors' dtypes, shapes and bytes (``None`` hashed as such).

    What a checkpoint's data must match: the sample count alone let other data
    of that size resume the run (and train on the checkpoint's labels).
    """
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when torch sees a device, else the CPU.

    Returns:
        The device.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def _evaluate(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, batch_size: int = 2048
) -> tuple[float, float]:
    loss, correct = 0.0, 0
    # accuracy needs class indices: regression or class-probability targets
    # have none, and their accuracy is NaN rather than 0
    indices = y.dim() == 1 and not y.is_floating_point()
    with preserved(model, mode="eval"):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            out = model(xb)
            loss += loss_fn(out, yb).item() * len(xb)
            indices = indices and out.dim() == 2
            if indices:
                correct += (out.argmax(1) == yb).sum().item()
    return loss / len(x), correct / len(x) if indices else math.nan


def _integer(name: str, value: Any, optional: bool = True) -> Any:
    """``value`` as a Python ``int`` (``None`` where ``optional``), or a clear error.

    A sweep's numpy scalars (np.int64 epochs) come back as Python ints:
    History's JSON and a weights_only checkpoint take no numpy type.

    Raises:
        ValueError: a float (``3.0``), a bool or any other non-integer, named.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if isinstance(value, float) and value.is_integer():
            hint = f"; pass {name}={int(value)}"
        raise ValueError(
            f"{name} must be an integer{' or None' if optional else ''}, got "
            f"{value!r} ({type(value).__name__}){hint}"
        )
    return int(value)


def fit(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor] | None = None,
    *,
    optimizer: str
    | torch.optim.Optimizer
    | Callable[..., torch.optim.Optimizer] = "sgd",
    lr: float = 0.01,
    batch_size: int | None = 128,
    drop_last: bool = False,
    epochs: int | None = None,
    steps: int | None = None,
    regularizer: Regularizer | None = None,
    loss_fn: LossFn | None = None,
    input_noise_std: float = 0.0,
    label_noise: float = 0.0,
    num_classes: int | None = None,
    seed: int = 0,
    track_gc_every: int | None = None,
    eval_every: int = 1,
    gc_subset: int = 512,
    gc_wrt: str | None = None,
    stop_at_train_loss: float | None = None,
    device: str | torch.device = "auto",
    callbacks: Sequence[Callback] = (),
    augment: Augment | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1,
    progress: bool | None = None,
) -> History:
    """Train ``model`` in place and record what happened.

    Args:
        model: the classifier (logits out); trained in place on ``device``.
        train: ``(x, y)`` tensors; ``y`` class indices for the default loss.
        test: optional ``(x, y)`` evaluated each epoch.
        optimizer: ``"sgd"`` (plain, no momentum; the default because implicit
            gradient regularization is a property of plain gradient descent),
            ``"adam"``, a torch optimizer, a torch optimizer class (built with
            ``lr``, e.g. ``torch.optim.AdamW``), or ``params -> optimizer``.
        lr: learning rate for the named optimizers and an optimizer class.
        batch_size: minibatch size; ``None`` for full batch.
        drop_last: drop each epoch's last, smaller minibatch (then every step
            sees ``batch_size`` samples, as learning-rate and batch-size
            comparisons want; the dropped samples change with the shuffle).
        epochs: epochs to train (one of ``epochs``/``steps``).
        steps: optimizer steps to train (records still come per epoch).
        regularizer: a penalty term added to the loss each step; it is handed
            the step's forward pass, which it reuses where it can (not the
            ``"jvp"`` GC penalty, ``subsample < 1``, ``wrt=`` or a submodule
            ``output=``: those run passes of their own, with their own
            dropout masks).
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        input_noise_std: std of Gaussian noise added to each training batch.
        label_noise: fraction of training labels relabelled uniformly at random,
            fixed by ``seed``; the effective rate is recorded.
        num_classes: for label noise; default ``y.max() + 1``.
        seed: seeds shuffling, noise, probes and the model's own randomness
            (dropout); the global RNG state is restored afterwards.
        eval_every: record (evaluate train and test sets) every this many
            epochs, and at the first and last and wherever GC is tracked; long
            full-batch runs use it to avoid evaluating every epoch.
        track_gc_every: measure exact GC on fixed subsets of train and test
            every this many epochs (and at epoch 0); ``None`` never.
        gc_subset: size of those subsets (their first samples).
        gc_wrt: track GC with respect to this submodule's output instead of
            the input (a language model's token embeddings; see
            :func:`geocomplexity.measure`).
        stop_at_train_loss: stop at the end of the first epoch whose train loss
            (evaluated over the whole set) is at or below this.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
        callbacks: ``callback(history, model)`` after each epoch's record,
            the first at epoch 0, before any step: a callback that steps a
            learning-rate scheduler once an epoch skips that one
            (``if history.records[-1]["epoch"] > 0``). A callback with
            ``state_dict()`` and ``load_state_dict()`` (delegating to its
            scheduler) has its state saved in the checkpoint and put back on
            resume; without them a scheduler such as ``LambdaLR``, which
            counts its own epochs, restarts its schedule.
        augment: ``augment(batch, generator) -> batch`` applied to each training
            batch on the device (random crops and flips, say); it must draw its
            randomness from ``generator`` so the run stays reproducible.
        checkpoint: a file to resume from and to save to: the model, the
            optimizer (and the values of its tensors outside the model, a
            temperature in ``loss_fn`` say), the noisy labels, every random
            state and the history so far, written atomically every
            ``checkpoint_every`` epochs and at the end, loaded with
            ``weights_only=True``. A run that is killed resumes
            where its last checkpoint left it and gives the numbers an
            uninterrupted run gives (on the same kind of device: resumed on
            another, a CUDA checkpoint on the CPU say, it carries on with that
            device's random streams started afresh, and warns). A checkpoint
            of another run (other options, another ``loss_fn`` or
            ``augment`` by name, or other train or test tensors: their bytes
            are hashed) is refused.
        checkpoint_every: epochs between checkpoints.
        progress: progress bar over epochs; ``None`` on a terminal.

    Returns:
        The :class:`History`.

    Raises:
        ValueError: bad options (no length given, negative rates, mismatched
            shapes, unknown optimizer), or a finite-difference
            ``GradientNorm`` with an optimizer holding tensors outside the
            model (its gradient misses them).
        TypeError: ``train`` or ``test`` that is no pair ``(x, y)`` of
            tensors (numpy arrays, a ``Dataset`` or ``DataLoader``); float
            targets of shape ``(N,)`` for the default cross-entropy; a
            ``regularizer`` that is no
            :class:`~geocomplexity.regularizers.Regularizer`, or one that
            differentiates with respect to integer inputs; with
            ``checkpoint``, a callback whose ``state_dict()`` holds what
            ``torch.load(weights_only=True)`` refuses (at the first save).
    """
    from tqdm.auto import tqdm

    # a sweep's numpy scalars (np.int64 epochs) as Python numbers: History's
    # JSON and a weights_only checkpoint take no numpy type
    # (a float such as 3.0 is refused by name)
    epochs = _integer("epochs", epochs)
    steps = _integer("steps", steps)
    batch_size = _integer("batch_size", batch_size)
    track_gc_every = _integer("track_gc_every", track_gc_every)
    seed = _integer("seed", seed, optional=False)
    eval_every = _integer("eval_every", eval_every, optional=False)
    checkpoint_every = _integer("checkpoint_every", checkpoint_every, optional=False)
    if isinstance(gc_subset, numbers.Integral):
        gc_subset = operator.index(gc_subset)
    lr, input_noise_std, label_noise = (
        float(v) for v in (lr, input_noise_std, label_noise)
    )
    if stop_at_train_loss is not None:
        stop_at_train_loss = float(stop_at_train_loss)
    for name, pair in (("train", train), ("test", test)):
        if pair is None and name == "test":
            continue
        if not (
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and all(isinstance(t, Tensor) for t in pair)
        ):
            got = type(pair).__name__
            fix = (
                "for a DataLoader or Dataset, stack it first (fit shuffles and "
                "batches the tensors itself)"
            )
            if isinstance(pair, (tuple, list)) and len(pair) == 2:
                # numpy arrays or lists: "got tuple of length 2" named no fault
                got += f" of ({', '.join(type(t).__name__ for t in pair)})"
                fix = (
                    "convert them with torch.as_tensor (the inputs as float32, "
                    "class labels as int64)"
                )
            elif isinstance(pair, (tuple, list)):
                got += f" of length {len(pair)}"
            elif isinstance(pair, Tensor):
                fix = f"give the targets too: {name}=(x, y)"
            raise TypeError(
                f"{name} must be a pair (x, y) of tensors, got {got}; {fix}"
            )
        px = pair[0]
        if px.is_floating_point() or px.is_complex():
            bad = int((~torch.isfinite(px)).sum())
            if bad:
                raise ValueError(
                    f"{name} inputs contain {bad} NaN or infinite entries (of "
                    f"{px.numel()}); clean or drop those samples before training"
                )
    x, y = train
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"train must be (x, y) with the same non-zero length, got {len(x)} "
            f"and {len(y)}"
        )
    if test is not None and (len(test[0]) == 0 or len(test[0]) != len(test[1])):
        raise ValueError(
            f"test must be (x, y) with the same non-zero length, got "
            f"{len(test[0])} and {len(test[1])}; pass test=None for no test set"
        )
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= or steps=")
    if regularizer is not None and not isinstance(regularizer, Regularizer):
        raise TypeError(
            "regularizer must be a geocomplexity.regularizers.Regularizer (a "
            "term such as GeometricComplexity(0.01), or a sum of terms), got "
            f"{type(regularizer).__name__} {regularizer!r}"
        )
    if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
        raise ValueError("epochs/steps must be positive")
    if not 0 <= label_noise <= 1:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise!r}")
    if not 0 <= input_noise_std < math.inf:  # NaN too
        raise ValueError(
            f"input_noise_std must be finite and >= 0, got {input_noise_std!r}"
        )
    if track_gc_every is not None and track_gc_every < 1:
        raise ValueError(
            f"track_gc_every must be positive or None, got {track_gc_every!r}"
        )
    if not isinstance(gc_subset, int) or gc_subset < 1:
        raise ValueError(f"gc_subset must be a positive integer, got {gc_subset!r}")
    if not 0 < lr < math.inf:
        raise ValueError(f"lr must be positive and finite, got {lr!r}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be positive, got {eval_every!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive or None, got {batch_size!r}")
    if drop_last and batch_size is not None and batch_size > len(x):
        raise ValueError(
            f"drop_last=True with batch_size={batch_size} > {len(x)} training "
            "samples would drop every sample; lower batch_size"
        )
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every!r}")
    if checkpoint is not None and Path(checkpoint).is_dir():
        # found now, not at the first save an epoch of training later
        raise ValueError(
            f"checkpoint {checkpoint} is a folder; name a file in it "
            f"({Path(checkpoint) / 'run.pt'}, say)"
        )
    if not torch.is_floating_point(x):  # token ids: GC lives at the embeddings
        if track_gc_every is not None and gc_wrt is None:
            raise ValueError(
                f"the inputs are {x.dtype}, and GC differentiates with respect to "
                "them: pass gc_wrt='<embedding submodule>' to track GC at the "
                "embeddings"
            )
        if regularizer is not None and regularizer.reuses_input_grad:
            raise TypeError(
                f"the inputs are {x.dtype}, and the regularizer differentiates "
                "with respect to them: give its GC term wrt='<embedding "
                "submodule>' (GeometricComplexity(λ, wrt='embed'))"
            )
        if input_noise_std > 0:
            raise ValueError(
                f"input_noise_std adds Gaussian noise, which {x.dtype} inputs "
                "cannot take"
            )
    if loss_fn is None:
        for name, pair in (("train", train), ("test", test)):
            if pair is not None and pair[1].dim() == 1 and pair[1].is_floating_point():
                # cross-entropy's own error names no fix ("expected target dtype
                # to be Long or Byte, but got Float")
                raise TypeError(
                    f"{name} targets are {pair[1].dtype} of shape "
                    f"{tuple(pair[1].shape)}, but the default loss, cross-entropy, "
                    "takes class indices: convert them with y.long(), or pass "
                    "loss_fn= (e.g. torch.nn.functional.mse_loss for regression, "
                    "with targets shaped as the outputs)"
                )
    dev = resolve_device(device)
    loss_fn = loss_fn or F.cross_entropy
    n = len(x)
    bs = n if batch_size is None else min(batch_size, n)
    per_epoch = n // bs if drop_last else math.ceil(n / bs)
    total_steps = steps if steps is not None else epochs * per_epoch  # type: ignore[operator]
    num_epochs = math.ceil(total_steps / per_epoch)

    gen = torch.Generator().manual_seed(seed)
    # input noise draws from a stream of its own: drawn from ``gen``, it moved
    # the shuffles that follow, so a noise run saw other batches than the
    # noise-free run of its seed that it is compared with, from its second
    # epoch on (a difference that is not the noise's)
    noise_gen = torch.Generator().manual_seed(seed + _NOISE_SEED_OFFSET)
    history = History(
        config={
            "optimizer": optimizer if isinstance(optimizer, str) else repr(optimizer),
            "lr": lr,
            "batch_size": batch_size,
            "drop_last": drop_last,
            "epochs": epochs,
            "steps": steps,
            "regularizer": repr(regularizer),
            "input_noise_std": input_noise_std,
            "label_noise": label_noise,
            "seed": seed,
            "device": str(dev),
        }
    )
    # the data a checkpoint was written on (labels before the noise): hashed
    # only where there is a checkpoint to compare it with
    data = (
        None
        if checkpoint is None
        else {
            "train": _digest(x, y),
            "test": None if test is None else _digest(test[0], test[1]),
        }
    )
    if label_noise > 0:
        top = int(y.max().item())
        k = num_classes or top + 1
        if top >= k:
            raise ValueError(
                f"num_classes={k}, but the labels go up to {top}; "
                "give the true number of classes (or leave it out)"
            )
        y, history.effective_label_noise = apply_label_noise(y, label_noise, k, gen)
    model.to(dev)
    x, y = x.to(dev), y.to(dev)
    xt, yt = (test[0].to(dev), test[1].to(dev)) if test is not None else (None, None)
    reg_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    if regularizer is not None:
        regularizer.seed(reg_gen)
    params = trainable(model)
    opt = _stepped_without_closure(_optimizer(optimizer, params, lr))
    if not isinstance(optimizer, (str, type)):
        # an optimizer, or a function that builds one, sets its own rate
        lrs = [float(g["lr"]) for g in opt.param_groups]
        history.config["lr"] = lrs[0] if len(set(lrs)) == 1 else lrs
    hyperparameters = _hyperparameters(opt.param_groups)
    # trainable parameters the optimizer does not hold (a user's optimizer
    # over a part of the model): the backward pass reaches them too, and
    # opt.zero_grad does not, so their .grad is cleared each step by hand
    held = [p for g in opt.param_groups for p in g["params"]]
    held_ids = {id(p) for p in held}
    unheld = [p for p in params if id(p) not in held_ids]
    # and the optimizer's tensors outside the model (a learnable temperature
    # in loss_fn): the backward pass, told its inputs, reaches them only when
    # named, and without a gradient they were never stepped
    in_model = {id(p) for p in params}
    outside = [p for p in held if p.requires_grad and id(p) not in in_model]
    if (
        outside
        and regularizer is not None
        and not (regularizer.reaches_tensors_outside_model)
    ):
        # the finite-difference gradient norm's 2λHg comes from a pass at
        # shifted model parameters: such a tensor would train on the task
        # loss alone, silently (its penalty gradient read 0.35 where double
        # backprop gives 3.4)
        raise ValueError(
            f"the optimizer holds {len(outside)} tensor(s) outside the model (a "
            "parameter of loss_fn, say), and GradientNorm(method="
            "'finite_difference') gives such tensors no share of its "
            "gradient: use method='double_backprop', or make the tensor a "
            "parameter of the model"
        )
    params = params + outside
    needs_input_grad = regularizer is not None and regularizer.reuses_input_grad
    # attention by its math kernel when a penalty may backpropagate through
    # the pass twice (the fused kernels have no double backward)
    attention = (
        contextlib.nullcontext if regularizer is None else differentiable_attention
    )

    def record(epoch: int, step: int, penalty: float, t0: float) -> None:
        tr_loss, tr_acc = _evaluate(model, x, y, loss_fn)
        te_loss, te_acc = (
            _evaluate(model, xt, yt, loss_fn)
            if xt is not None
            else (math.nan, math.nan)
        )
        gc_tr = gc_te = math.nan
        # a diverged model (NaN weights, or outputs that overflow the loss)
        # has no GC: measure refuses its non-finite Jacobian norms with a
        # ValueError, which ended the run and lost its records. Its GC is NaN
        if track_gc_every and epoch % track_gc_every == 0:
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            if finite and math.isfinite(tr_loss):
                gc_tr = measure(
                    model, x[:gc_subset], method="exact", progress=False, wrt=gc_wrt
                ).value
            if xt is not None and finite and math.isfinite(te_loss):
                gc_te = measure(
                    model, xt[:gc_subset], method="exact", progress=False, wrt=gc_wrt
                ).value
        history.records.append(
            {
                "epoch": epoch,
                "step": step,
                "train_loss": tr_loss,
                "train_acc": tr_acc,
                "test_loss": te_loss,
                "test_acc": te_acc,
                "gc_train": gc_tr,
                "gc_test": gc_te,
                "penalty": penalty,
                "wall_time": time.perf_counter() - t0,
            }
        )
        for cb in callbacks:
            cb(history, model)

    # what a checkpoint must agree with to be resumed by this call
    fingerprint = {
        "samples": n,
        "batch_size": bs,
        # only when set: checkpoints written before the option still resume
        **({"drop_last": True} if drop_last else {}),
        # an early-stopped checkpoint is a finished run: one without the
        # threshold, or with another, must not be handed its history
        **(
            {"stop_at_train_loss": stop_at_train_loss}
            if stop_at_train_loss is not None
            else {}
        ),
        "total_steps": total_steps,
        "lr": lr,
        "seed": seed,
        "label_noise": label_noise,
        "input_noise_std": input_noise_std,
        "optimizer": optimizer
        if isinstance(optimizer, str)
        else optimizer.__name__
        if isinstance(optimizer, type)
        else type(optimizer).__name__,
        "regularizer": repr(regularizer),
    }
    # what shapes the records a resumed (or finished) run hands back; kept
    # beside the fingerprint, and checked only where a checkpoint has it, so
    # checkpoints written before it still resume
    recording = {
        "eval_every": eval_every,
        "track_gc_every": track_gc_every,
        "gc_subset": gc_subset,
        "gc_wrt": gc_wrt,
    }
    # the augmentation, by name (a partial's arguments are not compared), None
    # without: kept beside the fingerprint and checked only where a checkpoint
    # has it, so one written before it still resumes; a finished run without
    # augmentation must not be handed to a run with it, nor the reverse
    augmentation = None if augment is None else _callable_name(augment, "__name__")

    # the loss, by name likewise (a module's by its class): a run with another
    # one must not be handed this one's history and weights
    loss_name = _callable_name(loss_fn, "__qualname__")

    def save(epoch: int, step: int, pen_sum: Tensor | None, pen_count: int) -> None:
        state = {
            "fingerprint": fingerprint,
            "recording": recording,
            "augment": augmentation,
            "loss_fn": loss_name,
            "data": data,
            "penalty_sum": pen_sum,
            "penalty_count": pen_count,
            "epoch": epoch,
            "step": step,
            "elapsed": time.perf_counter() - t0,
            "model": model.state_dict(),
            # the optimizer's tensors outside the model (a temperature in
            # loss_fn): trained, and neither in the model's state nor the
            # optimizer's, so a resumed run restarted them from their values
            # at the call
            "outside": [p.detach().clone() for p in outside],
            "optimizer": opt.state_dict(),
            "hyperparameters": hyperparameters,
            "labels": y,
            "device_type": dev.type,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "generator": gen.get_state(),
            "reg_generator": reg_gen.get_state(),
            "noise_generator": noise_gen.get_state(),
            "regularizer": regularizer.state_dict() if regularizer else {},
            "callbacks": [_callback_state(i, cb) for i, cb in enumerate(callbacks)],
            "history": history.to_json(),
        }
        write_with(Path(checkpoint), lambda f: torch.save(state, f))  # type: ignore[arg-type]

    t0 = time.perf_counter()
    step = start = 0
    # the penalty's running sum stays on the device: no sync per step
    pen_sum: Tensor | None = None
    pen_count = 0
    devices = []
    if dev.type == "cuda":
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    # VJP chunks by the default rule, untimed (geocomplexity.tuning): batched
    # and looped VJPs may differ in the last bit, and the same seed must give
    # the same numbers
    with torch.random.fork_rng(devices=devices), fixed_chunks():
        # seed only the generators fork_rng restores: torch.manual_seed would
        # reseed every CUDA device, a CPU run's included, and leave them so
        torch.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        model.train()
        resumed = (
            _load_checkpoint(Path(checkpoint))
            if checkpoint is not None and Path(checkpoint).is_file()
            else None
        )
        # the settings the run started with: the optimizer's param groups
        # hold the current ones, which a scheduler (a callback) has moved.
        # Checkpoints written before "hyperparameters" have only those
        theirs_hyper = (
            resumed.get("hyperparameters")
            if resumed is not None and "hyperparameters" in resumed
            else _hyperparameters(resumed["optimizer"].get("param_groups", []))
            if resumed is not None and isinstance(resumed.get("optimizer"), dict)
            else None
        )
        if resumed is not None and (
            resumed.get("fingerprint") != fingerprint
            or resumed.get("recording", recording) != recording
            or resumed.get("augment", augmentation) != augmentation
            # checkpoints written before "data" or "loss_fn" still resume
            or resumed.get("data", data) != data
            or resumed.get("loss_fn", loss_name) != loss_name
            or theirs_hyper != hyperparameters
        ):
            theirs = {
                **(resumed.get("fingerprint") or {}),
                **(resumed.get("recording") or {}),
                "augment": resumed.get("augment", augmentation),
                "loss_fn": resumed.get("loss_fn", loss_name),
                "data": resumed.get("data", data),
                "optimizer settings": theirs_hyper,
            }
            mine = {
                **fingerprint,
                **recording,
                "augment": augmentation,
                "loss_fn": loss_name,
                "data": data,
                "optimizer settings": hyperparameters,
            }
            raise ValueError(
                f"checkpoint {checkpoint} was written by a different run "
                f"({theirs} != {mine}); delete it or pass another checkpoint path"
            )
        if resumed is None:
            record(0, 0, math.nan, t0)
        else:
            # checkpoints written before "outside" have none to put back
            saved = resumed.get("outside")
            theirs_shapes = [tuple(t.shape) for t in saved or []]
            mine_shapes = [tuple(p.shape) for p in outside]
            if saved is not None and theirs_shapes != mine_shapes:
                raise ValueError(
                    f"checkpoint {checkpoint} was written by a different run: "
                    "its optimizer held tensors outside the model of shapes "
                    f"{theirs_shapes}, this one {mine_shapes}; delete it or "
                    "pass another checkpoint path"
                )
            start, step = resumed["epoch"], resumed["step"]
            t0 -= resumed["elapsed"]
            model.load_state_dict(resumed["model"])
            opt.load_state_dict(resumed["optimizer"])
            if saved is not None:
                with torch.no_grad():
                    for p, value in zip(outside, saved, strict=True):
                        p.copy_(value)
            y = resumed["labels"].to(dev)
            torch.set_rng_state(resumed["rng"])
            # the device's own streams (dropout's, the penalty's fallback
            # generator) resume on that kind of device alone: a CUDA
            # generator's state is not a CPU one's. Checkpoints written before
            # "device_type" held a CUDA state exactly when they were on CUDA
            written_on = resumed.get(
                "device_type", "cpu" if resumed["cuda_rng"] is None else "cuda"
            )
            if written_on == dev.type:
                # never on a CPU run: fork_rng(devices=[]) would not put the
                # caller's CUDA generator back
                if resumed["cuda_rng"] is not None and dev.type == "cuda":
                    torch.cuda.set_rng_state(resumed["cuda_rng"], dev)
                reg_gen.set_state(resumed["reg_generator"])
            else:
                warnings.warn(
                    f"checkpoint {checkpoint} was written on {written_on}, "
                    f"resumed on {dev.type}: the model, optimizer, labels and "
                    "data order carry over, but the device's random streams "
                    "(dropout, penalty probes) start afresh from the seed, so "
                    "the numbers are not those of an uninterrupted run",
                    stacklevel=2,
                )
            pen_count = resumed["penalty_count"]
            if resumed["penalty_sum"] is not None:
                pen_sum = resumed["penalty_sum"].to(dev)
            gen.set_state(resumed["generator"])
            # checkpoints written before it drew the noise from "generator"
            if "noise_generator" in resumed:
                noise_gen.set_state(resumed["noise_generator"])
            if regularizer is not None:
                regularizer.load_state_dict(resumed["regularizer"])
            _load_callback_states(callbacks, resumed.get("callbacks"), checkpoint)
            done = History.from_json(resumed["history"])
            history.records = done.records
            history.effective_label_noise = done.effective_label_noise
        # a run that ended (early stop included) was saved as epoch num_epochs
        bar = tqdm(
            range(start + 1, num_epochs + 1),
            desc="training",
            unit="epoch",
            leave=False,
            disable=None if progress is None else not progress,
        )
        for epoch in bar:
            # full batch: the mean loss does not depend on the order, so skip the
            # shuffle and the copy it would cost every step
            batches = (
                [(x, y)]
                if bs == n
                else (
                    (x[i], y[i])
                    for i in torch.randperm(n, generator=gen).to(dev).split(bs)
                    if len(i) == bs or not drop_last
                )
            )
            for xb, yb in batches:
                if step >= total_steps:
                    break
                if augment is not None:
                    xb = augment(xb, gen)
                if input_noise_std > 0:
                    noise = torch.randn(xb.shape, generator=noise_gen, dtype=xb.dtype)
                    xb = xb + input_noise_std * noise.to(dev)
                if needs_input_grad:
                    xb = xb.detach().requires_grad_(True)
                opt.zero_grad(set_to_none=True)
                for p in unheld:
                    p.grad = None
                with attention():  # a penalty differentiates this pass twice
                    out = model(xb)
                loss = loss_fn(out, yb)
                if regularizer is None:
                    loss.backward(inputs=params)
                else:  # the term backpropagates loss + itself (see its docs)
                    pen = regularizer.backward(
                        loss, model, xb, yb, outputs=out, loss_fn=loss_fn, params=params
                    )
                    pen_sum = pen if pen_sum is None else pen_sum + pen
                    pen_count += 1
                opt.step()
                step += 1
            reached = (
                stop_at_train_loss is not None
                and _evaluate(model, x, y, loss_fn)[0] <= stop_at_train_loss
            )
            last = reached or step >= total_steps
            # GC is measured in a record: an epoch it is due is recorded too
            gc_due = track_gc_every is not None and epoch % track_gc_every == 0
            if epoch % eval_every == 0 or gc_due or last:
                pen_mean = (
                    pen_sum.item() / pen_count if pen_sum is not None else math.nan
                )
                pen_sum, pen_count = None, 0
                record(epoch, step, pen_mean, t0)
                bar.set_postfix(loss=f"{history.final['train_loss']:.3g}")
            if checkpoint is not None and (last or epoch % checkpoint_every == 0):
                save(num_epochs if last else epoch, step, pen_sum, pen_count)
            if last:
                break
        bar.close()
    return history


def _callable_name(fn: Any, type_name: str) -> str:
    """``module.qualname`` of a function; of an object without one, its type's.

    ``type_name`` is the type's attribute that names it there (``__name__``
    for an augmentation, ``__qualname__`` for a loss: as each was first
    stored in checkpoints, which must still resume).
    """
    name = getattr(fn, "__qualname__", None) or getattr(type(fn), type_name)
    return f"{getattr(fn, '__module__', None)}.{name}"


def _callback_state(i: int, cb: Callback) -> Any:
    """A callback's ``state_dict()`` where it has one (a scheduler's), else None.

    Refused here where the resume's ``torch.load(weights_only=True)`` would
    refuse it (an object of the callback's own class, a function): saved, it
    made every checkpoint of the run one that cannot be resumed, found only
    at the resume and naming no callback.
    """
    state_dict = getattr(cb, "state_dict", None)
    if not callable(state_dict):
        return None
    state = state_dict()
    buffer = io.BytesIO()
    try:
        torch.save(state, buffer)
        buffer.seek(0)
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as err:
        # weights_only's message opens with advice on loading unsafely; the
        # line naming the refused class is the one that says what to change
        lines = str(err).splitlines() or [type(err).__name__]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
        raise TypeError(
            f"callback {i} ({type(cb).__name__}): its state_dict() holds what "
            "a checkpoint cannot be resumed from, as torch.load(weights_only="
            "True) reads it (tensors, numbers, strings, None and lists, tuples "
            f"and dicts of them): {why.strip()}"
        ) from err
    return state


def _load_callback_states(
    callbacks: Sequence[Callback], states: list[Any] | None, checkpoint: Any
) -> None:
    """Put back the state of each callback that has one, by position.

    A callback stepping a learning-rate scheduler kept its schedule outside
    the checkpoint: a resumed ``LambdaLR`` restarted at its first epoch (lr
    0.0375 at the end where the uninterrupted run reached 0.01875).
    """
    saved = states if states is not None else []
    for i, cb in enumerate(callbacks):
        load = getattr(cb, "load_state_dict", None)
        if not callable(load):
            continue
        if i < len(saved) and saved[i] is not None:
            load(saved[i])
        else:  # a checkpoint from before, or callbacks passed in another order
            warnings.warn(
                f"checkpoint {checkpoint} holds no state for callback {i} "
                f"({type(cb).__name__}), which has a state_dict: it goes on from "
                "the state it was given, not the interrupted run's",
                stacklevel=3,
            )


#: What every checkpoint :func:`fit` writes holds (``recording`` and
#: ``augment`` came later and are optional: older checkpoints still resume).
_CHECKPOINT_KEYS = (
    "fingerprint", "penalty_sum", "penalty_count", "epoch", "step", "elapsed",
    "model", "optimizer", "labels", "rng", "cuda_rng", "generator",
    "reg_generator", "regularizer", "history",
)  # fmt: skip


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint is data, never code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"cannot resume from {path}: {err}. Delete the file to start over."
        ) from err
    # another file at that path (a model's bare state_dict, a tensor) would
    # fail as an AttributeError or KeyError halfway through restoring it
    if not isinstance(state, dict):
        raise ValueError(
            f"cannot resume from {path}: it holds a {type(state).__name__}, not "
            "a checkpoint written by fit. Delete the file to start over, or "
            "pass another checkpoint path."
        )
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"cannot resume from {path}: it is not a checkpoint written by fit "
            f"(no {', '.join(missing)}). Delete the file to start over, or pass "
            "another checkpoint path."
        )
    return state
