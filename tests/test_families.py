"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the trainer runs on each generation, and the precomputed
image-feature path (vision tower run once per image) gives the same logits as a plain forward.

    python -m pytest tests/test_families.py
"""
import json
import os

import pytest
import torch
from PIL import Image

import train
import update
import vlm
from data_and_utils import solver_prompt
from tools.tiny import FAMILIES, build_tiny_model, make_synthetic_images

MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    if request.param == "qwen2_5_vl":  # the default family: reuse the session's tiny model
        return request.param, request.getfixturevalue("tiny_model")
    path = str(tmp_path_factory.mktemp("families") / request.param)
    return request.param, build_tiny_model(path, family=request.param)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_synthetic_images(str(tmp_path_factory.mktemp("family-images")), n=4)


def test_two_step_training_writes_checkpoint(family_model, images, tmp_path):
    family, model = family_model
    with open(os.path.join(model, "config.json")) as f:
        assert json.load(f)["model_type"] == MODEL_TYPES[family]
    rc = train.main(["--data_dir", images, "--solver_model", model, "--proposer_model", model,
                     "--use_lora_solver", "--use_lora_proposer", "--dtype", "float32",
                     "--device_map", "cpu", "--total_steps", "2", "--save_every", "2",
                     "--output_dir", str(tmp_path), "--wandb_run_name", family,
                     "--num_solver_samples", "2", "--max_new_tokens_solver", "10",
                     "--max_new_tokens_proposer", "8", "--proposer_update_freq", "2"])
    assert rc == 0
    step = tmp_path / family / "step_00002"
    assert (step / "SAVE_OK").is_file()
    for role in ("solver", "proposer"):
        assert (step / role / "adapter_config.json").is_file()
        assert (step / role / vlm.ADAPTER_FILE).is_file()
    with open(tmp_path / family / "iter_log.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2] and records[1]["proposer_updated"]


@torch.no_grad()
def test_precomputed_features_match_plain_forward(family_model):
    family, model_dir = family_model
    model, processor = vlm.load_backbone(model_dir, "float32", "cpu", "sdpa")
    policy = vlm.Policy("solver", model, processor)
    image = Image.new("RGB", (128, 96), (30, 120, 200))
    prompt = vlm.make_prompt(policy, image, solver_prompt("How many circles?"))
    assert prompt.image_features is not None  # the path under test
    if family == "qwen3_vl":  # deepstack features must travel with the precomputed output
        assert prompt.image_features.deepstack_features
    ids = processor.tokenizer(["<think>Step 1: count</think><answer>3</answer>",
                               "<answer>seven</answer>"], add_special_tokens=False,
                              padding=True, padding_side="right", return_tensors="pt")
    mask = ids["attention_mask"]
    fast = update.completion_logits(model, prompt, ids["input_ids"], mask)
    p, n = prompt.inputs, mask.shape[0]
    full = model(input_ids=torch.cat([p["input_ids"].expand(n, -1), ids["input_ids"]], 1),
                 attention_mask=torch.cat([p["attention_mask"].expand(n, -1), mask], 1),
                 mm_token_type_ids=torch.cat([p["mm_token_type_ids"].expand(n, -1),
                                              torch.zeros_like(mask)], 1),
                 pixel_values=p["pixel_values"].repeat(n, 1),
                 image_grid_thw=p["image_grid_thw"].repeat(n, 1), use_cache=False).logits
    plain = full[:, prompt.length - 1:-1]
    assert fast.shape == plain.shape
    assert (fast - plain).abs().max().item() < 1e-5
    if family == "qwen3_vl":  # and they matter: without them the logits would be wrong
        feats = prompt.image_features
        feats.deepstack_features = [tuple(torch.zeros_like(t) for t in layer)
                                    for layer in feats.deepstack_features]
        blind = update.completion_logits(model, prompt, ids["input_ids"], mask)
        assert (blind - plain).abs().max().item() > 1e-3
