"""Entry point. With no arguments: the CPU demo on a tiny random Qwen2.5-VL and synthetic images.

    python run.py                      # demo: build tiny model + images, train, save (rerun resumes)
    python run.py --data_dir ... ...   # exactly `python train.py --data_dir ... ...`
    python run.py infer|eval|export    # use a trained Solver (see README)
    python run.py convert-checkpoint runs/<run>/step_00002 --trust-pickle   # old pickled state
"""
from __future__ import annotations

import os
import sys

DEMO_DIR = "runs"
DEMO_RUN = "demo"
DEMO_STEPS = 4  # per invocation: a rerun resumes and trains DEMO_STEPS more


def demo() -> int:
    import checkpoint
    import train
    from tiny import build_tiny_model, make_synthetic_images
    print("demo: building a tiny random Qwen2.5-VL and synthetic images under runs/ ...", flush=True)
    model = build_tiny_model(os.path.join(DEMO_DIR, "demo-model"))
    data = os.path.join(DEMO_DIR, "demo-images")
    if not os.path.isdir(data):
        make_synthetic_images(data, n=12)
    done = checkpoint.complete_checkpoints(os.path.join(DEMO_DIR, DEMO_RUN))
    start = done[-1][0] if done else 0
    if start:
        print(f"demo: found run '{DEMO_RUN}' at step {start}; resuming for {DEMO_STEPS} more steps")
    return train.main([
        "--data_dir", data, "--solver_model", model, "--proposer_model", model,
        "--use_lora_solver", "--use_lora_proposer", "--dtype", "float32", "--device_map", "cpu",
        "--output_dir", DEMO_DIR, "--wandb_run_name", DEMO_RUN, "--total_steps", str(start + DEMO_STEPS),
        "--save_every", "2", "--num_solver_samples", "5", "--proposer_update_freq", "2",
        "--max_new_tokens_solver", "64", "--max_new_tokens_proposer", "32", "--lr", "1e-4"])


def convert(argv: list[str]) -> int:
    """Rewrite old-format checkpoints (pickled trainer_state.pt) as plain data, on request."""
    import checkpoint
    from config import ConvertArgs
    from errors import UserError
    from infer import parse_args
    if argv and not argv[0].startswith("-"):
        argv = ["--path", *argv]  # the folder may be given positionally, as documented
    try:
        args = parse_args("convert-checkpoint", argv, ConvertArgs)
        done = checkpoint.convert_checkpoints(args.path, args.trust_pickle)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for folder in done:
        print(f"converted {folder}: trainer_state.json + trainer_state.safetensors written "
              f"(trainer_state.pt is no longer read and may be deleted)")
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        return demo()
    if argv[0] in ("infer", "eval", "export"):
        import infer
        return infer.main(argv)
    if argv[0] == "convert-checkpoint":
        return convert(argv[1:])
    import train
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
