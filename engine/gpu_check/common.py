"""Memory figures shared by the GPU check's sections (CUDA only; None elsewhere)."""
from __future__ import annotations

import torch


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)


def step_peak_mib(step, device):
    """Memory one call of step() needs above what was allocated before it (CUDA)."""
    if device.type != "cuda":
        return None
    reset_peak(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, 1)
