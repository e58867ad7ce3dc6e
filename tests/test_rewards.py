"""Reward functions against numbers worked out by hand (the literal is the expectation; the
comment next to it shows the arithmetic). Run with:

    python -m pytest tests/test_rewards.py -q
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import (answer_entropy, majority, majority_group, mix_rewards,  # noqa: E402
                     outcome_rewards, proposer_reward, step_agreement_rewards, step_reward_weight,
                     update_ema_baseline, update_kl_coef)

approx = pytest.approx


def ans(a: str, think: str = "Step 1: look.") -> str:
    return f"<think>{think}</think><answer>{a}</answer>"


# -----------------------------------------------------------------------------
# outcome reward

def test_outcome_soft_majority_three_two():
    outs = [ans("A"), ans("A"), ans("B"), ans("A"), ans("B")]
    r, info = outcome_rewards(outs, gamma=0.7, len_penalty_weight=0.05, len_penalty_target_words=64)
    # p_A = 3/5 -> 0.6**0.7 = 0.699368; p_B = 2/5 -> 0.4**0.7 = 0.526553
    assert r == approx([0.699368, 0.699368, 0.526553, 0.699368, 0.526553], abs=1e-6)
    assert info["answers"] == ["A", "A", "B", "A", "B"]
    assert info["answers_norm"] == ["a", "a", "b", "a", "b"]
    assert (info["dominant_answer"], info["dominant_count"]) == ("a", 3)
    # H = -(0.6 ln 0.6 + 0.4 ln 0.4) = 0.306495 + 0.366516
    assert info["answer_entropy"] == approx(0.673012, abs=1e-6)
    assert info["pre_answer_words"] == [3, 3, 3, 3, 3]  # "<think>Step", "1:", "look.</think>"


def test_outcome_all_same_and_all_different():
    r, info = outcome_rewards([ans("42")] * 4, 0.7, 0.05, 64)
    assert r == [1.0, 1.0, 1.0, 1.0]
    assert info["answer_entropy"] == 0.0 and info["dominant_count"] == 4
    r, info = outcome_rewards([ans("1"), ans("2"), ans("3"), ans("4")], 0.7, 0.05, 64)
    assert r == approx([0.378929] * 4, abs=1e-6)            # 0.25**0.7
    assert info["answer_entropy"] == approx(1.386294, abs=1e-6)  # ln 4
    assert info["dominant_answer"] == "1"                   # 4-way tie: first seen


def test_outcome_gamma_zero_gives_one():
    r, _ = outcome_rewards([ans("x"), ans("y")], gamma=0.0, len_penalty_weight=0.0,
                           len_penalty_target_words=64)
    assert r == [1.0, 1.0]


def test_outcome_missing_answer_uses_last_line_and_normalizes():
    outs = ["Step 1: count the cats.\nThe answer is 7", "<answer>The answer is 7.</answer>"]
    r, info = outcome_rewards(outs, 0.7, 0.0, 64)
    assert info["answers"] == ["The answer is 7", "The answer is 7."]
    assert info["answers_norm"] == ["the answer is 7", "the answer is 7"]
    assert r == [1.0, 1.0]


def test_outcome_empty_think_and_empty_answers_count_as_answers():
    outs = ["<think></think><answer></answer>", "", "<answer>5</answer>"]
    r, info = outcome_rewards(outs, 1.0, 0.0, 64)
    assert info["answers_norm"] == ["", "", "5"]
    assert r == approx([2 / 3, 2 / 3, 1 / 3])
    assert (info["dominant_answer"], info["dominant_count"]) == ("", 2)


def test_outcome_unicode_answers():
    outs = [ans("Café"), ans("café."), ans("\uff14\uff12"), ans("42")]  # full-width "４２"
    r, info = outcome_rewards(outs, 1.0, 0.0, 64)
    assert info["answers_norm"] == ["café", "café", "42", "42"]
    assert r == [0.5, 0.5, 0.5, 0.5]
    assert info["dominant_answer"] == "café"  # tie, first seen


def test_length_penalty():
    words = lambda k: " ".join(["w"] * k)  # noqa: E731
    outs = [words(100) + " <answer>x</answer>", words(200) + "<answer>x</answer>",
            words(10) + "<answer>x</answer>"]
    r, info = outcome_rewards(outs, 0.7, 0.05, 64)
    assert info["pre_answer_words"] == [100, 200, 10]
    # pen = (100-64)/64 = 0.5625 -> 1 - 0.05*0.5625 = 0.971875; 200 words clips pen to 1
    assert r == approx([0.971875, 0.95, 1.0])


def test_outcome_rejects_empty_batch():
    with pytest.raises(ValueError):
        outcome_rewards([], 0.7, 0.05, 64)


def test_majority_and_entropy():
    assert majority(["b", "a", "a", "b"]) == ("b", 2)  # tie: first seen wins
    assert majority(["c", "a", "a", "b"]) == ("a", 2)
    assert majority(["", "", "x"]) == ("", 2)
    assert answer_entropy(["a", "b"]) == approx(0.693147, abs=1e-6)  # ln 2
    assert answer_entropy(["a", "a", "a"]) == 0.0
    # p = (3/4, 1/4): 0.75*0.287682 + 0.25*1.386294 = 0.215762 + 0.346574
    assert answer_entropy(["a", "a", "b", "a"]) == approx(0.562335, abs=1e-6)


# -----------------------------------------------------------------------------
# step agreement

def t(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 2)


def test_step_agreement_orthogonal_pair_with_density():
    answers = ["a", "a", "b"]
    embs = [t([1, 0]), t([0, 1]), t([1, 0])]
    r, info = step_agreement_rewards(majority_group(answers), embs, min_group_size=2,
                                     density_gamma=0.7, position_decay=0.15, sim_temperature=1.0)
    # centre = (1,1)/sqrt2, cos = 0.707107, u = 0.853553; density = (2/3)**0.7 = 0.752898
    assert r == approx([0.642639, 0.642639, 0.0], abs=1e-6)
    assert info == approx({"group_size": 2, "positions_used": 1, "mean_cos": 0.707107,
                           "density": 0.752898}, abs=1e-6)


def test_step_agreement_tanh_temperature():
    embs = [t([1, 0]), t([0, 1]), t([1, 0])]
    r, info = step_agreement_rewards(majority_group(["a", "a", "b"]), embs, 2, 0.7, 0.15,
                                     sim_temperature=0.5)
    # tanh(0.707107/0.5) = tanh(1.414214) = 0.888386 -> u = 0.944193; * 0.752898
    assert r == approx([0.710881, 0.710881, 0.0], abs=1e-6)
    assert info["mean_cos"] == approx(0.707107, abs=1e-6)  # raw cosine, before tanh


def test_step_agreement_position_decay_and_member_without_steps():
    answers = ["x", "x", "x", "x"]
    # Sample 0's third step is alone at position 2, so that position is not used.
    embs = [t([1, 0], [1, 0], [0, 1]), t([1, 0], [0, 1]), t([1, 0]), torch.zeros(0, 2)]
    r, info = step_agreement_rewards(majority_group(answers), embs, 2, 0.7, position_decay=0.15,
                                     sim_temperature=1.0)
    # position 0: all agree, u = 1. position 1 (samples 0, 1): u = 0.853553, w1 = e^-0.15 = 0.860708
    # r0 = r1 = (1 + 0.860708*0.853553) / 1.860708 = 0.932258; r2 only has position 0 -> 1.
    # Sample 3 has no steps -> 0. Density = (4/4)**0.7 = 1.
    assert r == approx([0.932258, 0.932258, 1.0, 0.0], abs=1e-6)
    # mean_cos over 5 pairs: (1+1+1+0.707107+0.707107)/5
    assert info == approx({"group_size": 4, "positions_used": 2, "mean_cos": 0.882843,
                           "density": 1.0}, abs=1e-6)


def test_step_agreement_no_decay_weights_positions_equally():
    embs = [t([1, 0], [1, 0]), t([1, 0], [0, 1])]
    r, _ = step_agreement_rewards(majority_group(["x", "x"]), embs, 2, 0.7, position_decay=0.0,
                                  sim_temperature=1.0)
    assert r == approx([0.926777, 0.926777], abs=1e-6)  # (1 + 0.853553) / 2


def test_step_agreement_group_too_small():
    embs = [t([1, 0]), t([0, 1]), t([1, 0])]
    r, info = step_agreement_rewards(majority_group(["a", "b", "c"]), embs, 2, 0.7, 0.15, 1.0)
    assert r == [0.0, 0.0, 0.0]
    assert info == {"group_size": 1, "positions_used": 0, "mean_cos": 0.0, "density": 0.0}


def test_step_agreement_opposite_steps_and_zero_vectors_are_finite():
    # Opposite steps: centre is the zero vector -> cos 0, u = 0.5 for both (no NaN).
    r, info = step_agreement_rewards(majority_group(["x", "x"]), [t([1, 0]), t([-1, 0])],
                                     2, 0.7, 0.15, 1.0)
    assert r == [0.5, 0.5] and info["mean_cos"] == 0.0
    # A zero embedding: centre = (1, 0); cos 0 -> 0.5, cos 1 -> 1.0.
    r, _ = step_agreement_rewards(majority_group(["x", "x"]), [t([0, 0]), t([3, 0])],
                                  2, 0.7, 0.15, 1.0)
    assert r == [0.5, 1.0]


def test_step_agreement_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        step_agreement_rewards(majority_group(["a", "a"]), [t([1, 0])], 2, 0.7, 0.15, 1.0)


# -----------------------------------------------------------------------------
# schedules, mixing, proposer, KL, baseline

def test_step_reward_weight_schedule():
    args = dict(total_steps=100, w_start=0.0, w_end=0.7, warmup=0.3)
    assert step_reward_weight(0, **args) == 0.0
    assert step_reward_weight(30, **args) == 0.0
    assert step_reward_weight(65, **args) == approx(0.35)  # halfway through the ramp
    assert step_reward_weight(100, **args) == approx(0.7)
    assert step_reward_weight(65, 100, 0.2, 0.7, 0.3) == approx(0.45)  # 0.2 + 0.5*0.5
    assert step_reward_weight(50, 100, 0.0, 1.0, 0.0) == approx(0.5)


def test_mix_rewards():
    mixed, info = mix_rewards([1.0, 0.5], [0.0, 1.0], 0.3)
    assert mixed == approx([0.7, 0.65])  # 0.7*1 + 0.3*0; 0.7*0.5 + 0.3*1
    assert info == {"step_reward_weight": 0.3}
    with pytest.raises(ValueError):
        mix_rewards([1.0], [1.0, 2.0], 0.3)


def test_proposer_reward_gaussian():
    r, _ = proposer_reward(0.9, mu=0.9, sigma=0.35)
    assert r == 1.0
    r, _ = proposer_reward(0.9 + 0.35, mu=0.9, sigma=0.35)
    assert r == approx(0.606531, abs=1e-6)  # exp(-0.5)
    r, _ = proposer_reward(0.9 - 0.7, mu=0.9, sigma=0.35)
    assert r == approx(0.135335, abs=1e-6)  # exp(-2)


def test_min_step_group_size_applies_per_position():
    # Group 0,1,2 of N=4. Position 0: all three have e=(1,0) -> cos 1, u 1. Position 1: only
    # samples 0 and 1 have a step, (1,0) and (0,1): centre (1,1)/sqrt2, cos 1/sqrt2.
    e, a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    embs = [torch.stack([e, a]), torch.stack([e, b]), e[None], torch.zeros(0, 2)]
    # density = (3/4)**0.7 = 0.817604
    # min 3: position 1 (2 members) is skipped -> r = 1 * density = 0.817604 for all three
    r, info = step_agreement_rewards([0, 1, 2], embs, 3, 0.7, 0.15, 1.0)
    assert r == [approx(0.817604, abs=1e-6)] * 3 + [0.0]
    assert info["positions_used"] == 1
    # min 2: position 1 counts for 0 and 1: u = (1 + 0.707107)/2 = 0.853553, w1 = e^-0.15
    # = 0.860708; (1 + 0.860708*0.853553)/(1 + 0.860708) = 0.932258; * density = 0.762218
    r, info = step_agreement_rewards([0, 1, 2], embs, 2, 0.7, 0.15, 1.0)
    assert r == [approx(0.762218, abs=1e-6), approx(0.762218, abs=1e-6),
                 approx(0.817604, abs=1e-6), 0.0]
    assert info["positions_used"] == 2
    # min 4 > group size 3: no step rewards at all
    assert step_agreement_rewards([0, 1, 2], embs, 4, 0.7, 0.15, 1.0)[0] == [0.0] * 4


def test_update_kl_coef():
    # exponent = 0.1*(0.04-0.02)/0.02 = 0.1 -> 0.001*e^0.1
    assert update_kl_coef(0.001, 0.04, 0.02, 0.1, 0) == approx(0.00110517, rel=1e-6)
    assert update_kl_coef(0.001, 0.0, 0.02, 0.1, 0) == approx(0.000904837, rel=1e-6)  # e^-0.1
    # default clip 0.2: the error 1 is clipped to 0.2 -> e^0.02
    assert update_kl_coef(0.001, 0.04, 0.02, 0.1) == approx(0.001 * 1.02020134, rel=1e-7)
    assert update_kl_coef(0.001, 0.02, 0.02, 0.1) == approx(0.001)  # on target: unchanged
    assert update_kl_coef(50.0, 2.0, 0.02, 0.1, 0) == 100.0          # clipped high
    assert update_kl_coef(1e-8, 0.0, 0.02, 5.0) == 1e-8              # clipped low
    assert update_kl_coef(1.0, 1e300, 0.02, 0.1, 0) == 100.0          # exp does not overflow
    with pytest.raises(ValueError):
        update_kl_coef(1.0, math.nan, 0.02, 0.1)
    with pytest.raises(ValueError):
        update_kl_coef(1.0, 0.01, 0.02, 0.1, -0.2)


def kl_sequence(trace, clip):
    beta, betas = 1e-3, []
    for kl in trace:
        beta = update_kl_coef(beta, kl, 0.02, 0.1, clip)
        betas.append(beta)
    return betas


def test_kl_spike_with_default_clip_moves_beta_by_e_to_the_0_02_at_most():
    # errors (0.01-0.02)/0.02 = -0.5 -> -0.2; (1.0-0.02)/0.02 = 49 -> +0.2; exponent = 0.1*e
    # 1e-3 * e^-0.02 = 9.8019867e-4, * e^-0.02 = 9.6078944e-4, * e^+0.02, * e^-0.02
    assert kl_sequence([0.01, 0.01, 1.0, 0.01], 0.2) == [
        approx(9.8019867e-4, rel=1e-7), approx(9.6078944e-4, rel=1e-7),
        approx(9.8019867e-4, rel=1e-7), approx(9.6078944e-4, rel=1e-7)]


def test_kl_spike_with_clip_0_is_the_published_rule():
    # exponents -0.05, -0.05, 0.1*49 = 4.9, -0.05: 1e-3*e^-0.05, e^-0.1, e^4.8, e^4.75
    assert kl_sequence([0.01, 0.01, 1.0, 0.01], 0) == [
        approx(9.5122942e-4, rel=1e-7), approx(9.0483742e-4, rel=1e-7),
        approx(0.12151042, rel=1e-7), approx(0.11558428, rel=1e-7)]


@pytest.mark.parametrize("kl", [0.0, 1e-6, 0.019, 0.021, 0.05, 0.61, 30.0, 1e12])
@pytest.mark.parametrize("rate,clip", [(0.1, 0.2), (1.0, 0.2), (0.5, 1.0)])
def test_one_update_changes_beta_by_at_most_exp_rate_times_clip(kl, rate, clip):
    for beta in (1e-4, 0.054, 4.1):
        ratio = update_kl_coef(beta, kl, 0.02, rate, clip) / beta
        bound = math.exp(rate * clip)
        assert 1 / bound * (1 - 1e-12) <= ratio <= bound * (1 + 1e-12)
    # and the bound is reached: far above / below target moves by exactly the factor
    assert update_kl_coef(0.054, 0.61, 0.02, rate, clip) == approx(0.054 * math.exp(rate * clip))


def test_update_ema_baseline():
    # 0 -> 0.9*0 + 0.1*1 = 0.1 -> 0.9*0.1 + 0.1*0.5 = 0.14
    assert update_ema_baseline(0.0, [1.0, 0.5], 0.9) == approx(0.14)
    assert update_ema_baseline(0.3, [], 0.9) == 0.3
    assert update_ema_baseline(0.3, [1.0], 0.0) == 1.0
