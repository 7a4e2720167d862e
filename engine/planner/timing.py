"""Step time of a layout on a device: GEMMs, elementwise traffic, framework overhead,
pipeline bubble, tensor / pipeline / data-parallel communication, optimizer.

Per pipeline stage s and microbatch (T = b * s tokens, one tp rank):

    gemm      sum over the stage's matmuls of flops / gemm_rate(T, n): model FLOPs from
              engine.train.flops.train_flops_per_token (6 per weight per token + attention),
              split into layers and head, on this rank's shard; recompute runs the
              layers' forward again (+1/3); the fused SwiGLU-linear recomputes its
              [T, 2f] product in backward (+2 h 2f per token per layer)
    elementwise  norms, rotary, softmax, SwiGLU, residual adds are bandwidth-bound:
              TRAFFIC[kernels] bytes moved per byte a layer keeps for backward
              (torch reference: counted with a TorchDispatchMode over every non-matmul
              op of a small-preset layer, 8.4 .. 9.4 for s = 64 .. 256; fused kernels:
              written and read once in forward / backward, and the same for the
              gradient, 4), x 5/4 with recompute (the forward runs twice); the loss
              over [T, V_r] moves 6 logits-sized passes; gradient accumulation reads
              and writes the fp32 buckets once per microbatch (3 passes over them)
    overhead  OPS[kernels] operators per layer (torch reference: 248, counted as above;
              fused: ~40, one launch per kernel and matmul) x op_overhead; on a GPU the
              host issues them while earlier kernels run, so only the excess over the
              device time shows; on a CPU they add
    host      on a host with fewer cores than ranks (DeviceProfile.host_cores), ranks
              computing at once share them: gemm + elementwise + overhead take
              max(1, busy / host_cores) as long, busy = world x (1 - bubble fraction)
              / (1 + straggler): stages idle in the bubble, and ranks waiting for a
              straggler, leave their core to the others (the optimizer: no bubble)
    straggler with more than one rank, gemm + elementwise + overhead (and the optimizer)
              take (1 + straggler) as long: ranks that synchronise wait for the slowest,
              ~0 on dedicated devices, measured by calibrate() on time-sliced hosts
    tp        4 all-reduces of T*h elements per layer (2 forward, 2 backward; 6 with
              recompute), ring cost 2 (t - 1) / t * bytes / bw; sequence parallelism
              swaps each for a reduce-scatter + all-gather of the same volume (on gloo,
              which has no reduce-scatter, mappings.py all-reduces and slices: the
              reduce-scatter then costs an all-reduce); each collective also pays the
              device's latency
    tp_extra  the other tensor-parallel collectives: the embedding's all-reduce (sp:
              reduce-scatter, and an all-gather backward), the head's input all-reduce
              in backward (sp: all-gather + reduce-scatter) and the vocab-parallel
              loss's two [T] all-reduces, the sum over replicated KV rows (t > groups),
              and under sp the norm-weight gradient all-reduces (2 per layer, 1 final)
    p2p       one activation forward and one gradient backward per chunk boundary,
              T*h*e bytes each (/ t with sequence parallelism), plus the latency of
              each exchange, not overlapped (the schedule's exchanges block)

    pipeline  m * max_s t_s + (sum_s t_s - max_s t_s) / vpp; for equal stages that is
              (m + (p - 1) / vpp) t: bubble fraction (p - 1) / (vpp m + p - 1). ZB-H1
              fills and drains at the cost of F + B - W instead of F + B + W (Qi et al.
              2024); with F, B (input gradients) and W (weight gradients) about equal
              GEMM work that is a third: bubble (sum_s t_s - max_s t_s) / 3, fraction
              (p - 1) / (3m + p - 1)
    dp        ZeRO 0/1: all-reduce of the fp32 gradient buckets, 2 (d - 1) / d * bytes;
              ZeRO 2: reduce-scatter, (d - 1) / d; overlapped with the last microbatch's
              backward except one bucket; ZeRO 1/2 then all-gather the updated
              parameters, (d - 1) / d * param bytes, exposed; plus the latency of
              every bucket's collective
    optimizer unfused AdamW (engine/optim/adamw.py = torch's foreach=False): 8
              elementwise passes, 80 bytes per fp32 parameter of this rank's shard, plus
              zeroing the gradients, plus (bf16) publishing the parameter; ~10 ops per
              parameter tensor; plus the latency of the step's small collectives (the
              global-norm sums over dp and the model-parallel ranks, the loss over pp
              and dp, the token count over dp, the pipeline's shape handshake)
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.train.flops import layer_flops_per_token
from engine.planner.devices import DeviceProfile
from engine.pipeline.placement import holds_head
from engine.planner.layouts import Layout, PlanRequest
from engine.planner.memory import (PRECISION_BYTES, layer_activation_terms, shard_of,
                                   stage_layers, stage_params)

BUCKET_BYTES = 25 * 2 ** 20       # engine/optim default bucket_mb: the last one is exposed
TRAFFIC = {"torch": 9.0, "fused": 4.0}
OPS_PER_LAYER = {"torch": 248, "fused": 40}
OPS_OUTSIDE_LAYERS = {"torch": 74, "fused": 20}     # embedding, rotary angles, norm, loss
RECOMPUTE_OP_SHARE = 0.4          # share of a layer's ops that are forward ops
ADAMW_BYTES = 80                  # per fp32 parameter, see above
ADAMW_OPS = 10                    # per parameter tensor


def ring_factor(n: int) -> float:
    """Bytes each rank moves per byte of buffer in a ring all-reduce."""
    return 2.0 * (n - 1) / n


def layer_gemms(req: PlanRequest, tp: int) -> list[tuple[float, float]]:
    """(training FLOPs per token, the matmul's small dimension) of one layer on one tp
    rank. Weight matmuls carry 6 FLOPs per weight (KV replicas included); what
    train_flops_per_token has beyond the weights is attention, whose matmuls are as
    narrow as a head."""
    cfg = req.config
    sh, h, d = shard_of(cfg, tp), cfg.hidden_size, cfg.kv_channels
    qkv_r = (sh.heads + 2 * sh.groups) * d
    per_layer = layer_flops_per_token(cfg, req.seq_len)
    full_weights = h * cfg.qkv_size + cfg.q_size * h + 3 * h * cfg.ffn_hidden_size
    return [(6.0 * h * qkv_r, qkv_r), (6.0 * sh.heads * d * h, sh.heads * d),
            (6.0 * h * 2 * sh.ffn, 2 * sh.ffn), (6.0 * sh.ffn * h, sh.ffn),
            ((per_layer - 6.0 * full_weights) / tp, d)]


def param_tensors(cfg, stage: int, pp: int, n_layers: int | None = None) -> int:
    """Parameter tensors on one rank of a stage holding n_layers layers (None: the even
    split's) (the optimizer's per-tensor ops)."""
    biases = int(cfg.add_qkv_bias) + 3 * int(cfg.add_bias_linear)
    n = (cfg.num_layers // pp if n_layers is None else n_layers) * (6 + biases)
    return n + (stage == 0) + 2 * (stage == pp - 1)


@dataclass(frozen=True)
class StageTime:
    stage: int
    gemm: float             # per microbatch, seconds
    elementwise: float
    overhead: float         # host dispatch not hidden behind device work
    tp: float               # the layers' activation collectives
    p2p: float
    tp_extra: float = 0.0   # embedding, head / loss, norm-gradient and KV-replica sums

    @property
    def per_microbatch(self) -> float:
        return (self.gemm + self.elementwise + self.overhead + self.tp + self.tp_extra
                + self.p2p)


@dataclass(frozen=True)
class TimeEstimate:
    gemm: float             # on the slowest stage, whole step
    elementwise: float
    overhead: float
    tp: float
    p2p: float
    bubble: float           # seconds idle in the pipeline fill and drain
    dp: float               # exposed data-parallel communication
    optimizer: float
    bubble_fraction: float  # textbook (p - 1) / (vpp m + p - 1)
    tokens: int             # per step

    @property
    def compute(self) -> float:
        return self.gemm + self.elementwise + self.overhead

    @property
    def comm(self) -> float:
        return self.tp + self.p2p + self.dp

    @property
    def total(self) -> float:
        return self.compute + self.comm + self.bubble + self.optimizer

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total


# fill/drain cost of a schedule relative to 1F1B's (F + B - W over F + B + W, F = B = W)
# ZB-V: the same third over v = 2 chunks, which is the simulator's (p-1) / (6m + p-1)
BUBBLE_SCALE = {"zb-h1": 1.0 / 3.0, "zb-v": 1.0 / 3.0}


def bubble_fraction(layout: Layout) -> float:
    p, m, v = layout.pp, layout.num_microbatches, layout.vpp
    k = BUBBLE_SCALE.get(layout.schedule, 1.0)
    return k * (p - 1) / (v * m + k * (p - 1))


def host_slowdown(req: PlanRequest, layout: Layout, dev: DeviceProfile,
                  busy_share: float | None = None) -> float:
    """How much longer compute takes when more ranks compute at once than the host has
    cores for (1 on devices of their own)."""
    if not dev.host_cores:
        return 1.0
    share = 1.0 - bubble_fraction(layout) if busy_share is None else busy_share
    return max(1.0, req.world_size * share / (1.0 + dev.straggler) / dev.host_cores)


def _device_and_host(dev: DeviceProfile, device_s: float, host_s: float) -> float:
    """Host overhead that is not hidden behind device work."""
    return max(0.0, host_s - device_s) if dev.async_launch else host_s


def stage_time(req: PlanRequest, layout: Layout, dev: DeviceProfile, stage: int) -> StageTime:
    cfg, t, p, k = req.config, layout.tp, layout.pp, req.kernels
    pb = PRECISION_BYTES[req.precision]
    e, rc = pb["act"], layout.recompute
    tokens = layout.micro_batch_size * req.seq_len
    n_layers = stage_layers(req, layout, stage)     # parallel.layer_split's
    sh = shard_of(cfg, t)
    last, first = holds_head(layout.schedule, p, stage), stage == 0

    layer = sum(f / dev.gemm_rate(tokens, n) for f, n in layer_gemms(req, t))
    layer *= 4.0 / 3.0 if rc else 1.0
    if k == "fused" and not cfg.add_bias_linear:
        layer += 2.0 * cfg.hidden_size * 2 * sh.ffn / dev.gemm_rate(tokens, 2 * sh.ffn)
    gemm = tokens * n_layers * layer
    if last:
        gemm += tokens * 6.0 * cfg.hidden_size * sh.vocab / dev.gemm_rate(tokens, sh.vocab)

    kept = sum(layer_activation_terms(cfg, t, req.seq_len, k, e,
                                      layout.sequence_parallel).values())
    moved = tokens * n_layers * TRAFFIC[k] * kept * (1.25 if rc else 1.0)
    if last:
        moved += tokens * 6 * (4 if k == "torch" else e) * sh.vocab
    n_params = stage_params(cfg, layout, stage, n_layers)
    moved += 3 * pb["grad"] * n_params                   # gradient accumulation
    if first:
        moved += pb["grad"] * sh.vocab * cfg.hidden_size  # dense embedding gradient
    elementwise = moved / dev.mem_bw

    ops = n_layers * OPS_PER_LAYER[k] * (1 + RECOMPUTE_OP_SHARE if rc else 1.0)
    ops += OPS_OUTSIDE_LAYERS[k] if (first or last) else 0
    overhead = _device_and_host(dev, gemm + elementwise, ops * dev.op_overhead)
    stretch = host_slowdown(req, layout, dev) * (1.0 + (req.world_size > 1) * dev.straggler)
    gemm, elementwise, overhead = gemm * stretch, elementwise * stretch, overhead * stretch

    comm, extra = 0.0, 0.0
    if t > 1:
        comm, extra = _tp_times(req, layout, dev, first, last, n_layers)
    p2p = 0.0
    if p > 1:
        bw = dev.p2p_bw or (dev.intra_bw if req.world_size <= req.gpus_per_node
                            else dev.inter_bw)
        msg = tokens * cfg.hidden_size * e / (t if layout.sequence_parallel else 1)
        p2p = 2 * layout.vpp * (msg / bw + dev.latency)
    return StageTime(stage, gemm, elementwise, overhead, comm, p2p, extra)


def _tp_times(req: PlanRequest, layout: Layout, dev: DeviceProfile, first: bool,
              last: bool, n_layers: int) -> tuple[float, float]:
    """(layers, extra) tensor-parallel communication per microbatch on one stage."""
    cfg, t, sp = req.config, layout.tp, layout.sequence_parallel
    e = PRECISION_BYTES[req.precision]["act"]
    h, bw, lat = cfg.hidden_size, dev.intra_bw, dev.latency
    msg = layout.micro_batch_size * req.seq_len * h * e          # [T, h]
    all_reduce = ring_factor(t) * msg / bw + lat
    all_gather = (t - 1) / t * msg / bw + lat
    reduce_scatter = ((t - 1) / t if dev.native_reduce_scatter else ring_factor(t)) \
        * msg / bw + lat
    # per layer: 2 collectives per forward (run twice with recompute), 2 in backward
    count = 6 if layout.recompute else 4
    layers = n_layers * count * ((all_gather + reduce_scatter) if sp else all_reduce)
    extra = 0.0
    if first:      # embedding: all-reduce / (sp) reduce-scatter forward, all-gather back
        extra += (reduce_scatter + all_gather) if sp else all_reduce
    if last:       # head input (backward sum; sp: gather + scatter), loss max and sums
        extra += ((all_gather + reduce_scatter) if sp else all_reduce) + 2 * lat
    small = ring_factor(t) * h * 4 / bw + lat                    # one norm weight's grad
    if sp:
        extra += (2 * n_layers + last) * small
    if t > cfg.multi_query_group_num:
        # replicated KV weight rows: their gradient summed per microbatch, one all-reduce
        # of a [groups, 2 d, h] buffer (mappings.copy_to_replicas)
        kv = cfg.multi_query_group_num * 2 * cfg.kv_channels * h \
            * PRECISION_BYTES[req.precision]["param"]
        extra += n_layers * (ring_factor(t) * kv / bw + lat)
    return layers, extra


def _dp_time(req: PlanRequest, layout: Layout, dev: DeviceProfile, st: StageTime,
             n_params: int) -> float:
    d = layout.dp
    if d == 1:
        return 0.0
    pb = PRECISION_BYTES[req.precision]
    bw = dev.intra_bw if layout.tp * d <= req.gpus_per_node else dev.inter_bw
    grad_bytes = n_params * pb["grad"]
    buckets = -(-grad_bytes // BUCKET_BYTES)
    if layout.zero_stage == 2:
        reduce = (d - 1) / d * grad_bytes / bw
    else:
        reduce = ring_factor(d) * grad_bytes / bw
    reduce += buckets * dev.latency
    # buckets go out during the last microbatch's backward
    bwd_share = 0.75 if layout.recompute else 2.0 / 3.0
    window = bwd_share * (st.gemm + st.elementwise + st.overhead) + st.tp
    last_bucket = ring_factor(d) * min(BUCKET_BYTES, grad_bytes) / bw + dev.latency
    out = max(reduce - window, min(reduce, last_bucket))
    if layout.zero_stage >= 1:
        out += (d - 1) / d * n_params * pb["param"] / bw + dev.latency
    return out


def _optimizer_time(req: PlanRequest, layout: Layout, dev: DeviceProfile, stage: int,
                    n_params: int) -> float:
    pb = PRECISION_BYTES[req.precision]
    shard = n_params / (layout.dp if layout.zero_stage >= 1 else 1)
    moved = shard * ADAMW_BYTES + n_params * pb["grad"]          # update, zero grads
    if pb["master"]:
        moved += shard * (pb["master"] + pb["param"])            # publish bf16 params
    device_s = moved / dev.mem_bw
    host_s = ADAMW_OPS * param_tensors(req.config, stage, layout.pp,
                                       stage_layers(req, layout, stage)) * dev.op_overhead
    # the step's small collectives: norm sums (dp shards, model-parallel ranks), loss
    # (pp, dp), token count (dp), the pipeline's shape handshake (pp)
    small = ((layout.dp > 1) * (2 + (layout.zero_stage > 0))
             + (layout.tp * layout.pp > 1) + 2 * (layout.pp > 1))
    compute = device_s + _device_and_host(dev, device_s, host_s)
    compute *= host_slowdown(req, layout, dev, busy_share=1.0)
    if req.world_size > 1:
        compute *= 1.0 + dev.straggler
    return compute + small * dev.latency


def predict_time(req: PlanRequest, layout: Layout, dev: DeviceProfile) -> TimeEstimate:
    p, m, v = layout.pp, layout.num_microbatches, layout.vpp
    stages, dp_times, opt_times = [], [], []
    for s in range(p):
        st = stage_time(req, layout, dev, s)
        n = stage_params(req.config, layout, s, stage_layers(req, layout, s))
        stages.append(st)
        dp_times.append(_dp_time(req, layout, dev, st, n))
        opt_times.append(_optimizer_time(req, layout, dev, s, n))
    slow = max(stages, key=lambda st: st.per_microbatch)
    bubble = (sum(st.per_microbatch for st in stages) - slow.per_microbatch) / v
    bubble *= BUBBLE_SCALE.get(layout.schedule, 1.0)
    return TimeEstimate(gemm=m * slow.gemm, elementwise=m * slow.elementwise,
                        overhead=m * slow.overhead, tp=m * (slow.tp + slow.tp_extra),
                        p2p=m * slow.p2p,
                        bubble=bubble, dp=max(dp_times), optimizer=max(opt_times),
                        bubble_fraction=bubble_fraction(layout),
                        tokens=req.global_batch * req.seq_len)
