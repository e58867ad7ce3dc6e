"""Training curves from a run's iter_log.jsonl (and val_log.jsonl, if it validated), one PNG.

    python run.py plot runs/demo                   # writes runs/demo/curves.png
    python run.py plot runs/demo --out curves.png

The held-out figures of each validation (--val_data: accuracy over all samples, maj@N, answer
agreement; unsmoothed, one marker per validation). Per step, smoothed (a running mean over ~1/10
of the run, raw values faint behind): the outcome and step-agreement rewards and the final reward
that mixes them, with the step reward's mixing weight (its ramp moves the final reward on its own),
the majority share (dominant_count / N), the answer entropy, the Solver's KL with its coefficient
beta, and the Proposer's reward. A
data-parallel log has one record per rank per step, and a log may hold several records (images)
per step: every step shows the mean over its records.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict

import cli

LOG_NAME = "iter_log.jsonl"
VAL_LOG_NAME = "val_log.jsonl"  # validate.VAL_LOG


class PlotError(Exception):
    """Printed as one line, exit 2."""


def _mean(value) -> float | None:
    """A logged number, or the mean of a logged list; None when absent or not a number."""
    if isinstance(value, (list, tuple)):
        nums = [float(v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return sum(nums) / len(nums) if nums else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _majority_share(rec: dict) -> float | None:
    n = len(rec.get("answers_norm") or rec.get("answers") or [])
    count = _mean(rec.get("dominant_count"))
    return count / n if n and count is not None else None


# name -> how to read it from one record
SERIES = {
    "reward_final": lambda r: _mean(r.get("reward_final")),
    "reward_outcome": lambda r: _mean(r.get("reward_outcome")),
    "majority_share": _majority_share,
    "answer_entropy": lambda r: _mean(r.get("answer_entropy")),
    "reward_steps": lambda r: _mean(r.get("reward_steps")),
    "step_reward_weight": lambda r: _mean(r.get("step_reward_weight")),
    "solver_kl": lambda r: _mean(r.get("solver_kl")),
    "kl_coef_solver": lambda r: _mean(r.get("kl_coef_solver_after")),
    "proposer_reward": lambda r: _mean(r.get("proposer_reward")),
}


def read_log(path: str) -> tuple[list[dict], int]:
    """Records of a run folder's log (or of a log file), and how many lines were unreadable
    (a line cut short by a kill is skipped, not fatal)."""
    log_path = os.path.join(path, LOG_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(log_path):
        raise PlotError(f"no training log at {log_path}")
    records, bad = step_records(log_path)
    if not records:
        raise PlotError(f"{log_path} holds no training records")
    return records, bad


def step_records(log_path: str) -> tuple[list[dict], int]:
    """The JSON objects with an integer "step" of a JSONL file, and how many non-blank lines
    were not one (a line cut short by a kill is skipped, not fatal)."""
    records, bad = [], 0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def per_step(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values): the mean over each step's records (ranks, images)."""
    grouped = defaultdict(lambda: defaultdict(list))
    for rec in records:
        for name, read in SERIES.items():
            value = read(rec)
            if value is not None and math.isfinite(value):
                grouped[name][rec["step"]].append(value)
    out = {}
    for name, by_step in grouped.items():
        steps = sorted(by_step)
        out[name] = (steps, [sum(by_step[s]) / len(by_step[s]) for s in steps])
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing running mean: point i averages the up to `window` values ending at i."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


PANELS = [  # (title, [(series, label)], log scale); the first panel is validation's
    ("rewards: final = (1 - w) outcome + w step", [
        ("reward_outcome", "outcome"), ("reward_steps", "step agreement"),
        ("reward_final", "final"), ("step_reward_weight", "w (ramps in)")], False),
    ("majority share (dominant_count / N)", [("majority_share", "share")], False),
    ("answer entropy (nats)", [("answer_entropy", "entropy")], False),
    ("solver KL and beta", [("solver_kl", "KL"), ("kl_coef_solver", "beta")], True),
    ("proposer reward", [("proposer_reward", "reward")], False),
]
VAL_SERIES = [("val_acc_mean", "accuracy, all samples"), ("val_maj_at_n", "maj@N"),
              ("val_agreement", "answer agreement")]


def read_val_log(path: str) -> list[dict]:
    """The validation records next to a run's log (none when it did not validate); unreadable
    lines are skipped."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    val_path = os.path.join(folder, VAL_LOG_NAME)
    if not os.path.isfile(val_path):
        return []
    return sorted(step_records(val_path)[0], key=lambda r: r["step"])


def plot_validation(ax, val_records: list[dict]) -> None:
    ax.set_title("held-out, while training (validation)", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    drawn = False
    for i, (key, label) in enumerate(VAL_SERIES):
        points = [(r["step"], r[key]) for r in val_records if _mean(r.get(key)) is not None]
        if points:
            ax.plot(*zip(*points), color=f"C{i}", marker="o", markersize=3, label=label)
            drawn = True
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validation\n(train with --val_data)", ha="center", va="center",
                transform=ax.transAxes, color="gray")


def plot(records: list[dict], out: str, title: str, val_records: list[dict] = ()) -> str:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    series = per_step(records)
    n_steps = max(len(s) for s, _ in series.values()) if series else 1
    window = max(1, n_steps // 10)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    plot_validation(axes.flat[0], list(val_records))
    for ax, (panel, lines, log_scale) in zip(axes.flat[1:], PANELS):
        for i, (name, label) in enumerate(lines):
            if name not in series:
                continue
            steps, values = series[name]
            color = f"C{i}"
            if name == "step_reward_weight":  # a schedule, not a measurement: not smoothed
                ax.plot(steps, values, color=color, linestyle="--", label=label, linewidth=1.2)
                continue
            if log_scale:
                keep = [(s, v) for s, v in zip(steps, values) if v > 0]
                steps, values = [s for s, _ in keep], [v for _, v in keep]
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values, window), color=color, label=label, linewidth=1.8)
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title} (smoothed over {window} step{'s' * (window > 1)}; raw values faint)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    p = cli.ArgumentParser(prog="run.py plot", description=__doc__.split("\n")[0])
    p.add_argument("run", help="Run folder (runs/<run>) or its iter_log.jsonl.")
    p.add_argument("--out", default="", help="PNG to write (default: <run>/curves.png).")
    try:
        args = cli.parse_or_exit(p, argv)
    except SystemExit as e:  # --help, or a mistake (one line printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        records, bad = read_log(args.run)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bad:
        print(f"warning: skipped {bad} unreadable log line(s)", file=sys.stderr)
    run_dir = args.run if os.path.isdir(args.run) else os.path.dirname(args.run)
    out = args.out or os.path.join(run_dir, "curves.png")
    try:
        plot(records, out, os.path.basename(os.path.abspath(run_dir)), read_val_log(args.run))
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"curves: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
