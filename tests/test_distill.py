"""Distillation losses against plain references (values and gradients), the frozen
teacher, the loss inside the Trainer, and parity: every tp / pp / sequence-parallel
layout, with the teacher split like the student or whole on the last stage, reproduces
the single-process distillation run (losses, grad norms, gradients, updated student and
projection weights, per-term logs on rank 0) while the teacher never changes."""
import os

import pytest
import torch

from engine.recipe.compress.distill import DistillConfig, DistillLoss, distill_loss, make_projection
from engine.recipe.compress.importance import random_importance
from engine.recipe.compress.prune import PruneTarget, prune_model, select
from engine.config import build_run_config
from engine.train.trainer import Trainer, count_tokens
from test_prune import build, make_batch, zero_hidden
from test_trainer_parity import MixedBatches, manual_steps


pytestmark = pytest.mark.usefixtures("single_thread")


def reference(s_logits, s_hidden, t_logits, t_hidden, labels, w, proj_w, cfg):
    """Token by token, in fp64, straight from the definitions."""
    total = torch.zeros((), dtype=torch.float64)
    b, s, _ = s_logits.shape
    T = cfg.temperature
    for i in range(b):
        for j in range(s):
            y = int(labels[i, j])
            if y == -100:
                continue
            z = s_logits[i, j].double()
            ce = -(z[y] - torch.logsumexp(z, 0))
            p_t = torch.softmax(t_logits[i, j].double() / T, 0)
            log_p_s = torch.log_softmax(z / T, 0)
            kl = T * T * (p_t * (torch.log(p_t) - log_p_s)).sum()
            diff = t_hidden[j, i].double() - proj_w.double() @ s_hidden[j, i].double()
            hid = 0.5 * (diff ** 2).sum() if cfg.hidden_loss == "sum_sq" else (diff ** 2).mean()
            total = total + w[0] * ce + w[1] * kl + w[2] * hid
    return total


@pytest.mark.parametrize("hidden_loss", ["sum_sq", "mse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_loss_and_gradients_match_the_reference(hidden_loss, temperature):
    g = torch.Generator().manual_seed(0)
    b, s, V, hs, ht = 2, 5, 11, 6, 8
    s_logits = torch.randn(b, s, V, generator=g, requires_grad=True)
    t_logits = torch.randn(b, s, V, generator=g)
    s_hidden = torch.randn(s, b, hs, generator=g, requires_grad=True)
    t_hidden = torch.randn(s, b, ht, generator=g)
    labels = torch.randint(0, V, (b, s), generator=g)
    labels[0, :2] = -100
    labels[1, 4] = -100
    proj = make_projection(hs, ht)
    cfg = DistillConfig(ce_weight=0.7, kl_weight=1.3, hidden_weight=0.4,
                        hidden_loss=hidden_loss, temperature=temperature)
    total, parts = distill_loss(s_logits, s_hidden, t_logits, t_hidden, labels, cfg, proj)
    total.backward()
    got = [s_logits.grad.clone(), s_hidden.grad.clone(), proj.weight.grad.clone()]

    leaves = [s_logits.detach().double().requires_grad_(),
              s_hidden.detach().double().requires_grad_(),
              proj.weight.detach().double().requires_grad_()]
    ref = reference(leaves[0], leaves[1], t_logits, t_hidden, labels, (0.7, 1.3, 0.4),
                    leaves[2], cfg)
    ref.backward()
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, r in zip(got, leaves):
        torch.testing.assert_close(a.double(), r.grad, rtol=1e-4, atol=1e-6)
    # each part alone, weights 1: the parts add up to the weighted total
    assert total.item() == pytest.approx(
        0.7 * parts["ce"].item() + 1.3 * parts["kl"].item() + 0.4 * parts["hidden"].item(),
        rel=1e-5)


def test_terms_vanish_when_student_equals_teacher():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g)
    hidden = torch.randn(4, 2, 5, generator=g)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    _, parts = distill_loss(logits, hidden, logits, hidden, labels, DistillConfig())
    assert abs(parts["kl"].item()) < 1e-6 and parts["hidden"].item() == 0.0
    assert parts["ce"].item() > 0


def test_projection_starts_as_the_pruned_channel_selection():
    teacher = build()
    for ch in range(48, 64):
        zero_hidden(teacher, ch)
    c = teacher.config
    sel = select(random_importance(c), c, PruneTarget(hidden_size=48))
    sel.hidden = list(range(48))  # exactly the channels that are not zero
    student = prune_model(teacher, sel)
    proj = make_projection(48, 64, sel.hidden)
    batch = make_batch()
    kw = {k: batch[k] for k in ("position_ids", "block_position_ids", "prefix_lens")}
    with torch.no_grad():
        t_hidden = teacher.eval().hidden(batch["input_ids"], **kw)
        s_hidden = student.eval().hidden(batch["input_ids"], **kw)
        t_logits, s_logits = teacher.logits(t_hidden), student.logits(s_hidden)
    _, parts = distill_loss(s_logits, s_hidden, t_logits, t_hidden, batch["labels"],
                            DistillConfig(hidden_loss="sum_sq"), proj)
    assert parts["hidden"].item() < 1e-8 and parts["kl"].item() < 1e-6
    with pytest.raises(ValueError, match="no projection"):
        distill_loss(s_logits, s_hidden, t_logits, t_hidden, batch["labels"], DistillConfig())


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="distill.temperature=0"):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="distill.kl_weight=-1"):
        DistillConfig(kl_weight=-1)
    with pytest.raises(ValueError, match="distill.hidden_loss='l1'"):
        DistillConfig(hidden_loss="l1")
    with pytest.raises(ValueError, match="all 0"):
        DistillConfig(ce_weight=0, kl_weight=0, hidden_weight=0)
    with pytest.raises(ValueError, match="distill.teacher_layout='stages'"):
        DistillConfig(teacher_layout="stages")
    with pytest.raises(ValueError, match="need a teacher"):
        DistillLoss(None, DistillConfig())(build(), make_batch(), "cpu")


def lm_loss(model, batch: dict, device) -> torch.Tensor:
    """Summed token cross-entropy of a whole model on one batch (what the Trainer's
    default glm_forward_step sums to on a single stage)."""
    keys = ("input_ids", "position_ids", "block_position_ids", "prefix_lens")
    inputs = {k: batch[k].to(device) for k in keys if k in batch}
    return model(**inputs, labels=batch["labels"].to(device)).sum()


class Data:
    """The same batch every step: the loss must then fall."""
    def get_batch(self, index, batch_size):
        return make_batch(b=batch_size, seed=100)


def _trainer(tmp_path, student, loss_fn, aux=None, steps=3):
    run = build_run_config({"train": {"steps": steps, "micro_batch_size": 2, "seq_len": 24,
                                      "warmup_steps": 0, "eval_every": 0, "lr": 1e-2,
                                      "out_dir": str(tmp_path)}})
    run.model = student.config
    return Trainer.from_config(run, Data(), model=student, forward_step=loss_fn.forward_step,
                               aux_modules=aux, log=lambda *_: None)


def test_ce_only_loss_is_the_trainers_lm_loss():
    model = build()
    batch = make_batch()
    ours = DistillLoss(None, DistillConfig(kl_weight=0, hidden_weight=0))(model, batch, "cpu")
    torch.testing.assert_close(ours, lm_loss(model, batch, "cpu"), rtol=1e-5, atol=1e-5)


def test_teacher_never_changes_while_the_student_learns(tmp_path):
    teacher = build()
    c = teacher.config
    sel = select(random_importance(c, seed=0), c,
                 PruneTarget(num_layers=2, kv_channels=8, ffn_hidden_size=64, hidden_size=48))
    student = prune_model(teacher, sel)
    proj = make_projection(48, 64, sel.hidden)
    frozen = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    s_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    p_before = proj.weight.detach().clone()
    loss_fn = DistillLoss(teacher, DistillConfig(hidden_loss="mse"), proj)
    trainer = _trainer(tmp_path, student, loss_fn, {"proj": proj})
    optimised = {id(p) for p in trainer.optimizer.params}
    assert not optimised & {id(p) for p in teacher.parameters()}
    hist = trainer.fit()
    assert hist[-1].loss < hist[0].loss
    for n, p in teacher.named_parameters():
        assert torch.equal(p, frozen[n]) and not p.requires_grad and p.grad is None, n
    assert not teacher.training
    assert any(not torch.equal(p, s_before[n]) for n, p in student.named_parameters())
    assert not torch.equal(proj.weight, p_before)
    stats = loss_fn.pop_stats()
    assert set(stats) == {"ce", "kl", "hidden"} and all(v >= 0 for v in stats.values())
    # the projection is saved beside the model as aux.proj.*
    from engine.train import checkpoint as ckpt_lib
    names = ckpt_lib.Checkpoint(trainer.save()).names("model")
    assert "aux.proj.weight" in names and "embedding.weight" in names


def test_a_teacher_that_cannot_be_split_gets_a_clear_error(tmp_path):
    """Config-only checks, so every rank fails alike before any collective."""
    from types import SimpleNamespace

    from engine.recipe.compress.distill_run import check_teacher, distill_trainer
    from model import GLMConfig

    def state(tp=1, pp=1, vpp=1):
        return SimpleNamespace(dims=SimpleNamespace(tp=tp, pp=pp, vpp=vpp))

    run = build_run_config({"train": {"out_dir": str(tmp_path)}})
    run.model = GLMConfig.preset("tiny")
    six_heads = GLMConfig.preset("tiny", num_attention_heads=6)
    same, last = DistillConfig(), DistillConfig(teacher_layout="last")
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by tp=4"):
        check_teacher(six_heads, run, same, state(tp=4))
    with pytest.raises(ValueError,
                       match=r"num_layers=4 is not divisible by pipeline stages pp\*vpp=3"):
        check_teacher(run.model, run, same, state(pp=3))
    check_teacher(six_heads, run, last, state(tp=4))       # "last" keeps it whole
    with pytest.raises(ValueError, match="teacher vocab 2048 != student vocab 1024"):
        check_teacher(GLMConfig.preset("tiny", padded_vocab_size=2048), run, last, state())
    with pytest.raises(ValueError, match="need a teacher"):
        distill_trainer(run, same, Data(), teacher=None)


# ---- the loss itself under tensor parallelism -----------------------------------------
def _tp_loss_inputs(labels_all_ignored=False):
    """Whole tensors: logits [b, s, V], hidden [s, b, h], labels [b, s], a projection."""
    g = torch.Generator().manual_seed(3)
    b, s, V, hs, ht = 2, 6, 12, 6, 8
    x = {k: torch.randn(*shape, generator=g) for k, shape in (
        ("s_logits", (b, s, V)), ("t_logits", (b, s, V)), ("s_hidden", (s, b, hs)),
        ("t_hidden", (s, b, ht)))}
    x["labels"] = torch.randint(0, V, (b, s), generator=g)
    x["labels"][0, :3] = -100
    x["labels"][1, 5] = -100
    if labels_all_ignored:
        x["labels"][:] = -100
    proj = make_projection(hs, ht)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(ht, hs, generator=g))
    return x, proj


TP_LOSS_CFG = DistillConfig(ce_weight=0.7, kl_weight=1.3, hidden_weight=0.4, temperature=2.0)


def _tp_loss(x, proj, tp=None):
    """distill_loss on this rank's pieces; -> (total, parts, grads of the pieces)."""
    cut = (lambda t, dim: t) if tp is None else (lambda t, dim: (
        tp.vocab(t) if dim == -1 else tp.sequence(t, dim)))
    s_logits = cut(x["s_logits"], -1).clone().requires_grad_()
    s_hidden = cut(x["s_hidden"], 0).clone().requires_grad_()
    total, parts = distill_loss(s_logits, s_hidden, cut(x["t_logits"], -1),
                                cut(x["t_hidden"], 0), x["labels"], TP_LOSS_CFG, proj, tp=tp)
    total.backward()
    return total.item(), {k: v.item() for k, v in parts.items()}, s_logits.grad, \
        s_hidden.grad, proj.weight.grad


def _tp_loss_worker(rank, world):
    import torch.distributed as dist

    from engine.recipe.compress.distill import TPShards
    from engine.tensor_parallel.mappings import all_reduce_grad_hook
    out = {}
    for sp in (False, True):
        for empty in (False, True):
            x, proj = _tp_loss_inputs(empty)
            if sp:   # as distill_run does: each rank's hidden term covers its own rows
                proj.weight.register_hook(all_reduce_grad_hook(dist.group.WORLD))
            out[sp, empty] = _tp_loss(x, proj, TPShards(dist.group.WORLD, rank, world, sp))
    return out


def test_vocab_parallel_kl_and_sequence_parallel_hidden_term_match_one_process():
    """tp=2, with and without sequence parallelism: the same replicated loss and parts on
    every rank, each rank's gradient the matching piece of the one-process gradient (not
    tp times it), the projection's gradient whole on both; no label at all: zeros."""
    from dist import run_workers
    ranks = run_workers(_tp_loss_worker, 2, timeout=60)
    for empty in (False, True):
        x, proj = _tp_loss_inputs(empty)
        total, parts, g_logits, g_hidden, g_proj = _tp_loss(x, proj)
        for r, out in enumerate(ranks):
            for sp in (False, True):
                t, p, gl, gh, gp = out[sp, empty]
                assert t == pytest.approx(total, rel=1e-6, abs=1e-7), (r, sp, empty)
                assert p == pytest.approx(parts, rel=1e-6, abs=1e-7), (r, sp, empty)
                torch.testing.assert_close(gl, g_logits.chunk(2, -1)[r], rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(gh, g_hidden.chunk(2, 0)[r] if sp else g_hidden,
                                           rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(gp, g_proj, rtol=1e-5, atol=1e-7)
        if empty:
            assert total == 0.0


# ---- parity: every layout reproduces the single-process distillation -------------------
KD_STEPS, KD_MB, KD_SEQ = 2, 4, 24     # steps; microbatches per step over the whole job
KD = DistillConfig(temperature=2.0)    # CE, KL (T = 2) and hidden MSE all weighted in


def _kd_setup(tmp_dir, tp=1, pp=1, dp=1, sp=False, layout="same", layers=2,
              schedule="1f1b"):
    """Teacher: tiny (4 layers, hidden 64, seed 0); student: its pruned copy (`layers`
    layers, 2 by default; zb-v needs them divisible by 2 * pp; hidden 48, so the
    projection is trained). Both are checkpoints (the first caller writes them); the
    Trainer loads the student's stages by name (init_from)."""
    from engine.train import checkpoint as ckpt_lib
    teacher = build()
    c = teacher.config
    sel = select(random_importance(c, seed=0), c,
                 PruneTarget(num_layers=layers, kv_channels=8, ffn_hidden_size=64,
                             hidden_size=48))
    student = prune_model(teacher, sel)
    paths = {n: os.path.join(tmp_dir, n) for n in ("teacher", "student")}
    for name, model in (("teacher", teacher), ("student", student)):
        if not os.path.isdir(paths[name]):
            ckpt_lib.save_checkpoint(paths[name], model.state_dict(), {},
                                     {"config": {"model": model.config.to_dict()}, "step": 0})
    run = build_run_config({
        "parallel": {"tp": tp, "pp": pp, "dp": dp, "sequence_parallel": sp,
                     "vpp": 2 if schedule == "zb-v" else 1, "schedule": schedule},
        "train": {"steps": KD_STEPS, "micro_batch_size": 2, "num_microbatches": KD_MB // dp,
                  "seq_len": KD_SEQ, "warmup_steps": 0, "lr": 3e-3, "grad_clip": 0.5,
                  "eps": 1e-4, "eval_every": 0, "out_dir": os.path.join(tmp_dir, f"out-{schedule}-{layout}"),
                  "init_from": paths["student"]}})
    run.model = student.config
    dcfg = DistillConfig(**{**KD.to_dict(), "teacher_layout": layout})
    # "last" takes the teacher from memory, "same" from its checkpoint: both sources
    return (teacher if layout == "last" else paths["teacher"]), paths["teacher"], dcfg, \
        run, sel.hidden


def _kd_steps(tr, gather):
    """Each step by hand (manual_steps) plus the per-term means the log line gets (the
    Trainer's hook), then the dev loss."""
    out = manual_steps(tr, KD_STEPS, gather, extra=lambda t: t.log_terms())
    return out, tr.evaluate(MixedBatches(), 2)


def _teacher_unchanged(loss_fn, t_path) -> bool:
    """This rank's teacher parameters (gathered to full shape when TP-sharded) equal the
    checkpoint's, are frozen and in eval mode."""
    from engine.train import checkpoint as ckpt_lib
    from engine.tensor_parallel import gather_full_tensors
    t = loss_fn.teacher
    if t is None:
        return True
    modules = t.chunks if hasattr(t, "chunks") else [t.model]
    ckpt = ckpt_lib.Checkpoint(t_path)
    for m in modules:
        named = list(m.named_parameters())
        if m.training or any(p.requires_grad or p.grad is not None for _, p in named):
            return False
        group = getattr(m, "tp_group", None)
        full = (gather_full_tensors(named, m.config, group) if group is not None
                else {n: p.detach() for n, p in named})
        ref = ckpt.load("model", list(full))
        if not all(torch.equal(full[n], ref[n]) for n in full):
            return False
    return True


def _kd_worker(rank, world, tmp_dir, layout):
    from engine.recipe.compress.distill_run import distill_trainer
    from engine.parallel.state import ParallelDims, init_distributed
    from engine.tensor_parallel import gather_full_tensors
    teacher, t_path, dcfg, run, kept = _kd_setup(tmp_dir, **layout)
    pc = run.parallel
    state = init_distributed(ParallelDims(tp=pc.tp, pp=pc.pp, dp=pc.dp), timeout=90,
                             num_layers=run.model.num_layers)
    tr, loss_fn = distill_trainer(run, dcfg, MixedBatches(), teacher=teacher,
                                  kept_hidden=kept, state=state, log=lambda *a: None)

    def gather(named):
        if pc.tp == 1:
            return {n: t.detach().clone() for n, t in named}
        # the projection is replicated: each TP rank's own copy is compared
        out = gather_full_tensors([(n, t) for n, t in named if not n.startswith("aux.")],
                                  run.model, state.tp_group)
        out.update({n: t.detach().clone() for n, t in named if n.startswith("aux.")})
        return out

    steps, dev = _kd_steps(tr, gather)
    return steps, dev, _teacher_unchanged(loss_fn, t_path)


@pytest.fixture(scope="module")
def kd_reference(tmp_path_factory):
    from engine.recipe.compress.distill_run import distill_trainer
    tmp = str(tmp_path_factory.mktemp("kd"))
    teacher, t_path, dcfg, run, kept = _kd_setup(tmp)
    tr, loss_fn = distill_trainer(run, dcfg, MixedBatches(), teacher=teacher, kept_hidden=kept,
                                  log=lambda *a: None)
    steps, dev = _kd_steps(tr, lambda named: {n: t.detach().clone() for n, t in named})
    # evaluation (no_grad) reports the student's own per-token cross-entropy
    batches = [MixedBatches().get_batch(i, 2) for i in range(2)]
    ce = sum(lm_loss(tr.model, b, "cpu").item() for b in batches) / count_tokens(batches)
    assert dev == pytest.approx(ce, rel=1e-6)
    assert _teacher_unchanged(loss_fn, t_path)
    return tmp, steps, dev


# "same" unless named "last". pp2-dp2-last: rank 0 is not on the last stage and the
# per-term logs must add the two replicas; tp2-pp2-sp: the teacher's activations cross
# the pipeline as sequence shards
KD_LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2-sp": dict(tp=2, sp=True),
    "tp2-sp-last": dict(tp=2, sp=True, layout="last"),
    "pp2": dict(pp=2),
    "pp2-dp2-last": dict(pp=2, dp=2, layout="last"),
    "tp2-pp2-sp": dict(tp=2, pp=2, sp=True),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    # relative to the tensor's scale: elementwise relative error means nothing for
    # elements that are ~0 by cancellation (as in test_trainer_parity._close)
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("name", list(KD_LAYOUTS))
def test_distillation_layout_matches_single_process(name, kd_reference):
    from dist import run_workers
    tmp, ref, ref_dev = kd_reference
    layout = KD_LAYOUTS[name]
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1)
    ranks = run_workers(_kd_worker, world, tmp, layout, timeout=240, pg_timeout=120)
    worst, seen = 0.0, set()
    for r, (steps, dev, teacher_ok) in enumerate(ranks):
        assert teacher_ok, f"{name} rank {r}: the teacher changed or is not frozen"
        for t, ((loss, norm, grads, params, terms), (rl, rn, rg, rp, rt)) in enumerate(
                zip(steps, ref)):
            where = f"{name} rank {r} step {t}"
            errs = {"loss": abs(loss - rl) / abs(rl), "grad norm": abs(norm - rn) / rn}
            # every rank (rank 0 included, whatever its stage) logs the job's terms
            assert set(terms) == set(rt) == {"ce", "kl", "hidden"}, (where, terms)
            errs.update({f"log {k}": abs(terms[k] - rt[k]) / abs(rt[k]) for k in rt})
            for n in grads:
                assert grads[n].shape == rg[n].shape, (where, n, grads[n].shape)
                errs[f"grad {n}"] = _rel(grads[n], rg[n])
                errs[f"param {n}"] = _rel(params[n], rp[n])
            bad = {k: v for k, v in errs.items() if v > 1e-5}
            assert not bad, f"{where}: relative errors above 1e-5: {bad}"
            worst = max(worst, *errs.values())
            seen |= set(grads)
        assert abs(dev - ref_dev) <= 1e-5 * ref_dev, (name, r, dev, ref_dev)
    assert seen == set(ref[0][2])   # the ranks together cover every parameter
    print(f"\n{name}: worst relative error {worst:.2e}")   # shown with pytest -s


def test_student_recompute_matches_single_process(kd_reference):
    """train.recompute checkpoints the student's layers (the Trainer's chunks) and not
    the frozen teacher's, which runs without grad; the run is the same, exactly."""
    import dataclasses

    from engine.recipe.compress.distill_run import distill_trainer
    tmp, ref, ref_dev = kd_reference
    teacher, t_path, dcfg, run, kept = _kd_setup(tmp)
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, recompute=True))
    tr, loss_fn = distill_trainer(run, dcfg, MixedBatches(), teacher=teacher, kept_hidden=kept,
                                  log=lambda *a: None)
    assert all(b.recompute for b in tr.model.layers.values())
    t = loss_fn.teacher
    for m in (t.chunks if hasattr(t, "chunks") else [t.model]):
        assert not any(getattr(b, "recompute", False) for b in m.layers.values())
    steps, dev = _kd_steps(tr, lambda named: {n: t.detach().clone() for n, t in named})
    for (loss, norm, grads, params, terms), (rl, rn, rg, rp, rt) in zip(steps, ref):
        assert (loss, norm, terms) == (rl, rn, rt)
        assert all(torch.equal(grads[n], rg[n]) and torch.equal(params[n], rp[n]) for n in rg)
    assert dev == ref_dev and _teacher_unchanged(loss_fn, t_path)
