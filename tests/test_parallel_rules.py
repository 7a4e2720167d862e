"""The layout rules (engine/parallel/rules.py) and the single-process ParallelState: each
rule answers the same for config launch, tensor parallelism and the planner; the single
state reads like any other and its collectives do nothing."""
import dataclasses

import pytest
import torch

from engine.config import build_run_config
from engine.parallel import rules
from engine.parallel.state import (ParallelDims, ParallelState, init_distributed,
                                   model_parallel_group, model_parallel_ranks, or_single)
from engine.planner.layouts import tp_problem as planner_tp_problem
from engine.tensor_parallel import ShardPlan
from model import GLMConfig
from tests.dist import run_workers

TINY = GLMConfig.preset("tiny")    # 4 heads, 2 KV groups, ffn 172, vocab 1024


@pytest.mark.parametrize("change, tp, message", [
    ({"num_attention_heads": 6}, 4, "num_attention_heads=6 is not divisible by tp=4"),
    ({"multi_query_group_num": 3, "num_attention_heads": 12}, 2,
     "multi_query_group_num=3 and tp=2: one must divide the other"),
    ({"num_attention_heads": 8}, 8, "ffn_hidden_size=172 is not divisible by tp=8"),
    ({"ffn_hidden_size": 176}, 8, "num_attention_heads=4 is not divisible by tp=8"),
    ({"num_attention_heads": 8, "ffn_hidden_size": 176, "padded_vocab_size": 1028}, 8,
     "padded_vocab_size=1028 is not divisible by tp=8"),
])
def test_tp_problem_is_the_one_answer_everywhere(change, tp, message, tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, **change)
    assert rules.tp_problem(cfg, tp).startswith(message)
    with pytest.raises(ValueError, match=message):
        ShardPlan(cfg, tp)
    assert planner_tp_problem(cfg, tp, gpus_per_node=8) == rules.tp_problem(cfg, tp)
    from engine.train.launch import parallel_state
    run = build_run_config({"parallel": {"tp": tp}, "train": {"out_dir": str(tmp_path)}})
    run.model = cfg
    monkeypatch.setenv("WORLD_SIZE", str(tp))   # refused before any process group
    with pytest.raises(ValueError, match=f"parallel.tp={tp}: {message}"):
        parallel_state(run)


def test_tp_problem_accepts_whole_and_replicated_kv_groups():
    assert rules.tp_problem(TINY, 1) is None
    assert rules.tp_problem(TINY, 2) is None     # one KV group per rank
    assert rules.tp_problem(dataclasses.replace(TINY, ffn_hidden_size=176), 4) is None  # shared


def test_infer_dp():
    assert rules.infer_dp(2, 2, 3, world=12) == 3       # given: kept
    assert rules.infer_dp(2, 2, 0, world=12) == 3       # 0: what tp * pp leave
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp\*pp=4"):
        rules.infer_dp(2, 2, 0, world=6)


def test_precision_vocabulary():
    for name in rules.PRECISIONS:
        rules.check_precision(name)
    with pytest.raises(ValueError, match="train.precision='fp8' must be auto, fp32, bf16 or "
                                         "fp16"):
        build_run_config({"train": {"precision": "fp8"}})
    assert [rules.param_precision(p) for p in rules.PRECISIONS] == ["fp32", "fp32", "bf16",
                                                                    "fp16"]
    assert rules.autocasts_bf16("auto", "cuda") and not rules.autocasts_bf16("auto", "cpu")
    assert not rules.autocasts_bf16("bf16", "cuda")
    assert [rules.planner_precision(p, "bf16") for p in rules.PRECISIONS] == [
        "bf16", "fp32", "bf16", "bf16"]
    assert rules.planner_precision("auto", "fp32") == "fp32"


def test_single_state_reads_like_a_layout_of_one():
    s = ParallelState.single("cpu")
    assert (s.dims.tp, s.dims.pp, s.dims.dp, s.dims.vpp, s.dims.world_size) == (1, 1, 1, 1, 1)
    assert (s.rank, s.coords.tp, s.coords.dp, s.coords.pp) == (0, 0, 0, 0)
    assert s.is_first_stage and s.is_last_stage and s.prev_rank == s.next_rank == 0
    assert s.device == torch.device("cpu") and not s.distributed and not s.multi_rank
    assert s.tp_group is s.dp_group is s.pp_group is None
    s.barrier()                                    # no process group: nothing to wait for
    assert s.all_gather_object("x") == ["x"]
    assert s.broadcast_object({"a": 1}) == {"a": 1}
    assert model_parallel_group(s) is None
    assert or_single(None, "cpu").dims == s.dims and or_single(s) is s


def test_model_parallel_ranks_hold_one_replica_each():
    assert model_parallel_ranks(ParallelDims(tp=2, pp=2, dp=2)) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert model_parallel_ranks(ParallelDims(dp=3)) == [[0], [1], [2]]


def _groups_worker(rank, world):
    import torch.distributed as dist
    state = init_distributed(ParallelDims(tp=2), timeout=30, num_layers=4)
    mp = model_parallel_group(state)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, group=mp)
    return (state.distributed, state.multi_rank, state.tp_ranks, float(t),
            state.all_gather_object(rank * 10), state.broadcast_object(f"from {rank}"))


def test_distributed_state_groups_and_collectives():
    for rank, (joined, multi, tp_ranks, total, gathered, sent) in enumerate(
            run_workers(_groups_worker, 2, timeout=60)):
        assert joined and multi and tp_ranks == [0, 1]
        assert total == 3.0                 # the model-parallel group holds both ranks
        assert gathered == [0, 10] and sent == "from 0"
