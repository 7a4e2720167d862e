"""Knowledge distillation: train a (pruned) student against a frozen teacher, through the
same Trainer as pretraining, on the pretraining data (both languages) by default.

    python runners/distill.py --teacher runs/teacher/checkpoint \
        --student runs/student/pruned --config configs/demo_distill.json \
        --data.dir data --train.out_dir runs/student/kd
    # the baseline: the same student shape from a random init, plain cross-entropy
    python runners/distill.py --student runs/student/pruned --from-scratch \
        --config configs/demo_distill.json --distill.kl_weight 0 --distill.hidden_weight 0 \
        --train.out_dir runs/student/scratch

The config file has the run sections of runners/pretrain.py (train, data, parallel) plus
"distill" (engine/recipe/compress/distill.py: DistillConfig); any --section.field VALUE
overrides it. There is no "model" section: the student's shape is its checkpoint's.
Loss terms (ce, kl, hidden) are logged per label token of the whole job next to the
total, and written to metrics.jsonl. Any tp x pp x dp layout the engine supports runs
under torchrun, sequence parallelism included:

    torchrun --nproc_per_node 4 runners/distill.py ... --parallel.tp 2 --parallel.pp 2

--distill.teacher_layout chooses where the frozen teacher runs:
  same  (default) split like the student: its stage s on the ranks of the student's
        stage s, TP-sharded alike, run forward-only over each step's microbatches; no
        rank holds the whole teacher. Needs its layers divisible by pp*vpp and its
        heads / FFN by tp.
  last  whole on each last-stage rank: any teacher shape, but its memory and compute
        all land on the last stage.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import fail, run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any --section.field VALUE overrides the config file.")
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint (needed unless kl and hidden weights are 0)")
    p.add_argument("--student", required=True,
                   help="student checkpoint (runners/prune.py output, or any GLM checkpoint)")
    p.add_argument("--config", help="JSON or YAML: train / data / parallel / distill sections")
    p.add_argument("--from-scratch", action="store_true",
                   help="random-init the student's shape instead of loading its weights")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in <train.out_dir>")
    p.add_argument("--force", action="store_true",
                   help="start over in an out_dir that holds checkpoints")
    args, rest = p.parse_known_args(argv)
    return args, rest


def split_config(base: dict, overrides: dict):
    """Take the "distill" section out of the run config; refuse a "model" section."""
    from engine.config import pop_section
    base, overrides, dist = pop_section(base, overrides, "distill")
    if "model" in base or "model" in overrides:
        raise ValueError("distill runs take the student's shape from --student; drop the "
                         "model section / --model.* overrides")
    return base, overrides, dist


def train_tokens(meta: dict) -> int | None:
    """Tokens (positions) a checkpoint's own training run consumed, from its meta.json."""
    try:
        t = meta["config"]["train"]
        dp = max(1, int(meta.get("layout", {}).get("dp", 1)))
        return int(meta["step"]) * t["num_microbatches"] * t["micro_batch_size"] * t["seq_len"] * dp
    except (KeyError, TypeError):
        return None


def main(argv=None):
    args, rest = parse_args(argv)
    import torch
    import torch.distributed as dist

    from engine.train import checkpoint as ckpt_lib
    from engine.recipe.compress.distill import DistillConfig
    from engine.recipe.compress.distill_run import distill_trainer, teacher_weights
    from engine.config import build_run_config, load_file, parse_overrides
    from engine.config_check import check_fields
    from engine.recipe.data.loaders import make_datasets
    from engine.recipe.evaluate import dev_loss
    from engine.train.divergence import DivergenceError
    from engine.train.launch import open_out_dir, parallel_state, stopped_line
    from model import GLM, GLMConfig

    state = run_dir = None
    try:
        base, over, dist_cfg = split_config(load_file(args.config) if args.config else {},
                                            parse_overrides(rest))
        dcfg = DistillConfig(**check_fields(DistillConfig, dist_cfg, "distill"))
        cfg = build_run_config(base, over)
        if cfg.train.init_from:
            raise ValueError("train.init_from is not used here: the student comes from "
                             "--student")
        if dcfg.needs_teacher and not args.teacher:
            raise ValueError("--teacher is required when distill.kl_weight or "
                             "distill.hidden_weight is > 0")
        s_ckpt = ckpt_lib.Checkpoint(args.student)
        cfg.model = GLMConfig.from_dict(s_ckpt.meta["config"]["model"])
        # the Trainer builds this rank's stages and loads them by name, as for any run
        cfg.train.init_from = "" if args.from_scratch else args.student
        tc = cfg.train
        state = parallel_state(cfg)
        run_dir = open_out_dir(cfg, state, args.resume, args.force)
        tok, train, dev = make_datasets(cfg.data.dir, cfg.data.task, tc.seq_len, tc.seed,
                                        cfg.model.padded_vocab_size, cfg.data.objective,
                                        model_config=cfg.model, pack=cfg.data.pack)
        s_ckpt.check_tokenizer(tok.sha256, os.path.join(cfg.data.dir, "tokenizer"))
        t_ckpt = t_params = None
        if args.teacher:
            # every rank: each loads the part of the teacher its layout needs
            t_ckpt = ckpt_lib.Checkpoint(args.teacher)
            t_ckpt.check_tokenizer(tok.sha256, os.path.join(cfg.data.dir, "tokenizer"))
            with torch.device("meta"):
                t_params = GLM(teacher_weights(t_ckpt)[0]).num_params()
        kept = None if args.from_scratch else (
            (s_ckpt.meta.get("pruning") or {}).get("selection", {}).get("hidden"))
        tokens = tc.steps * tc.num_microbatches * tc.micro_batch_size * tc.seq_len * (
            state.dims.dp)
        extra = {"distill": {**dcfg.to_dict(), "from_scratch": args.from_scratch,
                             "teacher": os.path.abspath(args.teacher) if args.teacher else None,
                             "student": os.path.abspath(args.student), "tokens": tokens}}
        rank0 = state.rank == 0
        trainer, loss_fn = distill_trainer(
            cfg, dcfg, train, dev, teacher=t_ckpt if dcfg.needs_teacher else None,
            kept_hidden=kept, state=state, tokenizer_sha256=tok.sha256, extra_meta=extra,
            log=lambda m: print(m, flush=True) if rank0 else None,
            extra_files={ckpt_lib.TOKENIZER_FILE: str(tok.path)})
        if run_dir.resume_path:
            trainer.resume(run_dir.resume_path)
            trainer.log(f"resumed from {run_dir.resume_path} at step {trainer.step}")
        t_tokens = train_tokens(t_ckpt.meta) if t_ckpt is not None else None
        from engine.train.metrics import params_line
        trainer.log(
            "student: " + params_line(cfg.model, trainer.named_trained_parameters(), state)
            + (f" | teacher: {t_params:,} (whole model)" if t_params is not None else "")
            + f" | task {cfg.data.task} | {tc.steps} steps x {tc.num_microbatches} x "
            f"{tc.micro_batch_size} x {tc.seq_len} = {tokens:,} tokens"
            + (f" ({tokens / t_tokens:.1%} of the teacher checkpoint's own run, {t_tokens:,})"
               if t_tokens else ""))
        trainer.log("distill: " + " ".join(f"{k}={v}" for k, v in dcfg.to_dict().items())
                    + (" | from scratch" if args.from_scratch else ""))
        trainer.fit()
        path = trainer.save()
        s_loss = trainer.evaluate()  # the student's own cross-entropy (DistillLoss, no_grad)
        if rank0:
            line = f"dev loss ({cfg.data.task}, {tc.eval_batches} batches): student {s_loss:.4f}"
            # the teacher's dev loss where rank 0 holds it whole
            teacher = getattr(loss_fn.teacher, "model", None)
            if teacher is not None and next(teacher.parameters()).device.type == "cpu":
                t_loss = dev_loss(teacher, dev, tc.eval_batches, tc.micro_batch_size)
                line += f" | teacher {t_loss:.4f}"
            print(line)
            print(stopped_line(trainer, path) if trainer.stopped_by else f"saved {path}")
    except (ValueError, DivergenceError) as e:
        fail(e)
    finally:
        if run_dir is not None:
            run_dir.close()
        if dist.is_initialized():   # joined by parallel_state (a torchrun job)
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, graceful_stop=True)
