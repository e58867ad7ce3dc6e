"""The hub layout of the published Qwen2/Qwen2.5-VL checkpoints, which every harness can load.

transformers 5's save_pretrained writes configs that transformers 4.x misreads (a nested
text_config with rope_parameters: 4.x then finds no rope_scaling and crashes on the first forward)
and a processor_config.json in place of preprocessor_config.json. The hub folders instead have a
flat config.json with rope_scaling {"type": "mrope"} and rope_theta, safetensors under the hub key
names (model.layers.*, model.embed_tokens, model.norm, visual.*, lm_head), vocab.json + merges.txt
next to tokenizer.json, preprocessor_config.json and chat_template.json. transformers 4.x (4.51.3,
4.52.4 and 4.57.1 tested) and 5 all read that layout. tiny.py writes its test models this way; export.py keeps a base's files.

    python -m tools.tiny runs/tiny-model        # a tiny Qwen2.5-VL in this layout
"""
from __future__ import annotations

import json
import os

# The files besides the weights that a harness reads from a model folder (each kept if present).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
              "preprocessor_config.json", "video_preprocessor_config.json",
              "processor_config.json", "chat_template.json", "chat_template.jinja")
INDEX = "model.safetensors.index.json"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # Qwen2/2.5-VL normalise with CLIP's statistics
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The transformers_version a config.json records: a 4.x one, as in the published folders.
HUB_TRANSFORMERS_VERSION = "4.49.0"
# Keys of transformers 5 configs that the hub's config.json does not have (the generic
# PretrainedConfig ones are dropped as well).
_V5_ONLY = ("rope_parameters", "layer_types", "torch_dtype")


def hub_key(name: str) -> str:
    """State-dict name of a transformers 5 Qwen2/2.5-VL module -> the hub checkpoints' key."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def hub_config(model, dtype: str) -> dict:
    """config.json as the hub checkpoints have it: text fields flat at the top level."""
    config = model.config
    from transformers import PretrainedConfig
    drop = set(_V5_ONLY) | set(PretrainedConfig().to_dict())
    text = config.text_config.to_dict()
    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or "mrope_section" not in rope:
        raise ValueError(f"hub layout needs default mrope rope parameters, got {rope}")
    flat = {k: v for k, v in text.items() if k not in drop}
    vision = {k: v for k, v in config.vision_config.to_dict().items() if k not in drop}
    top = {k: getattr(config, k) for k in ("image_token_id", "video_token_id",
                                            "vision_start_token_id", "vision_end_token_id")}
    return {"architectures": [type(model).__name__], "model_type": config.model_type, **flat, **top,
            "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": list(rope["mrope_section"])},
            "tie_word_embeddings": bool(config.tie_word_embeddings), "torch_dtype": dtype,
            "transformers_version": HUB_TRANSFORMERS_VERSION, "vision_config": vision}


def write_weights(folder: str, model, shards: int = 2) -> None:
    """Sharded safetensors + index under the hub key names, as the hub folders ship them."""
    from safetensors.torch import save_file
    state = {hub_key(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the hub stores the embedding only
    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(v.numel() * v.element_size() for v in state.values())
    _dump(os.path.join(folder, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tokenizer(folder: str, tokenizer, chat_template: str) -> None:
    """tokenizer.json, the slow tokenizer's vocab.json + merges.txt and a 4.x tokenizer_config."""
    backend = tokenizer.backend_tokenizer
    backend.save(os.path.join(folder, "tokenizer.json"))
    backend.model.save(folder)  # vocab.json + merges.txt: the BPE ids, without added tokens
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                      "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    specials = [t["content"] for t in added.values() if t["special"]]
    _dump(os.path.join(folder, "tokenizer_config.json"), {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in specials if t != "<|endoftext|>"],
        "bos_token": None, "chat_template": chat_template, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})


def write(folder: str, model, tokenizer, chat_template: str, max_pixels: int, dtype: str,
          generation: dict | None = None) -> None:
    """A complete hub-layout folder for a transformers 5 Qwen2/2.5-VL model and its tokenizer;
    `generation`: sampling fields for generation_config.json (the real ones set some)."""
    os.makedirs(folder, exist_ok=True)
    write_weights(folder, model)
    config = model.config
    _dump(os.path.join(folder, "config.json"), hub_config(model, dtype))
    gen = model.generation_config
    _dump(os.path.join(folder, "generation_config.json"), {
        "bos_token_id": gen.bos_token_id, "pad_token_id": gen.pad_token_id, **(generation or {}),
        "eos_token_id": gen.eos_token_id, "transformers_version": HUB_TRANSFORMERS_VERSION})
    write_tokenizer(folder, tokenizer, chat_template)
    processor = type(config).__name__.replace("Config", "Processor")
    vision = config.vision_config
    _dump(os.path.join(folder, "preprocessor_config.json"), {
        "min_pixels": 56 * 56, "max_pixels": max_pixels, "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size, "merge_size": vision.spatial_merge_size,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor})
    _dump(os.path.join(folder, "chat_template.json"), {"chat_template": chat_template})


def weight_keys(folder: str) -> set[str]:
    """Tensor names stored in a folder's safetensors (from the index when sharded)."""
    from safetensors import safe_open
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{folder} has no safetensors weights")
    with safe_open(single, "pt") as f:
        return set(f.keys())


def _dump(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")

