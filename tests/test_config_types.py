"""Config values are type-checked on load and on --section.field overrides, naming the
field, before any dataclass range check sees them (engine/config_check.py)."""
import dataclasses
import json
import os
from typing import Literal, Optional

import pytest

from engine.config import build_run_config, load_file, parse_overrides
from engine.config_check import check_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _over(*args):
    return build_run_config({}, parse_overrides(list(args)))


@pytest.mark.parametrize("args, message", [
    (["--train.steps", "2.5"], "train.steps=2.5 must be an integer"),
    (["--train.steps", "abc"], "train.steps='abc' must be an integer"),
    (["--train.steps", "true"], "train.steps=True must be an integer"),
    (["--parallel.timeout_s", "-5"], "parallel.timeout_s=-5 must be > 0"),
    (["--parallel.timeout_s", "0"], "parallel.timeout_s=0 must be > 0"),
    (["--parallel.timeout_s", "soon"], "parallel.timeout_s='soon' must be a number"),
    (["--train.lr", "false"], "train.lr=False must be a number"),
    (["--train.recompute", "yes"], "train.recompute='yes' must be true or false"),
    (["--train.recompute", "1"], "train.recompute=1 must be true or false"),
    (["--parallel.sequence_parallel", "null"],
     "parallel.sequence_parallel=None must be true or false"),
    (["--model.hidden_size", "64.0"], "model.hidden_size=64.0 must be an integer"),
    (["--model.add_qkv_bias", "0"], "model.add_qkv_bias=0 must be true or false"),
    (["--model.preset", "3"], "model.preset=3 must be a preset name"),
    (["--data.task", "null"], "data.task=None must be a string"),
])
def test_bad_override_is_one_line_naming_the_field(args, message):
    with pytest.raises(ValueError) as info:
        _over(*args)
    assert str(info.value) == message


def test_good_overrides_keep_their_meaning():
    cfg = _over("--train.steps", "7", "--train.lr", "1", "--train.recompute", "TRUE",
                "--data.dir", "2024", "--parallel.timeout_s", "2.5",
                "--model.preset", "tiny", "--model.num_layers", "4")
    assert cfg.train.steps == 7 and cfg.train.lr == 1 and cfg.train.recompute is True
    assert cfg.data.dir == "2024"            # a number on the command line, a string field
    assert cfg.parallel.timeout_s == 2.5 and cfg.model.num_layers == 4


def test_json_values_are_checked_too(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"steps": "100"}}))
    with pytest.raises(ValueError, match=r"^train.steps='100' must be an integer$"):
        build_run_config(load_file(str(path)))
    path.write_text(json.dumps({"parallel": {"pp": 2.0}}))
    with pytest.raises(ValueError, match=r"^parallel.pp=2.0 must be an integer$"):
        build_run_config(load_file(str(path)))


def test_every_shipped_config_still_loads():
    configs = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(configs)):
        raw = load_file(os.path.join(configs, name))
        own = {k: raw.pop(k) for k in ("distill", "finetune") if k in raw}
        build_run_config(raw)
        if "distill" in own:
            from engine.recipe.compress.distill import DistillConfig
            DistillConfig(**check_fields(DistillConfig, own["distill"], "distill"))
        if "finetune" in own:
            from engine.recipe.finetune import FinetuneConfig
            FinetuneConfig(**check_fields(FinetuneConfig, own["finetune"], "finetune"))


@dataclasses.dataclass
class _Typed:
    mode: Literal["a", "b"] = "a"
    limit: Optional[int] = None
    ids: list[int] = dataclasses.field(default_factory=list)
    ratio: float | None = 0.5


def test_optional_literal_and_containers():
    assert check_fields(_Typed, {"mode": "b", "limit": None, "ids": (1, 2), "ratio": None},
                        "x") == {"mode": "b", "limit": None, "ids": [1, 2], "ratio": None}
    assert check_fields(_Typed, {"limit": 3, "ratio": 1}, "x") == {"limit": 3, "ratio": 1}
    for values, message in (({"mode": "c"}, "x.mode='c' must be one of 'a', 'b'"),
                            ({"limit": 2.5}, "x.limit=2.5 must be an integer"),
                            ({"ids": 3}, "x.ids=3 must be a list"),
                            ({"ratio": "big"}, "x.ratio='big' must be a number"),
                            ({"other": 1}, "unknown x field(s): other; known: ids, limit, "
                                           "mode, ratio")):
        with pytest.raises(ValueError) as info:
            check_fields(_Typed, values, "x")
        assert str(info.value) == message
