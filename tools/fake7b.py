"""The memory plan at real shapes, without the memory: a Qwen2.5-VL model of a shipped config
(default 7B) built under FakeTensorMode on a fake cuda:0, LoRA r16 on both roles, and the
update's forward, loss and KL (update.py's own functions) tracked by torch's MemTracker.

A backward on fake CUDA tensors needs a CUDA context, which a CPU machine has not: the tracker
sees the reference pass, the policy forward with everything it saves for backward, the
vocabulary-sized log-softmax/KL tensors and the loss. The comparison is with the plan's
forward part: its activations and the five [rows, L, V] tensors alive at the loss (logits,
reference log-probs, log-softmax, exp, KL difference), without the backward's gradients.

    python -m tools.fake7b --images 1,8
"""
from __future__ import annotations

import argparse
import sys

import torch

import memplan
from config import Config
from tools.memcheck import tracker

IMAGE_GRID = (1, 64, 80)  # t, h, w in patches: 64 * 80 / 4 = 1,280 image tokens (1120 x 896 px)


def _to_fake_cuda(model: torch.nn.Module) -> None:
    """Replace every meta parameter and buffer by a fake one on cuda (inside FakeTensorMode)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, **kwargs):
    """sdpa as a GPU runs it with a mask: the memory-efficient kernel (output and logsumexp
    saved), not the math path that fake CUDA tensors fall back to without a real device (it
    would save [rows, heads, L, P+L] attention weights, which no GPU kernel does)."""
    bias = None
    if attn_mask is not None:
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype).masked_fill(
            ~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn_mask
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, query.requires_grad, dropout_p, is_causal, scale=scale)
    return out[0]


def fake_prompt(cfg: dict, images: int, text_tokens: int, hidden: int):
    """A prompt of `images` rows, each image's 1,280 tokens between its markers, with the
    vision tower's output precomputed (as the trainer does; the update never runs it)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from vlm import Prompt
    n_img = IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2] // 4
    row = [1] * (text_tokens + n_img + 2)  # see _run: the image's positions as text
    ids = torch.tensor([row] * images, device="cuda")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == cfg["image_token_id"]).long(),
              "image_grid_thw": torch.tensor([IMAGE_GRID] * images, device="cuda")}
    feats = tuple(torch.zeros(n_img, hidden, dtype=torch.bfloat16, device="cuda")
                  for _ in range(images))
    return Prompt(inputs, BaseModelOutputWithPooling(pooler_output=feats))


def run(name: str, images: int, N: int, L: int, text_tokens: int,
        attention: str = "efficient") -> dict:
    config, pre = memplan.read_model(name)
    cfg = Config(solver_model=name, proposer_model=name, use_lora_solver=True,
                 use_lora_proposer=True, images_per_step=images, num_solver_samples=N,
                 max_new_tokens_solver=L)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: .to() cannot swap fake params
    try:
        return _run(cfg, config, pre, images, N, L, text_tokens, attention)
    finally:
        torch.set_default_dtype(default)


def _run(cfg, config, pre, images, N, L, text_tokens, attention) -> dict:
    from peft import LoraConfig, get_peft_model
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    import update
    from vlm import Policy, lora_target_names
    with torch.device("meta"):  # built without memory, then every tensor made fake on cuda
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
        model.requires_grad_(False)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_target_names(model, cfg.lora_targets_list))
        peft = get_peft_model(model, lora, adapter_name="solver")
    owner = torch.arange(images).repeat_interleave(N)  # real: its values are read
    T = text_tokens + IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2] // 4 + 2 + L
    positions = torch.arange(T).view(1, 1, T).expand(3, images * N, T).contiguous()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, torch.device("cuda"):
        _to_fake_cuda(peft)
        policy = Policy("solver", peft, None, adapter="solver")
        shapes = memplan.shapes_of(config, pre)
        prompt = fake_prompt(config, images, text_tokens, shapes.hidden)
        rows = images * N
        ids = torch.randint(0, shapes.vocab, (rows, L))
        mask = torch.ones_like(ids)
        core = update.core_model(peft)
        # Fake tensors hold no values: the positions (computed from the ids' values) come
        # ready-made, and the image's tokens enter as text tokens of the same count (the
        # language model's memory per position is the same; the update never runs the tower).
        core.get_rope_index = lambda *a, **k: (positions.to("cuda"), None)
        update.vision_inputs = lambda prompt, owner: {}
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if attention == "efficient":
            torch.nn.functional.scaled_dot_product_attention = efficient_sdpa
        mt = tracker()
        mt.track_external(peft)
        with mt:
            ref = update.reference_logprobs(policy, prompt, ids, mask, owner, 1.0)
            peft.train()
            logits = update.completion_logits(peft, prompt, ids, mask, owner)
            tok, logp = update.token_logprobs(logits, ids, 1.0)
            kl = (update.kl_per_token(logp, ref, ids) * mask).sum()
            loss = -(tok * mask).sum() / rows + 1e-3 * kl / mask.sum()
        torch.nn.functional.scaled_dot_product_attention = sdpa
        peak = mt.get_tracker_snapshot("peak")
    snap = peak[torch.device("cuda:0")]
    measured = snap["Total"] - snap.get("Parameter", 0) - snap.get("Buffer", 0)
    act, _ = memplan.update_bytes(cfg, shapes, prompt.length, rows, False)
    forward_vocab = rows * L * shapes.vocab * (memplan.DTYPE_BYTES[cfg.dtype] + 4 * 4)
    return {"images": images, "rows": rows, "prompt": prompt.length, "measured": measured,
            "plan_forward": act + forward_vocab, "params": snap.get("Parameter", 0),
            "loss_dtype": str(loss.dtype), "devices": [str(d) for d in peak]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--images", default="1,8", help="B values, comma-separated")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--answer_tokens", type=int, default=256)
    p.add_argument("--attention", default="efficient,math",
                   help="efficient: the kernel a GPU runs; math: fake CUDA's own fallback")
    p.add_argument("--text_tokens", type=int, default=300, help="prompt text around the image")
    args = p.parse_args(argv)
    for b, attention in [(b, a) for b in map(int, args.images.split(","))
                         for a in args.attention.split(",")]:
        r = run(args.model, b, args.samples, args.answer_tokens, args.text_tokens, attention)
        gib = lambda x: f"{x / 2**30:.2f} GiB"
        print(f"B={b}, {attention} attention: rows {r['rows']}, prompt {r['prompt']} tokens, "
              f"on {r['devices']}: "
              f"tracked forward+loss+KL peak {gib(r['measured'])} (weights {gib(r['params'])} "
              f"apart), plan's forward part {gib(r['plan_forward'])}, plan/measured "
              f"{r['plan_forward'] / r['measured']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
