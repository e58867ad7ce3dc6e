"""The paper's ablation rows as flags on the seed command (docs/reproduce.md, "Ablations"): each
parses and gives the rewards its row names, against numbers worked out by hand.

Five answers A, A, A, B, C: the majority group is samples 0-2 (|D|/N = 0.6). Their two steps
embed to e1 = (1, 0) or e2 = (0, 1): sample 0 (e1, e1), sample 1 (e1, e2), sample 2 (e2, e1).
At both positions the centre is (2, 1)/sqrt(5), so cos = 2/sqrt(5) for e1 and 1/sqrt(5) for e2,
and u = (1 + cos)/2 is HI or LO below. Outcome: 0.6^0.7 for A, 0.2^0.7 for B and C (no length
penalty: a few words).

    python -m pytest tests/test_paper_ablations.py
"""
import math

import pytest
import torch

import rewards
from config import parse_config
from test_config import SEED_COMMAND

OUTPUTS = ["<think>Step 1: a\nStep 2: b</think><answer>A</answer>",
           "<think>Step 1: a\nStep 2: c</think><answer>A</answer>",
           "<think>Step 1: d\nStep 2: b</think><answer>A</answer>",
           "<think>Step 1: a\nStep 2: b</think><answer>B</answer>",
           "<think>Step 1: a\nStep 2: b</think><answer>C</answer>"]
VECTORS = {"a": (1.0, 0.0), "b": (1.0, 0.0), "c": (0.0, 1.0), "d": (0.0, 1.0)}
HI, LO = (1 + 2 / math.sqrt(5)) / 2, (1 + 1 / math.sqrt(5)) / 2
OUTCOME = [0.6 ** 0.7] * 3 + [0.2 ** 0.7] * 2


def embed(steps):
    return torch.tensor([VECTORS[s.split(":")[-1].strip()] for s in steps], dtype=torch.float64)


def step_rewards(decay=0.15, density=0.6 ** 0.7):
    w = math.exp(-decay)  # position 2's weight; position 1's is 1
    per_sample = [(HI + w * HI) / (1 + w), (HI + w * LO) / (1 + w), (LO + w * HI) / (1 + w)]
    return [r * density for r in per_sample] + [0.0, 0.0]


# row -> (flags on the seed command, the mixing weight at steps 0, 250, 1250, 2500 of 2500)
ABLATIONS = {
    "full recipe": ([], [0.0, 0.0, 0.2, 0.7]),
    "soft majority only": (["--step_reward_weight_start", "0", "--step_reward_weight_end", "0"],
                           [0.0, 0.0, 0.0, 0.0]),
    "step only": (["--step_reward_weight_start", "1", "--step_reward_weight_end", "1"],
                  [1.0, 1.0, 1.0, 1.0]),
    "no warm-up": (["--step_reward_warmup", "0"], [0.0, 0.07, 0.35, 0.7]),
    "no position decay": (["--step_position_decay", "0"], [0.0, 0.0, 0.2, 0.7]),
    "no density weighting": (["--step_group_density_gamma", "0"], [0.0, 0.0, 0.2, 0.7]),
}
STEP_REWARDS = {"no position decay": step_rewards(decay=0.0),
                "no density weighting": step_rewards(density=1.0)}


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_ablation_row(row):
    flags, weights = ABLATIONS[row]
    cfg = parse_config(SEED_COMMAND + flags)
    expected_steps = STEP_REWARDS.get(row, step_rewards())
    for step, w in zip((0, 250, 1250, 2500), weights):
        got = rewards.compute_rewards(cfg, OUTPUTS, step, embed)
        assert got["reward_outcome"] == pytest.approx(OUTCOME, abs=1e-12)
        assert got["reward_steps"] == pytest.approx(expected_steps, abs=1e-12), row
        assert got["step_reward_weight"] == pytest.approx(w, abs=1e-12), (row, step)
        assert got["reward_final"] == pytest.approx(
            [(1 - w) * o + w * s for o, s in zip(OUTCOME, expected_steps)], abs=1e-12)


def test_the_rows_differ_where_they_should():
    """Each ablation changes the final rewards of the full recipe at step 1250 (mid-ramp)."""
    finals = {row: rewards.compute_rewards(parse_config(SEED_COMMAND + flags), OUTPUTS, 1250,
                                           embed)["reward_final"]
              for row, (flags, _) in ABLATIONS.items()}
    full = finals.pop("full recipe")
    for row, final in finals.items():
        assert max(abs(a - b) for a, b in zip(final, full)) > 1e-3, row
    assert finals["soft majority only"] == pytest.approx(OUTCOME)
    assert finals["step only"] == pytest.approx(step_rewards())
