"""Chunked linear + cross-entropy (Triton) against kernels.reference."""
import pytest
import torch

from kernels import cross_entropy as tri
from kernels import ops
from kernels import reference as ref
from tolerance import closeness

# logits are the same cuBLAS/CPU matmul in both; only the logsumexp order differs. fp16
# gradients round dlogits to fp16 before the matmuls, as the reference's autograd does.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


close = closeness(TOL)


def data(n, h, vocab, dtype, ignore_every=5, ignore_index=-100):
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, h) / h ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    labels[::ignore_every] = ignore_index
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,h,vocab,chunk", [(37, 48, 300, None), (37, 48, 300, 16),
                                             (9, 16, 4099, 4)])
def test_linear_cross_entropy_matches_reference(dtype, n, h, vocab, chunk):
    # vocab 4099 spans two 4096-wide blocks: the online logsumexp crosses a block edge
    hidden, weight, labels = data(n, h, vocab, dtype)
    loss = tri.linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk)
    loss_ref = ref.linear_cross_entropy(hidden, weight, labels)
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    assert torch.all(loss[labels == -100] == 0)
    close(loss, loss_ref, dtype)
    # per-token weights, as a weighted / distillation loss would send back
    g = torch.rand(n)
    got = torch.autograd.grad(loss, (hidden, weight), g)
    want = torch.autograd.grad(loss_ref, (hidden, weight), g)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        close(a, b, dtype)


def test_custom_ignore_index_and_dispatch():
    hidden, weight, labels = data(20, 24, 64, torch.float32, ignore_every=3, ignore_index=0)
    loss = ops.linear_cross_entropy(hidden, weight, labels, ignore_index=0, mode="triton")
    loss_ref = ref.linear_cross_entropy(hidden, weight, labels, ignore_index=0)
    close(loss, loss_ref, torch.float32)
    got = torch.autograd.grad(loss.mean(), (hidden, weight))
    want = torch.autograd.grad(loss_ref.mean(), (hidden, weight))
    for a, b in zip(got, want):
        close(a, b, torch.float32)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, labels = data(6, 8, 32, torch.float32)
    labels[:] = -100
    loss = tri.linear_cross_entropy(hidden, weight, labels)
    assert torch.all(loss == 0)
    dh, dw = torch.autograd.grad(loss.sum(), (hidden, weight))
    assert dh.abs().max() == 0 and dw.abs().max() == 0


def test_only_weight_grad():
    hidden, weight, labels = data(10, 8, 40, torch.float32)
    hidden = hidden.detach()
    loss = tri.linear_cross_entropy(hidden, weight, labels, chunk_rows=3)
    dw = torch.autograd.grad(loss.sum(), weight)[0]
    dw_ref = torch.autograd.grad(ref.linear_cross_entropy(hidden, weight, labels).sum(),
                                 weight)[0]
    close(dw, dw_ref, torch.float32)


def test_bad_input():
    hidden, weight, labels = data(4, 8, 16, torch.float32)
    bad = labels.clone()
    bad[1] = 16
    with pytest.raises(ValueError, match="outside"):
        tri.linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match="must be"):
        tri.linear_cross_entropy(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="labels"):
        tri.linear_cross_entropy(hidden, weight, labels[:3])


def test_saves_no_logits():
    hidden, weight, labels = data(30, 8, 50, torch.float32)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tri.linear_cross_entropy(hidden, weight, labels, chunk_rows=8)
    # hidden, weight, labels and the per-token logsumexp: no [N, V] or [chunk, V] tensor
    assert sorted(shapes) == sorted([(30, 8), (50, 8), (30,), (30,)])
