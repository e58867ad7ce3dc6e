"""Use a trained Solver: sample answers for one image, evaluate on a labeled set, export a merged model.

    python run.py infer  --model M [--adapter runs/<run>/step_N/solver] --image img.png \
        [--question "..."] [--samples 5] [--max_new_tokens 256] [--temp 1.0] [--seed 0] [--device cpu]
    python run.py eval   --model M --adapter none --adapter runs/<run>/step_N/solver \
        --data set.jsonl [--samples 5] [--limit K] [--out results.jsonl]
    python run.py export --model M --adapter runs/<run>/step_N/solver --out merged/

`python -m tools.infer infer|eval|export ...` is the same. An --adapter is a checkpoint's solver/ folder:
a LoRA adapter (adapter_config.json) or, for a full-finetune run, a whole model (config.json).
Rows are read and scored by evaluation.py, which validation while training (validate.py) shares:
answers, agreement and step agreement by the training code (rewards.compute_rewards).
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import checkpoint
from cli import DataclassParser
import vlm
from config import Config, EvalArgs, ExportArgs, InferArgs
from data_and_utils import (BadImage, extract_answer, extract_question, extract_steps, load_image,
                            proposer_prompt)
from evaluation import (Row, gold_forms, question_text, read_rows, row_result,  # noqa: F401
                        sample_and_score, summary)
from distributed import UserError, first_line
from runtime import json_line
from runtime import seed_all

SHOW_STEPS = 64  # steps printed per answer by `infer` (scoring uses the training limit)
REWARD_CFG = Config()  # the training defaults: step limit, embedder, group size, decay
# What a run's saved config sets for scoring answers and steps (see run_settings).
SCORING_FIELDS = ("answer_match", "solver_soft_gamma", "len_penalty_weight", "len_penalty_target_words",
                  "max_reasoning_steps", "min_step_group_size", "step_group_density_gamma",
                  "step_position_decay", "step_sim_temperature", "step_embedder",
                  "step_embed_max_tokens")


# ---------------------------------------------------------------- command line
COMMAND_ARGS = {"infer": InferArgs, "eval": EvalArgs, "export": ExportArgs}


class _Parser(DataclassParser):
    def error(self, message):  # one line via main(), not argparse's usage dump + exit
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def parse_args(command: str, argv: list[str], dataclass_type=None):
    """The command's options dataclass; every mistake in argv is a UserError."""
    parser = _Parser(dataclass_type or COMMAND_ARGS[command], prog=f"run.py {command}",
                     description=__doc__.split("\n")[0])
    try:
        args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # a failed check in __post_init__
        raise UserError(f"run.py {command}: {e}") from e
    if unknown:
        parser.unrecognized(unknown)
    return args


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


def _dtype(args) -> str:
    if args.dtype != "auto":
        return args.dtype
    return "float32" if args.device == "cpu" else "bfloat16"  # bf16 CPU matmuls: slow and lossy


def load_base(name: str, args):
    try:
        return vlm.load_backbone(name, _dtype(args), args.device, args.attn_implementation)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {name}: {first_line(e)}") from e


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
            except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as e:
                raise UserError(f"cannot load adapter {path} onto {args.model}: "
                                f"{first_line(e)}") from e
            policies[name] = vlm.Policy(name, root, processor, adapter=name)
    for name, path in adapters.items():
        if path is None:
            policies[name] = vlm.Policy(name, root, processor, ref_model=root)
    return Loaded(policies, root, processor)


@dataclass
class RunSettings:
    """How a model is scored and prompted: its training run's, or the defaults."""
    reward_cfg: Config = field(default_factory=lambda: REWARD_CFG)
    prompts: dict = field(default_factory=REWARD_CFG.prompt_texts)
    source: str = "defaults"


def run_settings(adapter: str | None) -> RunSettings:
    """The settings of the run whose checkpoint holds `adapter` (runs/<run>/step_N/solver): its
    step scoring (step limit, embedder, group size, decay, temperature) and its prompts.
    The base model, or an adapter outside a checkpoint, gets the defaults."""
    if adapter is None:
        return RunSettings()
    step_dir = os.path.dirname(os.path.abspath(adapter).rstrip("/"))
    saved = checkpoint.read_run_settings(step_dir)
    if saved is None:
        return RunSettings()
    reward_cfg = copy.copy(REWARD_CFG)
    for name in SCORING_FIELDS:
        if name in saved["config"]:
            setattr(reward_cfg, name, saved["config"][name])
    return RunSettings(reward_cfg, saved["prompts"] or REWARD_CFG.prompt_texts(), step_dir)


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
def solve(policy: vlm.Policy, image, question: str, args, image_features=None,
          run: RunSettings | None = None):
    """N sampled answers scored by the training reward code with the run's settings.
    Returns (prompt, rewards dict)."""
    run = run or RunSettings()
    sampling = vlm.resolve_sampling(policy, args, args.max_new_tokens)[0]
    return sample_and_score(policy, image, question, args.samples, sampling, run.reward_cfg,
                            run.prompts["solver"], image_features)


def ask(policy: vlm.Policy, image, args, run: RunSettings) -> str:
    """The proposer's question for this image, as in a training rollout."""
    prompt = vlm.make_prompt(policy, image, proposer_prompt(run.prompts["proposer"]))
    roll = vlm.generate(policy, prompt, 1,
                        vlm.resolve_sampling(policy, args, args.max_new_tokens_proposer)[0])
    return extract_question(roll.texts[0])


def warn_sampling(loaded: Loaded, args) -> None:
    """Training's sampling settings, said once: the values in use, and a warning when greedy
    sampling of --samples > 1 makes every answer the same (maj@N = acc, agreement 1)."""
    policy = next(iter(loaded.policies.values()))
    sampling, source = vlm.resolve_sampling(policy, args, args.max_new_tokens)
    print(f"sampling: temperature {sampling.temperature:g}, top_p {sampling.top_p:g}, {source}",
          file=sys.stderr)
    warning = vlm.greedy_warning("eval" if isinstance(args, EvalArgs) else "infer", sampling,
                                 args.samples)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_infer(args: InferArgs) -> int:
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
    warn_sampling(loaded, args)
    try:
        image = read_image(args.image, loaded.processor, args.max_pixels)
    except BadImage as e:
        raise UserError(f"cannot read --image {args.image}: {e}") from e
    seed_all(args.seed)
    question, run = args.question, run_settings(solver_dir)
    if not question:
        with scope(loaded, loaded.policies["proposer"]):
            question = ask(loaded.policies["proposer"], image, args, run)
    with scope(loaded, loaded.policies["solver"]):
        _, rw = solve(loaded.policies["solver"], image, question, args, run=run)
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
def eval_row(loaded: Loaded, names: list[str], row: Row, image, args, seed: int,
             runs: dict | None = None) -> dict:
    """Every model on one row; each starts from the same seed so the columns are paired.
    `runs`: name -> RunSettings (default: the defaults)."""
    results, shared = {}, {}
    gold = gold_forms(row)
    for name in names:
        policy = loaded.policies[name]
        seed_all(seed)
        with scope(loaded, policy):
            # The vision tower carries no adapter: encode the image once per backbone.
            prompt, rw = solve(policy, image, question_text(row), args, shared.get(id(policy.model)),
                               (runs or {}).get(name))
        shared[id(policy.model)] = prompt.image_features
        results[name] = row_result(rw, gold, (runs or {}).get(name, RunSettings()).reward_cfg
                                   .answer_match)
    return results


def cmd_eval(args: EvalArgs) -> int:
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
    warn_sampling(loaded, args)
    try:
        out = open(args.out, "w", encoding="utf-8") if args.out else nullcontext()
    except OSError as e:
        raise UserError(f"cannot write --out {args.out}: {first_line(e)}") from e
    runs = {m: run_settings(None if labels[m] == "base" else s) for m, s in zip(labels, specs)}
    if args.answer_match:  # else each run's own (the default, string, for the base)
        for run in runs.values():
            run.reward_cfg = copy.copy(run.reward_cfg)
            run.reward_cfg.answer_match = args.answer_match
    for m, run in runs.items():
        print(f"{labels[m]}: step scoring and prompts from {run.source}", file=sys.stderr)
    with out as f:
        totals = eval_rows(loaded, labels, rows, bad, args, f, runs)
    print(format_table(labels, totals, args.samples))
    if bad:
        print(f"skipped {len(bad)} bad row(s)")
    return 0


def eval_rows(loaded: Loaded, labels: dict, rows: list, bad: list, args, out,
              runs: dict | None = None) -> dict:
    """Per-model result lists; rows whose image fails to decode are added to `bad`."""
    totals = {m: [] for m in labels}
    for i, row in enumerate(tqdm(rows, desc="eval", file=sys.stderr)):
        try:
            image = read_image(row.image, loaded.processor, args.max_pixels)
        except BadImage as e:
            bad.append(f"{args.data}:{row.line}: unreadable image {row.image}: {e}")
            print(f"skipping bad row: {bad[-1]}", file=sys.stderr)
            continue
        results = eval_row(loaded, list(labels), row, image, args, args.seed + i, runs)
        for m, r in results.items():
            totals[m].append(r)
        if out is not None:
            record = {"line": row.line, "image": row.image, "question": row.question,
                      "answer": row.answer, "results": {labels[m]: r for m, r in results.items()}}
            out.write(json_line(record))  # strict JSON: no bare NaN
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
    from tools import export
    return export.export(args.model, args.adapter, args.out, args.dtype, args.device)


# ---------------------------------------------------------------- entry point
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
        return commands[argv[0]](parse_args(argv[0], argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
