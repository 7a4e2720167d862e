"""Triton rotary (adjacent pairs, 1D and GLM 2D angles) against kernels.reference."""
import pytest
import torch

from kernels import ops
from kernels import reference as ref
from kernels import rotary as tri
from tolerance import closeness

# both compute in fp32 from the same inputs and round once: near-exact in either dtype
TOL = {torch.float32: 1e-6, torch.float16: 1e-3}


close = closeness(TOL)


def model_angles(s, b, d, blocks=True):
    """The model's layout: cos/sin [s, b, 1, d/2] from (position, block position) ids."""
    pos = torch.randint(0, 64, (b, s))
    blk = torch.randint(0, 6, (b, s)) if blocks else None
    cos, sin = ref.rotary_angles(pos, blk, d, 10000.0)
    return tuple(t.transpose(0, 1).unsqueeze(2) for t in (cos, sin))


def check(x, cos, sin, dtype):
    y = ops.apply_rotary(x, cos, sin, mode="triton")
    y_ref = ref.apply_rotary(x, cos, sin)
    assert y.shape == x.shape and y.dtype == x.dtype
    close(y, y_ref, dtype)
    g = torch.randn_like(y)
    close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("blocks", [False, True])
def test_rotary_model_layout(dtype, blocks):
    s, b, n, d = 37, 2, 3, 48
    cos, sin = model_angles(s, b, d, blocks)
    check(torch.randn(s, b, n, d, dtype=dtype, requires_grad=True), cos, sin, dtype)


def test_rotary_on_strided_qkv_slice():
    # q and k are views into the fused QKV output: non-contiguous rows, unit last stride
    s, b, nq, nkv, d = 11, 2, 4, 2, 16
    qkv = torch.randn(s, b, (nq + 2 * nkv) * d, requires_grad=True)
    q, k, _ = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    cos, sin = model_angles(s, b, d)
    for t, n in ((q, nq), (k, nkv)):
        view = t.view(s, b, n, d)
        assert not view.is_contiguous()
        check(view, cos, sin, torch.float32)


@pytest.mark.parametrize("cos_shape", [(8,), (5, 1, 8), (1, 5, 1, 8), (2, 5, 3, 8)])
def test_rotary_broadcasts_like_torch(cos_shape):
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    ang = torch.rand(cos_shape) * 6
    check(x, ang.cos(), ang.sin(), torch.float32)


def test_rotary_more_than_four_leading_dims():
    x = torch.randn(2, 3, 2, 5, 2, 8, requires_grad=True)
    ang = torch.rand(3, 1, 5, 1, 4) * 6
    check(x, ang.cos(), ang.sin(), torch.float32)


def test_rotary_backward_is_inverse_rotation():
    # the backward applies R(angle)^T = R(-angle): fed y = R x as the incoming gradient,
    # it must hand back x itself
    x = torch.randn(7, 1, 2, 16, requires_grad=True)
    cos, sin = model_angles(7, 1, 16)
    y = tri.apply_rotary(x, cos, sin)
    back = torch.autograd.grad(y, x, y.detach())[0]
    close(back, x, torch.float32)


def test_rotary_bad_input():
    with pytest.raises(ValueError, match="do not broadcast"):
        tri.apply_rotary(torch.randn(4, 8), torch.ones(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="must be even"):
        tri.apply_rotary(torch.randn(4, 7), torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="require grad"):
        tri.apply_rotary(torch.randn(4, 8), torch.ones(4, requires_grad=True), torch.zeros(4))
