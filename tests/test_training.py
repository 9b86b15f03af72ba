"""The training loop: reproducible, recorded, serialisable, side-effect free."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geocomplexity.regularizers import (
    L2,
    GeometricComplexity,
    GradientNorm,
    SpectralNorm,
)
from geocomplexity.training import History, apply_label_noise, fit


def problem(n: int = 200) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 100, 8, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + 2 * (x[:, 3] > 0).long()
    return (x[:n], y[:n]), (x[n:], y[n:])


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))


def test_fit_trains_records_and_is_reproducible():
    train, test = problem()
    kwargs = dict(
        optimizer="sgd",
        lr=0.2,
        batch_size=32,
        epochs=6,
        seed=3,
        track_gc_every=3,
        regularizer=GeometricComplexity(1e-3) + L2(1e-4),
        input_noise_std=0.05,
        label_noise=0.1,
        device="cpu",
        progress=False,
    )
    h1 = fit(mlp(), train, test, **kwargs)
    h2 = fit(mlp(), train, test, **kwargs)
    assert [r["epoch"] for r in h1.records] == list(range(7))
    assert h1.final["step"] == 6 * 7
    assert h1.final["train_loss"] < h1.records[0]["train_loss"]
    assert not math.isnan(h1.records[3]["gc_train"]) and math.isnan(
        h1.records[2]["gc_test"]
    )
    assert all(r["penalty"] > 0 for r in h1.records[1:])
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in h1.records]
    strip2 = [{k: v for k, v in r.items() if k != "wall_time"} for r in h2.records]
    assert str(strip) == str(strip2)  # same seed, same numbers (NaN-safe compare)
    h3 = fit(mlp(), train, test, **{**kwargs, "seed": 4})
    assert h3.final["train_loss"] != h1.final["train_loss"]


def test_history_json_round_trip(tmp_path):
    train, _ = problem()
    h = fit(
        mlp(),
        train,
        None,
        lr=0.1,
        epochs=2,
        track_gc_every=1,
        progress=False,
        device="cpu",
    )
    path = tmp_path / "h.json"
    h.save(path)
    back = History.from_json(path.read_text())
    assert back.config == h.config
    assert len(back.records) == 3
    assert math.isnan(back.final["test_loss"])
    assert back["gc_train"] == h["gc_train"]


def test_history_json_takes_numpy_and_tensor_scalars_a_callback_records(tmp_path):
    # a callback that added np.float32(...), an np.int64 or a tensor norm to
    # the record made every checkpoint save (which serialises the history)
    # raise "Object of type float32 is not JSON serializable" mid-run
    import numpy as np

    train, _ = problem()

    def extra(history, model):
        history.final["norm"] = model[0].weight.norm().detach()
        history.final["half"] = np.float32(0.5)
        history.final["count"] = np.int64(7)
        history.final["missing"] = np.float32("nan")

    def run() -> History:
        return fit(
            mlp(),
            train,
            epochs=2,
            callbacks=[extra],
            checkpoint=tmp_path / "run.pt",
            progress=False,
            device="cpu",
        )

    h = run()
    back = History.from_json(h.to_json())
    assert back["half"] == [0.5] * 3 and back["count"] == [7] * 3
    assert back["norm"] == [r["norm"].item() for r in h.records]
    assert all(math.isnan(v) for v in back["missing"])
    again = run()
    assert again["train_loss"] == h["train_loss"]  # resumed from the checkpoint


def test_history_json_names_what_it_cannot_hold():
    h = History(config={"schedule": object()})
    with pytest.raises(TypeError, match="History holds a object"):
        h.to_json()


def test_label_noise_is_fixed_per_seed_and_effective_rate_recorded():
    y = torch.arange(1000) % 10
    a, ra = apply_label_noise(y, 0.3, 10, torch.Generator().manual_seed(0))
    b, rb = apply_label_noise(y, 0.3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and ra == rb
    assert ra == (a != y).double().mean().item()
    assert 0.3 * 0.8 < ra < 0.3  # some relabellings draw the true class back
    train, _ = problem()
    h = fit(mlp(), train, epochs=1, label_noise=0.5, progress=False, device="cpu")
    assert 0.35 < h.effective_label_noise < 0.5


def test_full_batch_steps_and_early_stop_and_callbacks():
    train, _ = problem()
    seen = []
    h = fit(
        mlp(),
        train,
        optimizer="adam",
        lr=1e-2,
        batch_size=None,
        steps=500,
        stop_at_train_loss=0.3,
        callbacks=[lambda hist, m: seen.append(len(hist.records))],
        progress=False,
        device="cpu",
    )
    assert h.final["train_loss"] <= 0.3
    assert h.final["step"] == h.final["epoch"] < 500
    assert seen == list(range(1, len(h.records) + 1))


def test_fit_restores_global_rng():
    # the model is built first: mlp() reseeds the global RNG, and built inside
    # the call it made this test pass only after another test had left the RNG
    # at manual_seed(0) (it failed when run alone)
    train, _, model = *problem(), mlp()
    torch.manual_seed(12345)
    torch.rand(3)  # a state no seed call leaves
    state = torch.get_rng_state()
    fit(model, train, epochs=1, progress=False, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)


def test_fit_on_the_cpu_leaves_the_cuda_generators_alone(monkeypatch):
    """fork_rng restores the CPU's and the run's device's generators only."""
    train, model, seeded = problem()[0], mlp(), []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    fit(model, train, epochs=1, progress=False, device="cpu")
    assert seeded == []  # a reseeded GPU would stay reseeded


def test_fit_refuses_an_empty_or_ragged_test_set():
    # an empty test set (load_digits(test_fraction=0)'s) crashed with
    # ZeroDivisionError in the first evaluation
    train, (xt, yt) = problem()
    for test in ((xt[:0], yt[:0]), (xt, yt[:50])):
        with pytest.raises(ValueError, match="test must be"):
            fit(mlp(), train, test, epochs=1, progress=False, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of epochs"),
        ({"epochs": 1, "steps": 1}, "exactly one of epochs"),
        ({"epochs": 1, "optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
        ({"epochs": 1, "label_noise": 1.5}, "label_noise"),
        ({"epochs": 1, "lr": 0}, "lr"),
        ({"epochs": 1, "input_noise_std": -1}, "input_noise_std"),
        ({"epochs": 1, "input_noise_std": float("nan")}, "input_noise_std"),
        # infinities trained on NaN from the first step
        ({"epochs": 1, "input_noise_std": float("inf")}, "input_noise_std.*finite"),
        ({"epochs": 1, "lr": float("inf")}, "lr must be positive and finite"),
        ({"epochs": 1, "track_gc_every": 0}, "track_gc_every"),
        ({"epochs": 1, "gc_subset": -60}, "gc_subset"),
        ({"epochs": 1, "label_noise": 0.1, "num_classes": 2}, "num_classes=2"),
        ({"epochs": 1, "drop_last": True, "batch_size": 500}, "drop every sample"),
        ({"epochs": 0}, "positive"),
    ],
)
def test_fit_bad_options(kwargs, match):
    train, _ = problem()
    with pytest.raises(ValueError, match=match):
        fit(mlp(), train, progress=False, device="cpu", **kwargs)


def test_eval_every_records_first_every_kth_and_last():
    train, _ = problem()
    h = fit(mlp(), train, epochs=7, eval_every=3, progress=False, device="cpu")
    assert [r["epoch"] for r in h.records] == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="eval_every"):
        fit(mlp(), train, epochs=1, eval_every=0, progress=False, device="cpu")


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # a random sign flip per sample: an augmentation that draws from the generator
    sign = torch.randint(0, 2, (len(x), 1), generator=g).to(x) * 2 - 1
    return x * sign


class _Interrupt(Exception):
    pass


TERMS = {
    "gc": lambda: GeometricComplexity(1e-3),
    # a generator of its own, whose state the checkpoint must carry
    "gc_own_generator": lambda: GeometricComplexity(
        1e-3, generator=torch.Generator().manual_seed(7)
    ),
    "spectral": lambda: SpectralNorm(1e-2),  # power-iteration vectors are state
    "gradient_norm_fd": lambda: GradientNorm(1e-2, method="finite_difference"),
}


CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", list(TERMS))
def test_checkpoint_resume_gives_the_uninterrupted_numbers(tmp_path, kind, device):
    train, test = problem()
    term = TERMS[kind]  # fresh per run
    dropout = 0.0 if kind == "gradient_norm_fd" else 0.1  # FD refuses dropout

    def mlp(seed=0):
        model = globals()["mlp"](seed)
        model[2].p = dropout
        return model

    common = dict(
        optimizer="adam",
        lr=1e-2,
        batch_size=48,
        epochs=6,
        seed=5,
        label_noise=0.2,
        augment=_flip,
        eval_every=2,
        device=device,  # on CUDA: the CUDA RNG (dropout) is in the checkpoint too
        progress=False,
    )

    def run(model, **extra):
        return fit(model, train, test, regularizer=term(), **common, **extra)

    whole_model = mlp()
    whole = run(whole_model)

    def stop_at_epoch_4(history, model):
        if history.final["epoch"] == 4:
            raise _Interrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Interrupt):
        run(mlp(), checkpoint=ckpt, checkpoint_every=1, callbacks=[stop_at_epoch_4])
    assert ckpt.is_file()
    stamp = torch.load(ckpt, weights_only=True)["epoch"]
    assert stamp == 3  # the kill came before epoch 4's checkpoint
    resumed_model = mlp(seed=1)  # a different init: the checkpoint must win
    resumed = run(resumed_model, checkpoint=ckpt)

    def strip(h):
        return str([{k: r[k] for k in r if k != "wall_time"} for r in h.records])

    assert strip(resumed) == strip(whole)
    assert resumed.effective_label_noise == whole.effective_label_noise
    for a, b in zip(whole_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    # a finished checkpoint is not trained again
    again_model = mlp(seed=2)
    again = run(again_model, checkpoint=ckpt)
    assert strip(again) == strip(whole)
    assert torch.equal(next(again_model.parameters()), next(whole_model.parameters()))


@pytest.mark.parametrize("stamped", [True, False])
def test_a_cuda_checkpoint_resumes_on_the_cpu(tmp_path, stamped, monkeypatch):
    """A checkpoint written on CUDA, read on a machine training on the CPU.

    Its fallback penalty generator's state is a CUDA generator's (16 bytes:
    seed and offset), which a CPU generator refuses ("Expected a
    CPUGeneratorImplState of size 5056"): resuming a GPU sweep's run on the
    CPU, even one that had finished, raised that RuntimeError. The run now
    carries on with the device's random streams started afresh, and says so.
    ``stamped``: the checkpoint names its device type; without (written before
    it did), a CUDA RNG state in it tells.
    """
    train, test = problem()
    ckpt = tmp_path / "run.pt"
    common = dict(
        batch_size=48, epochs=4, seed=5, progress=False, device="cpu", checkpoint=ckpt
    )

    def stop_at_epoch_2(history, model):
        if history.final["epoch"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(mlp(), train, test, callbacks=[stop_at_epoch_2], **common)
    # as fit saves it on CUDA: both device-side states are a CUDA generator's
    state = torch.load(ckpt, weights_only=True)
    cuda_state = torch.zeros(16, dtype=torch.uint8)
    state["cuda_rng"], state["reg_generator"] = cuda_state, cuda_state.clone()
    if stamped:
        state["device_type"] = "cuda"
    else:
        state.pop("device_type", None)
    torch.save(state, ckpt)
    cpu_rng = torch.get_rng_state()
    # a CPU run draws nothing from CUDA and fork_rng(devices=[]) restores no
    # CUDA generator: setting one would move the caller's CUDA RNG for good
    cuda_sets = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a: cuda_sets.append(a))
    with pytest.warns(UserWarning, match="written on cuda, resumed on cpu"):
        resumed = fit(mlp(), train, test, **common)
    assert [r["epoch"] for r in resumed.records] == [0, 1, 2, 3, 4]
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert cuda_sets == []
    # the checkpoint it finished is the CPU's: handed back without a warning
    again = fit(mlp(), train, test, **common)
    assert str(again.records) == str(resumed.records)  # str: NaN penalties


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train, _ = problem()
    bad = tmp_path / "run.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Delete the file"):
        fit(mlp(), train, epochs=1, checkpoint=bad, device="cpu", progress=False)


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    # a tensor or a model's bare state_dict at the checkpoint path raised an
    # AttributeError ('Tensor' object has no attribute 'get'), and a
    # checkpoint missing a key a KeyError, instead of saying what to do
    train, _ = problem()
    kwargs = dict(epochs=1, device="cpu", progress=False)
    path = tmp_path / "run.pt"
    for other in (torch.zeros(3), [1, 2], mlp().state_dict()):
        torch.save(other, path)
        with pytest.raises(ValueError, match="not a checkpoint written by fit"):
            fit(mlp(), train, checkpoint=path, **kwargs)
    path.unlink()
    fit(mlp(), train, checkpoint=path, **kwargs)
    state = torch.load(path, weights_only=True)
    del state["penalty_sum"]
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"not a checkpoint written by fit \(no penalty_sum\)"
    ):
        fit(mlp(), train, checkpoint=path, **kwargs)
    # a folder fails before training, not at the first save an epoch later
    calls = []
    with pytest.raises(ValueError, match="is a folder"):
        fit(
            mlp(), train, checkpoint=tmp_path,
            callbacks=[lambda h, m: calls.append(1)], **kwargs,
        )  # fmt: skip
    assert calls == []


def test_resume_after_an_early_stop_and_a_foreign_checkpoint(tmp_path):
    train, test = problem()
    ckpt = tmp_path / "run.pt"
    kwargs = dict(
        lr=0.5,
        batch_size=32,
        epochs=40,
        stop_at_train_loss=0.9,
        eval_every=7,
        device="cpu",
        progress=False,
    )
    whole = fit(mlp(), train, test, **kwargs)
    stopped = fit(mlp(), train, test, checkpoint=ckpt, **kwargs)
    assert stopped.final["epoch"] == whole.final["epoch"] < 40
    again = fit(mlp(), train, test, checkpoint=ckpt, **kwargs)  # finished: kept
    assert again.final["epoch"] == whole.final["epoch"]
    assert len(again.records) == len(whole.records)
    with pytest.raises(ValueError, match="different run"):
        fit(mlp(), train, test, checkpoint=ckpt, **{**kwargs, "lr": 0.1})
    # the early stop ended that run: one without it (or with another
    # threshold) would be handed the stopped run's history as its own
    for stop in (None, 0.5):
        with pytest.raises(ValueError, match="different run"):
            fit(mlp(), train, checkpoint=ckpt, **{**kwargs, "stop_at_train_loss": stop})


def test_a_term_reused_across_runs_gives_each_run_a_new_terms_numbers():
    # SpectralNorm keeps power-iteration vectors: a second fit with the same
    # object must not start from the first run's
    train, _ = problem()
    kwargs = dict(lr=0.1, batch_size=50, epochs=2, device="cpu", progress=False)
    term = SpectralNorm(1e-2)
    first = fit(mlp(), train, regularizer=term, **kwargs)
    again = fit(mlp(), train, regularizer=term, **kwargs)
    new = fit(mlp(), train, regularizer=SpectralNorm(1e-2), **kwargs)
    assert again.final["train_loss"] == new.final["train_loss"]
    assert first.final["train_loss"] == new.final["train_loss"]


def test_input_noise_is_applied_and_seeded():
    train, _ = problem()
    kwargs = dict(lr=0.1, batch_size=50, epochs=2, device="cpu", progress=False)
    clean = fit(mlp(), train, **kwargs).final["train_loss"]
    noisy = fit(mlp(), train, input_noise_std=0.5, **kwargs).final["train_loss"]
    again = fit(mlp(), train, input_noise_std=0.5, **kwargs).final["train_loss"]
    assert noisy != clean and noisy == again


def test_input_noise_leaves_the_data_order_alone():
    """An input-noise run sees the batches an unregularized run of its seed sees.

    The regularizers experiment compares a noise run with the noise-free run
    of the same seed: drawing the noise from the shuffling generator gave the
    noise run another data order from its second epoch on, a difference that
    is not the noise's. Noise of 1e-12 on inputs near 3 vanishes in float32,
    so the two runs differ only if their orders do.
    """
    train, _ = problem()
    x = train[0] + 3.0  # |x| >= ~0.5: x + 1e-12·ε == x exactly in float32
    assert torch.equal(x + 1e-12 * torch.randn(x.shape), x)
    kwargs = dict(lr=0.1, batch_size=32, epochs=3, seed=0, device="cpu", progress=False)
    clean, noisy = mlp(), mlp()
    clean[2].p = noisy[2].p = 0.0  # no dropout: its draws are not the point here
    fit(clean, (x, train[1]), **kwargs)
    fit(noisy, (x, train[1]), input_noise_std=1e-12, **kwargs)
    for a, b in zip(clean.parameters(), noisy.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_resume_with_input_noise_gives_the_uninterrupted_numbers(
    tmp_path,
):
    train, _ = problem()
    common = dict(
        lr=0.1,
        batch_size=48,
        epochs=5,
        seed=2,
        input_noise_std=0.3,
        device="cpu",
        progress=False,
    )
    whole_model = mlp()
    whole = fit(whole_model, train, **common)

    def stop_at_epoch_3(history, model):
        if history.final["epoch"] == 3:
            raise _Interrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Interrupt):
        fit(mlp(), train, checkpoint=ckpt, callbacks=[stop_at_epoch_3], **common)
    resumed_model = mlp(seed=1)
    resumed = fit(resumed_model, train, checkpoint=ckpt, **common)
    assert resumed.final["train_loss"] == whole.final["train_loss"]
    for a, b in zip(whole_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_drop_last_keeps_every_step_at_the_batch_size():
    train, _ = problem(n=210)  # 4 batches of 50 and one of 10
    sizes = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            if self.training:
                sizes.append(len(x))
            return self.net(x)

    kwargs = dict(lr=0.1, batch_size=50, epochs=2, device="cpu", progress=False)
    h = fit(Spy(), train, drop_last=True, **kwargs)
    assert sizes == [50] * 8 and h.final["step"] == 8
    sizes.clear()
    h = fit(Spy(), train, **kwargs)
    assert sizes == [50, 50, 50, 50, 10] * 2 and h.final["step"] == 10


def test_fit_trains_on_token_ids_with_gc_taken_at_the_embeddings():
    import geocomplexity as gcx

    def lm() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Embedding(30, 8), nn.Flatten(), nn.Linear(4 * 8, 16), nn.ReLU(),
            nn.Linear(16, 5),
        )  # fmt: skip

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 30, (128, 4), generator=g)
    labels = torch.randint(0, 5, (128,), generator=g)
    runs = {}
    for strength in (0.0, 0.3):
        model = lm()
        h = fit(
            model, (tokens, labels), (tokens[:64], labels[:64]), lr=0.1,
            batch_size=32, epochs=15, seed=0, device="cpu", progress=False,
            regularizer=GeometricComplexity(strength, wrt="0"),
            track_gc_every=5, gc_wrt="0",
        )  # fmt: skip
        runs[strength] = h.final["gc_train"]
        want = gcx.measure(model, tokens, wrt="0", progress=False).value
        assert math.isclose(h.final["gc_train"], want, rel_tol=1e-5)
        assert math.isfinite(h.final["gc_test"]) and h.final["penalty"] >= 0
    # the penalty on the embeddings' GC lowers it
    assert runs[0.3] < 0.8 * runs[0.0], runs


def test_fit_on_token_ids_names_the_wrt_options():
    model = nn.Sequential(nn.Embedding(30, 4), nn.Flatten(), nn.Linear(8, 3))
    tokens, labels = torch.randint(0, 30, (16, 2)), torch.randint(0, 3, (16,))
    common = {"epochs": 1, "device": "cpu", "progress": False}
    with pytest.raises(ValueError, match=r"gc_wrt="):
        fit(model, (tokens, labels), track_gc_every=1, **common)
    with pytest.raises(TypeError, match=r"wrt='<embedding"):
        fit(model, (tokens, labels), regularizer=GeometricComplexity(0.1), **common)
    with pytest.raises(ValueError, match=r"input_noise_std.*cannot take"):
        fit(model, (tokens, labels), input_noise_std=0.1, **common)
    with pytest.raises(TypeError, match=r"wrt='<embedding"):
        GeometricComplexity(0.1)(model, tokens)


def test_language_model_example_runs_and_its_penalty_lowers_gc(capsys):
    # examples/language_model.py: a transformer on token ids, float32 (flash
    # attention on the CPU), GC at the embeddings measured and penalised
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "language_model.py"
    spec = importlib.util.spec_from_file_location("language_model", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--epochs", "6"])
    assert results[0.1][0] < 0.7 * results[0.0][0]  # 0.69 against 1.62 here
    assert "GC at the embeddings" in capsys.readouterr().out


def test_language_model_example_trains_strength_zero_once(capsys):
    # --strength 0 trained the unpenalised run twice (the loop went over
    # (0.0, strength)): the same run, its time and its printed line doubled
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "language_model.py"
    spec = importlib.util.spec_from_file_location("language_model", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    runs = []

    def counted(*args, **kwargs):
        runs.append(kwargs["regularizer"])
        return fit(*args, **kwargs)

    example.fit = counted
    results = example.main(["--epochs", "1", "--strength", "0"])
    assert len(runs) == 1 and list(results) == [0.0]
    assert capsys.readouterr().out.count("GC penalty 0:") == 1


def test_an_optimizer_class_is_built_with_the_given_lr(tmp_path):
    # optimizer=torch.optim.SGD was called as params -> optimizer, so it ran
    # at SGD's default lr (1e-3) while the history recorded lr=0.3
    train, _ = problem()
    kwargs = dict(lr=0.3, batch_size=50, epochs=2, device="cpu", progress=False)
    named = fit(mlp(), train, optimizer="sgd", **kwargs)
    by_class = fit(mlp(), train, optimizer=torch.optim.SGD, **kwargs)
    assert by_class.config["lr"] == 0.3
    assert by_class["train_loss"] == named["train_loss"]
    # and a checkpoint knows which class wrote it (every class was "type")
    ckpt = tmp_path / "run.pt"
    fit(mlp(), train, optimizer=torch.optim.SGD, checkpoint=ckpt, **kwargs)
    with pytest.raises(ValueError, match="different run"):
        fit(mlp(), train, optimizer=torch.optim.Adam, checkpoint=ckpt, **kwargs)


@pytest.mark.parametrize("how", ["instance", "class", "function"])
def test_an_optimizer_that_needs_a_closure_is_refused_before_training(how):
    # fit steps without a closure: LBFGS failed at the first step with torch's
    # "step() missing 1 required positional argument: 'closure'"
    train, _ = problem()
    model = mlp()
    optimizer = {
        "instance": lambda: torch.optim.LBFGS(model.parameters(), lr=0.1),
        "class": lambda: torch.optim.LBFGS,
        "function": lambda: lambda params: torch.optim.LBFGS(params),
    }[how]()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="LBFGS needs one"):
        fit(model, train, optimizer=optimizer, epochs=1, device="cpu", progress=False)
    assert all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )


def test_accuracy_is_nan_where_the_targets_are_not_class_indices():
    # regression and class-probability targets were recorded as 0% accurate
    # (train_acc 0.0 beside a train loss of 0.2)
    import torch.nn.functional as F

    (x, y), _ = problem()
    kwargs = dict(lr=0.5, batch_size=50, epochs=2, device="cpu", progress=False)
    one_hot = F.one_hot(y, 4).float()
    h = fit(mlp(), (x, one_hot), (x, one_hot), **kwargs)
    assert all(math.isnan(v) for v in h["train_acc"] + h["test_acc"])
    assert h.final["train_loss"] < h.records[0]["train_loss"]
    target = x[:, :4].cumsum(1)  # (B, 4), a regression
    h = fit(mlp(), (x, target), loss_fn=F.mse_loss, **kwargs)
    assert all(math.isnan(v) for v in h["train_acc"])
    # class indices still give the accuracy
    h = fit(mlp(), (x, y), **kwargs)
    assert 0.4 < h.final["train_acc"] <= 1


def test_gc_is_tracked_every_track_gc_every_epochs_whatever_eval_every():
    # GC was measured only at recorded epochs: with eval_every=2 and
    # track_gc_every=3 it came at epoch 0 and never again in 5 epochs
    train, _ = problem()
    h = fit(
        mlp(), train, epochs=5, eval_every=2, track_gc_every=3, device="cpu",
        progress=False,
    )  # fmt: skip
    tracked = [r["epoch"] for r in h.records if not math.isnan(r["gc_train"])]
    assert tracked == [0, 3]
    assert [r["epoch"] for r in h.records] == [0, 2, 3, 4, 5]


def test_a_checkpoint_is_refused_by_a_run_that_records_otherwise(tmp_path):
    # a finished checkpoint without GC tracking was handed to a run that asked
    # for it: every gc_train NaN, silently (and eval_every likewise)
    train, _ = problem()
    ckpt = tmp_path / "run.pt"
    kwargs = dict(lr=0.1, batch_size=50, epochs=2, device="cpu", progress=False)
    fit(mlp(), train, checkpoint=ckpt, **kwargs)
    for other in ({"track_gc_every": 1}, {"eval_every": 2}, {"gc_subset": 64}):
        with pytest.raises(ValueError, match="different run"):
            fit(mlp(), train, checkpoint=ckpt, **kwargs, **other)
    again = fit(mlp(), train, checkpoint=ckpt, **kwargs)  # the same call resumes
    assert len(again.records) == 3
    # a checkpoint written before these options were checked still resumes
    state = torch.load(ckpt, weights_only=True)
    del state["recording"]
    torch.save(state, ckpt)
    assert len(fit(mlp(), train, checkpoint=ckpt, **kwargs).records) == 3


def test_numpy_scalar_options_train_and_serialise(tmp_path):
    # a sweep's np.int64 epochs trained an epoch and then crashed writing its
    # checkpoint (int64 is not JSON serializable); np.int64 batch_size and
    # seed crashed at the start inside torch
    np = pytest.importorskip("numpy")
    train, _ = problem()
    plain = dict(lr=0.25, batch_size=50, epochs=2, seed=3)
    numpy_ = dict(
        lr=np.float32(0.25), batch_size=np.int64(50), epochs=np.int64(2),
        seed=np.int64(3),
    )  # fmt: skip
    common = dict(device="cpu", progress=False)
    want = fit(mlp(), train, **plain, **common)
    got = fit(mlp(), train, checkpoint=tmp_path / "run.pt", **numpy_, **common)
    assert got["train_loss"] == want["train_loss"]
    again = fit(mlp(), train, checkpoint=tmp_path / "run.pt", **numpy_, **common)
    assert again["train_loss"] == want["train_loss"]  # weights_only loads it
    back = History.from_json(got.to_json())
    assert back.config["epochs"] == 2 and back.config["batch_size"] == 50


def test_label_noise_refuses_targets_that_are_not_class_indices():
    # one-hot targets failed with a shape mismatch, or where 4 rows of 4 were
    # chosen (label_noise=0.02 of 200) were "relabelled" silently by writing
    # an index (0 or 1: y.max() + 1 classes) into every entry of a row
    import torch.nn.functional as F

    (x, y), _ = problem()
    one_hot = F.one_hot(y, 4).float()
    with pytest.raises(ValueError, match="class indices"):
        fit(mlp(), (x, one_hot), epochs=1, label_noise=0.02, progress=False,
            device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match="class indices"):
        apply_label_noise(one_hot, 0.2, 4, torch.Generator().manual_seed(0))


def test_apply_label_noise_refuses_a_fraction_outside_0_1():
    # a negative fraction sliced from the end: apply_label_noise(y, -0.1, ...)
    # relabelled randperm(n)[:-100], 900 of 1000 labels (effective rate
    # 0.815); 1.5 relabelled every one silently
    y = torch.arange(1000) % 10
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="fraction"):
            apply_label_noise(y, bad, 10, torch.Generator().manual_seed(0))
    _, rate = apply_label_noise(y, 0.0, 10, torch.Generator().manual_seed(0))
    assert rate == 0.0


def test_an_optimizer_instance_is_recorded_and_checked_by_its_own_lr(tmp_path):
    # with optimizer=SGD(params, lr=0.3), History.config said lr=0.01 (fit's
    # unused default), and a checkpoint of it resumed a run given lr=0.05,
    # which then trained at the checkpoint's 0.3 (load_state_dict restores it)
    train, _ = problem()
    kwargs = dict(batch_size=50, device="cpu", progress=False)

    def sgd(lr):
        return lambda params: torch.optim.SGD(params, lr=lr)

    model = mlp()
    h = fit(model, train, optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
            epochs=1, **kwargs)  # fmt: skip
    assert h.config["lr"] == 0.3
    assert fit(mlp(), train, optimizer=sgd(0.3), epochs=1, **kwargs).config["lr"] == 0.3
    ckpt = tmp_path / "run.pt"
    fit(mlp(), train, optimizer=sgd(0.3), epochs=2, checkpoint=ckpt, **kwargs)
    with pytest.raises(ValueError, match="different run"):
        fit(mlp(), train, optimizer=sgd(0.05), epochs=2, checkpoint=ckpt, **kwargs)
    again = fit(mlp(), train, optimizer=sgd(0.3), epochs=2, checkpoint=ckpt, **kwargs)
    assert len(again.records) == 3


def _resumed_equals_whole(run, ckpt, error) -> tuple:
    """``run(kill_at)``'s whole run, then one killed at epoch 2 and resumed.

    The two must give the same train losses and the same weights, bit for
    bit. Returns both runs' ``(history, model, optimizer)``.
    """
    whole = run(None)
    ckpt.unlink()
    with pytest.raises(error):
        run(kill_at=2)
    resumed = run(None)
    losses = [[r["train_loss"] for r in h.records] for h in (whole[0], resumed[0])]
    assert losses[0] == losses[1]
    for a, b in zip(resumed[1].parameters(), whole[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return whole, resumed


def test_a_run_whose_scheduler_moved_the_lr_resumes_from_its_checkpoint(tmp_path):
    # a learning-rate scheduler stepped by a callback lowers the optimizer's
    # lr: the killed run's checkpoint holds the lowered one, and resuming the
    # same call was refused as "written by a different run" (the resume check
    # compared the run's settings with the optimizer's current param groups)
    train, _ = problem()
    ckpt = tmp_path / "run.pt"

    class Killed(Exception):
        pass

    def run(kill_at: int | None):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

        def step_lr(history, _model):
            if history.records[-1]["epoch"] > 0:  # after the epoch's steps
                sched.step()
            if history.records[-1]["epoch"] == kill_at:
                raise Killed

        h = fit(model, train, optimizer=opt, epochs=3, batch_size=50,
                device="cpu", progress=False, checkpoint=ckpt,
                callbacks=[step_lr])  # fmt: skip
        return h, model, opt

    _, (_, _, opt) = _resumed_equals_whole(run, ckpt, Killed)
    assert opt.param_groups[0]["lr"] == 0.3 * 0.5**3
    # another starting lr is still another run
    with pytest.raises(ValueError, match="different run"):
        fit(mlp(), train, optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
            epochs=3, batch_size=50, device="cpu", progress=False,
            checkpoint=ckpt)  # fmt: skip


def _jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + 0.1 * torch.randn(x.shape, generator=generator)


def test_a_checkpoint_is_refused_by_a_run_that_augments_otherwise(tmp_path):
    # a finished checkpoint of a run without augmentation was handed to a run
    # with it (or the reverse) as its own: its numbers, no training, no error
    train, _ = problem()
    kwargs = dict(lr=0.1, batch_size=50, epochs=2, device="cpu", progress=False)
    plain, augmented = tmp_path / "plain.pt", tmp_path / "augmented.pt"
    fit(mlp(), train, checkpoint=plain, **kwargs)
    fit(mlp(), train, checkpoint=augmented, augment=_jitter, **kwargs)
    with pytest.raises(ValueError, match="different run"):
        fit(mlp(), train, checkpoint=plain, augment=_jitter, **kwargs)
    with pytest.raises(ValueError, match="different run"):
        fit(mlp(), train, checkpoint=augmented, **kwargs)
    # the same calls resume, and a checkpoint written before the option
    assert len(fit(mlp(), train, checkpoint=plain, **kwargs).records) == 3
    again = fit(mlp(), train, checkpoint=augmented, augment=_jitter, **kwargs)
    assert len(again.records) == 3
    state = torch.load(augmented, weights_only=True)
    del state["augment"]
    torch.save(state, augmented)  # a long ResNet run killed before the check
    again = fit(mlp(), train, checkpoint=augmented, augment=_jitter, **kwargs)
    assert len(again.records) == 3


def test_fit_refuses_non_finite_inputs_and_a_train_that_is_not_a_pair():
    # a NaN in the training (or test) inputs ran to the end and returned a
    # history of NaN losses; a bare tensor or a DataLoader for train= raised
    # 'too many values to unpack (expected 2)'
    (x, y), (xt, yt) = problem()
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="train inputs contain 1 NaN"):
        fit(mlp(), (bad, y), epochs=1, progress=False, device="cpu")
    bad_test = xt.clone()
    bad_test[0, 0] = float("inf")
    with pytest.raises(ValueError, match="test inputs contain 1 NaN"):
        fit(mlp(), (x, y), (bad_test, yt), epochs=1, progress=False, device="cpu")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y))
    for train in (x, loader, (x, y, y)):
        with pytest.raises(TypeError, match=r"train must be a pair \(x, y\)"):
            fit(mlp(), train, epochs=1, progress=False, device="cpu")
    # the message names the fix for each ("got tuple of length 2" did not say
    # that numpy arrays were the fault; a tensor alone was told to "stack it")
    with pytest.raises(TypeError, match=r"\(ndarray, ndarray\); convert.*as_tensor"):
        fit(mlp(), (x.numpy(), y.numpy()), epochs=1, progress=False, device="cpu")
    with pytest.raises(TypeError, match=r"got Tensor; give the targets too"):
        fit(mlp(), x, epochs=1, progress=False, device="cpu")


def test_float_class_labels_with_the_default_loss_name_the_fix():
    # cross-entropy's own RuntimeError: "expected target dtype to be Long or
    # Byte, but got Float", after the setup, naming neither y.long() nor loss_fn
    (x, y), (xt, yt) = problem()
    kwargs = dict(epochs=1, progress=False, device="cpu")
    with pytest.raises(TypeError, match=r"train targets.*y\.long\(\).*loss_fn="):
        fit(mlp(), (x, y.float()), **kwargs)
    with pytest.raises(TypeError, match=r"test targets are torch.float32"):
        fit(mlp(), (x, y), (xt, yt.float()), **kwargs)
    # a loss of one's own takes float targets as they are
    import torch.nn.functional as F

    fit(mlp(), (x, y.float()), loss_fn=lambda o, t: F.mse_loss(o[:, 0], t), **kwargs)


@pytest.mark.parametrize("name", ["epochs", "batch_size", "seed", "steps"])
def test_fit_names_an_integer_option_given_as_a_float(name):
    train, _ = problem()
    kwargs = {"steps": 2} if name == "steps" else {"epochs": 1}
    kwargs[name] = 3.0
    with pytest.raises(ValueError, match=rf"{name} must be an integer.*3\.0"):
        fit(mlp(), train, progress=False, device="cpu", **kwargs)


def test_fit_refuses_a_regularizer_that_is_not_a_term():
    train, _ = problem()

    def penalty(model, x):
        return sum(p.pow(2).sum() for p in model.parameters())

    with pytest.raises(TypeError, match=r"regularizer must be a geocomplexity"):
        fit(mlp(), train, epochs=1, regularizer=penalty, progress=False, device="cpu")


def test_parameters_outside_the_optimizer_do_not_pile_up_gradients():
    # an optimizer over the head alone: fit's backward pass reaches every
    # trainable parameter, and only the optimizer's were zeroed each step, so
    # the first layer's .grad summed every step's gradient (steps=4: 4 of them)
    train, _ = problem()

    def run(freeze: bool):
        model = mlp()
        first, head = model[0], model[3]
        if freeze:
            first.requires_grad_(False)
        seen = []
        if not freeze:
            first.weight.register_hook(lambda g: seen.append(g.clone()))
        opt = torch.optim.SGD(head.parameters(), lr=0.3)
        fit(model, train, optimizer=opt, steps=4, batch_size=50, device="cpu",
            progress=False)  # fmt: skip
        return model, seen

    model, seen = run(freeze=False)
    assert len(seen) == 4
    # what the last step computed, as the optimizer's own parameters hold
    torch.testing.assert_close(model[0].weight.grad, seen[-1], rtol=0, atol=0)
    # the optimizer's parameters train exactly as with the rest frozen
    frozen, _ = run(freeze=True)
    for a, b in zip(model.parameters(), frozen.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("with_penalty", [False, True])
def test_optimizer_tensors_outside_the_model_are_trained(with_penalty):
    # an optimizer over the model and a learnable temperature in loss_fn: the
    # backward pass was told the model's parameters alone (inputs=...), so
    # the temperature got no gradient and stayed at 1.0, silently
    train, _ = problem()
    x, y = train

    def run_fit():
        model = mlp()
        temp = nn.Parameter(torch.tensor(1.0))
        opt = torch.optim.SGD([*model.parameters(), temp], lr=0.3)
        fit(model, train, optimizer=opt, steps=3, batch_size=None, device="cpu",
            progress=False, loss_fn=lambda out, t: F.cross_entropy(out * temp, t),
            regularizer=GeometricComplexity(1e-3) if with_penalty else None,
            seed=5)  # fmt: skip
        return model, temp

    model, temp = run_fit()
    assert temp.grad is not None and temp.item() != 1.0
    if with_penalty:
        return
    # what the same steps give in a plain loop (full batch: no shuffle)
    plain = mlp()
    temp2 = nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([*plain.parameters(), temp2], lr=0.3)
    with torch.random.fork_rng():
        torch.manual_seed(5)  # fit's seed: the dropout masks
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(plain(x) * temp2, y).backward()
            opt.step()
    torch.testing.assert_close(temp, temp2)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_penalty", [False, True])
def test_a_resumed_run_carries_the_optimizers_tensors_outside_the_model(
    tmp_path, with_penalty
):
    # a learnable temperature in loss_fn, held by the user's optimizer: the
    # checkpoint held the model and the optimizer's state, not the
    # temperature's value, so a resumed run restarted it from whatever value
    # it had when fit was called again (a fresh 1.0) and trained on from there
    train, test = problem()
    ckpt = tmp_path / "run.pt"

    def run(checkpoint=None, callbacks=()):
        model = mlp()
        temp = nn.Parameter(torch.tensor(1.0))
        opt = torch.optim.Adam([*model.parameters(), temp], lr=0.05)
        h = fit(model, train, test, optimizer=opt, epochs=4, batch_size=50,
                device="cpu", progress=False, seed=5, checkpoint=checkpoint,
                loss_fn=lambda out, t: F.cross_entropy(out * temp, t),
                regularizer=GeometricComplexity(1e-3) if with_penalty else None,
                callbacks=callbacks)  # fmt: skip
        return h, model, temp

    whole, whole_model, whole_temp = run()

    def stop_at_epoch_2(history, model):
        if history.final["epoch"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run(ckpt, callbacks=[stop_at_epoch_2])
    resumed, resumed_model, resumed_temp = run(ckpt)
    assert whole_temp.item() != 1.0
    assert resumed_temp.item() == whole_temp.item()
    assert [r["train_loss"] for r in resumed.records] == whole["train_loss"]
    for a, b in zip(resumed_model.parameters(), whole_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a finished checkpoint hands the trained temperature back too
    _, _, again_temp = run(ckpt)
    assert again_temp.item() == whole_temp.item()
    # and the checkpoint still loads as data only
    torch.load(ckpt, weights_only=True)
    # a temperature of another shape is another run, refused before it is
    # broadcast into
    model, temp = mlp(), nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([*model.parameters(), temp], lr=0.05)
    term = GeometricComplexity(1e-3) if with_penalty else None
    with pytest.raises(ValueError, match="different run"):
        fit(model, train, test, optimizer=opt, epochs=4, batch_size=50,
            device="cpu", progress=False, seed=5, checkpoint=ckpt,
            loss_fn=lambda out, t: F.cross_entropy(out * temp, t),
            regularizer=term)  # fmt: skip


def test_history_json_is_strict_json_with_infinities_that_round_trip(tmp_path):
    # NaN was written as null, but an infinite value (a diverged run's loss, a
    # GC that overflowed) as the bare token Infinity, which is not JSON: strict
    # readers (JavaScript's JSON.parse, Python's with parse_constant refusing)
    # rejected the whole file
    import json

    h = History(
        records=[
            {"epoch": 0, "train_loss": math.inf, "gc_train": -math.inf},
            {"epoch": 1, "train_loss": 0.5, "gc_train": math.nan},
        ],
        config={"lr": 0.1},
    )
    text = h.to_json()

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    json.loads(text, parse_constant=refuse)  # strict: no NaN/Infinity tokens
    back = History.from_json(text)
    assert back.records[0] == {"epoch": 0, "train_loss": math.inf,
                               "gc_train": -math.inf}  # fmt: skip
    assert back.records[1]["train_loss"] == 0.5
    assert math.isnan(back.records[1]["gc_train"])
    # files written before (Python's Infinity token) still read
    old = json.dumps({"records": [{"a": math.inf}], "config": {},
                      "effective_label_noise": 0.0})  # fmt: skip
    assert History.from_json(old).records == [{"a": math.inf}]


@pytest.mark.parametrize("compose", [False, True])
def test_finite_difference_gradient_norm_refuses_tensors_outside_the_model(compose):
    # its gradient 2λHg comes from a pass at shifted model parameters: a
    # temperature in loss_fn got none of it (0.35 where double backprop gives
    # 3.4), training on the task loss alone, silently
    from geocomplexity.regularizers import L2, GradientNorm

    train, _ = problem()
    model = mlp()
    temp = nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([*model.parameters(), temp], lr=0.3)
    term = GradientNorm(0.1, method="finite_difference")
    if compose:
        term = 2 * (L2(1e-4) + term)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="double_backprop"):
        fit(model, train, optimizer=opt, steps=1, batch_size=None, device="cpu",
            progress=False, loss_fn=lambda out, t: F.cross_entropy(out * temp, t),
            regularizer=term)  # fmt: skip
    assert temp.item() == 1.0
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)
    # double backprop differentiates the penalty in the temperature too
    fit(model, train, optimizer=opt, steps=1, batch_size=None, device="cpu",
        progress=False, loss_fn=lambda out, t: F.cross_entropy(out * temp, t),
        regularizer=GradientNorm(0.1))  # fmt: skip
    assert temp.item() != 1.0


def test_fit_raises_section_names_the_type_each_bad_argument_raises():
    # fit's Raises listed ValueError alone, but a non-pair train (numpy arrays,
    # a Dataset), float class targets and a regularizer that is no term raise
    # TypeError: an `except ValueError` around a sweep's fit missed them
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    raises = fit.__doc__.split("Raises:")[1]
    typed = (
        " ".join(raises.split("TypeError:")[1].split())
        if "TypeError:" in raises
        else ""
    )
    cases = [
        ("numpy", {"train": (x.numpy(), y.numpy())}),
        ("Dataset", {"train": torch.utils.data.TensorDataset(x, y)}),
        ("float targets", {"train": (x, y.float())}),
        ("regularizer", {"train": (x, y), "regularizer": lambda *a, **k: 0}),
    ]
    for word, kwargs in cases:
        with pytest.raises(TypeError):
            fit(model, epochs=1, progress=False, device="cpu", **kwargs)
        assert word in typed, word


def test_a_diverged_run_tracking_gc_records_nan_gc_and_finishes(tmp_path):
    # lr 1e6 on inputs scaled by 1e3: the weights are NaN after the first
    # epoch. With track_gc_every, the record's exact GC raised ValueError ("the
    # Jacobian norm is NaN or infinite for 60 of 60 samples") out of fit: a
    # learning-rate sweep lost its diverged point and every record before it
    train, test = problem(60)
    train = (train[0] * 1e3, train[1])
    h = fit(mlp(), train, test, optimizer="sgd", lr=1e6, epochs=3,
            batch_size=16, track_gc_every=1, device="cpu", progress=False,
            checkpoint=tmp_path / "run.pt")  # fmt: skip
    assert [r["epoch"] for r in h.records] == [0, 1, 2, 3]
    assert math.isfinite(h.records[0]["gc_train"])
    assert math.isfinite(h.records[0]["gc_test"])
    for r in h.records[1:]:
        assert math.isnan(r["train_loss"])
        assert math.isnan(r["gc_train"]) and math.isnan(r["gc_test"])
    assert str(History.from_json(h.to_json()).records) == str(h.records)


def _killed_at_epoch_2(train, test, ckpt) -> dict:
    """Run fit, killed at epoch 2's record (epoch 1 checkpointed); its options."""

    def kill_at_2(history, _model):
        if history.final["epoch"] == 2:
            raise _Interrupt

    kw = dict(epochs=4, batch_size=16, device="cpu", progress=False, checkpoint=ckpt)
    with pytest.raises(_Interrupt):
        fit(mlp(), train, test, callbacks=[kill_at_2], **kw)
    return kw


def test_a_checkpoint_is_refused_by_a_run_on_other_data_of_the_same_size(tmp_path):
    # the checkpoint's fingerprint held the number of training samples alone,
    # and a resume puts the checkpoint's (noisy) labels back: the same call on
    # other data of that size resumed without a word and trained on its inputs
    # paired with the first data's labels (here the samples reversed: every
    # input trained with another sample's label)
    train, test = problem(60)
    kw = _killed_at_epoch_2(train, test, tmp_path / "run.pt")
    reversed_train = (train[0].flip(0), train[1].flip(0))
    with pytest.raises(ValueError, match="different run"):
        fit(mlp(), reversed_train, test, **kw)
    other_test = (test[0] + 1, test[1])  # its records would mix two test sets
    with pytest.raises(ValueError, match="different run"):
        fit(mlp(), train, other_test, **kw)
    # the same data resumes, the same labels under label noise included
    assert len(fit(mlp(), train, test, **kw).records) == 5


def test_a_checkpoint_is_refused_by_a_run_with_another_loss(tmp_path):
    # the loss was in no part of the checkpoint's fingerprint: a run with
    # label smoothing resumed the cross-entropy run's checkpoint without a
    # word, its history cross-entropy's up to the kill and its own after
    def smoothed(outputs, targets):
        return F.cross_entropy(outputs, targets, label_smoothing=0.5)

    train, test = problem(60)
    kw = _killed_at_epoch_2(train, test, tmp_path / "run.pt")
    with pytest.raises(ValueError, match="different run"):
        fit(mlp(), train, test, loss_fn=smoothed, **kw)
    # the default, named, is the same loss
    assert len(fit(mlp(), train, test, loss_fn=F.cross_entropy, **kw).records) == 5


class _StepLambda:
    """A callback stepping a LambdaLR once an epoch, its state checkpointed."""

    def __init__(self, opt: torch.optim.Optimizer, kill_at: int | None = None):
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
        self.kill_at = kill_at

    def __call__(self, history, _model) -> None:
        epoch = history.records[-1]["epoch"]
        if epoch > 0:
            self.sched.step()
        if epoch == self.kill_at:
            raise _Interrupt

    def state_dict(self) -> dict:
        return self.sched.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sched.load_state_dict(state)


def test_a_callbacks_scheduler_state_resumes_with_the_checkpoint(tmp_path):
    # LambdaLR counts its own epochs: a resumed run's new scheduler started
    # its schedule over (lr 0.0375 at the end where the uninterrupted run
    # reached 0.01875), silently. A callback's state_dict is now checkpointed
    train, _ = problem()
    ckpt = tmp_path / "run.pt"

    def run(kill_at: int | None):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        h = fit(model, train, optimizer=opt, epochs=4, batch_size=50,
                device="cpu", progress=False, checkpoint=ckpt,
                callbacks=[_StepLambda(opt, kill_at)])  # fmt: skip
        return h, model, opt

    (_, _, whole_opt), (_, _, opt) = _resumed_equals_whole(run, ckpt, _Interrupt)
    assert opt.param_groups[0]["lr"] == whole_opt.param_groups[0]["lr"] == 0.3 / 16


def test_a_checkpoint_without_a_callbacks_state_resumes_with_a_warning(tmp_path):
    # a checkpoint from before callbacks' states (or callbacks in another
    # order) has none for a callback that keeps one: said, not silent
    train, _ = problem()
    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Interrupt):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        fit(model, train, optimizer=opt, epochs=4, batch_size=50, device="cpu",
            progress=False, checkpoint=ckpt,
            callbacks=[lambda h, m: None, _StepLambda(opt, kill_at=2)])  # fmt: skip
    state = torch.load(ckpt, weights_only=True)
    assert state["callbacks"][0] is None
    del state["callbacks"]
    torch.save(state, ckpt)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with pytest.warns(UserWarning, match="no state for callback 0"):
        fit(model, train, optimizer=opt, epochs=4, batch_size=50, device="cpu",
            progress=False, checkpoint=ckpt, callbacks=[_StepLambda(opt)])  # fmt: skip


class _Unloadable:
    """A value ``torch.load(weights_only=True)`` refuses (no allowed global)."""


def test_a_callback_state_that_cannot_be_resumed_is_refused_when_saved(tmp_path):
    # a callback's state_dict holding an object torch.load(weights_only=True)
    # refuses was saved without a word: the run trained on, and its resume
    # failed as 'cannot resume ... Weights only load failed ... Delete the
    # file', naming no callback, the checkpoint never usable
    class Keeps:
        def __call__(self, history, model) -> None:
            pass

        def state_dict(self) -> dict:
            return {"thing": _Unloadable()}

        def load_state_dict(self, state: dict) -> None:
            pass

    train, _ = problem()
    ckpt = tmp_path / "run.pt"
    with pytest.raises(TypeError, match=r"callback 1 \(Keeps\).*weights_only"):
        fit(mlp(), train, epochs=2, batch_size=50, device="cpu", progress=False,
            checkpoint=ckpt, callbacks=[lambda h, m: None, Keeps()])  # fmt: skip
    assert not ckpt.exists()
