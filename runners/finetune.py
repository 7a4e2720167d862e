"""Mixed-language fine-tuning (paper Section 3.3, Algorithm 3): the teacher on a random
mixture of the source task D_s and the target task D_d (Eq. 11-12), then continued
distillation of the student on D_d (Eq. 13).

    # lines 1-8: the teacher, strategy mixed | source | target
    python runners/finetune.py teacher --config configs/finetune.json \
        --train.init_from runs/teacher/checkpoint --train.out_dir runs/ft/teacher
    # lines 9-14: the student (a runners/prune.py output) learns from that teacher on D_d
    python runners/finetune.py student --config configs/finetune.json \
        --teacher runs/ft/teacher/checkpoint --student runs/student/pruned \
        --train.out_dir runs/ft/student
    # any layout the Trainer supports, e.g. a 2-stage 1F1B pipeline:
    torchrun --nproc_per_node 2 runners/finetune.py teacher ... --parallel.pp 2

D_s / D_d default to the prepared translation pairs read English-input (en-zh) and
Chinese-input (zh-en); --source-tsv / --target-tsv replace them with any TSV task files.
The config holds the run sections of runners/pretrain.py plus "finetune"
(engine/recipe/finetune.py: FinetuneConfig); --section.field VALUE overrides it. Writes
<out_dir>/checkpoint and <out_dir>/finetune.json (alpha, sampling p, losses, seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import fail, run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any --section.field VALUE overrides the config file.")
    p.add_argument("stage", choices=["teacher", "student"],
                   help="teacher: hybrid fine-tuning (Eq. 12); student: continued "
                        "distillation on D_d (Eq. 13)")
    p.add_argument("--config", help="JSON or YAML: model / train / data / parallel / finetune")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in <train.out_dir>")
    p.add_argument("--force", action="store_true",
                   help="start over in an out_dir that holds checkpoints")
    g = p.add_argument_group("tasks")
    g.add_argument("--source-tsv", default="", help="D_s training pairs (default: the shards)")
    g.add_argument("--target-tsv", default="", help="D_d training pairs (default: the shards)")
    g = p.add_argument_group("student stage")
    g.add_argument("--teacher", default="", help="fine-tuned teacher checkpoint")
    g.add_argument("--student", default="", help="student checkpoint (e.g. runners/prune.py)")
    return p.parse_known_args(argv)


def main(argv=None):
    args, rest = parse_args(argv)
    import time

    import torch.distributed as dist

    from engine.train import checkpoint as ckpt_lib
    from engine.config import build_run_config, load_file, parse_overrides, pop_section
    from engine.config_check import check_fields
    from engine.recipe.finetune import FinetuneConfig, build_tasks, teacher_objective
    from engine.train.divergence import DivergenceError
    from engine.train.launch import model_parallel_group, open_out_dir, parallel_state, stopped_line
    from model import GLMConfig
    from model.config import with_layout_of

    state = run_dir = None
    try:
        base, over, ft = pop_section(load_file(args.config) if args.config else {},
                                     parse_overrides(rest), "finetune")
        fcfg = FinetuneConfig(**check_fields(FinetuneConfig, ft, "finetune"))
        cfg = build_run_config(base, over)
        if args.stage == "student":
            if not args.student or (fcfg.lam > 0 and not args.teacher):
                raise ValueError("the student stage needs --student and (lam > 0) --teacher")
            cfg.model = GLMConfig.from_dict(
                ckpt_lib.Checkpoint(args.student).meta["config"]["model"])
            cfg.train.init_from = args.student
        elif cfg.train.init_from:
            # an imported ChatGLM keeps its causal 1D layout, rope and chat prompt
            cfg.model = with_layout_of(cfg.model, ckpt_lib.Checkpoint(cfg.train.init_from)
                                       .meta["config"]["model"])
        tc = cfg.train
        state = parallel_state(cfg)
        run_dir = open_out_dir(cfg, state, args.resume, args.force)
        rank0 = state.rank == 0
        log = (lambda m: print(m, flush=True)) if rank0 else (lambda *a, **k: None)
        log("layout: " + (f"tp={state.dims.tp} pp={state.dims.pp} dp={state.dims.dp} "
                          f"vpp={state.dims.vpp} schedule={cfg.parallel.schedule}"
                          if state.distributed else "single process"))
        tok, d_s, d_d, dev_s, dev_d = build_tasks(cfg.data.dir, fcfg, tc.seq_len, tc.seed,
                                                  cfg.model.padded_vocab_size,
                                                  args.source_tsv, args.target_tsv,
                                                  model_config=cfg.model)
        tokenizer = {ckpt_lib.TOKENIZER_FILE: str(tok.path)}    # inside every checkpoint
        record = {"stage": args.stage, "finetune": fcfg.to_dict(), "n_s": len(d_s),
                  "n_d": len(d_d)}
        if args.stage == "teacher":
            from engine.train.trainer import Trainer
            train, loss, alpha, p = teacher_objective(fcfg, d_s, d_d, tc.seed)
            record.update(alpha=alpha, p=p, w_source=loss.w_source, w_target=loss.w_target)
            log(f"teacher fine-tuning: strategy {fcfg.strategy} | n_s {len(d_s):,} n_d "
                f"{len(d_d):,} | alpha {alpha:.4f} | P(D_s) {p:.4f} | loss weights "
                f"source {loss.w_source:.3f} target {loss.w_target:.3f}")
            trainer = Trainer.from_config(cfg, train, dev_d, state=state,
                                          tokenizer_sha256=tok.sha256,
                                          log=log, forward_step=loss.forward_step,
                                          mp_group=model_parallel_group(state),
                                          extra_meta={"finetune": record},
                                          extra_files=tokenizer)
        else:
            from engine.recipe.compress.distill_run import distill_trainer
            dcfg = fcfg.distill_config()
            record.update(lam=fcfg.lam, distill=dcfg.to_dict(), teacher=args.teacher,
                          student=args.student)
            log(f"continued distillation on D_d ({fcfg.target_direction}): lambda "
                f"{fcfg.lam} -> kl_weight {dcfg.kl_weight} ce_weight {dcfg.ce_weight:.3f}, "
                f"T {dcfg.temperature}")
            # each rank loads the part of the teacher its layout needs
            trainer, _ = distill_trainer(cfg, dcfg, d_d, dev_d, teacher=args.teacher or None,
                                         state=state, tokenizer_sha256=tok.sha256, log=log,
                                         extra_meta={"finetune": record},
                                         extra_files=tokenizer)
        if run_dir.resume_path:
            trainer.resume(run_dir.resume_path)
            log(f"resumed from {run_dir.resume_path} at step {trainer.step}")
        t0 = time.perf_counter()
        history = trainer.fit()
        record["train_seconds"] = time.perf_counter() - t0
        record["step_seconds"] = sum(h.seconds for h in history)
        path = trainer.save()
        # dev losses of both tasks (the student's own cross-entropy in the student stage)
        record["dev_loss_target"] = trainer.evaluate(dev_d)
        record["dev_loss_source"] = trainer.evaluate(dev_s)
        if rank0:
            with open(os.path.join(tc.out_dir, "finetune.json"), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            log(f"dev loss: D_d {record['dev_loss_target']:.4f} | D_s "
                f"{record['dev_loss_source']:.4f} | {record['step_seconds']:.1f} s training")
            log(stopped_line(trainer, path) if trainer.stopped_by else f"saved {path}")
    except (ValueError, DivergenceError) as e:
        fail(e)
    finally:
        if run_dir is not None:
            run_dir.close()
        if dist.is_initialized():   # joined by parallel_state (a torchrun job)
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, graceful_stop=True)
