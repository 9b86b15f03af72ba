"""What the paper-scale width sweep costs: PreAct ResNet-18 on CIFAR-10-sized data.

Run: ``python benchmarks/paper_scale.py --device cuda [--widths 1,8,64] [--n 10000]
[--out PATH]``.

``resnet-double-descent --preset paper`` trains 18 widths for 1000 epochs each on
50 000 images, and measures exact GC on 1000 train and 1000 test images at the
end. This times, per width ``k``, one epoch of the same training step (Adam, batch
128, random crops and flips) on ``n`` random images of CIFAR-10's shape, one
evaluation pass over a 10 000-image test set, and the exact GC of 1000 images
(``geocomplexity.measure``, the run's own call), then projects one run of the
preset: ``1000 · epoch(50 000) + 20 · evaluation + 2 · GC``. The images are
random (the timing does not depend on them), so nothing is downloaded.
Not a test: a table and a JSON file, for the README's hours per run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from geocomplexity import measure
from geocomplexity.atomic import write_text
from geocomplexity.data import random_crop_flip
from geocomplexity.models import PreActResNet18

PAPER_TRAIN, PAPER_EPOCHS, PAPER_EVALS, TEST_N, GC_N = 50_000, 1000, 20, 10_000, 1000
BATCH = 128  # the preset's training batch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall time means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_width(k: int, n: int, device: torch.device, gen: torch.Generator) -> dict:
    """Seconds for one epoch on ``n`` images, one test pass and one exact GC."""
    torch.manual_seed(0)
    model = PreActResNet18(k, 10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(n, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    xt = torch.rand(TEST_N, 3, 32, 32, generator=gen).to(device)

    def train_step(idx: torch.Tensor) -> None:
        loss = F.cross_entropy(model(random_crop_flip(x[idx], gen)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def epoch() -> None:
        model.train()
        for idx in torch.randperm(n, device=device).split(BATCH):
            train_step(idx)

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            for chunk in xt.split(1000):
                model(chunk)

    # Warm-ups, untimed, at every input shape the timed calls run: cuDNN's
    # algorithm search (cudnn.benchmark) runs at the first call of each shape,
    # once a process, so a run pays it once and not in each of its epochs; a
    # timed call that met a shape first carried it (the epoch's last, partial
    # batch; the test pass's chunks of 1000; GC's batches). And the allocator.
    model.train()
    warm = torch.randperm(n, device=device)
    for idx in (*warm[: 3 * BATCH].split(BATCH), warm[: n % BATCH]):
        if len(idx):
            train_step(idx)
    sync(device)
    t0 = time.perf_counter()
    epoch()
    sync(device)
    t_epoch = time.perf_counter() - t0

    evaluate()
    sync(device)
    t0 = time.perf_counter()
    evaluate()
    sync(device)
    t_eval = time.perf_counter() - t0

    # measure's batches of GC_N: full ones and the remainder, one of each
    gc_batch = inspect.signature(measure).parameters["batch_size"].default
    warm_gc = xt[: gc_batch + GC_N % gc_batch]
    measure(model, warm_gc, method="exact", progress=False)
    sync(device)
    t0 = time.perf_counter()
    res = measure(model, xt[:GC_N], method="exact", progress=False)
    sync(device)
    t_gc = time.perf_counter() - t0

    per_image = t_epoch / n
    run_s = PAPER_EPOCHS * per_image * PAPER_TRAIN + PAPER_EVALS * t_eval + 2 * t_gc
    return {
        "width": k,
        "params": sum(p.numel() for p in model.parameters()),
        "train_images": n,
        "epoch_s": t_epoch,
        "epoch_50k_s": per_image * PAPER_TRAIN,
        "eval_10k_s": t_eval,
        "gc_exact_1000_s": t_gc,
        "gc_value": res.value,
        "paper_run_h": run_s / 3600,
    }


def main(argv: list[str] | None = None) -> int:
    """Time each width, print the table, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--widths", default="1,8,64", help="comma-separated k")
    p.add_argument("--n", type=int, default=10_000, help="training images timed")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    meta = {
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "cudnn_benchmark": device.type == "cuda",
        "projection": f"{PAPER_EPOCHS} epochs of {PAPER_TRAIN} images + "
        f"{PAPER_EVALS} evaluations of {TEST_N} + 2 exact GC of {GC_N}",
    }
    rows: list[dict[str, Any]] = []
    for k in (int(w) for w in args.widths.split(",")):
        print(f"timing width {k} ...", file=sys.stderr, flush=True)
        rows.append(time_width(k, args.n, device, gen))
        r = rows[-1]
        print(
            f"k={k:>3} params={r['params']:>10,} "
            f"epoch(50k)={r['epoch_50k_s']:7.1f} s eval(10k)={r['eval_10k_s']:6.2f} s "
            f"GC exact(1000)={r['gc_exact_1000_s']:6.2f} s "
            f"-> one paper-preset run {r['paper_run_h']:6.2f} h",
            flush=True,
        )
        if args.out is not None:
            # after every width, atomically: a run cut off by its time limit
            # (gpu_check.sh gives it 60 s) keeps the widths it timed
            write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
