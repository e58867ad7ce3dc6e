"""The training loop end to end on the tiny model: CLI, log, formulas, checkpoints, resume.

    python -m pytest tests/test_train.py
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import train
from conftest import ENV, ROOT, train_args

REQUIRED_KEYS = """step image_path question proposer_output solver_outputs answers answers_norm
pre_answer_words steps_per_sample dominant_answer dominant_count answer_entropy reward_outcome
reward_steps step_reward_weight reward_final proposer_reward solver_baseline_before solver_kl
kl_coef_solver_before kl_coef_solver_after solver_loss proposer_updated proposer_kl
kl_coef_proposer_before kl_coef_proposer_after step_info seconds""".split()


def read_log(run_dir):
    with open(os.path.join(run_dir, "iter_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(args, cwd=None, script="train.py", timeout=300):
    # one thread, as in-process tests (conftest.ENV): exact-resume tests compare runs bit for bit
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_run(tiny_model, image_dir, tmp_path_factory):
    """One real 3-step run through the CLI, shared by the checks below."""
    out = str(tmp_path_factory.mktemp("runs"))
    proc = run_cli(train_args(tiny_model, image_dir, out, "cli", steps=3, lr="0.01"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(out, "cli")


@pytest.mark.slow
def test_cli_run_writes_log_and_checkpoint_layout(cli_run):
    records = read_log(cli_run)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert not [k for k in REQUIRED_KEYS if k not in r]
        assert len(r["solver_outputs"]) == len(r["answers"]) == len(r["reward_final"]) == 5
        assert all(isinstance(w, int) for w in r["pre_answer_words"])
    assert [r["proposer_updated"] for r in records] == [False, True, False]
    assert records[0]["proposer_kl"] is None and records[1]["proposer_kl"] is not None
    assert sorted(os.listdir(cli_run)) == ["iter_log.jsonl", "run.lock", "step_00002",
                                           "step_00003"]
    ckpt = os.path.join(cli_run, "step_00003")
    assert sorted(os.listdir(ckpt)) == ["SAVE_OK", "proposer", "solver", "trainer_state.json",
                                        "trainer_state.safetensors"]
    for role in ("solver", "proposer"):
        assert sorted(os.listdir(os.path.join(ckpt, role))) == ["adapter_config.json",
                                                                "adapter_model.safetensors"]
    state = checkpoint.read_state(ckpt)  # plain JSON + safetensors: nothing is unpickled
    assert state["step"] == 3 and set(state["optimizers"]) == {"solver", "proposer"}
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"][0])
    assert set(state["train_state"]["baseline"]) == {"solver", "proposer"}


@pytest.mark.slow
def test_solver_adapter_moved_and_loads_with_peft(cli_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    weights = load_file(os.path.join(cli_run, "step_00003", "solver", "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero
    assert not any("visual" in k for k in weights)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model)
    peft = PeftModel.from_pretrained(base, os.path.join(cli_run, "step_00003", "solver"))
    assert any("lora_B" in n for n, _ in peft.named_parameters())


def clip(error: float, c: float) -> float:
    return min(c, max(-c, error))


@pytest.mark.slow
def test_logged_numbers_satisfy_the_formulas(cli_run):
    records = read_log(cli_run)
    b_solver, b_prop, beta_prop = 0.0, 0.0, 1e-3
    for r in records:
        n = len(r["answers_norm"])
        for i, ans in enumerate(r["answers_norm"]):
            p = r["answers_norm"].count(ans) / n
            pen = min(max((r["pre_answer_words"][i] - 64) / 64, 0.0), 1.0)
            assert r["reward_outcome"][i] == pytest.approx(p ** 0.7 * (1 - 0.05 * pen))
        w = 0.7 * min(max((r["step"] / 3 - 0.3) / 0.7, 0.0), 1.0)
        assert r["step_reward_weight"] == pytest.approx(w)
        for o, s, f in zip(r["reward_outcome"], r["reward_steps"], r["reward_final"]):
            assert f == pytest.approx((1 - w) * o + w * s)
        counts = [r["answers_norm"].count(a) / n for a in dict.fromkeys(r["answers_norm"])]
        entropy = -sum(p * math.log(p) for p in counts)
        assert r["answer_entropy"] == pytest.approx(entropy)
        assert r["proposer_reward"] == pytest.approx(math.exp(-(entropy - 0.9) ** 2 / (2 * 0.35 ** 2)))
        assert r["solver_baseline_before"] == pytest.approx(b_solver)
        for f in r["reward_final"]:
            b_solver = 0.9 * b_solver + 0.1 * f
        beta = r["kl_coef_solver_before"]
        expected = beta * math.exp(0.1 * clip((r["solver_kl"] - 0.02) / 0.02, 0.2))
        assert r["kl_coef_solver_after"] == pytest.approx(min(max(expected, 1e-8), 100))
        if r["proposer_updated"]:
            assert r["kl_coef_proposer_before"] == pytest.approx(beta_prop)
            assert r["proposer_baseline_before"] == pytest.approx(b_prop)
            beta_prop = r["kl_coef_proposer_before"] * math.exp(
                0.1 * clip((r["proposer_kl"] - 0.02) / 0.02, 0.2))
            assert r["kl_coef_proposer_after"] == pytest.approx(beta_prop)
            b_prop = 0.9 * b_prop + 0.1 * r["proposer_reward"]
    for earlier, later in zip(records, records[1:]):
        assert later["kl_coef_solver_before"] == earlier["kl_coef_solver_after"]


@pytest.mark.slow
def test_seed_command_runs_verbatim_on_tiny_model(tiny_model, image_dir, tmp_path):
    # The seed README's command with the models and data swapped, few steps, and W&B offline
    # (no network here): the rest is verbatim, including bfloat16 and device_map auto defaults.
    from test_config import SEED_COMMAND
    args = list(SEED_COMMAND)
    swap = {"--data_dir": image_dir, "--solver_model": tiny_model, "--proposer_model": tiny_model,
            "--total_steps": "2", "--wandb_mode": "offline"}
    for flag, value in swap.items():
        args[args.index(flag) + 1] = value
    args += ["--output_dir", str(tmp_path), "--max_new_tokens_solver", "24",
             "--max_new_tokens_proposer", "16"]
    proc = run_cli(args, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_log(tmp_path / "iReasoner")] == [1, 2]
    assert os.path.isfile(tmp_path / "iReasoner" / "step_00002" / "SAVE_OK")
    assert os.path.isdir(tmp_path / "iReasoner" / "wandb")


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.slow
def test_resume_is_exact(tiny_model, image_dir, tmp_path):
    # A constant mixing weight, so total_steps 2 then 4 has the same schedule as 4 at once.
    flags = dict(step_reward_weight_start="0.5", step_reward_weight_end="0.5", lr="0.01")
    out = str(tmp_path)
    assert train.main(train_args(tiny_model, image_dir, out, "once", steps=4, **flags)) == 0
    assert train.main(train_args(tiny_model, image_dir, out, "split", steps=2, **flags)) == 0
    os.makedirs(os.path.join(out, "split", "step_00009.tmp-123"))  # a killed write's leftover
    assert train.main(train_args(tiny_model, image_dir, out, "split", steps=4, **flags)) == 0
    once, split = read_log(os.path.join(out, "once")), read_log(os.path.join(out, "split"))
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert without_seconds(once) == without_seconds(split)
    assert not os.path.exists(os.path.join(out, "split", "step_00009.tmp-123"))
    a = load_file(os.path.join(out, "once", "step_00004", "solver", "adapter_model.safetensors"))
    b = load_file(os.path.join(out, "split", "step_00004", "solver", "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_finished_run_exits_zero_and_other_model_is_an_error(cli_run, tiny_model, tiny_model_b,
                                                             image_dir, capsys):
    out, name = os.path.dirname(cli_run), os.path.basename(cli_run)
    assert train.main(train_args(tiny_model, image_dir, out, name, steps=3)) == 0
    assert "already at step 3" in capsys.readouterr().out
    assert train.main(train_args(tiny_model_b, image_dir, out, name, steps=5)) == 2
    assert "was trained with --solver_model" in capsys.readouterr().err
    assert [r["step"] for r in read_log(cli_run)] == [1, 2, 3]  # nothing touched


@pytest.mark.slow
def test_separate_backbones_and_lora_off(tiny_model, tiny_model_b, image_dir, tmp_path):
    from transformers import AutoModelForImageTextToText
    args = train_args(tiny_model, image_dir, str(tmp_path), "two", steps=2, lr="0.01")
    args[args.index("--proposer_model") + 1] = tiny_model_b
    args.remove("--use_lora_proposer")  # proposer: full fine-tune of its language model
    assert train.main(args) == 0
    ckpt = tmp_path / "two" / "step_00002"
    assert os.path.isfile(ckpt / "solver" / "adapter_model.safetensors")
    assert os.path.isfile(ckpt / "proposer" / "config.json")
    tuned = AutoModelForImageTextToText.from_pretrained(str(ckpt / "proposer")).state_dict()
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_b).state_dict()
    visual = [k for k in base if ".visual." in k]
    language = [k for k in base if ".language_model." in k]
    assert visual and all(torch.equal(tuned[k], base[k]) for k in visual)  # frozen tower
    assert any(not torch.equal(tuned[k], base[k]) for k in language)      # trained LM


def test_missing_data_dir_is_one_line_exit_2(tmp_path):
    proc = run_cli(["--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path)])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --data_dir")


@pytest.mark.slow
def test_run_py_smoke_completes_and_resumes(tmp_path):
    first = run_cli(["smoke"], cwd=str(tmp_path), script="run.py")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "checkpoints: runs/smoke" in first.stdout
    second = run_cli(["smoke"], cwd=str(tmp_path), script="run.py")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout
    assert [r["step"] for r in read_log(tmp_path / "runs" / "smoke")] == list(range(1, 9))
