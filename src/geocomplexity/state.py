"""Leave a model exactly as it was found: modes, buffers and the global RNG.

Measuring geometric complexity must not disturb what it measures. Running a
model in eval mode (the default) touches nothing but the ``training`` flags;
running it in train mode moves BatchNorm running statistics and draws dropout
masks from the global generator. :func:`preserved` undoes all of that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["preserved"]


@contextlib.contextmanager
def preserved(model: nn.Module, *, mode: str) -> Iterator[None]:
    """Run a block with ``model`` in ``mode`` and restore it afterwards.

    In train mode every buffer (BatchNorm ``running_mean``, ``running_var``,
    ``num_batches_tracked``) is snapshot and put back, and the global RNG state
    (CPU, and CUDA for the model's devices) is restored, so dropout leaves no
    trace. Eval mode touches only the ``training`` flags.

    Args:
        model: the module; every submodule's own ``training`` flag is restored,
            so a model that mixes train and eval submodules comes back mixed.
        mode: ``"eval"`` or ``"train"``; the mode the block runs in.

    Yields:
        Nothing; the block runs with the model in ``mode``.
    """
    flags = [(m, m.training) for m in model.modules()]
    train = mode == "train"
    if not train:
        # eval mode moves no buffer and, for standard modules, draws no random
        # number: skip the snapshots, which cost as much as a small forward pass
        try:
            for module, flag in flags:
                if flag:
                    module.training = False
            yield
        finally:
            for module, flag in flags:
                if module.training != flag:
                    module.training = flag
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    tensors = [*model.parameters(), *model.buffers()]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            for module, _ in flags:
                module.training = True
            yield
    finally:
        for module, flag in flags:
            module.training = flag
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
