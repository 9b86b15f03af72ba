"""torchmetrics, Lightning, torchrun/DDP and Ray: each exact, each tested."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import dropout_case
from reference import per_sample_sq_norms
from torch import nn

from geocomplexity import jacobian_sq_norms, measure

ROOT = Path(__file__).resolve().parents[1]


def _net(d_out: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, d_out)
    )


# -- torchmetrics ------------------------------------------------------------


def test_metric_repr_names_what_it_measures():
    # nn.Module's repr showed "GeometricComplexity()" for every metric: two
    # of a MetricCollection (exact and projection, eval and train) looked alike
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    plain = GeometricComplexity(_net())
    assert repr(plain) == "GeometricComplexity(model=Sequential, method='exact')"
    probed = GeometricComplexity(
        _net(), method="projection", num_probes=4, mode="train",
        generator=torch.Generator(),
    )  # fmt: skip
    assert repr(probed) == (
        "GeometricComplexity(model=Sequential, method='projection', "
        "mode='train', num_probes=4, generator=<torch.Generator>)"
    )


def test_metric_accumulated_over_batches_equals_one_shot():
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model = _net().double()
    x = torch.randn(50, 6, dtype=torch.float64)
    metric = GeometricComplexity(model)
    for batch in x.split(7):
        metric.update(batch)
    whole = measure(model, x, method="exact", progress=False)
    torch.testing.assert_close(metric.compute().item(), whole.value, rtol=1e-12, atol=0)
    torch.testing.assert_close(metric.stderr().item(), whole.stderr, rtol=1e-9, atol=0)
    assert metric.count.item() == 50
    assert not any(k.startswith("model") for k in metric.state_dict())
    metric.reset()
    with (
        pytest.raises(ValueError, match="call update"),
        pytest.warns(UserWarning, match="before the ``update``"),  # torchmetrics'
    ):
        metric.compute()
    metric.update(x[:1])
    assert math.isnan(metric.stderr().item())


def test_metric_in_train_mode_draws_fresh_dropout_masks_for_every_update():
    # each update put the global RNG back, so updates between which nothing
    # moved it (a validation loop) drew the same dropout masks: 50 updates of
    # one batch of 8 gave 0.389 against the expected 0.512, 12.9 of its (too
    # small, masks repeated) standard errors away
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model, x, want = dropout_case()
    for seed in range(3):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        alone = jacobian_sq_norms(model, x, mode="train")
        metric = GeometricComplexity(model, mode="train")
        metric.update(x)
        assert metric.compute().item() == alone.mean().item()  # as a call alone
        value = metric.compute().item()
        metric.update(x)
        assert metric.compute().item() != value
        for _ in range(48):
            metric.update(x)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's, kept
        value, stderr = metric.compute().item(), metric.stderr().item()
        assert abs(value - want) < 4.5 * stderr, (seed, value, want)


def test_metric_forward_in_train_mode_draws_fresh_dropout_masks_for_every_batch():
    # forward() (metric(x), the usual call in a validation_step) resets the
    # states for each batch, so the count that salted the masks was 0 on every
    # call: four calls on one batch gave one value four times
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 3))
    model = model.double()
    x = torch.randn(8, 6, dtype=torch.float64)
    called = GeometricComplexity(model, mode="train")
    batch_values = [called(x).item() for _ in range(4)]
    assert len(set(batch_values)) == 4
    updated = GeometricComplexity(model, mode="train")
    for _ in range(4):
        updated.update(x)
    assert called.compute().item() == updated.compute().item()
    # and after reset() (each validation epoch) the masks go on, not over
    called.reset()
    assert called(x).item() not in batch_values


def test_metric_measures_with_respect_to_an_embedding():
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(20, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3)
    ).double()
    tokens = torch.randint(0, 20, (10, 3))
    metric = GeometricComplexity(model, wrt="0")
    for batch in tokens.split(4):
        metric.update(batch)
    # a linear head on the embedding: GC = ||A||_F^2 exactly
    want = model[2].weight.pow(2).sum().item()
    torch.testing.assert_close(metric.compute().item(), want, rtol=1e-12, atol=0)
    jvp = GeometricComplexity(model, wrt="0", method="jvp", num_probes=8)
    jvp.update(tokens)  # a linear head: every probe gives ||A u||^2, mean ||A||^2
    assert math.isfinite(jvp.compute().item())
    # a Hugging Face style batch: token ids under "input_ids"
    batches = [{"input_ids": b, "labels": torch.zeros(len(b))} for b in tokens.split(4)]
    r = measure(model, batches, wrt="0", progress=False)
    torch.testing.assert_close(r.value, want, rtol=1e-12, atol=0)


def test_metric_projection_is_unbiased_and_options_are_checked():
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model = _net(d_out=8).double()
    x = torch.randn(20, 6, dtype=torch.float64)
    exact = measure(model, x, method="exact", progress=False).value
    metric = GeometricComplexity(
        model, method="projection", generator=torch.Generator().manual_seed(0)
    )
    for _ in range(200):
        metric.update(x)
    z = (metric.compute().item() - exact) / metric.stderr().item()
    assert abs(z) < 4
    with pytest.raises(ValueError, match="unknown method 'hessian'"):
        GeometricComplexity(model, method="hessian")
    with pytest.raises(TypeError, match="integer inputs"):
        GeometricComplexity(model).update(torch.ones(3, 6, dtype=torch.long))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("not a model",), {}, TypeError, "torch.nn.Module"),
        ((), {"num_probes": 0}, ValueError, "num_probes"),
        ((), {"num_probes": 2.5}, ValueError, "num_probes"),
        ((), {"mode": "Train"}, ValueError, "unknown mode 'Train'"),
        ((), {"output": "9"}, ValueError, "output='9' names no submodule"),
        ((), {"output": 3}, TypeError, "output must be"),
        ((), {"wrt": "embed"}, ValueError, "wrt='embed' names no submodule"),
        ((), {"wrt": 3}, TypeError, "wrt must be"),
        ((), {"chunk_size": 0}, ValueError, "chunk_size"),
        ((), {"eps": -1.0}, ValueError, "eps"),
        ((), {"generator": 0}, TypeError, "generator"),
        ((), {"coupled": "yes"}, TypeError, "coupled"),
        ((), {"distribution": "normal"}, ValueError, "distribution"),
    ],
)
def test_metric_refuses_bad_options_when_made_not_at_first_update(
    args, kwargs, error, match
):
    # each was accepted by the constructor and failed only at update()
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    with pytest.raises(error, match=match):
        GeometricComplexity(*(args or (_net(),)), **kwargs)


def test_metric_takes_the_finite_difference_step():
    # the metric offered method="finite_difference" but no eps=: passing one
    # failed with torchmetrics' "Unexpected keyword arguments: `eps`"
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model = _net(d_out=4).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    for eps in (1e-3, 1e-6):
        g = torch.Generator().manual_seed(0)
        metric = GeometricComplexity(
            model, method="finite_difference", eps=eps, generator=g
        )
        metric.update(x)
        want = jacobian_sq_norms(
            model, x, method="finite_difference", eps=eps,
            generator=torch.Generator().manual_seed(0),
        ).mean()  # fmt: skip
        assert metric.compute().item() == pytest.approx(want.item(), rel=1e-12)
    assert "eps=1e-06" in repr(metric)


def test_metric_clones_measure_the_live_model():
    # MetricTracker deep-copies its metric each epoch; a copied model would
    # go on measuring the weights of the epoch it was copied in
    from torchmetrics.wrappers import MetricTracker

    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model = _net().double()
    x = torch.randn(10, 6, dtype=torch.float64)
    metric = GeometricComplexity(model)
    assert metric.clone().model is model
    tracker = MetricTracker(metric, maximize=False)
    tracker.increment()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    tracker.update(x)
    want = measure(model, x, method="exact", progress=False).value
    torch.testing.assert_close(tracker.compute().item(), want, rtol=1e-12, atol=0)


def test_metric_tracker_steps_draw_fresh_probes():
    # MetricTracker deep-copies its metric at every increment(): each copy
    # copied the generator too, so every step started from its first state
    # and drew the same probes (three equal estimates on an unchanged model)
    from torchmetrics.wrappers import MetricTracker

    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model = _net().double()
    x = torch.randn(10, 6, dtype=torch.float64)

    def tracked(generator, metric=None):
        if metric is None:
            metric = GeometricComplexity(
                model, method="projection", generator=generator
            )
        tracker = MetricTracker(metric, maximize=False)
        values = []
        for _ in range(3):
            tracker.increment()
            tracker.update(x)
            values.append(tracker.compute().item())
        return values

    # as one metric reset between the steps draws them
    metric = GeometricComplexity(
        model, method="projection", generator=torch.Generator().manual_seed(0)
    )
    want = []
    for _ in range(3):
        metric.update(x)
        want.append(metric.compute().item())
        metric.reset()
    assert len(set(want)) == 3
    assert tracked(torch.Generator().manual_seed(0)) == want
    # the global generator stays the global one: the probes move it on
    before = torch.get_rng_state()
    assert len(set(tracked(torch.default_generator))) == 3
    assert not torch.equal(before, torch.get_rng_state())
    # nor the same dropout masks in train mode, where nothing moves the RNG
    # between the steps (each copy's count started at the metric's 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 3))
    metric = GeometricComplexity(model.double(), mode="train")
    assert len(set(tracked(None, metric))) == 3


def test_metric_in_a_copied_container_measures_the_copied_model():
    import copy

    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net().double()
            self.metric = GeometricComplexity(self.net)

    holder = Holder()
    twin = copy.deepcopy(holder)
    assert twin.metric.model is twin.net and holder.metric.model is holder.net
    other = _net().double()
    holder.metric.model = other  # re-pointing the metric is honoured
    assert holder.metric.model is other
    assert "model" not in dict(holder.metric.named_children())


def test_metric_made_before_its_model_in_a_copied_container_measures_the_copy():
    # the copy resolved the model when the metric was copied: a container that
    # registers the metric before the model (or an AveragedModel of one) had
    # a copy whose metric measured the original model
    import copy
    import pickle

    from torch.optim.swa_utils import AveragedModel

    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    class MetricFirst(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.metric = GeometricComplexity(net)
            self.net = net

    holder = MetricFirst(_net().double())
    twin = copy.deepcopy(holder)
    assert twin.metric.model is twin.net and holder.metric.model is holder.net
    averaged = AveragedModel(holder)
    assert averaged.module.metric.model is averaged.module.net
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        twin.net[0].weight.mul_(3)
    twin.metric.update(x)
    want = measure(twin.net, x, method="exact", progress=False).value
    torch.testing.assert_close(twin.metric.compute().item(), want, rtol=1e-12, atol=0)
    assert holder.metric.clone().model is holder.net  # a metric alone shares
    pair = torch.nn.ModuleDict(
        {"metric": GeometricComplexity(twin.net), "net": twin.net}
    )
    loaded = pickle.loads(pickle.dumps(copy.deepcopy(pair)))  # a copy, unresolved
    assert loaded["metric"].model is loaded["net"]


def test_metric_leaves_the_model_alone():
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metric = GeometricComplexity(model)
    metric.update(torch.randn(10, 6))
    metric.double()  # a metric's dtype change must not reach the model
    assert model.training and next(model.parameters()).dtype == torch.float32
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_metric_sums_stay_float64_when_a_container_changes_dtype():
    # Lightning's "bf16-true" precision calls module.to(torch.bfloat16), which
    # torchmetrics' dtype guard lets through: bfloat16 sums would stop growing
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model = _net()
    metric = GeometricComplexity(model)
    torch.nn.ModuleDict({"gc": metric}).to(torch.bfloat16)
    assert metric.total.dtype == metric.total_sq.dtype == torch.float64
    model.float()
    x = torch.randn(2000, 6)
    for batch in x.split(10):
        metric.update(batch)
    want = measure(model, x, method="exact", progress=False).value
    torch.testing.assert_close(metric.compute().item(), want, rtol=1e-6, atol=0)
    metric.set_dtype(torch.float32)  # the explicit way still converts
    assert metric.total.dtype == torch.float32


def test_metric_of_a_float16_model_beyond_float16s_range():
    # squared norms of 180000 (Jacobian entries of 100) exceed float16's
    # 65504: update() failed as a non-finite Jacobian; it takes the float32 sums
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    lin = torch.nn.Linear(6, 3, bias=False).half()
    torch.nn.init.constant_(lin.weight, 100.0)
    metric = GeometricComplexity(lin)
    metric.update(torch.randn(5, 6).half())
    assert metric.compute().item() == 180000


def test_metrics_of_other_models_in_a_collection_keep_their_own_states():
    # MetricCollection puts metrics whose states agree (allclose) after the
    # first update in one compute group and then updates only the first: a
    # metric of an EMA copy (equal to the model at the start) reported the
    # model's value from then on
    import copy

    from torchmetrics import MetricCollection

    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model = _net().double()
    ema = copy.deepcopy(model)
    x = torch.randn(12, 6, dtype=torch.float64)
    metrics = MetricCollection(
        {
            "ema": GeometricComplexity(ema),
            "live": GeometricComplexity(model),
            "same": GeometricComplexity(model),  # measures alike: may share
        }
    )
    metrics.update(x[:4])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    metrics.update(x[4:])
    got = {k: v.item() for k, v in metrics.compute().items()}
    old = jacobian_sq_norms(ema, x)
    new = jacobian_sq_norms(model, x)
    live = torch.cat([old[:4], new[4:]]).mean().item()
    torch.testing.assert_close(got["ema"], old.mean().item(), rtol=1e-12, atol=0)
    torch.testing.assert_close(got["live"], live, rtol=1e-12, atol=0)
    torch.testing.assert_close(got["same"], live, rtol=1e-12, atol=0)
    assert ["live", "same"] in metrics.compute_groups.values()


# -- Lightning -----------------------------------------------------------------


def _lightning_setup():
    import lightning as L
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, TensorDataset

    class Memory(Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        @property
        def name(self):
            return "memory"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=16)
    return L, Memory, Module, train, val, x


def _trainer(L, logger, callback, **kwargs):
    return L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=callback if isinstance(callback, list) else [callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kwargs,
    )


def test_lightning_callback_logs_gc_equal_to_measure():
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, _ = _lightning_setup()
    callback = GeometricComplexityCallback(num_samples=64)
    logger, module = Memory(), Module()
    _trainer(L, logger, callback).fit(module, train, val)
    logged = [m for _, m in logger.rows if "gc/train" in m]
    assert len(logged) == 2  # one per epoch
    assert callback.train.shape == (64, 6) and callback.val.shape == (40, 6)
    # the model has not changed since the last epoch's end: same numbers
    for split, subset in (("train", callback.train), ("val", callback.val)):
        expected = measure(module, subset, method="exact", progress=False)
        assert logged[-1][f"gc/{split}"] == pytest.approx(expected.value, rel=1e-6)
        assert logged[-1][f"gc/{split}_stderr"] == pytest.approx(
            expected.stderr, rel=1e-5
        )
    assert logged[0]["gc/train"] != logged[1]["gc/train"]  # it trained between


def test_lightning_callback_reused_for_another_fit_measures_that_fits_val_loader():
    from torch.utils.data import DataLoader, TensorDataset

    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, x = _lightning_setup()
    callback = GeometricComplexityCallback(num_samples=16)
    module = Module()
    _trainer(L, Memory(), callback).fit(module, train, val)
    assert torch.equal(callback.val, x[:16])
    # one callback for two fits (cross-validation folds, a fine-tuning stage):
    # the second fit's subsets are its loaders', the validation one too, as
    # the train one already was (it measured the first fit's validation set)
    other = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    val2 = DataLoader(TensorDataset(other, torch.zeros(40).long()), batch_size=16)
    logger = Memory()
    _trainer(L, logger, callback).fit(module, train, val2)
    assert torch.equal(callback.val, other[:16])
    logged = [m for _, m in logger.rows if "gc/val" in m][-1]
    expected = measure(module, other[:16], method="exact", progress=False)
    assert logged["gc/val"] == pytest.approx(expected.value, rel=1e-6)


def test_lightning_callback_takes_inputs_from_dict_batches():
    from geocomplexity.integrations.lightning import GeometricComplexityCallback, _take

    class Loader:  # a list would read as several loaders
        def __init__(self, batches: list) -> None:
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

    x = torch.randn(12, 3)
    named = Loader(
        [
            {"label": torch.zeros(4, dtype=torch.long), "features": x[i : i + 4]}
            for i in (0, 4, 8)
        ]
    )
    assert torch.equal(_take(named, 10, "features"), x[:10])
    usual = Loader([{"image": x[i : i + 4]} for i in (0, 4, 8)])
    assert torch.equal(_take(usual, 12), x)
    with pytest.raises(TypeError, match=r"input_key='features'.*train=\.\.\."):
        _take(named, 10)
    assert GeometricComplexityCallback(input_key="features").input_key == "features"


def test_lightning_callback_every_n_steps_on_given_subsets():
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, x = _lightning_setup()
    subset = x[:10]
    callback = GeometricComplexityCallback(subset, every_n_steps=2, method="exact")
    logger, module = Memory(), Module()
    _trainer(L, logger, callback).fit(module, train, val)
    steps = [s for s, m in logger.rows if "gc/train" in m]
    # after optimizer steps 2, 4, 6 (3 batches per epoch, 2 epochs), at the
    # steps Lightning logs those batches' own metrics: 1, 3, 5
    assert steps == [1, 3, 5]
    assert torch.equal(callback.train, subset)
    last = [m for _, m in logger.rows if "gc/train" in m][-1]
    assert last["gc/train"] == pytest.approx(
        measure(module, subset, method="exact").value, rel=1e-6
    )
    with pytest.raises(ValueError, match="every_n_steps"):
        GeometricComplexityCallback(every_n_steps=0)


def test_lightning_callback_takes_measures_options_or_refuses_them_up_front():
    # progress=True (an option of measure) crashed at the first epoch's end
    # with "got multiple values for keyword argument 'progress'", as did a
    # misspelt option, after an epoch of training
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, x = _lightning_setup()
    callback = GeometricComplexityCallback(x[:10], progress=False, batch_size=4)
    logger, module = Memory(), Module()
    trainer = _trainer(L, logger, callback)
    trainer.fit_loop.max_epochs = 1
    trainer.fit(module, train, val)
    logged = [m["gc/train"] for _, m in logger.rows if "gc/train" in m]
    want = measure(module, x[:10], method="exact", progress=False).value
    assert logged == [pytest.approx(want, rel=1e-6)]
    with pytest.raises(TypeError, match="num_probe"):
        GeometricComplexityCallback(num_probe=4)
    with pytest.raises(TypeError, match="distributed"):
        GeometricComplexityCallback(distributed=True)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((), {"method": "exactt"}, ValueError, "unknown method 'exactt'"),
        ((), {"wrt": 3}, TypeError, "wrt must be"),
        ((), {"mode": "Train"}, ValueError, "unknown mode"),
        ((), {"num_probes": 0}, ValueError, "num_probes"),
        ((), {"generator": 0}, TypeError, "generator"),
        ((), {"num_samples": 2.5}, ValueError, "num_samples must be a positive"),
        ((), {"every_n_steps": 2.5}, ValueError, "every_n_steps"),
        (([[0.0] * 6] * 4,), {}, TypeError, r"train=.*must be a torch.Tensor"),
        ((torch.full((4, 6), float("nan")),), {}, ValueError, r"train=.*NaN"),
        ((torch.ones(4, 6, dtype=torch.long),), {}, TypeError, r"train=.*dtype"),
        ((torch.ones(0, 6),), {}, ValueError, r"train=.*empty"),
        ((None, torch.tensor(1.0)), {}, ValueError, r"val=.*scalar"),
    ],
)
def test_lightning_callback_refuses_bad_values_when_made(args, kwargs, error, match):
    # each was accepted and failed only after the first training epoch
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    with pytest.raises(error, match=match):
        GeometricComplexityCallback(*args, **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {"output": "9"}, "output='9' names no submodule"),
        ((), {"wrt": "embed"}, "wrt='embed' names no submodule"),
        ((torch.ones(6),), {}, r"train=.*add its batch dimension"),
    ],
)
def test_lightning_callback_checks_against_the_model_before_the_first_epoch(
    args, kwargs, match
):
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, _ = _lightning_setup()
    callback = GeometricComplexityCallback(*args, **kwargs)
    module = Module()
    steps = []
    module.training_step = lambda *a, **k: steps.append(1)  # no epoch runs
    trainer = _trainer(L, Memory(), callback)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, train, val)
    assert steps == []


def test_lightning_callback_refuses_monitors_that_would_read_last_epochs_value(
    tmp_path,
):
    # validation runs before on_train_epoch_end, where the callback logs: a
    # ModelCheckpoint or EarlyStopping that acts after validation (validation
    # every 2 epochs, say) ranked the epoch-1 model by epoch 0's gc/val
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, _ = _lightning_setup()

    def fit(monitor):
        trainer = L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=Memory(),
            callbacks=[GeometricComplexityCallback(num_samples=16), monitor],
            enable_progress_bar=False,
            enable_model_summary=False,
            check_val_every_n_epoch=2,
        )
        trainer.fit(Module(), train, val)
        return trainer

    folder = tmp_path / "late"
    with pytest.raises(ValueError, match="save_on_train_epoch_end=True"):
        fit(ModelCheckpoint(folder, monitor="gc/val"))
    with pytest.raises(ValueError, match="check_on_train_epoch_end=True"):
        fit(EarlyStopping(monitor="gc/val_stderr"))
    checkpoint = ModelCheckpoint(
        tmp_path, monitor="gc/val", save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = fit(checkpoint)
    assert checkpoint.current_score == trainer.callback_metrics["gc/val"]
    fit(ModelCheckpoint(tmp_path / "other", monitor="val_loss"))  # not ours


def test_lightning_callback_leaves_training_alone_and_logs_once_per_step():
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    def train(callback):
        L, Memory, Module, loader, val, _ = _lightning_setup()
        logger, module = Memory(), Module()
        kwargs = {"accumulate_grad_batches": 3}
        trainer = _trainer(L, logger, callback or [], **kwargs)
        trainer.fit(module, loader, val)
        return torch.cat([p.flatten() for p in module.parameters()]), logger

    plain, _ = train(None)
    # subsets taken from the (seeded, shuffled) loaders, one step per epoch
    watched, logger = train(GeometricComplexityCallback(every_n_steps=1))
    assert torch.equal(plain, watched)  # taking the subsets drew no randomness
    steps = [s for s, m in logger.rows if "gc/train" in m]
    # once per optimizer step, not once per batch, at Lightning's logging
    # axis (the batches that stepped before this one: 0, then 1)
    assert steps == [0, 1]


def test_lightning_callback_leaves_numpy_and_python_randomness_alone():
    # taking the subsets runs the loader, whose augmentations may draw from
    # numpy's or Python's global generator (seeded by seed_everything): the
    # training run then saw other noise than it would without the callback
    import random

    import numpy as np
    from torch.utils.data import DataLoader, Dataset

    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    class Noisy(Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            noise = random.gauss(0, 1) + np.random.normal()
            return self.x[i] + float(noise), self.y[i]

    def train(callback):
        L, Memory, Module, loader, val, _ = _lightning_setup()
        noisy = DataLoader(Noisy(*loader.dataset.tensors), batch_size=32)
        random.seed(0)
        np.random.seed(0)
        module = Module()
        _trainer(L, Memory(), callback or []).fit(module, noisy, val)
        return torch.cat([p.flatten() for p in module.parameters()])

    plain = train(None)
    assert torch.equal(plain, train(GeometricComplexityCallback(num_samples=8)))


def test_lightning_callback_leaves_a_loader_with_persistent_workers_alone():
    # a loader with persistent workers has one iterator, which the trainer
    # starts before on_train_start: taking the subset reset it, and the first
    # epoch trained on 2 batches instead of 3, neither of them its own
    from torch.utils.data import DataLoader, TensorDataset

    from geocomplexity.integrations.lightning import _take

    def loader():
        data = TensorDataset(torch.arange(12.0).unsqueeze(1))
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            data,
            batch_size=4,
            shuffle=True,
            generator=g,
            num_workers=1,
            persistent_workers=True,
        )

    want = [b[0] for b in loader()]
    watched = loader()
    epoch = iter(watched)  # as the trainer's fit loop does
    first = next(epoch)[0]
    assert _take(watched, 6).unique().numel() == 6
    assert all(map(torch.equal, [first, *(b[0] for b in epoch)], want))


def test_lightning_callback_resumed_run_does_not_log_the_resumed_step_again(
    tmp_path,
):
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, x = _lightning_setup()

    def fit(epochs, **kwargs):
        logger = Memory()
        callback = GeometricComplexityCallback(x[:10], every_n_steps=1)
        trainer = _trainer(L, logger, callback, accumulate_grad_batches=3)
        trainer.fit_loop.max_epochs = epochs
        trainer.fit(Module(), train, val, **kwargs)
        return trainer, [s for s, m in logger.rows if "gc/train" in m]

    first, steps = fit(1)  # one optimizer step per epoch: 3 batches, 3 accumulated
    assert steps == [0]  # Lightning's logging axis (global_step 1)
    first.save_checkpoint(tmp_path / "last.ckpt")
    # the first batch after resuming ends at step 1 again, which was logged
    _, steps = fit(2, ckpt_path=tmp_path / "last.ckpt")
    assert steps == [1]


def test_lightning_callback_resumed_run_logs_what_an_uninterrupted_run_logs(
    tmp_path,
):
    # the probes' generator was not checkpointed: a resumed run started it over
    # from its seed and logged the first epochs' probes again
    from torch.utils.data import DataLoader

    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, _ = _lightning_setup()
    train = DataLoader(train.dataset, batch_size=32)  # the same batches resumed

    def fit(epochs, **kwargs):
        logger = Memory()
        callbacks = [
            GeometricComplexityCallback(
                method="projection",
                num_samples=16,
                generator=torch.Generator().manual_seed(seed),
                prefix=prefix,
            )
            for seed, prefix in ((0, "gc"), (1, "gc2"))
        ]
        trainer = _trainer(L, logger, callbacks)
        trainer.fit_loop.max_epochs = epochs
        trainer.fit(Module(), train, val, **kwargs)
        rows = [m for _, m in logger.rows if "gc/train" in m]
        return trainer, [(m["gc/train"], m["gc2/train"], m["gc/val"]) for m in rows]

    _, whole = fit(3)
    first, before = fit(1)
    first.save_checkpoint(tmp_path / "last.ckpt")
    _, after = fit(3, ckpt_path=tmp_path / "last.ckpt")
    assert len(whole) == 3 and len(set(whole)) == 3
    assert before + after == whole


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_lightning_callback_measures_at_the_trainers_precision(precision):
    # the trainer converts the model and each step's inputs; the callback's
    # float32 subsets (taken from the loader, or given) met a float64 or
    # bfloat16 model: a TypeError at the first epoch's end
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, x = _lightning_setup()
    taken = GeometricComplexityCallback(num_samples=16)
    given = GeometricComplexityCallback(x[:10], prefix="given")
    logger, module = Memory(), Module()
    trainer = _trainer(L, logger, [taken, given], precision=precision)
    trainer.fit_loop.max_epochs = 1
    trainer.fit(module, train, val)
    dtype = next(module.parameters()).dtype
    assert dtype == (torch.float64 if precision == "64-true" else torch.bfloat16)
    logged = [m for _, m in logger.rows if "gc/train" in m][-1]
    for name, subset in (("gc/train", taken.train), ("given/train", x[:10])):
        want = measure(module, subset.to(dtype), method="exact", progress=False)
        assert logged[name] == pytest.approx(want.value, rel=1e-6)  # logged as float32


@pytest.mark.parametrize(
    "kwargs", [{"method": "jvp", "num_probes": 4}, {"output": "net.2"}]
)
def test_lightning_callback_measures_a_compiled_module(kwargs):
    # Lightning compiles the module's forward; a compiled graph has no
    # forward-mode derivative and ignores hooks added after it was compiled
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch.compiler.set_stance is torch >= 2.6")
    L, Memory, Module, train, val, x = _lightning_setup()
    logger, module = Memory(), Module()
    callback = GeometricComplexityCallback(x[:10], **kwargs)
    compiled = torch.compile(module, backend="aot_eager")
    _trainer(L, logger, callback).fit(compiled, train, val)
    logged = [m["gc/train"] for _, m in logger.rows if "gc/train" in m]
    assert len(logged) == 2 and all(math.isfinite(v) for v in logged)
    if "output" in kwargs:  # the last layer's output is the model's
        want = measure(module, x[:10], method="exact", progress=False).value
        assert logged[-1] == pytest.approx(want, rel=1e-6)


# -- torchrun / DDP --------------------------------------------------------------


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Two gloo ranks of ``args`` under torchrun.

    Run again, once, where a rank aborted with "terminate called without an
    active exception": PyTorch's gloo worker thread freeing a collective's
    tensors while the interpreter shuts down (pytorch/pytorch#179291, which
    a DDP model's own all-reduces meet: the distributed test failed so twice
    in about ten full runs of the suite on 2 busy cores, and 0 of 42 runs of
    its worker alone). Any other failure, or the same one twice, is the
    test's.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", "2", *args,
    ]  # fmt: skip
    for _ in range(2):
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
        aborted = "terminate called without an active exception" in proc.stderr
        if proc.returncode == 0 or not aborted:
            break
    return proc


@pytest.mark.slow
def test_distributed_measure_metric_and_ddp_penalty_equal_single_process(tmp_path):
    out = tmp_path / "dist.json"
    proc = _torchrun(str(ROOT / "tests" / "distributed_worker.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["world"] == 2
    value, stderr, n = d["single"]
    for case in ("strided", "uneven", "empty"):
        v, s, m = d[case]
        assert m == n == 37
        assert v == pytest.approx(value, rel=1e-12)
        assert s == pytest.approx(stderr, rel=1e-9)
    assert d["unsharded_n"] == 74  # every rank's copy counts: shard the data
    assert d["metric"] == pytest.approx(value, rel=1e-12)
    # stderr() read this rank's states alone: 0.0102, not the data set's
    # 0.0069 that goes with compute()'s mean
    assert d["metric_stderr"] == pytest.approx(stderr, rel=1e-9)
    assert d["metric_stderr_synced"] == pytest.approx(stderr, rel=1e-9)
    assert d["metric_local_count"] == 19  # rank 0's own states, kept
    for method in ("exact", "auto"):  # rank 1 saw a NaN: both ranks raise
        assert d[f"errors_{method}"] == ["RuntimeError", "ValueError"]
    assert d["rank0_alone"] == 37
    picks = d["auto_picks"]
    assert picks[0] == picks[1] and picks[0][2] == 37  # one method for all ranks
    assert picks[0][0] == "projection"  # the pilot's probes agree too
    for a, b in zip(d["ddp_grads"], d["single_grads"], strict=True):
        torch.testing.assert_close(
            torch.tensor(a), torch.tensor(b), rtol=1e-10, atol=1e-13
        )
    # the penalty on the ranks' mean gradient: the mean of the ranks' own
    # squared norms was 11% off; a hand-assembled finite-difference .grad
    # skipped DDP's all-reduce, and the replicas drifted apart
    assert len(d["gn_rel_err"]) == 8
    for case, err in d["gn_rel_err"].items():
        assert err < 1e-9, case


def test_metric_sync_by_hand_uses_its_own_gather():
    # torchmetrics' sync() defaults to its gather_all_tensors, whose gloo
    # collectives can leave their tensors to gloo's worker thread, which
    # aborted the process at exit ("terminate called without an active
    # exception": the distributed test failed so under load); a sync by hand
    # now gathers by the metric's dist_sync_fn, as compute() does
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    gathered = []

    def gather(t, group=None):
        gathered.append(t)
        return [t]

    model = nn.Sequential(nn.Linear(3, 2)).double()
    metric = GeometricComplexity(model, dist_sync_fn=gather)
    metric.update(torch.randn(4, 3, dtype=torch.float64))
    metric.sync(distributed_available=lambda: True)
    assert gathered and metric._is_synced
    metric.unsync()


@pytest.mark.slow
def test_torchrun_example_runs():
    proc = _torchrun("examples/ddp.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    measured = [line.split(", ", 1)[1] for line in lines if line.startswith("rank")]
    assert len(measured) == 2 and measured[0] == measured[1]
    assert any(line.startswith("single process:") for line in lines)
    epochs = [line for line in lines if line.startswith("epoch")]
    assert len(epochs) == 2
    # the epoch's mean over every rank's samples (DistributedSampler pads
    # each rank to the same count), not rank 0's last batch (15 samples)
    from geocomplexity.data import load

    n = len(load("digits").x_train)
    for line in epochs:
        got = re.search(r"mean train loss ([0-9.]+) .* over the (\d+) samples", line)
        assert got is not None, line
        assert int(got[2]) == math.ceil(n / 2) * 2
        assert 0 < float(got[1]) < 10


def test_torchrun_example_run_without_torchrun_says_how_to_run_it():
    # `python examples/ddp.py`, the mistake the file invites, failed deep in
    # init_process_group: "environment variable RANK expected, but not set"
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    proc = subprocess.run(
        [sys.executable, "examples/ddp.py"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "torchrun --standalone --nproc_per_node 2 examples/ddp.py" in proc.stderr
    assert "Traceback" not in proc.stderr


LIGHTNING_DDP = """
import json, sys
import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from geocomplexity import measure
from geocomplexity.integrations.lightning import GeometricComplexityCallback

class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 3))
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])
    def validation_step(self, batch, batch_idx):
        pass
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

g = torch.Generator().manual_seed(0)
x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
callback = GeometricComplexityCallback(num_samples=int(sys.argv[2]))
# max_samples of the subset, not of each rank's share of it
cut = GeometricComplexityCallback(x[:12], prefix="cut", max_samples=5)
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp",
                    logger=False, enable_progress_bar=False, enable_checkpointing=False,
                    enable_model_summary=False, callbacks=[callback, cut])
module = Module()
loader = lambda n: DataLoader(TensorDataset(x[:n], y[:n]), batch_size=8)
trainer.fit(module, loader(40), loader(int(sys.argv[3])))
if trainer.is_global_zero:
    with open(sys.argv[1], "w") as f:
        json.dump({
            "logged": trainer.callback_metrics["gc/val"].item(),
            "n": len(callback.val),
            "first": torch.equal(callback.val, x[: len(callback.val)]),
            "want": measure(module, x[: len(callback.val)], method="exact").value,
            "cut": trainer.callback_metrics["cut/train"].item(),
            "want_cut": measure(module, x[:5], method="exact").value,
        }, f)
"""


GENERATOR_STATES_DDP = """
import json, os, sys
import torch
import torch.distributed as dist
from geocomplexity.integrations.lightning import GeometricComplexityCallback

dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(rank)  # each rank its own probes
torch.randn(7, generator=g)  # the draws before the checkpoint
saved = GeometricComplexityCallback(method="projection", generator=g).state_dict()
want = torch.randn(5, generator=g)
# every rank loads the checkpoint rank 0 wrote
kept = [saved if rank == 0 else None]
dist.broadcast_object_list(kept, src=0)
fresh = torch.Generator().manual_seed(rank)
resumed = GeometricComplexityCallback(method="projection", generator=fresh)
resumed.load_state_dict(kept[0])
got = torch.randn(5, generator=fresh)
with open(f"{sys.argv[1]}.{rank}", "w") as f:
    json.dump({"equal": torch.equal(got, want)}, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_lightning_callback_keeps_every_ranks_generator_state(tmp_path):
    # Lightning writes rank 0's callback state: had the callback saved only
    # its own generator's, every rank would resume with rank 0's probes
    script = tmp_path / "states.py"
    script.write_text(GENERATOR_STATES_DDP)
    out = tmp_path / "out"
    proc = _torchrun(str(script), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads(Path(f"{out}.{rank}").read_text())["equal"], rank


@pytest.mark.slow
@pytest.mark.parametrize("num_samples, num_val", [(5, 12), (512, 11)])
def test_lightning_callback_under_ddp_measures_the_loaders_first_inputs(
    tmp_path, num_samples, num_val
):
    # each rank's loader yields its DistributedSampler shard: the subset is
    # still the first num_samples inputs of the loader, the same on every rank
    # (5 of the 12: each rank's shard has 6, so a take from a shard differs).
    # 11 inputs on 2 ranks: the sampler pads rank 1's shard with input 0,
    # which the subset of all 11 held twice (12 inputs: gc/val 0.10887, where
    # one process measures 0.10831 on the 11)
    script = tmp_path / "fit.py"
    script.write_text(LIGHTNING_DDP)
    out = tmp_path / "out.json"
    proc = _torchrun(str(script), str(out), str(num_samples), str(num_val))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["n"] == min(num_samples, num_val) and d["first"]  # the whole small set
    assert d["logged"] == pytest.approx(d["want"], rel=1e-5)
    # max_samples=5 took 5 of each rank's share: 10 of the subset
    assert d["cut"] == pytest.approx(d["want_cut"], rel=1e-5)


@pytest.mark.parametrize("backend", ["gloo", None])
@pytest.mark.parametrize("entry", ["measure", "metric"])
def test_gloo_worker_never_frees_the_gathered_tensors(
    tmp_path, monkeypatch, entry, backend
):
    """A gloo worker that drops its work late must not free Python tensors.

    The fake collective below is the real one plus a thread that holds the
    finished work for 50 ms, as a descheduled gloo worker does; the gathered
    tensors must come back only once that thread has let go. Both gathers are
    checked: ``measure``'s, and the one the torchmetrics metric syncs with.
    A group made without naming a backend (``init_process_group()``, as
    torchrun scripts often do) runs CPU tensors through gloo too, though its
    backend reads ``"undefined"``.
    """
    import threading

    import torch.distributed as dist

    from geocomplexity.distributed import all_gather, all_gather_rows

    real = dist.all_gather
    held = []

    def late_worker(gathered, mine, group=None):
        work = real(gathered, mine, group=group, async_op=True)
        work.wait()
        held.append(work)
        threading.Timer(0.05, held.clear).start()

    if backend is None and torch.cuda.is_available():
        pytest.skip("init_process_group() where there is a GPU makes NCCL alone")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "all_gather", late_worker)
        if entry == "measure":
            got = all_gather_rows([1.0, 2.0]).tolist()
            assert got == [[1.0, 2.0]]
        else:
            from geocomplexity.integrations.torchmetrics import GeometricComplexity

            assert GeometricComplexity(_net()).dist_sync_fn is all_gather
            state = torch.tensor(3.0, dtype=torch.float64)
            assert [t.item() for t in all_gather(state)] == [3.0]
        assert not held, "returned while another thread still held the tensors"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("config", "hint", "want"),
    [
        ("cpu:gloo", None, "cpu"),
        ("cpu:gloo,cuda:gloo", "cuda:1", "cpu"),  # gloo: the CPU, always
        ("cpu:gloo,cuda:nccl", None, "cpu"),
        ("cuda:nccl", None, "cuda:0"),
        # init_process_group() on a machine with a GPU (seen under torch 2.11
        # on an H200): NCCL alone, the backend reads "undefined", and the CPU
        # tensors the exchange was made of failed ("No backend type associated
        # with device type cpu")
        ("cuda:nccl", "cuda:1", "cuda:1"),
    ],
)
def test_the_exchange_takes_the_device_the_groups_backend_needs(
    monkeypatch, config, hint, want
):
    import torch.distributed as dist

    from geocomplexity.distributed import _device

    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "undefined")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    got = _device(torch.device(hint) if hint else None)
    assert got == torch.device(want)


def test_measure_distributed_true_without_a_group_is_a_clear_error():
    with pytest.raises(ValueError, match="init_process_group"):
        measure(_net(), torch.randn(4, 6), distributed=True)


# -- Ray ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_ray_executor_gives_the_local_results_in_the_same_run_files(tmp_path):
    pytest.importorskip("ray")
    from geocomplexity.cli import main

    def reproduce(out, *extra):
        argv = ["reproduce", "init-depth", "--preset", "smoke", "--workers", "2"]
        assert main([*argv, "--out", str(out), *extra]) == 0
        runs = sorted((out / "init-depth" / "runs").glob("*.json"))
        return {p.name: json.loads(p.read_text()) for p in runs}

    local = reproduce(tmp_path / "local")
    # two finished runs are kept: Ray computes only the others
    folder = tmp_path / "ray" / "init-depth" / "runs"
    folder.mkdir(parents=True)
    for name in sorted(local)[:2]:
        (folder / name).write_text(json.dumps(local[name]))
    kept = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    remote = reproduce(tmp_path / "ray", "--executor", "ray")
    assert remote.keys() == local.keys() and len(local) > 2
    assert all(remote[k]["result"] == local[k]["result"] for k in local)
    assert kept == {p: p.stat().st_mtime_ns for p in kept}
    claims = [
        (tmp_path / d / "init-depth" / "claims.json").read_text()
        for d in ("local", "ray")
    ]
    assert claims[0] == claims[1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_ray_executor_keeps_the_other_runs_when_one_fails(tmp_path):
    pytest.importorskip("ray")
    from geocomplexity.experiments.runner import Run, load_runs, run_sweep

    def fn(run):  # defined here: Ray sends it by value
        import time

        if run["fails"]:
            raise ArithmeticError("diverged")
        time.sleep(2)  # still running when the failure comes in
        return {"ok": True}

    runs = [Run.make("t", fails=True), Run.make("t", fails=False)]
    with pytest.raises(ArithmeticError, match="diverged"):
        run_sweep(runs, fn, tmp_path, workers=2, executor="ray", progress=False)
    # the run that did not fail finished and was stored, so a rerun skips it
    assert list(load_runs(tmp_path)) == [runs[1].key]


def test_ray_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    from geocomplexity.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ray" else real(name, *a),
    )
    argv = ["reproduce", "transfer", "--executor", "ray", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "pip install 'geocomplexity[ray]'" in capsys.readouterr().err
    assert main(["reproduce", "transfer", "--ray-address", "x:1"]) == 2
    assert "--executor ray" in capsys.readouterr().err


def test_wrapped_models_are_measured_through_the_module_they_wrap(tmp_path):
    # DDP's forward broadcasts buffers (a collective: a hang where ranks
    # measure different numbers of batches) and a compiled graph has no
    # forward-mode derivative and ignores hooks added later (output=): both
    # are measured through the module they wrap, names with or without the
    # wrapper's prefix
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)
    )
    model.eval()
    x = torch.randn(16, 4)
    want = jacobian_sq_norms(model, x, output="2")
    compiled = torch.compile(model, backend="aot_eager")
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    jvp = jacobian_sq_norms(model, x, method="jvp", output="2", generator=g())
    for name in ("2", "_orig_mod.2"):
        got = jacobian_sq_norms(compiled, x, method="jvp", output=name, generator=g())
        assert torch.allclose(got, jvp, rtol=1e-5)
        assert torch.allclose(jacobian_sq_norms(compiled, x, output=name), want)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        calls = []
        ddp._sync_buffers = lambda *a, **k: calls.append(1)
        ddp._sync_params_and_buffers = lambda *a, **k: calls.append(1)
        result = measure(ddp, x, output="module.2", progress=False)
        assert result.value == pytest.approx(want.mean().item(), rel=1e-5)
        assert calls == []  # no collective from measuring
    finally:
        dist.destroy_process_group()


def test_gc_penalty_through_ddp_takes_names_without_the_wrappers_prefix(tmp_path):
    # measuring takes output="2" for "module.2" of a DDP model; the penalty,
    # which runs the wrapper's forward pass, refused it ("names no submodule")
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from geocomplexity.regularizers import GeometricComplexity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        got = []
        for name in ("module.0", "0"):
            # one wrapper each: the penalty alone leaves the last bias out of
            # the graph, which DDP's reducer refuses at the next forward pass
            ddp = DistributedDataParallel(model)
            model.zero_grad()
            value = GeometricComplexity(1.0, method="exact", wrt=name)(ddp, x, None)
            value.backward()
            got.append((value.item(), model[0].weight.grad.clone()))
        assert got[1][0] == pytest.approx(got[0][0], rel=1e-12) and got[0][0] > 0
        torch.testing.assert_close(got[1][1], got[0][1])
        with pytest.raises(ValueError, match="wrt='9' names no submodule"):
            GeometricComplexity(1.0, wrt="9")(ddp, x, None)
    finally:
        dist.destroy_process_group()


def test_jvp_penalty_through_ddp_that_sinks_its_outputs_is_a_clear_error(tmp_path):
    # DDP's find_unused_parameters (and static_graph) hook on the outputs has
    # no forward-mode derivative: the jvp penalty failed with PyTorch's "You
    # must implement the jvp function for custom autograd.Function"
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from geocomplexity.regularizers import GeometricComplexity

    torch.manual_seed(0)
    x = torch.randn(8, 4)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        for kwargs in ({"find_unused_parameters": True}, {"static_graph": True}):
            ddp = DistributedDataParallel(
                nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), **kwargs
            )
            with pytest.raises(ValueError, match="find_unused_parameters=False"):
                GeometricComplexity(1.0, method="jvp")(ddp, x)
        # without the hook it runs, and the reverse-mode penalties run either way
        ddp = DistributedDataParallel(
            nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        )
        assert GeometricComplexity(1.0, method="jvp")(ddp, x).item() > 0
        sinks = DistributedDataParallel(
            nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
            find_unused_parameters=True,
        )
        assert GeometricComplexity(1.0, method="exact")(sinks, x).item() > 0
    finally:
        dist.destroy_process_group()


def test_numpy_integer_options_are_taken_as_ints():
    """The metric's num_probes and the callback's num_samples/every_n_epochs
    from a NumPy sweep (np.int64) were refused as not positive integers."""
    np = pytest.importorskip("numpy")
    from geocomplexity.integrations.lightning import GeometricComplexityCallback
    from geocomplexity.integrations.torchmetrics import GeometricComplexity

    model = _net().double()
    x = torch.randn(12, 6, dtype=torch.float64)
    values = []
    for n in (np.int64, int):
        metric = GeometricComplexity(
            model, method="projection", num_probes=n(3), chunk_size=n(2),
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        metric.update(x)
        values.append(metric.compute())
        assert "num_probes=3, chunk_size=2" in repr(metric)
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    callback = GeometricComplexityCallback(
        num_samples=np.int64(10), every_n_epochs=np.int64(2),
        every_n_steps=np.int64(5), num_probes=np.int64(2), method="projection",
    )  # fmt: skip
    assert (callback.num_samples, callback.every_n_epochs, callback.every_n_steps) == (
        10, 2, 5,
    )  # fmt: skip
    assert type(callback.num_samples) is int and type(callback.every_n_steps) is int


def test_ray_sweep_leaves_a_run_another_sweep_holds_to_it(tmp_path):
    # a local sweep into the same folder is computing run b: the Ray sweep
    # waits for its record instead of computing b too (it did, and stored
    # its own record over the other's)
    pytest.importorskip("ray")
    from geocomplexity.atomic import claimed
    from geocomplexity.experiments import runner
    from geocomplexity.experiments.runner import Run, load_runs, run_sweep

    def fn(run):
        return {"by": "ray"}

    a, b = Run.make("t", name="a"), Run.make("t", name="b")
    path = tmp_path / "runs" / f"{b.key}.json"
    holding, done = threading.Event(), threading.Event()

    def other_sweep():
        with claimed(path, wait=True):
            holding.set()
            time.sleep(3)
            runner._store(runner._record(lambda run: {"by": "other"}, b), path)
        done.set()

    worker = threading.Thread(target=other_sweep)
    worker.start()
    holding.wait()
    records = run_sweep([a, b], fn, tmp_path, workers=2, executor="ray", progress=False)
    worker.join()
    assert done.is_set()
    assert [r["result"]["by"] for r in records] == ["ray", "other"]
    assert load_runs(tmp_path)[b.key]["result"] == {"by": "other"}


def test_lightning_callback_every_n_steps_on_the_loss_axis_with_two_optimizers():
    # with two optimizers global_step counts both: GC after batch i went to
    # step 2(i+1) while the batch's own loss went to step i
    from geocomplexity.integrations.lightning import GeometricComplexityCallback

    L, Memory, Module, train, val, x = _lightning_setup()

    class Two(Module):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            inputs, y = batch
            for opt in self.optimizers():
                opt.zero_grad()
                loss = F.cross_entropy(self(inputs), y)
                self.manual_backward(loss)
                opt.step()
            self.log("loss", loss, on_step=True, on_epoch=False)

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[-1].parameters(), lr=0.1),
            ]

    callback = GeometricComplexityCallback(x[:10], every_n_steps=2, method="exact")
    logger = Memory()
    _trainer(L, logger, callback).fit(Two(), train, val)
    gc_steps = [s for s, m in logger.rows if "gc/train" in m]
    loss_steps = [s for s, m in logger.rows if "loss" in m]
    assert loss_steps == list(range(6))  # 3 batches per epoch, 2 epochs
    assert gc_steps == loss_steps  # 2 optimizer steps a batch: every batch


def test_lightning_callback_measures_untimed(monkeypatch):
    # the logged values feed ModelCheckpoint and EarlyStopping, and a seeded
    # run must log the same ones: batched and looped VJPs differ in the last
    # bits, and geocomplexity.tuning's timed choice between them depends on
    # the machine's load
    from geocomplexity import tuning
    from geocomplexity.integrations import lightning as gl

    tuned = []

    def spy(*args, **kwargs):
        tuned.append(tuning.tuned())
        return measure(*args, **kwargs)

    monkeypatch.setattr(gl, "measure", spy)
    L, Memory, Module, train, val, _ = _lightning_setup()
    callback = gl.GeometricComplexityCallback(num_samples=64)
    module = Module()
    _trainer(L, Memory(), callback).fit(module, train, val)
    assert tuned == [False] * 4  # train and val, two epochs
    assert module.net not in tuning._TRIALS and module not in tuning._TRIALS


def test_distributed_auto_pilots_small_first_batches_on_enough_pairs(
    tmp_path, monkeypatch
):
    # under a process group auto pilots on the ranks' first batches alone:
    # from batches of 4 it sized the probes by one pair's σ² on 4 samples,
    # and over 12 seeds chose 8 to 53 probes for the same data (the noisier
    # that σ², the more often too few: P ∝ σ̂², the error ∝ 1/√P). More pairs
    # on those batches, up to AUTO_PILOT_SAMPLES, steady it: 18 to 31. The
    # collective path runs on a group of one (gloo), patched to take it
    import torch.distributed as dist

    import geocomplexity.distributed

    monkeypatch.setattr(geocomplexity.distributed, "active", bool)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 50), nn.Tanh(), nn.Linear(50, 200))
    model = model.double()
    x = torch.randn(32, 64, dtype=torch.float64)
    want = per_sample_sq_norms(model, x).mean().item()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        probes = []
        for seed in range(12):
            g = torch.Generator().manual_seed(seed)
            r = measure(
                model, x, batch_size=4, rtol=0.01, generator=g, distributed=True
            )
            assert r.method == "projection" and r.num_samples == 32
            assert r.value == pytest.approx(want, rel=0.05)
            probes.append(r.num_probes)
    finally:
        dist.destroy_process_group()
    assert max(probes) <= 2.5 * min(probes), sorted(probes)
