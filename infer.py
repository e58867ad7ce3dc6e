"""Use a trained Solver: sample answers for one image, evaluate on a labeled set, export a merged model.

    python run.py infer  --model M [--adapter runs/<run>/step_N/solver] --image img.png \
        [--question "..."] [--samples 5] [--max_new_tokens 256] [--temp 1.0] [--seed 0] [--device cpu]
    python run.py eval   --model M --adapter none --adapter runs/<run>/step_N/solver \
        --data set.jsonl [--samples 5] [--limit K] [--out results.jsonl]
    python run.py export --model M --adapter runs/<run>/step_N/solver --out merged/

`python infer.py infer|eval|export ...` is the same. An --adapter is a checkpoint's solver/ folder:
a LoRA adapter (adapter_config.json) or, for a full-finetune run, a whole model (config.json).
Answers, agreement and step agreement are scored by the training code (train.compute_rewards).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import train
import vlm
from config import Config
from data_and_utils import (BadImage, UserError, extract_answer, extract_question, extract_steps,
                            load_image, normalize_answer, proposer_prompt, solver_prompt)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SHOW_STEPS = 64  # steps printed per answer by `infer` (scoring uses the training limit)
REWARD_CFG = Config()  # the training defaults: step limit, embedder, group size, decay


# ---------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line via main(), not argparse's usage dump + exit
        raise UserError(f"{self.prog}: {message}")


def build_parser(command: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"run.py {command}", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Base model: HF id or local folder.")
    p.add_argument("--device", default="cpu", help="device_map: cpu, cuda, cuda:0 or auto.")
    p.add_argument("--dtype", default="auto", choices=["auto", *vlm.DTYPES],
                   help="auto: float32 on cpu, else bfloat16 (export: the checkpoint's dtype).")
    if command == "export":
        p.add_argument("--adapter", required=True, help="LoRA adapter folder to merge.")
        p.add_argument("--out", required=True, help="Folder for the merged model (must not exist).")
        return p
    p.add_argument("--attn_implementation", default="sdpa", help="sdpa, eager or flash_attention_2.")
    for flag, kind, default, text in (
            ("max_pixels", int, Config.max_pixels, "Image pixel cap."),
            ("samples", int, 5, "Answers sampled per question (N)."),
            ("max_new_tokens", int, 256, "Max new tokens per answer."),
            ("temp", float, 1.0, "Sampling temperature."), ("top_p", float, 1.0, "Nucleus top-p."),
            ("seed", int, 0, "Sampling seed.")):
        p.add_argument(f"--{flag}", type=kind, default=default, help=text)
    if command == "infer":
        p.add_argument("--adapter", default="none", help="Solver folder, or none for the base.")
        p.add_argument("--image", required=True, help="Image file.")
        p.add_argument("--question", default="", help="Default: the checkpoint's proposer asks.")
        p.add_argument("--max_new_tokens_proposer", type=int, default=128,
                       help="Max new tokens for the proposer's question.")
    else:
        p.add_argument("--adapter", action="append", default=None,
                       help="Solver folder or none (the base); repeat to compare side by side.")
        p.add_argument("--data", required=True, help="JSONL: image (relative to the file), "
                                                     "question, answer, optional choices.")
        p.add_argument("--limit", type=int, default=0, help="Evaluate the first K good rows.")
        p.add_argument("--out", default="", help="Write one JSON result line per row here.")
    return p


def _check_sampling(args) -> None:
    for name in ("samples", "max_new_tokens", "max_pixels", "max_new_tokens_proposer"):
        if getattr(args, name, 1) < 1:  # the proposer's limit exists for `infer` only
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.temp <= 0 or not 0 < args.top_p <= 1:
        raise UserError(f"need --temp > 0 and 0 < --top_p <= 1, got {args.temp}, {args.top_p}")


# ---------------------------------------------------------------- loading
@dataclass
class Loaded:
    """Policies sharing one base: LoRA folders are named adapters of one PeftModel (`root`)."""
    policies: dict
    root: torch.nn.Module
    processor: object


def adapter_kind(path: str) -> str:
    """'lora' for a PEFT adapter folder, 'full' for a whole saved model."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "lora"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "full"
    what = "does not exist" if not os.path.exists(path) else \
        "has neither adapter_config.json (LoRA) nor config.json (full model)"
    raise UserError(f"adapter {path} {what}")


def _dtype(args, export: bool = False) -> str:
    if args.dtype != "auto":
        return args.dtype
    if not export:  # bfloat16 matmuls on CPU are slow and lossy
        return "float32" if args.device == "cpu" else "bfloat16"
    from transformers import AutoConfig
    saved = getattr(AutoConfig.from_pretrained(args.model), "dtype", None)
    return {v: k for k, v in vlm.DTYPES.items()}.get(saved, "float32")


def load_base(name: str, args, export: bool = False):
    try:
        return vlm.load_backbone(name, _dtype(args, export), args.device,
                                 getattr(args, "attn_implementation", "sdpa"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {name}: {_first_line(e)}") from e


def load_models(args, adapters: dict) -> Loaded:
    """adapters: name -> folder, or None for the base model itself."""
    from peft import PeftModel
    kinds = {name: adapter_kind(path) for name, path in adapters.items() if path is not None}
    base, processor = load_base(args.model, args)
    root, policies = base, {}
    for name, path in adapters.items():
        if kinds.get(name) == "full":
            # Its reference (for step embeddings) is the base, as in full-finetune training.
            policies[name] = vlm.Policy(name, load_base(path, args)[0], processor, ref_model=base)
        elif path is not None:
            try:
                if isinstance(root, PeftModel):
                    root.load_adapter(path, adapter_name=name)
                else:
                    root = PeftModel.from_pretrained(base, path, adapter_name=name)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise UserError(f"cannot load adapter {path} onto {args.model}: "
                                f"{_first_line(e)}") from e
            policies[name] = vlm.Policy(name, root, processor, adapter=name)
    for name, path in adapters.items():
        if path is None:
            policies[name] = vlm.Policy(name, root, processor, ref_model=root)
    return Loaded(policies, root, processor)


@contextmanager
def scope(loaded: Loaded, policy: vlm.Policy):
    """LoRA policies pick their adapter in vlm.acting; all others run with the adapters off,
    so 'none' and a full model's reference see the plain base."""
    from peft import PeftModel
    off = policy.adapter is None and isinstance(loaded.root, PeftModel)
    with loaded.root.disable_adapter() if off else nullcontext():
        yield


def read_image(path: str, processor, max_pixels: int):
    """The image sized exactly as training sizes it (raises BadImage)."""
    min_px, max_px, factor = vlm.image_sizing(processor, max_pixels)
    return load_image(path, max_px, min_px, factor)


# ---------------------------------------------------------------- sampling and scoring
def solve(policy: vlm.Policy, image, question: str, args, image_features=None):
    """N sampled answers scored by the training reward code. Returns (prompt, rewards dict)."""
    prompt = vlm.make_prompt(policy, image, solver_prompt(question), image_features)
    roll = vlm.generate(policy, prompt, args.samples, args.max_new_tokens, args.temp, args.top_p)
    rw = train.compute_rewards(REWARD_CFG, policy, roll.texts, step=0)
    return prompt, {**rw, "texts": roll.texts}


def summary(rw: dict) -> dict:
    n = len(rw["texts"])
    return {"majority": rw["dominant_answer"], "agreement": rw["dominant_count"] / n,
            "step_agreement": sum(rw["reward_steps"]) / n}


def ask(policy: vlm.Policy, image, args) -> str:
    """The proposer's question for this image, as in a training rollout."""
    prompt = vlm.make_prompt(policy, image, proposer_prompt())
    roll = vlm.generate(policy, prompt, 1, args.max_new_tokens_proposer, args.temp, args.top_p)
    return extract_question(roll.texts[0])


def cmd_infer(args) -> int:
    _check_sampling(args)
    solver_dir = None if args.adapter.lower() == "none" else args.adapter
    adapters = {"solver": solver_dir}
    if not args.question:
        if solver_dir is None:
            raise UserError("no --question: pass one, or an --adapter from a checkpoint whose "
                            "proposer/ writes it")
        adapters["proposer"] = os.path.join(os.path.dirname(solver_dir.rstrip("/")), "proposer")
        if not os.path.isdir(adapters["proposer"]):
            raise UserError(f"no --question and no proposer next to the adapter (looked for "
                            f"{adapters['proposer']}); pass --question")
    if not os.path.isfile(args.image):
        raise UserError(f"--image {args.image} does not exist")
    loaded = load_models(args, adapters)
    try:
        image = read_image(args.image, loaded.processor, args.max_pixels)
    except BadImage as e:
        raise UserError(f"cannot read --image {args.image}: {e}") from e
    train.seed_all(args.seed)
    question = args.question
    if not question:
        with scope(loaded, loaded.policies["proposer"]):
            question = ask(loaded.policies["proposer"], image, args)
    with scope(loaded, loaded.policies["solver"]):
        _, rw = solve(loaded.policies["solver"], image, question, args)
    print(f"question{'' if args.question else ' (proposer)'}: {question}")
    for i, text in enumerate(rw["texts"], 1):
        print(f"\n--- sample {i}/{args.samples}")
        for j, step in enumerate(extract_steps(text, SHOW_STEPS), 1):
            print(f"  step {j}: {step}")
        print(f"  answer: {extract_answer(text)}")
    if args.samples > 1:
        s = summary(rw)
        print(f"\nmajority answer: {s['majority']}  agreement {rw['dominant_count']}/"
              f"{args.samples} = {s['agreement']:.2f}  step agreement {s['step_agreement']:.3f}")
    return 0


# ---------------------------------------------------------------- evaluation
@dataclass
class Row:
    line: int
    image: str
    question: str
    answer: str
    choices: list = field(default_factory=list)


def parse_row(text: str, line: int, root: str) -> Row:
    """One JSONL line as a Row; ValueError says what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for key, kinds in (("image", (str,)), ("question", (str,)), ("answer", (str, int, float))):
        if not isinstance(obj.get(key), kinds):
            raise ValueError(f"missing or non-text field '{key}'")
    choices = obj.get("choices") or []
    if not isinstance(choices, list) or not 0 <= len(choices) <= len(LETTERS) \
            or not all(isinstance(c, (str, int, float)) for c in choices):
        raise ValueError(f"'choices' must be a list of at most {len(LETTERS)} strings")
    image = os.path.join(root, obj["image"])
    if not os.path.isfile(image):
        raise ValueError(f"image not found: {image}")
    return Row(line, image, obj["question"], str(obj["answer"]), [str(c) for c in choices])


def read_rows(path: str, limit: int) -> tuple[list[Row], list[str]]:
    """Good rows (the first `limit` if > 0) and one message per bad line."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path} does not exist")
    rows, bad, root = [], [], os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", errors="replace") as f:
        for line, text in enumerate(f, 1):
            if limit and len(rows) >= limit:
                break
            if not text.strip():
                continue
            try:
                rows.append(parse_row(text, line, root))
            except ValueError as e:
                bad.append(f"{path}:{line}: {e}")
    return rows, bad


def question_text(row: Row) -> str:
    if not row.choices:
        return row.question
    options = " ".join(f"({letter}) {c}" for letter, c in zip(LETTERS, row.choices))
    return f"{row.question}\nOptions: {options}"


def gold_forms(row: Row) -> set[str]:
    """Normalized answers counted correct: the answer, and for a multiple-choice row both the
    letter and the text of the option it names."""
    gold = {normalize_answer(row.answer)}
    for letter, choice in zip(LETTERS, row.choices):
        forms = {normalize_answer(letter), normalize_answer(choice)}
        if gold & forms:
            gold |= forms
    return gold


def eval_row(loaded: Loaded, names: list[str], row: Row, image, args, seed: int) -> dict:
    """Every model on one row; each starts from the same seed so the columns are paired."""
    results, shared = {}, {}
    gold = gold_forms(row)
    for name in names:
        policy = loaded.policies[name]
        train.seed_all(seed)
        with scope(loaded, policy):
            # The vision tower carries no adapter: encode the image once per backbone.
            prompt, rw = solve(policy, image, question_text(row), args, shared.get(id(policy.model)))
        shared[id(policy.model)] = prompt.image_features
        s = summary(rw)
        results[name] = {**s, "correct_first": rw["answers_norm"][0] in gold,
                         "correct_majority": s["majority"] in gold, "answers": rw["answers"],
                         "samples": rw["texts"]}
    return results


def cmd_eval(args) -> int:
    _check_sampling(args)
    specs = args.adapter or ["none"]
    labels = {f"m{i}": ("base" if s.lower() == "none" else s) for i, s in enumerate(specs)}
    if len(set(labels.values())) < len(labels):
        raise UserError("the same --adapter is given twice")
    rows, bad = read_rows(args.data, args.limit)
    for message in bad:
        print(f"skipping bad row: {message}", file=sys.stderr)
    if not rows:
        raise UserError(f"no usable rows in {args.data} ({len(bad)} bad)")
    loaded = load_models(args, {m: None if labels[m] == "base" else s
                                for m, s in zip(labels, specs)})
    try:
        out = open(args.out, "w", encoding="utf-8") if args.out else nullcontext()
    except OSError as e:
        raise UserError(f"cannot write --out {args.out}: {e.strerror or e}") from e
    with out as f:
        totals = eval_rows(loaded, labels, rows, bad, args, f)
    print(format_table(labels, totals, args.samples))
    if bad:
        print(f"skipped {len(bad)} bad row(s)")
    return 0


def eval_rows(loaded: Loaded, labels: dict, rows: list, bad: list, args, out) -> dict:
    """Per-model result lists; rows whose image fails to decode are added to `bad`."""
    totals = {m: [] for m in labels}
    for i, row in enumerate(tqdm(rows, desc="eval", file=sys.stderr)):
        try:
            image = read_image(row.image, loaded.processor, args.max_pixels)
        except BadImage as e:
            bad.append(f"{args.data}:{row.line}: unreadable image {row.image}: {e}")
            print(f"skipping bad row: {bad[-1]}", file=sys.stderr)
            continue
        results = eval_row(loaded, list(labels), row, image, args, args.seed + i)
        for m, r in results.items():
            totals[m].append(r)
        if out is not None:
            record = {"line": row.line, "image": row.image, "question": row.question,
                      "answer": row.answer, "results": {labels[m]: r for m, r in results.items()}}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return totals


def format_table(labels: dict, totals: dict, n: int) -> str:
    """One column per model: accuracy, maj@N, answer agreement, step agreement, rows."""
    def mean(m, key):
        vals = [float(r[key]) for r in totals[m]]
        return f"{sum(vals) / len(vals):.3f}" if vals else "-"
    metrics = [("acc", "correct_first")] + ([(f"maj@{n}", "correct_majority")] if n > 1 else [])
    metrics += [("agreement", "agreement"), ("step agreement", "step_agreement")]
    table = [["metric", *labels.values()]]
    table += [[title, *(mean(m, key) for m in labels)] for title, key in metrics]
    table.append(["rows", *(str(len(totals[m])) for m in labels)])
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(r, widths))) for r in table)


# ---------------------------------------------------------------- export
def cmd_export(args) -> int:
    """Merge the LoRA into the base and save a plain model any harness can load (export.py)."""
    import export
    return export.export(args.model, args.adapter, args.out, args.dtype, args.device)


# ---------------------------------------------------------------- entry point
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def main(argv: list[str]) -> int:
    """argv[0] is the subcommand (infer, eval or export)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the "Loading weights" bars drown the answers
    commands = {"infer": cmd_infer, "eval": cmd_eval, "export": cmd_export}
    if not argv or argv[0] not in commands:
        print(f"error: the first argument must be one of {', '.join(commands)}", file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](build_parser(argv[0]).parse_args(argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
