"""Geometric complexity as a ``torchmetrics.Metric``.

The states are sums: of the per-sample values, of their squares (for the
standard error) and a count (``dist_reduce_fx="sum"``), so the value is the
exact data-set mean however the data are split across batches and processes::

    metric = GeometricComplexity(model)
    for x, _ in loader:
        metric.update(x)
    metric.compute()  # = geocomplexity.measure(model, loader, method="exact").value

Needs ``pip install 'geocomplexity[torchmetrics]'``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

try:
    from torchmetrics import Metric
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(
        "geocomplexity.integrations.torchmetrics needs torchmetrics: "
        "pip install 'geocomplexity[torchmetrics]'"
    ) from err

from geocomplexity.distributed import all_gather
from geocomplexity.jacobian import (
    Output,
    as_int,
    check_names,
    check_options,
    jacobian_sq_norms,
    train_mode_rng,
    wide_results,
)

__all__ = ["GeometricComplexity"]


class _Held:
    """The measured model, which ``copy.deepcopy`` does not copy on its own.

    A copy of the metric alone (``clone()``, ``MetricTracker``) measures the
    same, live model. A copy of a container that holds the model too (a
    LightningModule, ``AveragedModel``) measures that container's copy of it,
    whether the container copies the model before or after the metric: a
    copy looks the model up in the copy's memo when first used.
    """

    __slots__ = ("_memo", "_module")

    def __init__(self, module: nn.Module, memo: dict[int, Any] | None = None) -> None:
        self._module = module
        self._memo = memo  # the deepcopy this came from, until resolved

    @property
    def module(self) -> nn.Module:
        if self._memo is not None:  # the model, if the deepcopy copied it
            self._module = self._memo.get(id(self._module), self._module)
            self._memo = None
        return self._module

    def __deepcopy__(self, memo: dict[int, Any]) -> _Held:
        # the container may copy the model only after the metric
        return _Held(self.module, memo)

    def __reduce__(self) -> tuple[Any, ...]:
        return _Held, (self.module,)


class _Options(dict):
    """A metric's options; a copy of the metric shares its probe generator.

    ``clone()`` and ``MetricTracker`` (which deep-copies its metric at every
    ``increment()``) copied the generator with the rest: every copy started
    from the generator's state when the metric was made, so every tracked
    step drew the same probes (the same estimate, to the last digit, on an
    unchanged model), and ``torch.default_generator`` became a private copy
    that no longer moved the global RNG. A copy draws from the live
    generator instead, as the same metric ``reset()`` between epochs does.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _Options:
        generator = self.get("generator")
        if generator is not None:
            memo.setdefault(id(generator), generator)
        return _Options({k: copy.deepcopy(v, memo) for k, v in self.items()})


class _Seen:
    """Samples a metric measured: the salt of its train-mode dropout masks.

    Neither ``forward()`` (which resets the states for each batch) nor
    ``reset()`` puts it back, and copies of the metric (``clone()``,
    ``MetricTracker``'s at every ``increment()``) share it, so that each
    copy's updates draw masks apart from the others'.
    """

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> _Seen:
        return self


class _Measurement:
    """What a metric measures: its model (by identity) and its options."""

    __slots__ = ("metric",)

    def __init__(self, metric: GeometricComplexity) -> None:
        self.metric = metric

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Measurement):
            return NotImplemented
        a, b = self.metric, other.metric
        return a.model is b.model and a._options == b._options

    def __hash__(self) -> int:
        return id(self.metric.model)


class _States(dict):
    """The metric's state defaults (torchmetrics' ``_defaults``).

    ``MetricCollection`` puts metrics whose states agree (``allclose``) after
    the first update in one compute group, and from then on updates only the
    group's first metric; it tells metrics apart by ``_defaults.keys()``.
    These keys name what is measured too, so only metrics that measure alike
    (the same model, the same options) share their states: a metric of an EMA
    copy, equal to the model when the first batch is measured, keeps its own.
    """

    def __init__(self, defaults: dict[str, Any], metric: GeometricComplexity) -> None:
        super().__init__(defaults)
        self.metric = metric

    def keys(self) -> Any:
        return {*super().keys(), _Measurement(self.metric)}


class GeometricComplexity(Metric):
    r"""The mean of :math:`\|\partial g(x)/\partial x\|_F^2` over every input seen.

    ``update(x)`` measures a batch ``(B, *in_shape)`` with
    :func:`geocomplexity.jacobian_sq_norms` (the model is left as found: mode,
    BatchNorm statistics, gradients); ``compute()`` returns the mean over all
    updates, across processes when torchmetrics syncs. ``stderr()`` gives the
    standard error of that mean from the same states.

    Args:
        model: the network ``g`` (logits out). It is held, not registered as a
            submodule: the metric's ``state_dict`` and ``.to()`` leave it alone,
            and ``clone()`` (``MetricTracker``) shares it rather than copying.
        method: ``"exact"`` (default), ``"projection"``, ``"jvp"`` or
            ``"finite_difference"``.
        output: what is differentiated (see ``jacobian_sq_norms``).
        mode: ``"eval"`` (default) or ``"train"``. In train mode each update
            draws fresh dropout masks (the first what a call alone would),
            from a copy of the global RNG that it puts back.
        num_probes: probes per sample for the stochastic methods.
        distribution: probe distribution for the stochastic methods.
        chunk_size: VJPs per backward pass for ``"exact"``.
        eps: the ``"finite_difference"`` step (see ``jacobian_sq_norms``).
        generator: probe randomness (give each process its own seed);
            shared, not copied, by ``clone()`` (``MetricTracker``), so that
            each copy draws fresh probes from it.
        wrt: a submodule whose output the Jacobian is taken against, such as
            a token embedding (see ``jacobian_sq_norms``).
        coupled: whether the samples of a batch interact (see
            ``jacobian_sq_norms``).
        **kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ...).
            ``dist_sync_fn`` defaults to :func:`geocomplexity.distributed.all_gather`,
            which, unlike torchmetrics' own, cannot leave gloo's worker thread
            to free the gathered tensors (a crash when that happens at exit).

    Raises:
        ValueError: an unknown method, mode or distribution; a non-positive
            ``num_probes``, ``chunk_size`` or ``eps``; an ``output`` or ``wrt`` that
            names no submodule of the model.
        TypeError: a model that is not an ``nn.Module``; a ``generator``,
            ``output``, ``wrt`` or ``coupled`` of the wrong type.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    total: Tensor
    total_sq: Tensor
    count: Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str = "exact",
        output: Output = None,
        mode: str = "eval",
        num_probes: int = 1,
        distribution: str = "rademacher",
        chunk_size: int | None = None,
        eps: float | None = None,
        generator: torch.Generator | None = None,
        wrt: str | None = None,
        coupled: bool | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dist_sync_fn", all_gather)
        super().__init__(**kwargs)
        # a NumPy sweep's np.int64 counts as ints
        num_probes, chunk_size = as_int(num_probes), as_int(chunk_size)
        # every option checked now, against the model too, not at the
        # first update (an epoch into training)
        check_options(
            method=method,
            mode=mode,
            num_probes=num_probes,
            distribution=distribution,
            chunk_size=chunk_size,
            eps=eps,
            generator=generator,
            wrt=wrt,
            output=output,
            coupled=coupled,
        )
        check_names(model, output, wrt)
        # not a submodule: the metric's state_dict, .to() and .double() must
        # not reach into the model being measured; and shared, not copied, by
        # clone() and deepcopy (MetricTracker copies the metric every epoch)
        self.__dict__["_held"] = _Held(model)
        self._options = _Options(
            {
                "method": method,
                "output": output,
                "mode": mode,
                "num_probes": num_probes,
                "distribution": distribution,
                "chunk_size": chunk_size,
                "eps": eps,
                "generator": generator,
                "wrt": wrt,
                "coupled": coupled,
            }
        )
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("total", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("total_sq", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")
        self._defaults = _States(self._defaults, self)
        # the salt of a train-mode update's masks, which the states' count,
        # back at 0 in forward() and in a copy, could not be
        self._seen = _Seen()

    @property
    def model(self) -> nn.Module:
        """The measured model (the live one, also in clones of the metric)."""
        return self.__dict__["_held"].module

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module would register a new model as a submodule behind the
        # property's back; hold it instead
        if name == "model":
            self.__dict__["_held"] = _Held(value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        """The options that differ from the defaults, and the model's class.

        ``nn.Module``'s repr showed ``GeometricComplexity()`` whatever was
        measured, how: two metrics of a collection could not be told apart.
        """
        defaults = {
            "method": "exact",
            "output": None,
            "mode": "eval",
            "num_probes": 1,
            "distribution": "rademacher",
            "chunk_size": None,
            "eps": None,
            "generator": None,
            "wrt": None,
            "coupled": None,
        }
        shown = [
            f"model={type(self.model).__name__}",
            f"method={self._options['method']!r}",
        ]
        for name, value in self._options.items():
            if name == "method" or value is defaults[name]:
                continue
            if name == "generator":
                shown.append("generator=<torch.Generator>")
            elif value != defaults[name]:
                shown.append(
                    f"{name}={getattr(value, '__qualname__', None) or value!r}"
                )
        return ", ".join(shown)

    def _apply(self, fn: Any, exclude_state: Any = "") -> nn.Module:
        # torchmetrics converts states' dtypes only through set_dtype(), but
        # its guard misses .to(dtype), which a container's .to(torch.bfloat16)
        # (Lightning's "bf16-true" precision) reaches the metric by: the sums
        # would become bfloat16 and stop growing. Such a call moves them only.
        if self._dtype_convert:
            return super()._apply(fn, exclude_state)

        def move(t: Tensor) -> Tensor:
            probe = fn(t.new_empty(0))
            return fn(t) if probe.dtype == t.dtype else t.to(probe.device)

        return super()._apply(move, exclude_state)

    def update(self, x: Tensor) -> None:
        """Measure a batch of inputs ``(B, *in_shape)`` and add it to the states."""
        options = self._options
        # in train mode each update draws fresh dropout masks: a call puts the
        # global RNG back, so updates between which nothing moves it (a
        # validation loop) drew the same masks for every batch
        carried, generator = train_mode_rng(
            self.model, options["mode"], options["method"], options["generator"]
        )
        if generator is not options["generator"]:
            options = {**options, "generator": generator}
        with carried as advance, wide_results():  # half precision as summed
            if advance is not None and self._seen.n:
                advance(self._seen.n)  # the first update draws as a call alone
            values = jacobian_sq_norms(self.model, x, **options)
        self._seen.n += values.numel()
        values = values.detach().to(self.total.device, torch.float64)
        self.total += values.sum()
        self.total_sq += values.pow(2).sum()
        self.count += values.numel()

    def sync(
        self,
        dist_sync_fn: Callable[..., Any] | None = None,
        process_group: Any = None,
        should_sync: bool = True,
        distributed_available: Callable[[], bool] | None = None,
    ) -> None:
        """Sync the states by this metric's ``dist_sync_fn`` unless given one.

        torchmetrics' own default for a ``sync()`` called by hand is its
        ``gather_all_tensors``, whose gloo collectives may leave their tensors
        to gloo's worker thread; freed there while the interpreter shuts down,
        the process aborts ("terminate called without an active exception",
        see :func:`geocomplexity.distributed.all_gather`). ``compute()`` and
        :meth:`stderr` sync by ``dist_sync_fn`` already.
        """
        super().sync(
            dist_sync_fn or self.dist_sync_fn,
            process_group,
            should_sync,
            distributed_available,
        )

    def compute(self) -> Tensor:
        """The mean over every sample seen (float64 scalar).

        Raises:
            ValueError: nothing was measured.
        """
        if self.count == 0:
            raise ValueError("no inputs were measured: call update(x) first")
        return self.total / self.count

    def stderr(self) -> Tensor:
        """Standard error of :meth:`compute` over samples.

        Synced across processes as :meth:`compute` is (``sync_on_compute``),
        and this process's own states kept afterwards: it read this process's
        states alone, the standard error of another mean than ``compute()``'s
        (about √world_size times too large on equal shards).

        From the summed states, as ``Σx² − n·mean²``, which cancels where the
        per-sample values barely differ: float64's rounding of the sums,
        relative to the variance, grows as 10⁻¹⁶·(mean/std)². Over
        10⁶ float32 samples it was exact to 10⁻⁴ at a relative spread
        std/mean of 10⁻⁵, 1% off at 10⁻⁶ and 0.2 of the true stderr at 10⁻⁷
        (where float32 values, rounded to 6·10⁻⁸ each, hardly resolve the
        spread). :func:`geocomplexity.measure` merges means and squared
        deviations instead (Chan et al.) and is exact there.

        Returns:
            A float64 scalar; NaN below two samples.
        """
        # as torchmetrics wraps compute(); states a caller synced by hand
        # (metric.sync()) are read as they are, and left synced
        synced = self._is_synced
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync and not synced,
            should_unsync=self._should_unsync and not synced,
        ):
            n = self.count.to(torch.float64)
            if n < 2:
                return torch.tensor(float("nan"), dtype=torch.float64)
            mean = self.total / n
            var = (self.total_sq - n * mean**2).clamp_min(0) / (n - 1)
            return (var / n).sqrt()
