"""Results dict (engine/recipe/reports/recipe.py) -> reports/*.md and PNG plots. Plots need
matplotlib (the optional "report" extra); without it the markdown is still written and
says the plots were skipped."""
from __future__ import annotations

import json
import os

from engine.recipe.reports import seeds

FLAGS = "✓"


def _f(v, fmt=".2f"):
    return "-" if v is None else format(v, fmt)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or ("---|" + "---:|" * (len(head) - 1))
    return "\n".join([_row(head), "|" + align] + [_row(r) for r in rows])


# ---- the tables ---------------------------------------------------------------------------

def table4(res: dict) -> tuple[str, list]:
    q, runs, rc = res["quality"], res["runs"], res["config"]
    teacher_ne = q["ft_mixed"]["non_embedding_params"]
    rows = [("teacher (hybrid fine-tuned)", "ft_mixed", "ft_mixed")]
    for level in sorted(rc["keep_levels"], reverse=True):
        rows.append((f"student, {level:.0%} target", f"st_mixed_{level}",
                     f"st_mixed_{level}"))
    head = ["model", "non-emb. params kept", "params", "non-emb. params", "disk MB",
            "latency ms/sent", "ms/token", "BLEU en→zh", "chrF en→zh", "exact %",
            "BLEU zh→en", "dev loss D_d"]
    body, plot = [], []
    for label, qk, rk in rows:
        r = q[qk]
        body.append([label, f"{r['non_embedding_params'] / teacher_ne:.1%}", f"{r['params']:,}",
                     f"{r['non_embedding_params']:,}", _f(r["disk_mb"]), _f(r["latency_ms"], ".1f"),
                     _f(r.get("latency_ms_per_token")), _f(r["bleu"]), _f(r["chrf"]), _f(r["exact_match"], ".1f"),
                     _f(r["bleu_zh_en"]), _f(runs[rk]["dev_loss_target"], ".3f")])
        plot.append((label, r))
    return _table(head, body), plot


ABLATION = [  # (label, pipeline, compression, hybrid FT, quality key, training stages)
    ("baseline (source-only FT)", 0, 0, 0, "ft_source", ["ft_source"]),
    ("+ pipeline-parallel training", 1, 0, 0, "ft_source_pp", ["ft_source_pp"]),
    ("+ mixed compression", 0, 1, 0, "st_source_{k}", ["ft_source", "st_source_{k}"]),
    ("+ hybrid fine-tuning", 0, 0, 1, "ft_mixed", ["ft_mixed"]),
    ("pipeline + compression", 1, 1, 0, "st_source_pp_{k}",
     ["ft_source_pp", "st_source_pp_{k}"]),
    ("pipeline + hybrid FT", 1, 0, 1, "ft_mixed_pp", ["ft_mixed_pp"]),
    ("compression + hybrid FT", 0, 1, 1, "st_mixed_{k}", ["ft_mixed", "st_mixed_{k}"]),
    ("all three (LightChatGLM)", 1, 1, 1, "st_mixed_pp_{k}", ["ft_mixed_pp", "st_mixed_pp_{k}"]),
]


def table5(res: dict) -> str:
    q, runs, k = res["quality"], res["runs"], res["config"]["ablation_keep"]
    head = ["variant", "PP", "MC", "HFT", "training s", "params", "disk MB",
            "latency ms/sent", "ms/token", "BLEU en→zh", "chrF en→zh", "BLEU zh→en",
            "dev loss D_d", "dev loss D_s"]
    body = []
    for label, pp, mc, hft, qk, stages in ABLATION:
        qk = qk.format(k=k)
        names = [s.format(k=k) for s in stages]
        r, last = q[qk], runs[names[-1]]
        t = sum(runs[s]["step_seconds"] for s in names)
        body.append([label, FLAGS if pp else "", FLAGS if mc else "", FLAGS if hft else "",
                     _f(t, ".1f"), f"{r['params']:,}", _f(r["disk_mb"]),
                     _f(r["latency_ms"], ".1f"), _f(r.get("latency_ms_per_token")),
                     _f(r["bleu"]), _f(r["chrf"]),
                     _f(r["bleu_zh_en"]), _f(last["dev_loss_target"], ".3f"),
                     _f(last["dev_loss_source"], ".3f")])
    return _table(head, body, "---|:-:|:-:|:-:|" + "---:|" * (len(head) - 4))


def figure3_table(res: dict) -> str:
    f3 = res["figure3"]
    sizes = sorted({int(b) for d in f3["epoch_seconds"].values() for b in d})
    head = ["variant"] + [f"batch {b}" for b in sizes]
    body = [[v] + [_f(d.get(b, d.get(str(b))), ".2f") for b in sizes]
            for v, d in f3["epoch_seconds"].items()]
    return _table(head, body)


def figure4_table(res: dict) -> str:
    k = res["config"]["ablation_keep"]
    curves = {"mixed compression (activation pruning + distillation)":
              res["runs"][f"st_mixed_{k}"]["dev_curve"],
              "random pruning + distillation": res["runs"][f"st_random_{k}"]["dev_curve"]}
    steps = sorted({s for c in curves.values() for s, _ in c})
    body = [[name] + [_f(dict(c).get(s), ".3f") for s in steps] for name, c in curves.items()]
    return _table(["student"] + [f"step {s}" for s in steps], body), curves


def figure5_table(res: dict) -> tuple[str, dict]:
    q, runs = res["quality"], res["runs"]
    names = {"source-only": "source", "target-only": "target", "mixed": "mixed"}
    body, data = [], {}
    for label, key in names.items():
        r, run = q[f"ft_{key}"], runs[f"ft_{key}"]
        body.append([label, _f(run["alpha"], ".3f"), _f(run["dev_loss_target"], ".3f"),
                     _f(run["dev_loss_source"], ".3f"), _f(r["bleu"]), _f(r["chrf"]),
                     _f(r["bleu_zh_en"])])
        data[label] = (run, r)
    head = ["strategy", "alpha", "dev loss D_d (zh→en)", "dev loss D_s (en→zh)",
            "BLEU en→zh", "chrF en→zh", "BLEU zh→en"]
    return _table(head, body), data


# ---- the plots ----------------------------------------------------------------------------

def _plots(res: dict, out: str, t4, curves4, data5) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []

    def save(fig, name):
        path = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(name)

    f3 = res["figure3"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, d in f3["epoch_seconds"].items():
        bs = sorted(int(b) for b in d)
        ax.plot(bs, [d.get(b, d.get(str(b))) for b in bs], marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size (sequences)")
    ax.set_ylabel("training time per epoch (s)")
    ax.set_title(f"Figure 3: schedules on gloo, epoch = {f3['epoch_samples']} sequences")
    ax.legend()
    save(fig, "figure3_schedules.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves4.items():
        ax.plot([s for s, _ in c], [v for _, v in c], marker="o", label=name)
    ax.set_xlabel("distillation step")
    ax.set_ylabel("validation loss on D_d (nats/token)")
    ax.set_title("Figure 4: mixed compression vs random pruning")
    ax.legend()
    save(fig, "figure4_validation_loss.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, (run, _) in data5.items():
        c = run["dev_curve"]
        a1.plot([s for s, _ in c], [v for _, v in c], marker="o", label=label)
    a1.set_xlabel("fine-tuning step")
    a1.set_ylabel("validation loss on D_d (nats/token)")
    a1.legend()
    labels = list(data5)
    x = range(len(labels))
    a2.bar([i - 0.2 for i in x], [data5[l][1]["bleu"] for l in labels], 0.4, label="en→zh")
    a2.bar([i + 0.2 for i in x], [data5[l][1]["bleu_zh_en"] for l in labels], 0.4,
           label="zh→en")
    a2.set_xticks(list(x), labels)
    a2.set_ylabel("BLEU (sacrebleu, 0-100)")
    a2.legend()
    fig.suptitle("Figure 5: fine-tuning strategies (teacher)")
    save(fig, "figure5_strategies.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    # per generated token: ms per sentence also moves with how long each model's output is
    lat = [r.get("latency_ms_per_token") or float("nan") for _, r in t4]
    ax.plot([r["params"] / 1e6 for _, r in t4], lat, marker="o")
    for (label, r), y in zip(t4, lat):
        ax.annotate(label, (r["params"] / 1e6, y), fontsize=7)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("decode latency, batch 1 (ms / generated token)")
    ax.set_title("Table 4: compression levels")
    save(fig, "table4_latency.png")
    return written


def write_reports(res: dict, out: str) -> dict:
    """Writes the markdown (always) and plots (when matplotlib imports). Returns
    {"markdown": [...], "plots": [...], "plots_skipped": reason or None}."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, default=str)
    t4, t4_plot = table4(res)
    f4, curves4 = figure4_table(res)
    f5, data5 = figure5_table(res)
    try:
        plots, skipped = _plots(res, out, t4_plot, curves4, data5), None
    except ImportError as e:
        plots, skipped = [], f"plots skipped: matplotlib is not installed ({e}); " \
                             "install the extra: pip install -e '.[report]'"
    rc = res["config"]
    base = (f"base: the trained checkpoint {rc['base']}" if rc.get("base") else
            f"base from the pretrained LM {rc['pretrained']}" if rc.get("pretrained")
            else "base trained from scratch")
    if rc.get("base"):
        base += (f" (fine-tunings at lr {rc['finetune_lr']:g}, distillation "
                 f"{rc['distill_steps']} steps at lr {rc['distill_lr']:g})")
    reused = res.get("reused") or []
    took = f"in {res['wall_seconds']:.0f} s" + (
        f" (resumed: {len(reused)} training / pruning stages reused from an earlier run; "
        "their training s are that run's)" if reused else "")
    note = (f"\n_Generated by runners/report.py {took}; preset "
            f"{rc['preset']}, {base}, {rc['train_pairs']} training pairs per task, "
            f"{rc['test_sentences']} test sentences, seq_len {rc['seq_len']}, batch "
            f"{rc['micro_batch_size']} x {rc.get('num_microbatches', 1)} microbatches; "
            f"alpha = {rc['alpha']}, lambda = {rc['lam']}, T = 1. "
            "Every number is read from the runs in results.json._\n")
    if skipped:
        note += f"\n**{skipped}**\n"

    def img(name):
        return f"\n![{name}]({name})\n" if name in plots else ""
    docs = {
        "table4_compression.md": "# Table 4: compression levels\n\nStudents pruned from the "
        "hybrid-fine-tuned teacher (activation importance, paper rule), then continued "
        f"distillation on D_d (Eq. 13).\n\n{t4}\n{img('table4_latency.png')}{note}",
        "table5_ablation.md": "# Table 5: ablation\n\nPP = 2-stage 1F1B pipeline training "
        "(gloo, 1 thread per stage) instead of one process; MC = mixed compression (pruning "
        f"to {rc['ablation_keep']:.0%} of non-embedding parameters + distillation); HFT = "
        "hybrid fine-tuning (mixed) instead of source-only. Training s = optimizer-step time "
        f"of the fine-tuning (+ distillation) stages.\n\n{table5(res)}\n{note}",
        "figure3_schedules.md": "# Figure 3: training time per epoch vs batch size\n\n"
        f"Seconds per epoch (step time x steps per epoch); microbatch "
        f"{res['figure3']['micro_batch']}, seq_len {res['figure3']['seq_len']}.\n\n"
        f"{figure3_table(res)}\n{img('figure3_schedules.png')}{note}",
        "figure4_compression_vs_random.md": "# Figure 4: validation loss, mixed compression "
        f"vs random pruning\n\n{f4}\n{img('figure4_validation_loss.png')}{note}",
        "figure5_finetuning.md": "# Figure 5: fine-tuning strategies\n\nD_s = English-input "
        "(en→zh), D_d = Chinese-input (zh→en).\n\n"
        f"{f5}\n{img('figure5_strategies.png')}{note}",
    }
    if "seeds" in rc:   # results of a report made before seeds have no such tables
        for name, section in seeds.sections(res).items():
            docs[name] = docs[name].replace(note, f"\n{section}{note}", 1)
    for name, text in docs.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
    return {"markdown": sorted(docs), "plots": plots, "plots_skipped": skipped}
