"""``make demo``'s first part: what it prints is about one model."""

from __future__ import annotations

import re

import pytest
import torch

from geocomplexity import demo
from geocomplexity.data import Split


def test_demo_compares_the_methods_on_the_model_of_its_last_row(monkeypatch, capsys):
    # a small stand-in for MNIST-1D keeps the 30 epochs to a few seconds
    g = torch.Generator().manual_seed(0)
    small = Split(
        torch.randn(64, 40, generator=g),
        torch.randint(0, 10, (64,), generator=g),
        torch.randn(32, 40, generator=g),
        torch.randint(0, 10, (32,), generator=g),
        10,
    )
    monkeypatch.setattr(demo, "load_mnist1d", lambda: small)
    with torch.random.fork_rng():  # the demo seeds the global RNG
        demo.main()
    out = capsys.readouterr().out
    rows = [r.split() for r in out.splitlines() if re.match(r"\s+\d+\s+[01]\.", r)]
    assert [r[0] for r in rows] == ["0", "10", "20", "30"]
    exact = re.search(r"^\s+exact\s+GC = (\S+)", out, re.M)
    # the last row's exact training-set GC is the trained model's, the one the
    # methods are compared on (4 decimals in the table, 6 digits in the result)
    assert float(exact.group(1)) == pytest.approx(
        float(rows[-1][3]), rel=1e-5, abs=1e-4
    )


def test_demo_without_mnist1d_says_what_to_install(monkeypatch, capsys):
    # `make demo` on a machine without the data extra printed two chained
    # tracebacks (the blocked import, then load_mnist1d's) before the fix
    def missing():
        try:
            raise ModuleNotFoundError("No module named 'scipy'")
        except ImportError as err:
            raise ImportError(
                "MNIST-1D needs the mnist1d package: pip install 'geocomplexity[data]'"
            ) from err

    monkeypatch.setattr(demo, "load_mnist1d", missing)
    assert demo.main() == 2
    captured = capsys.readouterr()
    assert "pip install 'geocomplexity[data]'" in captured.err
    assert "No module named 'scipy'" in captured.err  # what was missing
    assert "Traceback" not in captured.err and captured.out == ""
