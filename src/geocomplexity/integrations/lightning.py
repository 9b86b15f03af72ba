"""A Lightning callback that logs the geometric complexity while training.

::

    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    trainer = lightning.Trainer(
        callbacks=[GeometricComplexityCallback(train=x_train[:512], every_n_epochs=1)]
    )

logs ``gc/train`` and ``gc/val`` (and their standard errors) through the
module's logger, measured with :func:`geocomplexity.measure` on fixed subsets,
without changing the model's state. To *regularize* with GC in Lightning, add a
term in ``training_step`` (see the README)::

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.requires_grad_()  # the penalty reuses this forward pass
        out = self(x)
        loss = F.cross_entropy(out, y)
        return loss + self.penalty(self, x, y, outputs=out)

Needs ``pip install 'geocomplexity[lightning]'``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(
        "geocomplexity.integrations.lightning needs Lightning: "
        "pip install 'geocomplexity[lightning]'"
    ) from err

from geocomplexity.jacobian import (
    _check_scalar_batch,
    as_int,
    check_input,
    check_names,
)
from geocomplexity.measure import (
    InputKey,
    batch_inputs,
    check_measure_options,
    measure,
)
from geocomplexity.state import eager, loader_generators, rngs_kept
from geocomplexity.tuning import fixed_chunks

__all__ = ["GeometricComplexityCallback"]

# the arguments of measure() the callback fills in itself
_SET_HERE = frozenset({"model", "data", "distributed"})


def _inputs(batch: Any, input_key: InputKey = None) -> Tensor:
    """``measure``'s reading of a batch (see :func:`~geocomplexity.measure`)."""
    try:
        return batch_inputs(batch, input_key)
    except TypeError as err:
        raise TypeError(
            f"{err}; or pass the subsets to GeometricComplexityCallback(train=..., "
            "val=...) as tensors"
        ) from err


def _first(loaders: Any) -> Any:
    """The loader the subset is taken from: the first of several."""
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return loaders


def _unpadded(loaders: Any) -> int | None:
    """How many inputs a sharded loader has before its sampler pads it.

    A ``DistributedSampler`` (``drop_last=False``) repeats the first inputs
    until every rank's shard is as long: interleaved back, the shards end
    with those inputs a second time. ``None`` where the loader is not sharded
    so, or its length is unknown.
    """
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(_first(loaders), "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    try:
        return len(sampler.dataset)
    except TypeError:
        return None


def _take(loaders: Any, num_samples: int, input_key: InputKey = None) -> Tensor | None:
    """The first ``num_samples`` inputs of a loader (or the first of several)."""
    loaders = _first(loaders)
    if loaders is None:
        return None
    taken: list[Tensor] = []
    count = 0
    # iterating a loader draws its shuffle and worker seeds from the global RNG
    # or from its own generators, and its augmentations may draw from numpy's
    # or Python's: put them all back, or adding the callback would change the
    # training run
    # a loader with persistent workers hands out one iterator, which the
    # trainer has started already: iterating the loader would reset it, and
    # the epoch would lose batches. Take from an iterator of our own instead.
    persistent = getattr(loaders, "persistent_workers", False) and hasattr(
        loaders, "_get_iterator"
    )
    batches = None
    with rngs_kept(loader_generators(loaders)):
        try:
            batches = loaders._get_iterator() if persistent else iter(loaders)
            for batch in batches:
                x = _inputs(batch, input_key)
                taken.append(x[: num_samples - count].detach().cpu())
                count += len(taken[-1])
                if count >= num_samples:
                    break
        finally:
            if persistent:  # its workers, now, not when it is collected
                getattr(batches, "_shutdown_workers", lambda: None)()
    return torch.cat(taken) if taken else None


def _shared(x: Tensor | None, num_samples: int) -> Tensor | None:
    """One subset for every rank, from each rank's take of its own loader.

    Under DDP, Lightning hands each rank a ``DistributedSampler``'s shard of
    a loader: rank ``r`` of ``W`` yields the loader's inputs ``r, r + W, ...``.
    Interleaving the ranks' takes restores the loader's order, so every rank
    holds the first ``num_samples`` inputs one process would have taken.
    Where every rank took the same inputs (a loader that is not sharded),
    they are kept once.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return x
    takes: list[Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(takes, x)
    found = [t for t in takes if t is not None]
    if not found:
        return None
    if len(found) == len(takes) and all(
        t.shape == found[0].shape and torch.equal(t, found[0]) for t in found
    ):
        return found[0]
    rows = [t[i] for i in range(max(map(len, found))) for t in found if i < len(t)]
    return torch.stack(rows[:num_samples])


class GeometricComplexityCallback(Callback):
    """Log GC on fixed train and validation subsets every N epochs or steps.

    The subsets are fixed once: given here, or the first ``num_samples`` inputs
    the train and validation loaders yield when training starts (a shuffled
    loader's first batches, then kept). Under DDP, where each rank's loader
    yields its shard, the ranks' takes are interleaved back into the loader's
    order, so every rank holds the same subset; each rank measures its share
    of it and the ranks merge, so the logged value is the subset's.

    Args:
        train: inputs ``(N, *in_shape)`` for ``gc/train``; ``None`` takes them
            from the train loader.
        val: inputs for ``gc/val``; ``None`` takes them from the validation
            loader when there is one.
        num_samples: subset size when taken from a loader.
        every_n_epochs: log at the end of every this many training epochs.
        every_n_steps: log every this many optimizer steps instead (the epoch
            schedule is then off; with several optimizers each one's step
            counts, as in ``trainer.global_step``); these values go to the
            trainer's loggers directly, at the step the batch's own logged
            metrics take (Lightning's logging axis counts the batches that
            stepped from 0: with one optimizer ``global_step − 1``, with two
            half of that), while the epoch schedule logs
            through ``pl_module.log`` (so ``ModelCheckpoint(monitor="gc/val")``
            works; where validation does not run every epoch, pass it
            ``save_on_train_epoch_end=True``, or it would read the previous
            epoch's value, and ``check_on_train_epoch_end=True`` to
            ``EarlyStopping``).
        prefix: metric names are ``{prefix}/train``, ``{prefix}/val`` and
            ``{prefix}/train_stderr``, ``{prefix}/val_stderr``.
        input_key: where a loader's batch holds the input (a dict key, an
            index, or a function of the batch), as in
            :func:`geocomplexity.measure`.
        **measure_kwargs: options of :func:`geocomplexity.measure` (``method``
            defaults to ``"exact"``, ``progress`` to ``False``; ``num_probes``,
            ``output``, ...).

    Raises:
        ValueError: a schedule or subset size that is not a positive integer;
            a bad option value (see :func:`~geocomplexity.measure`); an empty
            or non-finite subset; when fitting starts, an ``output`` or ``wrt``
            that names no submodule, a 1-D subset the model does not read as
            a batch of scalars, a ``ModelCheckpoint`` or ``EarlyStopping``
            monitoring these values after validation.
        TypeError: an option ``measure`` does not take, or one the callback
            sets itself (``distributed``); a subset that is not a floating
            point tensor (integer where ``wrt`` is given).
    """

    def __init__(
        self,
        train: Tensor | None = None,
        val: Tensor | None = None,
        *,
        num_samples: int = 512,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        prefix: str = "gc",
        input_key: InputKey = None,
        **measure_kwargs: Any,
    ) -> None:
        # a NumPy sweep's np.int64 counts as ints
        num_samples, every_n_epochs = as_int(num_samples), as_int(every_n_epochs)
        every_n_steps = as_int(every_n_steps)
        for name, value in (
            ("num_samples", num_samples),
            ("every_n_epochs", every_n_epochs),
            ("every_n_steps", every_n_steps),
        ):
            if value is None and name == "every_n_steps":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.train, self.val = train, val
        self.num_samples = num_samples
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.prefix, self.input_key = prefix, input_key
        # checked now, not after the first epoch of training
        options = set(inspect.signature(measure).parameters) - _SET_HERE
        unknown = sorted(set(measure_kwargs) - options)
        if unknown:
            raise TypeError(
                f"GeometricComplexityCallback got {', '.join(unknown)}: the "
                "options it passes on to geocomplexity.measure are "
                f"{', '.join(sorted(options))} (it sets "
                f"{', '.join(sorted(_SET_HERE))} itself)"
            )
        self.measure_kwargs = {"method": "exact", "progress": False, **measure_kwargs}
        check_measure_options(**self.measure_kwargs)
        for split, x in (("train", train), ("val", val)):
            if x is None:
                continue
            try:
                check_input(x, differentiated=measure_kwargs.get("wrt") is None)
            except (TypeError, ValueError) as err:
                raise type(err)(
                    f"GeometricComplexityCallback({split}=...): {err}; or pass "
                    f"{split}=None to take the inputs from the {split} loader"
                ) from None
        self._given = (train is not None, val is not None)
        self._last_step = -1  # with gradient accumulation a step spans batches

    @property
    def state_key(self) -> str:  # noqa: D102
        # two callbacks (other prefixes) keep their states apart in a checkpoint
        return self._generate_state_key(prefix=self.prefix)

    def _own_generator(self) -> torch.Generator | None:
        """The probes' generator, where it is the callback's to checkpoint."""
        g = self.measure_kwargs.get("generator")
        if g is None or g is torch.default_generator:
            return None  # a private OS-seeded one; the global RNG is not ours
        cuda = g.device.type == "cuda" and torch.cuda.is_initialized()
        if cuda and any(g is d for d in torch.cuda.default_generators):
            return None
        return g

    def state_dict(self) -> dict[str, Any]:
        """The probe generator's state, so a resumed run draws what it would have.

        Without it a run resumed from a checkpoint started the ``generator``
        over from its seed and logged, after the checkpoint, the estimates of
        the epochs before it. Under DDP every rank's state is kept (Lightning
        writes rank 0's dict, and every rank calls this): ranks seeded apart
        stay apart after resuming.
        """
        import torch.distributed as dist

        g = self._own_generator()
        if g is None:
            return {}
        state = g.get_state()
        if dist.is_available() and dist.is_initialized():
            states: list[Tensor | None] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            return {"generators": states}
        return {"generators": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        import torch.distributed as dist

        g = self._own_generator()
        states = state_dict.get("generators")
        if g is None or not states:
            return
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (
            (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        )
        # saved by another number of processes: no state is this rank's
        if len(states) == world:
            g.set_state(states[rank])

    def _subset(self, trainer: Trainer, loaders: Any) -> Tensor | None:
        """The first inputs of ``loaders``, the same on every rank."""
        x = _take(loaders, self.num_samples, self.input_key)
        if trainer.world_size == 1:
            return x
        # every rank gets here (on_train_start, _log), each with its shard;
        # the shards' padding (the loader's first inputs again) left out
        total = _unpadded(loaders)
        limit = self.num_samples if total is None else min(self.num_samples, total)
        return _shared(x, limit)

    def _check_monitors(self, trainer: Trainer) -> None:
        """Refuse a checkpoint or early stop that would read a stale value.

        Validation at an epoch's end runs before ``on_train_epoch_end``, where
        the values are logged: a callback that acts after validation would
        rank each epoch by the previous epoch's value.
        """
        if self.every_n_steps is not None:  # not in callback_metrics at all
            return
        ours = {
            f"{self.prefix}/{split}{part}"
            for split in ("train", "val")
            for part in ("", "_stderr")
        }
        for callback in trainer.callbacks:
            if getattr(callback, "monitor", None) not in ours:
                continue
            if isinstance(callback, ModelCheckpoint):
                late = not callback._should_save_on_train_epoch_end(trainer)
                fix = "save_on_train_epoch_end=True"
            elif isinstance(callback, EarlyStopping):
                late = not callback._check_on_train_epoch_end
                fix = "check_on_train_epoch_end=True"
            else:
                continue
            if late:
                name = type(callback).__name__
                raise ValueError(
                    f"{name}(monitor={callback.monitor!r}) acts after "
                    "validation, which runs before GeometricComplexityCallback "
                    "logs at the training epoch's end: it would rank each epoch "
                    f"by the previous epoch's value. Pass {name}(..., {fix})"
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check what needs the model before the first epoch, not after it."""
        output = self.measure_kwargs.get("output")
        check_names(pl_module, output, self.measure_kwargs.get("wrt"))
        for split, x in (("train", self.train), ("val", self.val)):
            # one sample (d,) or a batch of scalars? a forward pass tells
            if x is not None and x.dim() == 1 and x.shape[0] > 1:
                x = trainer.precision_plugin.convert_input(x[:3])
                try:
                    _check_scalar_batch(pl_module, x.to(pl_module.device), output)
                except ValueError as err:
                    raise ValueError(
                        f"GeometricComplexityCallback({split}=...): {err}"
                    ) from None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fix the subsets the loaders provide."""
        self._check_monitors(trainer)
        # a run resumed at step S logged S before its checkpoint; with gradient
        # accumulation the first batches after resuming end at S again
        self._last_step = trainer.global_step
        if not self._given[0]:
            self.train = self._subset(trainer, trainer.train_dataloader)
        # each fit's own, as the train subset: a callback reused for another
        # fit kept measuring the first fit's validation inputs as gc/val
        if not self._given[1]:
            self.val = self._subset(trainer, trainer.val_dataloaders)

    def _log(
        self, trainer: Trainer, pl_module: LightningModule, *, on_step: bool
    ) -> None:
        if not self._given[1] and self.val is None:  # validation set up late
            self.val = self._subset(trainer, trainer.val_dataloaders)
        rank, world = trainer.global_rank, trainer.world_size
        # measure counts max_samples per rank: cut the subset, not each share
        cut = self.measure_kwargs.get("max_samples")
        values: dict[str, float] = {}
        for split, x in (("train", self.train), ("val", self.val)):
            if x is None:
                continue
            x = x if cut is None else x[:cut]
            # as the trainer converts each step's inputs: float64 for
            # "64-true", bfloat16 for "bf16-true", unchanged for mixed precision
            x = trainer.precision_plugin.convert_input(x[rank::world])
            # VJP chunks by the default rule, untimed (geocomplexity.tuning):
            # batched and looped VJPs may differ in the last bit, and a seeded
            # run must log (and checkpoint and stop by) the same values
            with eager(), fixed_chunks():
                result = measure(
                    pl_module,
                    x,  # each rank its share; measure merges them
                    distributed=world > 1,
                    **self.measure_kwargs,
                )
            values[f"{self.prefix}/{split}"] = result.value
            values[f"{self.prefix}/{split}_stderr"] = result.stderr
        if on_step:
            # straight to the loggers at this step: a value self.log()-ed from
            # on_train_batch_end would be written again at the next step
            if trainer.is_global_zero:
                # the axis of the batch's own self.log() values (Lightning's
                # _batches_that_stepped); global_step counts each optimizer's
                # steps, so with two optimizers GC was plotted at twice the
                # step of the loss it went with
                loop = trainer.fit_loop.epoch_loop
                step = getattr(loop, "_batches_that_stepped", trainer.global_step)
                for logger in trainer.loggers:
                    logger.log_metrics(values, step=step)
        else:
            # through the module, so callback_metrics (checkpointing, early
            # stopping) see the values too
            # (equal on every rank already: the mean over ranks changes nothing)
            for name, value in values.items():
                pl_module.log(
                    name, value, on_step=False, on_epoch=True, sync_dist=world > 1
                )

    def on_train_batch_end(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps
            and step > 0
            and step != self._last_step
            and step % self.every_n_steps == 0
        ):
            self._last_step = step
            self._log(trainer, pl_module, on_step=True)

    def on_train_epoch_end(  # noqa: D102
        self, trainer: Trainer, pl_module: LightningModule
    ) -> None:
        if self.every_n_steps is None and (
            (trainer.current_epoch + 1) % self.every_n_epochs == 0
        ):
            self._log(trainer, pl_module, on_step=False)
