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


def test_run_runs_the_suite_beside_a_module_whose_optional_dependency_is_missing(
    tmp_path,
):
    # the whole-suite step collects src/ as doctests, which imports every module:
    # on a machine without Lightning or torchmetrics (the GPU machine's python3
    # has neither) integrations/lightning.py and torchmetrics.py failed to
    # import, and pytest stopped at collection ("Interrupted: 3 errors during
    # collection"): not one test of the suite ran. A fake python3 stands in for
    # every other step (no CUDA here), and drops xdist's -n
    root = checkout(tmp_path, None)
    shutil.copy(SCRIPT.parent.parent / "pyproject.toml", root / "pyproject.toml")
    (root / "README.md").write_text("# a checkout\n")
    (root / "src").mkdir()
    (root / "src" / "needs_extra.py").write_text("import geocomplexity_absent_extra\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_fine.py").write_text("def test_fine():\n    pass\n")
    fake = tmp_path / "python3"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "args = sys.argv[1:]\n"
        "if '--ignore' not in args:  # not the whole-suite step\n"
        "    sys.exit(0)\n"
        "i = args.index('-n')\n"
        "del args[i : i + 2]\n"
        "os.execv(sys.executable, [sys.executable, *args])\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh"), "run", str(out)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PY": str(fake), **_pythonpath()},
        timeout=300,
    )
    log = (out / "suite.log").read_text()
    assert "test_fine PASSED" in log, (log[-3000:], res.stdout[-2000:])
    assert "geocomplexity_absent_extra" in log  # the reason, logged


def test_run_skips_the_resnet_smoke_step_without_matplotlib(tmp_path):
    # the experiment ends with its figures, so the CLI refuses at once without
    # matplotlib (not promised on the GPU machine): the summary read
    # "resnet_smoke: exit 2", a CUDA failure at a glance; it is a skip, with why
    root = checkout(tmp_path, None)
    fake = tmp_path / "python3"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "# no matplotlib here; every other step succeeds at once\n"
        "sys.exit(1 if 'import matplotlib' in ' '.join(sys.argv[1:]) else 0)\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh"), "run", str(out)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PY": str(fake)},
        timeout=120,
    )
    summary = (out / "summary.txt").read_text()
    assert "resnet_smoke: skipped, matplotlib does not import" in summary, summary
    assert "ddp: exit 0" in summary  # the steps after it still run
