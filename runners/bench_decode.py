"""Decode latency of several checkpoints, side by side in one run: batch-1 greedy decoding
of a fixed number of new tokens per prompt (the end token is never accepted, so every
model does the same work whatever it would have said), the models interleaved round by
round so that load on a shared machine falls on all of them alike. Prints the median ms
per generated token and each model's ratio to the first (e.g. student / teacher).

    python runners/bench_decode.py runs/demo/translate/checkpoint \
        runs/demo/student/kd/checkpoint --bench.names teacher,student
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from engine.config_cli import Alias, command
from engine.errors import run_main
from engine.recipe.decode_bench import bench, table


@dataclass
class BenchDecode:
    checkpoints: list[str] = field(default_factory=list)  # checkpoint directories (the bare
    #                                words of the command line); ratios are to the first
    names: list[str] = field(default_factory=list)  # one label per checkpoint ([]: the
    #                                checkpoints' folder names)
    prompts: int = 8               # English sources per round
    new_tokens: int = 32           # tokens generated per prompt
    rounds: int = 5                # interleaved rounds (median)
    threads: int = 1               # torch intra-op threads

    def __post_init__(self):
        if not self.checkpoints:
            raise ValueError("bench.checkpoints: give at least one checkpoint directory")
        for k in ("prompts", "new_tokens", "rounds", "threads"):
            if getattr(self, k) <= 0:
                raise ValueError(f"bench.{k}={getattr(self, k)} must be positive")
        if self.names and (len(self.names) != len(self.checkpoints)
                           or len(set(self.names)) != len(self.names)):
            raise ValueError("bench.names needs one distinct label per checkpoint")


@dataclass
class BenchData:
    dir: str = "data"              # prepared data: the prompts are its held-out test pairs


COMMAND = command(__doc__, {"bench": BenchDecode, "data": BenchData},
                  positional="bench.checkpoints", aliases={
                      "--names": Alias("bench.names", many=True),
                      "--data-dir": Alias("data.dir"), "--prompts": Alias("bench.prompts"),
                      "--new-tokens": Alias("bench.new_tokens"),
                      "--rounds": Alias("bench.rounds"), "--threads": Alias("bench.threads")})


def run(config):
    import torch

    from engine.recipe.compress.export import load_glm
    from engine.recipe.data.corpus import read_tsv
    from engine.recipe.evaluate import prompt_ids, translation_format
    from model.tokenizer import load_tokenizer
    from pathlib import Path

    b, data_dir = config.bench, config.data.dir
    torch.set_num_threads(b.threads)
    names = b.names or [os.path.basename(os.path.dirname(os.path.abspath(c)))
                        for c in b.checkpoints]
    if len(set(names)) != len(names):
        raise ValueError("bench.names needs one distinct label per checkpoint")
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer", "tokenizer.model"))
    pairs = read_tsv(Path(data_dir) / "pairs" / "test.tsv")[:b.prompts]
    if not pairs:
        raise ValueError(f"no test pairs in {data_dir}/pairs/test.tsv")
    models = {}
    for name, path in zip(names, b.checkpoints):
        model, ckpt = load_glm(path)
        ckpt.check_tokenizer(tok.sha256, os.path.join(data_dir, "tokenizer"))
        models[name] = model.eval()
    # the first model's prompt layout (native, or an imported ChatGLM's chat prompt)
    fmt = translation_format(next(iter(models.values())), tok)
    prompts = [prompt_ids(tok, en, 96, fmt) for en, _ in pairs]
    with torch.no_grad():
        times = bench(models, prompts, b.new_tokens, b.rounds, tok.pad_id, tok.sop_id)
    print(f"batch-1 greedy decode, {len(prompts)} prompts x {b.new_tokens} new tokens, "
          f"{b.rounds} interleaved rounds, {b.threads} thread(s)")
    print(table(models, times))


def main(argv=None):
    return COMMAND.main(run, argv)


if __name__ == "__main__":
    run_main(main)
