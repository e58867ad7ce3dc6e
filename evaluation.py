"""Scoring a Solver on held-out rows: one implementation for `run.py eval` (tools/infer.py) and
for validation while training (validate.py).

A row is one JSONL line: image (relative to the file), question, answer, optional choices. A row
without an answer (allowed where `labeled=False`) gets the label-free figures only. Answers,
agreement and step agreement are scored by the training reward code (rewards.compute_rewards),
so --answer_match applies here as in the vote.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import answers as A
import rewards
import vlm
from data_and_utils import normalize_answer, solver_prompt
from distributed import UserError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Row:
    line: int
    image: str
    question: str
    answer: str | None  # None: an unlabeled row (label-free figures only)
    choices: list = field(default_factory=list)


def parse_row(text: str, line: int, root: str, labeled: bool = True) -> Row:
    """One JSONL line as a Row; ValueError says what is wrong with it. `labeled`: the answer
    field is required."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for key, kinds in (("image", (str,)), ("question", (str,)), ("answer", (str, int, float))):
        if key == "answer" and not labeled and obj.get(key) is None:
            continue
        if not isinstance(obj.get(key), kinds):
            raise ValueError(f"missing or non-text field '{key}'")
    choices = obj.get("choices") or []
    if not isinstance(choices, list) or not 0 <= len(choices) <= len(LETTERS) \
            or not all(isinstance(c, (str, int, float)) for c in choices):
        raise ValueError(f"'choices' must be a list of at most {len(LETTERS)} strings")
    image = os.path.join(root, obj["image"])
    if not os.path.isfile(image):
        raise ValueError(f"image not found: {image}")
    answer = None if obj.get("answer") is None else str(obj["answer"])
    return Row(line, image, obj["question"], answer, [str(c) for c in choices])


def read_rows(path: str, limit: int, labeled: bool = True,
              flag: str = "--data") -> tuple[list[Row], list[str]]:
    """Good rows (the first `limit` if > 0) and one message per bad line."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} does not exist")
    rows, bad, root = [], [], os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", errors="replace") as f:
        for line, text in enumerate(f, 1):
            if limit and len(rows) >= limit:
                break
            if not text.strip():
                continue
            try:
                rows.append(parse_row(text, line, root, labeled))
            except ValueError as e:
                bad.append(f"{path}:{line}: {e}")
    return rows, bad


def question_text(row: Row) -> str:
    if not row.choices:
        return row.question
    options = " ".join(f"({letter}) {c}" for letter, c in zip(LETTERS, row.choices))
    return f"{row.question}\nOptions: {options}"


def gold_forms(row: Row) -> set[str]:
    """Normalized answers counted correct: the answer, and for a multiple-choice row both the
    letter and the text of the option it names. Empty for an unlabeled row."""
    if row.answer is None:
        return set()
    gold = {normalize_answer(row.answer)}
    for letter, choice in zip(LETTERS, row.choices):
        forms = {normalize_answer(letter), normalize_answer(choice)}
        if gold & forms:
            gold |= forms
    return gold


def sample_and_score(policy: vlm.Policy, image, question: str, samples: int, sampling,
                     reward_cfg, solver_text: str, image_features=None):
    """N sampled answers scored by the training reward code with `reward_cfg`'s settings.
    Returns (prompt, rewards dict with the sampled texts)."""
    prompt = vlm.make_prompt(policy, image, solver_prompt(question, solver_text), image_features)
    roll = vlm.generate(policy, prompt, samples, sampling)
    rw = rewards.compute_rewards(reward_cfg, roll.texts, 0, vlm.step_embedder(policy, reward_cfg))
    return prompt, {**rw, "texts": roll.texts}


def summary(rw: dict) -> dict:
    n = len(rw["texts"])
    return {"majority": rw["dominant_answer"], "agreement": rw["dominant_count"] / n,
            "step_agreement": sum(rw["reward_steps"]) / n,
            "distinct_answers": len(set(rw.get("answer_classes", rw["answers_norm"])))}


def row_result(rw: dict, gold: set[str], match: str) -> dict:
    """One row's figures: the label-free ones always; with gold forms also whether the first
    sample, the majority, and what share of all N samples are right (None when unlabeled)."""
    s = summary(rw)
    right = [A.matches_any(a, gold, match) for a in rw["answers_norm"]] if gold else None
    return {**s, "correct_first": right[0] if gold else None,
            "correct_majority": A.matches_any(s["majority"], gold, match) if gold else None,
            "correct_all": sum(right) / len(right) if gold else None,
            "answers": rw["answers"], "samples": rw["texts"]}
