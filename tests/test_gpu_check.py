"""benchmarks/gpu_check.sh, the parts that run without a GPU.

Its ``run`` needs a CUDA machine; ``prepare`` runs here, and what it leaves in
``.gpu/`` is all that machine gets beyond the repository: a ``prepare`` that
reports success without it wastes the GPU session's minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None, reason="gpu_check.sh is a bash script"
)


def checkout(tmp_path: Path, python: str | None) -> Path:
    """A folder laid out as the repository: the script, and ``.venv`` if given."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks" / "gpu_check.sh")
    if python is not None:
        bin_dir = tmp_path / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        wrapper = bin_dir / "python"
        wrapper.write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
        wrapper.chmod(0o755)
    return tmp_path


def _pythonpath() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": path} if path else {}


def prepare(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh"), "prepare"],
        capture_output=True,
        text=True,
        # PYTHONPATH passes through: where mnist1d is on it rather than installed
        # (the GPU machine), the python under test finds it there
        env={"PATH": "/usr/bin:/bin", **_pythonpath(), **env},
        timeout=60,
    )


def test_prepare_copies_mnist1d_into_dot_gpu(tmp_path):
    pytest.importorskip("mnist1d")
    root = checkout(tmp_path, sys.executable)
    res = prepare(root)
    assert res.returncode == 0, res.stderr
    assert (root / ".gpu" / "site" / "mnist1d" / "data.py").is_file()
    assert "prepared" in res.stdout


@pytest.mark.parametrize("python", [None, "/bin/false"])
def test_prepare_fails_loudly_without_mnist1d(tmp_path, python):
    # without the virtual environment (a worktree without .venv), or with a
    # python that cannot import mnist1d, prepare printed "prepared
    # .gpu/site/mnist1d" and exited 0 with nothing copied: the GPU run's
    # bench_measure then failed at its MNIST-1D stage, after timing every
    # model, and wrote no result
    root = checkout(tmp_path, python)
    res = prepare(root)
    assert res.returncode != 0
    assert "prepared" not in res.stdout
    assert "mnist1d" in res.stderr
    assert not (root / ".gpu" / "site" / "mnist1d").exists()
