"""Triton SwiGLU (elementwise) and the fused SwiGLU matmul against kernels.reference."""
import pytest
import torch

from kernels import ops
from kernels import reference as ref
from kernels import swiglu as tri
from tolerance import closeness

# the fused matmul keeps gate/up in fp32 where the reference rounds them to fp16 first
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


close = closeness(TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 2 * 50), (3, 5, 2 * 172)])
def test_swiglu_elementwise(dtype, shape):
    x = (2 * torch.randn(shape)).to(dtype).requires_grad_()
    y, y_ref = ops.swiglu(x, mode="triton"), ref.swiglu(x)
    assert y.shape == y_ref.shape and y.dtype == dtype
    close(y, y_ref, dtype)
    g = torch.randn_like(y)
    close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,h,f,chunk", [((37,), 48, 50, None), ((3, 13), 48, 172, 16),
                                            ((2, 9), 20, 24, 5)])
def test_swiglu_linear_matches_reference(dtype, lead, h, f, chunk):
    x = torch.randn(*lead, h).to(dtype).requires_grad_()
    w = (torch.randn(2 * f, h) / h ** 0.5).to(dtype).requires_grad_()
    y = tri.swiglu_linear(x, w, chunk_rows=chunk)
    y_ref = ref.swiglu_linear(x, w)
    assert y.shape == (*lead, f) and y.dtype == dtype
    close(y, y_ref, dtype)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(y_ref, (x, w), g)):
        close(got, want, dtype)


def test_swiglu_linear_dispatch_and_partial_grads():
    x = torch.randn(2, 7, 32)
    w = (torch.randn(2 * 40, 32) / 6).requires_grad_()  # x needs no gradient
    y = ops.swiglu_linear(x, w, mode="triton")
    close(y, ref.swiglu_linear(x, w), torch.float32)
    dw = torch.autograd.grad(y.square().sum(), w)[0]
    dw_ref = torch.autograd.grad(ref.swiglu_linear(x, w).square().sum(), w)[0]
    close(dw, dw_ref, torch.float32)


def test_swiglu_linear_chunking_does_not_change_gradients():
    x = torch.randn(45, 24, requires_grad=True)
    w = torch.randn(2 * 30, 24, requires_grad=True)
    g = torch.randn(45, 30)
    grads = [torch.autograd.grad(tri.swiglu_linear(x, w, chunk_rows=c), (x, w), g)
             for c in (7, 16, 1000)]
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            close(a, b, torch.float32)


def test_swiglu_bad_shapes():
    with pytest.raises(ValueError, match="must be even"):
        tri.swiglu(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"\[2f, 8\]"):
        tri.swiglu_linear(torch.randn(3, 8), torch.randn(10, 9))
    with pytest.raises(ValueError, match="dtype"):
        tri.swiglu_linear(torch.randn(3, 8), torch.randn(10, 8, dtype=torch.float16))


def saved_shapes(fn):
    """Shapes of every tensor autograd saves while fn() runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_fused_swiglu_saves_no_gate_up_intermediate():
    m, h, f = 30, 16, 40
    x = torch.randn(m, h, requires_grad=True)
    w = torch.randn(2 * f, h, requires_grad=True)
    fused = saved_shapes(lambda: tri.swiglu_linear(x, w))
    assert sorted(fused) == sorted([(m, h), (2 * f, h)])  # x and the weight, nothing else
    # the reference keeps gate and up (and silu(gate)): at least the [m, 2f] intermediate
    unfused = saved_shapes(lambda: ref.swiglu_linear(x, w))
    assert sum(a * b for a, b in unfused if (a, b) == (m, f)) >= m * 2 * f
