"""Upstream lmms-eval answers with our merged export (scripts/check_lmms_eval.sh runs both steps).

    python scripts/check_lmms_eval.py prepare DIR     # this project's environment: tiny hub-layout
                                                      # base, 2 real training steps, `run.py export`
    .compat/lmms/bin/python scripts/check_lmms_eval.py answer DIR   # lmms-eval's environment

`answer` builds the model exactly as `python -m lmms_eval --model qwen2_5_vl --model_args
pretrained=DIR/export,device_map=cpu --device cpu --batch_size 1` does (models.get_model, then
create_from_arg_string) and runs generate_until on one request with a local image. No network.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "How many bars are in the chart?"


def prepare(work: str) -> None:
    sys.path.insert(0, ROOT)
    from tools import infer
    import train
    from tools.tiny import build_tiny_model, make_synthetic_images
    base = build_tiny_model(os.path.join(work, "base"))
    images = make_synthetic_images(os.path.join(work, "images"), n=4)
    rc = train.main(["--data_dir", images, "--solver_model", base, "--proposer_model", base,
                     "--use_lora_solver", "--use_lora_proposer", "--dtype", "float32",
                     "--device_map", "cpu", "--total_steps", "2", "--save_every", "2",
                     "--lr", "1e-2", "--num_solver_samples", "3", "--max_new_tokens_solver", "16",
                     "--max_new_tokens_proposer", "12", "--output_dir", os.path.join(work, "runs"),
                     "--wandb_run_name", "check"])
    solver = os.path.join(work, "runs", "check", "step_00002", "solver")
    if rc != 0 or infer.main(["export", "--model", base, "--adapter", solver,
                              "--out", os.path.join(work, "export")]) != 0:
        sys.exit("prepare failed")


def answer(work: str) -> None:
    from importlib.metadata import version

    import transformers
    from lmms_eval import models
    from lmms_eval.api.instance import Instance
    from PIL import Image
    export = os.path.join(work, "export")
    model_class = models.get_model("qwen2_5_vl", False)  # what `--model qwen2_5_vl` resolves to
    lm = model_class.create_from_arg_string(f"pretrained={export},device_map=cpu",
                                            {"batch_size": 1, "max_batch_size": None,
                                             "device": "cpu"})
    image = Image.open(os.path.join(work, "images", "charts", "img_000.png")).convert("RGB")
    doc = {"image": image, "question": QUESTION}

    def doc_to_messages(doc):  # a chat task's messages, as lmms-eval's tasks build them
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                             {"type": "text", "text": doc["question"]}]}]
    lm.task_dict = {"local_check": {"test": [doc]}}  # what the evaluator sets from the task
    request = Instance(request_type="generate_until",
                       arguments=(QUESTION, doc_to_messages, {"max_new_tokens": 16,
                                                              "temperature": 0}, 0,
                                  "local_check", "test"),
                       idx=0, metadata={"task": "local_check", "doc_id": 0, "repeats": 1})
    result = lm.generate_until([request])[0]
    tokens = result.token_counts.output_tokens
    print(f"lmms-eval {version('lmms_eval')} ({type(lm).__module__}.{type(lm).__name__}), "
          f"transformers {transformers.__version__}, model {type(lm.model).__name__} "
          f"{lm.model.dtype}: {tokens} tokens: {result.text!r}")
    if tokens < 1:
        sys.exit("lmms-eval generated nothing")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "answer"):
        sys.exit(__doc__)
    {"prepare": prepare, "answer": answer}[sys.argv[1]](sys.argv[2])
