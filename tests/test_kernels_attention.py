"""Triton FlashAttention (forward + backward) against kernels.reference.attention, over
every mask the model uses: causal, prefix-LM, GLM blank infilling, left padding, KV-cache
decoding, with MHA / GQA / MQA."""
import pytest
import torch

from kernels import flash_attention as fa
from kernels import ops
from kernels import reference as ref
from model import masks
from tolerance import closeness

# fp16: the kernel feeds P and dS to fp16 matmuls, the reference stays in fp32 throughout
TOL = {torch.float32: 2e-5, torch.float16: 1e-2}
SMALL = (16, 16)  # tiles small enough that seq 37 spans three blocks with ragged edges


close = closeness(TOL)


def qkv(b, nh, ng, sq, sk, d, dtype):
    mk = lambda n, s: torch.randn(b, n, s, d).to(dtype).requires_grad_()  # noqa: E731
    return mk(nh, sq), mk(ng, sk), mk(ng, sk)


def check(q, k, v, prefix=None, pad=None, q_offset=0, dtype=torch.float32, **kw):
    o = fa.attention(q, k, v, prefix, pad, q_offset, **kw)
    o_ref = ref.attention(q, k, v, prefix, pad, q_offset)
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    close(o, o_ref, dtype)
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), g)
    want = torch.autograd.grad(o_ref, (q, k, v), g)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nh,ng", [(4, 4), (4, 2), (4, 1)])  # GQA ratios 1, 2, 4
def test_causal_and_prefix_gqa(dtype, nh, ng):
    q, k, v = qkv(2, nh, ng, 37, 37, 16, dtype)
    # sample 0 causal (prefix 0), sample 1 prefix-LM with a partial prefix
    check(q, k, v, prefix=torch.tensor([0, 20]), dtype=dtype, blocks=SMALL)


@pytest.mark.parametrize("prefix", [[0, 37], [37, 16], [1, 33]])
def test_prefix_edge_lengths(prefix):
    # empty, full, block-aligned (16), and off-by-one prefixes
    q, k, v = qkv(2, 3, 1, 37, 37, 16, torch.float32)
    check(q, k, v, prefix=torch.tensor(prefix), blocks=SMALL)


@pytest.mark.parametrize("d", [16, 48, 80, 128])
def test_head_dims(d):
    q, k, v = qkv(1, 2, 1, 19, 19, d, torch.float32)
    check(q, k, v, prefix=torch.tensor([7]))


def test_left_padding():
    # batched generation: sample 0 has 5 pad tokens in front, its prompt (prefix) ends at 12
    q, k, v = qkv(2, 2, 2, 37, 37, 16, torch.float32)
    check(q, k, v, prefix=torch.tensor([12, 9]), pad=torch.tensor([5, 0]), blocks=SMALL)
    check(q, k, v, prefix=None, pad=torch.tensor([20, 3]), blocks=SMALL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_cache_decode_and_chunked_prefill(dtype):
    # one new token against 29 cached + itself; then 5 new tokens at offset 20
    q, k, v = qkv(2, 4, 2, 1, 30, 16, dtype)
    check(q, k, v, prefix=torch.tensor([10, 4]), pad=torch.tensor([0, 3]), q_offset=29,
          dtype=dtype, blocks=SMALL)
    q, k, v = qkv(2, 4, 2, 5, 25, 16, dtype)
    check(q, k, v, prefix=torch.tensor([22, 0]), q_offset=20, dtype=dtype, blocks=SMALL)


def test_kv_cache_slices_without_copy():
    # the KV cache hands attention [b, g, :len, d] slices of a longer buffer
    cache_k, cache_v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    k, v = cache_k[:, :, :21], cache_v[:, :, :21]
    assert not k.is_contiguous()
    q = torch.randn(2, 4, 3, 16)
    o = ops.attention(q, k, v, torch.tensor([0, 5]), None, 18, mode="triton")
    close(o, ref.attention(q, k, v, torch.tensor([0, 5]), None, 18), torch.float32)


def test_model_layout_views_and_output_layout():
    # q/k/v as the model passes them: [s, b, n, d] buffers permuted to [b, n, s, d]
    s, b = 37, 2
    q = torch.randn(s, b, 4, 16).permute(1, 2, 0, 3).requires_grad_()
    k = torch.randn(s, b, 2, 16).permute(1, 2, 0, 3).requires_grad_()
    v = torch.randn(s, b, 2, 16).permute(1, 2, 0, 3).requires_grad_()
    check(q, k, v, prefix=torch.tensor([3, 30]), blocks=SMALL)
    o = fa.attention(q, k, v)
    # stored [s, b, n, d]: the model's permute + reshape back to [s, b, n * d] is a view
    assert o.permute(2, 0, 1, 3).is_contiguous()


@pytest.mark.parametrize("splits", [2, 4])
def test_kv_head_splits_sum_group_gradients(splits):
    q, k, v = qkv(1, 4, 1, 37, 37, 16, torch.float32)
    check(q, k, v, prefix=torch.tensor([9]), blocks=SMALL, kv_head_splits=splits)


def test_blank_infilling_with_2d_rotary():
    # a real GLM blank-infilling batch: Part A bidirectional, Part B causal, 2D positions
    ex = [masks.blank_infilling_example([5, 6, 1, 7, 8, 1, 9], [(5, [11, 12, 13]), (2, [14])],
                                        sop_id=2, eop_id=3),
          masks.gmask_example(list(range(20, 33)), 9, gmask_id=4, sop_id=2, eop_id=3)]
    batch = masks.collate(ex, seq_len=23, pad_id=0)
    b, s, nh, ng, d = 2, 23, 4, 2, 16
    cos, sin = ref.rotary_angles(batch["position_ids"], batch["block_position_ids"], d, 1e4)
    cos, sin = (t.transpose(0, 1).unsqueeze(2) for t in (cos, sin))  # [s, b, 1, d/2]
    q0 = torch.randn(s, b, nh, d, requires_grad=True)
    k0 = torch.randn(s, b, ng, d, requires_grad=True)
    v0 = torch.randn(s, b, ng, d, requires_grad=True)

    def run(mode):
        q = ops.apply_rotary(q0, cos, sin, mode).permute(1, 2, 0, 3)
        k = ops.apply_rotary(k0, cos, sin, mode).permute(1, 2, 0, 3)
        o = ops.attention(q, k, v0.permute(1, 2, 0, 3), batch["prefix_lens"], None, 0, mode)
        return o

    o, o_ref = run("triton"), run("torch")
    close(o, o_ref, torch.float32)
    g = torch.randn_like(o)
    for a, b_ in zip(torch.autograd.grad(o, (q0, k0, v0), g),
                     torch.autograd.grad(o_ref, (q0, k0, v0), g)):
        close(a, b_, torch.float32)


def test_row_that_sees_nothing_is_zero_not_nan():
    # pad = 6 >= sk = 4: rows at i = 4, 5 are pad queries and see keys 0..i; rows at
    # i = 6, 7 see no key at all, where the reference divides 0 by 0 (NaN)
    q, k, v = qkv(1, 1, 1, 4, 4, 16, torch.float32)
    o = fa.attention(q, k, v, None, torch.tensor([6]), 4)
    o_ref = ref.attention(q, k, v, None, torch.tensor([6]), 4)
    assert torch.isnan(o_ref[:, :, 2:]).all()
    close(o[:, :, :2], o_ref[:, :, :2], torch.float32)
    assert o[:, :, 2:].abs().max() == 0
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_bad_input():
    q, k, v = qkv(1, 3, 2, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="not divisible"):
        fa.attention(q, k, v)
    q, k, v = qkv(2, 2, 1, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="entries for batch"):
        fa.attention(q, k, v, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="q_offset"):
        fa.attention(q, k, v, q_offset=-1)
    with pytest.raises(ValueError, match="dtypes"):
        fa.attention(q, k.half(), v)


def test_saves_no_score_matrix():
    q, k, v = qkv(1, 2, 1, 37, 37, 16, torch.float32)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fa.attention(q, k, v, torch.tensor([5]))
    # q, k, v, out, logsumexp [b, nh, s], mask lengths [3, b, 1] (doc start, prefix, doc
    # end: per row here, per position only for packed rows), pad: nothing [s, s]
    assert sorted(shapes) == sorted([q.shape, k.shape, v.shape, q.shape, (1, 2, 37),
                                     (3, 1, 1), (1,)])
