"""`--train.profile_steps A:B` on a pp=2 gloo run (tiny preset, 2 steps): every rank's
torch.profiler trace is valid Chrome JSON with the schedule's named ranges, and rank 0's
pipeline timeline has one row per rank with compute and wait spans; the log line shows
real-token throughput and MFU."""
import json
import os

import pytest

from dist import run_workers
from engine.config import build_run_config
from engine.parallel.state import ParallelDims, init_distributed
from engine.train.profiling import parse_steps
from engine.train.trainer import Trainer
from test_trainer import RandomTokens


def _cfg(out_dir, **parallel):
    return build_run_config({
        "model": {"preset": "tiny"}, "parallel": parallel,
        "train": {"steps": 2, "micro_batch_size": 2, "num_microbatches": 2, "seq_len": 16,
                  "warmup_steps": 0, "log_every": 1, "eval_every": 0,
                  "out_dir": out_dir, "profile_steps": "1:2"}})


def _worker(rank, world, out_dir):
    state = init_distributed(ParallelDims(pp=2), timeout=60, num_layers=4)
    lines = []
    Trainer.from_config(_cfg(out_dir, pp=2), RandomTokens(16, vocab=64), state=state,
                        log=lines.append).fit()
    return lines


def test_profile_steps_is_validated():
    assert parse_steps("3:4") == (3, 4)
    for bad in ("3", "4:3", "0:1", "a:b"):
        with pytest.raises(ValueError, match="train.profile_steps"):
            build_run_config({"train": {"profile_steps": bad}})


def test_pp2_profile_writes_trace_and_timeline(tmp_path):
    out = str(tmp_path / "run")
    lines = run_workers(_worker, 2, out, timeout=120)
    prof = os.path.join(out, "profile")
    for rank in (0, 1):
        with open(os.path.join(prof, f"trace_rank{rank}.json")) as f:
            trace = json.load(f)
        names = {e.get("name", "") for e in trace["traceEvents"]}
        # forward, backward and exchange per stage and microbatch (chunk 0)
        for mb in (0, 1):
            assert f"forward stage{rank} F{mb}.0" in names, sorted(names)[:40]
            assert f"backward stage{rank} B{mb}.0" in names
        assert any(n.startswith(f"exchange stage{rank} X[") for n in names)
        assert {"train step 1", "train step 2"} <= names
    with open(os.path.join(prof, "timeline.json")) as f:
        timeline = json.load(f)["traceEvents"]
    spans = [e for e in timeline if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {0, 1}
    assert {e["cat"] for e in spans} == {"compute", "wait"}
    assert {e["args"]["step"] for e in spans} == {1, 2}
    assert all(e["dur"] >= 0 for e in spans)
    rows = [e["args"]["name"] for e in timeline if e["name"] == "thread_name"]
    assert rows == ["rank 0 (stage 0)", "rank 1 (stage 1)"]
    logged = [x for x in lines[0] if "tok/s" in x]
    assert logged and all("MFU" in x for x in logged), lines[0]


class _Padded:
    """Rows of 5..16 real tokens right-padded to 16, with the pad id where the trainer
    looks for it (data.ids.pad)."""

    class ids:
        pad = 0

    def get_batch(self, index, batch_size):
        import torch
        from model.masks import causal_example, collate
        g = torch.Generator().manual_seed(index)
        rows = [torch.randint(4, 64, (int(torch.randint(5, 17, (1,), generator=g)),),
                              generator=g).tolist() for _ in range(batch_size)]
        return collate([causal_example(r) for r in rows], 16, pad_id=0)


def test_step_tokens_count_real_tokens_not_padding(tmp_path):
    from engine.train.trainer import real_tokens
    cfg = _cfg(str(tmp_path / "run"))
    cfg.train.profile_steps = ""
    data = _Padded()
    tr = Trainer.from_config(cfg, data, log=lambda *a: None)
    hist = tr.fit()
    for st, step in zip(hist, range(2)):
        mbs = tr.microbatches(data, step)
        want = sum(int((mb["input_ids"] != 0).sum()) for mb in mbs)
        assert st.tokens == want == real_tokens(mbs, 0)
        assert want < sum(mb["input_ids"].numel() for mb in mbs)   # there was padding
        assert st.seconds > 0
