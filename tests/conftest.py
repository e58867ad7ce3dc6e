"""Shared fixtures: one tiny random Qwen2.5-VL per session, written in the hub layout of the real
checkpoints (tools/tiny.py, tools/hub_layout.py) and loaded through from_pretrained like them, and a folder of
synthetic images.

    python -m pytest
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.tiny import build_tiny_model, make_synthetic_images  # noqa: E402

# Trainer subprocesses run on one thread too (see one_torch_thread).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine spinning
    OpenMP threads make each step 20-60x slower; the numbers are the same with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def strict_json_lines(path) -> list:
    """Every line of a JSONL file through a strict parser (bare NaN/Infinity raise) and, when
    installed, through jq: what a user's tools will read."""
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line, parse_constant=refuse) for line in f]
    if shutil.which("jq"):
        proc = subprocess.run(["jq", "-c", ".", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"jq rejects {path}: {proc.stderr}"
        assert len(proc.stdout.splitlines()) == len(records), path
    return records


@pytest.fixture(autouse=True, scope="session")
def every_log_is_strict_json(tmp_path_factory):
    """After the session: every training log and eval result file any test wrote parses
    strictly, line by line (a file a test garbles on purpose is repaired by the resume)."""
    yield
    base = tmp_path_factory.getbasetemp()
    for path in [*base.rglob("iter_log.jsonl"), *base.rglob("results*.jsonl")]:
        strict_json_lines(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-a"), layout="hub")


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> str:
    """A second, different tiny model (other seed) for the separate-backbones case."""
    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-b"), seed=1, layout="hub")


@pytest.fixture(scope="session")
def real_config_model(tmp_path_factory) -> str:
    """tiny_model's architecture (seed 0) in the hub layout, with the sampling values of the
    hub's Qwen2.5-VL-7B-Instruct generation_config.json: top_k 1, top_p 0.001, temperature 0.1,
    repetition_penalty 1.05, do_sample true (bos, pad and eos as the real file names them, with
    this vocabulary's ids)."""
    from tools.tiny import QWEN2_5_VL_7B_GENERATION
    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-real-config"),
                            layout="hub", generation=QWEN2_5_VL_7B_GENERATION)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> str:
    return make_synthetic_images(str(tmp_path_factory.mktemp("images")), n=8)


def train_args(model: str, data: str, out: str, name: str, steps: int = 3, **extra) -> list[str]:
    """A fast command line for the tiny model; extra flags as name=value ('' for a bare flag),
    replacing the value of a flag already in the list."""
    args = ["--data_dir", data, "--solver_model", model, "--proposer_model", model,
            "--use_lora_solver", "--use_lora_proposer", "--dtype", "float32",
            "--device_map", "cpu", "--total_steps", str(steps), "--save_every", "2",
            "--output_dir", out, "--wandb_run_name", name, "--max_new_tokens_solver", "16",
            "--max_new_tokens_proposer", "12", "--proposer_update_freq", "2"]
    for key, value in extra.items():
        flag = f"--{key}"
        if flag in args:  # override a default above
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag] + ([str(value)] if value != "" else [])
    return args
