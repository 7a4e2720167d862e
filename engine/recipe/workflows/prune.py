r"""Structured pruning: a trained GLM checkpoint -> a smaller student checkpoint, with the
structures to keep chosen by importance over calibration batches (pretraining data by
default; --data.task translation for a teacher fine-tuned on translation).

    python runners/prune.py --prune.teacher runs/teacher/checkpoint --data.dir data \
        --prune.out_dir runs/student/pruned --prune.method activation --prune.keep 0.5
    python runners/prune.py ... --prune.paper_rule true --prune.keep 0.5  # the paper's rule
    python runners/prune.py ... --prune.head_dim 16 --prune.ffn 344 --prune.layers 4
    python runners/prune.py ... --prune.layers 4 --prune.keep 0.5   # depth fixed, widths searched

prune.keep is a fraction of the teacher's non-embedding parameters. Without paper_rule
the widths come from a greedy, loss-guided search (engine/recipe/compress/search.py),
width only unless search_axes includes "layers"; explicit sizes fix their axes. The
student checkpoint loads like any other (runners/distill.py, runners/evaluate.py).
Single process: the teacher loads by tensor name from a checkpoint of any layout."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from engine.config_cli import Alias, Command, build_section

SHAPE_FIELDS = {"layers": "num_layers", "heads": "num_attention_heads",
                "groups": "multi_query_group_num", "head_dim": "kv_channels",
                "ffn": "ffn_hidden_size", "hidden": "hidden_size"}
METHODS = ("activation", "taylor", "magnitude", "random")


@dataclass
class PruneConfig:
    teacher: str = ""              # checkpoint directory of the teacher (required)
    out_dir: str = ""              # checkpoint directory for the student (required)
    method: str = "activation"     # importance: activation | taylor | magnitude | random
    # rank layers by the method's own score ("method"; activation: block influence) or by
    # the calibration loss with each layer skipped ("loss")
    layer_metric: str = "method"
    calib_batches: int = 16        # calibration batches the importance is computed over
    micro_batch_size: int = 8      # sequences per calibration batch
    seq_len: int = 128             # tokens per calibration sequence
    seed: int = 0                  # calibration sample order and the random method's scores
    keep: float | None = None      # fraction of the teacher's non-embedding parameters to keep
    # keep heads, head dim -> head_dim (or closest to keep), FFN scaled by d'/d
    paper_rule: bool = False
    layers: int | None = None      # student num_layers
    heads: int | None = None       # student num_attention_heads
    groups: int | None = None      # student multi_query_group_num
    head_dim: int | None = None    # student kv_channels
    ffn: int | None = None         # student ffn_hidden_size
    hidden: int | None = None      # student hidden_size
    search_axes: str = "ffn,head_dim,heads,groups,hidden"  # what the keep search may shrink
    #                                (add "layers" for depth)
    search_batches: int = 2        # calibration batches scoring each search candidate
    rotary: str = "exact"          # head-dim rule for rotary pairs: exact | free
    threads: int = 0               # torch intra-op threads; 0 leaves torch's default

    def __post_init__(self):
        if not self.teacher or not self.out_dir:
            raise ValueError("prune.teacher and prune.out_dir are required")
        if self.method not in METHODS:
            raise ValueError(f"prune.method={self.method!r} must be one of {', '.join(METHODS)}")
        if self.layer_metric not in ("method", "loss"):
            raise ValueError(f"prune.layer_metric={self.layer_metric!r} must be method or loss")
        if self.rotary not in ("exact", "free"):
            raise ValueError(f"prune.rotary={self.rotary!r} must be exact or free")
        if not 0 < self.calib_batches or not 0 < self.micro_batch_size or not 0 < self.seq_len:
            raise ValueError("prune.calib_batches, prune.micro_batch_size and prune.seq_len "
                             "must be positive")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ValueError(f"prune.keep={self.keep} must be in (0, 1]")
        if self.paper_rule:
            if (self.keep is None) == (self.head_dim is None):
                raise ValueError("prune.paper_rule needs exactly one of prune.keep and "
                                 "prune.head_dim")
            if self.ffn is not None or self.heads is not None or self.groups is not None:
                raise ValueError("prune.paper_rule sets the FFN width and keeps the heads: "
                                 "drop prune.ffn / prune.heads / prune.groups")
        elif self.keep is None and not self.explicit():
            raise ValueError("give a student shape: prune.keep, prune.paper_rule, or "
                             f"explicit sizes (prune.{' / prune.'.join(SHAPE_FIELDS)})")

    def explicit(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in SHAPE_FIELDS if getattr(self, f) is not None}


@dataclass
class CalibData:
    dir: str = "data"              # output of runners/prepare_data.py
    # calibration data: the pretraining mix ("pretrain"), or the translation pairs
    # ("translation": for a teacher fine-tuned on translation, score what it does)
    task: str = "pretrain"

    def __post_init__(self):
        if self.task not in ("pretrain", "translation"):
            raise ValueError(f"data.task={self.task!r} must be 'pretrain' or 'translation'")


@dataclass
class PruneRun:
    prune: PruneConfig
    data: CalibData

    def to_dict(self) -> dict:
        return {"prune": dataclasses.asdict(self.prune), "data": dataclasses.asdict(self.data)}


def build(base: dict, overrides: dict) -> PruneRun:
    merged = {s: {**base.get(s, {}), **overrides.get(s, {})} for s in ("prune", "data")}
    return PruneRun(build_section(PruneConfig, "prune", merged["prune"]),
                    build_section(CalibData, "data", merged["data"]))


_ALIASES = {"--teacher": Alias("prune.teacher"), "--out": Alias("prune.out_dir"),
            "--data-dir": Alias("data.dir"), "--calib-task": Alias("data.task"),
            "--batch-size": Alias("prune.micro_batch_size"),
            "--paper-rule": Alias("prune.paper_rule", switch=True)}
for _f in ("method", "layer_metric", "calib_batches", "seq_len", "seed", "keep",
           "search_axes", "search_batches", "rotary", "threads", *SHAPE_FIELDS):
    _ALIASES["--" + _f.replace("_", "-")] = Alias(f"prune.{_f}")
COMMAND = Command(__doc__, {"prune": PruneConfig, "data": CalibData}, build,
                  aliases=_ALIASES)


def run(config: PruneRun, log=print) -> str:
    """Prune config.prune.teacher -> the student checkpoint's path (prune.out_dir)."""
    import torch

    from engine.recipe.compress.export import load_glm, save_student
    from engine.recipe.compress.importance import compute_importance
    from engine.recipe.compress.prune import PruneTarget, prune_state_dict, select
    from engine.recipe.compress.search import (calibration_loss, non_embedding_params,
                                               paper_target, search_target)
    from engine.recipe.data.loaders import make_datasets

    pc, data = config.prune, config.data
    if pc.threads:
        torch.set_num_threads(pc.threads)
    t0 = time.perf_counter()
    explicit = pc.explicit()
    teacher, ckpt = load_glm(pc.teacher)
    cfg = teacher.config
    tok, train, _ = make_datasets(data.dir, data.task, pc.seq_len, pc.seed,
                                  cfg.padded_vocab_size, model_config=cfg)
    ckpt.check_tokenizer(tok.sha256, os.path.join(data.dir, "tokenizer"))
    batches = [train.get_batch(i, pc.micro_batch_size) for i in range(pc.calib_batches)]
    fixed = PruneTarget(**{SHAPE_FIELDS[f]: v for f, v in explicit.items()})
    fixed.resolve(cfg)

    teacher.eval()
    state = {k: v.detach() for k, v in teacher.state_dict().items()}
    search_batches = batches[:pc.search_batches]

    def calib_loss(config, st, which=search_batches):
        return calibration_loss(config, st, which)

    imp = compute_importance(pc.method, teacher, batches, pad_id=tok.pad_id, seed=pc.seed,
                             layer_metric=pc.layer_metric)
    log(f"importance ({pc.method}, layers: {pc.layer_metric}) from {len(batches)} x "
        f"{pc.micro_batch_size} x {pc.seq_len} {data.task} calibration positions")
    trace = []
    if pc.paper_rule:
        target = paper_target(cfg, head_dim=pc.head_dim, fixed=fixed,
                              keep=None if pc.head_dim is not None else pc.keep)
    elif pc.keep is not None:
        axes = [a.strip() for a in pc.search_axes.split(",") if a.strip()]
        axes = [a for a in axes if a not in explicit]  # an explicit size fixes its axis
        target, trace = search_target(cfg, state, imp, pc.keep, calib_loss, axes=axes,
                                      rotary=pc.rotary, start=fixed, log=log)
    else:
        target = fixed
    sel = select(imp, cfg, target, rotary=pc.rotary)
    new_cfg, new_state = prune_state_dict(state, cfg, sel)

    p_teacher, p_student = non_embedding_params(cfg), non_embedding_params(new_cfg)
    loss_t = calib_loss(cfg, state, batches)
    loss_s = calib_loss(new_cfg, new_state, batches)
    record = {"teacher": os.path.abspath(pc.teacher), "method": pc.method,
              "layer_metric": pc.layer_metric, "layer_scores": imp.layers.tolist(),
              "keep": pc.keep, "paper_rule": pc.paper_rule, "rotary": pc.rotary,
              "calibration": {"task": data.task, "batches": pc.calib_batches,
                              "batch_size": pc.micro_batch_size,
                              "seq_len": pc.seq_len, "seed": pc.seed},
              "teacher_model": cfg.to_dict(),
              "non_embedding_params": {"teacher": p_teacher, "student": p_student},
              "calibration_loss": {"teacher": loss_t, "student": loss_s},
              "search": [vars(s) for s in trace], "selection": sel.to_dict()}
    save_student(pc.out_dir, new_cfg, new_state, ckpt, record)
    keys = ("num_layers", "hidden_size", "num_attention_heads", "multi_query_group_num",
            "kv_channels", "ffn_hidden_size")
    log("shape   " + " ".join(f"{k}={getattr(cfg, k)}->{getattr(new_cfg, k)}" for k in keys))
    if len(sel.layers) < cfg.num_layers:
        log(f"layers  kept {', '.join(map(str, sel.layers))} of 0..{cfg.num_layers - 1} "
            f"(scores {', '.join(f'{x:.3g}' for x in imp.layers.tolist())})")
    log(f"params  non-embedding {p_teacher:,} -> {p_student:,} "
        f"({p_student / p_teacher:.1%}); total {teacher.num_params():,} -> "
        f"{sum(v.numel() for v in new_state.values()):,}")
    log(f"calibration loss (zero-shot) teacher {loss_t:.4f} -> student {loss_s:.4f}")
    # the two config values pruning rescales so the student's rotary angles and norms match
    log(f"adjusted rope_ratio {cfg.rope_ratio:g}->{new_cfg.rope_ratio:g} "
        f"layernorm_epsilon {cfg.layernorm_epsilon:g}->{new_cfg.layernorm_epsilon:g}")
    log(f"saved {pc.out_dir} in {time.perf_counter() - t0:.1f}s")
    return pc.out_dir


def main(argv=None):
    COMMAND.main(run, argv)
