"""Brute-force float64 references: one full Jacobian per sample, no tricks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def per_sample_sq_norms(
    model: nn.Module, x: Tensor, select: Callable[[object], Tensor] | None = None
) -> Tensor:
    """‖∂g(x_i)/∂x_i‖_F² by a full Jacobian of each sample alone (eval mode)."""
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        rows = []
        for xi in x:

            def f(z: Tensor, xi: Tensor = xi) -> Tensor:
                out = model(z.reshape(1, *xi.shape))
                return (select(out) if select else out).reshape(-1)

            J = torch.autograd.functional.jacobian(f, xi.reshape(-1))
            rows.append(J.pow(2).sum())
        return torch.stack(rows)
    finally:
        for m, flag in was:
            m.training = flag


def diagonal_block_sq_norms(model: nn.Module, x: Tensor) -> Tensor:
    """‖∂g(x)_i/∂x_i‖_F² with the batch coupled (train mode): the full batch
    Jacobian of shape (B, k, B, d), its diagonal blocks. Buffers are restored."""
    saved = {n: b.clone() for n, b in model.named_buffers()}
    B = x.shape[0]

    def f(z: Tensor) -> Tensor:
        return model(z.reshape(x.shape)).reshape(B, -1)

    J = torch.autograd.functional.jacobian(f, x.reshape(B, -1))  # (B, k, B, d)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(saved[n])
    return torch.stack([J[i, :, i].pow(2).sum() for i in range(B)])


def inner_sq_norms(
    model: nn.Module,
    x: Tensor,
    wrt: str,
    select: Callable[[object], Tensor] | None = None,
) -> Tensor:
    """‖∂g(x_i)/∂e_i‖_F² against submodule ``wrt``'s output e, each sample alone
    (eval mode): e is replaced by a free variable through a forward hook."""
    sub = model.get_submodule(wrt)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        rows = []
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            seen: list[Tensor] = []
            handle = sub.register_forward_hook(lambda _m, _a, r, s=seen: s.append(r))
            try:
                model(xi)
            finally:
                handle.remove()
            shape = seen[0].shape

            def f(z: Tensor, xi: Tensor = xi, shape: torch.Size = shape) -> Tensor:
                handle = sub.register_forward_hook(lambda _m, _a, _r: z.reshape(shape))
                try:
                    out = model(xi)
                finally:
                    handle.remove()
                return (select(out) if select else out).reshape(-1)

            J = torch.autograd.functional.jacobian(f, seen[0].detach().reshape(-1))
            rows.append(J.pow(2).sum())
        return torch.stack(rows)
    finally:
        for m, flag in was:
            m.training = flag
