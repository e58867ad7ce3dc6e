"""Shared fixtures: one tiny random Qwen2.5-VL and a folder of synthetic images per session.

    python -m pytest
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tiny import build_tiny_model, make_synthetic_images  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-a"))


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> str:
    """A second, different tiny model (other seed) for the separate-backbones case."""
    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-b"), seed=1)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> str:
    return make_synthetic_images(str(tmp_path_factory.mktemp("images")), n=8)


def train_args(model: str, data: str, out: str, name: str, steps: int = 3, **extra) -> list[str]:
    """A fast command line for the tiny model; extra flags as name=value ('' for a bare flag)."""
    args = ["--data_dir", data, "--solver_model", model, "--proposer_model", model,
            "--use_lora_solver", "--use_lora_proposer", "--dtype", "float32",
            "--device_map", "cpu", "--total_steps", str(steps), "--save_every", "2",
            "--output_dir", out, "--wandb_run_name", name, "--max_new_tokens_solver", "16",
            "--max_new_tokens_proposer", "12", "--proposer_update_freq", "2"]
    for key, value in extra.items():
        args += [f"--{key}"] + ([str(value)] if value != "" else [])
    return args
