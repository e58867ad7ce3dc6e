"""The memory plan's figure for a bench row (memplan.py), printed beside its measured peak.

On a GPU the measured peak is torch.cuda.max_memory_allocated, so the plan is given without its
CUDA context; on the CPU the measured figure is the process's peak RSS (Python, libraries,
allocator caches), of which the plan's tensors are only a part. vLLM rows: the plan is the
trainer's (the engine's reservation is not in it).
"""
from __future__ import annotations

import copy

import memplan
import update


def plan_peak_mib(cfg, images_per_step: int, device: str) -> float:
    shapes = memplan.shapes_of(*memplan.read_model(cfg.solver_model))
    c = copy.copy(cfg)
    c.images_per_step = images_per_step
    plan = memplan.make_plan(c, shapes, update.micro_batch(c), bool(c.gradient_checkpointing),
                             device)
    return (plan.peak - plan.context) / 2**20
