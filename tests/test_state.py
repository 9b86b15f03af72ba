"""The global switches the measuring blocks set: nested and concurrent blocks."""

from __future__ import annotations

import threading

import torch

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
