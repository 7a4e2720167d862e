"""Structured pruning: a trained GLM checkpoint -> a smaller student checkpoint, with the
structures to keep chosen by importance over calibration batches (pretraining data by
default; --calib-task translation for a teacher fine-tuned on translation).

    python runners/prune.py --teacher runs/teacher/checkpoint --data-dir data \
        --out runs/student/pruned --method activation --keep 0.5
    python runners/prune.py ... --paper-rule --keep 0.5        # heads kept, d' and FFN*d'/d
    python runners/prune.py ... --head-dim 16 --ffn 344 --layers 4   # an explicit shape
    python runners/prune.py ... --layers 4 --keep 0.5          # depth fixed, widths searched

--keep is a fraction of the teacher's non-embedding parameters. Without --paper-rule the
widths come from a greedy, loss-guided search (engine/recipe/compress/search.py), width only
unless --search-axes includes "layers"; explicit sizes fix their axes. The student
checkpoint loads like any other (runners/distill.py, runners/evaluate.py). Single
process: the teacher loads by tensor name from a checkpoint of any parallel layout.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import fail, run_main  # noqa: E402

SHAPE_FLAGS = {"layers": "num_layers", "heads": "num_attention_heads",
               "groups": "multi_query_group_num", "head_dim": "kv_channels",
               "ffn": "ffn_hidden_size", "hidden": "hidden_size"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--teacher", required=True, help="checkpoint directory of the teacher")
    io.add_argument("--data-dir", default="data", help="prepared data (calibration batches)")
    io.add_argument("--out", required=True, help="checkpoint directory for the student")
    imp = p.add_argument_group("importance")
    imp.add_argument("--method", default="activation",
                     choices=["activation", "taylor", "magnitude", "random"])
    imp.add_argument("--layer-metric", choices=["method", "loss"], default="method",
                     help="rank layers by the method's own score (activation: block "
                          "influence) or by the calibration loss with each layer skipped")
    imp.add_argument("--calib-task", choices=["pretrain", "translation"], default="pretrain",
                     help="calibration data: the pretraining mix, or the translation pairs "
                          "(for a teacher fine-tuned on translation: score what it does)")
    imp.add_argument("--calib-batches", type=int, default=16)
    imp.add_argument("--batch-size", type=int, default=8)
    imp.add_argument("--seq-len", type=int, default=128)
    imp.add_argument("--seed", type=int, default=0,
                     help="calibration sample order and the random method's scores")
    shape = p.add_argument_group("student shape")
    shape.add_argument("--keep", type=float, default=None,
                       help="fraction of the teacher's non-embedding parameters to keep")
    shape.add_argument("--paper-rule", action="store_true",
                       help="keep heads, head dim -> --head-dim (or closest to --keep), "
                            "FFN scaled by d'/d")
    for flag, field in SHAPE_FLAGS.items():
        shape.add_argument("--" + flag.replace("_", "-"), dest=flag, type=int, default=None,
                           help=f"student {field}")
    shape.add_argument("--search-axes", default="ffn,head_dim,heads,groups,hidden",
                       help="axes the --keep search may shrink (add 'layers' for depth)")
    shape.add_argument("--search-batches", type=int, default=2,
                       help="calibration batches scoring each search candidate")
    shape.add_argument("--rotary", choices=["exact", "free"], default="exact",
                       help="head-dim rule for rotary pairs (engine/recipe/compress/prune.py)")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def _validate(args):
    if not 0 < args.calib_batches or not 0 < args.batch_size or not 0 < args.seq_len:
        raise ValueError("--calib-batches, --batch-size and --seq-len must be positive")
    explicit = {f: getattr(args, f) for f in SHAPE_FLAGS if getattr(args, f) is not None}
    if args.keep is not None and not 0 < args.keep <= 1:
        raise ValueError(f"--keep={args.keep} must be in (0, 1]")
    if args.paper_rule:
        if (args.keep is None) == (args.head_dim is None):
            raise ValueError("--paper-rule needs exactly one of --keep and --head-dim")
        if args.ffn is not None or args.heads is not None or args.groups is not None:
            raise ValueError("--paper-rule sets the FFN width and keeps the heads: drop "
                             "--ffn / --heads / --groups")
    elif args.keep is None and not explicit:
        raise ValueError("give a student shape: --keep, --paper-rule, or explicit sizes "
                         f"(--{' / --'.join(f.replace('_', '-') for f in SHAPE_FLAGS)})")
    return explicit


def main(argv=None):
    args = parse_args(argv)
    import torch

    from engine.recipe.compress.export import load_glm, save_student
    from engine.recipe.compress.importance import compute_importance
    from engine.recipe.compress.prune import PruneTarget, prune_state_dict, select
    from engine.recipe.compress.search import (calibration_loss, non_embedding_params, paper_target,
                                        search_target)
    from engine.recipe.data.loaders import make_datasets

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        explicit = _validate(args)
        teacher, ckpt = load_glm(args.teacher)
        cfg = teacher.config
        tok, train, _ = make_datasets(args.data_dir, args.calib_task, args.seq_len, args.seed,
                                      cfg.padded_vocab_size, model_config=cfg)
        ckpt.check_tokenizer(tok.sha256, os.path.join(args.data_dir, "tokenizer"))
        batches = [train.get_batch(i, args.batch_size) for i in range(args.calib_batches)]
        fixed = PruneTarget(**{SHAPE_FLAGS[f]: v for f, v in explicit.items()})
        fixed.resolve(cfg)
    except ValueError as e:
        fail(e)

    teacher.eval()
    state = {k: v.detach() for k, v in teacher.state_dict().items()}
    search_batches = batches[:args.search_batches]

    def calib_loss(config, st, which=search_batches):
        return calibration_loss(config, st, which)

    imp = compute_importance(args.method, teacher, batches, pad_id=tok.pad_id, seed=args.seed,
                             layer_metric=args.layer_metric)
    print(f"importance ({args.method}, layers: {args.layer_metric}) from {len(batches)} x "
          f"{args.batch_size} x {args.seq_len} {args.calib_task} calibration positions")
    trace = []
    try:
        if args.paper_rule:
            target = paper_target(cfg, head_dim=args.head_dim, fixed=fixed,
                                  keep=None if args.head_dim is not None else args.keep)
        elif args.keep is not None:
            axes = [a.strip() for a in args.search_axes.split(",") if a.strip()]
            axes = [a for a in axes if a not in explicit]  # an explicit size fixes its axis
            target, trace = search_target(cfg, state, imp, args.keep, calib_loss, axes=axes,
                                          rotary=args.rotary, start=fixed, log=print)
        else:
            target = fixed
        sel = select(imp, cfg, target, rotary=args.rotary)
        new_cfg, new_state = prune_state_dict(state, cfg, sel)
    except ValueError as e:
        fail(e)

    p_teacher, p_student = non_embedding_params(cfg), non_embedding_params(new_cfg)
    loss_t = calib_loss(cfg, state, batches)
    loss_s = calib_loss(new_cfg, new_state, batches)
    record = {"teacher": os.path.abspath(args.teacher), "method": args.method,
              "layer_metric": args.layer_metric, "layer_scores": imp.layers.tolist(),
              "keep": args.keep, "paper_rule": args.paper_rule, "rotary": args.rotary,
              "calibration": {"task": args.calib_task, "batches": args.calib_batches,
                              "batch_size": args.batch_size,
                              "seq_len": args.seq_len, "seed": args.seed},
              "teacher_model": cfg.to_dict(),
              "non_embedding_params": {"teacher": p_teacher, "student": p_student},
              "calibration_loss": {"teacher": loss_t, "student": loss_s},
              "search": [vars(s) for s in trace], "selection": sel.to_dict()}
    try:
        save_student(args.out, new_cfg, new_state, ckpt, record)
    except ValueError as e:
        fail(e)
    keys = ("num_layers", "hidden_size", "num_attention_heads", "multi_query_group_num",
            "kv_channels", "ffn_hidden_size")
    print("shape   " + " ".join(f"{k}={getattr(cfg, k)}->{getattr(new_cfg, k)}" for k in keys))
    print(f"params  non-embedding {p_teacher:,} -> {p_student:,} "
          f"({p_student / p_teacher:.1%}); total {teacher.num_params():,} -> "
          f"{sum(v.numel() for v in new_state.values()):,}")
    print(f"calibration loss (zero-shot) teacher {loss_t:.4f} -> student {loss_s:.4f}")
    # the two config values pruning rescales so the student's rotary angles and norms match
    print(f"adjusted rope_ratio {cfg.rope_ratio:g}->{new_cfg.rope_ratio:g} "
          f"layernorm_epsilon {cfg.layernorm_epsilon:g}->{new_cfg.layernorm_epsilon:g}")
    print(f"saved {args.out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    run_main(main)
