"""Parsing of model output (tags, answers, steps), plus a fuzz test on hostile text. Run with:

    python -m pytest tests/test_parsing.py -q
"""
import math
import os
import sys

from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_and_utils import (DEFAULT_QUESTION, count_pre_answer_words, extract_answer,  # noqa: E402
                            extract_question, extract_steps, extract_tag, normalize_answer,
                            proposer_prompt, solver_prompt)
from rewards import outcome_rewards  # noqa: E402


# -----------------------------------------------------------------------------
# tags, questions, answers

def test_extract_tag_basic_case_and_whitespace():
    assert extract_tag("x <answer> 42 </answer> y", "answer") == "42"
    assert extract_tag("<ANSWER>Yes</Answer>", "answer") == "Yes"
    assert extract_tag("<answer>a\nb</answer>", "answer") == "a\nb"  # DOTALL
    assert extract_tag("<answer>first</answer><answer>second</answer>", "answer") == "first"
    assert extract_tag("<answer></answer>", "answer") == ""


def test_extract_tag_nested_unclosed_missing():
    assert extract_tag("<q>outer <q>inner</q> tail</q>", "q") == "inner"
    assert extract_tag("<q>unclosed <q>inner</q>", "q") == "inner"
    assert extract_tag("<answer>never closed", "answer") is None
    assert extract_tag("</answer>closing first<answer>", "answer") is None
    assert extract_tag("no tags at all", "answer") is None
    assert extract_tag("", "answer") is None
    assert extract_tag("<a.b>x</a.b>", "a.b") == "x"  # tag name is escaped, not a regex
    assert extract_tag("<aXb>x</aXb>", "a.b") is None


def test_extract_question_and_fallbacks():
    out = "<question> How many birds are on the wire? </question><rationale>Counting.</rationale>"
    assert extract_question(out) == "How many birds are on the wire?"
    assert extract_question("  What colour is the car?  ") == "What colour is the car?"
    assert extract_question("<question>   </question>") == "<question>   </question>"
    assert extract_question("") == DEFAULT_QUESTION
    assert extract_question(" \n\t ") == DEFAULT_QUESTION


def test_extract_answer():
    assert extract_answer("<think>...</think><answer> 12 </answer>") == "12"
    assert extract_answer("<think>a</think>\nso it is\n  Blue  \n\n") == "Blue"
    assert extract_answer("reasoning\n<answer>7") == "7"  # truncated: unclosed tag removed
    assert extract_answer("<answer></answer>\nlast line") == ""  # present but empty
    assert extract_answer("") == ""
    assert extract_answer("<think></think>") == ""
    assert extract_answer("x < 5 and y > 3") == "x < 5 and y > 3"  # not tags
    # an unclosed <answer> on the line of the reasoning: its text, not the line it shares
    assert extract_answer("<think>Step 1: red</think><answer>5") == "5"
    assert extract_answer("<think>Step 1: red</think><ANSWER> 5 </think>") == "5"
    assert extract_answer("<think>Step 1: red</think><answer>") == ""


def test_normalize_answer():
    assert normalize_answer("  The Answer: 1,000. ") == "the answer: 1000"
    assert normalize_answer('"Red"') == "red"
    assert normalize_answer("«Paris»!") == "paris"
    assert normalize_answer("(b)") == "b"
    assert normalize_answer("`3`") == "3"
    assert normalize_answer("two   \n  words") == "two words"
    assert normalize_answer("\uff14\uff12") == "42"  # full-width digits (NFKC)
    assert normalize_answer("Ünïcode…") == "ünïcode"
    assert normalize_answer("...!!!") == ""
    assert normalize_answer("") == ""
    assert normalize_answer("\ufffd") == ""  # a symbol (So), stripped like any other


def test_normalize_answer_published_rule_merges_symbols_at_the_ends():
    # $5, 5, 5., +5, (5) and "5" are one answer (the published rule); inner symbols stay
    for form in ("$5", "5", "5.", "+5", "(5)", '"5"', " 5 ", "5%", "<5>", "=5", "[5]!", "€5",
                 "\u00a35", "5\u00b0", "\u27e85\u27e9", "*5*", "~5~", "^5|"):
        assert normalize_answer(form) == "5", form
    assert normalize_answer("x + y = 3") == "x + y = 3"
    assert normalize_answer("$5.50") == "5.50"
    assert normalize_answer("1,234,567") == "1234567"          # commas removed anywhere
    assert normalize_answer("A\tB\u3000C") == "a b c"            # unicode space collapsed
    assert normalize_answer("\uff04\uff15") == "5"               # full-width $5 -> $5 -> 5
    assert normalize_answer("\u2460") == "1"                      # circled 1 -> 1 (NFKC)
    assert normalize_answer("ＡＢＣ") == "abc"
    assert normalize_answer(".5") == "5"                         # a leading point is stripped


def test_normalize_answer_keeps_a_leading_minus_before_a_number():
    assert normalize_answer("-5") == "-5" != normalize_answer("5")
    assert normalize_answer("-5.") == "-5"
    assert normalize_answer("(-5)") == "-5"
    assert normalize_answer("$-5") == "-5"
    assert normalize_answer("-.5") == "-.5"
    assert normalize_answer("\u22125") == "-5"                    # unicode minus sign
    assert normalize_answer("\uff0d5") == "-5"                    # full-width hyphen (NFKC)
    assert normalize_answer("- 5") == "5"                        # not directly before: stripped
    assert normalize_answer("-$5") == "5"
    assert normalize_answer("-x") == "x"
    assert normalize_answer("5-") == "5"


def test_normalized_symbol_forms_give_one_answer_and_full_reward():
    rewards, info = outcome_rewards(["<answer>$5</answer>", "<answer>$5</answer>",
                                     "<answer>5</answer>", "<answer>5.</answer>",
                                     "<answer>+5</answer>"], 0.7, 0.05, 64)
    assert info["answers_norm"] == ["5"] * 5
    assert rewards == [1.0] * 5 and info["answer_entropy"] == 0.0


def test_count_pre_answer_words():
    assert count_pre_answer_words("one two three <answer>x y</answer>") == 3
    assert count_pre_answer_words("one two three") == 3
    assert count_pre_answer_words("<ANSWER>x</ANSWER> a b") == 0
    assert count_pre_answer_words("a\n\tb  c<answer>1</answer><answer>2</answer>") == 3
    assert count_pre_answer_words("") == 0


def test_prompts_mention_the_tags():
    p = proposer_prompt()
    assert "<question>" in p and "<rationale>" in p
    s = solver_prompt("How many cats?")
    assert "How many cats?" in s and "<think>" in s and "<answer>" in s and "Step 1:" in s


# -----------------------------------------------------------------------------
# steps

def test_steps_from_step_tags():
    text = "<think><step> look at the sign </step>junk<step>read 42</step><step> </step></think>"
    assert extract_steps(text, 8) == ["look at the sign", "read 42"]


def test_steps_from_step_lines_with_continuations():
    text = ("<think>Let me think.\nStep 1: find the bar\nthat is tallest\n\n"
            "step 2 - read its label\nSTEP 3: compare\n</think><answer>B</answer>")
    assert extract_steps(text, 8) == ["find the bar that is tallest", "read its label", "compare"]


def test_steps_from_numbered_lines():
    text = "1. count rows\n2) count columns\n   then multiply\n3. 3.5 is not a marker here"
    assert extract_steps(text, 8) == ["count rows", "count columns then multiply",
                                      "3.5 is not a marker here"]


def test_steps_before_answer_when_no_think():
    text = "Step 1: a\nStep 2: b\n<answer>Step 3: not a step</answer>"
    assert extract_steps(text, 8) == ["a", "b"]


def test_steps_sentence_fallback():
    text = "<think>The sky is blue. It is day!  Is it noon? Maybe\nyes</think>"
    assert extract_steps(text, 8) == ["The sky is blue.", "It is day!", "Is it noon?", "Maybe", "yes"]
    assert extract_steps("no think, no answer. Two sentences.", 8) == \
        ["no think, no answer.", "Two sentences."]
    assert extract_steps("<think>unclosed. Still parsed.", 8) == ["unclosed.", "Still parsed."]


def test_steps_empty_and_cap():
    assert extract_steps("<think></think><answer>4</answer>", 8) == []
    assert extract_steps("<think>   </think>Step 1: outside", 8) == []
    assert extract_steps("", 8) == []
    many = "\n".join(f"Step {k}: s{k}" for k in range(1, 21))
    assert extract_steps(many, 3) == ["s1", "s2", "s3"]
    assert extract_steps(many, 0) == []


def test_steps_very_long_step():
    long = "x" * 10_000
    assert extract_steps(f"Step 1: {long}\nStep 2: y", 8) == [long, "y"]


# -----------------------------------------------------------------------------
# fuzz: hostile text must never crash and must keep the invariants

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<step>", "</step>", "<question>",
             "</question>", "Step 1:", "step 2 -", "1.", "2)", "\n", " ", ".", "!", "?", ",",
             "\ufffd", "é", "数", "🙂", "<", ">", "</", "<THINK>", "Answer", "42"]

text_strategy = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=10)), max_size=40).map("".join),
    st.builds(lambda a, n: a * n, st.sampled_from(FRAGMENTS + ["x"]), st.integers(1, 3000)),
)


@settings(max_examples=200, deadline=None)
@given(text_strategy, st.integers(0, 10))
def test_fuzz_parsing(text, max_steps):
    for tag in ("think", "answer", "question", "step"):
        got = extract_tag(text, tag)
        assert got is None or got == got.strip()
    assert isinstance(extract_question(text), str) and extract_question(text)
    answer = extract_answer(text)
    norm = normalize_answer(answer)
    assert norm == normalize_answer(norm)  # idempotent
    assert count_pre_answer_words(text) >= 0
    steps = extract_steps(text, max_steps)
    assert len(steps) <= max_steps
    assert all(s and s == s.strip() for s in steps)


@settings(max_examples=200, deadline=None)
@given(st.lists(text_strategy, min_size=1, max_size=6), st.floats(0, 2), st.floats(0, 1),
       st.integers(1, 100))
def test_fuzz_outcome_rewards(outputs, gamma, weight, target):
    rewards, info = outcome_rewards(outputs, gamma, weight, target)
    assert len(rewards) == len(outputs)
    assert all(math.isfinite(r) and 0.0 <= r <= 1.0 for r in rewards)
    assert 0.0 <= info["answer_entropy"] <= math.log(len(outputs)) + 1e-9
    assert 1 <= info["dominant_count"] <= len(outputs)
