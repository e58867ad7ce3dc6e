"""`run.py plot`: curves from iter_log.jsonl, data-parallel and multi-image logs, bad logs.

    python -m pytest tests/test_plot.py
"""
import json
import os
import subprocess
import sys

import pytest

from tools import plot
from checkpoint import truncate_log
from conftest import ROOT


def record(step, rank=0, share=3, reward=0.5, **extra):
    return {"step": step, "rank": rank, "answers_norm": ["a"] * 5, "dominant_count": share,
            "reward_final": [reward] * 5, "answer_entropy": 0.5, "reward_steps": [0.2] * 5,
            "step_reward_weight": 0.1, "solver_kl": 0.01, "kl_coef_solver_after": 0.001,
            "proposer_reward": 0.7, "proposer_kl": None, **extra}


def write_log(path, records, tail=""):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "iter_log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)


def run_plot(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "plot", *args],
                          capture_output=True, text=True, timeout=120)


def test_ranks_and_images_are_averaged_per_step():
    records = [record(1, rank=0, share=2, reward=0.2), record(1, rank=1, share=4, reward=0.6),
               record(2, rank=0, share=5, image_index=0), record(2, rank=0, share=3, image_index=1),
               record(2, rank=1, share=4, image_index=0)]
    series = plot.per_step(records)
    assert series["majority_share"] == ([1, 2], [pytest.approx(0.6), pytest.approx(0.8)])
    assert series["reward_final"][1][0] == pytest.approx(0.4)
    assert "proposer_kl" not in series  # None values are skipped, not plotted as 0


def test_smoothing_is_a_trailing_mean():
    assert plot.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_cli_writes_png_and_skips_a_cut_line(tmp_path):
    run_dir = tmp_path / "run"
    write_log(str(run_dir), [record(s, rank=r) for s in range(1, 21) for r in (0, 1)],
              tail='{"step": 21, "ra')  # a line cut short by a kill
    out = tmp_path / "c.png"
    proc = run_plot(str(run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipped 1" in proc.stderr
    assert run_plot(str(run_dir)).returncode == 0
    assert (run_dir / "curves.png").is_file()
    # as a resume would: drop the cut line, so the session's strict-JSON check reads a whole log
    truncate_log(str(run_dir / "iter_log.jsonl"), 21)


@pytest.mark.parametrize("case", ["missing", "empty", "garbage"])
def test_missing_or_empty_log_is_one_line_exit_2(tmp_path, case):
    run_dir = tmp_path / "run"
    if case != "missing":
        write_log(str(run_dir), [], tail="" if case == "empty" else "not json\n")
    proc = run_plot(str(run_dir))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    if case == "garbage":  # written broken on purpose: not a log the session check should read
        (run_dir / "iter_log.jsonl").unlink()


def test_validation_panel_and_outcome_reward(tmp_path):
    """A run that validated: val_log.jsonl is read beside the log and drawn; the outcome reward
    is a series of its own."""
    run_dir = tmp_path / "run"
    write_log(str(run_dir), [record(s, reward_outcome=[0.6] * 5) for s in range(1, 11)])
    with open(run_dir / "val_log.jsonl", "w") as f:
        for s in (0, 5, 10):
            f.write(json.dumps({"step": s, "val_acc_mean": 0.4 + s / 100, "val_maj_at_n": 0.5,
                                "val_agreement": 0.6}) + "\n")
        f.write('{"step": 15, "va')  # cut short by a kill: skipped
    assert [r["step"] for r in plot.read_val_log(str(run_dir))] == [0, 5, 10]
    assert plot.per_step(plot.read_log(str(run_dir))[0])["reward_outcome"][1][0] == 0.6
    proc = run_plot(str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert plot.read_val_log(str(tmp_path / "none")) == []
