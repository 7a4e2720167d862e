"""Train a GLM: pretraining (GLM blank infilling or causal LM on mixed EN/ZH text) or
translation fine-tuning, configured by a JSON/YAML file plus --section.field overrides.

    python runners/pretrain.py --config configs/demo_pretrain.json --train.steps 50
    torchrun --nproc_per_node 1 runners/pretrain.py --config configs/demo_pretrain.json
    python runners/pretrain.py --config ... --resume          # continue from out_dir

Sections: model (preset + GLMConfig fields), train (TrainConfig), data (DataConfig),
parallel (ParallelConfig; `--parallel auto` lets the planner choose the layout)."""
from __future__ import annotations

from engine.config import (DataConfig, ParallelConfig, RunConfig, TrainConfig,
                           build_run_config)
from engine.config_cli import Command
from engine.train.lifecycle import open_run, tokenizer_files
from model.config import GLMConfig

FLAGS = {"--resume": "continue from the newest complete checkpoint in <train.out_dir>",
         "--force": "start over in an out_dir that holds checkpoints (they are removed "
                    "once this run saved its first one)"}
COMMAND = Command(__doc__, {"model": GLMConfig, "train": TrainConfig, "data": DataConfig,
                            "parallel": ParallelConfig},
                  build_run_config, flags=FLAGS,
                  extra_fields={"model": {"preset": "named model shape the other model "
                                          "fields override (model/config.py PRESETS) "
                                          "(default: \"tiny\")"}})


def train(cfg: RunConfig, resume: bool = False, force: bool = False, log=print):
    """-> (Trainer, final checkpoint path). force: start over in an out_dir that holds
    checkpoints (they are set aside)."""
    from engine.recipe.data.loaders import make_datasets
    from engine.train import checkpoint as ckpt_lib
    from engine.parallel.state import model_parallel_group
    from engine.train.build import layout_line
    from engine.train.launch import resolve_parallel
    from engine.train.metrics import params_line
    from engine.train.trainer import Trainer
    from model.config import with_layout_of
    cfg = resolve_parallel(cfg, log)
    tc = cfg.train
    if tc.init_from:
        # an imported ChatGLM keeps its causal 1D layout and rope (model/config.py)
        cfg.model = with_layout_of(cfg.model, ckpt_lib.Checkpoint(tc.init_from)
                                   .meta.get("config", {}).get("model", {}))
    with open_run(cfg, resume, force, log) as run:
        state = run.state
        tok, train_data, dev = make_datasets(cfg.data.dir, cfg.data.task, tc.seq_len,
                                             tc.seed, cfg.model.padded_vocab_size,
                                             cfg.data.objective, model_config=cfg.model,
                                             pack=cfg.data.pack)
        trainer = Trainer.from_config(cfg, train_data, dev, state=state, tokenizer_sha256=tok.sha256,
                                      log=log, mp_group=model_parallel_group(state),
                                      extra_files=tokenizer_files(tok))
        run.resume(trainer)
        params = params_line(cfg.model, trainer.named_trained_parameters(), state)
        layout = layout_line(cfg, state) + (" | activation recompute" if tc.recompute
                                            else "")
        trainer.log(f"model: {params} | {layout} | task "
                    f"{cfg.data.task} | {tc.steps} steps x {tc.num_microbatches} x "
                    f"{tc.micro_batch_size} x {tc.seq_len} per dp rank")
        trainer.fit()
        path = run.save(trainer)
        trainer.log(run.saved_line(trainer, path))
        return trainer, path


def run(cfg: RunConfig, resume: bool = False, force: bool = False, log=print) -> str:
    """Train `cfg` -> the final checkpoint's path."""
    return train(cfg, resume, force, log)[1]


def main(argv=None):
    COMMAND.main(run, argv, training=True)
