"""Tensor-parallel building blocks against their dense equivalents, value and gradient:
the autograd collectives, Column/Row/VocabParallel layers (with and without sequence
parallelism), the vocab-parallel cross-entropy (and that it never holds [tokens, vocab]),
the RNG tracker, and the shard plan.

The distributed checks run in one 2-process gloo job; each rank rebuilds every rank's
inputs from fixed seeds, so it knows the dense answer. The worker returns errors and
flags, the tests assert on them.
"""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dist import run_workers
from engine.tensor_parallel import (ColumnParallelLinear, RNGTracker, RowParallelLinear,
                                    ShardPlan, VocabParallelEmbedding, VocabParallelHead,
                                    all_gather_sequence, copy_to_region, copy_to_replicas,
                                    gather_last_dim, reduce_from_region, reduce_scatter_sequence,
                                    scatter_last_dim, scatter_to_sequence, seed_tensor_parallel,
                                    shard_state_dict, vocab_parallel_cross_entropy)
from model import GLM, GLMConfig
from model.parallel_protocol import LossHead, MapsInput

TP = 2
S, B, H = 4, 3, 8          # [s, b, h]; s and every split dim divisible by TP


def rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def err(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def chunk(t, rank, dim):
    return t.chunk(TP, dim=dim)[rank]


# ---- distributed worker ---------------------------------------------------------------

def _mappings(rank, world):
    g = dist.group.WORLD
    out = {}
    xs = [rand(10 + r, S, B, H) for r in range(world)]   # rank-dependent inputs / grads
    gs = [rand(20 + r, S, B, H) for r in range(world)]
    x_all, g_all = sum(xs), sum(gs)

    x = xs[0].clone().requires_grad_()           # replicated input
    y = copy_to_region(x, g)
    y.backward(gs[rank])
    out["copy fwd"], out["copy bwd"] = err(y, xs[0]), err(x.grad, g_all)

    x = xs[rank].clone().requires_grad_()
    y = reduce_from_region(x, g)
    y.backward(gs[0])
    out["reduce fwd"], out["reduce bwd"] = err(y, x_all), err(x.grad, gs[0])

    x = xs[0].clone().requires_grad_()
    y = scatter_last_dim(x, g)
    y.backward(chunk(gs[rank], rank, -1))
    expect = torch.cat([chunk(gs[r], r, -1) for r in range(world)], dim=-1)
    out["scatter_last fwd"], out["scatter_last bwd"] = err(y, chunk(xs[0], rank, -1)), \
        err(x.grad, expect)

    x = chunk(xs[0], rank, -1).clone().requires_grad_()
    y = gather_last_dim(x, g)
    y.backward(gs[0])
    out["gather_last fwd"], out["gather_last bwd"] = err(y, xs[0]), \
        err(x.grad, chunk(gs[0], rank, -1))

    x = xs[0].clone().requires_grad_()
    y = scatter_to_sequence(x, g)
    y.backward(chunk(gs[rank], rank, 0))
    expect = torch.cat([chunk(gs[r], r, 0) for r in range(world)])
    out["scatter_seq fwd"], out["scatter_seq bwd"] = err(y, chunk(xs[0], rank, 0)), \
        err(x.grad, expect)

    # all-gather feeds a partial-gradient computation: backward is a reduce-scatter
    x = chunk(xs[0], rank, 0).clone().requires_grad_()
    y = all_gather_sequence(x, g)
    y.backward(gs[rank])
    out["gather_seq fwd"], out["gather_seq bwd"] = err(y, xs[0]), \
        err(x.grad, chunk(g_all, rank, 0))

    x = xs[rank].clone().requires_grad_()
    y = reduce_scatter_sequence(x, g)
    y.backward(chunk(gs[0], rank, 0))
    out["reduce_scatter fwd"], out["reduce_scatter bwd"] = err(y, chunk(x_all, rank, 0)), \
        err(x.grad, gs[0])

    # replicas: one slot shared by both ranks sums; a slot per rank keeps its own
    for slots, slot, expect in ((1, 0, g_all), (world, rank, gs[rank])):
        x = xs[0].clone().requires_grad_()
        copy_to_replicas(x, g, slot, slots).backward(gs[rank])
        out[f"replicas {slots} bwd"] = err(x.grad, expect)

    try:
        reduce_scatter_sequence(torch.ones(3, 1, 2), g)
        out["odd seq error"] = ""
    except ValueError as e:
        out["odd seq error"] = str(e)
    return out


def _column(rank, sp):
    g, din, dout = dist.group.WORLD, H, 6
    w, bias, x, gy = rand(1, dout, din), rand(2, dout), rand(3, S, B, din), rand(4, S, B, dout)
    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, bias))
    F.linear(xd, wd, bd).backward(gy)
    layer = ColumnParallelLinear(din, dout // TP, True, g, sequence_parallel=sp)
    with torch.no_grad():
        layer.weight.copy_(chunk(w, rank, 0))
        layer.bias.copy_(chunk(bias, rank, 0))
    xin = (chunk(x, rank, 0) if sp else x).clone().requires_grad_()
    y = layer(xin)
    y.backward(chunk(gy, rank, -1))
    return dict(fwd=err(y, chunk(F.linear(x, w, bias), rank, -1)),
                dx=err(xin.grad, chunk(xd.grad, rank, 0) if sp else xd.grad),
                dw=err(layer.weight.grad, chunk(wd.grad, rank, 0)),
                db=err(layer.bias.grad, chunk(bd.grad, rank, 0)))


def _row(rank, sp):
    g, din, dout = dist.group.WORLD, 6, H
    w, bias, x, gy = rand(5, dout, din), rand(6, dout), rand(7, S, B, din), rand(8, S, B, dout)
    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, bias))
    F.linear(xd, wd, bd).backward(gy)
    layer = RowParallelLinear(din // TP, dout, True, g, sequence_parallel=sp)
    assert layer.in_features == din // TP  # local width
    with torch.no_grad():
        layer.weight.copy_(chunk(w, rank, 1))
        layer.bias.copy_(bias)
    xin = chunk(x, rank, -1).clone().requires_grad_()
    y = layer(xin)
    dense = F.linear(x, w, bias)
    y.backward(chunk(gy, rank, 0) if sp else gy)
    db = layer.bias.grad.clone()
    if sp:  # each rank saw its sequence shard; parallelize's grad hook sums these
        dist.all_reduce(db)
    return dict(fwd=err(y, chunk(dense, rank, 0) if sp else dense),
                dx=err(xin.grad, chunk(xd.grad, rank, -1)),
                dw=err(layer.weight.grad, chunk(wd.grad, rank, 1)), db=err(db, bd.grad))


def _embedding(rank, sp):
    g, vocab = dist.group.WORLD, 10
    w = rand(9, vocab, H)
    ids = torch.tensor([[0, 9, 4, 5], [7, 2, 2, 6]])            # [b, s], both halves used
    gy = rand(10, 2, 4, H)
    wd = w.clone().requires_grad_()
    F.embedding(ids, wd).backward(gy)
    layer = VocabParallelEmbedding(vocab, H, g, sequence_parallel=sp)
    with torch.no_grad():
        layer.weight.copy_(chunk(w, rank, 0))
    y = layer(ids)
    dense = F.embedding(ids, w)
    y.backward(chunk(gy, rank, 1) if sp else gy)
    return dict(fwd=err(y, chunk(dense, rank, 1) if sp else dense),
                dw=err(layer.weight.grad, chunk(wd.grad, rank, 0)))


def _head(rank, sp):
    g, vocab = dist.group.WORLD, 12
    w, h = rand(11, vocab, H), rand(12, S, B, H)
    labels = torch.randint(0, vocab, (S * B,), generator=torch.Generator().manual_seed(13))
    labels[::5] = -100
    gl = rand(14, S * B)                                   # upstream per-token weights
    gz = rand(15, S, B, vocab)
    head = VocabParallelHead(H, vocab, g, sequence_parallel=sp)
    # the model finds its own loss and input mapping through these (GLM.head_loss, distill)
    assert isinstance(head, LossHead) and isinstance(head, MapsInput)
    with torch.no_grad():
        head.weight.copy_(chunk(w, rank, 0))
    out = {}
    # full logits
    hd, wd = h.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(hd, wd).backward(gz)
    hin = (chunk(h, rank, 0) if sp else h).clone().requires_grad_()
    z = head(hin)
    z.backward(gz)
    out["logits fwd"] = err(z, F.linear(h, w))
    out["logits dh"] = err(hin.grad, chunk(hd.grad, rank, 0) if sp else hd.grad)
    out["logits dw"] = err(head.weight.grad, chunk(wd.grad, rank, 0))
    # loss on flat sequence-major rows, as GLM.head_loss calls it
    hd, wd = h.clone().requires_grad_(), w.clone().requires_grad_()
    dense = F.cross_entropy(F.linear(hd.reshape(-1, H), wd), labels, reduction="none")
    (dense * gl).sum().backward()
    head.weight.grad = None
    flat = h.reshape(-1, H)
    fin = (chunk(flat, rank, 0) if sp else flat).clone().requires_grad_()
    loss = head.loss(fin, labels)
    (loss * gl).sum().backward()
    out["loss fwd"] = err(loss, dense)
    out["loss zero at ignored"] = float(loss.detach()[labels == -100].abs().max())
    out["loss dh"] = err(fin.grad, chunk(hd.grad.reshape(-1, H), rank, 0) if sp
                         else hd.grad.reshape(-1, H))
    out["loss dw"] = err(head.weight.grad, chunk(wd.grad, rank, 0))
    return out


def _cross_entropy(rank):
    g, n, vocab = dist.group.WORLD, 10, 16
    out = {}
    for scale in (1.0, 100.0):   # 100: exp would overflow without the max shift
        logits = rand(16, n, vocab) * scale
        labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(17))
        labels[3] = -100
        gl = rand(18, n)
        ld = logits.clone().requires_grad_()
        dense = F.cross_entropy(ld, labels, reduction="none")
        (dense * gl).sum().backward()
        local = chunk(logits, rank, -1).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, labels, g, rank * vocab // TP)
        (loss * gl).sum().backward()
        out[f"x{scale:g} fwd"] = err(loss, dense)
        out[f"x{scale:g} bwd"] = err(local.grad, chunk(ld.grad, rank, -1))
        out[f"x{scale:g} input untouched"] = torch.equal(local.detach(),
                                                         chunk(logits, rank, -1))
    try:
        vocab_parallel_cross_entropy(torch.zeros(2, vocab // TP), torch.tensor([1, vocab]), g, 0)
        out["bad label error"] = ""
    except ValueError as e:
        out["bad label error"] = str(e)
    return out


class _Largest(TorchDispatchMode):
    """Largest tensor (elements) any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def _memory(rank):
    """The loss path (the head's fused projection + vocab-parallel CE, forward and
    backward) never allocates or saves a tensor of [tokens, vocab] elements."""
    g, n, vocab, h = dist.group.WORLD, 64, 512, 16
    head = VocabParallelHead(h, vocab, g)
    with torch.no_grad():
        head.weight.copy_(chunk(rand(19, vocab, h), rank, 0))
    hidden = rand(20, n, h).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(21))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with _Largest() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = head.loss(hidden, labels)
        loss.sum().backward()
    return dict(largest=mode.largest, largest_saved=max(saved), full=n * vocab,
                shard=n * vocab // TP)


def _rng(rank):
    tracker = seed_tensor_parallel(5, rank)
    a = torch.rand(6)                      # replicated region: default stream
    with tracker.fork():
        b = torch.rand(6)                  # sharded region: per-rank stream
    c = torch.rand(6)
    with tracker.fork():
        d = torch.rand(6)
    both = [torch.empty(4, 6) for _ in range(TP)]
    dist.all_gather(both, torch.stack([a, b, c, d]))
    return dict(default_same=torch.equal(both[0][0], both[1][0]) and
                torch.equal(both[0][2], both[1][2]),
                forked_differ=not torch.equal(both[0][1], both[1][1]) and
                not torch.equal(both[0][3], both[1][3]))


def _worker(rank, world):
    out = {"mappings": _mappings(rank, world), "cross_entropy": _cross_entropy(rank),
           "memory": _memory(rank), "rng": _rng(rank)}
    for sp in (False, True):
        out[f"column sp={sp}"] = _column(rank, sp)
        out[f"row sp={sp}"] = _row(rank, sp)
        out[f"embedding sp={sp}"] = _embedding(rank, sp)
        out[f"head sp={sp}"] = _head(rank, sp)
    return out


@functools.lru_cache(maxsize=None)
def results():
    return run_workers(_worker, TP, timeout=90, pg_timeout=30)


def assert_small(name, tol=1e-6):
    for rank, res in enumerate(results()):
        for key, value in res[name].items():
            if isinstance(value, float) and key not in ("loss zero at ignored",):
                assert value <= tol, f"{name} {key} on rank {rank}: rel err {value:.2e}"


# ---- tests: distributed ---------------------------------------------------------------

def test_autograd_collectives_are_adjoint_pairs():
    assert_small("mappings")
    for res in results():
        assert "not divisible by the tensor-parallel size 2" in res["mappings"]["odd seq error"]


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("layer", ["column", "row", "embedding", "head"])
def test_parallel_layer_matches_dense(layer, sp):
    assert_small(f"{layer} sp={sp}")
    if layer == "head":
        for res in results():
            assert res[f"head sp={sp}"]["loss zero at ignored"] == 0.0


def test_vocab_parallel_cross_entropy_matches_full_value_and_gradient():
    assert_small("cross_entropy")
    for res in results():
        ce = res["cross_entropy"]
        assert ce["x1 input untouched"] and ce["x100 input untouched"]
        assert "labels hold ids outside [0, 16)" in ce["bad label error"]


def test_vocab_parallel_loss_never_holds_tokens_by_vocab():
    for res in results():
        m = res["memory"]
        # the biggest tensor anywhere in forward+backward is this rank's [tokens, V/tp]
        # shard, and that shard is the biggest thing autograd keeps
        assert m["largest"] == m["shard"] < m["full"], m
        assert m["largest_saved"] == m["shard"], m


def test_dropout_streams_same_where_replicated_different_where_sharded():
    for res in results():
        assert res["rng"]["default_same"], "replicated-region dropout differs across ranks"
        assert res["rng"]["forked_differ"], "sharded-region dropout repeats across ranks"


# ---- tests: single process ------------------------------------------------------------

def test_rng_tracker_restores_the_default_stream_and_continues_its_own():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    tracker = RNGTracker()
    tracker.add("tp", 99)
    with tracker.fork("tp"):
        first = torch.rand(4)
    assert torch.equal(torch.rand(4), expected)  # the default stream did not move
    with tracker.fork("tp"):
        second = torch.rand(4)
    alone = torch.Generator().manual_seed(99)
    assert torch.equal(torch.cat([first, second]), torch.rand(8, generator=alone))
    saved = tracker.state_dict()
    with tracker.fork("tp"):
        third = torch.rand(4)
    tracker.load_state_dict(saved)
    with tracker.fork("tp"):
        assert torch.equal(torch.rand(4), third)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("tp", 1)
    with pytest.raises(ValueError, match="unknown RNG state 'nope'"):
        with tracker.fork("nope"):
            pass


def test_shard_plan_validation_names_the_field():
    cfg = GLMConfig.preset("tiny")  # 4 heads, 2 groups, ffn 172, vocab 1024
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp=3"):
        ShardPlan(cfg, 3)
    with pytest.raises(ValueError, match="tp=0"):
        ShardPlan(cfg, 0)
    with pytest.raises(ValueError, match="ffn_hidden_size=172 is not divisible by tp=8"):
        ShardPlan(GLMConfig.preset("tiny", num_attention_heads=8, multi_query_group_num=8), 8)
    with pytest.raises(ValueError, match="multi_query_group_num=6 and tp=4"):
        ShardPlan(GLMConfig.preset("tiny", num_attention_heads=12, multi_query_group_num=6), 4)
    with pytest.raises(ValueError, match="padded_vocab_size=1000 is not divisible by tp=16"):
        ShardPlan(GLMConfig.preset("tiny", num_attention_heads=16, multi_query_group_num=16,
                                   ffn_hidden_size=256, padded_vocab_size=1000), 16)


def test_shard_plan_rows_hand_worked():
    cfg = GLMConfig.preset("tiny")  # d=16: Q rows 0..64, K 64..96, V 96..128
    rows = lambda plan, r: plan.index("layers.0.attention.qkv.weight", r)[1].tolist()  # noqa
    span = lambda a, b: list(range(a, b))  # noqa: E731
    # tp=2 <= 2 groups: rank 1 holds heads 2, 3 and group 1
    assert rows(ShardPlan(cfg, 2), 1) == span(32, 64) + span(80, 96) + span(112, 128)
    # tp=4 > 2 groups: rank 1 holds head 1, which uses group 0 (shared with rank 0)
    p4 = ShardPlan(cfg, 4)
    assert rows(p4, 1) == span(16, 32) + span(64, 80) + span(96, 112)
    assert rows(p4, 2) == span(32, 48) + span(80, 96) + span(112, 128)
    assert p4.kv_replica(1) == (16, 0, 2) and p4.kv_replica(2) == (16, 1, 2)
    assert ShardPlan(cfg, 2).kv_replica(1) is None
    # SwiGLU pairs stay together: [gate_r | up_r]
    gate_up = ShardPlan(cfg, 2).index("layers.3.mlp.gate_up.weight", 1)
    assert gate_up[0] == 0 and gate_up[1].tolist() == span(86, 172) + span(258, 344)
    assert ShardPlan(cfg, 2).index("layers.0.attention.dense.weight", 1)[0] == 1
    assert ShardPlan(cfg, 2).index("final_norm.weight", 1) is None


@pytest.mark.parametrize("tp,groups", [(2, 2), (4, 2), (2, 1), (4, 4), (4, 1)])
def test_shard_state_dict_round_trips(tp, groups):
    cfg = GLMConfig.preset("tiny", multi_query_group_num=groups, add_bias_linear=True)
    full = GLM.build(cfg, seed=1).state_dict()
    pieces = [shard_state_dict(full, r, tp, cfg) for r in range(tp)]
    plan = ShardPlan(cfg, tp)
    local_groups = max(1, groups // tp)
    assert pieces[0]["layers.0.attention.qkv.weight"].shape == \
        ((4 // tp + 2 * local_groups) * 16, 64)
    assert pieces[0]["output_layer.weight"].shape == (1024 // tp, 64)
    for name, tensor in full.items():
        merged = plan.merge(name, [p[name] for p in pieces])
        assert torch.equal(merged, tensor), name
    with pytest.raises(ValueError, match="tp_rank=4 is outside tp=4"):
        shard_state_dict(full, 4, 4, cfg)
