"""The method learns: self-training on unlabeled images raises held-out accuracy (3 seeds), and the
same criteria fail when the advantage's sign is flipped (the control).

    python -m pytest tests/test_learning.py                      # at 1 torch thread
    OMP_NUM_THREADS=2 python -m pytest tests/test_learning.py    # at 2 (see threads_from_env)

On a busy machine add OMP_WAIT_POLICY=PASSIVE to a 2-thread run: spinning OpenMP threads made its
steps 20-70 times slower on a loaded 2-core CPU. The wait policy changes no number.

One warm-started tiny model (tools/demo.py) is shared by the seeds, and evaluated once before training
(the same model and evaluation seed for every training seed). Each seed then runs the real trainer
(train.main with the demo's flags, demo.DemoRun) and the real `run.py eval`. Accuracy is the share
of correct answers over all N samples per held-out image: an estimate of single-sample accuracy
with N times the samples of eval's first-sample `acc`. Agreement is eval's answer agreement
(dominant count / N, mean over the held-out images): the quantity majority self-consistency
raises, measured on images the trainer never saw.

The same runs' logs also check the collapse alarms (collapse.py) at their defaults: none on the
seeds, one on the sign-flip control (its held-out validations fall; docs/validation.md has the
series these thresholds were set from).
"""
import dataclasses
import math
import os
import statistics

import pytest
import torch

import collapse
import rewards
import train
from checkpoint import complete_checkpoints
from config import parse_config
from tools import demo, plot

SEEDS = (1, 2, 3)
FLIP_SEEDS = (1,)
STEPS = demo.DemoRun.steps

# How the margins were set. Calibration of the demo recipe (demo.DemoRun: 4 images per step, 96
# steps, lr 1e-3, beta fixed 0.5) on a 2-core CPU shared with other jobs, seeds 1-8, each at 1
# torch thread and seeds 1-5 also at 2. The 2-thread runs were bit for bit the 1-thread runs
# (same logs, same parameter checksums): this model's kernels are too small to be split, so on
# that machine the thread count moved nothing. Another machine does move the numbers, but only as
# a different seed would: once one sampled token differs the run takes another random path from
# the same distribution (issue 22's machine gave +0.059, +0.081, +0.081 on seeds 1-3 with the
# same recipe; the list below has +0.088, +0.097, +0.072). So the margins come from the
# seed-to-seed spread, which holds the machine-to-machine one:
CALIBRATED_GAINS = (0.088, 0.097, 0.072, 0.053, 0.078, 0.081, 0.050, 0.072)  # accuracy, all samples
CALIBRATED_AGREEMENT_GAINS = (0.063, 0.069, 0.047, 0.028, 0.063, 0.069, 0.053, 0.091)
# (mean +0.074, sd 0.016; agreement mean +0.060, sd 0.018.) A mean over len(SEEDS) seeds must
# clear the calibrated mean less 3 standard errors of such a mean, rounded down to 0.01: 0.04 for
# accuracy, 0.02 for agreement. A run from the same distribution misses it less than once in 700.
# A Solver that did not learn gains 0 plus the evaluation's sampling noise (a proportion over 320
# answers: sd ~0.028 per seed, ~0.016 for a mean of 3), so 0.04 also lies 2.5 of those above no
# learning. Every seed must gain: the smallest calibrated gain, +0.050, lies 3 sd above 0 (the
# mean 4.6 sd).
# The sign-flipped runs (seeds 1, 2) gained -0.047 and -0.063 in accuracy and -0.012 and -0.025
# in agreement. Not a criterion: the training log's majority share, last quarter against first
# (the old test's). Its rise (+0.01 on average) is smaller than its own noise (each quarter's
# mean is over 96 different images); seed 7 gained +0.050 in accuracy while it fell.
# The calibration ran before the sampling rework (71b63a9), which draws other random numbers from
# the same seeds. On the code after it this test gave +0.084, +0.056, +0.109 (agreement +0.069,
# +0.072, +0.056), the flipped seed 1 -0.044 (agreement -0.034), at 1 and at 2 threads alike.


def _margin(values: tuple[float, ...]) -> float:
    sem = statistics.stdev(values) / len(SEEDS) ** 0.5
    return math.floor((statistics.mean(values) - 3 * sem) * 100) / 100


MIN_MEAN_GAIN = _margin(CALIBRATED_GAINS)                       # 0.04
MIN_MEAN_AGREEMENT_GAIN = _margin(CALIBRATED_AGREEMENT_GAINS)   # 0.02


def criteria(gains: list[float], agreement_gains: list[float]) -> list[str]:
    """What self-training must do over the seeds; returns the criteria it missed (none: it
    learned). The learning test requires none missed; the sign-flip control requires some."""
    missed = []
    if not all(g > 0 for g in gains):
        missed.append(f"held-out accuracy did not rise on every seed: {fmt(gains)}")
    if statistics.mean(gains) < MIN_MEAN_GAIN:
        missed.append(f"mean accuracy gain {statistics.mean(gains):+.3f} < {MIN_MEAN_GAIN}")
    if statistics.mean(agreement_gains) < MIN_MEAN_AGREEMENT_GAIN:
        missed.append(f"mean agreement gain {statistics.mean(agreement_gains):+.3f} < "
                      f"{MIN_MEAN_AGREEMENT_GAIN}")
    return missed


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:+.3f}" for v in values) + "]"


@pytest.fixture(scope="module", autouse=True)
def threads_from_env():
    """This module runs at the torch thread count OMP_NUM_THREADS names (1 if unset), not at the
    suite's one thread (conftest.one_torch_thread): a second thread count stands in for another
    machine's summation order."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def warm_started(tmp_path_factory) -> dict:
    """The demo's data and warm-started model, and its held-out evaluation before training."""
    root = str(tmp_path_factory.mktemp("learning"))
    paths = demo.build_demo(root)
    before = demo.evaluate(paths, None, os.path.join(root, "before.jsonl"), demo.DemoRun())
    return {"root": root, "paths": paths, "before": before}


def self_train(warm: dict, seed: int, name: str) -> dict:
    """One seed of the demo's self-training and the held-out evaluation of its Solver."""
    root, paths = warm["root"], warm["paths"]
    run = dataclasses.replace(demo.DemoRun(), seed=seed)
    assert train.main(demo.train_args(paths, root, name, run)) == 0
    run_dir = os.path.join(root, name)
    step, path = complete_checkpoints(run_dir)[-1]
    assert step == STEPS
    after = demo.evaluate(paths, os.path.join(path, "solver"),
                          os.path.join(root, f"{name}-after.jsonl"), run)
    records, _ = plot.read_log(run_dir)
    share = plot.per_step(records)["majority_share"][1]
    quarter = len(share) // 4
    val = plot.read_val_log(run_dir)
    assert [r["step"] for r in val] == list(range(0, STEPS + 1, run.val_every))
    # the collapse alarms at their defaults, on this run's own logs (collapse.replay: as in training)
    cfg = parse_config(demo.train_args(paths, root, name, run))
    return {"gain": after["acc_all"] - warm["before"]["acc_all"],
            "agreement_gain": after["agreement"] - warm["before"]["agreement"],
            "share": (statistics.mean(share[:quarter]), statistics.mean(share[-quarter:])),
            "val_acc": [round(r["val_acc_mean"], 3) for r in val],
            "alarms": collapse.replay(cfg, records, val)}


def judge(warm: dict, runs: list[dict], threads: int) -> tuple[list[str], str]:
    gains = [r["gain"] for r in runs]
    agreement_gains = [r["agreement_gain"] for r in runs]
    report = (f"{threads} torch thread(s): accuracy before {warm['before']['acc_all']:.3f}, gains "
              f"{fmt(gains)}; agreement before {warm['before']['agreement']:.3f}, gains "
              f"{fmt(agreement_gains)}; training majority share first/last quarter "
              f"{[round(r['share'][0], 3) for r in runs]} / "
              f"{[round(r['share'][1], 3) for r in runs]}; validation accuracy (all samples) "
              f"{[r['val_acc'] for r in runs]}; collapse alarms {[r['alarms'] for r in runs]}")
    print(report)
    return criteria(gains, agreement_gains), report


@pytest.mark.slow
def test_self_training_raises_held_out_accuracy(warm_started, threads_from_env):
    runs = [self_train(warm_started, seed, f"seed{seed}") for seed in SEEDS]
    missed, report = judge(warm_started, runs, threads_from_env)
    assert not missed, f"{report}\nmissed: {missed}"
    assert not any(r["alarms"] for r in runs), f"a collapse alarm on a run that learned: {report}"


@pytest.mark.slow
def test_sign_flipped_advantage_fails_the_criteria(warm_started, threads_from_env, monkeypatch):
    """The control: with every advantage negated in-process (update.py takes the Solver's and the
    Proposer's from rewards.advantages_for), the Solver is pushed away from its own majority, and
    the learning test's criteria must fail."""
    true_advantages = rewards.advantages_for
    monkeypatch.setattr(rewards, "advantages_for", lambda *a, **k: -true_advantages(*a, **k))
    runs = [self_train(warm_started, seed, f"flip{seed}") for seed in FLIP_SEEDS]
    missed, report = judge(warm_started, runs, threads_from_env)
    assert missed, f"the criteria passed with the advantage's sign flipped: {report}"
    assert any("mean accuracy gain" in m for m in missed), f"{report}\nmissed: {missed}"
    assert all(r["alarms"] for r in runs), f"no collapse alarm with the sign flipped: {report}"
