"""Per-device memory of a layout: model states (parameters, gradients, optimizer) and the
activations a stage keeps for backward under its pipeline schedule.

Notation: h hidden, a query heads, g KV groups, d head dim, f FFN width, V vocabulary,
L layers, s sequence length, b micro-batch size, T = b * s tokens per microbatch, t tp,
e activation bytes (2 bf16, 4 fp32). Per tp rank: a_r = a / t heads, g_r = g / t KV
groups (or 1 when t > g: the group is replicated t / g times and its memory counts on
every rank), f_r = f / t, V_r = V / t.

Model states, per rank of stage s (bytes per parameter in brackets):
    params      P_s * [2 bf16 | 4 fp32]
    grads       P_s * 4              fp32 accumulation buckets (engine/optim)
    optimizer   P_s * ([4 master | 0 when fp32 params are the master] + 8 moments) / z
                where z = dp under ZeRO 1/2 and 1 under ZeRO 0
ZeRO 2 in this engine reduce-scatters at step time but accumulates every microbatch
into full-size gradient buckets first (engine/optim/grad_buckets.py), so at the peak
(during backward) the gradients are full size: ZeRO 2 saves no peak memory over ZeRO 1.

Activations, from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): a GPT layer keeps s*b*h*(34 + 5*a*s/h) bytes in fp16 -- 11sbh +
5as^2b for attention (QKV input, Q, K, V, softmax output + dropout mask, context), 19sbh
for the MLP (two inputs, GeLU input, dropout mask) and 4sbh for two LayerNorm inputs;
with tensor parallelism everything inside the column/row pair is / t, and with sequence
parallelism the rest (norms, residual, dropout) is / t as well. This model differs:
  * SwiGLU (f = ffn_hidden_size, not 4h), RMSNorm (one fp32 rstd per token, no mean),
    no dropout in the presets (hidden_dropout = 0: no masks), GQA (K, V are g*d wide);
  * the fused kernels (Triton, GPU) save, per layer and token:
        input-norm input x          e*h     (replicated unless sequence parallel)
        QKV-linear input            e*h     (replicated unless sp)
        QKV output                  e*(a_r + 2 g_r)*d  (the V view keeps the whole buffer)
        rotated Q, K                e*(a_r + g_r)*d
        flash-attention output, lse e*a_r*d + 4*a_r      (no s^2 term: scores recomputed)
        dense input (context copy)  e*a_r*d
        residual sum (add+norm)     e*h     (replicated unless sp)
        gate/up input               e*h     (replicated unless sp)
        SwiGLU output (down input)  e*f_r   (gate/up product recomputed in backward)
        two rstd                    2*4     (replicated unless sp)
    = e*(4h + (4 a_r + 3 g_r) d + f_r) + 4 a_r + 8  (chatglm3-6b, t = 1: 94,600 B/token)
  * the torch reference (CPU) materialises attention like Megatron's formula does:
        norms: fp32 input, y, weight*y, rstd   2 * (4h + 2e*h + 4)
        Q, K, V copies for the matmuls (fp32, K and V repeated to a_r heads)  4 * 3 a_r d
        softmax output (fp32) and the boolean mask                           s*(4 a_r + 1)
        context                                                               e*a_r*d
        gate|up output, silu output, down input                               4 e*f_r
    the s^2 term, s*(4a + 1) per token, is Megatron's 5as (fp16 softmax + byte mask).
Per microbatch a stage also keeps the rotary cos/sin (fp32, 4d per token) per chunk, the
input ids on the first stage, and on the last stage the final norm and the loss (fused:
hidden + fp32 lse; torch: fp32 log-probabilities, 4V per token: the logits buffer).
Recompute (full, per layer) keeps only each layer's input, e*h (/ t with sp); in
backward one layer at a time is recomputed, so one layer's full set comes back on top.

In flight (how many microbatch-chunks a stage holds): gradient accumulation 1, GPipe m,
1F1B min(p - s, m) (stage 0 the most), ZB-H1 min(p, m) (from F to W), interleaved 1F1B
min(2(p - s - 1) + (v - 1)p + 1, m v) with each chunk L / (p v) layers deep (engine/pipeline/program.py's warmup counts).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.pipeline.placement import holds_head, placement_for
from engine.planner.layouts import Layout, PlanRequest
from engine.train.layer_split import resolve_layer_split
from model.config import GLMConfig

# bytes per parameter and per activation element, by training precision
PRECISION_BYTES = {
    # Megatron mixed precision: bf16 weights, fp32 gradient buckets, fp32 master + moments
    "bf16": dict(param=2, grad=4, master=4, moments=8, act=2),
    # fp32 training (CPU): the fp32 parameters are their own master copy
    "fp32": dict(param=4, grad=4, master=0, moments=8, act=4),
}


@dataclass(frozen=True)
class Shard:
    """One tensor-parallel rank's widths."""
    heads: int
    groups: int          # KV groups held (1 replicated group when tp > groups)
    ffn: int
    vocab: int


def shard_of(cfg: GLMConfig, tp: int) -> Shard:
    g = cfg.multi_query_group_num
    return Shard(heads=cfg.num_attention_heads // tp,
                 groups=g // tp if g >= tp else 1,
                 ffn=cfg.ffn_hidden_size // tp,
                 vocab=cfg.padded_vocab_size // tp)


# ---- parameters ------------------------------------------------------------------------

def layer_params(cfg: GLMConfig, tp: int = 1) -> int:
    """Parameters of one GLMBlock on one tp rank (replicated norms and row-parallel
    biases count in full on every rank)."""
    sh, h, d = shard_of(cfg, tp), cfg.hidden_size, cfg.kv_channels
    qkv = (sh.heads + 2 * sh.groups) * d
    n = h * qkv + (qkv if cfg.add_qkv_bias else 0)              # fused QKV (column)
    n += sh.heads * d * h + (h if cfg.add_bias_linear else 0)   # dense (row)
    n += h * 2 * sh.ffn + (2 * sh.ffn if cfg.add_bias_linear else 0)   # gate|up (column)
    n += sh.ffn * h + (h if cfg.add_bias_linear else 0)         # down (row)
    return n + 2 * h                                            # two RMSNorm weights


def stage_layers(req: PlanRequest, layout: Layout, stage: int) -> int:
    """Layers on pipeline stage `stage` (all its chunks) under req.layer_split: the
    counts the run builds (engine/train/layer_split.py); "even" is num_layers / pp."""
    if req.layer_split == "even":
        return req.config.num_layers // layout.pp
    counts = resolve_layer_split(req.config, req.seq_len, layout.pp, layout.vpp,
                                 layout.schedule, req.layer_split)
    place = placement_for(layout.schedule, layout.pp, layout.vpp)
    return sum(counts[place.virtual(stage, c)] for c in range(layout.vpp))


def stage_params(cfg: GLMConfig, layout: Layout, stage: int,
                 n_layers: int | None = None) -> int:
    """Parameters held by one tp rank of pipeline stage `stage` (all its chunks), which
    holds n_layers layers (None: the even split's num_layers / pp; see stage_layers)."""
    sh = shard_of(cfg, layout.tp)
    if n_layers is None:
        n_layers = cfg.num_layers // layout.pp
    n = n_layers * layer_params(cfg, layout.tp)
    if stage == 0:
        n += sh.vocab * cfg.hidden_size                          # embedding
    if holds_head(layout.schedule, layout.pp, stage):
        n += cfg.hidden_size + sh.vocab * cfg.hidden_size        # final norm + head
    return n


def total_params(cfg: GLMConfig) -> int:
    """The whole model; equals GLM(cfg).num_params()."""
    return (cfg.num_layers * layer_params(cfg) + 2 * cfg.padded_vocab_size * cfg.hidden_size
            + cfg.hidden_size)


# ---- activations -----------------------------------------------------------------------

def layer_activation_terms(cfg: GLMConfig, tp: int, seq_len: int, kernels: str, act: int,
                           sequence_parallel: bool) -> dict[str, float]:
    """Bytes per token that one layer keeps for backward on one tp rank, by group (see
    the module docstring for the derivation). Replicated groups are / tp under sequence
    parallelism."""
    sh, h, d, s = shard_of(cfg, tp), cfg.hidden_size, cfg.kv_channels, seq_len
    rep = tp if sequence_parallel else 1
    drop = 2 * h if cfg.hidden_dropout > 0 else 0    # two byte masks (residual dropouts)
    if kernels == "fused":
        mlp = act * sh.ffn + (act * 2 * sh.ffn if cfg.add_bias_linear else 0)
        return {
            "norms+residual": (4 * act * h + 2 * 4 + drop) / rep,
            "attention": act * ((sh.heads + 2 * sh.groups) * d + (sh.heads + sh.groups) * d
                                + 2 * sh.heads * d) + 4 * sh.heads,
            "mlp": mlp,
        }
    return {
        "norms+residual": (2 * (4 * h + 2 * act * h + 4) + drop) / rep,
        "attention": 4 * 3 * sh.heads * d + act * sh.heads * d,
        "scores": s * (4 * sh.heads + 1),
        "mlp": 4 * act * sh.ffn,
    }


def layer_input_bytes(cfg: GLMConfig, tp: int, act: int, sequence_parallel: bool) -> float:
    """What recompute keeps per layer and token: the layer's input."""
    return act * cfg.hidden_size / (tp if sequence_parallel else 1)


def stage_extra_terms(cfg: GLMConfig, tp: int, kernels: str, act: int, first: bool,
                      last: bool, sequence_parallel: bool) -> tuple[float, float]:
    """(per-chunk bytes per token, last-stage head bytes per token) kept besides layers."""
    h, rep = cfg.hidden_size, (tp if sequence_parallel else 1)
    chunk = 4 * cfg.kv_channels                                # rotary cos + sin, fp32
    if first:
        chunk += 8 + (h if cfg.hidden_dropout > 0 else 0)      # input ids, embedding dropout
    head = 0.0
    if last:
        if kernels == "fused":
            # final-norm input + rstd, then the chunked loss keeps its input, lse, labels
            head = (act * h + 4) / rep + act * h + 4 + 8
        else:
            # final norm (fp32 input, y, weight*y, rstd), labels, fp32 log-probabilities
            head = (4 * h + 2 * act * h + 4) / rep + 8 + 4 * cfg.padded_vocab_size / tp
    return chunk, head


def head_transient_bytes(cfg: GLMConfig, tp: int, kernels: str, act: int) -> float:
    """Transient loss buffers per token (not kept for backward, so not in the saved-tensor
    count): torch logits + log-prob gradient, fp32 [T, V_r] each; the fused loss works on
    chunks of about [T, h] (kernels/cross_entropy.py), forward and backward."""
    if kernels == "fused":
        return 2 * act * cfg.hidden_size
    return 2 * 4 * cfg.padded_vocab_size / tp


def in_flight(schedule: str, p: int, stage: int, m: int, v: int = 1) -> int:
    """Microbatch-chunks whose activations stage `stage` holds at its peak."""
    if schedule == "none":
        return 1
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(p - stage, m)
    if schedule == "interleaved":
        return min(2 * (p - stage - 1) + (v - 1) * p + 1, m * v)
    if schedule == "zb-v":
        # chunk activations (half a stage each) from F to W: 2p on every rank once
        # m >= 2p - 1 (1F1B's stage-0 peak, in halves); fewer microbatches hold fewer,
        # 2m bounds them (engine.pipeline.sim checks both)
        return min(2 * p, 2 * m)
    if schedule == "zb-h1":
        # from F to W: 1F1B's p - s, plus the s microbatches whose W stage s defers (they
        # keep only the linear layers' inputs and output gradients: counted in full, an
        # upper bound); stage 0 holds what it holds under 1F1B (pipeline_sim checks it)
        return min(p, m)
    from engine.pipeline.names import SCHEDULES
    raise ValueError(f"schedule={schedule!r} must be one of {', '.join(SCHEDULES)}")


# ---- the estimate ----------------------------------------------------------------------

@dataclass(frozen=True)
class StageMemory:
    stage: int
    num_params: int
    params: float
    grads: float
    optimizer: float
    activations: float      # peak bytes kept for backward (what saved-tensor hooks see)
    workspace: float        # transient buffers on top (loss, one layer's gradients)
    in_flight: int

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def states_and_activations(self) -> float:
        """The quantity measure.py measures: model states + saved activations."""
        return self.model_states + self.activations

    @property
    def total(self) -> float:
        return self.states_and_activations + self.workspace


def predict_stage_memory(req: PlanRequest, layout: Layout, stage: int) -> StageMemory:
    cfg, pb = req.config, PRECISION_BYTES[req.precision]
    e, t, p, v, sp = pb["act"], layout.tp, layout.pp, layout.vpp, layout.sequence_parallel
    n_layers = stage_layers(req, layout, stage)
    n_params = stage_params(cfg, layout, stage, n_layers)
    shard = layout.dp if layout.zero_stage >= 1 else 1
    params = n_params * pb["param"]
    grads = n_params * pb["grad"]
    optim = n_params * (pb["master"] + pb["moments"]) / shard

    tokens = layout.micro_batch_size * req.seq_len
    per_layer = sum(layer_activation_terms(cfg, t, req.seq_len, req.kernels, e, sp).values())
    first, last = stage == 0, holds_head(layout.schedule, p, stage)
    chunk_extra, head = stage_extra_terms(cfg, t, req.kernels, e, first, last, sp)
    # layers per chunk (uneven chunks of one stage: their mean)
    depth = n_layers / v if req.layer_split != "even" else cfg.num_layers // (p * v)
    n = in_flight(layout.schedule, p, stage, layout.num_microbatches, v)
    if not layout.recompute:
        acts = tokens * (n * (depth * per_layer + chunk_extra) + head)
    else:
        x_in = layer_input_bytes(cfg, t, e, sp)
        kept = n * (depth * x_in + chunk_extra)
        # end of a forward (loss still saved) vs backward recomputing one layer; the
        # recomputed layer's own input is the kept one (same storage, counted once)
        acts = tokens * max(kept + head, kept + per_layer - x_in)
    work = tokens * max(per_layer,
                        head_transient_bytes(cfg, t, req.kernels, e) if last else 0.0)
    return StageMemory(stage, n_params, params, grads, optim, acts, work, n)


@dataclass(frozen=True)
class MemoryEstimate:
    stages: tuple[StageMemory, ...]

    @property
    def peak(self) -> StageMemory:
        """The stage that needs the most memory (it decides whether the layout fits)."""
        return max(self.stages, key=lambda st: st.total)


def predict_memory(req: PlanRequest, layout: Layout) -> MemoryEstimate:
    return MemoryEstimate(tuple(predict_stage_memory(req, layout, s)
                                for s in range(layout.pp)))
