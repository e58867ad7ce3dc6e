"""Does the published proposer learn? Replays the published update's sequence of peft calls on
the tiny Qwen2.5-VL and reports what reaches the proposer's LoRA weights.

    python scripts/published_proposer_grad.py

The published trainer (meghanaasunil/iReasoner, built on EvoLMM) keeps both roles as adapters of
one PeftModel ("default" = solver, "proposer"). Its proposer update runs the policy forward
inside a context that sets the proposer adapter and, on exit, sets the previous adapter (the
solver's) back; the "reference" forward calls disable_adapter() without `with` (a no-op); only
then does it call backward() and step AdamW. peft's set_adapter marks only the active adapter's
LoRA weights trainable, so by backward() the proposer's weights no longer require a gradient.
This script does those calls in that order (our code, not theirs) and, as a control, the same
with backward() while the proposer adapter is still active.
"""
from __future__ import annotations

import os
import sys
import tempfile

import peft
import torch
import transformers
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.tiny import build_tiny_model  # noqa: E402
from vlm import chat_text  # noqa: E402

PUBLISHED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "mm_projector"]


def build(model_dir: str):
    """Both adapters on one backbone, every LoRA weight trainable, as the published setup."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = transformers.AutoModelForImageTextToText.from_pretrained(model_dir)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PUBLISHED_TARGETS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)  # adapter "default": the solver
    model.add_adapter("proposer", lora)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    with torch.no_grad():  # trained-looking adapters, so policy and reference differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def proposer_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n and ".proposer." in n}


def one_update(model, batch, labels, backward_inside: bool) -> dict:
    params = proposer_params(model)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in params.items()}
    model.set_adapter("default")  # what the solver's generate/update leave active
    model.train()
    previous = model.active_adapter
    model.set_adapter("proposer")                                # enter use_adapter("proposer")
    out = model(**batch, labels=labels)
    requires_grad_at_forward = all(p.requires_grad for p in params.values())
    if backward_inside:
        trainable_at_backward = sum(p.requires_grad for p in params.values())
        out.loss.backward()
    model.set_adapter(previous)                                  # leave use_adapter(...)
    with torch.no_grad():
        model.disable_adapter()                                  # without `with`: does nothing
        ref = model(**batch)                                     # so the "reference" is the solver
        model.set_adapter(previous)
    logp = out.logits.float().log_softmax(-1)
    kl = (logp.detach().exp() * (logp - ref.logits.float().log_softmax(-1))).sum(-1).mean()
    if not backward_inside:
        trainable_at_backward = sum(p.requires_grad for p in params.values())
        (0.5 * out.loss + 1e-3 * kl).backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    return {"requires_grad at forward": requires_grad_at_forward,
            "params": len(params),
            "requiring a gradient at backward()": trainable_at_backward,
            "with a gradient": sum(p.grad is not None for p in params.values()),
            "changed by AdamW": sum(not torch.equal(p.detach(), before[n])
                                    for n, p in params.items()),
            "KL(proposer || 'reference')": kl.item()}


def main() -> int:
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(os.path.join(tmp, "tiny"))
        processor = transformers.AutoProcessor.from_pretrained(model_dir)
        prompt = chat_text(processor, "Ask one question about the image.")
        enc = processor(text=[prompt + "<question>How many squares?</question>"],
                        images=[Image.new("RGB", (112, 84), (200, 30, 30))], return_tensors="pt")
        prompt_len = processor(text=[prompt], images=[Image.new("RGB", (112, 84))],
                               return_tensors="pt")["input_ids"].shape[1]
        labels = enc["input_ids"].clone()
        labels[:, :prompt_len] = -100
        for title, inside in (("published order (backward after switching back)", False),
                              ("control (backward while the proposer is active)", True)):
            report = one_update(build(model_dir), dict(enc), labels, inside)
            print(f"\n{title}:")
            for key, value in report.items():
                print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
