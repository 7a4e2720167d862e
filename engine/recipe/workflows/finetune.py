r"""Mixed-language fine-tuning (paper Section 3.3, Algorithm 3): the teacher on a random
mixture of the source task D_s and the target task D_d (Eq. 11-12), then continued
distillation of the student on D_d (Eq. 13).

    # lines 1-8: the teacher, strategy mixed | source | target
    python runners/finetune.py --finetune.stage teacher --config configs/finetune.json \
        --train.init_from runs/teacher/checkpoint --train.out_dir runs/ft/teacher
    # lines 9-14: the student (a runners/prune.py output) learns from that teacher on D_d
    python runners/finetune.py --finetune.stage student --config configs/finetune.json \
        --finetune.teacher runs/ft/teacher/checkpoint \
        --finetune.student runs/student/pruned --train.out_dir runs/ft/student
    # any layout the Trainer supports, e.g. a 2-stage 1F1B pipeline:
    torchrun --nproc_per_node 2 runners/finetune.py ... --parallel.pp 2

D_s / D_d default to the prepared translation pairs read English-input (en-zh) and
Chinese-input (zh-en); --finetune.source_tsv / --finetune.target_tsv replace them with
any TSV task files. With data.pack (the default) both stages train on rows of several
examples, each attending only to itself (engine/recipe/finetune.py: MixedDataset;
the student's D_d as any packed translation set); dev sets stay one example per row.
The config holds the run sections of runners/pretrain.py plus
"finetune" (engine/recipe/finetune.py: FinetuneConfig, and the stage and its
checkpoints). Writes <out_dir>/checkpoint and <out_dir>/finetune.json (alpha, sampling p,
losses, seconds)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

from engine.config import DataConfig, ParallelConfig, RunConfig, TrainConfig
from engine.config_cli import Alias, Command, build_section
from engine.recipe.finetune import FinetuneConfig
from model.config import GLMConfig

STAGES = ("teacher", "student")


@dataclass
class FinetuneJob(FinetuneConfig):
    """The method's settings (FinetuneConfig), the stage and what it reads."""
    stage: str = "teacher"         # teacher: hybrid fine-tuning (Eq. 12); student: Eq. 13
    teacher: str = ""              # student stage: the fine-tuned teacher checkpoint
    student: str = ""              # student stage: the student checkpoint (runners/prune.py)
    source_tsv: str = ""           # D_s training pairs (default: the prepared shards)
    target_tsv: str = ""           # D_d training pairs (default: the prepared shards)

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"finetune.stage={self.stage!r} must be teacher or student")

    def method(self) -> FinetuneConfig:
        return FinetuneConfig(**{f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(FinetuneConfig)})


@dataclass
class FinetuneRun:
    run: RunConfig
    job: FinetuneJob

    def to_dict(self) -> dict:
        return {**self.run.to_dict(), "finetune": dataclasses.asdict(self.job)}


def build(base: dict, overrides: dict) -> FinetuneRun:
    from engine.config import build_run_config, pop_section
    base, overrides, ft = pop_section(base, overrides, "finetune")
    job = build_section(FinetuneJob, "finetune", ft)
    if job.stage == "student" and (not job.student or (job.lam > 0 and not job.teacher)):
        raise ValueError("the student stage needs --finetune.student and (lam > 0) "
                         "--finetune.teacher")
    return FinetuneRun(build_run_config(base, overrides), job)


FLAGS = {"--resume": "continue from the newest complete checkpoint in <train.out_dir>",
         "--force": "start over in an out_dir that holds checkpoints"}
COMMAND = Command(__doc__, {"model": GLMConfig, "train": TrainConfig, "data": DataConfig,
                            "parallel": ParallelConfig, "finetune": FinetuneJob},
                  build, flags=FLAGS, positional_alias=("finetune.stage", STAGES),
                  extra_fields={"model": {"preset": "named model shape the other model "
                                          "fields override (model/config.py PRESETS) "
                                          "(default: \"tiny\")"}},
                  aliases={"--teacher": Alias("finetune.teacher"),
                           "--student": Alias("finetune.student"),
                           "--source-tsv": Alias("finetune.source_tsv"),
                           "--target-tsv": Alias("finetune.target_tsv")})


def run(config: FinetuneRun, resume: bool = False, force: bool = False, log=print) -> str:
    """One stage of the method -> the final checkpoint's path; <out_dir>/finetune.json
    records alpha, p, losses and seconds."""
    import sys

    from engine.recipe.finetune import build_tasks, teacher_objective
    from engine.train import checkpoint as ckpt_lib
    from engine.parallel.state import model_parallel_group
    from engine.train.build import layout_line
    from engine.train.lifecycle import open_run, tokenizer_files
    from model.config import with_layout_of

    cfg, job = config.run, config.job
    fcfg = job.method()
    if job.stage == "student":
        cfg.model = GLMConfig.from_dict(ckpt_lib.Checkpoint(job.student).meta["config"]["model"])
        cfg.train.init_from = job.student
    elif cfg.train.init_from:
        # an imported ChatGLM keeps its causal 1D layout, rope and chat prompt
        cfg.model = with_layout_of(cfg.model, ckpt_lib.Checkpoint(cfg.train.init_from)
                                   .meta["config"]["model"])
    tc = cfg.train
    with open_run(cfg, resume, force) as run_:
        state, rank0 = run_.state, run_.rank0

        def say(m, **_):
            if rank0:
                log(m)
                sys.stdout.flush()
        say("layout: " + layout_line(cfg, state))
        tok, d_s, d_d, dev_s, dev_d = build_tasks(cfg.data.dir, fcfg, tc.seq_len, tc.seed,
                                                  cfg.model.padded_vocab_size,
                                                  job.source_tsv, job.target_tsv,
                                                  model_config=cfg.model, pack=cfg.data.pack)
        record = {"stage": job.stage, "finetune": fcfg.to_dict(), "n_s": len(d_s),
                  "n_d": len(d_d), "pack": cfg.data.pack}
        if job.stage == "teacher":
            from engine.train.trainer import Trainer
            train, loss, alpha, p = teacher_objective(fcfg, d_s, d_d, tc.seed,
                                                      pack=cfg.data.pack)
            record.update(alpha=alpha, p=p, w_source=loss.w_source, w_target=loss.w_target)
            say(f"teacher fine-tuning: strategy {fcfg.strategy} | n_s {len(d_s):,} n_d "
                f"{len(d_d):,} | alpha {alpha:.4f} | P(D_s) {p:.4f} | loss weights "
                f"source {loss.w_source:.3f} target {loss.w_target:.3f}")
            trainer = Trainer.from_config(cfg, train, dev_d, state=state,
                                          tokenizer_sha256=tok.sha256,
                                          log=say, forward_step=loss.forward_step,
                                          mp_group=model_parallel_group(state),
                                          extra_meta={"finetune": record},
                                          extra_files=tokenizer_files(tok))
        else:
            from engine.recipe.compress.distill_run import distill_trainer
            dcfg = fcfg.distill_config()
            record.update(lam=fcfg.lam, distill=dcfg.to_dict(), teacher=job.teacher,
                          student=job.student)
            say(f"continued distillation on D_d ({fcfg.target_direction}): lambda "
                f"{fcfg.lam} -> kl_weight {dcfg.kl_weight} ce_weight {dcfg.ce_weight:.3f}, "
                f"T {dcfg.temperature}")
            # each rank loads the part of the teacher its layout needs
            trainer, _ = distill_trainer(cfg, dcfg, d_d, dev_d, teacher=job.teacher or None,
                                         state=state, tokenizer_sha256=tok.sha256, log=say,
                                         extra_meta={"finetune": record},
                                         extra_files=tokenizer_files(tok))
        run_.resume(trainer)
        t0 = time.perf_counter()
        history = trainer.fit()
        record["train_seconds"] = time.perf_counter() - t0
        record["step_seconds"] = sum(h.seconds for h in history)
        path = run_.save(trainer)
        # dev losses of both tasks (the student's own cross-entropy in the student stage)
        record["dev_loss_target"] = trainer.evaluate(dev_d)
        record["dev_loss_source"] = trainer.evaluate(dev_s)
        if rank0:
            with open(os.path.join(tc.out_dir, "finetune.json"), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            say(f"dev loss: D_d {record['dev_loss_target']:.4f} | D_s "
                f"{record['dev_loss_source']:.4f} | {record['step_seconds']:.1f} s training")
            say(run_.saved_line(trainer, path))
        return path


def main(argv=None):
    COMMAND.main(run, argv, training=True)
