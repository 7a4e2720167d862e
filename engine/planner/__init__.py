"""The automatic layout planner: which tp x pp x dp (x vpp, micro-batch size, recompute,
ZeRO stage) trains a model fastest within the device memory.

    layouts.py  PlanRequest, Layout, enumerate_layouts (the validity rules)
    memory.py   per-device memory: model states + activations in flight (derivation)
    timing.py   step time: compute, memory traffic, bubble, TP / P2P / DP communication
    devices.py  DeviceProfile: named (h100, a100) or measured (calibrate)
    search.py   plan, choose_layout, format_table
    measure.py  measured peak memory and step time of runnable layouts, for validation
"""
from engine.planner.devices import PROFILES, DeviceProfile, calibrate, device_profile
from engine.planner.layouts import Layout, PlanRequest, enumerate_layouts
from engine.planner.memory import (MemoryEstimate, StageMemory, in_flight, predict_memory,
                                   total_params)
from engine.planner.search import Candidate, best, choose_layout, format_table, plan
from engine.planner.timing import TimeEstimate, predict_time

__all__ = ["PROFILES", "Candidate", "DeviceProfile", "Layout", "MemoryEstimate",
           "PlanRequest", "StageMemory", "TimeEstimate", "best", "calibrate",
           "choose_layout", "device_profile", "enumerate_layouts", "format_table",
           "in_flight", "plan", "predict_memory", "predict_time", "total_params"]
