"""The learning demo's toy task and its warm-started tiny Solver/Proposer.

Task: "What color is the shape?" on small generated images (one circle, square or triangle in
red, green or blue on white). A short supervised warm start of a tiny random Qwen2.5-VL
teaches it the answer format and the Proposer's question, then soft labels teach it doubt: the
Solver ends right only about half the time, with the right colour still its most likely answer.
Majority self-consistency on unlabeled images can then sharpen it toward its own majority, which
is mostly the truth. Nothing after the warm start sees a label.

    python -m tools.demo runs          # build (or reuse) the warm-started model and the demo data
    python run.py                # the whole demo: eval, train, eval, table, curves
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from PIL import Image, ImageDraw

from data_and_utils import proposer_prompt, solver_prompt
from tools.tiny import build_tiny_model, draw_shape

QUESTION = "What color is the shape?"
# One colour per RGB channel. With yellow (red + green) as a fourth, the warm-started model
# confused it with red and green, and self-training on some seeds spread yellow over them.
COLORS = {"red": (230, 0, 0), "green": (0, 190, 0), "blue": (0, 0, 230)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 168           # 36 image tokens: enough for the colour to be found quickly
MAX_PIXELS = IMAGE_SIZE * IMAGE_SIZE
RADIUS = (0.3, 0.45)  # of the image side: the shape covers much of it
BUILD_VERSION = 1          # bump when the warm start below changes in a way the key cannot see


@dataclass
class WarmStart:
    """The supervised warm start. Its fields (and the prompts) key the model cache."""
    # True labels until it sees the colour: the loss (mean of the last 10 steps) drops to ~0.03
    # once the colour follows the image (the rest is the shape, learned much later); before,
    # it sits on a plateau of 0.05-0.1 whose length varies from run to run.
    clean_min_steps: int = 40
    clean_max_steps: int = 250
    clean_loss: float = 0.04
    batch: int = 8             # images per clean step (plus two proposer examples)
    lr: float = 3e-3
    soft_steps: int = 20       # then steps on soft labels, at soft_lr: it learns to doubt
    soft_images: int = 2       # images per soft step, each with every colour as a target
    soft_lr: float = 3e-4
    confidence: float = 0.55   # soft-label weight of the true colour; the others share the rest
    seed: int = 0


# ---------------------------------------------------------------- images and data
def draw_scene(rng: random.Random, size: int = 0) -> tuple[Image.Image, str, str]:
    """One coloured shape on white: (image, colour, shape)."""
    size = size or IMAGE_SIZE
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    r = rng.randint(int(size * RADIUS[0]), int(size * RADIUS[1]))
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    draw_shape(draw, shape, x, y, r, COLORS[color])
    return img, color, shape


def image_key(img: Image.Image) -> str:
    return hashlib.sha1(img.tobytes()).hexdigest()


def make_task_data(root: str, n_unlabeled: int = 256, n_eval: int = 64, seed: int = 1) -> dict:
    """Unlabeled training images (root/unlabeled/shapes/) and a labeled held-out set
    (root/eval/eval.jsonl), disjoint by content. Returns their paths and image keys."""
    paths = {"unlabeled": os.path.join(root, "unlabeled"),
             "eval": os.path.join(root, "eval", "eval.jsonl")}
    done = os.path.join(root, "DATA_OK")
    if not os.path.exists(done):
        tmp = root.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "unlabeled", "shapes"))
        os.makedirs(os.path.join(tmp, "eval", "images"))
        rng, seen, keys = random.Random(seed), set(), []
        rows = []
        while len(keys) < n_unlabeled + n_eval:
            img, color, _ = draw_scene(rng)
            key = image_key(img)
            if key in seen:
                continue
            seen.add(key)
            keys.append(key)
            i = len(keys) - 1
            if i < n_unlabeled:  # no label is written for these
                img.save(os.path.join(tmp, "unlabeled", "shapes", f"img_{i:04d}.png"))
            else:
                name = f"images/eval_{i - n_unlabeled:04d}.png"
                img.save(os.path.join(tmp, "eval", name))
                rows.append({"image": name, "question": QUESTION, "answer": color})
        with open(os.path.join(tmp, "eval", "eval.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(tmp, "keys.json"), "w") as f:
            json.dump(keys, f)
        with open(os.path.join(tmp, "DATA_OK"), "w") as f:
            f.write("ok\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    with open(os.path.join(root, "keys.json")) as f:
        paths["keys"] = set(json.load(f))
    return paths


# ---------------------------------------------------------------- warm start
def solver_target(color: str, shape: str) -> str:
    return f"<think>Step 1: a {shape}.\nStep 2: it is {color}.</think><answer>{color}</answer>"


PROPOSER_TARGET = (f"<question>{QUESTION}</question> "
                   "<rationale>The answer needs the image.</rationale>")


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def task_key() -> str:
    """Changes whenever the images would."""
    return _hash({"colors": COLORS, "shapes": SHAPES, "size": IMAGE_SIZE, "radius": RADIUS,
                  "version": BUILD_VERSION})


def cache_key(ws: WarmStart) -> str:
    """Changes whenever a prompt text, the task or the warm-start recipe does."""
    return _hash({"solver": solver_prompt(QUESTION), "proposer": proposer_prompt(),
                  "target": solver_target("red", "circle"), "q": PROPOSER_TARGET,
                  "task": task_key(), **asdict(ws)})


def _chat(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _batch(processor, examples: list[tuple[Image.Image, str, str]]) -> tuple[dict, torch.Tensor]:
    """examples: (image, prompt, target). Inputs padded on the left, so every target ends at the
    last position; returns them and the target ids [B, K] (-100 left of a shorter target)."""
    tok = processor.tokenizer
    texts = [_chat(processor, p) + t + tok.eos_token for _, p, t in examples]
    inputs = processor(text=texts, images=[img for img, _, _ in examples], padding=True,
                       padding_side="left", return_tensors="pt")
    lengths = [len(tok(t + tok.eos_token, add_special_tokens=False)["input_ids"])
               for _, _, t in examples]
    k = max(lengths)
    labels = inputs["input_ids"][:, -k:].clone()
    for row, n in enumerate(lengths):
        labels[row, :k - n] = -100
    return inputs, labels


def _loss(model, inputs: dict, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over examples of each target's mean token cross-entropy; the vocabulary
    projection runs at target positions only."""
    k = labels.shape[1]
    logits = model(**inputs, logits_to_keep=k + 1).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels,
                                           ignore_index=-100, reduction="none")
    per_example = ce.sum(1) / (labels != -100).sum(1).clamp(min=1)
    return (per_example * weights).sum() / weights.sum()


def _scenes(rng: random.Random, exclude: set, n: int) -> list:
    out = []
    while len(out) < n:
        img, color, shape = draw_scene(rng)
        if image_key(img) not in exclude:  # never train on a demo training or evaluation image
            out.append((img, color, shape))
    return out


def _clean_examples(rng: random.Random, exclude: set, n: int) -> list:
    """(image, prompt, target, weight) with the true colour."""
    return [(img, solver_prompt(QUESTION), solver_target(color, shape), 1.0)
            for img, color, shape in _scenes(rng, exclude, n)]


def _soft_examples(rng: random.Random, exclude: set, n: int, confidence: float) -> list:
    """Each image with every colour as its target, weighted: a soft label, balanced over the
    colours in every batch, so the doubt it teaches carries no bias toward any colour."""
    out = []
    for img, truth, shape in _scenes(rng, exclude, n):
        for color in sorted(COLORS):
            weight = confidence if color == truth else (1 - confidence) / (len(COLORS) - 1)
            out.append((img, solver_prompt(QUESTION), solver_target(color, shape), weight))
    return out


def _proposer_examples(rng: random.Random, n: int = 2) -> list:
    """The Proposer's question needs little: a few examples per step."""
    return [(draw_scene(rng)[0], proposer_prompt(), PROPOSER_TARGET, 1.0) for _ in range(n)]


def _train_step(model, processor, opt, examples: list) -> float:
    inputs, labels = _batch(processor, [e[:3] for e in examples])
    loss = _loss(model, inputs, labels, torch.tensor([e[3] for e in examples]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def warm_start(base_dir: str, out_dir: str, ws: WarmStart, exclude: set) -> None:
    """Full supervised fine-tune of the tiny model, true then soft labels; writes out_dir
    atomically."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    torch.manual_seed(ws.seed)
    rng = random.Random(ws.seed)
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(base_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.0)
    model.train()
    t0, recent = time.time(), []
    for step in range(1, ws.clean_max_steps + 1):
        loss = _train_step(model, processor, opt, _clean_examples(rng, exclude, ws.batch)
                           + _proposer_examples(rng))
        recent = (recent + [loss])[-10:]
        if step % 20 == 0:
            print(f"warm start: true labels, step {step}, loss {loss:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if step >= ws.clean_min_steps and sum(recent) / len(recent) < ws.clean_loss:
            break
    seen = sum(recent) / len(recent) < ws.clean_loss
    print(f"warm start: {'sees' if seen else 'still does not see'} the colour after {step} "
          f"steps; {ws.soft_steps} soft-label steps follow", flush=True)
    # A fresh optimizer: Adam's moments from the near-zero clean loss would turn the first
    # soft-label gradients into huge steps.
    opt = torch.optim.AdamW(model.parameters(), lr=ws.soft_lr, weight_decay=0.0)
    for _ in range(ws.soft_steps):
        loss = _train_step(model, processor, opt, _proposer_examples(rng) + _soft_examples(
            rng, exclude, ws.soft_images, ws.confidence))
    print(f"warm start: done, loss {loss:.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    # Explicit sampling settings: plain softmax sampling, whatever the library defaults are.
    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.top_p = True, 1.0, 1.0
    gen.top_k, gen.repetition_penalty = 0, 1.0
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "SAVE_OK"), "w") as f:
        f.write("tiny qwen2_5_vl\n")
    os.replace(tmp, out_dir)


def build_demo(root: str = "runs", ws: WarmStart | None = None) -> dict:
    """Data and the warm-started model under root/, reused while the prompts and the recipe are
    unchanged. Returns {"model", "unlabeled", "eval"} paths."""
    ws = ws or WarmStart()
    data = make_task_data(os.path.join(root, f"demo-data-{task_key()}"))
    model_dir = os.path.join(root, f"demo-model-{cache_key(ws)}")
    if not os.path.exists(os.path.join(model_dir, "SAVE_OK")):
        print(f"demo: warm-starting a tiny Qwen2.5-VL on '{QUESTION}' -> {model_dir}", flush=True)
        base = build_tiny_model(os.path.join(root, "demo-base"))
        warm_start(base, model_dir, ws, data["keys"])
    return {"model": model_dir, "unlabeled": data["unlabeled"], "eval": data["eval"]}


# ---------------------------------------------------------------- train and evaluate
@dataclass
class DemoRun:
    """The self-training run: flags chosen so the tiny model learns in a few CPU minutes.
    images_per_step 4: each update averages four images' majorities, so the shared-bias drift
    toward one image's colour (README) averages out; with one image per step the gain in accuracy
    varied from seed to seed and machine to machine about as much as its size."""
    steps: int = 96
    images_per_step: int = 4
    seed: int = 1
    lr: float = 1e-3
    kl_coef: float = 0.5
    samples: int = 5
    max_new_tokens: int = 32
    eval_seed: int = 0
    val_every: int = 24        # held-out validation while training (docs/demo.md: its cost)


def train_args(paths: dict, root: str, name: str, run: DemoRun) -> list[str]:
    """`train.py` flags for the demo (see docs/demo.md: what they change and why)."""
    flags = {"data_dir": paths["unlabeled"], "solver_model": paths["model"],
             "proposer_model": paths["model"], "dtype": "float32", "device_map": "cpu",
             "output_dir": root, "wandb_run_name": name, "total_steps": run.steps,
             "images_per_step": run.images_per_step,
             "save_every": max(1, run.steps // 4), "seed": run.seed, "lr": run.lr,
             "num_solver_samples": run.samples, "max_new_tokens_solver": run.max_new_tokens,
             "max_new_tokens_proposer": 32, "max_pixels": MAX_PIXELS, "baseline": "group",
             "proposer_update_freq": 4, "lora_dropout": 0.0,
             "kl_coef": run.kl_coef, "kl_adapt_rate": 0.0,
             # validation on the held-out set: it restores the training RNG, so the run is the
             # one it would be without it
             "val_data": paths["eval"], "val_every": run.val_every, "val_samples": run.samples}
    args = ["--use_lora_solver", "--use_lora_proposer"]
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    return args


def evaluate(paths: dict, adapter: str | None, out: str, run: DemoRun) -> dict:
    """The held-out set through `run.py eval` (infer.py); returns its metrics, plus the accuracy
    over all N samples per image (a lower-variance estimate of single-sample accuracy)."""
    from tools import infer
    argv = ["eval", "--model", paths["model"], "--adapter", adapter or "none",
            "--data", paths["eval"], "--samples", str(run.samples),
            "--max_new_tokens", str(run.max_new_tokens), "--max_pixels", str(MAX_PIXELS),
            "--seed", str(run.eval_seed), "--out", out]
    if infer.main(argv) != 0:
        raise RuntimeError(f"run.py {' '.join(argv)} failed")
    return summarize(out)


def summarize(results_path: str) -> dict:
    from tools import infer
    from data_and_utils import normalize_answer
    keys = {"acc": "correct_first", "maj": "correct_majority", "agreement": "agreement",
            "step_agreement": "step_agreement"}
    sums, n = {k: 0.0 for k in [*keys, "acc_all"]}, 0
    with open(results_path) as f:
        for line in f:
            rec = json.loads(line)
            (res,) = rec["results"].values()
            gold = infer.gold_forms(infer.Row(rec["line"], rec["image"], rec["question"],
                                              rec["answer"]))
            for k, field in keys.items():
                sums[k] += float(res[field])
            right = [normalize_answer(a) in gold for a in res["answers"]]
            sums["acc_all"] += sum(right) / len(right)
            n += 1
    return {k: v / max(n, 1) for k, v in sums.items()} | {"rows": n}


ROWS = [("acc", "accuracy, first sample (eval's acc)"), ("acc_all", "accuracy, all samples"),
        ("maj", "majority@N (eval's maj@N)"), ("agreement", "answer agreement"),
        ("step_agreement", "step agreement")]


def table(before: dict, after: dict) -> str:
    head = f"held-out ({before['rows']} images)"
    lines = [f"{head:38s} {'before':>7s} {'after':>7s} {'change':>7s}"]
    for key, title in ROWS:
        b, a = before[key], after[key]
        lines.append(f"{title:38s} {b:7.3f} {a:7.3f} {a - b:+7.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(build_demo(sys.argv[1] if len(sys.argv) > 1 else "runs")["model"])
