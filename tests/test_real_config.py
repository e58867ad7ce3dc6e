"""The real checkpoints' generation_config.json (Qwen2.5-VL-7B-Instruct: top_k 1, top_p 0.001,
temperature 0.1, repetition_penalty 1.05) on a tiny hub-layout model: by default training and
eval sample from the plain tempered softmax; --merge_generation_config reproduces the published
greedy collapse. The update scores sampled tokens at the sampling temperature. The per-step
sampling signals, the W&B image table.

    python -m pytest tests/test_real_config.py -q
"""
import json
import os
import sys
import types

import pytest
import torch
from PIL import Image

import runtime
import train
import update
import vlm
from conftest import train_args
from data_and_utils import solver_prompt
from distributed import Dist
from tools import infer
from tools.tiny import make_counting_eval_set

SIGNALS = ("distinct_completions", "completion_lengths", "completions_clipped", "token_entropy")


def _train(model, image_dir, out, name, **extra):
    assert train.main(train_args(model, image_dir, out, name, steps=2, **extra)) == 0
    with open(os.path.join(out, name, "iter_log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_default_training_samples_distinct_answers(real_config_model, image_dir, tmp_path):
    records = _train(real_config_model, image_dir, str(tmp_path), "default")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert all(key in r for key in SIGNALS)
        assert r["distinct_completions"] > 1, r["solver_outputs"]
        assert len(r["completion_lengths"]) == 5 and 0 <= r["completions_clipped"] <= 5
        assert all(1 <= n <= 16 for n in r["completion_lengths"]) and r["token_entropy"] > 0
    s = runtime.step_signals(records[:1])
    assert s["distinct_completions"] > 1 and s["token_entropy"] > 0
    assert s["completion_length_max"] == max(records[0]["completion_lengths"])


@pytest.mark.slow
def test_the_published_behaviour_flag_reproduces_the_greedy_collapse(real_config_model,
                                                                      image_dir, tmp_path):
    records = _train(real_config_model, image_dir, str(tmp_path), "published",
                     merge_generation_config="")
    for r in records:
        assert r["distinct_completions"] == 1 and r["answer_entropy"] == 0
        assert len(set(r["reward_final"])) == 1 and r["dominant_count"] == 5
    s = runtime.step_signals(records)
    assert s["frac_reward_zero_std"] == 1.0 and s["distinct_completions"] == 1.0


def _eval(model, data, out, *extra):
    assert infer.main(["eval", "--model", model, "--data", data, "--samples", "5",
                       "--max_new_tokens", "2", "--temp", "0.02", "--out", out, *extra]) == 0
    with open(out) as f:
        return [json.loads(line)["results"]["base"] for line in f]


@pytest.mark.slow
def test_eval_maj_at_n_and_acc_can_differ(real_config_model, tmp_path, capsys):
    """Gold answers are the majority answers of a first pass (eval seeds each row, so a second
    pass samples the same): maj@N is then 1, and acc is below it wherever the first answer is
    not the majority one. Under the published merge every answer is the first, so maj@N = acc."""
    data = make_counting_eval_set(str(tmp_path / "set"), n=6)
    first = _eval(real_config_model, data, str(tmp_path / "results-1.jsonl"))
    gold = tmp_path / "set" / "gold.jsonl"
    with open(data) as f, open(gold, "w") as g:
        for line, r in zip(f, first):
            g.write(json.dumps({**json.loads(line), "answer": r["majority"]}) + "\n")
    again = _eval(real_config_model, str(gold), str(tmp_path / "results-2.jsonl"))
    acc = sum(r["correct_first"] for r in again) / len(again)
    maj = sum(r["correct_majority"] for r in again) / len(again)
    assert maj == 1.0 and acc < maj, again
    assert "top_k 0 (off)" in capsys.readouterr().err
    greedy = _eval(real_config_model, str(gold), str(tmp_path / "results-3.jsonl"),
                   "--merge_generation_config")
    assert all(r["agreement"] == 1.0 and r["correct_first"] == r["correct_majority"]
               for r in greedy)
    assert "warning: eval samples greedily (top_k 1)" in capsys.readouterr().err


# ---------------------------------------------------------------- log-probs at the temperature
@pytest.mark.parametrize("images", [1, 2])
def test_update_scores_sampled_tokens_at_the_sampling_temperature(real_config_model, images,
                                                                  monkeypatch):
    """At --temp 0.7 with LoRA dropout 0, the update forward's log-prob of every sampled token
    is the sampler's own log_softmax(logits / 0.7), and the KL's reference is scored at 0.7."""
    cfg = train.Config(solver_model=real_config_model, proposer_model=real_config_model,
                       use_lora_solver=True, use_lora_proposer=True, dtype="float32",
                       device_map="cpu", lora_dropout=0.0, temp=0.7, top_p=0.95,
                       images_per_step=images, max_new_tokens_solver=12)
    torch.manual_seed(0)
    policies = vlm.build_policies(cfg)
    solver = policies["solver"]
    with torch.no_grad():  # a trained-looking adapter, so policy and reference differ
        for name, p in solver.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pictures = [Image.new("RGB", (112, 84), c) for c in ((200, 30, 30), (20, 90, 200))][:images]
    prompt = vlm.make_prompts(solver, pictures, [solver_prompt("How many circles?")] * images)
    sampling = vlm.role_sampling(cfg, solver)
    assert (sampling.temperature, sampling.top_k, sampling.repetition_penalty) == (0.7, 0, 1.0)
    torch.manual_seed(1)
    roll = vlm.generate(solver, prompt, 5, sampling)
    scored, ref_temperatures = [], []
    real_score, real_ref = update.token_logprobs, update.reference_logprobs
    monkeypatch.setattr(update, "token_logprobs", lambda logits, ids, temperature=1.0: (
        scored.append(real_score(logits, ids, temperature)[0].detach()) or
        real_score(logits, ids, temperature)))
    monkeypatch.setattr(update, "reference_logprobs", lambda *a, **kw: (
        ref_temperatures.append(a[5] if len(a) > 5 else kw.get("temperature")) or
        real_ref(*a, **kw)))
    episode = update.Episode(prompt, roll, [0.5] * roll.ids.shape[0])
    update.update_policy(cfg, solver, torch.optim.SGD(solver.parameters(), lr=0.0), episode,
                         torch.linspace(-1, 1, roll.ids.shape[0]), 0.1, Dist())
    mask = roll.mask.bool()
    assert len(scored) == 1 and ref_temperatures == [0.7]
    diff = (scored[0][mask] - roll.logprobs[mask]).abs().max().item()
    assert diff < 1e-5, diff
    # The test can fail: the plain (T = 1) log-probs are far from the sampler's.
    plain = update.token_logprobs(update.completion_logits(
        solver.model, prompt, roll.ids, roll.mask, update.row_images(prompt, roll.ids.shape[0])),
        roll.ids)[0].detach()
    assert (plain[mask] - roll.logprobs[mask]).abs().max().item() > 1e-2


def test_step_signals_count_zero_std_lengths_clipping_and_entropy():
    recs = [{"distinct_completions": 1, "reward_final": [0.5] * 3, "completion_lengths": [4, 4, 4],
             "completions_clipped": 3, "token_entropy": 0.0},
            {"distinct_completions": 3, "reward_final": [0.1, 0.9, 0.4],
             "completion_lengths": [2, 6, 4], "completions_clipped": 0, "token_entropy": 3.0}]
    s = runtime.step_signals(recs)
    assert s == {"distinct_completions": 2.0, "frac_reward_zero_std": 0.5,
                 "completion_length_mean": 4.0, "completion_length_max": 6,
                 "clipped_ratio": 0.5, "token_entropy": 1.5}


def test_wandb_logs_the_signals_and_an_image_table_every_k_steps(monkeypatch, tmp_path):
    logged = []
    fake = types.SimpleNamespace(Table=lambda columns, data: ("table", columns, data),
                                 Image=lambda path, caption: ("image", path, caption))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = types.SimpleNamespace(log=lambda data, step: logged.append((step, data)))
    rec = {"reward_final": [0.2, 0.4], "reward_outcome": [0.1, 0.3], "answer_entropy": 0.6,
           "step_reward_weight": 0.0, "seconds": 1.0, "skipped_images": 0, "solver_kl": 0.01,
           "kl_coef_solver_after": 1e-3, "solver_loss": 0.1, "solver_baseline_before": 0.0,
           "proposer_reward": 0.5, "step_info": {}, "proposer_updated": False,
           "question": "How many?", "answers": ["3", "4"], "dominant_answer": "3",
           "image_path": str(tmp_path / "a.png"), "distinct_completions": 2,
           "completion_lengths": [5, 7], "completions_clipped": 1, "token_entropy": 2.0,
           "solver_logprob_diff": 1e-7, "proposer_logprob_diff": None}
    for step in (1, 2, 3, 4):
        runtime.log_wandb(run, [{**rec, "step": step}], images_every=2)
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert ["images" in data for _, data in logged] == [False, True, False, True]
    kind, columns, rows = logged[1][1]["images"]
    assert columns == ["image", "question", "answers"]
    assert rows == [[("image", rec["image_path"], "step 2"), "How many?", "3 | 4"]]
    first = logged[0][1]
    assert (first["train/frac_reward_zero_std"], first["completions/mean_length"],
            first["completions/max_length"], first["completions/clipped_ratio"],
            first["solver/entropy"], first["train/distinct_completions"]) == (0.0, 6.0, 7, 0.5,
                                                                              2.0, 2.0)
    assert first["solver/logprob_diff"] == 1e-7 and "proposer/logprob_diff" not in first


def test_fixture_carries_the_real_generation_config(real_config_model):
    from tools.tiny import QWEN2_5_VL_7B_GENERATION
    with open(os.path.join(real_config_model, "generation_config.json")) as f:
        gen = json.load(f)
    assert {k: gen[k] for k in QWEN2_5_VL_7B_GENERATION} == {
        "do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
        "repetition_penalty": 1.05}
    tok = vlm.load_backbone(real_config_model, "float32", "cpu", "sdpa")[1].tokenizer
    ids = tok.convert_tokens_to_ids
    assert gen["bos_token_id"] == gen["pad_token_id"] == ids("<|endoftext|>")
    assert gen["eos_token_id"] == [ids("<|im_end|>"), ids("<|endoftext|>")]


def test_tiny_has_a_real_command_line(tmp_path, capsys):
    from tools import tiny
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as stop:
            tiny.main(["--help"])
    finally:
        os.chdir(cwd)
    assert stop.value.code == 0 and "--real_generation_config" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []  # no folder named --help
    with pytest.raises(SystemExit):
        tiny.main(["out", "--family", "qwen9_vl"])
