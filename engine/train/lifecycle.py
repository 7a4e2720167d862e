"""The lifecycle every training workflow shares (pretrain, distill, fine-tune), written
once: join the torchrun job and build the groups, take the out_dir (lock; resume, refuse
or start over), resume the Trainer, save, tear down.

    with open_run(cfg, resume, force) as run:
        trainer = Trainer.from_config(cfg, ..., state=run.state, extra_files=tokenizer_files(tok))
        run.resume(trainer)
        trainer.fit()
        path = run.save(trainer)

The tokenizer is one of the Trainer's extra_files, so it is written inside the atomic
save (a checkpoint is never visible without it) and evaluation needs nothing else."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch.distributed as dist

from engine.config import RunConfig
from engine.train.checkpoint import TOKENIZER_FILE
from engine.train.launch import open_out_dir, parallel_state, stopped_line


def tokenizer_files(tok) -> dict[str, str]:
    """The Trainer's extra_files entry that puts the run's tokenizer in every checkpoint."""
    return {TOKENIZER_FILE: str(tok.path)}


@dataclass
class Run:
    """One open run: its parallel state (ParallelState.single() for one process) and
    out_dir."""
    cfg: RunConfig
    state: object
    run_dir: object
    log: object = print

    @property
    def rank0(self) -> bool:
        return self.state.rank == 0

    def resume(self, trainer) -> None:
        """Load the checkpoint the out_dir decided on (--resume), if any."""
        if self.run_dir.resume_path:
            trainer.resume(self.run_dir.resume_path)
            trainer.log(f"resumed from {self.run_dir.resume_path} at step {trainer.step}")

    def save(self, trainer) -> str:
        """The final checkpoint (every rank takes part) -> its path."""
        return trainer.save()

    @staticmethod
    def saved_line(trainer, path: str) -> str:
        return stopped_line(trainer, path) if trainer.stopped_by else f"saved {path}"


@contextlib.contextmanager
def open_run(cfg: RunConfig, resume: bool = False, force: bool = False, log=print):
    """Process groups (under torchrun) and the locked out_dir for the block; both are
    released when it ends, however it ends. An impossible layout fails on every rank
    with one line before any collective (engine/train/launch.parallel_state)."""
    state = parallel_state(cfg)
    run_dir = None
    try:
        run_dir = open_out_dir(cfg, state, resume, force, log)
        yield Run(cfg, state, run_dir, log)
    finally:
        if run_dir is not None:
            run_dir.close()
        if dist.is_initialized():   # joined by parallel_state (a torchrun job)
            dist.destroy_process_group()
