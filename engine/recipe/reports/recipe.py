"""The runs behind the report, in order, at the sizes of a ReportConfig:

  base            one model trained on both directions 50/50 (the "ChatGLM" every variant
                  starts from; Algorithm 3 line 1's initialised teacher), from the
                  pretrained LM checkpoint `rc.pretrained` (from scratch without one);
                  or, given `rc.base`, that trained checkpoint (make paper: make demo's
                  teacher) and no base stage
  ft_<strategy>   teacher hybrid fine-tuning from base (Eq. 11-12): source | target | mixed
  ft_<s>_pp       the same under a 2-stage 1F1B pipeline (torchrun, gloo)
  pruned_<...>    structured pruning (activation importance; random for Figure 4)
  st_<...>        continued distillation of the pruned student on D_d (Eq. 13)
  <name>@seed<s>  the runs of the paper's claims again with each further seed
                  (engine/recipe/reports/seeds.py), in <work_dir>/seed<s>/
  + quality of every checkpoint, and the Figure 3 schedule timing.

Training time of a row = the sum of its stages' step times (finetune.json
"step_seconds": optimizer steps only, no start-up or evaluation)."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from engine.recipe.reports import quality, schedule_timing, seeds
from engine.recipe.reports.budget import ReportConfig
from engine.recipe.reports.stages import dev_curve, read_json, run_stage


def _subset(src: str, dst: str, n: int, seed: int) -> int:
    """A seeded random subset of n lines of a TSV (the head of the file is format strings
    from one catalogue, not a fair sample)."""
    with open(src, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    idx = np.sort(np.random.default_rng(seed).permutation(len(lines))[:n])
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(lines[i] for i in idx)
    return len(idx)


class Recipe:
    """resume: reuse the stages a previous run of the same ReportConfig finished in
    work_dir (checkpoint + finetune.json, or a pruned checkpoint), so a report that
    failed late costs only what is left; evaluation and Figure 3 always run again."""

    def __init__(self, rc: ReportConfig, log=print, resume: bool = False):
        self.rc, self.log, self.resume = rc, log, resume
        self.work = rc.work_dir
        os.makedirs(self.work, exist_ok=True)
        self.train_tsv = os.path.join(self.work, "train_subset.tsv")
        self.test_tsv = os.path.join(self.work, "test_subset.tsv")
        self.results: dict = {"config": rc.to_dict(), "runs": {}, "quality": {}}

    # ---- stage helpers ---------------------------------------------------------------
    def _where(self, name: str, seed: int | None) -> tuple[str, str]:
        """(output dir, results key) of stage `name` at `seed` (None: the report's)."""
        seed = self.rc.seed if seed is None else seed
        key = seeds.label(name, seed, self.rc.seed)
        sub = "" if key == name else f"seed{seed}"
        return os.path.join(self.work, sub, name), key

    def _common(self, steps: int, out: str, pp: int, seed: int | None = None,
                lr: float | None = None) -> list[str]:
        rc = self.rc
        threads = 1 if pp > 1 else rc.threads
        return ["--data.dir", rc.data_dir, "--data.task", "translation",
                "--train.steps", str(steps), "--train.seq_len", str(rc.seq_len),
                "--train.lr", str(rc.finetune_lr if lr is None else lr),
                "--train.min_lr", str(rc.min_lr),
                "--train.micro_batch_size", str(rc.micro_batch_size),
                "--train.num_microbatches", str(rc.num_microbatches),
                "--train.warmup_steps", str(max(1, steps // 10)),
                "--train.eval_every", str(rc.eval_every),
                "--train.eval_batches", str(rc.eval_batches),
                "--train.log_every", str(max(1, steps // 4)), "--train.seed",
                str(rc.seed if seed is None else seed),
                "--train.threads", str(threads), "--train.out_dir", out,
                "--parallel.pp", str(pp), "--finetune.lam", str(rc.lam),
                # a stage not reused is redone from its start, over a crashed attempt
                "--force",
                "--finetune.source_tsv", self.train_tsv,
                "--finetune.target_tsv", self.train_tsv]

    def _timed(self, name: str, fn):
        t0 = time.perf_counter()
        fn()
        self.log(f"  {name}: {time.perf_counter() - t0:.1f} s")

    def _reuse(self, name: str, done: str) -> bool:
        if self.resume and os.path.isfile(done):
            self.log(f"  {name}: reused from {os.path.dirname(done)}")
            self.results.setdefault("reused", []).append(name)
            return True
        return False

    def _check_resume(self):
        """A work dir remembers the settings that made it; --resume refuses others (the
        reused stages would not be what the tables say they are)."""
        path = os.path.join(self.work, "report_config.json")
        # seeds: each seed's stages live apart, so more or fewer seeds reuse the others
        mine = {k: v for k, v in self.rc.to_dict().items() if k not in ("out_dir", "seeds")}
        if self.resume and os.path.isfile(path):
            old = read_json(path)
            diff = sorted(k for k in set(mine) | set(old) if mine.get(k) != old.get(k))
            if diff:
                raise ValueError(f"--resume: {self.work} was made with other settings "
                                 f"({', '.join(diff)}); use a new report.work_dir")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(mine, f, indent=1)

    def teacher(self, name: str, strategy: str, steps: int, init: str = "", pp: int = 1,
                alpha: float | None = None, seed: int | None = None):
        out, key = self._where(name, seed)
        argv = ["--finetune.stage", "teacher", *self._common(steps, out, pp, seed),
                "--model.preset", self.rc.preset,
                "--model.padded_vocab_size", str(self.rc.vocab),
                "--finetune.strategy", strategy,
                "--finetune.alpha", str(self.rc.alpha if alpha is None else alpha)]
        if init:
            argv += ["--train.init_from", init]
        if not self._reuse(key, os.path.join(out, "finetune.json")):
            self._timed(key, lambda: run_stage("finetune", argv, out + ".log", nproc=pp))
        self._record(key, out)
        return os.path.join(out, "checkpoint")

    def prune(self, name: str, teacher: str, keep: float, method: str = "activation",
              seed: int | None = None):
        out, key = self._where(name, seed)
        rc = self.rc
        argv = ["--prune.teacher", teacher, "--data.dir", rc.data_dir, "--prune.out_dir", out,
                "--prune.method", method, "--prune.keep", str(keep),
                "--prune.paper_rule", "true", "--prune.calib_batches", str(rc.calib_batches),
                "--prune.micro_batch_size", "8", "--prune.seq_len", str(rc.seq_len),
                "--prune.seed", str(rc.seed if seed is None else seed),
                "--prune.threads", str(rc.threads)]
        if not self._reuse(key, os.path.join(out, "meta.json")):
            self._timed(key, lambda: run_stage("prune", argv, out + ".log"))
        return out

    def student(self, name: str, teacher: str, pruned: str, pp: int = 1,
                seed: int | None = None):
        out, key = self._where(name, seed)
        argv = ["--finetune.stage", "student",
                *self._common(self.rc.distill_steps, out, pp, seed, lr=self.rc.distill_lr),
                "--finetune.teacher", teacher, "--finetune.student", pruned]
        if not self._reuse(key, os.path.join(out, "finetune.json")):
            self._timed(key, lambda: run_stage("finetune", argv, out + ".log", nproc=pp))
        self._record(key, out)
        return os.path.join(out, "checkpoint")

    def claims(self, base: str, seed: int | None = None) -> dict:
        """The runs the paper's claims compare (seeds.COMPARISONS) at one seed: the three
        fine-tuning strategies from the shared base, and the mixed teacher's student
        pruned by activation importance and at random -> {results key: checkpoint}."""
        rc, k = self.rc, self.rc.ablation_keep
        out = {}
        for strategy in ("source", "target", "mixed"):            # Figure 5
            ckpt = self.teacher(f"ft_{strategy}", strategy, rc.finetune_steps, init=base,
                                seed=seed)
            out[self._where(f"ft_{strategy}", seed)[1]] = ckpt
        teacher = out[self._where("ft_mixed", seed)[1]]
        for method, name in (("activation", "mixed"), ("random", "random")):  # Figure 4
            pruned = self.prune(f"pruned_{name}_{k}", teacher, k, method=method, seed=seed)
            ckpt = self.student(f"st_{name}_{k}", teacher, pruned, seed=seed)
            out[self._where(f"st_{name}_{k}", seed)[1]] = ckpt
        return out

    def _record(self, name: str, out: str):
        rec = read_json(os.path.join(out, "finetune.json"))
        rec["dev_curve"] = dev_curve(out)
        self.results["runs"][name] = rec

    def evaluate(self, name: str, checkpoint: str):
        rc = self.rc
        t0 = time.perf_counter()
        q = quality.measure(checkpoint, self.test_tsv,
                            os.path.join(rc.data_dir, "tokenizer", "tokenizer.model"),
                            rc.test_sentences, rc.max_new_tokens, rc.latency_samples)
        from engine.recipe.compress.export import load_glm
        from engine.recipe.compress.search import non_embedding_params
        model, _ = load_glm(checkpoint)
        q["non_embedding_params"] = non_embedding_params(model.config)
        self.results["quality"][name] = q
        self.log(f"  eval {name}: BLEU {q['bleu']:.2f} chrF {q['chrf']:.2f} "
                 f"({time.perf_counter() - t0:.1f} s)")

    def _checked(self, field: str) -> str:
        """The checkpoint in report.<field> (the pretrained LM or a base), checked against
        the report's preset before anything trains (a shape mismatch would otherwise fail
        minutes in)."""
        rc, path = self.rc, getattr(self.rc, field)
        if not path:
            return ""
        from engine.train.checkpoint import Checkpoint, CheckpointError
        from model import GLMConfig
        try:
            meta = Checkpoint(path).meta
        except CheckpointError as e:
            raise ValueError(f"report.{field}: {e}") from None
        have = GLMConfig.from_dict(meta["config"]["model"]).to_dict()
        want = GLMConfig.preset(rc.preset, padded_vocab_size=rc.vocab).to_dict()
        diff = [f"{k} {have.get(k)} != {v}" for k, v in want.items()
                if k != "kernels" and have.get(k) != v]
        if diff:
            raise ValueError(f"report.{field} {path} is not preset {rc.preset} with "
                             f"vocab {rc.vocab}: {', '.join(diff)}")
        return path

    # ---- the whole recipe ------------------------------------------------------------
    def run(self) -> dict:
        rc = self.rc
        t_start = time.perf_counter()
        from model import GLMConfig
        # settings that would fail late fail here, before anything trains
        schedule_timing.interleave_vpp(GLMConfig.preset(rc.preset).num_layers)
        pretrained, given = self._checked("pretrained"), self._checked("base")
        self._check_resume()
        n = _subset(os.path.join(rc.data_dir, "pairs", "train.tsv"), self.train_tsv,
                    rc.train_pairs, rc.seed)
        _subset(os.path.join(rc.data_dir, "pairs", "test.tsv"), self.test_tsv,
                rc.test_sentences, rc.seed)
        self.log(f"report: {n} training pairs per task, preset {rc.preset}, base "
                 + (given if given else f"from {pretrained or 'scratch'}"))
        base = given or self.teacher("base", "mixed", rc.base_steps, init=pretrained,
                                     alpha=0.5)
        claims = self.claims(base)
        teachers = {s: claims[f"ft_{s}"] for s in ("source", "target", "mixed")}
        for strategy in ("source", "mixed"):                       # Table 5: + pipeline
            teachers[f"{strategy}_pp"] = self.teacher(f"ft_{strategy}_pp", strategy,
                                                      rc.finetune_steps, init=base, pp=2)
        k = rc.ablation_keep
        students = {}
        students["mixed"] = claims[f"st_mixed_{k}"]
        for key in ("source", "source_pp", "mixed_pp"):             # Table 5: + compression
            pruned = self.prune(f"pruned_{key}_{k}", teachers[key], k)
            students[key] = self.student(f"st_{key}_{k}", teachers[key], pruned,
                                         pp=2 if key.endswith("_pp") else 1)
        for level in rc.keep_levels:                               # Table 4
            if level == k:
                continue
            pruned = self.prune(f"pruned_mixed_{level}", teachers["mixed"], level)
            students[f"mixed_{level}"] = self.student(f"st_mixed_{level}", teachers["mixed"],
                                                      pruned)
        more = {}
        for seed in seeds.seed_list(rc.to_dict())[1:]:            # the claims, per seed
            more.update(self.claims(base, seed=seed))
        for key, ckpt in teachers.items():
            self.evaluate(f"ft_{key}", ckpt)
        self.evaluate("base", base)
        for key, ckpt in students.items():
            name = f"st_{key}" if key.startswith("mixed_0") else f"st_{key}_{k}"
            self.evaluate(name, ckpt)
        self.evaluate(f"st_random_{k}", claims[f"st_random_{k}"])
        for name, ckpt in more.items():
            self.evaluate(name, ckpt)
        self.log("Figure 3: schedule timing on gloo")
        t0 = time.perf_counter()
        self.results["figure3"] = schedule_timing.measure(
            GLMConfig.preset(rc.preset, padded_vocab_size=rc.vocab), rc.fig3_batches,
            rc.fig3_micro_batch, rc.fig3_seq_len, rc.fig3_reps, epoch_samples=n,
            threads=rc.threads)
        self.log(f"  figure 3: {time.perf_counter() - t0:.1f} s")
        self.results["wall_seconds"] = time.perf_counter() - t_start
        return self.results
