"""Collapse alarms: is the Solver agreeing with itself instead of learning?

Label-free, from the training signals every step already logs, averaged over the last
--collapse_patience steps: the share of images that got one distinct answer (all N the same), the
share with zero reward spread (all N rewards equal), the Solver's token entropy and its completion
length. The alarm sounds when a share reaches its floor, or the entropy or length falls below its.

From validation: the alarm sounds when the validation metric lies --collapse_val_margin or more
below its best so far for --collapse_val_patience validations in a row.

The counters live in the trainer state (TrainState.val), so a resume continues them. replay()
runs both alarms over a finished run's logs (tests/test_learning.py checks the demo and the
sign-flip control with it). Thresholds and how they were set: docs/validation.md.
"""
from __future__ import annotations

import numpy as np

from runtime import step_signals

SIGNALS = ("one_answer", "zero_std", "entropy", "length")


def step_values(records: list[dict]) -> dict:
    """One step's signals over all its images (every rank's records)."""
    s = step_signals(records)
    one = [float(r["dominant_count"] == len(r["reward_final"])) for r in records]
    return {"one_answer": float(np.mean(one)), "zero_std": s["frac_reward_zero_std"],
            "entropy": s["token_entropy"], "length": s["completion_length_mean"]}


def tripped(cfg, means: dict) -> dict[str, bool]:
    return {"one_answer": means["one_answer"] >= cfg.collapse_one_answer_frac,
            "zero_std": means["zero_std"] >= cfg.collapse_zero_std_frac,
            "entropy": means["entropy"] < cfg.collapse_min_entropy,
            "length": means["length"] < cfg.collapse_min_length}


def label_free(cfg, state: dict, step: int, records: list[dict]) -> str | None:
    """Add the step's signals to the window of the last --collapse_patience steps (in `state`);
    the alarm's message on the step a full window's mean first passes a floor, else None (once
    per episode: it sounds again only after the mean has come back)."""
    if not cfg.collapse_patience:
        return None
    values = step_values(records)
    window = state.setdefault("collapse_window", {name: [] for name in SIGNALS})
    was = state.setdefault("collapse_on", dict.fromkeys(SIGNALS, False))
    for name in SIGNALS:
        window[name] = (window.get(name, []) + [values[name]])[-cfg.collapse_patience:]
    if len(window["one_answer"]) < cfg.collapse_patience:
        return None
    means = {name: float(np.mean(window[name])) for name in SIGNALS}
    fired = [f"{name} {means[name]:.3g}" for name, bad in tripped(cfg, means).items()
             if bad and not was.get(name)]
    state["collapse_on"] = tripped(cfg, means)
    if not fired:
        return None
    return (f"collapse alarm at step {step}: mean over the last {cfg.collapse_patience} steps "
            f"past its floor: {', '.join(fired)} (the Solver may be agreeing with itself rather "
            f"than learning; see docs/validation.md)")


def val_metric(cfg, rec: dict) -> str | None:
    """The validation alarm's metric: the flag's, --keep_best's, else val_acc_mean if labeled."""
    name = cfg.collapse_val_metric or cfg.keep_best or "val_acc_mean"
    return name if rec.get(name) is not None else None


def from_validation(cfg, state: dict, rec: dict) -> str | None:
    """Track the metric's best (in `state`); the alarm's message when it has lain a margin below
    that best for --collapse_val_patience validations in a row, else None."""
    name = val_metric(cfg, rec)
    if not cfg.collapse_val_patience or name is None:
        return None
    value = float(rec[name])
    best = state.get("alarm_best")
    if best is None or value > best:
        state["alarm_best"], state["alarm_best_step"] = value, rec["step"]
        best = value
    below = value <= best - cfg.collapse_val_margin
    state["alarm_below"] = state.get("alarm_below", 0) + 1 if below else 0
    if state["alarm_below"] != cfg.collapse_val_patience:
        return None
    return (f"collapse alarm at step {rec['step']}: {name} {value:.3f} has lain "
            f"{cfg.collapse_val_margin:g} or more below its best ({best:.3f} at step "
            f"{state['alarm_best_step']}) for {cfg.collapse_val_patience} validations in a row")


def replay(cfg, records: list[dict], val_records: list[dict]) -> list[tuple[int, str]]:
    """Both alarms over a run's logs: (step, message) for each time one sounds."""
    state, out = {}, []
    by_step: dict[int, list] = {}
    for rec in records:
        by_step.setdefault(rec["step"], []).append(rec)
    for step in sorted(by_step):
        message = label_free(cfg, state, step, by_step[step])
        if message:
            out.append((step, message))
    for rec in sorted(val_records, key=lambda r: r["step"]):
        message = from_validation(cfg, state, rec)
        if message:
            out.append((rec["step"], message))
    return sorted(out)
