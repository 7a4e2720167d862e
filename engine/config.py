"""Run configuration: one dataclass per concern, loaded from JSON or a YAML subset, then
`--section.field value` command-line overrides.

    {"model": {"preset": "small", "num_layers": 4},
     "train": {"steps": 200, "lr": 1e-3}, "parallel": {"pp": 2}, "data": {"dir": "data"}}
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from engine.config_check import check_fields
from model.config import GLMConfig


@dataclass
class TrainConfig:
    steps: int = 100              # optimizer steps
    micro_batch_size: int = 8     # sequences per microbatch
    num_microbatches: int = 1         # per data-parallel rank and optimizer step
    seq_len: int = 128            # tokens per sequence
    lr: float = 1e-3              # peak learning rate (after warmup; cosine decay to min_lr)
    min_lr: float = 1e-4          # learning rate at the last step
    warmup_steps: int = 10        # linear warmup steps
    weight_decay: float = 0.1     # AdamW decoupled weight decay
    beta1: float = 0.9            # AdamW beta1
    beta2: float = 0.95           # AdamW beta2
    eps: float = 1e-8             # AdamW epsilon
    grad_clip: float = 1.0            # 0 disables clipping
    precision: str = "auto"           # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 1234              # init, data order and dropout seed
    log_every: int = 10           # steps between log lines
    eval_every: int = 50              # 0 disables periodic eval
    eval_batches: int = 4         # dev batches per evaluation
    save_every: int = 0               # 0: save only at the end
    out_dir: str = "runs/pretrain"  # run folder: checkpoints/, metrics.jsonl, lock
    init_from: str = ""               # checkpoint dir whose model weights start this run
    threads: int = 0                  # torch intra-op threads; 0 leaves torch's default
    recompute: bool = False           # full activation recompute: layers keep only their
    #                                   input, rerun forward in backward (engine/train/recompute.py)
    keep_checkpoints: int = 2         # complete checkpoints kept in out_dir/checkpoints/
    max_skipped_steps: int = 5        # more inf/nan-gradient skips in a row stop the run
    loss_spike_factor: float = 10.0   # stop when loss > factor x its running mean; 0: off
    profile_steps: str = ""           # "A:B": torch.profiler trace + pipeline timeline of
    #                                   steps A..B (1-based) into out_dir/profile
    tensorboard: bool = False         # also write metrics.jsonl's scalars as TensorBoard
    #                                   events to out_dir/tensorboard (optional package)

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "num_microbatches", "seq_len", "log_every",
                     "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be positive")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip",
                     "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints={self.keep_checkpoints} must be >= 1")
        if self.max_skipped_steps < 0:
            raise ValueError(f"train.max_skipped_steps={self.max_skipped_steps} must be >= 0")
        if self.loss_spike_factor != 0 and not self.loss_spike_factor > 1:
            raise ValueError(f"train.loss_spike_factor={self.loss_spike_factor} must be 0 "
                             "(off) or > 1")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.lr={self.lr}, train.min_lr={self.min_lr}: need "
                             "0 <= min_lr <= lr and lr > 0")
        if not isinstance(self.tensorboard, bool):
            raise ValueError(f"train.tensorboard={self.tensorboard!r} must be true or false")
        if not isinstance(self.recompute, bool):   # "--train.recompute no" must not be truthy
            raise ValueError(f"train.recompute={self.recompute!r} must be true or false")
        from engine.parallel.rules import check_precision
        check_precision(self.precision)
        if self.profile_steps:
            from engine.train.profiling import parse_steps
            parse_steps(self.profile_steps)   # raises naming train.profile_steps


@dataclass
class DataConfig:
    dir: str = "data"                 # output of runners/prepare_data.py
    task: str = "pretrain"            # pretrain | translation
    objective: str = "glm"            # pretrain objective: glm (blank infilling) | causal
    # translation: several pairs per row, each attending only to itself (model/masks.py
    # `pack`): ~1% padding instead of ~55% at seq_len 48. Pretraining already packs
    # documents into windows and ignores this.
    pack: bool = True

    def __post_init__(self):
        if self.task not in ("pretrain", "translation"):
            raise ValueError(f"data.task={self.task!r} must be 'pretrain' or 'translation'")
        if self.objective not in ("glm", "causal"):
            raise ValueError(f"data.objective={self.objective!r} must be 'glm' or 'causal'")
        if not isinstance(self.pack, bool):
            raise ValueError(f"data.pack={self.pack!r} must be true or false")


# device profiles `--parallel auto` accepts (engine/planner/devices.py has the named ones)
AUTO_DEVICES = ("measure", "cpu", "h100", "a100")


@dataclass
class ParallelConfig:
    tp: int = 1                   # tensor-parallel ranks
    pp: int = 1                   # pipeline stages
    dp: int = 0                       # 0: whatever the world size leaves after tp * pp
    vpp: int = 1                  # model chunks per pipeline stage (interleaved)
    sequence_parallel: bool = False   # with tp > 1: norms / residual sharded along seq
    schedule: str = "1f1b"            # engine.pipeline.names.SCHEDULES
    layer_split: str = "even"         # layers per virtual stage: even | balanced (by cost) |
    #                                   "5,3" (virtual stage 0 first; engine/parallel/split.py)
    zero_stage: int = 0           # 0, 1 (optimizer state) or 2 (and grads) sharded over dp
    timeout_s: float = 120.0          # collectives / p2p; a dead rank fails others by then
    # auto (`--parallel auto`): engine.planner chooses tp, pp, dp, vpp, schedule, zero_stage,
    # sequence_parallel and train.micro_batch_size / num_microbatches / recompute for the
    # world size, keeping the global batch (micro_batch_size * num_microbatches * dp as given)
    auto: bool = False
    device: str = "measure"           # auto's device profile: measure (calibrate this
    #                                   machine at start), cpu (calibrate the CPU), h100, a100
    memory_gb: float = 0.0            # auto's per-device memory; 0: the device profile's

    def __post_init__(self):
        if not self.timeout_s > 0:       # also refuses nan; 0 or less would reach C++
            raise ValueError(f"parallel.timeout_s={self.timeout_s} must be > 0")
        for name in ("tp", "pp", "vpp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.dp < 0:
            raise ValueError(f"parallel.dp={self.dp} must be >= 0 (0 = infer)")
        from engine.pipeline.names import SCHEDULES
        if self.schedule not in SCHEDULES:
            raise ValueError(f"parallel.schedule={self.schedule!r} must be one of "
                             f"{', '.join(SCHEDULES)}")
        from engine.parallel.split import parse_layer_split
        parse_layer_split(self.layer_split)   # raises naming parallel.layer_split
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"parallel.zero_stage={self.zero_stage} must be 0, 1 or 2")
        if self.device not in AUTO_DEVICES:
            raise ValueError(f"parallel.device={self.device!r} must be one of "
                             f"{', '.join(AUTO_DEVICES)}")
        if self.memory_gb < 0:
            raise ValueError(f"parallel.memory_gb={self.memory_gb} must be >= 0 (0 = the "
                             "device's)")


@dataclass
class RunConfig:
    model: GLMConfig = field(default_factory=lambda: GLMConfig.preset("tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": GLMConfig, "train": TrainConfig, "data": DataConfig,
             "parallel": ParallelConfig}


def _parse_scalar(text: str):
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("null", "none", "~"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip("'\"")


def _read_yaml_subset(path: str) -> dict:
    """Two-level YAML: `section:` lines, then indented `key: value` scalars (no PyYAML
    dependency for a config this flat)."""
    out, section = {}, None
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].rstrip()
            if not line.strip():
                continue
            if ":" not in line:
                raise ValueError(f"{path}:{n}: expected 'key: value', got {raw.strip()!r}")
            key, value = line.split(":", 1)
            if not line[0].isspace():
                if value.strip():
                    raise ValueError(f"{path}:{n}: top-level keys must be sections")
                section = out.setdefault(key.strip(), {})
            elif section is None:
                raise ValueError(f"{path}:{n}: indented key outside a section")
            else:
                section[key.strip()] = _parse_scalar(value)
    return out


def load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} does not exist")
    if path.endswith((".yaml", ".yml")):
        return _read_yaml_subset(path)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None


def parse_overrides(args: list[str]) -> dict:
    """['--train.lr', '3e-4', '--model.preset=small'] -> {'train': {'lr': 3e-4}, ...}
    `--parallel auto` (or --parallel=auto) is short for --parallel.auto true. A list
    field's value stays the text given ("80,90"; a JSON list "[80, 90]" is parsed):
    engine/config_cli.py splits it, knowing the field's type."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--parallel" or arg.startswith("--parallel="):
            value = arg.split("=", 1)[1] if "=" in arg else (
                args[i + 1] if i + 1 < len(args) else "")
            if value != "auto":
                raise ValueError(f"--parallel takes only 'auto' (got {value!r}); set fields "
                                 "with --parallel.field value")
            out.setdefault("parallel", {})["auto"] = True
            i += 1 if "=" in arg else 2
            continue
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"unrecognised argument {arg!r}: overrides look like "
                             "--section.field value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg} has no value")
            key, value = arg[2:], args[i + 1]
            i += 2
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = _parse_scalar(value)
    return out


def pop_section(base: dict, overrides: dict, name: str):
    """Split a runner's own section (e.g. "distill", "finetune") off the file config and
    the overrides: (base, overrides) without it, and its merged fields."""
    base, overrides = dict(base), dict(overrides)
    return base, overrides, {**base.pop(name, {}), **overrides.pop(name, {})}


def build_run_config(base: dict | None = None, overrides: dict | None = None) -> RunConfig:
    merged: dict = {}
    for src in (base or {}, overrides or {}):
        for section, values in src.items():
            if section not in _SECTIONS:
                raise ValueError(f"unknown config section {section!r}; known: "
                                 f"{', '.join(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ValueError(f"config section {section!r} must be a mapping")
            merged.setdefault(section, {}).update(values)
    kwargs = {}
    for section, cls in _SECTIONS.items():
        values = dict(merged.get(section, {}))
        if cls is GLMConfig:
            preset = values.pop("preset", "tiny")
            if not isinstance(preset, str):
                raise ValueError(f"model.preset={preset!r} must be a preset name")
            known = {f.name for f in dataclasses.fields(GLMConfig)}
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(f"unknown model field(s): {', '.join(bad)}")
            kwargs[section] = GLMConfig.preset(preset, **check_fields(cls, values, section))
        else:
            known = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(f"unknown {section} field(s): {', '.join(bad)}")
            kwargs[section] = cls(**check_fields(cls, values, section))
    return RunConfig(**kwargs)
