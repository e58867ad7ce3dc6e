"""--answer_match: which answers count as one vote (answers.py), in the rewards, eval's scoring and
validation. Hand-made cases; the numbers are worked out in the comments."""
import pytest

import answers as A
from config import Config
from evaluation import Row, gold_forms, row_result
from rewards import compute_rewards, outcome_rewards

approx = pytest.approx


def ans(a: str) -> str:
    return f"<think>Step 1: look.</think><answer>{a}</answer>"


@pytest.mark.parametrize("a, b", [
    ("1/2", "0.5"), ("0.5", "\\frac{1}{2}"), ("3", "3.0"), ("x+1", "1+x"), ("2x", "x*2"),
    ("b", "b) 12"), ("b", "b. twelve"), ("b", "b: 12"), ("10^2", "100"), ("-0.5", "-1/2")])
def test_math_makes_these_one(a, b):
    assert A.same(a, b, "math") and A.same(b, a, "math")
    assert not A.same(a, b, "string")


@pytest.mark.parametrize("a, b", [
    ("-5", "5"), ("0.5", "5"), ("1/3", "0.333"), ("red", "der"), ("b", "c"), ("b) 12", "c) 12"),
    ("b", "12"), ("1+x", "1"), ("12 apples", "12"), ("x", "y"), ("2", "3")])
def test_math_keeps_these_apart(a, b):
    assert not A.same(a, b, "math") and not A.same(b, a, "math")


def test_choice_letters_through_normalisation():
    # normalize_answer strips "(" and a final ")" or ".": (B), B. and "(B) 12" reach us as b, b, b) 12
    outs = [ans("(B)"), ans("B."), ans("(B) 12"), ans("C"), ans("B")]
    r, info = outcome_rewards(outs, 1.0, 0.0, 64, match="math")
    assert info["answer_classes"] == ["b", "b", "b", "c", "b"]
    assert (info["dominant_answer"], info["dominant_count"]) == ("b", 4)
    assert r == approx([0.8, 0.8, 0.8, 0.2, 0.8])  # p_b = 4/5, p_c = 1/5 (gamma 1, no penalty)


def test_the_vote_with_math_and_with_string():
    outs = [ans("1/2"), ans("0.5"), ans("5"), ans("5.0"), ans("0.50")]
    r, info = outcome_rewards(outs, 1.0, 0.0, 64, match="string")
    assert info["dominant_count"] == 1 and r == approx([0.2] * 5)  # five different strings
    r, info = outcome_rewards(outs, 1.0, 0.0, 64, match="math")
    # classes {1/2, 0.5, 0.50} and {5, 5.0}: p = 3/5 and 2/5; the majority is named by its first
    assert info["answer_classes"] == ["1/2", "1/2", "5", "5", "1/2"]
    assert (info["dominant_answer"], info["dominant_count"]) == ("1/2", 3)
    assert r == approx([0.6, 0.6, 0.4, 0.4, 0.6])
    assert info["answers_norm"] == ["1/2", "0.5", "5", "5.0", "0.50"]  # the answers themselves


def test_ties_go_to_the_class_seen_first():
    outs = [ans("-5"), ans("5"), ans("5.0"), ans("-5.0")]
    _, info = outcome_rewards(outs, 1.0, 0.0, 64, match="math")
    assert info["answer_classes"] == ["-5", "5", "5", "-5"]
    assert (info["dominant_answer"], info["dominant_count"]) == ("-5", 2)


def test_compute_rewards_takes_the_match_from_the_config():
    outs = [ans("1/2"), ans("0.5"), ans("7"), ans("8"), ans("9")]
    embed = lambda steps: __import__("torch").ones(len(steps), 4)  # noqa: E731
    assert compute_rewards(Config(), outs, 0, embed)["dominant_count"] == 1
    rw = compute_rewards(Config(answer_match="math"), outs, 0, embed)
    assert rw["dominant_count"] == 2
    assert rw["step_info"]["group_size"] == 2  # the step reward's group is the math majority


def test_scoring_against_gold_uses_the_match():
    rw = {"texts": ["t"] * 3, "answers": ["0.5", "1/2", "2"], "answers_norm": ["0.5", "1/2", "2"],
          "answer_classes": ["0.5", "0.5", "2"], "dominant_answer": "0.5", "dominant_count": 2,
          "reward_steps": [0.0, 0.0, 0.0]}
    gold = gold_forms(Row(1, "i.png", "q", "1/2"))
    s = row_result(rw, gold, "string")
    assert (s["correct_first"], s["correct_majority"], s["correct_all"]) == (False, False, 1 / 3)
    m = row_result(rw, gold, "math")
    assert (m["correct_first"], m["correct_majority"], m["correct_all"]) == (True, True, 2 / 3)
    assert m["distinct_answers"] == 2
    unlabeled = row_result(rw, gold_forms(Row(1, "i.png", "q", None)), "math")
    assert unlabeled["correct_first"] is None and unlabeled["agreement"] == 2 / 3


def test_bad_match_is_a_config_error():
    with pytest.raises(ValueError, match="--answer_match must be one of"):
        Config(answer_match="sympy")
