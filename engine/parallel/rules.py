"""The layout rules, each written once: config validation, launch, tensor parallelism and
the planner all ask here (kept free of torch so configs load cheaply).

  tp_problem       whether tp can shard a model (heads, KV groups, FFN, vocab)
  infer_dp         dp from the world size when the config leaves it 0
  PRECISIONS       the train.precision names, and what each means for parameters,
                   autocast and the planner's byte counts
The schedule names live in engine/pipeline/names.py beside the split-backward list.
"""
from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")      # train.precision
PARAM_PRECISIONS = ("fp32", "bf16", "fp16")        # what parameters are stored in
PLANNER_PRECISIONS = ("bf16", "fp32")              # what the planner counts bytes in


def tp_problem(config, tp: int) -> str | None:
    """Why tensor parallelism of size `tp` cannot shard a model with this GLMConfig
    (None when it can): every rank holds whole query heads, whole KV groups or one
    replicated group, and equal slices of the FFN and the (padded) vocabulary."""
    nh, ng = config.num_attention_heads, config.multi_query_group_num
    if nh % tp:
        return f"num_attention_heads={nh} is not divisible by tp={tp}"
    if ng % tp and tp % ng:
        return (f"multi_query_group_num={ng} and tp={tp}: one must divide the other (each "
                "rank holds whole KV groups, or one shared group)")
    if config.ffn_hidden_size % tp:
        return f"ffn_hidden_size={config.ffn_hidden_size} is not divisible by tp={tp}"
    if config.padded_vocab_size % tp:
        return f"padded_vocab_size={config.padded_vocab_size} is not divisible by tp={tp}"
    return None


def infer_dp(tp: int, pp: int, dp: int, world: int) -> int:
    """dp as configured, or (dp == 0) whatever the world size leaves after tp * pp."""
    if dp:
        return dp
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp={tp * pp}")
    return world // (tp * pp)


def check_precision(precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} must be auto, fp32, bf16 or fp16")


def param_precision(precision: str) -> str:
    """The parameters' (and gradients') dtype name: "bf16" / "fp16" store them in that
    dtype with fp32 master weights in the optimizer; "auto" and "fp32" keep fp32."""
    return precision if precision in PARAM_PRECISIONS else "fp32"


def autocasts_bf16(precision: str, device_type: str) -> bool:
    """"auto" on CUDA: bf16 autocast over fp32 parameters (fp32 on the CPU)."""
    return precision == "auto" and device_type == "cuda"


def planner_precision(precision: str, device_default: str) -> str:
    """The precision the planner counts bytes in: the device profile's for "auto";
    fp16 keeps bf16's byte counts."""
    if precision == "auto":
        return device_default
    return "fp32" if precision == "fp32" else "bf16"
