"""Autoregressive decoding on the KV cache: greedy, sampling (temperature / top-k / top-p)
and batched beam search.

Prompt layout (GLM blank infilling, see model/masks.py). A prompt is Part A, e.g.
`<en> source [gMASK]`, optionally already followed by `<sop>`; generation appends `<sop>`
when it is missing, then the generated tokens:

    token            position id                        block position id
    Part A[i]        i                                  0
    <sop>            index of the last mask in Part A   1
    generated k      same                               k + 1      (k = 1, 2, ...)

Part A is attended bidirectionally (prefix-LM), `<sop>` onwards causally. Prompts of
different lengths are LEFT-padded so that every row's next token lands in the same column
and one KV cache column serves the whole batch. In the mask (kernels.reference.
attention_mask) key j is visible from query i when (j < prefix or j <= i) and (j >= pad or
i < pad), in absolute column indices; so a row with `pad` pads has
prefix_lens = pad + len(Part A), while its position ids restart at 0 at its first real
token (pads never influence a real token, so the padded row computes exactly what the row
alone would).

A causal-1D model (GLMConfig.position_layout "causal1d": imported ChatGLM2/3 / GLM-4)
decodes as its reference code does instead: the prompt is taken as given (e.g.
`[gMASK] <sop> <|user|> ... <|assistant|>`, nothing appended), every column is causal,
position ids count 0, 1, 2, ... from each row's first real token through the generated
tokens, and block position ids are 0 (the second half of each head stays unrotated).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from model.attention import KVCache
from model.utf8_constraint import Utf8Constraint

MODES = ("greedy", "sample", "beam")


@dataclass
class GenerationConfig:
    mode: str = "greedy"
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0              # 0 = no top-k filter
    top_p: float = 1.0          # 1.0 = no nucleus filter
    num_beams: int = 4
    length_penalty: float = 1.0  # beam score = sum log p / (generated length ** this)
    seed: int | None = None     # sampling RNG; None draws from torch's global RNG
    vocab_size: int | None = None  # ids >= this (embedding padding) are never generated

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {', '.join(MODES)}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 "
                             "(use mode='greedy' for argmax decoding)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams!r} must be an integer >= 1")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty={self.length_penalty} must be finite")


@dataclass
class PromptBatch:
    """Left-padded prompts, each `pads + Part A + <sop>`, P columns."""
    input_ids: torch.Tensor           # [b, P]
    position_ids: torch.Tensor        # [b, P]
    block_position_ids: torch.Tensor  # [b, P]
    prefix_lens: torch.Tensor         # [b] absolute: pad + len(Part A)
    pad_lens: torch.Tensor            # [b]
    gen_position: torch.Tensor        # [b] position id of <sop> and every generated token
    #                                   (causal: of the first generated token, then + 1 each)
    causal: bool = False

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def select(self, index: torch.Tensor) -> "PromptBatch":
        """Rows `index` (beam search: each prompt repeated num_beams times)."""
        return replace(self, **{f: getattr(self, f).index_select(0, index)
                                for f in ("input_ids", "position_ids", "block_position_ids",
                                          "prefix_lens", "pad_lens", "gen_position")})


def prepare_prompts(prompts: Sequence[Sequence[int]], pad_id: int, sop_id: int,
                    mask_id: int | Iterable[int] | None = None, device="cpu",
                    causal: bool = False) -> PromptBatch:
    """Build the left-padded batch. `mask_id` (one id or several, e.g. [MASK], [sMASK],
    [gMASK]) locates the span being generated: its last occurrence in Part A gives the
    generated tokens' position id. Without it, Part A is taken to end with its mask token,
    as in `<en> source [gMASK]`. causal: the causal-1D layout (module docstring); sop_id
    and mask_id are then unused."""
    if not prompts:
        raise ValueError("prompts is empty: need at least one prompt")
    if causal:
        return _causal_prompts(prompts, pad_id, device)
    masks = None if mask_id is None else (
        {mask_id} if isinstance(mask_id, int) else set(mask_id))
    parts, gen_pos = [], []
    for r, p in enumerate(prompts):
        part_a = list(p)
        if part_a and part_a[-1] == sop_id:
            part_a.pop()  # the caller wrote the <sop> already
        if not part_a:
            raise ValueError(f"prompt {r} has no Part A tokens")
        if masks is None:
            gen_pos.append(len(part_a) - 1)
        else:
            hits = [i for i, t in enumerate(part_a) if t in masks]
            if not hits:
                raise ValueError(f"prompt {r} contains no mask token {sorted(masks)}")
            gen_pos.append(hits[-1])
        parts.append(part_a)
    width = max(len(a) for a in parts) + 1  # + <sop>
    b = len(parts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)  # pads: 0, never seen by real tokens
    blk = torch.zeros((b, width), dtype=torch.long)
    pads = torch.tensor([width - 1 - len(a) for a in parts], dtype=torch.long)
    for r, a in enumerate(parts):
        pad, n = int(pads[r]), len(a)
        ids[r, pad:pad + n] = torch.tensor(a, dtype=torch.long)
        ids[r, -1] = sop_id
        pos[r, pad:pad + n] = torch.arange(n)
        pos[r, -1] = gen_pos[r]
        blk[r, -1] = 1
    lens = torch.tensor([len(a) for a in parts], dtype=torch.long)
    to = dict(device=device)
    return PromptBatch(ids.to(**to), pos.to(**to), blk.to(**to), (pads + lens).to(**to),
                       pads.to(**to), torch.tensor(gen_pos, dtype=torch.long, device=device))


def _causal_prompts(prompts, pad_id: int, device) -> PromptBatch:
    rows = [list(p) for p in prompts]
    for r, p in enumerate(rows):
        if not p:
            raise ValueError(f"prompt {r} is empty")
    width, b = max(len(p) for p in rows), len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    pads = torch.tensor([width - len(p) for p in rows], dtype=torch.long)
    for r, p in enumerate(rows):
        ids[r, int(pads[r]):] = torch.tensor(p, dtype=torch.long)
        pos[r, int(pads[r]):] = torch.arange(len(p))
    lens = torch.tensor([len(p) for p in rows], dtype=torch.long)
    to = dict(device=device)
    # prefix = pad: no bidirectional part (pads see pads only, as in the GLM layout)
    return PromptBatch(ids.to(**to), pos.to(**to), torch.zeros_like(ids).to(**to),
                       pads.to(**to), pads.to(**to), lens.to(**to), causal=True)


def prefill(model, batch: PromptBatch, kv_cache: KVCache) -> torch.Tensor:
    """Run the whole prompt into an empty cache; logits [b, V] (fp32) for the first
    generated token, i.e. at the <sop> column."""
    if kv_cache.length != 0:
        raise ValueError(f"prefill needs an empty KV cache (length={kv_cache.length})")
    # the head only at the last column: the prompt's other logits are never read, and
    # [P, V] of them would cost P decode steps' worth of head matmul. Through forward,
    # so that forward hooks (logit processors) see the prefill too.
    logits = model(batch.input_ids, position_ids=batch.position_ids,
                   block_position_ids=batch.block_position_ids,
                   prefix_lens=batch.prefix_lens, pad_lens=batch.pad_lens, kv_cache=kv_cache,
                   logits_to_keep=1)
    return logits[:, -1]


def decode_step(model, tokens: torch.Tensor, batch: PromptBatch,
                kv_cache: KVCache) -> torch.Tensor:
    """Feed one generated token per row (tokens [b]); logits [b, V] for the next one."""
    b = tokens.shape[0]
    if batch.causal:
        # positions keep counting: the k-th fed token (k = 0, 1, ...) is at len(prompt) + k
        pos = batch.gen_position + (kv_cache.length - batch.width)
        logits = model(tokens.view(b, 1), position_ids=pos.view(b, 1),
                       prefix_lens=batch.prefix_lens, pad_lens=batch.pad_lens,
                       kv_cache=kv_cache)
        return logits[:, -1]
    # the cache holds P prompt columns (ending with <sop>, block id 1) plus the generated
    # tokens fed so far; this token's block position id is one more than the last one's
    block = kv_cache.length - batch.width + 2
    logits = model(tokens.view(b, 1), position_ids=batch.gen_position.view(b, 1),
                   block_position_ids=torch.full((b, 1), block, dtype=torch.long,
                                                 device=tokens.device),
                   prefix_lens=batch.prefix_lens, pad_lens=batch.pad_lens, kv_cache=kv_cache)
    return logits[:, -1]


def restrict_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """-inf for ids >= vocab_size: the model's padded vocabulary rows are no tokens of
    the tokenizer, and an undertrained model may still rank them high."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.arange(vocab_size, logits.shape[-1],
                                              device=logits.device), float("-inf"))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """-inf outside the top-k tokens and outside the smallest set whose probability mass
    reaches top_p (always at least the most likely token). logits [..., V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # mass strictly ahead of each token: keep it while that mass is still below top_p
        ahead = probs.cumsum(-1) - probs
        drop_sorted = ahead >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _validate_ids(model, prompts, **ids):
    vocab = model.config.padded_vocab_size
    for name, value in ids.items():
        for v in (value if isinstance(value, (list, tuple, set, frozenset)) else [value]):
            if not isinstance(v, int) or not 0 <= v < vocab:
                raise ValueError(f"{name}={value!r} must be a token id in [0, {vocab})")
    for r, p in enumerate(prompts):
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {r} has token ids outside [0, {vocab}): {bad[:5]}")


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id, pad_id: int,
             sop_id: int, mode: str = "greedy", temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, num_beams: int = 4, length_penalty: float = 1.0,
             seed: int | None = None, mask_id: int | Iterable[int] | None = None,
             vocab_size: int | None = None,
             utf8: Utf8Constraint | None = None) -> list[list[int]]:
    """Continue each GLM prompt; returns the generated ids per prompt, without the prompt
    and without the eos. eos_id: one id or several (ChatGLM3 stops at </s>, <|user|> and
    <|observation|>). utf8 (Utf8Constraint.for_tokenizer(tok)): byte-fallback pieces only
    ever form whole UTF-8 characters, so the decoded text has no U+FFFD. The prompt layout
    follows model.config.position_layout (module docstring). Needs a whole model
    (embedding and head on this stage)."""
    cfg = GenerationConfig(mode, max_new_tokens, temperature, top_k, top_p, num_beams,
                           length_penalty, seed, vocab_size)
    if not (model.pre_process and model.post_process
            and model.layer_range == (0, model.config.num_layers)):
        raise ValueError("generate needs the whole model, not a pipeline stage "
                         f"(layer_range={model.layer_range})")
    _validate_ids(model, prompts, eos_id=eos_id, pad_id=pad_id, sop_id=sop_id)
    device = next(model.parameters()).device
    batch = prepare_prompts(prompts, pad_id, sop_id, mask_id, device,
                            causal=model.config.causal)
    eos_id = frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
    if cfg.max_new_tokens == 0:
        return [[] for _ in prompts]
    if utf8 is not None:
        utf8 = utf8.to(device)
    was_training = model.training
    model.eval()
    try:
        if cfg.mode == "beam":
            out = _beam_search(model, batch, cfg, eos_id, pad_id, utf8)
        else:
            out = _sample(model, batch, cfg, eos_id, pad_id, utf8)
    finally:
        model.train(was_training)
    # the budget can run out inside a character: drop its bytes rather than print U+FFFD
    return out if utf8 is None else [utf8.trim(o) for o in out]


def _sample(model, batch: PromptBatch, cfg: GenerationConfig, eos_id: int,
            pad_id: int, utf8: Utf8Constraint | None = None) -> list[list[int]]:
    """Greedy and sampling: one token per row per step; finished rows are fed pads (their
    outputs are discarded) until every row has finished or the budget is spent."""
    device = batch.input_ids.device
    gen = None
    if cfg.mode == "sample" and cfg.seed is not None:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    # the last sampled token is never fed back, hence - 1
    cache = model.new_kv_cache(batch.rows, batch.width + cfg.max_new_tokens - 1)
    logits = restrict_vocab(prefill(model, batch, cache), cfg.vocab_size)  # [b, V]
    out = [[] for _ in range(batch.rows)]
    done = torch.zeros(batch.rows, dtype=torch.bool, device=device)
    state = None if utf8 is None else utf8.initial(batch.rows)
    for step in range(cfg.max_new_tokens):
        if utf8 is not None:
            logits = utf8.mask(logits, state)
        if cfg.mode == "greedy":
            tok = logits.argmax(-1)
        else:
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        tok = tok.masked_fill(done, pad_id)
        if utf8 is not None:
            state = utf8.advance(state, tok)
        for r, t in enumerate(tok.tolist()):
            if not done[r] and t not in eos_id:
                out[r].append(t)
        done |= torch.isin(tok, torch.tensor(sorted(eos_id), device=device))
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        logits = restrict_vocab(decode_step(model, tok, batch, cache), cfg.vocab_size)
    return out


def _beam_search(model, batch: PromptBatch, cfg: GenerationConfig, eos_id: int,
                 pad_id: int, utf8: Utf8Constraint | None = None) -> list[list[int]]:
    """Batched beam search over B * K cache rows (row = prompt * K + beam).

    Each step ranks the K * V continuations of a prompt's beams by summed log-prob; eos
    continuations become finished hypotheses scored sum / length ** length_penalty
    (length = tokens scored, eos included), the best K others carry on. A prompt is done
    when it holds K finished hypotheses and no live beam can still beat the worst of them.
    """
    B, K, T = batch.rows, cfg.num_beams, cfg.max_new_tokens
    lp = cfg.length_penalty
    device = batch.input_ids.device
    cache = model.new_kv_cache(B, batch.width + T - 1)
    logits = restrict_vocab(prefill(model, batch, cache), cfg.vocab_size)  # [B, V]: one prefill per prompt, not per beam
    expand = torch.arange(B, device=device).repeat_interleave(K)
    cache.reorder(expand)
    batch = batch.select(expand)
    logits = logits.index_select(0, expand)  # [B*K, V]
    # beams start identical: only beam 0 is live, or step 0 would pick one token K times
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    history: list[list[int]] = [[] for _ in range(B * K)]  # generated ids per cache row
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    state = None if utf8 is None else utf8.initial(B * K)

    def bound(raw: float, step: int) -> float:
        # best normalized score a live beam with summed log-prob raw (<= 0) can still
        # reach: its sum only falls, its final length is in [step + 2, T]
        if lp > 0:
            return raw / T ** lp
        return raw / min(step + 2, T) ** lp

    for step in range(T):
        logp = F.log_softmax(logits.float(), dim=-1)  # [B*K, V]
        if utf8 is not None:
            # masked after the softmax: allowed continuations keep the model's scores
            logp = utf8.mask(logp, state)
        V = logp.shape[-1]
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=1)  # [B, 2K]
        # bookkeeping on the host: one transfer per step, not one per candidate
        next_scores = [[float("-inf")] * K for _ in range(B)]
        next_beam = [list(range(K)) for _ in range(B)]  # done prompts: rows stay put
        next_tok = [[pad_id] * K for _ in range(B)]
        top_scores_l, top_idx_l = top_scores.tolist(), top_idx.tolist()
        for bi in range(B):
            if done[bi]:
                continue
            n = 0
            for s, idx in zip(top_scores_l[bi], top_idx_l[bi]):
                if s == float("-inf"):
                    break
                beam, tok = divmod(idx, V)
                if tok in eos_id:
                    finished[bi].append((s / (step + 1) ** lp, history[bi * K + beam]))
                    continue
                next_scores[bi][n], next_beam[bi][n], next_tok[bi][n] = s, beam, tok
                n += 1
                if n == K:
                    break
            finished[bi] = sorted(finished[bi], key=lambda h: h[0], reverse=True)[:K]
            best_live = max(next_scores[bi])
            if len(finished[bi]) == K and (best_live == float("-inf") or
                                           finished[bi][-1][0] >= bound(best_live, step)):
                done[bi] = True
        rows = [bi * K + k for bi in range(B) for k in next_beam[bi]]
        history = [history[r] + [t] for r, t in zip(rows, sum(next_tok, []))]
        scores = torch.tensor(next_scores, device=device)
        rows_t = torch.tensor(rows, device=device)
        tok_t = torch.tensor(sum(next_tok, []), device=device)
        if utf8 is not None:
            state = utf8.advance(state.index_select(0, rows_t), tok_t)
        if all(done) or step == T - 1:
            break
        cache.reorder(rows_t)
        logits = restrict_vocab(decode_step(model, tok_t, batch, cache), cfg.vocab_size)

    results = []
    for bi in range(B):
        hyps = list(finished[bi])
        if not done[bi]:  # budget spent: live beams compete at full length T
            for k in range(K):
                s = float(scores[bi, k])
                if s != float("-inf"):
                    hyps.append((s / T ** lp, history[bi * K + k]))
        results.append(max(hyps, key=lambda h: h[0])[1])
    return results
