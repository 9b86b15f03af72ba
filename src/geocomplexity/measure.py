r"""Geometric complexity of a model on a batch or a whole data set.

.. math::

    \mathrm{GC}(g, D) = \frac{1}{|D|}\sum_{x\in D}\|\nabla_x g(x)\|_F^2

(Dherin et al., NeurIPS 2022): a plain mean, no ½, no division by the input or
output dimension; for a classifier ``g`` is the logit network.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from geocomplexity import distributed as _distributed
from geocomplexity.jacobian import (
    METHODS,
    Output,
    _check_model_matches,
    _check_scalar_batch,
    _coupled,
    _select,
    as_int,
    check_input,
    check_options,
    forward_mode_runs,
    jacobian_sq_norms,
    train_mode_rng,
    unwrapped,
    wide_results,
)
from geocomplexity.state import (
    batch_norm_couples,
    loader_generators,
    no_attention_fast_path,
    preserved,
    rngs_set_apart,
)

__all__ = ["GCResult", "RunningMean", "geometric_complexity", "measure"]

#: ``method="auto"`` measures exactly when that costs at most this many
#: projection probes: an output of at most this many entries (exact takes one
#: VJP per entry, a probe one VJP). Where the samples are coupled (train mode)
#: exact takes one VJP per entry and sample, and a probe two VJPs a batch.
AUTO_EXACT_MAX_OUTPUTS = 32

#: ``method="auto"`` pilots on successive batches until it has seen this many
#: samples (or the data end): the number of probes grows with the pilot's
#: σ²/m², and from one small batch that ratio is so noisy that the achieved
#: relative error exceeded ``rtol`` by half (batches of 4) to a quarter (8).
#: Data shorter than this are piloted on as many probe pairs, drawn anew on
#: their samples.
AUTO_PILOT_SAMPLES = 64


def geometric_complexity(model: nn.Module, x: Tensor, **kwargs: Any) -> Tensor:
    r"""GC of ``model`` on one batch: the mean of :func:`jacobian_sq_norms`.

    Args:
        model: maps ``(B, *in_shape)`` to ``(B, *out_shape)``.
        x: a batch ``(B, *in_shape)``.
        **kwargs: any option of :func:`geocomplexity.jacobian_sq_norms`
            (``method``, ``output``, ``mode``, ``num_probes``, ``generator``,
            ``create_graph``, ...).

    Returns:
        A scalar tensor, differentiable in the parameters if ``create_graph``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> gc = geometric_complexity(model, torch.randn(8, 4))
        >>> torch.allclose(gc, model.weight.pow(2).sum())
        True
    """
    return jacobian_sq_norms(model, x, **kwargs).mean()


@dataclass
class RunningMean:
    """Streaming mean and variance (Chan et al.'s merge), in float64.

    Memory stays constant however many samples pass; two accumulators merge
    exactly (across processes too), and the order of batches does not matter
    beyond rounding.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def update(self, values: Tensor) -> None:
        """Add a batch of per-sample values, shape ``(n,)``."""
        # summed on the CPU: Apple's MPS has no float64, and the .item()s
        # below wait for the device anyway (B numbers to move)
        v = values.detach().cpu().to(torch.float64).flatten()
        n = v.numel()
        if n == 0:
            return
        mean = v.mean().item()
        m2 = (v - mean).pow(2).sum().item()
        self.merge(RunningMean(n, mean, m2))

    def merge(self, other: RunningMean) -> None:
        """Fold another accumulator into this one."""
        if other.count == 0:
            return
        if self.count == 0:  # taken as it is: inf·0 would make m2 NaN below
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / n
        # a product, not delta**2: Python's float power raises OverflowError
        # beyond 1e154 (a diverged float64 model), where this is inf
        self.m2 += other.m2 + delta * delta * (self.count * other.count / n)
        self.count = n

    @property
    def stderr(self) -> float:
        """Standard error of the mean (sample variance, n − 1); NaN for n < 2."""
        if self.count < 2:
            return math.nan
        return math.sqrt(self.m2 / (self.count - 1) / self.count)


@dataclass(frozen=True)
class GCResult:
    """The geometric complexity of a model on a data set, with its error bar.

    Attributes:
        value: the mean of the per-sample values.
        stderr: standard error of that mean over samples. For the stochastic
            methods the per-sample values carry their probe noise, so this
            includes the probe variance; for ``"exact"`` it is the sampling error
            of the data set as a sample of its distribution. NaN for one sample.
            It treats the samples as independent: where train-mode BatchNorm
            couples a batch, the probe noise of its samples is correlated
            (their estimates share cross terms) and the probe part is
            understated, by a variance factor of about 1 + 1.5/B at batch
            size B (1.38 at B = 4, 1.09 at B = 16, 1.03 at B = 48).
        num_samples: how many samples were measured.
        method: the method used (``"auto"`` resolved to the one it chose).
        num_probes: probes per sample for stochastic methods, else ``None``.
        per_sample: the ``(num_samples,)`` values if asked for, else ``None``;
            on the CPU, in the inputs' dtype, or float32 for half precision
            (as summed: a float16 GC may exceed float16's 65504).
    """

    value: float
    stderr: float
    num_samples: int
    method: str
    num_probes: int | None = None
    per_sample: Tensor | None = field(default=None, repr=False, compare=False)

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        probes = ""
        if self.num_probes:
            plural = "s" if self.num_probes > 1 else ""
            probes = f", {self.num_probes} probe{plural}"
        return (
            f"GC = {self.value:.6g} ± {self.stderr:.2g} "
            f"({self.method}{probes}, n={self.num_samples})"
        )

    def confidence_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Normal-approximation interval ``value ± z·stderr``.

        The normal approximation needs enough samples: per-sample squared
        Jacobian norms are skewed, and on a handful of samples the interval
        covers less than ``level`` (a 95% interval for 1-probe projection
        covered about 80% of repeated runs at 4 samples, 85% at 8, 96% at
        64). Read it on tens of samples or more.

        Args:
            level: the coverage, strictly between 0 and 1 (0.95, not 95).

        Returns:
            ``(low, high)``.

        Raises:
            ValueError: ``level`` is not strictly between 0 and 1.
        """
        if not 0 < level < 1:
            hint = f" ({level / 100:g} for {level:g}%)" if 1 < level < 100 else ""
            raise ValueError(
                f"level must be strictly between 0 and 1, got {level!r}{hint}"
            )
        z = math.sqrt(2) * torch.erfinv(torch.tensor(level, dtype=torch.float64))
        half = z.item() * self.stderr
        return self.value - half, self.value + half


#: Which part of a batch is the input: a dict key, a tuple or list index, or a
#: function of the batch; ``None`` reads the batch as :func:`batch_inputs` does.
InputKey = str | int | Callable[[Any], Tensor] | None

#: Keys under which a dict batch commonly holds its inputs, tried in order
#: when no ``input_key`` is given.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids")


def _batches(
    data: Any, batch_size: int, input_key: InputKey = None
) -> tuple[Iterator[Tensor], int | None]:
    """Turn a tensor, a dataset or an iterable of batches into input batches.

    Returns:
        An iterator of input tensors and the number of samples if known.

    Raises:
        TypeError: ``data`` is none of the supported kinds, or one a newcomer
            mistakes for them (see :func:`_check_not_arrays`).
    """
    if isinstance(data, Tensor):
        if input_key is not None:
            raise ValueError(
                "input_key picks the input out of each batch of a Dataset or a "
                "loader; data is a tensor of inputs already, so leave it out"
            )
        if data.dim() == 0:
            raise ValueError(
                "data is a scalar tensor; give inputs of shape (N, *in_shape)"
            )
        # no batch at all for no samples: under a process group a rank's shard
        # (x[rank::world]) may be empty, and an empty batch would be an error
        return iter(data.split(batch_size) if len(data) else ()), len(data)
    _check_not_arrays(data)
    if isinstance(data, torch.utils.data.IterableDataset) or (
        isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__")
    ):
        # a private generator: starting the loader's iterator draws a base seed,
        # which would otherwise come from (and advance) the global RNG. An
        # IterableDataset yields samples too, with or without a length
        loader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, generator=torch.Generator()
        )
        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        # a dataset's augmentation may draw from the global RNGs: set apart
        return (batch_inputs(b, input_key) for b in _rng_kept(loader)), total
    if isinstance(data, Iterable):
        total = _loader_samples(data)
        if total is None:
            total = _listed_samples(data, input_key)
        return (batch_inputs(b, input_key) for b in _rng_kept(data)), total
    raise TypeError(
        f"data must be a tensor, a Dataset or an iterable of batches (a "
        f"DataLoader), got {type(data).__name__}"
    )


def _check_not_arrays(data: Any) -> None:
    """Refuse data a newcomer hands over that would be misread as batches.

    An array or nested list of numbers would be iterated row by row, each row
    read as a batch; ``(x, y)``, the form :func:`geocomplexity.training.fit`
    takes, would be read as two batches, the targets measured as inputs.

    Raises:
        TypeError: a numpy array (anything with ``__array__``), a list of
            numbers, a tuple of exactly two tensors of one length (inputs and
            targets, or two batches: which cannot be known; two batches go in
            a list), a tuple of tensors of different ranks (inputs and
            targets), or a mapping (one batch, whose iteration gives its keys).
    """
    kind = type(data).__name__
    if isinstance(data, Mapping) and not isinstance(data, torch.utils.data.Dataset):
        # one batch as a dict (a BatchFeature): iterated, it gives its keys
        key = next((k for k in INPUT_KEYS if isinstance(data.get(k), Tensor)), None)
        hint = f"its input tensor (data[{key!r}]) or " if key is not None else ""
        raise TypeError(
            f"data is a {kind} with keys {list(data)[:8]}, which measure would "
            f"iterate key by key; for one batch, pass {hint}a list of batches "
            "([data], with input_key= if its input is under another key)"
        )
    if hasattr(data, "__array__") and not isinstance(data, torch.utils.data.Dataset):
        raise TypeError(
            f"data is a {type(data).__module__}.{kind}, not a tensor; convert it "
            "to a tensor of inputs (N, *in_shape): torch.as_tensor(data, "
            "dtype=torch.float32)"
        )
    if (
        isinstance(data, (list, tuple))
        and data
        and (
            isinstance(data[0], (int, float))
            or (
                isinstance(data[0], (list, tuple))
                and data[0]
                and isinstance(data[0][0], (int, float))
            )
        )
    ):
        raise TypeError(
            f"data is a {kind} of numbers; convert it to a tensor of inputs "
            "(N, *in_shape): torch.as_tensor(data, dtype=torch.float32)"
        )
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, Tensor) and t.dim() > 0 for t in data)
        and len(data[0]) == len(data[1])
    ):
        # (x, y) with targets of the inputs' rank (an autoencoder's, one-hot or
        # regression targets) looks like two batches of one length: which it
        # is cannot be known, and read as batches y is measured as inputs
        shapes = ", ".join(str(tuple(t.shape)) for t in data)
        raise TypeError(
            f"data is a tuple of two tensors of one length, shapes {shapes}: "
            "(inputs, targets) as fit takes them, or two batches? For (inputs, "
            "targets), pass the inputs alone (measure(model, x)) or a "
            "TensorDataset(x, y); for two batches of inputs, a list ([a, b])"
        )
    if (
        isinstance(data, (list, tuple))
        and len(data) > 1
        and all(isinstance(t, Tensor) for t in data)
        and len({t.dim() for t in data}) > 1
    ):
        shapes = ", ".join(str(tuple(t.shape)) for t in data)
        raise TypeError(
            f"data is a {kind} of tensors of shapes {shapes}, which measure "
            "reads as a sequence of batches of inputs; for (inputs, targets), "
            "pass the inputs alone (measure(model, x)) or a "
            "TensorDataset(x, y)"
        )


def _rng_kept(data: Iterable[Any]) -> Iterator[Any]:
    """The batches of the caller's iterable, on RNGs set apart from the caller's.

    Starting a ``DataLoader``'s iterator draws a base seed from the global RNG
    (or the loader's own generator), and a shuffling sampler its permutation
    (a dataset may draw its own augmentation): measuring between the epochs
    of a training loop would change every later epoch's order. The iteration
    draws from copies of those RNGs (:func:`rngs_set_apart`), which carry on
    from batch to batch as they would run alone, so probes drawn from
    ``generator=torch.default_generator`` still move it.
    """
    # a DataLoader with persistent workers hands out one iterator, reset by
    # each iter(): measuring the training loader mid-epoch restarted the
    # caller's epoch under it (72 samples of 64, the first 16 twice). An
    # iterator of its own instead, its workers shut down when done (not for a
    # subclass with an __iter__ of its own: its batches are what that yields)
    persistent = (
        isinstance(data, torch.utils.data.DataLoader)
        and type(data).__iter__ is torch.utils.data.DataLoader.__iter__
        and data.persistent_workers
        and data.num_workers > 0
    )

    def batches() -> Iterator[Any]:
        # here, at the first step: iter draws the base seed
        it = data._get_iterator() if persistent else iter(data)  # type: ignore[attr-defined]
        try:
            # a for loop, not yield from: closing this early (max_samples) must
            # not close the caller's own generator
            for batch in it:  # noqa: UP028
                yield batch
        finally:
            if persistent:  # its workers, now, not when it is collected
                getattr(it, "_shutdown_workers", lambda: None)()

    return rngs_set_apart(batches(), loader_generators(data))


def _listed_samples(data: Iterable[Any], input_key: InputKey) -> int | None:
    """How many samples a list or tuple of batches holds, read off its inputs.

    Without it, ``method="auto"`` sized its probes for the samples of its
    pilot alone (P ∝ 1/N): more than its ``rtol`` needs, about as many times
    more as the list holds samples beyond the pilot's (3 probes for 1 on 600
    samples in batches of 32). ``None`` for other iterables (reading them would
    consume them), for an ``input_key`` function (the caller's code, run
    once per batch when measuring), and for batches whose input is not found.
    """
    if not isinstance(data, (list, tuple)) or callable(input_key):
        return None
    try:
        return sum(batch_inputs(b, input_key).shape[0] for b in data)
    except (TypeError, IndexError, KeyError, ValueError):
        return None  # the iteration names the problem, batch by batch


def _loader_samples(data: Iterable[Any]) -> int | None:
    """How many samples a ``DataLoader`` yields, if that is known.

    Its sampler's length, less a dropped last batch: a ``DistributedSampler``
    gives this rank's shard, not the data set (``method="auto"`` sums the
    ranks' counts, and an overcount would choose too few probes). ``None``
    for other iterables and for batch samplers of the caller's own.
    """
    if not isinstance(data, torch.utils.data.DataLoader):
        return None
    if data.batch_size is None:  # a batch sampler of its own, or no batching
        return None
    try:
        if isinstance(data.dataset, torch.utils.data.IterableDataset):
            n = len(data.dataset)  # type: ignore[arg-type]
        else:
            n = len(data.sampler)  # type: ignore[arg-type]
    except TypeError:  # no length
        return None
    return n - n % data.batch_size if data.drop_last else n


def batch_inputs(batch: Any, input_key: InputKey = None) -> Tensor:
    """The input tensor of one batch.

    Args:
        batch: a tensor, a tuple or list whose first element is the input, or
            a mapping (a dict, Hugging Face's ``BatchFeature``) holding it
            under one of :data:`INPUT_KEYS`.
        input_key: where the input is instead: a key, an index, an attribute
            (a namedtuple's field), or a function of the batch.

    Returns:
        The input tensor ``(B, *in_shape)``.

    Raises:
        TypeError: the input cannot be found, or is not a tensor.
    """
    if callable(input_key):
        x = input_key(batch)
        where = "input_key(batch)"
    elif input_key is not None:
        if isinstance(batch, Tensor):
            # batch[0] would silently be the first sample
            raise TypeError(
                "the batches are tensors, which are the inputs already; leave "
                "input_key out"
            )
        try:
            x = batch[input_key]
        except (KeyError, IndexError, TypeError) as err:
            if isinstance(input_key, str) and hasattr(batch, input_key):
                x = getattr(batch, input_key)  # a namedtuple or dataclass field
            else:
                keys = (
                    f" (keys {list(batch)[:8]})" if isinstance(batch, Mapping) else ""
                )
                raise TypeError(
                    f"input_key={input_key!r} is not in a {type(batch).__name__} "
                    f"batch{keys}"
                ) from err
        where = f"batch[{input_key!r}]"
    elif isinstance(batch, Tensor):
        return batch
    elif isinstance(batch, (tuple, list)) and batch:
        x, where = batch[0], "the first element of the batch"
    elif isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if isinstance(batch.get(k), Tensor)), None)
        if key is None:
            # suggest the first floating-point tensor: labels are integers
            tensors = [k for k, v in batch.items() if isinstance(v, Tensor)]
            floats = [k for k in tensors if torch.is_floating_point(batch[k])]
            guess = (floats or tensors or list(batch) or ["key"])[0]
            raise TypeError(
                f"a batch is a {type(batch).__name__} with keys {list(batch)[:8]} "
                f"and no tensor under a usual input key {list(INPUT_KEYS)}; name "
                f"the input with input_key={guess!r} (or the right key, or a "
                "function of the batch)"
            )
        return batch[key]
    else:
        raise TypeError(
            f"a batch is a {type(batch).__name__}; expected a tensor, a tuple "
            "whose first element is the input tensor, or a mapping (pass "
            "input_key= to pick the input)"
        )
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{where} is a {type(x).__name__}, not a tensor; pass input_key= to "
            "pick the input tensor"
        )
    return x


def _model_device(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def _pilot(
    model: nn.Module,
    x: Tensor,
    output: Output,
    mode: str,
    distribution: str,
    generator: torch.Generator | None,
    wrt: str | None = None,
    coupled: bool | None = None,
    pairs: int = 1,
) -> list[float]:
    """What ``method="auto"`` learns from a batch: ``[c, n·m, n·σ², n]``.

    ``c`` is exact's cost in probes: the VJPs exact takes on this batch over
    those one projection probe takes. That is the output size k where samples
    are independent, or the input size d where that is smaller (exact then
    takes d JVPs, each about a VJP's cost, where forward mode runs through
    the model); where they are coupled (train mode, or a BatchNorm without
    running statistics), exact takes k VJPs per sample and a probe two VJPs
    per batch, so c = k·n/2. ``m`` is the batch's mean GC and ``σ²`` the
    mean per-sample probe variance of a two-probe pilot. Sums over ``n`` so
    ranks can add theirs. When ``c`` is small enough for exact, the pilot is
    skipped and all but ``c`` are zero, ``n`` too, so a rank that skipped it
    does not dilute another's. With ``pairs`` > 1, as many two-probe pairs
    on the batch, summed as that many batches' (``n·pairs`` last), from one
    forward pass that reads ``c``.
    """
    if x.dim() == 1 and x.shape[0] > 1:  # scalars, or one unbatched sample?
        _check_scalar_batch(model, x, output)
    # in the measuring mode, so that train-mode BatchNorm reads as coupling;
    # buffers and the RNG come back (preserved); attention as it is measured
    with (
        preserved(model, mode=mode) as modules,
        torch.no_grad(),
        no_attention_fast_path(),
    ):
        k = _select(model, x, output).shape[1]
        coupled = _coupled(coupled, batch_norm_couples(modules), mode == "train")
        d = math.prod(x.shape[1:])
        # exact's forward mode, d JVPs, where d < k (not at an inner wrt=), and
        # where forward mode runs: else exact takes its k VJPs
        forward = (
            not coupled
            and wrt is None
            and d < k
            and forward_mode_runs(model, x, output)
        )
    n = x.shape[0]
    cost = k * n / 2 if coupled else d if forward else k
    if cost <= AUTO_EXACT_MAX_OUTPUTS:
        # no pilot: no samples to weigh in its mean (under a process group,
        # another rank's larger batch may still choose projection)
        return [cost, 0.0, 0.0, 0]
    m = var = 0.0
    for _ in range(pairs):
        with wide_results():  # float16's range is no limit to the mean
            a, b = (
                jacobian_sq_norms(
                    model,
                    x,
                    method="projection",
                    output=output,
                    mode=mode,
                    distribution=distribution,
                    generator=generator,
                    wrt=wrt,
                    coupled=coupled,
                ).double()
                for _ in range(2)
            )
        m += ((a + b) / 2).mean().item()
        var += ((a - b).pow(2) / 2).mean().item()
    return [cost, n * m, n * var, n * pairs]


def _choose(pilot: list[float], total: int, rtol: float) -> tuple[str, int]:
    """Choose the method for ``method="auto"`` from a :func:`_pilot`.

    Exact when it is cheap (its cost ``c`` in probes, see :func:`_pilot`, at
    most :data:`AUTO_EXACT_MAX_OUTPUTS`). Otherwise the pilot's per-sample
    probe variance σ² gives ``P = ⌈σ² / (N m² rtol²)⌉`` probes, which keep the
    probe part of the relative standard error of the N-sample mean m below
    ``rtol``; exact again if that costs as much as exact.

    Returns:
        ``(method, num_probes)``.
    """
    cost, nm, _, n = pilot
    if cost <= AUTO_EXACT_MAX_OUTPUTS or n == 0 or nm <= 0:
        return "exact", 1
    probes = max(1, _probes_for(pilot, total, rtol))
    return ("exact", 1) if probes >= cost else ("projection", probes)


def _pilot_rounds(pilot: list[float]) -> int:
    """Rounds of two-probe pilots that give :data:`AUTO_PILOT_SAMPLES` pairs.

    From fewer samples than that (short data, or a small ``max_samples``) one
    round's σ² is too noisy to size the probes by: on 3 samples, a third of
    the draws chose too few probes, and the relative error of those reached
    2.7× ``rtol``. More pairs on the same samples steady it; as the pilot's
    probes are not measured again, it stops where they would cost as much
    as exact (the caller then measures exactly).
    """
    _, _, _, n = pilot
    return math.ceil(AUTO_PILOT_SAMPLES / n) if 0 < n < AUTO_PILOT_SAMPLES else 1


def _probes_for(pilot: list[float], total: int, rtol: float) -> int:
    """Probes ``⌈σ² / (N m² rtol²)⌉`` for an N-sample mean (σ², m: the pilot's).

    They keep the probe part of its relative standard error below ``rtol``.
    """
    _, nm, nvar, n = pilot
    m, var = nm / n, nvar / n
    return math.ceil(var / (total * m**2 * rtol**2))


def _warn_probes_sized_for_more(
    pilot: list[float], sized_for: int, count: int, probes: int, rtol: float
) -> None:
    r"""Warn where data that ended short of their sizing miss ``rtol``.

    For data of unknown length ``method="auto"`` sizes its probes for
    ``max_samples``. Data that end before have fewer samples to average the
    probe noise over: from the pilot's σ² and m, the probe part of the
    relative standard error is :math:`\sqrt{σ^2 / (N P m^2)}` on the ``N``
    samples measured with ``P`` probes, and where it exceeds ``rtol`` the
    caller is told, as the samples cannot be measured again (a generator).
    """
    _, nm, nvar, n = pilot
    m, var = nm / n, nvar / n
    achieved = math.sqrt(var / (count * probes * m**2))
    if not achieved > rtol:
        return
    needed = _probes_for(pilot, count, rtol)
    warnings.warn(
        f"method='auto' sized its probes for {sized_for} samples (max_samples, "
        f"the data's length being unknown), but the data ended after {count} "
        f"samples: with {probes} probe{'s' if probes > 1 else ''} per sample the "
        f"probe part of the relative error is about {achieved:.2g}, above "
        f"rtol={rtol:g} (it needs about {needed} probes). Pass max_samples no "
        "larger than the data, data of known length (a tensor, or a Dataset or "
        "loader with a length), or num_probes",
        stacklevel=3,
    )


@contextlib.contextmanager
def _single_sample_batchnorm(x: Tensor, seen: int) -> Iterator[None]:
    """Name the cause and the fix of train-mode BatchNorm's error on one sample.

    A data set whose size leaves a remainder of one after the last full batch
    (or a ``max_samples`` that does) ends on a batch of one sample, which
    BatchNorm cannot normalise by its own statistics; torch's message names
    neither the batch nor how to avoid it.
    """
    try:
        yield
    except ValueError as err:
        if x.shape[0] != 1 or "Expected more than 1 value per channel" not in str(err):
            raise
        raise ValueError(
            f"the batch starting at sample {seen} holds one sample, and "
            "BatchNorm in train mode cannot normalise one sample by its own "
            "statistics. In mode='train' pick a batch_size (and max_samples) "
            "that leaves no last batch of one, or measure in mode='eval'"
        ) from err


def check_measure_options(
    *,
    method: str = "auto",
    batch_size: int = 256,
    max_samples: int | None = None,
    rtol: float = 0.01,
    num_probes: int | None = None,
    distribution: str = "rademacher",
    mode: str = "eval",
    chunk_size: int | None = None,
    eps: float | None = None,
    generator: torch.Generator | None = None,
    output: Output = None,
    wrt: str | None = None,
    coupled: bool | None = None,
    **_: Any,
) -> None:
    """The checks of :func:`measure`'s options that need no model or data.

    For code that takes these options now and measures later (the Lightning
    callback); other keyword arguments are ignored.

    Raises:
        ValueError: an unknown method, mode or distribution; a count, size,
            tolerance or step that is not positive.
        TypeError: a generator, ``output``, ``wrt`` or ``coupled`` of the
            wrong type.
    """
    batch_size, max_samples = as_int(batch_size), as_int(max_samples)
    if method != "auto" and method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose 'auto' or one of "
            f"{', '.join(map(repr, METHODS))}"
        )
    if (
        not isinstance(batch_size, int)
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_samples is not None and (
        not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive integer, got {max_samples!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol!r}")
    check_options(
        method="exact" if method == "auto" else method,
        mode=mode,
        num_probes=1 if num_probes is None else num_probes,
        distribution=distribution,
        chunk_size=chunk_size,
        eps=eps,
        generator=generator,
        wrt=wrt,
        output=output,
        coupled=coupled,
    )


def measure(
    model: nn.Module,
    data: Any,
    *,
    method: str = "auto",
    batch_size: int = 256,
    max_samples: int | None = None,
    progress: bool | None = None,
    generator: torch.Generator | None = None,
    output: Output = None,
    mode: str = "eval",
    num_probes: int | None = None,
    distribution: str = "rademacher",
    rtol: float = 0.01,
    chunk_size: int | None = None,
    eps: float | None = None,
    per_sample: bool = False,
    distributed: bool = False,
    input_key: InputKey = None,
    wrt: str | None = None,
    coupled: bool | None = None,
) -> GCResult:
    r"""Geometric complexity of ``model`` over a data set, streamed in batches.

    Memory does not grow with the data set (unless ``per_sample=True``): only a
    running mean and variance are kept. Batches are moved to the model's device.

    Args:
        model: maps ``(B, *in_shape)`` to ``(B, *out_shape)``; left as found.
        data: a tensor ``(N, *in_shape)``, a ``Dataset`` (map-style or
            iterable: either yields samples, batched by ``batch_size``), or any
            other iterable of batches such as a ``DataLoader`` (a tuple batch's
            first element is the input). A tuple of two tensors of one length
            is refused, as ``(inputs, targets)`` and two batches look alike
            there: give batches as a list.
        method: ``"auto"`` (exact when the output, or the input where that
            is smaller, has at most
            :data:`AUTO_EXACT_MAX_OUTPUTS` entries, else projection with enough
            probes for a probe-induced relative error below ``rtol``; in train
            mode, where exact takes k·B VJPs a batch and a probe two, exact
            only while k·B/2 is at most that number), or any method of
            :func:`geocomplexity.jacobian_sq_norms`.
        batch_size: batch size for tensors and datasets (an iterable of
            batches keeps its own).
        max_samples: stop after this many samples. For data of unknown
            length (a generator, an iterable without ``len``) ``"auto"`` sizes
            its probes for ``max_samples`` samples: data that end well before
            get too few probes for ``rtol``, and a warning says so once they
            end (pass ``max_samples`` no larger than the data, or data of
            known length).
        progress: show a progress bar; ``None`` shows one on a terminal.
        generator: source of probe randomness (see ``jacobian_sq_norms``).
        output: what is differentiated (see ``jacobian_sq_norms``).
        mode: ``"eval"`` or ``"train"`` (see ``jacobian_sq_norms``). In train
            mode each batch is normalised by its own statistics, so the value
            depends on how the data are split into batches, and a last batch of
            one sample fails in BatchNorm: pick a ``batch_size`` that divides
            the data.
        num_probes: probes per sample for stochastic methods (default 1; with
            ``"auto"``, chosen from ``rtol``).
        distribution: probe distribution.
        rtol: target relative standard error of the probe noise for ``"auto"``,
            which sizes the probes by a two-probe pilot on the first batches
            (at least :data:`AUTO_PILOT_SAMPLES` samples where the data have
            them; on fewer, as many pairs on the same samples, or exact where
            that costs less) for the data's length, or ``max_samples`` where that is
            unknown; without either, for the pilot's samples (more probes than
            a longer stream needs). A ``UserWarning`` says when the data ended
            short of ``max_samples`` and the probe part of the relative error,
            from the pilot's σ² and m and the samples and probes measured,
            exceeds ``rtol``.
        chunk_size: VJPs per backward pass (see ``jacobian_sq_norms``).
        eps: finite-difference step.
        per_sample: keep every per-sample value in the result (this process's
            samples only, under a process group).
        distributed: ``True`` inside an initialized ``torch.distributed``
            process group (torchrun, DDP): each rank measures its shard of the
            data (a ``DistributedSampler``, say; ``max_samples`` counts per
            rank) and the ranks merge their accumulators, so every rank returns
            the value, stderr and ``num_samples`` of the whole data set, and
            ``"auto"`` picks one method for all. Every rank must call it (a rank
            may have no data); an error on one rank is raised on every rank.
            Give each rank its own ``generator`` seed, or their probes
            coincide. A ``DistributedSampler`` pads the shards to equal length
            by repeating samples; slice the data (``x[rank::world]``) or use
            ``drop_last`` for an exact data-set mean. ``False`` (default): this
            process's data alone, so a measurement on rank 0 only never waits
            for the others.
        input_key: where each batch of a ``Dataset`` or loader holds the
            input: a dict key (``"pixel_values"``), an index, or a function of
            the batch. By default the batch itself, a tuple's first element,
            or a dict's entry under one of :data:`INPUT_KEYS`.
        wrt: a submodule whose output the Jacobian is taken against instead
            of the input, such as a token embedding (see
            ``jacobian_sq_norms``); the data may then be integer.
        coupled: whether the samples of a batch interact (see
            ``jacobian_sq_norms``): ``True`` for a layer other than BatchNorm
            that mixes them.

    Returns:
        A :class:`GCResult`.

    Raises:
        ValueError: empty data, unknown method, bad options; inputs that are
            scalar, NaN/inf or on another device than the model.
        TypeError: a model that is not an ``nn.Module``; data that is no
            tensor, ``Dataset`` or iterable of batches (a numpy array, a list
            of numbers, an ``(inputs, targets)`` tuple: each error names the
            fix); integer inputs without ``wrt=``, complex inputs, inputs of
            another dtype than the model's parameters.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 2))
        >>> result = measure(model, torch.randn(100, 3), batch_size=32)
        >>> result.num_samples, result.method
        (100, 'exact')
    """
    # a NumPy sweep's np.int64 counts as ints (GCResult.num_probes among them)
    batch_size, max_samples = as_int(batch_size), as_int(max_samples)
    num_probes, chunk_size = as_int(num_probes), as_int(chunk_size)
    check_measure_options(
        method=method,
        batch_size=batch_size,
        max_samples=max_samples,
        rtol=rtol,
        num_probes=num_probes,
        distribution=distribution,
        mode=mode,
        chunk_size=chunk_size,
        eps=eps,
        generator=generator,
        output=output,
        wrt=wrt,
        coupled=coupled,
    )

    from tqdm.auto import tqdm  # the core's only optional-feeling dependency

    if not isinstance(model, nn.Module):
        swapped = ""
        if isinstance(data, nn.Module):
            swapped = "; the arguments are (model, data)"
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}{swapped}"
        )
    # DDP's forward pass would broadcast buffers (a collective) on every batch
    model, output, wrt = unwrapped(model, output, wrt)

    collective = _distributed.active(distributed)
    failure: BaseException | None = None
    batches: Iterator[Tensor]
    try:
        batches, total = _batches(data, batch_size, input_key)
    except Exception as err:
        if not collective:
            raise
        # raised on every rank at the first gather: the others would wait there
        failure, batches, total = err, iter(()), None
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    device = _model_device(model)
    stats = RunningMean()
    kept: list[Tensor] = []
    chosen, probes = method, num_probes or 1

    def prepare(x: Tensor, seen: int) -> Tensor:
        """A batch cut to ``max_samples``, on the model's device, checked."""
        if max_samples is not None:
            x = x[: max_samples - seen]
        if device is not None and x.device != device:
            x = x.to(device)
        try:
            check_input(x, differentiated=wrt is None)
            _check_model_matches(model, x)
        except (TypeError, ValueError) as err:
            if not seen or type(err) not in (TypeError, ValueError):
                raise
            # in a stream, which batch: "x is an empty batch" alone named none
            raise type(err)(f"the batch starting at sample {seen}: {err}") from err
        return x

    # the pilot and the sample count auto sized its probes for, if it did
    sized: tuple[list[float], int] | None = None

    def choose(pilot: list[float], n: int) -> tuple[str, int]:
        nonlocal sized
        chosen, probes = _choose(pilot, n, rtol)
        if num_probes is not None and chosen == "projection":
            probes = num_probes  # the caller's count wins over the pilot's
        elif chosen == "projection":
            sized = (pilot, n)
        return chosen, probes

    if collective and method == "auto":
        # the ranks agree on one method from all their first batches
        pilot, first_size = [0.0, 0.0, 0.0, 0.0], 0
        try:
            first = next(batches, None)
            if first is not None:
                batches = itertools.chain([first], batches)
                x = prepare(first, 0)
                first_size = x.shape[0]
                with _single_sample_batchnorm(x, 0):
                    pilot = _pilot(
                        model, x, output, mode, distribution, generator, wrt, coupled
                    )
        except Exception as err:  # every rank must reach the gather below
            failure = err
        rows = _distributed.all_gather_rows(
            [*pilot, total or first_size, failure is not None], device
        )
        _distributed.raise_if_failed(rows[:, -1], failure)
        cost = rows[:, 0].max().item()
        summed = rows[:, 1:].sum(0).tolist()
        merged = [cost, *summed[:3]]
        rounds = _pilot_rounds(merged)  # the same on every rank
        if rounds * 2 >= cost:
            chosen, probes = "exact", 1  # as in the single-process pilot below
        else:
            if rounds > 1:  # the first batches hold too few samples: more pairs
                more = [0.0, 0.0, 0.0, 0.0]
                try:
                    if first is not None:
                        with _single_sample_batchnorm(x, 0):
                            more = _pilot(
                                model, x, output, mode, distribution, generator,
                                wrt, coupled, pairs=rounds - 1,
                            )  # fmt: skip
                except Exception as err:
                    failure = err
                rows = _distributed.all_gather_rows(
                    [*more[1:], failure is not None], device
                )
                _distributed.raise_if_failed(rows[:, -1], failure)
                added = rows[:, :3].sum(0).tolist()
                pairs = zip(merged[1:], added, strict=True)
                merged = [cost, *(a + b for a, b in pairs)]
            chosen, probes = choose(merged, int(summed[3]))
    elif method == "auto":
        # pilot on successive batches (kept, measured below) until it has seen
        # AUTO_PILOT_SAMPLES samples; it sums them as the ranks' pilots are
        pilot, seen, piloted = [0.0, 0.0, 0.0, 0], 0, []

        def pilot_on(x: Tensor, start: int, pairs: int = 1) -> list[float]:
            nonlocal pilot
            with _single_sample_batchnorm(x, start):
                one = _pilot(
                    model, x, output, mode, distribution, generator, wrt, coupled,
                    pairs,
                )  # fmt: skip
            pilot = [
                max(pilot[0], one[0]),
                *(a + b for a, b in zip(pilot[1:], one[1:], strict=True)),
            ]
            return one

        for batch in batches:
            x = prepare(batch, seen)
            piloted.append(x)
            seen += x.shape[0]
            one = pilot_on(x, seen - x.shape[0])
            if (
                one[3] == 0  # exact is cheap on this batch: no pilot
                or pilot[3] >= AUTO_PILOT_SAMPLES
                or (max_samples is not None and seen >= max_samples)
            ):
                break
        else:
            # the data ended within the pilot: that is their size, whatever
            # max_samples promised for data of unknown length (P ∝ 1/N: a
            # generator of 40 samples under max_samples=10**6 got 1 probe, not 6)
            total = seen
        if piloted:
            rounds = _pilot_rounds(pilot)
            if rounds * 2 >= pilot[0]:
                # a pilot of that many probes costs as much as exact does
                chosen, probes = "exact", 1
            else:
                if rounds > 1:  # too few samples: more pairs on each batch
                    start = 0
                    for x in piloted:
                        pilot_on(x, start, rounds - 1)
                        start += x.shape[0]
                chosen, probes = choose(pilot, total or seen)
            batches = itertools.chain(piloted, batches)
    bar = tqdm(
        total=total,
        unit="sample",
        desc="geometric complexity",
        leave=False,
        disable=None if progress is None else not progress,
    )
    # in train mode each batch draws fresh dropout masks, as in training: the
    # RNG moves on from batch to batch, and is put back once, after the last
    carried, generator = train_mode_rng(model, mode, chosen, generator)
    try:
        with carried as advance:
            for batch in batches:
                x = prepare(batch, stats.count)
                if advance is not None and stats.count:
                    advance()
                # half-precision norms as summed, in float32: in float16 one
                # beyond 65504 is inf, and one below 6e-5 keeps a few bits
                with wide_results(), _single_sample_batchnorm(x, stats.count):
                    values = jacobian_sq_norms(
                        model,
                        x,
                        method=chosen,
                        output=output,
                        mode=mode,
                        num_probes=probes,
                        distribution=distribution,
                        chunk_size=chunk_size,
                        eps=eps,
                        generator=generator,
                        wrt=wrt,
                        coupled=coupled,
                    )
                stats.update(values)
                if per_sample:
                    kept.append(values.detach().cpu())
                bar.update(x.shape[0])
                if max_samples is not None and stats.count >= max_samples:
                    break
    except Exception as err:
        if not collective:
            raise
        failure = err  # raised below, on every rank, after the gather
    finally:
        bar.close()
    if collective:
        rows = _distributed.all_gather_rows(
            [stats.count, stats.mean, stats.m2, failure is not None], device
        )
        _distributed.raise_if_failed(rows[:, -1], failure)
        merged = RunningMean()
        for n, mean, m2, _ in rows.tolist():
            merged.merge(RunningMean(int(n), mean, m2))
        stats = merged
    if stats.count == 0:
        raise ValueError("data is empty: there is no sample to measure")
    if sized is not None and stats.count < sized[1]:
        _warn_probes_sized_for_more(sized[0], sized[1], stats.count, probes, rtol)
    return GCResult(
        value=stats.mean,
        stderr=stats.stderr,
        num_samples=stats.count,
        method=chosen,
        num_probes=None if chosen == "exact" else probes,
        per_sample=(torch.cat(kept) if kept else torch.empty(0))
        if per_sample
        else None,
    )
