"""Shared model cases: small, float64, seeded."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, 16)
        self.block = nn.Sequential(
            nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(h + self.block(h))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {"logits": self.head(h), "features": h}


class MultiDimOut(nn.Module):
    """(B, 3, 4) input -> (B, 2, 3) output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.flatten(1))).reshape(-1, 2, 3) ** 2


def make_case(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A float64 model and a batch of inputs for it."""
    torch.manual_seed(0)
    if name == "mlp":
        m = nn.Sequential(
            nn.Linear(7, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4)
        )
        x = torch.randn(9, 7)
    elif name == "cnn":
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 2 * 2, 3),
        )
        x = torch.randn(5, 2, 8, 8)
    elif name == "residual":
        m, x = Residual(6), torch.randn(8, 6)
    elif name == "layernorm_gelu":
        m = nn.Sequential(
            nn.Linear(5, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3)
        )
        x = torch.randn(7, 5)
    elif name == "batchnorm":
        m = nn.Sequential(
            nn.Linear(5, 12),
            nn.BatchNorm1d(12),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(12, 3),
        )
        m.train()
        for _ in range(3):  # non-trivial running statistics
            m(torch.randn(16, 5) * 2 + 1)
        x = torch.randn(6, 5)
    elif name == "multidim":
        m, x = MultiDimOut(), torch.randn(5, 3, 4)
    elif name == "wide_output":  # d < k: the forward-mode exact path
        m = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 30))
        x = torch.randn(6, 2)
    else:
        raise KeyError(name)
    return m.double(), x.double()


def batchnorm_mlp(d_in: int, *, track: bool = True) -> nn.Module:
    """Linear-BatchNorm-Tanh-Linear to 3 outputs, float64, in eval mode."""
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Linear(d_in, 8),
            nn.BatchNorm1d(8, track_running_stats=track),
            nn.Tanh(),
            nn.Linear(8, 3),
        )
        .double()
        .eval()
    )


CASES = [
    "mlp",
    "cnn",
    "residual",
    "layernorm_gelu",
    "batchnorm",
    "multidim",
    "wide_output",
]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, torch.Tensor]:
    return make_case(request.param)


def dropout_case() -> tuple[nn.Module, torch.Tensor, float]:
    """Linear-Dropout(0.5)-Linear in float64, 8 inputs, and its train-mode GC.

    ``J = W2·diag(m/q)·W1``; ``E[m_j m_l/q²]`` is ``1/q`` on the diagonal and 1
    off it, so the expected GC over dropout masks has a closed form.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    model = model.double()
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    a = (w2.T @ w2) * (w1 @ w1.T)
    want = (a.sum() + a.diagonal().sum() * (1 / 0.5 - 1)).item()
    return model, torch.randn(8, 3, dtype=torch.float64), want


def write_fake_cifar(root, n=20, seed=0, protocol=2):
    """A tiny folder in the CIFAR-10 python format (protocol 2 pickles, as
    the published files are, unless ``protocol`` says otherwise)."""
    import pickle

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"filenames": [f"{i}.png".encode() for i in range(n)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return root


@pytest.fixture
def fake_cifar(tmp_path):
    """A generated CIFAR-10 folder: 20 images per batch."""
    return write_fake_cifar(tmp_path / "cifar-10-batches-py")


def jvp_and_finite_difference(
    model: nn.Module, x: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``jacobian_sq_norms`` by jvp and by finite differences, 3 probes each,
    the same probes for both (one seed): equal to O(eps) where both are right."""
    import geocomplexity as gcx

    return tuple(  # type: ignore[return-value]
        gcx.jacobian_sq_norms(
            model,
            x,
            method=method,
            num_probes=3,
            generator=torch.Generator().manual_seed(1),
            **kwargs,
        )
        for method in ("jvp", "finite_difference")
    )


def assert_central_differences(
    f: Callable[[], torch.Tensor],
    param: torch.Tensor,
    indices: Iterable[int],
    h: float = 1e-6,
    rtol: float = 1e-5,
) -> None:
    """autograd's ∂f/∂param against central differences at flat ``indices``.

    ``f`` is evaluated afresh each time (fixed probes, restored buffers); each
    entry of ``param`` is moved by ±h in place and put back.
    """
    (grad,) = torch.autograd.grad(f(), param)
    flat = param.detach().view(-1)
    for i in indices:
        with torch.no_grad():
            flat[i] += h
        up = f().item()
        with torch.no_grad():
            flat[i] -= 2 * h
        down = f().item()
        with torch.no_grad():
            flat[i] += h
        fd = (up - down) / (2 * h)
        assert abs(grad.reshape(-1)[i].item() - fd) < rtol * (1 + abs(fd)), (i, fd)


def in_two_threads(
    measure: Callable[[nn.Module], torch.Tensor],
    model_a: nn.Module,
    model_b: nn.Module,
    a_in: threading.Event,
    finished: dict[str, threading.Event],
) -> dict[str, torch.Tensor]:
    """``measure`` of ``model_a`` in thread "A" and, once A has set ``a_in``,
    of ``model_b`` in thread "B"; each thread sets its event in ``finished``
    (if any) when done. Returns both results, checked to be tensors."""
    got: dict[str, Any] = {}

    def run(model: nn.Module) -> None:
        name = threading.current_thread().name
        try:
            got[name] = measure(model)
        except BaseException as err:  # handed to the test
            got[name] = err
        finally:
            if name in finished:
                finished[name].set()

    a = threading.Thread(target=run, args=(model_a,), name="A")
    b = threading.Thread(target=run, args=(model_b,), name="B")
    a.start()
    assert a_in.wait(10)
    b.start()
    a.join(20)
    b.join(20)
    assert sorted(got) == ["A", "B"], got
    assert all(isinstance(v, torch.Tensor) for v in got.values()), got
    return got
