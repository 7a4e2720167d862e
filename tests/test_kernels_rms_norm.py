"""Triton RMSNorm / add+RMSNorm against kernels.reference, forward and backward."""
import pytest
import torch

from kernels import ops
from kernels import reference as ref
from kernels import rms_norm as tri
from tolerance import closeness

# fp16 outputs are rounded once by the reference and once by the kernel: a few ulps apart
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


close = closeness(TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 7, 48), (37, 123), (1, 64)])
def test_rms_norm_matches_reference(dtype, shape):
    x = torch.randn(shape, dtype=dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype).requires_grad_()
    y = ops.rms_norm(x, w, 1e-5, mode="triton")
    y_ref = ref.rms_norm(x, w, 1e-5)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    close(y, y_ref, dtype)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, w), g),
                         torch.autograd.grad(y_ref, (x, w), g)):
        close(got, want, dtype)


def test_rms_norm_fp32_weight_on_fp16_input_promotes_like_torch():
    x = torch.randn(6, 40, dtype=torch.float16, requires_grad=True)
    w = torch.randn(40, requires_grad=True)  # fp32 master weight
    y, y_ref = tri.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32 == y_ref.dtype
    close(y, y_ref, torch.float32)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), g)
    assert dx.dtype == torch.float16 and dw.dtype == torch.float32
    close(dx, dx_ref, torch.float16)
    close(dw, dw_ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use", ["both", "sum", "norm"])
def test_add_rms_norm_gradients_reach_both_inputs(dtype, use):
    x = torch.randn(37, 2, 48, dtype=dtype, requires_grad=True)
    r = torch.randn(37, 2, 48, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(48)).to(dtype).requires_grad_()
    s, y = ops.add_rms_norm(x, r, w, 1e-5, mode="triton")
    s_ref, y_ref = ref.add_rms_norm(x, r, w, 1e-5)
    close(s, s_ref, dtype)
    close(y, y_ref, dtype)
    gs, gy = torch.randn_like(s), torch.randn_like(y)

    def objective(s_, y_):
        return {"both": (s_ * gs).sum() + (y_ * gy).sum(), "sum": (s_ * gs).sum(),
                "norm": (y_ * gy).sum()}[use]

    got = torch.autograd.grad(objective(s, y), (x, r, w), allow_unused=True)
    want = torch.autograd.grad(objective(s_ref, y_ref), (x, r, w), allow_unused=True)
    for a, b in zip(got, want):
        if b is None:  # "sum" only: the weight gets no gradient in either
            assert a is None or a.abs().max() == 0
        else:
            close(a, b, dtype)


def test_rms_norm_multiple_backward_programs_sum_dweight():
    # the interpreter runs one backward program: enough rows that its loop takes
    # several row blocks, each adding into the same fp32 partial dweight
    x = torch.randn(1100, 20, requires_grad=True)  # 3 row blocks of 512
    w = torch.randn(20, requires_grad=True)
    y = tri.rms_norm(x, w, 1e-5)
    g = torch.randn_like(y)
    dw = torch.autograd.grad(y, w, g)[0]
    dw_ref = torch.autograd.grad(ref.rms_norm(x, w, 1e-5), w, g)[0]
    close(dw, dw_ref, torch.float32)


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight shape"):
        tri.rms_norm(torch.randn(3, 8), torch.ones(9), 1e-5)
    with pytest.raises(ValueError, match="residual shape"):
        tri.add_rms_norm(torch.randn(3, 8), torch.randn(4, 8), torch.ones(8), 1e-5)
