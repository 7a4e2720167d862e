"""The report's claims over seeds: which runs are repeated, what each repeat is called,
and the tables that say whether a difference is larger than what the seed alone moves.

The comparisons that decide the paper's claims (importance vs random pruning + KD, mixed
vs source-only vs target-only fine-tuning, student vs teacher) run once per seed. The
first seed is the report's own `seed` and its runs keep their plain names (every other
table reads them); seed s of the others is `<name>@seed<s>`, in <work_dir>/seed<s>/. The
seed sets the fine-tuning / distillation runs' init and data order and the pruning's
draw; the shared base model (from the pretrained LM) is the same for every seed.

A row "differs beyond the seed spread" on a metric when its min..max over seeds and the
reference row's do not overlap: the gap between the two is larger than anything a change
of seed produced in either."""
from __future__ import annotations

import statistics

# (key in results, field, label, format); "runs" = the stage's finetune.json, "quality"
# = the checkpoint's evaluation
DEV_D = ("runs", "dev_loss_target", "dev loss D_d", ".3f")
DEV_S = ("runs", "dev_loss_source", "dev loss D_s", ".3f")
BLEU = ("quality", "bleu", "BLEU en→zh", ".2f")
CHRF = ("quality", "chrf", "chrF en→zh", ".2f")
BLEU_ZE = ("quality", "bleu_zh_en", "BLEU zh→en", ".2f")

# (report file, title, [(row label, stage name)], metrics); the first row is the reference
COMPARISONS = [
    ("figure4_compression_vs_random.md", "activation-importance vs random pruning, both "
     "distilled", [("activation importance + KD", "st_mixed_{k}"),
                   ("random pruning + KD", "st_random_{k}")], [DEV_D, BLEU, CHRF]),
    ("figure5_finetuning.md", "fine-tuning strategies",
     [("mixed", "ft_mixed"), ("source-only", "ft_source"), ("target-only", "ft_target")],
     [DEV_D, DEV_S, BLEU, CHRF, BLEU_ZE]),
    ("table4_compression.md", "student vs teacher",
     [("teacher (hybrid fine-tuned)", "ft_mixed"), ("student, {k:.0%} target", "st_mixed_{k}")],
     [DEV_D, BLEU, CHRF, BLEU_ZE]),
]


def seed_list(rc: dict) -> list[int]:
    return [rc["seed"] + i for i in range(rc.get("seeds", 1))]


def label(name: str, seed: int, first_seed: int) -> str:
    """The results key (and log name) of stage `name` run with `seed`."""
    return name if seed == first_seed else f"{name}@seed{seed}"


def values(res: dict, name: str, metric) -> list[float]:
    """The metric of stage `name` at each seed (those that have it)."""
    where, field = metric[0], metric[1]
    seeds = seed_list(res["config"])
    out = []
    for s in seeds:
        rec = res[where].get(label(name, s, seeds[0]))
        if rec is not None and rec.get(field) is not None:
            out.append(float(rec[field]))
    return out


def beyond_spread(a: list[float], b: list[float]) -> bool | None:
    """True when the min..max ranges do not overlap; None with fewer than two seeds."""
    if len(a) < 2 or len(b) < 2:
        return None
    return max(a) < min(b) or max(b) < min(a)


def _cell(v: list[float], fmt: str) -> str:
    if not v:
        return "-"
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(statistics.fmean(v), fmt)} ({format(min(v), fmt)}..{format(max(v), fmt)})"


def table(res: dict, title: str, rows, metrics) -> str:
    k = res["config"]["ablation_keep"]
    seeds = seed_list(res["config"])
    ref_label, ref_name = rows[0][0].format(k=k), rows[0][1].format(k=k)
    head = ["row"] + [m[2] for m in metrics] + [f"beyond the seed spread vs {ref_label}"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(metrics) + "---|"]
    for row_label, name in rows:
        name = name.format(k=k)
        cells = [row_label.format(k=k)]
        verdicts = []
        for m in metrics:
            v = values(res, name, m)
            cells.append(_cell(v, m[3]))
            if name != ref_name:
                b = beyond_spread(v, values(res, ref_name, m))
                verdicts.append(f"{m[2]}: " + {True: "yes", False: "no", None: "n/a"}[b])
        cells.append("reference" if name == ref_name else "; ".join(verdicts))
        lines.append("| " + " | ".join(cells) + " |")
    if len(seeds) == 1:
        intro = (f"One seed ({seeds[0]}): no spread to compare a difference with (n/a); "
                 "run with --seeds 2 or more.")
    else:
        intro = (f"Mean (min..max) over seeds {', '.join(map(str, seeds))}; \"yes\" = the "
                 "row's min..max does not overlap the reference's (the difference exceeds "
                 "the seed spread).")
    plural = "s" if len(seeds) > 1 else ""
    return (f"## Over {len(seeds)} seed{plural}: {title}\n\n{intro}\n\n"
            + "\n".join(lines) + "\n")


def sections(res: dict) -> dict[str, str]:
    """{report file: its seed table} for every comparison."""
    return {f: table(res, title, rows, metrics) for f, title, rows, metrics in COMPARISONS}
