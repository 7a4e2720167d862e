"""runners/validate_planner.py: check the layout planner against layouts that run on this
machine: train each layout on gloo (one process per rank, one thread each), measure every
rank's peak memory (parameters + gradients + optimizer state + saved activations) and the
step time, and print them beside the planner's predictions for the same layout.

    python runners/validate_planner.py                       # small preset, 4 layers, s=64
    python runners/validate_planner.py --model.num_layers 6 --validate.seq_len 128 \
        --validate.global_batch_size 4 --validate.rounds 9
    python runners/validate_planner.py --validate.layouts single,dp2-z1,pp2-dp2

How. One job as large as the largest layout; each layout runs on its first ranks while
the others sleep in a barrier. Memory: one metered step per layout (measured max over
ranks against predicted max over stages, and every rank against its own stage). Time:
rounds, each calibrating a CPU profile for every layout size (engine.planner.calibrate
on that many ranks at once, medians: one rank's rates, how many ranks the host runs at
them at once, gloo bandwidth, the cost of a collective between computations and the
straggler term) and then timing one step of every layout, the order rotated per round;
reported: median over rounds of the slowest rank's step, against the prediction with
the rounds' calibrations pooled (pool_profiles). Interleaving makes load that drifts
on a shared machine hit every layout and its calibration alike."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config_cli import Alias, command
from engine.planner.validate import LAYOUTS


@dataclass
class ValidateModel:
    preset: str = "small"          # named model shape (model/config.py PRESETS)
    num_layers: int = 4            # layers (0: the preset's)


@dataclass
class ValidateConfig:
    seq_len: int = 64              # tokens per sequence
    global_batch_size: int = 4     # sequences per optimizer step over all data-parallel ranks
    rounds: int = 7                # timed steps per layout (interleaved rounds)
    layouts: list[str] = field(default_factory=list)  # subset of the named layouts
    #                                ([]: all; engine/planner/validate.py LAYOUTS)
    margin: float = 0.25           # rank only pairs the planner separates by at least this much

    def __post_init__(self):
        bad = [n for n in self.layouts if n not in LAYOUTS]
        if bad:
            raise ValueError(f"validate.layouts: unknown layout {bad[0]!r}; known: "
                             f"{', '.join(LAYOUTS)}")
        for name in ("seq_len", "global_batch_size", "rounds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"validate.{name}={getattr(self, name)} must be positive")


COMMAND = command(
    __doc__, {"model": ValidateModel, "validate": ValidateConfig},
    aliases={"--preset": Alias("model.preset"), "--layers": Alias("model.num_layers"),
             "--seq-len": Alias("validate.seq_len"),
             "--global-batch": Alias("validate.global_batch_size"),
             "--rounds": Alias("validate.rounds"), "--only": Alias("validate.layouts"),
             "--margin": Alias("validate.margin")})


def spawn(fn, world: int, *args) -> list:
    """The per-rank results of fn on `world` gloo processes (no job deadline: a layout
    may be slow; every collective still times out after 300 s)."""
    from engine.parallel.spawn import run_workers
    return run_workers(fn, world, *args, timeout=None, pg_timeout=300)


def run(config):
    import torch

    from engine.planner.validate import HEADER, model_config, summary, validate
    v = config.validate
    model = model_config(config.model.preset, config.model.num_layers).to_dict()
    torch.set_num_threads(1)
    print(HEADER)
    rows = validate(list(v.layouts) or list(LAYOUTS), model, v.seq_len, v.global_batch_size,
                    v.rounds, spawn)
    print(summary(rows, v.margin))
    if v.margin < 0.5:
        print(summary(rows, 0.5).splitlines()[0])


def main(argv=None):
    return COMMAND.main(run, argv)
