"""``make demo``: measure the geometric complexity of an MLP on MNIST-1D.

Trains a small MLP for a few seconds and shows how its GC moves, with error bars,
measured exactly and by the cheap estimators, on the training and test sets.
Run with ``python -m geocomplexity.demo``.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

import geocomplexity as gcx
from geocomplexity.data import load_mnist1d


def main() -> int:
    """Run the demonstration and print a small report.

    Returns:
        The exit status: 0, or 2 where MNIST-1D cannot be generated (the
        ``data`` extra missing), said in one line instead of two tracebacks.
    """
    try:
        data = load_mnist1d()
    except ImportError as err:
        # the cause names the module that is missing (mnist1d, or one of its
        # own dependencies where mnist1d itself is installed)
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        print(f"geocomplexity.demo: error: {err}{cause}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(40, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    print("MNIST-1D: 4000 train / 1000 test signals of length 40, 10 classes")
    print("MLP 40-256-256-10 (ReLU), Adam 1e-3, batch 128\n")
    print(
        f"{'epoch':>5}  {'train acc':>9}  {'test acc':>8}  {'GC train (exact)':>24}"
        f"  {'GC test (exact)':>24}"
    )
    for epoch in range(0, 31):
        if epoch % 10 == 0:
            with torch.no_grad():
                acc_tr = (model(data.x_train).argmax(1) == data.y_train).float().mean()
                acc_te = (model(data.x_test).argmax(1) == data.y_test).float().mean()
            tr = gcx.measure(model, data.x_train, method="exact", progress=False)
            te = gcx.measure(model, data.x_test, method="exact", progress=False)
            print(
                f"{epoch:>5}  {acc_tr:>9.3f}  {acc_te:>8.3f}  "
                f"{tr.value:>14.4f} ± {tr.stderr:<7.2g}  {te.value:>14.4f} ± "
                f"{te.stderr:<7.2g}"
            )
        if epoch == 30:
            break  # the model of the last row is the one the methods measure
        perm = torch.randperm(len(data.x_train))
        for idx in perm.split(128):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(
                model(data.x_train[idx]), data.y_train[idx]
            )
            loss.backward()
            opt.step()

    print("\nThe trained model's training-set GC by each method:")
    for method in ("exact", "projection", "jvp", "finite_difference"):
        t0 = time.perf_counter()
        r = gcx.measure(model, data.x_train, method=method, generator=g, progress=False)
        dt = time.perf_counter() - t0
        print(f"  {method:<18} {r}   [{dt * 1e3:.0f} ms]")
    print(
        "\nEach ± is the standard error of the mean over samples (probe noise "
        "included for the estimators)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
