"""How big a report run is. `quick` is the smoke test (seconds per stage, tiny preset,
from scratch). The full size is the demo's model (small preset) starting from a pretrained
LM checkpoint -- the paper starts from pretrained ChatGLM, and a model trained from scratch
for a few minutes on CPU emits empty translations, which makes every quality column 0 --
and took 56 minutes on 2 busy CPU cores; `scale` multiplies every step count."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass
class ReportConfig:
    out_dir: str = "reports"            # markdown + PNG
    work_dir: str = "runs/paper"        # checkpoints and logs of every stage
    data_dir: str = "data"
    pretrained: str = ""                # LM checkpoint the base starts from ("": scratch)
    base: str = ""                      # a translation checkpoint used as the base instead
    #                                     of training one (make paper: make demo's teacher)
    preset: str = "small"               # must match `pretrained`'s shape
    vocab: int = 8192                   # >= the tokenizer's 8000 pieces
    train_pairs: int = 16000            # random N training pairs, both tasks (TSV subsets)
    seq_len: int = 48                   # computer-English strings are short
    micro_batch_size: int = 16
    num_microbatches: int = 4           # global batch 64; 4 microbatches feed the pipeline
    base_steps: int = 300               # the shared starting model (both directions, 50/50)
    finetune_steps: int = 100           # teacher hybrid fine-tuning (Eq. 12)
    distill_steps: int = 60             # student continued distillation (Eq. 13)
    finetune_lr: float = 1e-3           # peak lr of the base and the teacher fine-tunings
    distill_lr: float = 1e-3            # peak lr of the students' distillation
    min_lr: float = 1e-4                # every stage decays to it
    eval_every: int = 25
    eval_batches: int = 4
    alpha: float = 0.65                 # paper: alpha = lambda = 0.65, T = 1
    lam: float = 0.65
    keep_levels: list = field(default_factory=lambda: [0.75, 0.5, 0.25])
    ablation_keep: float = 0.5
    calib_batches: int = 4
    test_sentences: int = 200
    max_new_tokens: int = 40
    latency_samples: int = 16
    fig3_batches: list = field(default_factory=lambda: [8, 16, 32, 64])
    fig3_micro_batch: int = 4
    fig3_seq_len: int = 48
    fig3_reps: int = 3
    threads: int = 2
    seed: int = 1234
    seeds: int = 3                      # the paper's claims run at seed, seed + 1, ...

    def __post_init__(self):
        for name in ("train_pairs", "seq_len", "micro_batch_size", "num_microbatches",
                     "base_steps",
                     "finetune_steps", "distill_steps", "eval_every", "eval_batches",
                     "calib_batches", "test_sentences", "max_new_tokens", "latency_samples",
                     "fig3_micro_batch", "fig3_seq_len", "fig3_reps", "threads", "seeds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"report.{name}={getattr(self, name)} must be positive")
        for name in ("finetune_lr", "distill_lr"):
            if not getattr(self, name) >= self.min_lr > 0:
                raise ValueError(f"report.{name}={getattr(self, name)} must be >= "
                                 f"report.min_lr={self.min_lr} > 0")
        for name in ("alpha", "lam", "ablation_keep"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"report.{name}={getattr(self, name)} must be in [0, 1]")
        if not self.keep_levels or not all(0 < k < 1 for k in self.keep_levels):
            raise ValueError(f"report.keep_levels={self.keep_levels} must be fractions in (0, 1)")
        bad = [b for b in self.fig3_batches if b % (2 * self.fig3_micro_batch)]
        if bad:
            raise ValueError(f"report.fig3_batches {bad} must be multiples of 2 * "
                             f"fig3_micro_batch={2 * self.fig3_micro_batch} (interleaved 1F1B "
                             "needs m % pp == 0)")

    @classmethod
    def quick(cls, **kw) -> "ReportConfig":
        return replace(cls(preset="tiny", train_pairs=200, seq_len=48, micro_batch_size=4,
                           num_microbatches=2, base_steps=2,
                           finetune_steps=2, distill_steps=2, eval_every=1, eval_batches=1,
                           calib_batches=1, test_sentences=4, max_new_tokens=6,
                           latency_samples=1, keep_levels=[0.5], fig3_batches=[4, 8],
                           fig3_micro_batch=2,
                           fig3_seq_len=32, fig3_reps=1), **kw)

    @classmethod
    def on_teacher(cls, base: str, **kw) -> "ReportConfig":
        """The report on a trained translation teacher (make paper: make demo's, trained by
        configs/demo_translate.json): no base stage; the fine-tunings continue at the lr
        the teacher's schedule ended on (4e-4), and the students distil with the demo's
        recipe (configs/demo_distill.json: 100 steps at 2e-3)."""
        return cls(base=base, **{"finetune_lr": 4e-4, "distill_lr": 2e-3,
                                 "distill_steps": 100, **kw})

    def scaled(self, scale: float) -> "ReportConfig":
        if scale <= 0:
            raise ValueError(f"report.scale={scale} must be > 0")
        s = lambda n: max(1, round(n * scale))  # noqa: E731
        return replace(self, base_steps=s(self.base_steps), finetune_steps=s(self.finetune_steps),
                       distill_steps=s(self.distill_steps))

    def to_dict(self) -> dict:
        return asdict(self)
