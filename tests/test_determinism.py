"""Exactness: the update repeats bit for bit at 2 CPU threads; --deterministic sets what GPUs need
and a resume under it logs what the unbroken run logs (docs/reliability.md, "Exactness").

    python -m pytest tests/test_determinism.py -q
"""
import os

import pytest
import torch
from PIL import Image

import update
import vlm
from conftest import train_args
from data_and_utils import solver_prompt
from sampling import Sampling
from test_train import read_log, without_seconds
from test_update import make_policies


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_update_gradient_repeats_bit_for_bit_at_two_threads(tiny_model, two_threads):
    """The completions share their image's prompt cache. Selecting its rows by advanced indexing
    made the backward an index_put(accumulate=True), which at 2+ threads adds float32 with
    atomics in whatever order the threads meet (for 32,768+ elements): the gradient changed in
    the last bits from one call to the next. This prompt's cache is 5 x 2 x P x 32 floats with
    P > 300, over that size."""
    cfg, policies = make_policies(tiny_model)
    solver = policies["solver"]
    prompt = vlm.make_prompt(solver, Image.new("RGB", (448, 336), (30, 120, 200)),
                             solver_prompt("How many squares?"))
    assert 5 * 2 * prompt.length * 32 >= 32768
    torch.manual_seed(3)
    roll = vlm.generate(solver, prompt, 5, Sampling(max_new_tokens=8))
    episode = update.Episode(prompt, roll, [0.0] * 5)
    advantages = torch.tensor([0.5, -1.0, 0.25, 1.5, -0.75])
    params = [p for p in solver.parameters()]
    grads = []
    for _ in range(4):
        for p in params:
            p.grad = None
        update.accumulate_gradients(cfg, solver, episode, advantages, beta=0.3)
        grads.append([p.grad.clone() for p in params if p.grad is not None])
    assert grads[0] and any(g.abs().sum() > 0 for g in grads[0])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_repeat_rows_gives_advanced_indexing_rows():
    x = torch.arange(24.).reshape(3, 2, 4)
    runs = [(0, 2), (2, 1), (1, 3), (0, 1)]
    assert torch.equal(update.repeat_rows(x, runs), x[torch.tensor([0, 0, 2, 1, 1, 1, 0])])
    assert torch.equal(update.repeat_rows(x, [(1, 4)]), x[[1, 1, 1, 1]])


@pytest.fixture
def restore_determinism():
    """--deterministic changes process-wide torch settings; put them back for later tests."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, dict(os.environ))
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    os.environ.clear()
    os.environ.update(saved[3])


def test_deterministic_sets_what_cuda_needs(monkeypatch, restore_determinism):
    """The flag's settings; a valid cuBLAS setting of the environment's own is kept."""
    import determinism
    for env_value, expected in [(None, ":4096:8"), (":16:8", ":16:8"), ("bogus", ":4096:8")]:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        if env_value:
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", env_value)
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        settings = determinism.use_deterministic_algorithms()
        assert settings["CUBLAS_WORKSPACE_CONFIG"] == expected
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == expected
        assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


@pytest.mark.slow
def test_deterministic_resume_logs_like_an_unbroken_run(tiny_model, image_dir, tmp_path,
                                                        restore_determinism):
    """2 steps, then a resume to 3, under --deterministic, against 3 at once (a proposer update
    at step 2, before the checkpoint)."""
    import train
    flags = dict(step_reward_weight_start="0.5", step_reward_weight_end="0.5", lr="0.01",
                 deterministic="")
    out = str(tmp_path)
    assert train.main(train_args(tiny_model, image_dir, out, "once", steps=3, **flags)) == 0
    assert torch.are_deterministic_algorithms_enabled()
    assert train.main(train_args(tiny_model, image_dir, out, "split", steps=2, **flags)) == 0
    assert train.main(train_args(tiny_model, image_dir, out, "split", steps=3, **flags)) == 0
    once, split = read_log(tmp_path / "once"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3]
    assert split[1]["proposer_updated"]
    assert without_seconds(once) == without_seconds(split)
