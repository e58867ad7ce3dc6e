"""The learning-rate schedule of each role's optimizer: --lr_scheduler constant|linear|cosine with
--warmup_steps or --warmup_ratio (transformers' schedulers, as the HF Trainer and TRL use). The
schedule runs over training steps for both roles: step s (1-based) trains at
lr * f(s - 1), whether or not a role updates at that step (the Proposer updates every
--proposer_update_freq steps and takes the rate of the steps it updates at). Each scheduler's
state is saved with the optimizers and restored on resume; the flags given now win, as for --lr.

    python -m pytest tests/test_objective.py -q -k schedule
"""
from __future__ import annotations

import math
import warnings

from transformers import get_scheduler

LR_SCHEDULERS = ("constant", "linear", "cosine")


def warmup_steps(cfg) -> int:
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * cfg.total_steps)


def make_schedulers(cfg, optimizers: dict) -> dict:
    """One LambdaLR per role's optimizer. Its lr at step 0 is set on the optimizer at once."""
    warm = warmup_steps(cfg)
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return {role: get_scheduler(name, opt, num_warmup_steps=warm,
                                num_training_steps=cfg.total_steps)
            for role, opt in optimizers.items()}


def step_all(schedulers: dict) -> None:
    """After each training step. torch warns when a scheduler steps before its optimizer ever
    has (the Proposer before its first update): expected here, as the schedule is by step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        for s in schedulers.values():
            s.step()


def state(schedulers: dict) -> dict:
    """Plain data for the checkpoint (the lambdas themselves are the flags')."""
    return {role: {k: v for k, v in s.state_dict().items() if k != "lr_lambdas"}
            for role, s in schedulers.items()}


def restore(schedulers: dict, saved: dict | None, step: int, lr: float) -> None:
    """Continue each schedule at `step` from the saved state (None: a checkpoint from before
    schedulers were saved, whose schedule was constant), with base rate `lr` (the flag now)."""
    for role, s in schedulers.items():
        if saved is None:
            s.last_epoch = step
        else:
            s.load_state_dict({**saved[role], "lr_lambdas": [None] * len(s.lr_lambdas)})
        if s.last_epoch != step:
            raise ValueError(f"the {role} learning-rate schedule was saved at step "
                             f"{s.last_epoch}, its checkpoint is step {step}")
        s.base_lrs = [lr] * len(s.base_lrs)
        for group, f in zip(s.optimizer.param_groups, s.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * f(step)
        s._last_lr = [g["lr"] for g in s.optimizer.param_groups]


def current_lr(optimizer) -> float:
    return optimizer.param_groups[0]["lr"]
