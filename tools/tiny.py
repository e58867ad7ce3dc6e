"""Tiny random-weight Qwen-VL checkpoints and synthetic images, for tests, the demo and scripts/bench.py.

Tests build a real checkpoint folder locally instead of downloading one: a small Qwen2-VL,
Qwen2.5-VL or Qwen3-VL config, random weights, a byte-level BPE tokenizer with Qwen2's
pre-tokenizer trained in-process, a Qwen-style chat template and the real processor. It loads back
through `from_pretrained` like a hub model.

Qwen2/2.5-VL folders are written in the hub layout of the real checkpoints (what users download):
a flat transformers-4.x config.json with rope_scaling {"type": "mrope"} and rope_theta, sharded
safetensors with the hub key names (model.layers.*, visual.*, lm_head.*) and an index, vocab.json,
merges.txt, tokenizer.json, tokenizer_config.json, preprocessor_config.json, chat_template.json and
generation_config.json. layout="transformers5" writes what transformers 5's save_pretrained writes.

    python -m tools.tiny runs/tiny-model             # writes a tiny Qwen2.5-VL (hub layout) to that folder
    python -m tools.tiny runs/tiny-q3 --family qwen3_vl   # or qwen2_vl: another generation
    python -m tools.tiny runs/tiny-real --real_generation_config   # Qwen2.5-VL-7B-Instruct's sampling values
    python -m tools.tiny --help
"""
from __future__ import annotations

import json
import os
import random
import sys

import torch
from PIL import Image, ImageDraw

import cli
from runtime import atomic_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL-style chat template (system turn, image placeholders, generation prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = ("the a of and to in is what how many which color shape chart bar value image step answer "
         "think question rationale count red green blue yellow circle square triangle largest "
         "smallest left right top bottom number total sum difference there are objects first "
         "second third then so because therefore final").split()


def _corpus(seed: int, n_words: int = 40000) -> list[str]:
    """Text to train the BPE on: our prompt vocabulary, numbers, tags and pseudo-words."""
    rng = random.Random(seed)
    lines = ["Look at the image and ask one question. <question>How many circles?</question> "
             "<rationale>Counting needs care.</rationale>",
             "Answer the question. Reason in numbered steps inside <think></think>, then give the "
             "final answer inside <answer></answer>."]
    lines += [f"Step {i}: {i} {i * 7} <think> </think> <answer>{i}</answer>" for i in range(200)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(n_words // 10):
        words = [rng.choice(WORDS) if rng.random() < 0.5 else
                 "".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(10)]
        lines.append(" ".join(words))
    return lines


# Qwen2's pre-tokenizer split: the real tokenizer.json and the slow Qwen2Tokenizer (vocab.json +
# merges.txt) both use it, so fast and slow tokenizers give the same ids. Digits split one by one.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Byte-level BPE trained in-process, then the special tokens after the BPE ids (as in the real
    Qwen vocabulary), then filler tokens up to exactly vocab_size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", padding_side="left",
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>"})
    # The model samples every id in its vocabulary, so every id must decode to something.
    missing = vocab_size - len(fast)
    if missing < 0:
        raise ValueError(f"tokenizer needs {len(fast)} ids, more than vocab_size={vocab_size}")
    fast.add_tokens([f"<|filler_{i}|>" for i in range(missing)])
    assert len(fast) == vocab_size
    return fast


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _mrope_section(head_dim: int, family: str) -> list[int]:
    """Rotary half-dim split into (time, height, width) in the real models' proportions."""
    half = head_dim // 2
    if family == "qwen3_vl":
        # Qwen3-VL interleaves the axes and uses [24, 20, 20] of 64: h = w = 5/16 of the half.
        h = half * 5 // 16
        return [half - 2 * h, h, h]
    # Qwen2/2.5-VL: 1/4 time, 3/8 height, 3/8 width ([16, 24, 24] at 128).
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _family_configs(family: str, ids: dict, hidden: int, layers: int, intermediate: int,
                    heads: int, kv_heads: int, vocab: int, vision_depth: int, vision_hidden: int,
                    vision_heads: int, vision_intermediate: int) -> tuple[dict, dict]:
    """(text_config, vision_config) kwargs; the vision field names differ per generation."""
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": _mrope_section(hidden // heads, family)}
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rope_parameters=rope,
                pad_token_id=ids["<|endoftext|>"])
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True
        text["head_dim"] = hidden // heads  # its default is 128, not hidden // heads
        # Deepstack adds the first vision layer's features to the first LM layer as well.
        vision = dict(depth=vision_depth, hidden_size=vision_hidden,
                      intermediate_size=vision_intermediate, num_heads=vision_heads,
                      out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
                      num_position_embeddings=256, deepstack_visual_indexes=[0])
        return text, vision
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    if family == "qwen2_vl":
        # Qwen2-VL: embed_dim is the vision width, hidden_size the merger's output (= LM width).
        vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden,
                      mlp_ratio=vision_intermediate // vision_hidden, num_heads=vision_heads,
                      patch_size=14, spatial_merge_size=2)
    else:
        vision = dict(depth=vision_depth, hidden_size=vision_hidden,
                      intermediate_size=vision_intermediate, num_heads=vision_heads,
                      out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1],
                      window_size=112, patch_size=14, spatial_merge_size=2)
    return text, vision


def _family_classes(family: str):
    """(config, model, processor, video processor) classes and the vision patch size."""
    import transformers as T
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    if family == "qwen2_vl":
        return (T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, T.Qwen2VLProcessor,
                Qwen2VLVideoProcessor, 14)
    if family == "qwen2_5_vl":
        return (T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLProcessor,
                Qwen2VLVideoProcessor, 14)
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    return (T.Qwen3VLConfig, T.Qwen3VLForConditionalGeneration, T.Qwen3VLProcessor,
            Qwen3VLVideoProcessor, 16)


LAYOUTS = ("hub", "transformers5")
# The sampling values of the hub's Qwen/Qwen2.5-VL-7B-Instruct generation_config.json (its bos,
# pad and eos are <|endoftext|>, <|endoftext|> and [<|im_end|>, <|endoftext|>], which every tiny
# model sets with its own ids). HF generate merges them into any call that leaves them unset:
# top_k 1 is greedy.
QWEN2_5_VL_7B_GENERATION = {"do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
                            "repetition_penalty": 1.05}


def _read_marker(out_dir: str) -> tuple[str, str] | None:
    """(family, layout) of a complete tiny folder, None if there is none."""
    marker = os.path.join(out_dir, "SAVE_OK")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        words = f.read().split()[1:]  # "tiny <family> [<layout>]"
    family = {"qwen2.5-vl": "qwen2_5_vl"}.get(words[0], words[0])  # marker of older builds
    return family, words[1] if len(words) > 1 else "transformers5"


def build_tiny_model(out_dir: str, hidden: int = 128, layers: int = 2, intermediate: int = 256,
                     heads: int = 4, kv_heads: int = 2, vocab: int = 1024, vision_depth: int = 2,
                     vision_hidden: int = 64, vision_heads: int = 2, vision_intermediate: int = 128,
                     max_pixels: int = 224 * 224, seed: int = 0, family: str = "qwen2_5_vl",
                     fullatt_block_indexes: list[int] | None = None,
                     dtype: str = "float32", layout: str | None = None,
                     generation: dict | None = None, device: str = "cpu") -> str:
    """Write a random-weight Qwen-VL checkpoint folder of the given generation (one of FAMILIES)
    and return its path. An existing complete folder is reused if it is of the same family (and
    of the layout asked for, if one is). layout: "hub" (default for Qwen2/2.5-VL: as the real
    checkpoints are published) or "transformers5" (the only one for Qwen3-VL). fullatt_block_indexes (Qwen2.5-VL: vision blocks
    with full, not windowed, attention; default the last) and dtype (of the saved weights) let
    scripts/bench.py build the real 3B shapes. `generation`: sampling fields written into
    generation_config.json (e.g. QWEN2_5_VL_7B_GENERATION), next to bos, eos and pad. `device`
    other than cpu: the weights are initialized there (other random values than on the CPU)."""
    from transformers import Qwen2VLImageProcessor
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    asked, layout = layout, layout or ("transformers5" if family == "qwen3_vl" else "hub")
    if layout not in LAYOUTS or (layout == "hub" and family == "qwen3_vl"):
        raise ValueError(f"layout must be one of {LAYOUTS} (hub: Qwen2/2.5-VL only), got {layout!r}")
    found = _read_marker(out_dir)
    if found is not None:
        if found[0] != family or (asked and found[1] != layout):
            raise ValueError(f"{out_dir} already holds a tiny {found[0]} model in the {found[1]} "
                             f"layout, not {family} in the {layout} layout")
        return out_dir
    config_cls, model_cls, processor_cls, video_cls, patch = _family_classes(family)
    tokenizer = build_tokenizer(vocab, seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text, vision = _family_configs(family, ids, hidden, layers, intermediate, heads, kv_heads,
                                   vocab, vision_depth, vision_hidden, vision_heads,
                                   vision_intermediate)
    if fullatt_block_indexes is not None and family == "qwen2_5_vl":
        vision["fullatt_block_indexes"] = list(fullatt_block_indexes)
    config = config_cls(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    if device == "cpu":
        model = model_cls(config).to(getattr(torch, dtype))
    else:  # built where it runs, in its dtype: a 7B model in seconds (scripts/gpu_check.py)
        with torch.device(device):
            model = model_cls._from_config(config, dtype=getattr(torch, dtype))
    gen = model.generation_config
    gen.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gen.pad_token_id = ids["<|endoftext|>"]
    gen.bos_token_id = ids["<|endoftext|>"]
    for name, value in (generation or {}).items():
        setattr(gen, name, value)
    with atomic_dir(out_dir, out_dir.rstrip("/") + ".tmp") as tmp:
        if layout == "hub":
            from tools import hub_layout
            hub_layout.write(tmp, model, tokenizer, CHAT_TEMPLATE, max_pixels, dtype, generation)
        else:
            # Qwen3-VL normalises pixels to [-1, 1]; the older generations use the CLIP statistics.
            norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if family == "qwen3_vl" else {}
            image_processor = Qwen2VLImageProcessor(
                size={"shortest_edge": 56 * 56, "longest_edge": max_pixels}, patch_size=patch,
                merge_size=2, temporal_patch_size=2, **norm)
            processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                                      video_processor=video_cls(), chat_template=CHAT_TEMPLATE)
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "SAVE_OK"), "w") as f:
            f.write(f"tiny {family} {layout}\n")
    return out_dir


# ---------------------------------------------------------------- synthetic images
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (230, 200, 30)}


def _counting_scene(rng: random.Random, size: int) -> tuple[Image.Image, int]:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    count = rng.randint(1, 6)
    for _ in range(count):
        r = rng.randint(size // 16, size // 9)
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rng.choice(list(COLORS.values())))
    return img, count


def _bar_chart(rng: random.Random, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    bars = rng.randint(3, 6)
    width = size // (bars + 1)
    for i in range(bars):
        height = rng.randint(size // 10, size - 20)
        x0 = 10 + i * width
        draw.rectangle([x0, size - 10 - height, x0 + width - 6, size - 10],
                       fill=rng.choice(list(COLORS.values())))
        draw.text((x0, size - 10 - height - 12), str(height), fill=(0, 0, 0))
    return img


def _shapes(rng: random.Random, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):
        x, y, r = rng.randint(20, size - 20), rng.randint(20, size - 20), rng.randint(8, size // 6)
        color = rng.choice(list(COLORS.values()))
        draw_shape(draw, rng.choice(["square", "triangle", "circle"]), x, y, r, color)
    return img


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, r: int, fill) -> None:
    """A square, triangle or (any other kind) circle of half-size r centred at (x, y)."""
    if kind == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif kind == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def make_synthetic_images(out_dir: str, n: int = 12, seed: int = 0, size: int = 224) -> str:
    """Charts, shapes and counting scenes in two subfolders (the layout the loader expects)."""
    rng = random.Random(seed)
    for sub in ("charts", "scenes"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            img, sub = _bar_chart(rng, size), "charts"
        elif kind == 1:
            img, sub = _shapes(rng, size), "scenes"
        else:
            img, sub = _counting_scene(rng, size)[0], "scenes"
        img.save(os.path.join(out_dir, sub, f"img_{i:03d}.png"))
    return out_dir


def make_counting_eval_set(out_dir: str, n: int = 8, seed: int = 1, size: int = 224) -> str:
    """A small labeled set for `run.py eval`: counting scenes with their true counts."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "counting.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            img, count = _counting_scene(rng, size)
            name = f"images/count_{i:03d}.png"
            img.save(os.path.join(out_dir, name))
            f.write(json.dumps({"image": name, "question": "How many circles are in the image?",
                                "answer": str(count)}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m tools.tiny",
                                description="Write a tiny random-weight Qwen-VL checkpoint folder.")
    p.add_argument("out", nargs="?", default="runs/tiny-model",
                   help="folder to write (an existing complete one of the same kind is reused; "
                        "default: %(default)s)")
    p.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl", help="default: %(default)s")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="hub (Qwen2/2.5-VL default) or transformers5 (Qwen3-VL's only one)")
    p.add_argument("--seed", type=int, default=0, help="weights and tokenizer seed")
    p.add_argument("--real_generation_config", action="store_true",
                   help="write Qwen2.5-VL-7B-Instruct's sampling values into generation_config.json "
                        f"({', '.join(f'{k} {v}' for k, v in QWEN2_5_VL_7B_GENERATION.items())})")
    args = cli.parse_or_exit(p, argv)
    try:
        print(build_tiny_model(args.out, seed=args.seed, family=args.family, layout=args.layout,
                               generation=QWEN2_5_VL_7B_GENERATION if args.real_generation_config
                               else None))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
