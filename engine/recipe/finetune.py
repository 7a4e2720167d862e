"""Mixed-language ("hybrid data") fine-tuning and continued distillation: the paper's
Section 3.3, Algorithm 3, Equations 11-13.

    D_s  source-language labelled task (here: English-input, en -> zh translation)
    D_d  target-language labelled task (here: Chinese-input, zh -> en), or two TSV files

Teacher (Eq. 11-12): fine-tuned on a random mixture of D_s and D_d,
    alpha  = w_s*n_s / (w_s*n_s + w_d*n_d)                               (Eq. 11)
    L_hyb  = alpha * E_{D_s}[CE] + (1 - alpha) * E_{D_d}[CE]             (Eq. 12)

How sampling and weighting relate (and why the loss is never weighted twice): Eq. 12 is
an expectation over a two-component mixture. `MixedDataset` draws each example from D_s
with probability p; `HybridLoss` multiplies that example's token losses by
    alpha / p          (source rows)      (1 - alpha) / (1 - p)   (target rows).
The expected loss of a batch is then p*(alpha/p)*L_s + (1-p)*((1-alpha)/(1-p))*L_d =
Eq. 12 for any p in (0, 1). With the default mixing "sample" p = alpha, so both weights
are exactly 1: the mixture proportions alone carry alpha and the loss is the plain
token-mean cross-entropy. Multiplying by alpha as well would optimise
alpha^2 : (1-alpha)^2 instead of alpha : (1-alpha). Mixing "weight" draws p = 1/2 and
puts alpha into the weights instead (importance weighting: lower variance for the rare
task when alpha is extreme, same expectation). Weights are per token (each token carries
its example's task weight) and the trainer divides by the label-token count, so L_s and
L_d are token means (a task with longer targets does not get extra weight from its length
beyond what the token mean gives). Packed rows (data.pack: several examples per row, each
attending only to itself) therefore give exactly the loss and gradients of the same
examples one per row: the weights follow the tokens, not the rows.

Student (Eq. 13): continued distillation on D_d only. Read literally, Eq. 13,
    -1/M sum_j ( lambda*log f_teacher(D_d(j)) + (1-lambda)*log f_student(D_d(j)) ),
has a first term that does not depend on the student at all (zero gradient), so it
cannot be what trains the student. The reading implemented: "log f_teacher" is the
student's log-likelihood of the teacher's soft predictions (the KD term of Hinton et al.,
with temperature T), "log f_student" is the student's log-likelihood of the labels:
    L_distill = lambda * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1-lambda) * CE(z_s, y)
KL equals soft-target cross-entropy minus the teacher's entropy, a constant for the
student, so the gradients are those of the soft cross-entropy. lambda multiplies the
teacher term as in the equation (the paper's prose states the opposite direction once;
the formula wins). With T = 1 (the paper's setting) the T^2 factor is 1. This is
engine.recipe.compress.distill.distill_loss with ce_weight = 1 - lambda, kl_weight = lambda,
hidden_weight = 0, so the student runs through the same DistillLoss / pipeline wiring.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch

from engine.recipe.compress.distill import TEACHER_LAYOUTS, DistillConfig
from engine.recipe.data.datasets import mix_seed
from engine.recipe.data.packing import best_fit_rows
from model.masks import collate, pack

STRATEGIES = ("source", "target", "mixed")
MIXINGS = ("sample", "weight")
_CHOOSE = 7          # the random stream that picks D_s / D_d for sample j
_PACK_ROWS = 8       # the random stream that orders a window's packed rows


def mixing_alpha(w_s: float, n_s: int, w_d: float, n_d: int) -> float:
    """Eq. 11: alpha = w_s*n_s / (w_s*n_s + w_d*n_d)."""
    for name, v in (("w_s", w_s), ("w_d", w_d), ("n_s", n_s), ("n_d", n_d)):
        if v < 0:
            raise ValueError(f"{name}={v} must be >= 0")
    den = w_s * n_s + w_d * n_d
    if den <= 0:
        raise ValueError("w_s*n_s + w_d*n_d must be > 0 to define alpha (Eq. 11)")
    return w_s * n_s / den


def hybrid_loss(loss_s: torch.Tensor, loss_d: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 12 on the two tasks' mean losses: alpha*L_s + (1-alpha)*L_d."""
    return alpha * loss_s + (1.0 - alpha) * loss_d


@dataclass
class FinetuneConfig:
    strategy: str = "mixed"        # source | target | mixed (paper Fig. 5)
    alpha: float = -1.0            # < 0: from Eq. 11 with the weights and dataset sizes
    w_s: float = 1.0               # Eq. 11 weight of the source task
    w_d: float = 1.0               # Eq. 11 weight of the target task
    mixing: str = "sample"         # sample: draw with p = alpha; weight: p = 1/2, weighted
    lam: float = 0.65              # Eq. 13 lambda (teacher share of the student's loss)
    temperature: float = 1.0       # student stage: KD temperature T
    teacher_layout: str = "same"   # student stage: distill.teacher_layout (same | last)
    source_direction: str = "en-zh"  # D_s: en-zh | zh-en
    target_direction: str = "zh-en"  # D_d: en-zh | zh-en

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"finetune.strategy={self.strategy!r} must be one of "
                             f"{', '.join(STRATEGIES)}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"finetune.mixing={self.mixing!r} must be sample or weight")
        if self.alpha > 1:
            raise ValueError(f"finetune.alpha={self.alpha} must be <= 1 (< 0: Eq. 11)")
        for name in ("w_s", "w_d"):
            if getattr(self, name) < 0:
                raise ValueError(f"finetune.{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"finetune.lam={self.lam} must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"finetune.temperature={self.temperature} must be > 0")
        if self.teacher_layout not in TEACHER_LAYOUTS:
            raise ValueError(f"finetune.teacher_layout={self.teacher_layout!r} must be one of "
                             f"{', '.join(TEACHER_LAYOUTS)}")
        for name in ("source_direction", "target_direction"):
            if getattr(self, name) not in ("en-zh", "zh-en"):
                raise ValueError(f"finetune.{name}={getattr(self, name)!r} must be en-zh "
                                 "or zh-en")

    def resolve_alpha(self, n_s: int, n_d: int) -> float:
        """The alpha the strategy trains with: 1 (source only), 0 (target only), or the
        mixed value (set, or Eq. 11)."""
        if self.strategy == "source":
            return 1.0
        if self.strategy == "target":
            return 0.0
        return self.alpha if self.alpha >= 0 else mixing_alpha(self.w_s, n_s, self.w_d, n_d)

    def sample_prob(self, alpha: float) -> float:
        """p, the probability a sample comes from D_s."""
        if self.mixing == "weight" and 0.0 < alpha < 1.0:
            return 0.5
        return alpha

    def distill_config(self) -> DistillConfig:
        """Eq. 13 as engine.recipe.compress.distill terms (see the module docstring)."""
        return DistillConfig(ce_weight=1.0 - self.lam, kl_weight=self.lam, hidden_weight=0.0,
                             temperature=self.temperature, teacher_layout=self.teacher_layout)

    def to_dict(self) -> dict:
        return asdict(self)


class MixedDataset:
    """D_s and D_d randomly mixed, a pure function of (seed, index) like every dataset.

    Sample j comes from D_s when u_j < p (u_j uniform from a generator seeded by
    (seed, j)), and is then that dataset's own sample j: each component keeps its own
    epoch permutation, so the selected examples are a random thinning of its sequence.
    Batches carry "task" (1 = D_s, 0 = D_d) for HybridLoss: [b], one example per row.

    pack: row r holds several consecutive examples of that stream (model/masks.py `pack`,
    document masking): the stream is cut into windows of `pack_window` examples, each
    window packed by best fit (engine/recipe/data/packing.py) and its rows shuffled.
    Every example of the stream is used once, in its window, so the mixture proportion
    stays p; "task" is then per token [b, s] (pads 0, they carry no label). Still a pure
    function of (seed, index): a resumed run rebuilds the same rows from the step."""

    def __init__(self, source, target, p: float, seed: int = 0, pack: bool = False,
                 pack_window: int = 1024):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p={p} (probability of D_s) must be in [0, 1]")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.source, self.target, self.p, self.seed = source, target, p, seed
        self.pad = source.ids.pad
        self.seq_len = source.seq_len
        if target.seq_len != self.seq_len:
            raise ValueError(f"source seq_len {source.seq_len} != target seq_len "
                             f"{target.seq_len}")
        if pack_window <= 0:
            raise ValueError(f"pack_window={pack_window} must be positive")
        self.pack, self.pack_window = bool(pack), pack_window
        self._window = functools.lru_cache(maxsize=2)(self._window_rows)
        self._row_ends: list[int] = []      # rows in windows 0..w, cumulative

    def is_source(self, j: int) -> bool:
        if self.p >= 1.0:
            return True
        if self.p <= 0.0:
            return False
        u = np.random.default_rng(mix_seed(self.seed, _CHOOSE, j)).random()
        return bool(u < self.p)

    def _task(self, j: int):
        return self.source if self.is_source(j) else self.target

    # -- packing: rows of consecutive stream examples, per window ------------------------
    def _window_rows(self, w: int) -> list[list[int]]:
        first = w * self.pack_window
        lengths = [self._task(j).length(j) for j in range(first, first + self.pack_window)]
        rng = np.random.default_rng(mix_seed(self.seed, _PACK_ROWS, w))
        rows = best_fit_rows(lengths, self.seq_len, self.pack_window, rng)
        return [[first + i for i in row] for row in rows]

    def packed_row(self, r: int) -> list[tuple[object, bool]]:
        """Row r packed: its (example, is D_s) in order."""
        if r < 0:
            raise ValueError(f"row index {r} must be >= 0")
        while not self._row_ends or self._row_ends[-1] <= r:
            w = len(self._row_ends)
            self._row_ends.append((self._row_ends[-1] if w else 0) + len(self._window(w)))
        w = bisect.bisect_right(self._row_ends, r)
        start = self._row_ends[w - 1] if w else 0
        return [(self._task(j).example(j), self.is_source(j))
                for j in self._window(w)[r - start]]

    def get_batch(self, index: int, batch_size: int) -> dict:
        if batch_size <= 0 or index < 0:
            raise ValueError(f"index={index}, batch_size={batch_size}: need index >= 0 and "
                             "batch_size > 0")
        if self.pack:
            rows = [self.packed_row(index * batch_size + r) for r in range(batch_size)]
            batch = pack([[ex for ex, _ in row] for row in rows], self.seq_len, self.pad)
            task = torch.zeros((batch_size, self.seq_len), dtype=torch.long)  # [b, s]
            for r, row in enumerate(rows):
                at = 0
                for ex, flag in row:
                    task[r, at:at + len(ex.input_ids)] = int(flag)
                    at += len(ex.input_ids)
            batch["task"] = task
            return batch
        js = [index * batch_size + r for r in range(batch_size)]
        flags = [self.is_source(j) for j in js]
        examples = [(self.source if f else self.target).example(j) for j, f in zip(js, flags)]
        batch = collate(examples, self.seq_len, self.pad)
        batch["task"] = torch.tensor(flags, dtype=torch.long)         # [b]
        return batch


class HybridLoss:
    """Eq. 12 as the trainer's forward_step: the last stage scales each token's loss by
    its example's task weight (1 and 1 with mixing "sample"; "task" per row [b], or per
    token [b, s] in packed rows); batches without "task" (dev sets) are unweighted.
    Works on every stage of any pipeline layout: the weights come from the batch, which
    every rank builds itself."""

    def __init__(self, alpha: float, p: float):
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= p <= 1.0:
            raise ValueError(f"alpha={alpha}, p={p} must be in [0, 1]")
        if (alpha > 0 and p == 0) or (alpha < 1 and p == 1):
            raise ValueError(f"alpha={alpha} needs both tasks but p={p} samples only one")
        self.w_source = alpha / p if p > 0 else 0.0
        self.w_target = (1.0 - alpha) / (1.0 - p) if p < 1 else 0.0

    def weights(self, task: torch.Tensor) -> torch.Tensor:
        """[b] or [b, s] weights, the shape of `task`."""
        return torch.where(task.bool(), self.w_source, self.w_target).float()

    def forward_step(self, chunk, batch: dict, hidden_states, side):
        from engine.pipeline.stage import glm_forward_step
        out = glm_forward_step(chunk, batch, hidden_states, side)
        if chunk.post_process and "task" in batch and batch.get("labels") is not None:
            w = self.weights(batch["task"]).to(out.device)
            out = out * (w[:, None] if w.dim() == 1 else w)              # [b, s]
        return out


# ---- wiring onto the engine -------------------------------------------------------------

def build_tasks(data_dir: str, fcfg: FinetuneConfig, seq_len: int, seed: int,
                vocab_size: int, source_tsv: str = "", target_tsv: str = "",
                model_config=None, pack: bool = False):
    """(tokenizer, D_s train, D_d train, D_s dev, D_d dev). Default: the prepared
    translation shards read in the two directions; a TSV file (english<TAB>chinese, read
    in that task's direction) replaces a task's training set. model_config: the layout
    and prompt of the model being tuned (engine/recipe/data/prompts.py; None = native GLM).
    pack: the training sets' own batches hold several pairs per row (the student trains
    on D_d's); the dev sets stay one pair per row."""
    import os

    from engine.recipe.data.datasets import TranslationDataset
    from engine.recipe.data.loaders import open_data_dir
    from engine.recipe.data.prompts import TranslationFormat
    tok = open_data_dir(data_dir)
    fmt = TranslationFormat(tok, model_config)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer in {data_dir} has {tok.vocab_size} pieces but the "
                         f"model's padded_vocab_size is {vocab_size}")
    shards = os.path.join(data_dir, "shards")

    def task(path, direction, s):
        src = path or os.path.join(shards, "translation_train")
        return TranslationDataset(src, tok, seq_len, direction=direction, seed=s,
                                  tokenizer=tok, fmt=fmt, pack=pack)
    # the two tasks get independent permutations even when built from the same pairs
    d_s = task(source_tsv, fcfg.source_direction, mix_seed(seed, 1) % 2 ** 31)
    d_d = task(target_tsv, fcfg.target_direction, mix_seed(seed, 2) % 2 ** 31)
    dev = os.path.join(shards, "translation_dev")
    dev_s = TranslationDataset(dev, tok, seq_len, direction=fcfg.source_direction, seed=0,
                               shuffle=False, fmt=fmt)
    dev_d = TranslationDataset(dev, tok, seq_len, direction=fcfg.target_direction, seed=0,
                               shuffle=False, fmt=fmt)
    return tok, d_s, d_d, dev_s, dev_d


def teacher_objective(fcfg: FinetuneConfig, d_s, d_d, seed: int, pack: bool = False):
    """(train dataset, HybridLoss, alpha, p) for the chosen strategy; pack: several
    examples of the mixture per row (MixedDataset)."""
    alpha = fcfg.resolve_alpha(len(d_s), len(d_d))
    p = fcfg.sample_prob(alpha)
    return MixedDataset(d_s, d_d, p, seed=seed, pack=pack), HybridLoss(alpha, p), alpha, p
