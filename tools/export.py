"""Merge a trained Solver's LoRA into its base model and write a folder that evaluation harnesses
load as a plain model (upstream lmms-eval's `--model qwen2_5_vl --model_args pretrained=<out>`).

    python run.py export --model Qwen/Qwen2.5-VL-7B-Instruct \
        --adapter runs/<run>/step_N/solver --out merged-solver/

The folder is the base checkpoint's own layout with merged weights: the same safetensors key
names (checked), the base's config.json with its dtype set to the export's, and the base's
tokenizer, processor, chat template and generation files copied unchanged. For the published
Qwen2/2.5-VL checkpoints that is the hub layout (hub_layout.py), which transformers 4.52-4.57
and 5.x both load with the same logits as base + adapter (tests/test_harness.py).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil

from runtime import atomic_dir
from distributed import UserError, first_line
from tools.hub_layout import INDEX, SIDE_FILES, weight_keys

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def base_folder(model: str) -> str:
    """The base's local folder: itself, or its hub snapshot without the weight shards (the
    from_pretrained before has fetched those into the same cache)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model, allow_patterns=[*SIDE_FILES, INDEX, "model.safetensors"])
    except (OSError, ValueError) as e:  # offline without a cache, unknown repo, bad id
        raise UserError(f"cannot fetch the files of {model}: {first_line(e)}") from e


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def saved_dtype(config: dict) -> str:
    """The dtype a config.json records (transformers 4.x: torch_dtype, 5.x: dtype); float32, as
    transformers loads it, when it records none."""
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    if name not in DTYPE_NAMES:
        raise UserError(f"config.json records dtype {name!r}; pass --dtype, one of {DTYPE_NAMES}")
    return name


def with_dtype(config: dict, dtype: str) -> dict:
    """config.json with every dtype entry it has (top level and sub-configs) set to dtype."""
    out = dict(config)
    for key in ("torch_dtype", "dtype"):
        if key in out or (key == "torch_dtype" and "dtype" not in out):
            out[key] = dtype
    for name, sub in list(out.items()):
        if isinstance(sub, dict) and any(k in sub for k in ("torch_dtype", "dtype")):
            out[name] = {k: dtype if k in ("torch_dtype", "dtype") else v for k, v in sub.items()}
    return out


def merge(model: str, adapter: str, dtype: str, device: str):
    """The base with the adapter merged in (a plain transformers model)."""
    from peft import PeftModel

    import vlm
    base, _ = vlm.load_backbone(model, dtype, device, "sdpa")  # its failures are one line
    try:
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as e:
        # UnpicklingError: a pickled adapter_model.bin, refused by weights_only loading
        raise UserError(f"cannot load adapter {adapter} onto {model}: {first_line(e)}") from e


def write(merged, base_dir: str, config: dict, out: str) -> list[str]:
    """Merged weights + the base's side files into out (complete or absent); the copied names."""
    try:
        with atomic_dir(out, out.rstrip("/") + ".tmp-export") as tmp:
            merged.save_pretrained(tmp)
            written, expected = weight_keys(tmp), weight_keys(base_dir)
            if written != expected:
                odd = sorted(written ^ expected)[:3]
                raise UserError(f"merged weights are not named as {base_dir}'s (e.g. {odd}); "
                                "harnesses would load them wrongly")
            copied = [name for name in SIDE_FILES if os.path.isfile(os.path.join(base_dir, name))]
            for name in ("config.json", "generation_config.json"):  # transformers 5's: the base's win
                os.remove(os.path.join(tmp, name))
            for name in copied:
                if name != "config.json":
                    shutil.copyfile(os.path.join(base_dir, name), os.path.join(tmp, name))
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
                f.write("\n")
    except OSError as e:
        raise UserError(f"writing {out} failed: {first_line(e)}") from e
    return copied


def hub_readable(config: dict, files: list[str]) -> bool:
    """Whether transformers 4.x can run the folder: flat rope_scaling and preprocessor_config."""
    return ("rope_scaling" in config or "text_config" in config and
            "rope_scaling" in config["text_config"]) and "preprocessor_config.json" in files


def export(model: str, adapter: str, out: str, dtype: str = "auto", device: str = "cpu") -> int:
    """`run.py export`: dtype "auto" keeps the base checkpoint's own dtype."""
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        what = "does not exist" if not os.path.exists(adapter) else \
            "is not a LoRA adapter folder (no adapter_config.json): a full model loads directly"
        raise UserError(f"adapter {adapter} {what}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out} already exists; pick a new folder")
    base_dir = base_folder(model)
    base_config = read_config(base_dir)
    dtype = saved_dtype(base_config) if dtype == "auto" else dtype
    merged = merge(model, adapter, dtype, device)
    config = with_dtype(base_config, dtype)
    copied = write(merged, base_dir, config, out)
    print(f"merged model ({dtype}) written to {out}, with {', '.join(copied)} from {model}")
    if not hub_readable(config, copied):
        print(f"note: {model} is in the transformers 5 layout, so the export is too: it loads in "
              "transformers 5 only (the hub checkpoints' layout loads in 4.52+ as well)")
    return 0

