"""What we write loads in the evaluation harnesses. The tiny base is in the hub layout of the real
Qwen2.5-VL checkpoints; a trained checkpoint's solver/ and its merged export, loaded as EvoLMM's
lmms-eval loads them under its pins (transformers 4.57.1 + peft 0.17.1, in .compat/tf4 from
scripts/install_compat.sh), give transformers 5's base + adapter logits.

    bash scripts/install_compat.sh && python -m pytest tests/test_harness.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import compat_logits
from tools import export
from tools import hub_layout
from tools import infer
import train
import vlm
from conftest import ENV, ROOT, train_args
from data_and_utils import UserError
from tools.tiny import build_tiny_model

COMPAT = os.path.join(ROOT, ".compat", "tf4")
QUESTION = "How many bars are there? Step 1: count 12 of them."
HUB_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "vocab.json", "merges.txt", "preprocessor_config.json", "chat_template.json"}


@pytest.fixture(scope="session")
def compat_tf4() -> str:
    """The isolated transformers 4.57.1 + peft 0.17.1; CI installs it, so there it must exist."""
    if not os.path.isfile(os.path.join(COMPAT, "INSTALL_OK")):
        message = f"{COMPAT} is missing: run bash scripts/install_compat.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return COMPAT


@pytest.fixture(scope="module")
def solver_dir(tiny_model, image_dir, tmp_path_factory) -> str:
    """solver/ of the last checkpoint of a real 2-step LoRA run on the hub-layout base."""
    out = str(tmp_path_factory.mktemp("harness-runs"))
    assert train.main(train_args(tiny_model, image_dir, out, "h", steps=2, lr="1e-2",
                                 num_solver_samples=3)) == 0
    return os.path.join(out, "h", "step_00002", "solver")


@pytest.fixture(scope="module")
def exported(tiny_model, solver_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("export") / "merged")
    assert infer.main(["export", "--model", tiny_model, "--adapter", solver_dir, "--out", out]) == 0
    return out


def read_json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def test_tiny_base_is_in_the_hub_layout(tiny_model, tmp_path):
    assert HUB_FILES <= set(os.listdir(tiny_model))
    assert not {"processor_config.json", "chat_template.jinja"} & set(os.listdir(tiny_model))
    config = read_json(tiny_model, "config.json")
    assert "text_config" not in config and "rope_parameters" not in config
    assert config["rope_scaling"]["type"] == "mrope" and config["rope_theta"] > 0
    assert config["torch_dtype"] == "float32" and config["num_hidden_layers"] == 2
    assert read_json(tiny_model, "tokenizer_config.json")["tokenizer_class"] == "Qwen2Tokenizer"
    keys = hub_layout.weight_keys(tiny_model)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "visual.patch_embed.proj.weight", "model.layers.0.self_attn.q_proj.weight"} <= keys
    assert not [k for k in keys if "language_model" in k or k.startswith("model.visual")]
    # Same weights and config as what transformers 5 saves itself, read back through the
    # trainer's from_pretrained: equal logits mean the hub config lost or changed nothing.
    other = build_tiny_model(str(tmp_path / "v5"), layout="transformers5")
    logits = []
    for folder in (tiny_model, other):
        model, processor = vlm.load_backbone(folder, "float32", "cpu", "sdpa")
        ids = processor.tokenizer(["Step 1: 12 red circles"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_tiny_folder_reuse_checks_family_and_layout(tiny_model):
    with pytest.raises(ValueError, match="hub layout"):
        build_tiny_model(tiny_model, layout="transformers5")
    with pytest.raises(ValueError, match="hub"):
        build_tiny_model("unused", family="qwen3_vl", layout="hub")


def test_export_keeps_the_base_layout(tiny_model, exported):
    files = set(os.listdir(exported))
    assert HUB_FILES <= files and "adapter_config.json" not in files
    assert not {"processor_config.json", "chat_template.jinja"} & files
    assert read_json(exported, "config.json") == read_json(tiny_model, "config.json")
    for name in HUB_FILES - {"config.json"}:
        with open(os.path.join(exported, name), "rb") as a, \
                open(os.path.join(tiny_model, name), "rb") as b:
            assert a.read() == b.read(), name
    assert hub_layout.weight_keys(exported) == hub_layout.weight_keys(tiny_model)


def test_export_in_another_dtype_records_it(tiny_model, solver_dir, tmp_path):
    out = str(tmp_path / "bf16")
    assert infer.main(["export", "--model", tiny_model, "--adapter", solver_dir, "--out", out,
                       "--dtype", "bfloat16"]) == 0
    config, base = read_json(out, "config.json"), read_json(tiny_model, "config.json")
    assert config.pop("torch_dtype") == "bfloat16"
    base.pop("torch_dtype")
    assert config == base
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_export_refuses_weights_named_unlike_the_base(tiny_model, solver_dir, tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(tiny_model, base)
    index = read_json(base, hub_layout.INDEX)
    index["weight_map"]["model.norm.renamed"] = index["weight_map"].pop("model.norm.weight")
    with open(os.path.join(base, hub_layout.INDEX), "w") as f:
        json.dump(index, f)
    merged = export.merge(tiny_model, solver_dir, "float32", "cpu")
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="not named as"):
        export.write(merged, base, read_json(base, "config.json"), out)
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp-export")


def logits_in_compat(jobs: dict, image: str, tmp_path) -> dict:
    """tests/compat_logits.py in a subprocess that imports the compat folder's packages first."""
    spec, out = str(tmp_path / "jobs.json"), str(tmp_path / "logits.pt")
    with open(spec, "w") as f:
        json.dump({"image": image, "question": QUESTION, "jobs": jobs}, f)
    path = os.pathsep.join(p for p in (COMPAT, ENV.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "compat_logits.py"), spec,
                           out], env={**ENV, "PYTHONPATH": path}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_transformers_4_57_loads_export_and_adapter_like_transformers_5(
        compat_tf4, tiny_model, solver_dir, exported, image_dir, tmp_path):
    """(a) the export, (b) solver/ through PeftModel.from_pretrained onto the hub-layout base
    (EvoLMM's qwen2_5_vl_our), both under EvoLMM's pins == transformers 5 base + adapter."""
    image = os.path.join(image_dir, "charts", "img_000.png")  # 224 px: no resize to differ
    jobs = {"export": {"model": exported}, "adapter": {"model": tiny_model, "adapter": solver_dir}}
    old = logits_in_compat(jobs, image, tmp_path)
    assert old["versions"] == {"transformers": "4.57.1", "peft": "0.17.1"}
    pil = Image.open(image).convert("RGB")  # the same harness code, here under transformers 5
    new = {name: compat_logits.run_job(job, pil, QUESTION)
           for name, job in {**jobs, "base": {"model": tiny_model}}.items()}
    reference = new["adapter"]["logits"]
    for name in ("export", "adapter"):
        run = old[name]
        assert run["rope"]["mrope_section"] == read_json(tiny_model, "config.json")[
            "rope_scaling"]["mrope_section"]
        assert run["slow_class"] == "Qwen2Tokenizer" and run["slow_ids"] == run["text_ids"]
        assert torch.equal(run["input_ids"], new["adapter"]["input_ids"])
        assert (run["logits"] - reference).abs().max().item() < 1e-4, name
    assert (new["export"]["logits"] - reference).abs().max().item() < 1e-4
    assert (new["base"]["logits"] - reference).abs().max().item() > 1e-3  # the adapter shows
