"""Structured pruning on the tensors: removing structures whose contribution is exactly
zero leaves the logits unchanged; GQA mapping; pruned checkpoints reload and train."""
import hashlib
import json
import math
import os

import pytest
import torch

from engine.train import checkpoint as ckpt_lib
from engine.recipe.compress.export import load_glm, save_student
from engine.recipe.compress.importance import magnitude_importance, random_importance
from engine.recipe.compress.prune import (PruneTarget, exact_rope_ratio, full_selection, prune_model,
                                   prune_state_dict, select)
from engine.recipe.compress.search import (calibration_loss, non_embedding_params, paper_target,
                                    search_target)
from engine.recipe.compress.structure import split_qkv
from engine.config import build_run_config
from engine.train.trainer import Trainer
from model import GLM, GLMConfig
from model.masks import blank_infilling_example, collate


pytestmark = pytest.mark.usefixtures("single_thread")


def make_batch(vocab=1000, b=2, seed=0, seq_len=24):
    """GLM blank-infilling rows: a bidirectional Part A and a span with block positions >
    0, so both rotary halves and the prefix mask are exercised; right padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(b):
        a = torch.randint(10, vocab, (12 + r,), generator=g).tolist()
        a[4] = 3                                   # the span's mask token
        span = torch.randint(10, vocab, (6,), generator=g).tolist()
        rows.append(blank_infilling_example(a, [(4, span)], sop_id=5, eop_id=6))
    return collate(rows, seq_len, pad_id=0)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"], position_ids=batch["position_ids"],
                     block_position_ids=batch["block_position_ids"],
                     prefix_lens=batch["prefix_lens"])


def build(**over):
    # larger weights than the default init: a wrong slice or rotary shows up clearly
    cfg = GLMConfig.preset("tiny", kernels="torch", init_std=0.1, **over)
    model = GLM.build(cfg, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    return model


def params_of(model):
    return dict(model.named_parameters())


def assert_exact(model, pruned, batch):
    ref, out = logits(model, batch), logits(pruned, batch)
    assert ref.abs().max() > 0.5      # the check is not vacuous
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# ---- planting zero structures ------------------------------------------------------------
@torch.no_grad()
def zero_head(model, layer, head):
    """Zero everything a query head owns: its q rows and its dense columns."""
    c, p = model.config, params_of(model)
    for kind in ("weight", "bias"):
        q, _, _ = split_qkv(p[f"layers.{layer}.attention.qkv.{kind}"], c)
        q[head] = 0
    p[f"layers.{layer}.attention.dense.weight"].view(c.hidden_size, -1, c.kv_channels)[
        :, head] = 0


@torch.no_grad()
def zero_group(model, layer, group):
    c, p = model.config, params_of(model)
    rep = c.num_attention_heads // c.multi_query_group_num
    for h in range(group * rep, (group + 1) * rep):
        zero_head(model, layer, h)
    for kind in ("weight", "bias"):
        _, k, v = split_qkv(p[f"layers.{layer}.attention.qkv.{kind}"], c)
        k[group] = 0
        v[group] = 0


@torch.no_grad()
def zero_qk_pair(model, layer, pair):
    """Zero a rotary pair of every query head and key group: its score share is 0."""
    c, p = model.config, params_of(model)
    for kind in ("weight", "bias"):
        q, k, _ = split_qkv(p[f"layers.{layer}.attention.qkv.{kind}"], c)
        q[:, 2 * pair:2 * pair + 2] = 0
        k[:, 2 * pair:2 * pair + 2] = 0


@torch.no_grad()
def zero_v_channel(model, layer, channel):
    c, p = model.config, params_of(model)
    for kind in ("weight", "bias"):
        _, _, v = split_qkv(p[f"layers.{layer}.attention.qkv.{kind}"], c)
        v[:, channel] = 0
    p[f"layers.{layer}.attention.dense.weight"].view(c.hidden_size, -1, c.kv_channels)[
        :, :, channel] = 0


@torch.no_grad()
def zero_neuron(model, layer, i):
    c, p = model.config, params_of(model)
    p[f"layers.{layer}.mlp.gate_up.weight"][[i, c.ffn_hidden_size + i]] = 0
    p[f"layers.{layer}.mlp.down.weight"][:, i] = 0


@torch.no_grad()
def zero_hidden(model, ch):
    """A residual channel nothing writes, reads or normalises."""
    for n, p in model.named_parameters():
        if n in ("embedding.weight", "output_layer.weight") or n.endswith(
                ("qkv.weight", "gate_up.weight")):
            p[:, ch] = 0
        elif n.endswith(("dense.weight", "down.weight", "norm.weight", "dense.bias",
                         "down.bias")):
            p[ch] = 0


@torch.no_grad()
def zero_layer(model, layer):
    """All of a block's weights zero: its attention and MLP add exactly 0 (identity)."""
    for n, p in model.named_parameters():
        if n.startswith(f"layers.{layer}."):
            p.zero_()


# ---- exactness -----------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["heads", "groups", "ffn", "hidden", "layers"])
def test_pruning_zero_structures_is_exact(what):
    model = build()
    c = model.config
    if what == "heads":              # one head in each GQA group, different per layer
        for layer in range(c.num_layers):
            zero_head(model, layer, layer % 2)
            zero_head(model, layer, 2 + (layer + 1) % 2)
        target = PruneTarget(num_attention_heads=2)
    elif what == "groups":
        for layer in range(c.num_layers):
            zero_group(model, layer, layer % 2)
        target = PruneTarget(num_attention_heads=2, multi_query_group_num=1)
    elif what == "ffn":
        for layer in range(c.num_layers):
            for i in range(layer, c.ffn_hidden_size, 3):
                zero_neuron(model, layer, i)
        # layer 0 loses 58 neurons, the others 57: keep 172 - 57 (one zero neuron stays)
        target = PruneTarget(ffn_hidden_size=c.ffn_hidden_size - 57)
    elif what == "hidden":
        for ch in (0, 5, 17, 40, 63):
            zero_hidden(model, ch)
        target = PruneTarget(hidden_size=59)
    else:
        zero_layer(model, 1)
        target = PruneTarget(num_layers=3)
    batch = make_batch()
    sel = select(magnitude_importance(model), c, target)
    pruned = prune_model(model, sel)
    assert pruned.num_params() < model.num_params()
    assert_exact(model, pruned, batch)
    if what == "layers":
        assert sel.layers == [0, 2, 3] and list(pruned.layers.keys()) == ["0", "1", "2"]
        assert [m.attention.layer_number for m in pruned.layers.values()] == [0, 1, 2]
    if what == "hidden":
        assert pruned.config.layernorm_epsilon == pytest.approx(c.layernorm_epsilon * 64 / 59)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_head_dim_pruning_keeps_rotary_exact(stride):
    """d=16 -> 8: two pairs per half stay, {0, s}; the rest are zero in q and k. Half the
    V channels (a different set per group) are zero too."""
    model = build()
    c = model.config
    keep = {0, stride}
    for layer in range(c.num_layers):
        for p in range(4):
            if p not in keep:
                zero_qk_pair(model, layer, p)       # position half
                zero_qk_pair(model, layer, p + 4)   # block-position half
        for ch in range(16):
            if (ch + layer) % 2:
                zero_v_channel(model, layer, ch)
    sel = select(magnitude_importance(model), c, PruneTarget(kv_channels=8))
    want = [2 * p + i for p in sorted(keep) for i in (0, 1)]
    assert sel.per_layer[0].qk_channels[0] == want + [8 + x for x in want]
    assert sel.rope_ratio == pytest.approx(exact_rope_ratio(c, 8, stride))
    assert sel.rope_ratio == pytest.approx(10000.0 ** (stride / 2) / 10000.0)
    pruned = prune_model(model, sel)
    batch = make_batch()
    assert_exact(model, pruned, batch)
    if stride == 2:
        # the even pairs of a head half as wide rotate exactly as before at the same base
        assert sel.rope_ratio == pytest.approx(c.rope_ratio)
    else:
        # control: these slices under the teacher's rope_ratio move the rotary frequencies
        sel.rope_ratio = c.rope_ratio
        wrong = prune_model(model, sel)
        assert (logits(wrong, batch) - logits(model, batch)).abs().max() > 1e-3


def test_everything_at_once_is_exact_and_valid():
    model = build()
    c = model.config
    zero_layer(model, 2)
    for layer in (0, 1, 3):
        zero_group(model, layer, 1)
        for p in (3, 7):
            zero_qk_pair(model, layer, p)
        for ch in range(12, 16):
            zero_v_channel(model, layer, ch)
        for i in range(100, c.ffn_hidden_size):
            zero_neuron(model, layer, i)
    for ch in range(48, 64):
        zero_hidden(model, ch)
    target = PruneTarget(num_layers=3, num_attention_heads=2, multi_query_group_num=1,
                         kv_channels=12, ffn_hidden_size=100, hidden_size=48)
    sel = select(magnitude_importance(model), c, target)
    pruned = prune_model(model, sel)
    p = pruned.config
    assert (p.num_layers, p.num_attention_heads, p.multi_query_group_num, p.kv_channels,
            p.ffn_hidden_size, p.hidden_size) == (3, 2, 1, 12, 100, 48)
    assert_exact(model, pruned, batch=make_batch())


# ---- GQA -----------------------------------------------------------------------------------
def test_gqa_heads_stay_with_their_kv_groups():
    model = build(num_attention_heads=8, multi_query_group_num=2, kv_channels=8)
    c = model.config
    imp = random_importance(c, seed=3)
    for target, rep2 in ((PruneTarget(num_attention_heads=4), 2),
                         (PruneTarget(num_attention_heads=4, multi_query_group_num=1), 4)):
        sel = select(imp, c, target)
        cfg2, state2 = prune_state_dict(model.state_dict(), c, sel)
        assert cfg2.num_attention_heads // cfg2.multi_query_group_num == rep2
        for i, layer in enumerate(sel.layers):
            ls = sel.per_layer[layer]
            # new head j reads new group j // rep2: its original head must read that group
            for j, h in enumerate(ls.heads):
                assert h // 4 == ls.groups[j // rep2]
            old = split_qkv(model.state_dict()[f"layers.{layer}.attention.qkv.weight"], c)
            new = split_qkv(state2[f"layers.{i}.attention.qkv.weight"], cfg2)
            for j, h in enumerate(ls.heads):
                torch.testing.assert_close(new[0][j], old[0][h])
            for n, g in enumerate(ls.groups):
                torch.testing.assert_close(new[1][n], old[1][g])
                torch.testing.assert_close(new[2][n], old[2][g])
    # a hand-made selection that files a head under another group is refused
    bad = full_selection(c)
    bad.per_layer[0].heads = [0, 1, 2, 4, 3, 5, 6, 7]
    with pytest.raises(ValueError, match="GQA groups must stay whole"):
        prune_state_dict(model.state_dict(), c, bad)


def test_free_rotary_rule_keeps_pairs_and_halves():
    model = build()
    c = model.config
    sel = select(random_importance(c, seed=1), c, PruneTarget(kv_channels=8), rotary="free")
    assert sel.rope_ratio == c.rope_ratio
    for ls in sel.per_layer.values():
        for ch in ls.qk_channels:
            assert all(ch[i] // 2 == ch[i + 1] // 2 and ch[i] % 2 == 0 for i in range(0, 8, 2))
            assert sum(x < 8 for x in ch) == 4      # equal halves
    assert prune_model(model, sel).config.kv_channels == 8


def test_target_validation_names_the_field():
    c = GLMConfig.preset("tiny")
    with pytest.raises(ValueError, match="kv_channels=10"):
        PruneTarget(kv_channels=10).resolve(c)
    with pytest.raises(ValueError, match="ffn_hidden_size=999 exceeds"):
        PruneTarget(ffn_hidden_size=999).resolve(c)
    with pytest.raises(ValueError, match="hidden_size=0"):
        PruneTarget(hidden_size=0)
    with pytest.raises(ValueError, match="heads per group"):
        PruneTarget(num_attention_heads=4, multi_query_group_num=1).resolve(c)
    with pytest.raises(ValueError, match="rotary"):
        select(random_importance(c), c, PruneTarget(), rotary="none")


# ---- shapes from budgets -----------------------------------------------------------------
def test_paper_rule_and_budget_search():
    small = GLMConfig.preset("small")
    t = paper_target(small, keep=0.5)
    assert (t.kv_channels, t.ffn_hidden_size) == (16, 344)
    s = GLMConfig.from_dict({**small.to_dict(), "kv_channels": 16, "ffn_hidden_size": 344})
    assert non_embedding_params(s) / non_embedding_params(small) == pytest.approx(0.5, abs=0.01)

    model = build()
    c = model.config
    for cfg in (c, s, GLMConfig.preset("tiny", add_bias_linear=True, add_qkv_bias=False)):
        with torch.device("meta"):
            assert non_embedding_params(cfg) == GLM(cfg).num_params(exclude_embeddings=True)
    batch = make_batch(b=1)
    state = {k: v.detach() for k, v in model.state_dict().items()}

    def loss(cfg, st):
        return calibration_loss(cfg, st, [batch])

    target, trace = search_target(c, state, magnitude_importance(model), 0.7, loss)
    assert trace[-1].params <= 0.7 * non_embedding_params(c) < trace[-2].params
    assert [s.params for s in trace] == sorted((s.params for s in trace), reverse=True)
    assert target.resolve(c).num_layers == c.num_layers   # width only unless asked
    assert {s.axis for s in trace[1:]} <= {"ffn", "head_dim", "heads", "groups", "hidden"}


# ---- checkpoints -------------------------------------------------------------------------
def test_pruned_checkpoint_reloads_with_the_same_loss_and_trains(tmp_path):
    model = build()
    c = model.config
    src = tmp_path / "teacher"
    # the tokenizer file must be the one tokenizer_sha256 names (a checkpoint whose
    # tokenizer.model is another is refused: tests/test_faults_checkpoint.py)
    tok_sha = hashlib.sha256(b"not really a tokenizer").hexdigest()
    meta = {"config": {"model": c.to_dict(), "train": {"steps": 1}}, "step": 7,
            "tokenizer_sha256": tok_sha}
    ckpt_lib.save_checkpoint(str(src), model.state_dict(), {}, meta)
    (src / "tokenizer.model").write_bytes(b"not really a tokenizer")
    teacher, ckpt = load_glm(str(src))
    for (n, p), (_, q) in zip(teacher.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n

    sel = select(random_importance(c, seed=2), c,
                 PruneTarget(num_layers=3, kv_channels=8, ffn_hidden_size=64, hidden_size=48))
    cfg2, state2 = prune_state_dict(teacher.state_dict(), c, sel)
    out = tmp_path / "student"
    save_student(str(out), cfg2, state2, ckpt, {"selection": sel.to_dict()})

    meta2 = json.load(open(out / "meta.json"))
    assert meta2["tokenizer_sha256"] == tok_sha and meta2["step"] == 0
    assert (out / "tokenizer.model").read_bytes() == b"not really a tokenizer"
    assert "tokenizer.model" in meta2["files"]
    assert meta2["pruning"]["selection"]["hidden"] == sel.hidden
    student, _ = load_glm(str(out))
    assert student.config == cfg2 and student.config.hidden_size == 48
    in_memory = prune_model(teacher, sel)
    batch = make_batch()
    kw = {k: batch[k] for k in ("position_ids", "block_position_ids", "prefix_lens", "labels")}
    with torch.no_grad():
        assert torch.equal(student(batch["input_ids"], **kw), in_memory(batch["input_ids"], **kw))

    # and it trains like any other checkpoint: the trainer's init_from path
    class Data:
        def get_batch(self, index, batch_size):
            return make_batch(b=batch_size, seed=index)
    run = build_run_config({"train": {"steps": 2, "micro_batch_size": 2, "seq_len": 24,
                                      "warmup_steps": 0, "eval_every": 0,
                                      "out_dir": str(tmp_path / "run"), "init_from": str(out)}})
    run.model = cfg2
    trainer = Trainer(run, Data(), tokenizer_sha256=tok_sha, log=lambda *_: None)
    hist = trainer.fit()
    assert all(math.isfinite(h.loss) for h in hist)
    assert os.path.isdir(trainer.save())


def test_bad_selection_leaves_existing_checkpoint_untouched(tmp_path):
    model = build()
    c = model.config
    ckpt_lib.save_checkpoint(str(tmp_path / "t"), model.state_dict(), {},
                             {"config": {"model": c.to_dict()}, "step": 0})
    _, ckpt = load_glm(str(tmp_path / "t"))
    out = tmp_path / "s"
    cfg2, state2 = prune_state_dict(model.state_dict(), c, full_selection(c))
    save_student(str(out), cfg2, state2, ckpt, {})
    before = (out / "meta.json").read_bytes()
    state2["embedding.weight"] = state2["embedding.weight"][:, :10]
    with pytest.raises(RuntimeError):
        save_student(str(out), cfg2, state2, ckpt, {})
    assert (out / "meta.json").read_bytes() == before
