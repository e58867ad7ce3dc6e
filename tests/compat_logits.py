"""Logits of model folders as an evaluation harness computes them, under whichever transformers and
peft are importable. tests/test_harness.py runs it with transformers 4.57.1 + peft 0.17.1 (EvoLMM's
pins) from an isolated folder and compares the result with transformers 5 in its own process.
It imports nothing from the project, which needs transformers 5.

    PYTHONPATH=.compat/tf4 python tests/compat_logits.py jobs.json out.pt

jobs.json: {"image": png, "question": str, "jobs": {name: {"model": dir, "adapter": dir or null}}}.
Each job loads the model the way the harness does (Qwen2_5_VLForConditionalGeneration, then
PeftModel.from_pretrained + set_adapter for an adapter, as EvoLMM's qwen2_5_vl_our), in float32.
"""
import json
import sys

import peft
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration


def prompt_inputs(folder: str, image: Image.Image, question: str) -> tuple[dict, dict]:
    """The processor's tensors (all of them, as the harnesses pass them on: transformers 5 needs
    mm_token_type_ids for the image's rope positions) and a tokenizer check."""
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    # The slow tokenizer reads vocab.json + merges.txt only; it must agree with tokenizer.json.
    slow = AutoTokenizer.from_pretrained(folder, use_fast=False)
    check = {"text_ids": processor.tokenizer(text)["input_ids"], "slow_ids": slow(text)["input_ids"],
             "slow_class": type(slow).__name__}
    return dict(inputs), check


def run_job(job: dict, image: Image.Image, question: str) -> dict:
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(job["model"],
                                                               torch_dtype=torch.float32)
    if job.get("adapter"):
        model = peft.PeftModel.from_pretrained(model, job["adapter"])
        model.set_adapter("default")
    inputs, check = prompt_inputs(job["model"], image, question)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits.float()
    text = model.config.get_text_config()  # 4.x calls it rope_scaling, 5.x rope_parameters
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    return {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
            "logits": logits, "rope": dict(rope or {}), **check}


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    image = Image.open(spec["image"]).convert("RGB")
    results = {name: run_job(job, image, spec["question"]) for name, job in spec["jobs"].items()}
    results["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__}
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
