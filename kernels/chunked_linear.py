"""The chunked backward of a linear layer Y = X W^T whose output gradient dY is formed
chunk by chunk and never whole (fused linear + cross-entropy, fused linear + SwiGLU).

    dX = dY W,  dW = dY^T X

dY [rows, out] for rows [c0, c1) comes from `output_grad(c0, c1)`: the op recomputes its
forward for those rows and turns it into the gradient in place, so memory stays O(chunk *
out) instead of O(N * out)."""
from __future__ import annotations

import torch


def chunked_linear_backward(x: torch.Tensor, weight: torch.Tensor, chunk: int, output_grad,
                            need_dx: bool, need_dw: bool):
    """x [N, in], weight [out, in] -> (dX [N, in] or None, dW [out, in] or None)."""
    n = x.shape[0]
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if need_dx else None
    dw = None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        xc = x[c0:c1]
        dy = output_grad(c0, c1)
        if need_dx:
            torch.mm(dy, weight, out=dx[c0:c1])
        if need_dw:
            # cuBLAS accumulates each chunk in fp32; the running sum rounds once per chunk
            dw = dy.t() @ xc if dw is None else dw.addmm_(dy.t(), xc)
    if need_dw and dw is None:  # no tokens
        dw = torch.zeros_like(weight)
    return dx, dw
