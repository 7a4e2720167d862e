"""The output layer and loss run only at labelled rows (translation prompts have none):
same per-token losses and gradients as computing the head everywhere, and the head's
matmul really sees only the labelled rows."""
import pytest
import torch
import torch.nn.functional as F

from kernels import ops
from kernels import reference as ref
from model.config import GLMConfig
from model.glm import GLM


def _data(n=23, h=16, vocab=50, prompt=14):
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(vocab, h) / h ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    labels[:prompt] = -100   # a prompt: no labels
    labels[prompt + 3] = -100
    return hidden, weight, labels


def _everywhere(hidden, weight, labels):
    """The head at every row: logits [N, V], CE with ignore -> 0."""
    return F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=-100,
                           reduction="none")


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_loss_and_grads_equal_the_head_everywhere(mode):
    hidden, weight, labels = _data()
    g = torch.rand(labels.shape[0])
    loss = ops.linear_cross_entropy(hidden, weight, labels, mode=mode)
    want = _everywhere(hidden, weight, labels)
    assert loss.shape == want.shape and torch.all(loss[labels == -100] == 0)
    torch.testing.assert_close(loss, want, rtol=0, atol=2e-6)
    got = torch.autograd.grad(loss, (hidden, weight), g)
    exp = torch.autograd.grad(want, (hidden, weight), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    assert torch.all(got[0][labels == -100] == 0)


def test_head_sees_only_labelled_rows(monkeypatch):
    hidden, weight, labels = _data()
    rows = []
    real = ref.linear_cross_entropy

    def spy(h, w, y, ignore_index=-100):
        rows.append(h.shape[0])
        return real(h, w, y, ignore_index)
    monkeypatch.setattr(ref, "linear_cross_entropy", spy)
    ops.linear_cross_entropy(hidden, weight, labels, mode="torch").sum().backward()
    assert rows == [int((labels != -100).sum())]


def test_no_label_at_all_gives_zero_loss_and_grads():
    hidden, weight, labels = _data()
    labels[:] = -100
    loss = ops.linear_cross_entropy(hidden, weight, labels, mode="torch")
    assert loss.shape == (labels.shape[0],) and torch.all(loss == 0)
    loss.sum().backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_glm_loss_equals_full_logits_cross_entropy():
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    b, s = 2, 12
    ids = torch.randint(0, model.config.padded_vocab_size, (b, s))
    labels = ids.roll(-1, 1)
    labels[:, :7] = -100  # the prompt
    prefix = torch.tensor([7, 5])
    loss = model(ids, prefix_lens=prefix, labels=labels)
    logits = model(ids, prefix_lens=prefix)
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           reduction="none").view(b, s)
    torch.testing.assert_close(loss, want, rtol=0, atol=2e-5)
    g = torch.autograd.grad(loss.sum(), model.output_layer.weight)[0]
    w = torch.autograd.grad(want.sum(), model.output_layer.weight)[0]
    torch.testing.assert_close(g, w, rtol=0, atol=2e-5)
