"""The global switches the measuring blocks set: nested and concurrent blocks."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from conftest import in_two_threads
from torch import nn

import geocomplexity as gcx
from geocomplexity.state import (
    differentiable_attention,
    eager,
    no_attention_fast_path,
)

_CUDA = torch.backends.cuda


def _switches() -> tuple[bool, ...]:
    return (
        torch.backends.mha.get_fastpath_enabled(),
        _CUDA.flash_sdp_enabled(),
        _CUDA.mem_efficient_sdp_enabled(),
        _CUDA.math_sdp_enabled(),
    )


def _interleaved(block, check_inside) -> list[tuple[bool, ...]]:
    # thread A enters, then B; A leaves while B is still inside; then B
    # leaves: what B sees after A left, and what is left after both
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[bool, ...]] = []
    errors: list[BaseException] = []

    def a() -> None:
        try:
            with block():
                a_in.set()
                assert b_in.wait(10)
        except BaseException as err:  # handed to the test
            errors.append(err)
        finally:
            a_out.set()

    def b() -> None:
        try:
            assert a_in.wait(10)
            with block():
                b_in.set()
                assert a_out.wait(10)
                seen.append(check_inside())
        except BaseException as err:  # handed to the test
            errors.append(err)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    return seen


def test_attention_switches_survive_two_threads_measuring_at_once():
    # two models measured in threads: the switches are process-global, so
    # the first thread out must not switch the fast path and the fused
    # kernels back on under the second, and the last one out must leave the
    # user's settings, not the ones a block set
    before = _switches()
    assert before[0]  # the fast path is on by default
    inside = _interleaved(no_attention_fast_path, _switches)
    assert inside[0][0] is False  # B still runs without the fast path
    assert _switches() == before
    inside = _interleaved(differentiable_attention, _switches)
    assert inside[0] == (False, False, False, True)
    assert _switches() == before
    # torch.compile's stance, as the penalties set it for a compiled model
    stance = torch._dynamo.eval_frame._stance.stance
    inside = _interleaved(eager, lambda: torch._dynamo.eval_frame._stance.stance)
    assert inside == ["force_eager"]
    assert torch._dynamo.eval_frame._stance.stance == stance == "default"


def test_attention_switches_nested_and_user_settings_kept():
    before = _switches()
    with differentiable_attention():
        with no_attention_fast_path(), differentiable_attention():
            assert _switches() == (False, False, False, True)
        assert _switches() == (False, False, False, True)
    assert _switches() == before
    # a user who switched the fast path off gets it back off
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with no_attention_fast_path():
            assert not torch.backends.mha.get_fastpath_enabled()
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


class _Gate(torch.nn.Module):
    """Holds the first forward pass each named thread runs, until told."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: dict[str, tuple[threading.Event, threading.Event]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.hold.pop(threading.current_thread().name, None)
        if gate is not None:
            entered, go_on = gate
            entered.set()
            go_on.wait(3)
        return x


def test_one_model_measured_from_two_threads_comes_back_as_found():
    # a web service or a thread pool measures the one model, in eval mode, in
    # two threads at once: A takes the train-mode model to eval mode, B finds
    # it in eval mode; A puts train mode back while B is still measuring (B's
    # pass ran BatchNorm on batch statistics, and wrote its running ones),
    # then B put back the eval mode it had found: the model left in eval mode
    from geocomplexity import jacobian_sq_norms

    torch.manual_seed(0)
    gate = _Gate()
    model = torch.nn.Sequential(
        gate, torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    ).double()  # fmt: skip
    with torch.no_grad():
        model(torch.randn(64, 6, dtype=torch.float64))  # running statistics
    model.train()
    x = torch.randn(16, 6, dtype=torch.float64)
    alone = jacobian_sq_norms(model, x)
    stats = model[2].running_mean.clone()
    a_in, a_go, b_in, b_go = (threading.Event() for _ in range(4))
    gate.hold = {"A": (a_in, a_go), "B": (b_in, b_go)}
    got: dict[str, torch.Tensor | BaseException] = {}

    def run() -> None:
        try:
            got[threading.current_thread().name] = jacobian_sq_norms(model, x)
        except BaseException as err:  # handed to the test
            got[threading.current_thread().name] = err

    a = threading.Thread(target=run, name="A")
    b = threading.Thread(target=run, name="B")
    a.start()
    assert a_in.wait(10)  # A is inside its forward pass
    b.start()
    b_in.wait(3)  # B inside too, unless it waits for A
    a_go.set()
    a.join(20)
    b_go.set()
    b.join(20)
    assert all(isinstance(v, torch.Tensor) for v in got.values()), got
    torch.testing.assert_close(got["A"], alone, rtol=1e-12, atol=0)
    torch.testing.assert_close(got["B"], alone, rtol=1e-12, atol=0)
    assert all(m.training for m in model.modules())
    assert torch.equal(model[2].running_mean, stats)


def test_two_models_measured_in_threads_do_not_wait_for_each_other():
    # measuring model A from one thread does not hold up model B's thread
    from geocomplexity import jacobian_sq_norms

    gate = _Gate()
    first = torch.nn.Sequential(gate, torch.nn.Linear(4, 2)).double()
    second = torch.nn.Sequential(torch.nn.Linear(4, 2)).double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    alone = jacobian_sq_norms(second, x)
    a_in, a_go = threading.Event(), threading.Event()
    gate.hold = {"A": (a_in, a_go)}
    a = threading.Thread(target=jacobian_sq_norms, args=(first, x), name="A")
    a.start()
    try:
        assert a_in.wait(10)
        torch.testing.assert_close(jacobian_sq_norms(second, x), alone)
        assert a.is_alive()  # A is still inside, holding its model
    finally:
        a_go.set()
        a.join(20)
    assert second.training and first.training


class _PassGate(torch.nn.Module):
    """Calls ``at(pass index)`` in each forward pass of the thread named."""

    def __init__(self, thread: str, at) -> None:
        super().__init__()
        self.thread, self.at, self.passes = thread, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if threading.current_thread().name == self.thread:
            self.at(self.passes)
            self.passes += 1
        return x


def _gated_dropout_mlp(hold: Any) -> torch.nn.Sequential:
    """Thread A's model: a dropout MLP (seed 0, float64) whose first module
    calls ``hold(pass_index)`` on each of A's forward passes."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        _PassGate("A", hold), torch.nn.Linear(6, 32), torch.nn.Tanh(),
        torch.nn.Dropout(0.5), torch.nn.Linear(32, 3),
    ).double()  # fmt: skip


def test_train_mode_measurements_of_two_models_in_threads_keep_their_masks():
    # the passes of a train-mode finite difference replay the global RNG so
    # that each draws the first pass's dropout mask; another thread measuring
    # another model in train mode drew from that one global RNG between them,
    # so A's probe pass ran another mask than its base pass: GC read ~1e15
    from geocomplexity import jacobian_sq_norms

    a_in, b_drew, a_done = threading.Event(), threading.Event(), threading.Event()

    def hold_a(i: int) -> None:
        if i == 1:  # A's first probe pass, before its dropout
            a_in.set()
            b_drew.wait(3)

    def hold_b(i: int) -> None:
        if i == 0:  # B's first pass, after its dropout drew
            b_drew.set()
            a_done.wait(3)

    model_a = _gated_dropout_mlp(hold_a)
    model_b = torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.Dropout(0.5), _PassGate("B", hold_b),
        torch.nn.Linear(32, 3),
    ).double()  # fmt: skip
    x = torch.randn(8, 6, dtype=torch.float64)

    def measure(model: torch.nn.Module) -> torch.Tensor:
        return jacobian_sq_norms(
            model, x, method="finite_difference", mode="train",
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip

    torch.manual_seed(1)
    alone = {"A": measure(model_a), "B": measure(model_b)}
    model_a[0].passes = model_b[2].passes = 0
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    got = in_two_threads(measure, model_a, model_b, a_in, {"A": a_done})
    torch.testing.assert_close(got["A"], alone["A"], rtol=1e-9, atol=0)
    torch.testing.assert_close(got["B"], alone["B"], rtol=1e-9, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("b_mode", ["train", "eval"])
def test_a_measurement_drawing_from_the_global_generator_waits_its_turn(b_mode):
    # a train-mode call given generator=torch.default_generator takes one draw
    # from the global RNG to seed its probes: taken before the call's turn on
    # the RNG, it moved the RNG between another thread's replayed passes, so
    # that thread's probe pass ran another dropout mask than its base pass;
    # an eval-mode call draws its probes from it, and took no turn at all
    import time

    from geocomplexity import jacobian_sq_norms

    a_in = threading.Event()

    def hold_a(i: int) -> None:
        if i == 1:  # A's first probe pass, before its dropout
            a_in.set()
            start = torch.get_rng_state()
            deadline = time.monotonic() + 2.0  # B's draw, if it comes, moves it
            while time.monotonic() < deadline:
                if not torch.equal(torch.get_rng_state(), start):
                    break
                time.sleep(0.01)

    model_a = _gated_dropout_mlp(hold_a)
    model_b = torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 3)
    ).double()
    x = torch.randn(8, 6, dtype=torch.float64)

    def measure(model: torch.nn.Module) -> torch.Tensor:
        g = torch.default_generator if model is model_b else torch.Generator()
        if model is model_a:
            g.manual_seed(1)
        if model is model_b and b_mode == "eval":
            return jacobian_sq_norms(model, x, method="projection", generator=g)
        return jacobian_sq_norms(
            model, x, method="finite_difference", mode="train", generator=g
        )

    torch.manual_seed(1)
    alone = {"A": measure(model_a), "B": measure(model_b)}
    model_a[0].passes = 0
    torch.manual_seed(1)
    got = in_two_threads(measure, model_a, model_b, a_in, {})
    torch.testing.assert_close(got["A"], alone["A"], rtol=1e-9, atol=0)
    torch.testing.assert_close(got["B"], alone["B"], rtol=1e-9, atol=0)


def test_measuring_an_iterable_in_another_thread_leaves_a_train_mode_replay_alone():
    # measure() iterates the caller's data on RNG states of its own (each
    # step sets the global RNG to the iteration's state, runs it, puts the
    # caller's back): in eval mode that step took no turn on the global RNG,
    # so a train-mode finite difference in another thread ran its probe pass
    # on the iteration's draws: another dropout mask than its base pass
    from geocomplexity import jacobian_sq_norms, measure

    a_in, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

    def hold_a(i: int) -> None:
        if i == 1:  # A's first probe pass, before its dropout
            a_in.set()
            b_inside.wait(3)

    model_a = _gated_dropout_mlp(hold_a)
    model_b = torch.nn.Sequential(torch.nn.Linear(6, 3)).double()

    class RandomBatches:  # a generator of random batches, held in B's first
        def __iter__(self):
            for i in range(2):
                x = torch.randn(4, 6, dtype=torch.float64)
                if i == 0 and threading.current_thread().name == "B":
                    b_inside.set()
                    a_done.wait(3)
                yield x

    x = torch.randn(8, 6, dtype=torch.float64)

    def run(model: torch.nn.Module) -> torch.Tensor:
        if model is model_a:
            return jacobian_sq_norms(
                model, x, method="finite_difference", mode="train",
                generator=torch.Generator().manual_seed(1),
            )  # fmt: skip
        result = measure(model, RandomBatches(), method="exact", progress=False)
        return torch.tensor(result.value)

    torch.manual_seed(1)
    alone = {"A": run(model_a), "B": run(model_b)}
    model_a[0].passes = 0
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    got = in_two_threads(run, model_a, model_b, a_in, {"A": a_done})
    torch.testing.assert_close(got["A"], alone["A"], rtol=1e-9, atol=0)
    torch.testing.assert_close(got["B"], alone["B"], rtol=1e-9, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)


class _ModeInConfig(torch.nn.Module):
    """A layer whose ``training`` is a property over a flag of its own."""

    def __init__(self) -> None:
        self.__dict__["_train_flag"] = True
        super().__init__()

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self.__dict__["_train_flag"]

    @training.setter
    def training(self, flag: bool) -> None:
        self.__dict__["_train_flag"] = bool(flag)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, 0.5, self.training)


def test_eval_mode_switches_a_module_whose_training_flag_is_a_property():
    from geocomplexity import geometric_complexity
    from geocomplexity.state import preserved

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _ModeInConfig())
    with preserved(model, mode="eval"):
        assert [m.training for m in model.modules()] == [False, False, False]
    assert [m.training for m in model.modules()] == [True, True, True]
    assert "training" not in model[1].__dict__  # the property's, untouched
    # measured in eval mode: no dropout, the same value twice
    x = torch.randn(3, 4)
    a = geometric_complexity(model, x, method="exact")
    b = geometric_complexity(model, x, method="exact")
    assert torch.equal(a, b)
    assert model[1].training


class _LastInput(torch.nn.Module):
    """Keeps its last input in a buffer registered empty (``None``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("last", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x.detach().mean(0)
        return self.lin(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_buffer_registered_as_none_comes_back_empty(mode):
    from geocomplexity import geometric_complexity
    from geocomplexity.state import preserved

    model = _LastInput()
    with preserved(model, mode=mode):
        model(torch.randn(3, 4))
    assert model.last is None
    assert "last" in model._buffers
    for method in ("exact", "jvp", "finite_difference"):
        geometric_complexity(model, torch.randn(3, 4), mode=mode, method=method)
        assert model.last is None, method


@pytest.mark.parametrize("method", ["finite_difference", "auto"])
def test_a_measurement_in_a_parametrize_cached_block_leaves_the_cache(method):
    # a measurement computing a parametrized weight under no_grad must not
    # leave it in the caller's cache: the caller's next pass would use a
    # weight without a graph, and its parameters get no gradient
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    from geocomplexity import measure

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        weight_norm(torch.nn.Linear(4, 4)), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    expected = model[0].parametrizations.weight.original0.grad.clone()
    model.zero_grad(set_to_none=True)
    with parametrize.cached():
        measure(model, [x], method=method)
        model(x).pow(2).sum().backward()
    got = model[0].parametrizations.weight.original0.grad
    assert got is not None
    torch.testing.assert_close(got, expected)


class _History(torch.nn.Module):
    """Appends each batch's mean to a buffer, resizing it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("history", torch.zeros(0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grown = torch.cat([self.history, x.detach().mean(0, keepdim=True)])
        self.history.data = grown
        return self.lin(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_buffer_resized_in_place_comes_back_with_its_shape(mode):
    from geocomplexity import geometric_complexity
    from geocomplexity.state import preserved

    model = _History()
    model(torch.randn(2, 4))
    buffer, found = model.history, model.history.clone()
    with preserved(model, mode=mode):
        model(torch.randn(2, 4))
    geometric_complexity(model, torch.randn(3, 4), mode=mode, method="jvp")
    assert model.history is buffer
    assert model.history.shape == found.shape
    assert torch.equal(model.history, found)


@pytest.mark.parametrize("method", ["finite_difference", "auto"])
def test_a_model_with_uninitialised_lazy_modules_is_refused_untouched(method):
    # measuring would initialise the lazy layer: another model (LazyLinear
    # becomes Linear) with weights drawn from the caller's global RNG
    from geocomplexity import measure

    model = torch.nn.Sequential(
        torch.nn.LazyLinear(3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
    )
    x = torch.randn(4, 5)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"lazy.*'0'.*forward pass"):
        measure(model, x, method=method)
    assert type(model[0]) is torch.nn.LazyLinear
    assert model[0].has_uninitialized_params()
    assert torch.equal(torch.get_rng_state(), rng)
    model(x)  # initialised by the caller: measured
    measure(model, x, method=method)


class _FrozenBatchNorm(nn.Module):
    """Fine-tuning code's model: its train() keeps BatchNorm frozen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)
        ).double()
        bn = self.net[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> _FrozenBatchNorm:
        super().train(mode)
        self.net[1].eval()
        self.net[1].weight.requires_grad_(False)
        return self


def test_train_mode_is_what_the_models_own_train_sets():
    # flipping every flag unfroze the BatchNorm: the train-mode measurement
    # normalised by the batch, where the model trains with running statistics
    model = _FrozenBatchNorm().eval()
    model.net[1].weight.requires_grad_(True)  # eval() froze it; train() will
    x = torch.randn(16, 4, dtype=torch.float64)
    want = gcx.jacobian_sq_norms(model, x)  # eval: running statistics
    got = gcx.jacobian_sq_norms(model, x, mode="train", coupled=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert gcx.measure(model, x, mode="train", method="exact").value == pytest.approx(
        want.mean().item(), rel=1e-12
    )
    # the flags and requires_grad the override changed come back
    assert not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
