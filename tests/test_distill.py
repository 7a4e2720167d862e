"""Distillation losses against plain references (values and gradients), the frozen
teacher, the loss inside the Trainer, and the same loss from a pipeline's last stage."""
import os

import pytest
import torch

from engine.compress.distill import DistillConfig, DistillLoss, distill_loss, make_projection
from engine.compress.importance import random_importance
from engine.compress.prune import PruneTarget, prune_model, select
from engine.config import build_run_config
from engine.trainer import Trainer, lm_loss
from test_prune import build, make_batch, zero_hidden


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
        t_logits, t_hidden = teacher.eval()(batch["input_ids"], **kw, return_hidden=True)
        s_logits, s_hidden = student.eval()(batch["input_ids"], **kw, return_hidden=True)
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
    with pytest.raises(ValueError, match="need a teacher"):
        DistillLoss(None, DistillConfig())


class Data:
    """The same batch every step: the loss must then fall."""
    def get_batch(self, index, batch_size):
        return make_batch(b=batch_size, seed=100)


def _trainer(tmp_path, student, loss_fn, aux=None, steps=3):
    run = build_run_config({"train": {"steps": steps, "micro_batch_size": 2, "seq_len": 24,
                                      "warmup_steps": 0, "eval_every": 0, "lr": 1e-2,
                                      "out_dir": str(tmp_path)}})
    run.model = student.config
    return Trainer(run, Data(), model=student, loss_fn=loss_fn, aux_modules=aux,
                   log=lambda *_: None)


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
    from engine import checkpoint as ckpt_lib
    names = ckpt_lib.Checkpoint(trainer.save()).names("model")
    assert "aux.proj.weight" in names and "embedding.weight" in names


# ---- the pipeline: the last stage computes the same loss -------------------------------
PP_STEPS = 2


def _pp_setup(tmp_dir):
    """Teacher = tiny seed 0 (rebuilt identically in every process); student = its
    pruned copy, saved as a checkpoint for the Trainer's init_from."""
    from engine import checkpoint as ckpt_lib
    teacher = build()
    c = teacher.config
    sel = select(random_importance(c, seed=0), c,
                 PruneTarget(num_layers=2, kv_channels=8, ffn_hidden_size=64, hidden_size=48))
    student = prune_model(teacher, sel)
    path = os.path.join(tmp_dir, "student")
    if not os.path.isdir(path):
        ckpt_lib.save_checkpoint(path, student.state_dict(), {},
                                 {"config": {"model": student.config.to_dict()}, "step": 0})
    run = build_run_config({"parallel": {"pp": 1}, "train": {
        "steps": PP_STEPS, "micro_batch_size": 2, "num_microbatches": 2, "seq_len": 24,
        "warmup_steps": 0, "eval_every": 0, "lr": 1e-2, "out_dir": os.path.join(tmp_dir, "o"),
        "init_from": path}})
    run.model = student.config
    return teacher, sel, run


def _pp_steps(trainer):
    out = []
    for _ in range(PP_STEPS):
        trainer.train_step()
        out.append({n: p.detach().clone() for n, p in trainer.named_trained_parameters()})
    return out, trainer.evaluate(Data(), 1)


def _pp_worker(rank, world, tmp_dir):
    from engine.compress.distill_run import distill_trainer
    from engine.parallel import ParallelDims, init_distributed
    teacher, sel, run = _pp_setup(tmp_dir)
    run.parallel.pp = 2
    state = init_distributed(ParallelDims(pp=2), timeout=60, num_layers=2)
    trainer, _ = distill_trainer(run, DistillConfig(), Data(), teacher=teacher if rank else None,
                                 kept_hidden=sel.hidden, state=state, log=lambda *a: None)
    return _pp_steps(trainer)


def test_pipeline_last_stage_computes_the_same_distillation(tmp_path):
    from dist import run_workers
    from engine.compress.distill_run import distill_trainer
    teacher, sel, run = _pp_setup(str(tmp_path))
    trainer, loss_fn = distill_trainer(run, DistillConfig(), Data(), teacher=teacher,
                                       kept_hidden=sel.hidden, log=lambda *a: None)
    ref_params, ref_eval = _pp_steps(trainer)
    # evaluation (no_grad) reports the student's own cross-entropy
    b = Data().get_batch(0, 2)
    ce = lm_loss(trainer.model, b, "cpu").item() / int((b["labels"] != -100).sum())
    assert ref_eval == pytest.approx(ce, rel=1e-6)
    stages = run_workers(_pp_worker, 2, str(tmp_path), timeout=120)
    merged = {**stages[0][0][-1], **stages[1][0][-1]}
    assert "aux.proj.weight" in stages[1][0][-1] and "aux.proj.weight" not in stages[0][0][-1]
    assert set(merged) == set(ref_params[-1])
    for n, p in ref_params[-1].items():
        torch.testing.assert_close(merged[n], p, rtol=1e-4, atol=1e-5, msg=n)
    assert stages[0][1] == pytest.approx(ref_eval, rel=1e-5)


def test_tensor_parallel_is_refused_with_a_clear_error(tmp_path):
    from types import SimpleNamespace

    from engine.compress.distill_run import distill_trainer
    run = build_run_config({"train": {"out_dir": str(tmp_path)}})
    state = SimpleNamespace(dims=SimpleNamespace(tp=2, pp=1))
    with pytest.raises(ValueError, match="parallel.tp > 1"):
        distill_trainer(run, DistillConfig(), Data(), teacher=build(), state=state)
