"""Tiny random-weight Qwen-VL checkpoints and synthetic images, for tests, the demo and bench.py.

No download is possible on our machines, so we build a real checkpoint folder locally: a small
Qwen2.5-VL config, random weights, a byte-level BPE tokenizer trained in-process, a Qwen-style
chat template and the real processor. It loads back through `from_pretrained` like a hub model.

    python tiny.py runs/tiny-model      # writes a tiny Qwen2.5-VL to that folder
"""
from __future__ import annotations

import json
import math
import os
import random
import sys

import torch
from PIL import Image, ImageDraw

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
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
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


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Byte-level BPE trained in-process, padded with filler tokens to exactly vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS),
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
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


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen2.5-VL splits the rotary half-dim 1/4 time, 3/8 height, 3/8 width ([16, 24, 24] at 128).
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_tiny_model(out_dir: str, hidden: int = 128, layers: int = 2, intermediate: int = 256,
                     heads: int = 4, kv_heads: int = 2, vocab: int = 1024, vision_depth: int = 2,
                     vision_hidden: int = 64, vision_heads: int = 2, vision_intermediate: int = 128,
                     max_pixels: int = 224 * 224, seed: int = 0) -> str:
    """Write a random-weight Qwen2.5-VL checkpoint folder and return its path."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    if os.path.exists(os.path.join(out_dir, "SAVE_OK")):
        return out_dir
    tokenizer = build_tokenizer(vocab, seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": _mrope_section(hidden // heads)},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden,
                           intermediate_size=vision_intermediate, num_heads=vision_heads,
                           out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1],
                           window_size=112, patch_size=14, spatial_merge_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    gen = model.generation_config
    gen.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gen.pad_token_id = ids["<|endoftext|>"]
    gen.bos_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": max_pixels},
                                            patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=CHAT_TEMPLATE)
    tmp = out_dir.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "SAVE_OK"), "w") as f:
        f.write("tiny qwen2.5-vl\n")
    os.replace(tmp, out_dir)
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
        kind = rng.choice(["square", "triangle", "circle"])
        if kind == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
        elif kind == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    return img


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


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-model"))
