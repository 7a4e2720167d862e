r"""Evaluate a checkpoint on English -> Chinese translation: KV-cache decoding, sacrebleu
BLEU (tokenize="zh") and chrF, exact match, teacher-forced loss on the whole dev split and
on the evaluated pairs (held-out loss), parameters, size on disk, latency and tokens/s.
Writes <eval.out_dir>/eval.json and eval.md.

    python runners/evaluate.py --eval.checkpoint runs/demo/translate/checkpoint \
        --eval.input data/pairs/test.tsv --data.dir data --eval.out_dir runs/demo/eval

Any TSV of `english<TAB>chinese` lines works as eval.input."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

from engine.config_cli import Alias, Command, build_section


@dataclass
class EvalConfig:
    checkpoint: str = ""           # checkpoint directory (required)
    input: str = ""                # TSV: english<TAB>chinese per line (required)
    tokenizer: str = ""            # tokenizer.model ("": the one saved with the checkpoint)
    out_dir: str = ""              # folder for eval.json / eval.md ("": print only)
    save_hyps: str = ""            # also write every hypothesis: english<TAB>reference<TAB>hypothesis
    name: str = "model"            # row name in the markdown table
    mode: str = "greedy"           # decoding: greedy | beam
    num_beams: int = 4             # beams of mode beam
    max_new_tokens: int = 64       # decoding stops here at the latest
    micro_batch_size: int = 32     # sentences decoded together
    limit: int = 0                 # first N sentences only (0 = all)
    latency_samples: int = 16      # single-sentence decodes timed for the latency figure
    threads: int = 0               # torch intra-op threads; 0 leaves torch's default

    def __post_init__(self):
        if not self.checkpoint or not self.input:
            raise ValueError("eval.checkpoint and eval.input are required")
        if self.mode not in ("greedy", "beam"):
            raise ValueError(f"eval.mode={self.mode!r} must be greedy or beam")
        for name in ("num_beams", "max_new_tokens", "micro_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be positive")
        for name in ("limit", "latency_samples", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 0")


@dataclass
class EvalData:
    dir: str = ""                  # prepared data folder, for the dev-split loss ("": none)


@dataclass
class EvalRun:
    eval: EvalConfig
    data: EvalData

    def to_dict(self) -> dict:
        return {"eval": dataclasses.asdict(self.eval), "data": dataclasses.asdict(self.data)}


def build(base: dict, overrides: dict) -> EvalRun:
    merged = {s: {**base.get(s, {}), **overrides.get(s, {})} for s in ("eval", "data")}
    return EvalRun(build_section(EvalConfig, "eval", merged["eval"]),
                   build_section(EvalData, "data", merged["data"]))


_ALIASES = {"--checkpoint": Alias("eval.checkpoint"), "--input": Alias("eval.input"),
            "--data-dir": Alias("data.dir"), "--tokenizer": Alias("eval.tokenizer"),
            "--out": Alias("eval.out_dir"), "--name": Alias("eval.name"),
            "--mode": Alias("eval.mode"), "--num-beams": Alias("eval.num_beams"),
            "--max-new-tokens": Alias("eval.max_new_tokens"),
            "--batch-size": Alias("eval.micro_batch_size"), "--limit": Alias("eval.limit"),
            "--latency-samples": Alias("eval.latency_samples"),
            "--threads": Alias("eval.threads"), "--save-hyps": Alias("eval.save_hyps")}
COMMAND = Command(__doc__, {"eval": EvalConfig, "data": EvalData}, build, aliases=_ALIASES)


def run(config: EvalRun, log=print):
    """-> the EvalResult (engine/recipe/evaluate.py); with eval.out_dir also eval.json
    and eval.md there."""
    import torch

    from engine.recipe.data.corpus import read_tsv
    from engine.recipe.data.datasets import TranslationDataset
    from engine.recipe.data.prompts import TranslationFormat
    from engine.recipe.evaluate import (eval_seq_len, evaluate, markdown_table,
                                        pairs_dataset, save_hypotheses)
    from engine.train import checkpoint as ckpt_lib
    from model import GLM, GLMConfig
    from model.tokenizer import load_tokenizer

    ec, data_dir = config.eval, config.data.dir
    if ec.threads:
        torch.set_num_threads(ec.threads)
    ckpt = ckpt_lib.Checkpoint(ec.checkpoint)
    tok_path = ec.tokenizer or os.path.join(ec.checkpoint, "tokenizer.model")
    tok = load_tokenizer(tok_path)
    ckpt.check_tokenizer(tok.sha256, tok_path)
    pairs = [(en, zh) for en, zh in read_tsv(ec.input)]
    if ec.limit:
        pairs = pairs[:ec.limit]
    cfg = GLMConfig.from_dict(ckpt.meta["config"]["model"])
    model = GLM.build(cfg)
    ckpt_lib.load_model_weights(model, ckpt)
    print(f"evaluate: {len(pairs):,} pairs from {ec.input} on {ec.checkpoint} "
          f"(step {ckpt.meta['step']}, {model.num_params():,} parameters)", file=sys.stderr,
          flush=True)
    # native GLM layout, or an imported ChatGLM's causal chat prompt (engine/recipe/data/prompts)
    fmt = TranslationFormat(tok, cfg)
    dev = None
    if data_dir:
        dev = TranslationDataset(os.path.join(data_dir, "shards", "translation_dev"),
                                 tok, eval_seq_len(fmt), seed=0, shuffle=False, fmt=fmt)
    heldout = pairs_dataset(tok, fmt, pairs)
    result = evaluate(model, tok, pairs, dev=dev, heldout=heldout,
                      batch_size=ec.micro_batch_size, max_new_tokens=ec.max_new_tokens,
                      mode=ec.mode, num_beams=ec.num_beams,
                      latency_samples=ec.latency_samples, checkpoint_dir=ec.checkpoint,
                      progress=True)
    table = markdown_table({ec.name: result})
    log(table)
    for ex in result.examples[:5]:
        log(f"  EN  {ex['en']}\n  REF {ex['ref']}\n  HYP {ex['hyp']}")
    if ec.out_dir:
        os.makedirs(ec.out_dir, exist_ok=True)
        with open(os.path.join(ec.out_dir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"checkpoint": ec.checkpoint, "input": ec.input,
                       **result.to_dict()}, f, indent=1, ensure_ascii=False)
        with open(os.path.join(ec.out_dir, "eval.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        log(f"wrote {ec.out_dir}/eval.json and eval.md")
    if ec.save_hyps:
        save_hypotheses(ec.save_hyps, pairs, result.hypotheses)
        log(f"wrote {len(result.hypotheses):,} hypotheses to {ec.save_hyps}")
    return result


def main(argv=None):
    COMMAND.main(run, argv)
