r"""Learning curves: BLEU, chrF, exact match and teacher-forced loss of every kept checkpoint
of one or more training runs, against the tokens and the training time that produced them.

This is how the demo's recipe was chosen (README, "How the demo's recipe was chosen"):
train with `--train.save_every N --train.keep_checkpoints K`, then

    python runners/learning_curve.py --curve.runs runs/a,runs/b --curve.labels A,B \
        --curve.offsets 420,0 --curve.input data/pairs/test.tsv --curve.out docs/curve

`offsets` are seconds spent before each run began (its pretraining), so runs that split
one time budget differently line up on the time axis. Every checkpoint is scored on the
same seeded subset of `input`. Writes PREFIX.md, PREFIX.json and, with matplotlib (the
"report" extra), PREFIX.png.

A cosine schedule has not decayed at an intermediate checkpoint, so a point of a long run
is a lower bound for a run stopped (and decayed) there; the chosen recipe's own end point
is measured by `make demo` itself."""
from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass, field

from engine.config_cli import command


@dataclass
class CurveConfig:
    runs: list[str] = field(default_factory=list)      # run folders (train.out_dir of each run)
    labels: list[str] = field(default_factory=list)    # one name per run (none: folder names)
    offsets: list[float] = field(default_factory=list)  # seconds spent before each run (its pretraining)
    seconds_per_step: float = 0.0  # > 0: time axis = offset + step x this (a step time measured
    #   on an idle machine), for runs timed on a busy one; 0: the run's own measured seconds
    input: str = ""              # TSV of english<TAB>chinese pairs to score on (required)
    limit: int = 300             # a seeded subset of this many pairs (0 = all)
    seed: int = 0                # seed of that subset
    out: str = ""                # output prefix: PREFIX.md / .json / .png ("": print only)
    micro_batch_size: int = 64   # sentences decoded together
    max_new_tokens: int = 64     # decoding stops here at the latest
    threads: int = 0             # torch intra-op threads; 0 leaves torch's default

    def __post_init__(self):
        if not self.runs or not self.input:
            raise ValueError("curve.runs and curve.input are required")
        n = len(self.runs)
        for name in ("labels", "offsets"):
            got = getattr(self, name)
            if got and len(got) != n:
                raise ValueError(f"curve.{name} has {len(got)} entries for {n} runs")
        if self.limit < 0 or self.micro_batch_size <= 0 or self.max_new_tokens <= 0:
            raise ValueError("curve.limit must be >= 0, micro_batch_size and max_new_tokens > 0")

    def label_list(self) -> list[str]:
        return list(self.labels) or [os.path.basename(os.path.normpath(r)) for r in self.runs]

    def offset_list(self) -> list[float]:
        return [float(x) for x in self.offsets] or [0.0] * len(self.runs)


def subset(pairs: list, n: int, seed: int) -> list:
    """A seeded sample in file order (a catalogue's head is its option-parsing strings, so
    the first n would be a biased sample)."""
    if not n or n >= len(pairs):
        return list(pairs)
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def run_progress(run_dir: str) -> dict[int, tuple[int, float]]:
    """{step: (tokens so far, training seconds so far)} from the run's metrics.jsonl (the
    last record of each step wins: a resumed run rewrites the steps it redid)."""
    per_step: dict[int, tuple[int, float]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "tokens" in rec and "seconds" in rec:
                per_step[rec["step"]] = (rec["tokens"], rec["seconds"])
    out, tokens, seconds = {}, 0, 0.0
    for step in sorted(per_step):
        tokens += per_step[step][0]
        seconds += per_step[step][1]
        out[step] = (tokens, seconds)
    return out


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint the run kept, oldest first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")):
        if os.path.exists(os.path.join(path, "meta.json")):
            found.append((int(os.path.basename(path).split("_")[1]), path))
    return sorted(found)


def score_checkpoint(path: str, pairs: list, cc: CurveConfig) -> dict:
    from engine.recipe.data.prompts import TranslationFormat
    from engine.recipe.evaluate import full_loss, pairs_dataset, score, translate
    from engine.train import checkpoint as ckpt_lib
    from model import GLM, GLMConfig
    from model.tokenizer import load_tokenizer

    ckpt = ckpt_lib.Checkpoint(path)
    tok = load_tokenizer(os.path.join(path, "tokenizer.model"))
    cfg = GLMConfig.from_dict(ckpt.meta["config"]["model"])
    model = GLM.build(cfg)
    ckpt_lib.load_model_weights(model, ckpt)
    model.eval()
    hyps, _, _ = translate(model, tok, [en for en, _ in pairs], batch_size=cc.micro_batch_size,
                           max_new_tokens=cc.max_new_tokens)
    held = pairs_dataset(tok, TranslationFormat(tok, cfg), pairs)
    return {**score(hyps, [zh for _, zh in pairs]), "loss": full_loss(model, held)}


def scored_pairs(cc: CurveConfig) -> list[tuple[str, str]]:
    from engine.recipe.data.corpus import read_tsv
    return subset([(en, zh) for en, zh in read_tsv(cc.input)], cc.limit, cc.seed)


def measure(cc: CurveConfig, log=print, pairs=None) -> list[dict]:
    pairs = scored_pairs(cc) if pairs is None else pairs
    rows = []
    for run, label, offset in zip(cc.runs, cc.label_list(), cc.offset_list()):
        progress = run_progress(run)
        found = checkpoints(run)
        if not found:
            raise ValueError(f"{run} has no kept checkpoints (train with --train.save_every "
                             "and --train.keep_checkpoints)")
        for step, path in found:
            tokens, seconds = progress.get(step, (None, None))
            s = score_checkpoint(path, pairs, cc)
            if cc.seconds_per_step > 0:
                seconds = step * cc.seconds_per_step
            row = {"run": label, "step": step, "tokens": tokens, "train_s": seconds,
                   "total_s": None if seconds is None else offset + seconds, **s}
            log(f"{label} step {step}: BLEU {s['bleu']:.2f} chrF {s['chrf']:.2f} "
                f"exact {s['exact_match']:.1f}% loss {s['loss']:.3f}"
                + ("" if seconds is None else f" ({row['total_s'] / 60:.1f} min)"))
            rows.append(row)
    return rows


def markdown(rows: list[dict], cc: CurveConfig, n_pairs: int) -> str:
    head = ("| run | step | training tokens | minutes (with offset) | BLEU | chrF | exact % "
            "| loss |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r['run']} | {r['step']} | {r['tokens'] or 0:,} | "
            f"{(r['total_s'] or 0) / 60:.1f} | {r['bleu']:.2f} | {r['chrf']:.2f} | "
            f"{r['exact_match']:.1f} | {r['loss']:.3f} |" for r in rows]
    clock = (f"{cc.seconds_per_step} s per step (measured on an idle machine)"
             if cc.seconds_per_step > 0 else "each run's measured step times")
    return (f"Scored on {n_pairs} pairs of {cc.input} (seed {cc.seed}), greedy decoding; "
            f"minutes: the offset plus {clock}.\n\n"
            + "\n".join([head] + body))


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label in dict.fromkeys(r["run"] for r in rows):
        rs = [r for r in rows if r["run"] == label and r["total_s"] is not None]
        x = [r["total_s"] / 60 for r in rs]
        for ax, key in zip(axes, ("bleu", "chrf", "loss")):
            ax.plot(x, [r[key] for r in rs], marker="o", label=label)
    for ax, name in zip(axes, ("BLEU", "chrF", "teacher-forced loss")):
        ax.set_xlabel("minutes of training (pretraining included)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(cc: CurveConfig, log=print) -> list[dict]:
    import torch
    if cc.threads:
        torch.set_num_threads(cc.threads)
    pairs = scored_pairs(cc)
    rows = measure(cc, log, pairs)
    text = markdown(rows, cc, len(pairs))
    log(text)
    if cc.out:
        os.makedirs(os.path.dirname(os.path.abspath(cc.out)), exist_ok=True)
        with open(cc.out + ".md", "w", encoding="utf-8") as f:
            f.write(text + "\n")
        with open(cc.out + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        drew = plot(rows, cc.out + ".png")
        log(f"wrote {cc.out}.md, {cc.out}.json" + (f", {cc.out}.png" if drew else
                                                 " (no PNG: matplotlib is not installed)"))
    return rows



COMMAND = command(__doc__, {"curve": CurveConfig})


def main(argv=None):
    COMMAND.main(lambda config: run(config.curve), argv)
