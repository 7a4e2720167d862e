"""Hybrid fine-tuning and continued distillation (engine/recipe/finetune.py): Eq. 11-13."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import RunConfig, TrainConfig
from engine.recipe.data.datasets import TranslationDataset
from engine.recipe.finetune import (FinetuneConfig, HybridLoss, MixedDataset, hybrid_loss,
                             mixing_alpha)
from engine.pipeline.p2p import Side
from model import GLM, GLMConfig
from model.tokenizer import SpecialIds

IDS = SpecialIds()


def _pairs(n, seed=0, vocab=1024):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(2, 6, (2,), generator=g))
        out.append((torch.randint(16, vocab, (a,), generator=g).tolist(),
                    torch.randint(16, vocab, (b,), generator=g).tolist()))
    return out


def _tasks(n=50, seq_len=16):
    pairs = _pairs(n)
    return (TranslationDataset(pairs, IDS, seq_len, direction="en-zh", seed=1),
            TranslationDataset(pairs, IDS, seq_len, direction="zh-en", seed=2))


# ---- Eq. 11 ---------------------------------------------------------------------------

def test_eq11_alpha_hand_worked():
    # 2*300 / (2*300 + 1*100) = 600 / 700
    assert mixing_alpha(2.0, 300, 1.0, 100) == pytest.approx(6 / 7)
    assert mixing_alpha(1.0, 39451, 1.0, 39451) == pytest.approx(0.5)
    assert mixing_alpha(0.5, 10, 1.0, 0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="w_s"):
        mixing_alpha(-1.0, 10, 1.0, 10)
    with pytest.raises(ValueError, match="> 0"):
        mixing_alpha(0.0, 10, 0.0, 10)


def test_strategy_alpha_and_config_errors():
    assert FinetuneConfig(strategy="source").resolve_alpha(10, 30) == 1.0
    assert FinetuneConfig(strategy="target").resolve_alpha(10, 30) == 0.0
    assert FinetuneConfig(alpha=0.65).resolve_alpha(10, 30) == 0.65
    # alpha < 0: Eq. 11 from weights and sizes: 3*10 / (3*10 + 1*30) = 0.5
    assert FinetuneConfig(alpha=-1, w_s=3, w_d=1).resolve_alpha(10, 30) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="finetune.strategy"):
        FinetuneConfig(strategy="both")
    with pytest.raises(ValueError, match="finetune.lam"):
        FinetuneConfig(lam=1.5)
    with pytest.raises(ValueError, match="finetune.mixing"):
        FinetuneConfig(mixing="sum")
    with pytest.raises(ValueError, match="finetune.teacher_layout"):
        FinetuneConfig(teacher_layout="middle")
    # the student stage's distillation carries the layout through
    assert FinetuneConfig(teacher_layout="last").distill_config().teacher_layout == "last"


# ---- Eq. 12 ---------------------------------------------------------------------------

def test_eq12_hand_worked():
    # 0.25 * 2 + 0.75 * 4 = 3.5
    assert float(hybrid_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25)) == pytest.approx(3.5)


class _FixedLossChunk:
    """A last pipeline stage whose per-token loss is 2 on D_s rows and 4 on D_d rows."""
    pre_process = post_process = True

    def __call__(self, input_ids, labels=None, **kw):
        task = self.task.float()[:, None]
        per_token = 4.0 - 2.0 * task                                   # [b, 1]
        return per_token.expand_as(labels) * (labels != -100)


@pytest.mark.parametrize("mixing, p, w_s, w_d", [("sample", 0.65, 1.0, 1.0),
                                                 ("weight", 0.5, 1.3, 0.7)])
def test_eq12_weights_not_double_counted(mixing, p, w_s, w_d):
    cfg = FinetuneConfig(alpha=0.65, mixing=mixing)
    alpha = cfg.resolve_alpha(1, 1)
    assert cfg.sample_prob(alpha) == p
    loss = HybridLoss(alpha, cfg.sample_prob(alpha))
    # sampling by alpha -> unit weights; balanced sampling -> alpha / p, (1-alpha) / (1-p)
    assert (loss.w_source, loss.w_target) == pytest.approx((w_s, w_d))
    # a batch in the sampler's proportions: the token-mean loss is Eq. 12's
    # 0.65 * 2 + 0.35 * 4 = 2.7 exactly
    n_s = round(p * 20)
    task = torch.tensor([1] * n_s + [0] * (20 - n_s))
    labels = torch.full((20, 6), 5)
    labels[:, :2] = -100                                               # 4 label tokens each
    batch = {"input_ids": torch.zeros(20, 6, dtype=torch.long), "labels": labels,
             "task": task}
    chunk = _FixedLossChunk()
    chunk.task = task
    out = loss.forward_step(chunk, batch, None, Side.from_batch(batch, "cpu"))
    assert out.shape == (20, 6)
    assert float(out.sum() / (labels != -100).sum()) == pytest.approx(
        float(hybrid_loss(torch.tensor(2.0), torch.tensor(4.0), 0.65)))


def test_eq12_on_the_model_matches_manual_weighting():
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    d_s, d_d = _tasks()
    data = MixedDataset(d_s, d_d, p=0.5, seed=3)
    batch = data.get_batch(0, 8)
    assert 0 < int(batch["task"].sum()) < 8
    loss = HybridLoss(alpha=0.8, p=0.5)
    out = loss.forward_step(model, batch, None, Side.from_batch(batch, "cpu"))
    ref = model(batch["input_ids"], position_ids=batch["position_ids"],
                block_position_ids=batch["block_position_ids"],
                prefix_lens=batch["prefix_lens"], labels=batch["labels"])   # [b, s]
    w = torch.where(batch["task"].bool(), 0.8 / 0.5, 0.2 / 0.5)
    torch.testing.assert_close(out, ref * w[:, None])


# ---- the mixed sampler ------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.65, 0.2])
def test_sampler_proportion_within_4_sigma(p):
    d_s, d_d = _tasks()
    data = MixedDataset(d_s, d_d, p=p, seed=11)
    n = 4000
    hits = sum(data.is_source(j) for j in range(n))
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) < 4 * sigma, (hits / n, p)


def test_sampler_is_pure_function_of_seed_and_index():
    d_s, d_d = _tasks()
    a = MixedDataset(d_s, d_d, p=0.65, seed=5).get_batch(7, 6)
    b = MixedDataset(*_tasks(), p=0.65, seed=5).get_batch(7, 6)
    c = MixedDataset(d_s, d_d, p=0.65, seed=6).get_batch(7, 6)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # rows really come from the task they are labelled with: <en> vs <zh> tag first
    tags = a["input_ids"][:, 0]
    assert torch.equal(tags == IDS.en, a["task"].bool())
    # the extremes use one task only
    assert int(MixedDataset(d_s, d_d, p=1.0).get_batch(0, 8)["task"].sum()) == 8
    assert int(MixedDataset(d_s, d_d, p=0.0).get_batch(0, 8)["task"].sum()) == 0


# ---- Eq. 13 -------------------------------------------------------------------------------

def _eq13_reference(s_logits, t_logits, labels, lam, T):
    """lambda * T^2 * sum_tokens sum_v p_t (log p_t - log p_s) + (1 - lambda) * CE, by hand."""
    total = s_logits.new_zeros(())
    for b in range(labels.shape[0]):
        for s in range(labels.shape[1]):
            y = int(labels[b, s])
            if y == -100:
                continue
            zs, zt = s_logits[b, s] / T, t_logits[b, s] / T
            ps = torch.exp(zs - zs.max()) / torch.exp(zs - zs.max()).sum()
            pt = torch.exp(zt - zt.max()) / torch.exp(zt - zt.max()).sum()
            kl = (pt * (torch.log(pt) - torch.log(ps))).sum() * T * T
            full = torch.exp(s_logits[b, s] - s_logits[b, s].max())
            ce = -torch.log(full[y] / full.sum())
            total = total + lam * kl + (1 - lam) * ce
    return total


@pytest.mark.parametrize("lam, T", [(0.65, 1.0), (0.3, 2.0)])
def test_eq13_loss_and_gradient_against_reference(lam, T):
    from engine.recipe.compress.distill import distill_loss
    g = torch.Generator().manual_seed(0)
    b, s, V = 2, 5, 11
    s_logits = torch.randn(b, s, V, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(b, s, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (b, s), generator=g)
    labels[0, :2] = -100
    labels[1, 4] = -100
    cfg = FinetuneConfig(lam=lam, temperature=T).distill_config()
    assert (cfg.kl_weight, cfg.ce_weight, cfg.hidden_weight) == pytest.approx((lam, 1 - lam, 0))
    got, parts = distill_loss(s_logits, None, t_logits, None, labels, cfg)
    ref = _eq13_reference(s_logits, t_logits, labels, lam, T)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, s_logits)
    (g_ref,) = torch.autograd.grad(ref, s_logits)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-5, atol=1e-6)
    # the teacher term's gradient is the soft-target cross-entropy's (KL = soft CE - H(p_t))
    mask = labels != -100
    soft_ce = -(F.softmax(t_logits[mask] / T, -1) * F.log_softmax(s_logits[mask] / T, -1)).sum()
    (g_soft,) = torch.autograd.grad(lam * T * T * soft_ce, s_logits)
    ce = F.cross_entropy(s_logits[mask], labels[mask], reduction="sum")
    (g_ce,) = torch.autograd.grad((1 - lam) * ce, s_logits)
    torch.testing.assert_close(g_got.double(), g_soft + g_ce, rtol=1e-5, atol=1e-6)
    # no gradient leaks to masked positions
    assert g_got[0, :2].abs().max() == 0


def test_teacher_frozen_during_student_distillation(tmp_path):
    from engine.recipe.compress.distill_run import distill_trainer
    teacher = GLM.build(GLMConfig.preset("tiny"), seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, d_d = _tasks(seq_len=16)
    cfg = RunConfig(model=GLMConfig.preset("tiny"),
                    train=TrainConfig(steps=2, micro_batch_size=4, seq_len=16, lr=1e-2,
                                      warmup_steps=0, eval_every=0, log_every=1,
                                      out_dir=str(tmp_path)))
    fcfg = FinetuneConfig(lam=0.65)
    trainer, _ = distill_trainer(cfg, fcfg.distill_config(), d_d, None, teacher=teacher,
                                 log=lambda *a: None)
    student_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hist = trainer.fit()
    assert len(hist) == 2 and all(math.isfinite(h.loss) for h in hist)
    # both Eq. 13 terms were live: their per-token means reach each logged step's record
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(records) == 2 and all(r["kl"] > 0 and r["ce"] > 0 for r in records)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    changed = [k for k, v in trainer.model.state_dict().items()
               if not torch.equal(v, student_before[k])]
    assert changed, "the student did not train"


# ---- packed rows (data.pack) ----------------------------------------------------------

def _packed_mixture(p=0.5, seed=3, window=16):
    d_s, d_d = _tasks(seq_len=32)
    return MixedDataset(d_s, d_d, p=p, seed=seed, pack=True, pack_window=window)


def test_packed_mixture_uses_each_stream_example_once_in_its_task():
    data = _packed_mixture(window=16)
    rows, r = [], 0
    while sum(len(x) for x in rows) < 48:                   # three windows of 16
        rows.append(data.packed_row(r))
        r += 1
    # the stream's examples, in windows, each once: the row layout is a pure function of
    # (seed, row), so a fresh dataset asked for a late row first rebuilds the same row
    fresh = _packed_mixture(window=16).packed_row(r - 1)
    assert [ex.input_ids for ex, _ in fresh] == [ex.input_ids for ex, _ in rows[-1]]
    flat = [(ex, f) for row in rows for ex, f in row]
    assert len(flat) == 48 and len(rows) < 48 / 2           # several examples per row
    unpacked = [(data._task(j).example(j), data.is_source(j)) for j in range(48)]
    key = sorted((tuple(ex.input_ids), f) for ex, f in flat)
    assert key == sorted((tuple(ex.input_ids), f) for ex, f in unpacked)
    # each example sits in the task it is labelled with (<en> first for D_s)
    assert all((ex.input_ids[0] == IDS.en) == f for ex, f in flat)
    # "task" per token: each example's tokens carry its flag, the pads 0
    batch = data.get_batch(0, 3)
    assert batch["task"].shape == batch["input_ids"].shape == (3, 32)
    for r in range(3):
        at = 0
        for ex, f in data.packed_row(r):
            n = len(ex.input_ids)
            assert batch["task"][r, at:at + n].tolist() == [int(f)] * n
            assert int(batch["doc_starts"][r, at]) == at
            at += n
        assert int(batch["task"][r, at:].sum()) == 0


def _hybrid_loss_and_grads(model, loss, batch):
    out = loss.forward_step(model, batch, None, Side.from_batch(batch, "cpu"))
    total = out.sum() / (batch["labels"] != -100).sum()
    model.zero_grad()
    total.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_hybrid_loss_and_grads_equal_unpacked():
    from model.masks import collate
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    data = _packed_mixture(p=0.5, window=32)
    rows = [data.packed_row(r) for r in range(3)]
    flat = [(ex, f) for row in rows for ex, f in row]
    assert len(flat) > 3 and 0 < sum(f for _, f in flat) < len(flat)    # both tasks
    packed = data.get_batch(0, 3)
    alone = collate([ex for ex, _ in flat], 32, data.pad)
    alone["task"] = torch.tensor([int(f) for _, f in flat])
    # unequal task weights (alpha 0.8 at p 0.5: 1.6 and 0.4), so a token credited to the
    # wrong example's task changes the loss
    loss = HybridLoss(alpha=0.8, p=0.5)
    out_p, grads_p = _hybrid_loss_and_grads(model, loss, packed)
    out_u, grads_u = _hybrid_loss_and_grads(model, loss, alone)
    sel_p = out_p[packed["labels"] != -100]
    sel_u = out_u[alone["labels"] != -100]
    assert sel_p.numel() == sel_u.numel() > 0
    torch.testing.assert_close(sel_p, sel_u, rtol=0, atol=2e-5)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=0, atol=2e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_packed_student_distillation_equals_unpacked():
    from engine.recipe.compress.distill import DistillLoss
    from model.masks import collate
    teacher = GLM.build(GLMConfig.preset("tiny"), seed=1).eval()
    student = GLM.build(GLMConfig.preset("tiny"), seed=0)
    _, d_d = _tasks(seq_len=32)
    d_d.pack = True
    packed = d_d.get_batch(0, 2)
    alone = collate([ex for r in range(2) for ex in d_d.packed_row(r)], 32, IDS.pad)
    assert alone["input_ids"].shape[0] > 2
    loss = DistillLoss(teacher, FinetuneConfig(lam=0.65).distill_config())
    grads = []
    for batch in (packed, alone):
        total = loss(student, batch, "cpu").sum() / (batch["labels"] != -100).sum()
        student.zero_grad()
        total.backward()
        grads.append((total.detach(), {n: p.grad.clone() for n, p in
                                       student.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=2e-6)
    for name, g in grads[1][1].items():
        torch.testing.assert_close(grads[0][1][name], g, rtol=0, atol=2e-6,
                                   msg=lambda m: f"{name}: {m}")
