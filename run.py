"""Entry point. No arguments: the learning demo on a tiny warm-started Qwen2.5-VL (CPU, minutes).

    python run.py                      # demo: eval, self-train on unlabeled images, eval, curves
    python run.py smoke                # the machinery on random weights (seconds; rerun resumes)
    python run.py plot runs/<run> [--out file.png]   # training curves from iter_log.jsonl
    python run.py plan <training flags>   # the memory plan per rank, no weights loaded
    python run.py --data_dir ... ...   # exactly `python train.py --data_dir ... ...`
    python run.py infer|eval|export    # use a trained Solver (see README)
    python run.py --help               # the commands (COMMANDS below), then the training flags
"""
from __future__ import annotations

import difflib
import os
import sys

DEMO_DIR = "runs"
DEMO_RUN = "demo"
SMOKE_RUN = "smoke"
SMOKE_STEPS = 4  # per invocation: a rerun resumes and trains SMOKE_STEPS more


class DemoError(Exception):
    """Printed as one line, exit 2."""


def learning_demo(root: str = DEMO_DIR, name: str = DEMO_RUN, run=None) -> dict:
    """Build (or reuse) the warm-started model, evaluate it, self-train it on unlabeled images,
    evaluate again. A rerun resumes an unfinished run. Returns {"before", "after", "run_dir"}."""
    import checkpoint
    from tools import demo
    from tools import plot
    import train
    run = run or demo.DemoRun()
    paths = demo.build_demo(root)
    run_dir = os.path.join(root, name)
    _check_model(run_dir, paths["model"])
    print(f"demo: held-out accuracy of the warm-started model ({paths['eval']})", flush=True)
    before = demo.evaluate(paths, None, os.path.join(run_dir, "eval_before.jsonl"), run)
    print(f"demo: self-training on the unlabeled images in {paths['unlabeled']}", flush=True)
    rc = train.main(demo.train_args(paths, root, name, run))
    if rc != 0:
        raise DemoError(f"training stopped (exit {rc}); rerun to resume")
    done = checkpoint.complete_checkpoints(run_dir)
    step, path = done[-1]
    print(f"demo: held-out accuracy after {step} steps ({path}/solver)", flush=True)
    after = demo.evaluate(paths, os.path.join(path, "solver"),
                          os.path.join(run_dir, "eval_after.jsonl"), run)
    records, _ = plot.read_log(run_dir)
    curves = plot.plot(records, os.path.join(run_dir, "curves.png"), name,
                       plot.read_val_log(run_dir))
    return {"before": before, "after": after, "run_dir": run_dir, "curves": curves, "step": step}


def _check_model(run_dir: str, model: str) -> None:
    """A run belongs to one demo model; a changed prompt builds a new one, which the old
    checkpoints cannot resume."""
    marker = os.path.join(run_dir, "DEMO_MODEL")
    if os.path.isfile(marker):
        with open(marker) as f:
            old = f.read().strip()
        if old != model:
            raise DemoError(f"{run_dir} was trained on {old}, but the prompts or the warm start "
                            f"changed and the demo model is now {model}: move {run_dir} away "
                            f"and rerun to start afresh")
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(marker, "w") as f:
        f.write(model + "\n")


def demo_main() -> int:
    from tools import demo
    try:
        result = learning_demo()
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{demo.table(result['before'], result['after'])}")
    print(f"\ntraining curves: {result['curves']}  checkpoints: {result['run_dir']}/step_*/")
    return 0


def smoke() -> int:
    """The random-weight smoke run: gibberish in, gibberish out, but every part runs."""
    import checkpoint
    import train
    from tools.tiny import build_tiny_model, make_synthetic_images
    print("smoke: building a tiny random Qwen2.5-VL and synthetic images under runs/ ...",
          flush=True)
    model = build_tiny_model(os.path.join(DEMO_DIR, "demo-model"))
    data = os.path.join(DEMO_DIR, "demo-images")
    if not os.path.isdir(data):
        make_synthetic_images(data, n=12)
    done = checkpoint.complete_checkpoints(os.path.join(DEMO_DIR, SMOKE_RUN))
    start = done[-1][0] if done else 0
    if start:
        print(f"smoke: found run '{SMOKE_RUN}' at step {start}; resuming for {SMOKE_STEPS} "
              f"more steps")
    return train.main([
        "--data_dir", data, "--solver_model", model, "--proposer_model", model,
        "--use_lora_solver", "--use_lora_proposer", "--dtype", "float32", "--device_map", "cpu",
        "--output_dir", DEMO_DIR, "--wandb_run_name", SMOKE_RUN,
        "--total_steps", str(start + SMOKE_STEPS),
        "--save_every", "2", "--num_solver_samples", "5", "--proposer_update_freq", "2",
        "--max_new_tokens_solver", "64", "--max_new_tokens_proposer", "32", "--lr", "1e-4"])



def plot_main(args: list[str]) -> int:
    from tools import plot
    return plot.main(args)


def plan_main(args: list[str]) -> int:
    import memfit
    return memfit.main(args)


def tool_main(command: str):
    def run_tool(args: list[str]) -> int:
        from tools import infer
        return infer.main([command, *args])
    return run_tool


def no_arguments(command):
    def run_bare(args: list[str]) -> int:
        if args:
            print(f"error: {args[0]}: `python run.py {command.__name__}` takes no arguments "
                  f"(see python run.py --help)", file=sys.stderr)
            return 2
        return command()
    return run_bare


# The subcommands, in the order --help lists them: name -> (what it does, handler(args)).
COMMANDS = {
    "smoke": ("the machinery on random weights (seconds; a rerun resumes)", no_arguments(smoke)),
    "plot": ("training curves from a run's iter_log.jsonl: plot runs/<run> [--out file.png]",
             plot_main),
    "plan": ("the memory plan per rank for training flags, no weights loaded: plan <flags>",
             plan_main),
    "infer": ("a trained Solver answers one image: infer --model M --adapter DIR --image F",
              tool_main("infer")),
    "eval": ("accuracy on a JSONL of image, question, answer: eval --model M --data F",
             tool_main("eval")),
    "export": ("merge a LoRA Solver into its base: export --model M --adapter DIR --out DIR",
               tool_main("export")),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python run.py                  the learning demo (CPU, minutes)",
             "       python run.py COMMAND [args]   (python run.py COMMAND --help for its flags)",
             "       python run.py --data_dir DIR [flags]   train (as python train.py; flags below)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (summary, _) in COMMANDS.items()]
    return "\n".join(lines) + "\n\ntraining flags:"


def main(argv: list[str]) -> int:
    if not argv:
        return demo_main()
    first = argv[0]
    if first in COMMANDS:
        return COMMANDS[first][1](argv[1:])
    if first in ("-h", "--help"):
        print(usage(), flush=True)
    elif not first.startswith("-"):
        close = difflib.get_close_matches(first, COMMANDS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else f"; commands: {', '.join(COMMANDS)}"
        print(f"error: unknown command {first!r}{hint}; see python run.py --help",
              file=sys.stderr)
        return 2
    import train
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
