"""tools/infer.py: a trained checkpoint loads like lmms-eval loads it, merged export, eval and infer CLIs.

    python -m pytest tests/test_infer.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from tools import infer
import train
import update
import vlm
from config import Config
from data_and_utils import solver_prompt
from tools.tiny import make_counting_eval_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--samples", "2", "--max_new_tokens", "12"]


@pytest.fixture(scope="module")
def step_dir(tiny_model, image_dir, tmp_path_factory) -> str:
    """A real 2-step LoRA run; its last checkpoint is what the tests below load."""
    out = str(tmp_path_factory.mktemp("infer-runs"))
    rc = train.main(["--data_dir", image_dir, "--solver_model", tiny_model,
                     "--proposer_model", tiny_model, "--use_lora_solver", "--use_lora_proposer",
                     "--dtype", "float32", "--device_map", "cpu", "--total_steps", "2",
                     "--save_every", "2", "--lr", "1e-2", "--output_dir", out,
                     "--wandb_run_name", "r", "--num_solver_samples", "3",
                     "--max_new_tokens_solver", "16", "--max_new_tokens_proposer", "12",
                     "--proposer_update_freq", "2"])
    assert rc == 0
    return os.path.join(out, "r", "step_00002")


def lora_cfg(model: str) -> Config:
    return Config(solver_model=model, proposer_model=model, use_lora_solver=True,
                  use_lora_proposer=True, dtype="float32", device_map="cpu")


def example(processor):
    image = Image.new("RGB", (112, 84), (200, 30, 30))
    ids = processor.tokenizer(["<think>Step 1: two</think><answer>2</answer>"],
                              add_special_tokens=False, return_tensors="pt")["input_ids"]
    return image, ids, torch.ones_like(ids)


@torch.no_grad()
def plain_logits(model, processor, image, ids):
    """A harness-style forward: processor output + pixel_values, no precomputed features."""
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"},
                                      {"type": "text", "text": solver_prompt("How many?")}]}],
        add_generation_prompt=True, tokenize=False)
    p = processor(text=[chat], images=[image], return_tensors="pt")
    n = p["input_ids"].shape[1]
    out = model(input_ids=torch.cat([p["input_ids"], ids], 1),
                attention_mask=torch.ones(1, n + ids.shape[1], dtype=torch.long),
                mm_token_type_ids=torch.cat([p["mm_token_type_ids"], torch.zeros_like(ids)], 1),
                pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"], use_cache=False)
    return out.logits[:, n - 1:-1]


@torch.no_grad()
def policy_logits(policy, image, ids, mask):
    prompt = vlm.make_prompt(policy, image, solver_prompt("How many?"))
    with vlm.acting(policy) as model:
        return update.completion_logits(model.eval(), prompt, ids, mask)


def test_checkpoint_adapter_loads_like_lmms_eval(tiny_model, step_dir):
    from peft import PeftModel
    solver_dir = os.path.join(step_dir, "solver")
    lora_b = [v for k, v in load_file(os.path.join(solver_dir, vlm.ADAPTER_FILE)).items()
              if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0  # trained, not zero-init
    base, processor = vlm.load_backbone(tiny_model, "float32", "cpu", "sdpa")
    harness = PeftModel.from_pretrained(base, solver_dir).eval()  # lmms-eval's lora_path route
    policies = vlm.build_policies(lora_cfg(tiny_model))          # the trainer's resume route
    vlm.load_policy(policies["solver"], solver_dir)
    image, ids, mask = example(processor)
    a = plain_logits(harness, processor, image, ids)
    b = policy_logits(policies["solver"], image, ids, mask)
    with harness.disable_adapter():
        untrained = plain_logits(harness, processor, image, ids)
    assert (a - b).abs().max().item() < 1e-5
    assert (a - untrained).abs().max().item() > 1e-4  # the comparison can see the adapter


def test_export_merged_equals_base_plus_adapter(tiny_model, tmp_path):
    torch.manual_seed(0)
    policies = vlm.build_policies(lora_cfg(tiny_model))
    solver = policies["solver"]
    for name, p in solver.model.named_parameters():
        if "lora_B" in name and ".solver." in name:
            p.data.normal_(0, 0.05)  # zero-init B would make the merge trivially exact
    adapter, out = str(tmp_path / "solver"), str(tmp_path / "merged")
    vlm.save_policy(solver, adapter)
    assert infer.main(["export", "--model", tiny_model, "--adapter", adapter, "--out", out]) == 0
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    image, ids, mask = example(processor)
    a = plain_logits(merged, processor, image, ids)
    b = policy_logits(solver, image, ids, mask)
    with solver.model.disable_adapter():
        base = plain_logits(solver.model, processor, image, ids)
    assert (a - b).abs().max().item() < 1e-4
    assert (a - base).abs().max().item() > 1e-3
    assert infer.main(["export", "--model", tiny_model, "--adapter", adapter, "--out", out]) == 2


def write_eval_set(tmp_path) -> str:
    """Three good rows (one multiple-choice) and three bad ones."""
    path = make_counting_eval_set(str(tmp_path / "set"), n=2)
    with open(path, "a") as f:
        f.write(json.dumps({"image": "images/count_000.png", "question": "How many?",
                            "answer": "B", "choices": ["1", "2", "3"]}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"image": "images/count_001.png", "question": "How many?"}) + "\n")
        f.write(json.dumps({"image": "images/missing.png", "question": "Q", "answer": "1"}) + "\n")
    return path


def test_eval_cli_compares_base_and_adapter(tiny_model, step_dir, tmp_path):
    data, out = write_eval_set(tmp_path), str(tmp_path / "results.jsonl")
    solver_dir = os.path.join(step_dir, "solver")
    proc = subprocess.run([sys.executable, "run.py", "eval", "--model", tiny_model,
                           "--adapter", "none", "--adapter", solver_dir, "--data", data,
                           "--out", out, *FAST], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert "base" in header and solver_dir in header
    for metric in ("acc", "maj@2", "agreement", "step agreement"):
        assert any(line.startswith(metric) for line in lines), metric
    assert next(line for line in lines if line.startswith("rows")).split()[1:] == ["3", "3"]
    assert "skipped 3 bad row(s)" in proc.stdout
    assert "not valid JSON" in proc.stderr and "'answer'" in proc.stderr
    assert "missing.png" in proc.stderr
    with open(out) as f:
        results = [json.loads(line) for line in f]
    assert len(results) == 3
    for r in results:
        assert set(r["results"]) == {"base", solver_dir}
        for m in r["results"].values():
            assert len(m["samples"]) == 2 and 0.5 <= m["agreement"] <= 1
            assert 0 <= m["step_agreement"] <= 1 and isinstance(m["correct_first"], bool)


def test_infer_proposer_asks_when_no_question(tiny_model, step_dir, tmp_path, capsys):
    make_counting_eval_set(str(tmp_path), n=1)
    image = str(tmp_path / "images" / "count_000.png")
    rc = infer.main(["infer", "--model", tiny_model, "--adapter",
                     os.path.join(step_dir, "solver"), "--image", image,
                     "--max_new_tokens_proposer", "12", *FAST])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("question (proposer): ")
    assert "--- sample 2/2" in out and out.count("  answer: ") == 2
    assert "majority answer:" in out and "agreement" in out


def test_multiple_choice_answers_match_letter_or_text():
    row = infer.Row(1, "x.png", "How many?", "B", ["one", "two"])
    assert infer.gold_forms(row) == {"b", "two"}
    assert "(A) one (B) two" in infer.question_text(row)
    assert infer.gold_forms(infer.Row(1, "x.png", "Q", "3.", [])) == {"3"}


def test_bad_input_is_one_line_and_exit_2(tiny_model, step_dir, tmp_path, capsys):
    lone = tmp_path / "run" / "step_1" / "solver"  # a solver folder without a proposer/ beside it
    shutil.copytree(os.path.join(step_dir, "solver"), lone)
    image = str(tmp_path / "img.png")
    Image.new("RGB", (64, 64)).save(image)
    cases = [(["infer", "--model", tiny_model, "--adapter", str(lone), "--image", image],
              "proposer"),
             (["infer", "--model", tiny_model, "--image", image], "--question"),
             (["infer", "--model", tiny_model, "--question", "q", "--image", "nope.png"],
              "nope.png"),
             (["eval", "--model", tiny_model, "--data", "nope.jsonl"], "nope.jsonl"),
             (["eval", "--model", tiny_model, "--data", image, "--samples", "0"], "--samples"),
             (["eval", "--model", tiny_model, "--adapter", "no/such", "--data",
               write_eval_set(tmp_path)], "no/such"),
             (["export", "--model", tiny_model], "--adapter"),
             (["serve"], "infer, eval, export")]
    for argv, needle in cases:
        assert infer.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and needle in err[-1], (argv, err)


def test_eval_scores_with_the_training_rewards(tiny_model, tmp_path, monkeypatch, capsys):
    """Fixed answers instead of random-model noise, so every metric has a known value."""
    agreeing = "<think>Step 1: count the circles\nStep 2: there are two</think><answer>2</answer>"
    texts = ["<think>Step 1: guess</think><answer>5</answer>", agreeing, agreeing]
    fake = lambda policy, prompt, n, *a, **k: vlm.Rollout(texts[:n], None, None)
    monkeypatch.setattr(infer.vlm, "generate", fake)
    data = tmp_path / "set.jsonl"
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    data.write_text(json.dumps({"image": "a.png", "question": "How many?", "answer": "2"}) + "\n"
                    + json.dumps({"image": "a.png", "question": "Which?", "answer": "B",
                                  "choices": ["2", "5"]}) + "\n")
    assert infer.main(["eval", "--model", tiny_model, "--data", str(data), "--samples", "3"]) == 0
    table = {line.split("  ")[0].strip(): line.split()[-1]
             for line in capsys.readouterr().out.splitlines()}
    # Row 1: first sample "5" wrong, majority "2" right. Row 2: option B is "5", so the first
    # sample is right (by the option's text) and the majority wrong.
    assert table["acc"] == "0.500" and table["maj@3"] == "0.500"
    assert table["agreement"] == f"{2 / 3:.3f}"
    # The two majority samples have identical steps (cosine 1): each gets the density
    # (2/3)**0.7 (training default gamma), the third gets 0; the mean is over all 3 samples.
    assert table["step agreement"] == f"{2 / 3 * (2 / 3) ** 0.7:.3f}"
    assert table["rows"] == "2"
