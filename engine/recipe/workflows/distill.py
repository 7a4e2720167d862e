r"""Knowledge distillation: train a (pruned) student against a frozen teacher, through the
same Trainer as pretraining, on the pretraining data (both languages) by default.

    python runners/distill.py --distill.teacher runs/teacher/checkpoint \
        --distill.student runs/student/pruned --config configs/demo_distill.json \
        --data.dir data --train.out_dir runs/student/kd
    # the baseline: the same student shape from a random init, plain cross-entropy
    python runners/distill.py --distill.student runs/student/pruned \
        --distill.from_scratch true --config configs/demo_distill.json \
        --distill.kl_weight 0 --distill.hidden_weight 0 --train.out_dir runs/student/scratch

The config has the run sections of runners/pretrain.py (train, data, parallel) plus
"distill" (the loss terms of engine/recipe/compress/distill.py: DistillConfig, and the
teacher / student checkpoints). There is no "model" section: the student's shape is its
checkpoint's. Loss terms (ce, kl, hidden) are logged per label token of the whole job
next to the total, and written to metrics.jsonl. Any tp x pp x dp layout the engine
supports runs under torchrun, sequence parallelism included:

    torchrun --nproc_per_node 4 runners/distill.py ... --parallel.tp 2 --parallel.pp 2

--distill.teacher_layout chooses where the frozen teacher runs:
  same  (default) split like the student: its stage s on the ranks of the student's
        stage s, TP-sharded alike, run forward-only over each step's microbatches; no
        rank holds the whole teacher. Needs its layers to fit
        parallel.layer_split (even: divisible by pp*vpp) and its heads / FFN by tp.
  last  whole on each last-stage rank: any teacher shape, but its memory and compute
        all land on the last stage."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

from engine.config import DataConfig, ParallelConfig, RunConfig, TrainConfig
from engine.config_cli import Alias, Command, build_section
from engine.recipe.compress.distill import DistillConfig


@dataclass
class DistillJob(DistillConfig):
    """The loss terms (DistillConfig) and the checkpoints a distillation run starts from."""
    teacher: str = ""              # teacher checkpoint (needed unless kl and hidden weights are 0)
    student: str = ""              # student checkpoint (runners/prune.py output, or any GLM)
    from_scratch: bool = False     # random-init the student's shape instead of its weights

    def loss_config(self) -> DistillConfig:
        return DistillConfig(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(DistillConfig)})


@dataclass
class DistillRun:
    run: RunConfig
    job: DistillJob

    def to_dict(self) -> dict:
        d = self.run.to_dict()
        d.pop("model")
        return {**d, "distill": dataclasses.asdict(self.job)}


def build(base: dict, overrides: dict) -> DistillRun:
    from engine.config import build_run_config, pop_section
    base, overrides, job = pop_section(base, overrides, "distill")
    if "model" in base or "model" in overrides:
        raise ValueError("distill runs take the student's shape from --distill.student; "
                         "drop the model section / --model.* overrides")
    job = build_section(DistillJob, "distill", job)
    if not job.student:
        raise ValueError("distill.student is required (the student checkpoint)")
    cfg = build_run_config(base, overrides)
    if cfg.train.init_from:
        raise ValueError("train.init_from is not used here: the student comes from "
                         "--distill.student")
    if job.needs_teacher and not job.teacher:
        raise ValueError("--distill.teacher is required when distill.kl_weight or "
                         "distill.hidden_weight is > 0")
    return DistillRun(cfg, job)


FLAGS = {"--resume": "continue from the newest complete checkpoint in <train.out_dir>",
         "--force": "start over in an out_dir that holds checkpoints"}
COMMAND = Command(__doc__, {"train": TrainConfig, "data": DataConfig,
                            "parallel": ParallelConfig, "distill": DistillJob},
                  build, flags=FLAGS, refused_sections=("model",),
                  aliases={"--teacher": Alias("distill.teacher"),
                           "--student": Alias("distill.student"),
                           "--from-scratch": Alias("distill.from_scratch", switch=True)})


def _flushed(log, message: str) -> None:
    log(message)
    sys.stdout.flush()     # torchrun interleaves ranks' output: each line whole and now


def train_tokens(meta: dict) -> int | None:
    """Tokens (positions) a checkpoint's own training run consumed, from its meta.json."""
    try:
        t = meta["config"]["train"]
        dp = max(1, int(meta.get("layout", {}).get("dp", 1)))
        return int(meta["step"]) * t["num_microbatches"] * t["micro_batch_size"] * t["seq_len"] * dp
    except (KeyError, TypeError):
        return None


def run(config: DistillRun, resume: bool = False, force: bool = False, log=print) -> str:
    """Distil config.job.student from config.job.teacher -> the final checkpoint's path."""
    import torch

    from engine.recipe.compress.distill_run import distill_trainer, teacher_weights
    from engine.recipe.data.loaders import make_datasets
    from engine.recipe.evaluate import dev_loss
    from engine.train import checkpoint as ckpt_lib
    from engine.train.lifecycle import open_run, tokenizer_files
    from engine.train.metrics import params_line
    from model import GLM, GLMConfig

    cfg, job = config.run, config.job
    dcfg = job.loss_config()
    s_ckpt = ckpt_lib.Checkpoint(job.student)
    cfg.model = GLMConfig.from_dict(s_ckpt.meta["config"]["model"])
    # the Trainer builds this rank's stages and loads them by name, as for any run
    cfg.train.init_from = "" if job.from_scratch else job.student
    tc = cfg.train
    with open_run(cfg, resume, force) as run_:
        state = run_.state
        tok, train, dev = make_datasets(cfg.data.dir, cfg.data.task, tc.seq_len, tc.seed,
                                        cfg.model.padded_vocab_size, cfg.data.objective,
                                        model_config=cfg.model, pack=cfg.data.pack)
        s_ckpt.check_tokenizer(tok.sha256, os.path.join(cfg.data.dir, "tokenizer"))
        t_ckpt = t_params = None
        if job.teacher:
            # every rank: each loads the part of the teacher its layout needs
            t_ckpt = ckpt_lib.Checkpoint(job.teacher)
            t_ckpt.check_tokenizer(tok.sha256, os.path.join(cfg.data.dir, "tokenizer"))
            with torch.device("meta"):
                t_params = GLM(teacher_weights(t_ckpt)[0]).num_params()
        kept = None if job.from_scratch else (
            (s_ckpt.meta.get("pruning") or {}).get("selection", {}).get("hidden"))
        tokens = tc.steps * tc.num_microbatches * tc.micro_batch_size * tc.seq_len * (
            state.dims.dp)
        extra = {"distill": {**dcfg.to_dict(), "from_scratch": job.from_scratch,
                             "teacher": os.path.abspath(job.teacher) if job.teacher else None,
                             "student": os.path.abspath(job.student), "tokens": tokens}}
        rank0 = run_.rank0
        trainer, loss_fn = distill_trainer(
            cfg, dcfg, train, dev, teacher=t_ckpt if dcfg.needs_teacher else None,
            kept_hidden=kept, state=state, tokenizer_sha256=tok.sha256, extra_meta=extra,
            log=(lambda m: _flushed(log, m)) if rank0 else (lambda m: None),
            extra_files=tokenizer_files(tok))
        run_.resume(trainer)
        t_tokens = train_tokens(t_ckpt.meta) if t_ckpt is not None else None
        trainer.log(
            "student: " + params_line(cfg.model, trainer.named_trained_parameters(), state)
            + (f" | teacher: {t_params:,} (whole model)" if t_params is not None else "")
            + f" | task {cfg.data.task} | {tc.steps} steps x {tc.num_microbatches} x "
            f"{tc.micro_batch_size} x {tc.seq_len} = {tokens:,} tokens"
            + (f" ({tokens / t_tokens:.1%} of the teacher checkpoint's own run, {t_tokens:,})"
               if t_tokens else ""))
        trainer.log("distill: " + " ".join(f"{k}={v}" for k, v in dcfg.to_dict().items())
                    + (" | from scratch" if job.from_scratch else ""))
        trainer.fit()
        path = run_.save(trainer)
        s_loss = trainer.evaluate()  # the student's own cross-entropy (DistillLoss, no_grad)
        if rank0:
            line = f"dev loss ({cfg.data.task}, {tc.eval_batches} batches): student {s_loss:.4f}"
            # the teacher's dev loss where rank 0 holds it whole
            teacher = getattr(loss_fn.teacher, "model", None)
            if teacher is not None and next(teacher.parameters()).device.type == "cpu":
                t_loss = dev_loss(teacher, dev, tc.eval_batches, tc.micro_batch_size)
                line += f" | teacher {t_loss:.4f}"
            log(line)
            log(run_.saved_line(trainer, path))
        return path


def main(argv=None):
    COMMAND.main(run, argv, training=True)
