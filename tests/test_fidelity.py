"""Fidelity to the published recipe (issue 10): prompt files, image size, the per-sample update
order, a proposer that never updates, and eval with the run's own settings, on the tiny model.

    python -m pytest tests/test_fidelity.py -q
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tools import infer
import rewards as R
import checkpoint
import train
import update
import vlm
from sampling import Sampling
from config import Config
from conftest import ENV, ROOT, train_args
from data_and_utils import ImagePool, solver_prompt
from runtime import seed_all

N = 5
PROPOSER_FILE = "PROPOSER-FILE: ask one question about the image.\n<question>...</question>\n"
SOLVER_FILE = "SOLVER-FILE {not a placeholder}\nQuestion: {question}\n"


def read_log(run_dir):
    with open(os.path.join(run_dir, "iter_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def published_run(tiny_model, image_dir, tmp_path_factory):
    """2 steps through train.main (the CLI's parser): per-sample updates, proposer never
    updated, both prompts from files, non-default step scoring. Records every prompt text."""
    out = tmp_path_factory.mktemp("published")
    (out / "proposer.txt").write_text(PROPOSER_FILE, encoding="utf-8")
    (out / "solver.txt").write_text(SOLVER_FILE, encoding="utf-8")
    args = train_args(tiny_model, image_dir, str(out), "pub", steps=2, lr="0.01",
                      update_mode="per_sample", proposer_update_freq="0",
                      proposer_prompt_file=str(out / "proposer.txt"),
                      solver_prompt_file=str(out / "solver.txt"),
                      min_step_group_size="3", max_reasoning_steps="2", step_position_decay="0.3")
    texts = []
    real = train.make_prompts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_prompts", lambda policy, images, prompt_texts, **kw:
                   texts.extend(prompt_texts) or real(policy, images, prompt_texts, **kw))
        assert train.main(args) == 0
    return {"out": out, "run": out / "pub", "args": args, "texts": texts}


# ---------------------------------------------------------------- prompts
@pytest.mark.slow
def test_prompt_files_are_used_and_saved(published_run):
    texts, run = published_run["texts"], published_run["run"]
    # the file's text minus the one trailing newline an editor adds
    assert texts[0::2] == [PROPOSER_FILE[:-1]] * 2
    assert all(t.startswith("SOLVER-FILE {not a placeholder}\nQuestion: ") for t in texts[1::2])
    records = read_log(run)
    assert texts[1] == solver_prompt(records[0]["question"], SOLVER_FILE[:-1])
    state = checkpoint.read_state(str(run / "step_00002"))
    assert state["prompts"] == {"proposer": PROPOSER_FILE[:-1], "solver": SOLVER_FILE[:-1]}


@pytest.mark.slow
def test_resuming_with_another_prompt_is_a_clear_error(published_run, capsys):
    out, args = published_run["out"], list(published_run["args"])
    (out / "solver2.txt").write_text("Other words. {question}", encoding="utf-8")
    args[args.index("--solver_prompt_file") + 1] = str(out / "solver2.txt")
    args[args.index("--total_steps") + 1] = "3"
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "another solver prompt" in err[-1]
    assert len(read_log(published_run["run"])) == 2  # nothing touched


def test_solver_prompt_file_without_placeholder_exits_2_with_one_line(tmp_path):
    (tmp_path / "bad.txt").write_text("Answer the question.", encoding="utf-8")
    for flag, path, what in (("--solver_prompt_file", tmp_path / "bad.txt", "{question}"),
                             ("--proposer_prompt_file", tmp_path / "nope.txt", "cannot read")):
        proc = run_cli(["--data_dir", str(tmp_path), flag, str(path)])
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag}") and what in lines[0]


# ---------------------------------------------------------------- per-sample update order
@pytest.mark.slow
def test_per_sample_takes_n_adam_steps_and_logs_the_published_sequences(published_run):
    records = read_log(published_run["run"])
    b, beta = 0.0, 1e-3
    for r in records:
        assert len(r["solver_baseline_per_sample"]) == len(r["kl_coef_solver_per_sample"]) == N
        for i, reward in enumerate(r["reward_final"]):
            assert r["solver_baseline_per_sample"][i] == pytest.approx(b, abs=1e-12)
            assert r["kl_coef_solver_per_sample"][i] == pytest.approx(beta, rel=1e-12)
            b = 0.9 * b + 0.1 * reward  # the baseline after this sample, for the next one
            error = (r["solver_kl_per_sample"][i] - 0.02) / 0.02
            beta = min(max(beta * math.exp(0.1 * min(0.2, max(-0.2, error))), 1e-8), 100)
        assert r["kl_coef_solver_after"] == pytest.approx(beta, rel=1e-12)
        assert r["solver_kl"] == pytest.approx(sum(r["solver_kl_per_sample"]) / N)
    state = checkpoint.read_state(str(published_run["run"] / "step_00002"))
    steps = {int(s["step"]) for s in state["optimizers"]["solver"]["state"].values()}
    assert steps == {2 * N}  # one AdamW step per sample: N per image
    assert state["optimizers"]["proposer"]["state"] == {}  # never stepped


def test_per_sample_step_matches_one_update_per_completion(tiny_model):
    """The per-sample loop is update_policy on each completion alone, in order, with the
    baseline and beta that the samples before it left."""
    from test_update import make_policies
    cfg, policies = make_policies(tiny_model, update_mode="per_sample")
    solver = policies["solver"]
    prompt = vlm.make_prompt(solver, Image.new("RGB", (112, 84), (200, 30, 30)),
                             solver_prompt("How many circles?"))
    torch.manual_seed(1)
    episode = update.Episode(prompt, vlm.generate(solver, prompt, 3, Sampling(max_new_tokens=8)), [0.9, 0.2, 0.5])
    start = {n: p.detach().clone() for n, p in solver.model.named_parameters() if "lora_" in n}
    sgd = lambda: torch.optim.SGD(solver.parameters(), lr=0.5)  # noqa: E731
    st = train.TrainState(baseline={"solver": 0.3, "proposer": 0.0},
                          kl_coef={"solver": 0.05, "proposer": 1e-3})
    rec = update.update_role(cfg, "solver", policies, {"solver": sgd()}, episode, st,
                             train.Dist())
    ours = {n: p.detach().clone() for n, p in solver.model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in solver.model.named_parameters():
            if n in start:
                p.copy_(start[n])
    b, beta, opt = 0.3, 0.05, sgd()
    for i, (_, one) in enumerate(update.per_sample_episodes(episode)):
        assert rec["solver_baseline_per_sample"][i] == pytest.approx(b)
        out = update.update_policy(cfg, solver, opt, one, torch.tensor([one.rewards[0] - b]),
                                  beta, train.Dist())
        b = R.update_ema_baseline(b, one.rewards, 0.9)
        beta = R.update_kl_coef(beta, out["kl"], 0.02, 0.1, 0.2)
    assert st.baseline["solver"] == pytest.approx(b) and st.kl_coef["solver"] == pytest.approx(beta)
    for n, p in solver.model.named_parameters():
        if n in ours:
            assert torch.allclose(p, ours[n], atol=1e-6), n
    assert any(not torch.equal(ours[n], start[n]) for n in ours if ".solver." in n)


# ---------------------------------------------------------------- proposer never updated
@pytest.mark.slow
def test_proposer_update_freq_0_leaves_the_proposer_bit_identical(published_run, tiny_model):
    from peft import get_peft_model_state_dict
    records = read_log(published_run["run"])
    assert [r["proposer_updated"] for r in records] == [False, False]
    cfg = Config(solver_model=tiny_model, proposer_model=tiny_model, use_lora_solver=True,
                 use_lora_proposer=True, dtype="float32", device_map="cpu")
    seed_all(cfg.seed)  # as train.start_run seeds before building the models
    fresh = vlm.build_policies(cfg)["proposer"]
    init = get_peft_model_state_dict(fresh.model, adapter_name="proposer")
    ckpt = published_run["run"] / "step_00002"
    saved = load_file(ckpt / "proposer" / "adapter_model.safetensors")
    assert saved.keys() == init.keys()
    assert all(torch.equal(saved[k], init[k]) for k in saved)
    solver = load_file(ckpt / "solver" / "adapter_model.safetensors")
    solver_init = get_peft_model_state_dict(fresh.model, adapter_name="solver")
    assert any(not torch.equal(solver[k], solver_init[k]) for k in solver)  # the solver learned


# ---------------------------------------------------------------- evaluation settings
@pytest.mark.slow
def test_eval_of_a_checkpoint_scores_with_its_run_config(published_run, tiny_model, tmp_path,
                                                         monkeypatch):
    adapter = str(published_run["run"] / "step_00002" / "solver")
    run = infer.run_settings(adapter)
    assert (run.reward_cfg.min_step_group_size, run.reward_cfg.max_reasoning_steps,
            run.reward_cfg.step_position_decay) == (3, 2, 0.3)
    assert run.prompts["solver"] == SOLVER_FILE[:-1]
    default = infer.run_settings(None)
    assert (default.reward_cfg.min_step_group_size, default.reward_cfg.max_reasoning_steps) == (2, 8)
    Image.new("RGB", (112, 84), (10, 200, 10)).save(tmp_path / "g.png")
    (tmp_path / "set.jsonl").write_text(json.dumps(
        {"image": "g.png", "question": "What colour?", "answer": "green"}) + "\n")
    seen = []
    real = R.compute_rewards
    monkeypatch.setattr(R, "compute_rewards", lambda cfg, texts, step, embed: seen.append(
        (cfg.min_step_group_size, cfg.max_reasoning_steps)) or real(cfg, texts, step, embed))
    prompts = []
    real_prompt = vlm.make_prompt
    monkeypatch.setattr(infer.vlm, "make_prompt", lambda policy, image, text, *a: prompts.append(
        text) or real_prompt(policy, image, text, *a))
    assert infer.main(["eval", "--model", tiny_model, "--adapter", "none", "--adapter", adapter,
                       "--data", str(tmp_path / "set.jsonl"), "--samples", "3",
                       "--max_new_tokens", "8"]) == 0
    assert seen == [(2, 8), (3, 2)]  # base: defaults; checkpoint: its run's config
    assert prompts[0].startswith("You reason carefully") and prompts[1].startswith("SOLVER-FILE")


# ---------------------------------------------------------------- image size
def test_max_pixels_0_is_the_processors_own_limit(tiny_model, image_dir, tmp_path):
    from transformers import Qwen2VLImageProcessor
    processor = vlm.load_backbone(tiny_model, "float32", "cpu", "sdpa")[1]
    assert vlm.image_sizing(processor, 0) == (56 * 56, 224 * 224, 28)  # tiny's own limit
    assert vlm.image_sizing(processor, 100 * 28 * 28)[1] == 224 * 224  # a cap never raises it
    assert vlm.image_sizing(processor, 20 * 28 * 28)[1] == 20 * 28 * 28
    hub = type("P", (), {"image_processor": Qwen2VLImageProcessor(min_pixels=3136,
                                                                  max_pixels=12845056)})()
    assert vlm.image_sizing(hub, 0)[1] == 12845056  # Qwen2.5-VL's preprocessor_config.json
    assert Config().max_pixels == 0
    cfg = Config(data_dir=image_dir, solver_model=tiny_model, proposer_model=tiny_model,
                 use_lora_solver=True, use_lora_proposer=True, dtype="float32", device_map="cpu")
    pool = ImagePool(cfg.data_dir, [], cfg.seed, cfg.max_pixels)
    train.build_models(cfg, pool)
    assert pool.max_pixels == 224 * 224
    big = Image.new("RGB", (900, 700), (1, 2, 3))
    big.save(tmp_path / "big.png")
    w, h = infer.read_image(str(tmp_path / "big.png"), processor, 0).size
    assert w * h <= 224 * 224 and w % 28 == h % 28 == 0


def test_effective_sampling_values_are_logged_at_start(real_config_model, caplog):
    """The values in use, the model's own generation_config values for information, and a
    warning that says the rewards will be constant when N > 1 answers are sampled greedily."""
    model = vlm.load_backbone(real_config_model, "float32", "cpu", "sdpa")[0]
    policies = {"solver": vlm.Policy("solver", model, None)}
    with caplog.at_level("INFO", logger="ireasoner"):
        vlm.log_sampling(Config(), policies)
    lines = [r.getMessage() for r in caplog.records]
    assert ("solver sampling: temperature 1, top_p 1, top_k 0 (off), repetition_penalty 1 "
            "(off)") in lines
    assert any(line.startswith("solver: the model's generation_config.json sets do_sample True, "
                               "temperature 0.1, top_p 0.001, top_k 1, repetition_penalty 1.05 "
                               "(for information, not used") for line in lines)
    assert "update: batched; proposer every 5 steps" in lines
    assert not any(r.levelname == "WARNING" for r in caplog.records)
    for flags in ({"merge_generation_config": True}, {"top_k": 1}, {"temp": 0.0}):
        caplog.clear()
        with caplog.at_level("INFO", logger="ireasoner"):
            vlm.log_sampling(Config(update_mode="per_sample", proposer_update_freq=0, **flags),
                             policies)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "samples greedily" in warnings[0], flags
        assert "the rewards are constant" in warnings[0]
        assert "update: per_sample; proposer never" in [r.getMessage() for r in caplog.records]
    one = Config(top_k=1, num_solver_samples=1)  # warns that N=1 gives no signal (test_first_hour)
    caplog.clear()
    with caplog.at_level("INFO", logger="ireasoner"):  # one answer: greedy is not a collapse
        vlm.log_sampling(one, policies)
    assert not any(r.levelname == "WARNING" for r in caplog.records)
