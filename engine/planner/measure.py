"""Measure what the planner predicts, for layouts that run: the peak bytes of parameters +
gradients + optimizer states + saved activations of one training step, and its time.

Saved activations are counted with torch.autograd.graph.saved_tensors_hooks: every
tensor autograd keeps for backward is charged once per storage (views share their
base's bytes), parameters excluded, and released when autograd frees it; the peak is
taken over the whole step, including recomputation in backward. Transient buffers
(logits, activation gradients) are not saved tensors and are not counted: the planner
predicts them separately as `workspace`.

Single process (any micro-batch size, recompute, sequence length):

    got = measure_layout(req, layout)           # tp = pp = dp = 1
    got.total, got.activations, got.step_time

Multi-rank layouts (the engine's trainer, under torchrun or tests/dist.py): on every rank,

    got = measure_trainer(trainer, timed_steps=5)   # collective: every rank calls it
    # got.total on rank r  vs  predict_memory(req, layout).stages[stage of r]
    #                              .states_and_activations
    # got.step_time: median over steps of the slowest rank's time, the same on all ranks

`step` must run forward and backward in this thread (the hooks are thread-local) and
must not install saved-tensor hooks of its own (the innermost hooks win).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from engine.planner.layouts import Layout, PlanRequest
# the trainer's own recompute (train.recompute), so what is measured is what trains
from engine.train.recompute import recompute_layers
# the schedule's meter, used here through its hooks only, so it counts exactly the tensors
# saved for backward (given to forward_backward it also charges the stage outputs a
# pipeline holds until they are sent; tests/test_planner_multirank.py checks that gap)
from engine.pipeline.stats import SavedActivationMeter as SavedTensorMeter
from model.glm import GLM
from model.masks import causal_example, collate


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (flat buffers counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def model_state_bytes(params, optimizer) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer states) bytes on this rank. Optimizers with
    `state_bytes()` (engine/optim's DistributedOptimizer, which keeps gradients in its
    own buckets) report themselves; torch optimizers are read from `.state`."""
    params = list(params)
    p_bytes = _storage_bytes(params)
    if hasattr(optimizer, "state_bytes"):
        sb = optimizer.state_bytes()
        return p_bytes, sb["grads"], sb["master"] + sb["exp_avg"] + sb["exp_avg_sq"]
    g_bytes = _storage_bytes(p.grad for p in params)
    exclude = {p.untyped_storage().data_ptr() for p in params}
    states = [v for st in optimizer.state.values() for v in st.values()
              if torch.is_tensor(v) and v.untyped_storage().data_ptr() not in exclude]
    return p_bytes, g_bytes, _storage_bytes(states)


@dataclass(frozen=True)
class Measured:
    params: int
    grads: int
    optimizer: int
    activations: int        # peak saved-for-backward bytes during the step
    step_time: float        # seconds, best of the timed steps

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def _zero_grads(optimizer):
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
    else:
        optimizer.zero_grad()   # engine/optim: its buckets stay allocated; step() zeroes too


def _metered_step(params, optimizer, step, optimizer_step=None) -> tuple[int, int, int, int]:
    """One step under the saved-tensor meter: (params, grads, optimizer, activations)."""
    meter = SavedTensorMeter(params)
    with meter.hooks():
        step()
    p_bytes, g_bytes, _ = model_state_bytes(params, optimizer)   # gradients exist now
    (optimizer_step or optimizer.step)()
    _, _, o_bytes = model_state_bytes(params, optimizer)         # and the optimizer state
    _zero_grads(optimizer)
    return p_bytes, g_bytes, o_bytes, meter.peak


def measure_step(params, optimizer, step, timed_steps: int = 2) -> Measured:
    """Run `step()` (forward + backward of one optimizer step's microbatches) then
    `optimizer.step()`: once under the meter (memory; it also warms up), then
    `timed_steps` more times for the best wall time."""
    params = list(params)
    sizes = _metered_step(params, optimizer, step)
    best = float("inf")
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        step()
        optimizer.step()
        best = min(best, time.perf_counter() - t0)
        _zero_grads(optimizer)
    return Measured(*sizes, best)


def trainer_step(trainer):
    """(params, optimizer, step, optimizer_step) for measuring an engine.train.trainer.Trainer:
    `step()` runs forward and backward of this rank's microbatches of the trainer's
    current step through its schedule, `optimizer_step()` the DistributedOptimizer step at
    the configured lr. The step counter, data position and schedule do not move, so every
    call repeats the same work."""
    params = [p for _, p in trainer.named_trained_parameters()]
    mbs = trainer.microbatches(trainer.train_data, trainer.step)

    def step():
        trainer.forward_backward(mbs)

    def optimizer_step():
        trainer.optimizer_step(trainer.cfg.train.lr)

    return params, trainer.optimizer, step, optimizer_step


def trainer_memory(trainer) -> Measured:
    """This rank's memory in one step of a (possibly multi-rank) Trainer, under the meter:
    parameters, gradient buckets and optimizer shards as DistributedOptimizer.state_bytes
    reports them, and the peak of saved activations over the step's schedule. Collective
    when the trainer is (every rank of its layout calls it). step_time is not measured
    (nan): see measure_trainer."""
    params, opt, step, optimizer_step = trainer_step(trainer)
    return Measured(*_metered_step(params, opt, step, optimizer_step), float("nan"))


def schedule_meter_peak(trainer) -> int:
    """Peak bytes of one step as engine.pipeline.stats.SavedActivationMeter counts them: the
    same saved tensors as SavedTensorMeter, plus each stage output while the schedule
    holds it (until it is sent and its .data freed). Equal to trainer_memory's
    activations without a pipeline; at most one microbatch's [s, b, h] output more with
    one. Collective like trainer_memory."""
    from engine.pipeline.stats import SavedActivationMeter
    params, _, _, optimizer_step = trainer_step(trainer)
    mbs = trainer.microbatches(trainer.train_data, trainer.step)
    meter = SavedActivationMeter(params)
    trainer.forward_backward(mbs, meter=meter)
    optimizer_step()
    return meter.peak


def measure_trainer(trainer, timed_steps: int = 5, group=None) -> Measured:
    """trainer_memory, then the step time as the median over `timed_steps` steps of the
    slowest rank's time: a barrier over `group` (the trainer's ranks; None: the default
    group) lines the ranks up before each step and the per-step times are max-reduced,
    so every rank returns the same figure."""
    import statistics

    import torch.distributed as dist
    mem = trainer_memory(trainer)
    _, _, step, optimizer_step = trainer_step(trainer)
    distributed = dist.is_available() and dist.is_initialized()
    times = []
    for _ in range(timed_steps):
        if distributed:
            dist.barrier(group)
        t0 = time.perf_counter()
        step()
        optimizer_step()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if distributed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(float(elapsed))
    return replace(mem, step_time=statistics.median(times))


# ---- single-process layouts ------------------------------------------------------------

def synthetic_batches(cfg, seq_len: int, micro_batch_size: int, num_microbatches: int,
                      seed: int = 0) -> list[dict]:
    """Full-length causal-LM microbatches of random tokens (collate's dict layout)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_microbatches):
        rows = torch.randint(0, cfg.padded_vocab_size, (micro_batch_size, seq_len + 1),
                             generator=g).tolist()
        out.append(collate([causal_example(r) for r in rows], seq_len, pad_id=0))
    return out


def prepare_layout(req: PlanRequest, layout: Layout, seed: int = 0):
    """(params, optimizer, step) for a single-process layout: the model on CPU in fp32
    (torch kernels), the layout's microbatches with gradient accumulation, AdamW."""
    if (layout.tp, layout.pp, layout.dp) != (1, 1, 1):
        raise ValueError(f"single-process layouts only; got {layout.short()} (use "
                         "measure_step on every rank)")
    if req.precision != "fp32" or req.kernels != "torch":
        raise ValueError("single-process measurement runs the CPU path: request "
                         f"precision='fp32' and kernels='torch' (got {req.precision!r}, "
                         f"{req.kernels!r})")
    cfg = replace(req.config, kernels="torch")
    model = GLM.build(cfg, seed=seed)
    model.train()
    if layout.recompute:
        recompute_layers(model)
    batches = synthetic_batches(cfg, req.seq_len, layout.micro_batch_size,
                                layout.num_microbatches, seed)
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)

    def step():
        for b in batches:
            losses = model(b["input_ids"], position_ids=b["position_ids"],
                           block_position_ids=b["block_position_ids"],
                           prefix_lens=b["prefix_lens"], labels=b["labels"])
            (losses.sum() / n_tokens).backward()

    return list(model.parameters()), opt, step


def measure_layout(req: PlanRequest, layout: Layout, timed_steps: int = 2,
                   seed: int = 0) -> Measured:
    """Measure one single-process layout (see prepare_layout)."""
    return measure_step(*prepare_layout(req, layout, seed), timed_steps=timed_steps)


def measure_layouts(cases: list[tuple[PlanRequest, Layout]], rounds: int = 3,
                    seed: int = 0) -> list[Measured]:
    """Measure several single-process layouts for a ranking: memory once each, step time
    as the best over `rounds` interleaved rounds (one step of every layout per round),
    so that load on a shared machine drifting during the run hits all layouts alike."""
    prepared = [prepare_layout(req, lay, seed) for req, lay in cases]
    results = [measure_step(*run, timed_steps=1) for run in prepared]
    best = [r.step_time for r in results]
    for _ in range(rounds - 1):
        for i, (_, opt, step) in enumerate(prepared):
            t0 = time.perf_counter()
            step()
            opt.step()
            best[i] = min(best[i], time.perf_counter() - t0)
            opt.zero_grad(set_to_none=False)
    return [replace(r, step_time=t) for r, t in zip(results, best)]
