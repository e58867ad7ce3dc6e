"""When two normalized answers count as one: --answer_match string|math.

`string`: equal normalized strings (data_and_utils.normalize_answer, the published rule as we fixed
it). `math`: also equal when math-verify finds them equal as numbers or expressions (0.5 = 1/2,
3 = 3.0, x+1 = 1+x), and a choice letter equals its option forms: b = (b) = b. = b) 12.

The vote's classes: answers join, in the order seen, the first class whose first member they equal,
so the majority is the largest class (ties: seen first) and p_i is the share of i's class.
"""
from __future__ import annotations

import re
from functools import lru_cache

MATCHES = ("string", "math")

# A choice letter alone or followed by ) . or : (normalize_answer already stripped "(" and a final
# ")" or "."), e.g. "b", "b) 12", "b. twelve", "b: 12".
_LETTER = re.compile(r"^([a-z])(?:[).:]\s.*|[).:]?)$")
# What math-verify may parse: digits, operators, latex, one-letter variables and a few function
# names. A run of two or more other letters is a word ("red" would parse as r*e*d, equal to "der").
_MATH_CHARS = re.compile(r"^[0-9a-z\s.+\-*/^()\[\]{}\\=:<>|!_']+$")
_MATH_WORDS = re.compile(r"\\[a-z]+|sqrt|frac|pi|sin|cos|tan|log|ln|exp|cdot|times|infty")
_WORD = re.compile(r"[a-z]{2,}")


def check_match(mode: str) -> None:
    """ValueError naming the fix when `mode` is unknown or its grader is not installed."""
    if mode not in MATCHES:
        raise ValueError(f"--answer_match must be one of {MATCHES}, got {mode!r}")
    if mode == "math":
        try:
            import math_verify  # noqa: F401
        except ImportError as e:
            raise ValueError("--answer_match math needs math-verify: pip install "
                             "math-verify==0.9.0 (or use --answer_match string)") from e


def choice_letter(answer: str) -> str | None:
    """The option letter a normalized answer names ("b", "b) 12", "b. 12"), or None."""
    m = _LETTER.match(answer)
    return m.group(1) if m else None


def is_math(answer: str) -> bool:
    """Whether a normalized answer is a number or expression and nothing else."""
    if not answer or not _MATH_CHARS.match(answer) or not any(c.isdigit() or c.isalpha()
                                                               for c in answer):
        return False
    return not _WORD.search(_MATH_WORDS.sub(" ", answer))


@lru_cache(maxsize=65536)
def _parsed(answer: str):
    from math_verify import LatexExtractionConfig, parse
    # Inside $...$ the whole answer is read as one expression; without it math-verify extracts
    # the first number it finds ("1+x" became 1).
    return parse(f"${answer}$", extraction_config=[LatexExtractionConfig()])


@lru_cache(maxsize=65536)
def _math_equal(a: str, b: str) -> bool:
    from math_verify import verify
    pa, pb = _parsed(a), _parsed(b)
    return bool(pa and pb and verify(pa, pb) and verify(pb, pa))


def same(a: str, b: str, mode: str = "string") -> bool:
    """Whether two normalized answers count as one under `mode`."""
    if a == b:
        return True
    if mode == "string":
        return False
    la, lb = choice_letter(a), choice_letter(b)
    if la or lb:
        return la == lb
    return is_math(a) and is_math(b) and _math_equal(a, b)


def classes(answers_norm: list[str], mode: str = "string") -> list[str]:
    """Each answer's class, named by the class's first member: equal names = one vote."""
    if mode == "string":
        return list(answers_norm)
    heads: list[str] = []
    out = []
    for a in answers_norm:
        head = next((h for h in heads if same(h, a, mode)), None)
        if head is None:
            heads.append(a)
            head = a
        out.append(head)
    return out


def matches_any(answer: str, gold: set[str], mode: str = "string") -> bool:
    """Whether a normalized answer counts as one of the gold forms."""
    return answer in gold or (mode != "string" and any(same(answer, g, mode) for g in gold))
