"""The memory plan against the update's measured peak tensor memory on the CPU.

torch's MemTracker (torch.distributed._tools.mem_tracker) sees every tensor the update makes,
backward and optimizer step included, not the process's RSS. One measurement: a tiny random
Qwen2.5-VL (tools/tiny.py), LoRA on both roles, B images with N completions of L tokens each
(random ids, all real tokens: the worst case the plan assumes), one update_policy after a warm-up
step (so AdamW's state exists, as in every step but the first). The update's peak is the
tracker's peak total less parameters, buffers and optimizer state: activations, the
vocabulary-sized tensors and the gradients, the part the plan models beyond counting weights.

    python -m tools.memcheck                  # the grid of docs/performance.md (minutes)
    python -m tools.memcheck --preset tiny --quick
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from PIL import Image

import memplan
import update
import vlm
from config import Config
from data_and_utils import solver_prompt
from distributed import Dist
from tools.tiny import build_tiny_model

PRESETS = {  # build_tiny_model keyword arguments
    "tiny": dict(hidden=128, layers=2, intermediate=256, heads=4, kv_heads=2, vocab=1024),
    "mid": dict(hidden=512, layers=4, intermediate=1376, heads=8, kv_heads=2, vocab=4096),
}
GRID = [  # (B, N, L, checkpointing, micro_batch)
    (1, 5, 32, False, 0), (1, 5, 96, False, 0), (2, 5, 64, False, 0), (4, 5, 32, False, 0),
    (1, 3, 64, False, 0), (2, 5, 64, False, 5), (2, 5, 64, False, 2), (1, 5, 64, True, 0),
    (2, 5, 64, True, 5), (4, 5, 32, True, 10),
]


def tracker():
    """torch's MemTracker, its storage accounting and peak without its per-module hooks: those
    allow one call of each root module per tracker, and the update calls the model several
    times (reference, prompt, completions) and runs backward and the optimizer step."""
    from torch._guards import active_fake_mode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils._python_dispatch import TorchDispatchMode

    class FlatMemTracker(MemTracker):
        def __enter__(self):
            self._fake_mode_on_entry = active_fake_mode()
            self._register_global_optimizer_hook()
            self._track_resize()
            self._peak_mem_snap = self.get_tracker_snapshot()
            self._peak_mem = {d: snap["Total"] for d, snap in self._peak_mem_snap.items()}
            TorchDispatchMode.__enter__(self)
            self._depth += 1
            return self

        def __exit__(self, *args):
            self._depth -= 1
            self._deregister_param_and_optimizer_hooks()
            self._restore_resize()
            TorchDispatchMode.__exit__(self, *args)
    return FlatMemTracker()


def build(preset: str, root: str) -> str:
    return build_tiny_model(os.path.join(root, f"memcheck-{preset}"), layout="hub",
                            **PRESETS[preset])


def measure(model_dir: str, B: int, N: int, L: int, checkpointing: bool, micro_batch: int,
            image_px: int = 112) -> dict:
    """{"measured", "plan", "prompt"}: the update's peak bytes and the plan's figure for it."""
    cfg = Config(solver_model=model_dir, proposer_model=model_dir, use_lora_solver=True,
                 use_lora_proposer=True, dtype="float32", device_map="cpu",
                 gradient_checkpointing=checkpointing, update_micro_batch=str(micro_batch),
                 images_per_step=B, num_solver_samples=N, max_new_tokens_solver=L)
    torch.manual_seed(0)
    policies = vlm.build_policies(cfg)
    solver = policies["solver"]
    if checkpointing:
        solver.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    images = [Image.new("RGB", (image_px, image_px), (40 * b, 90, 200)) for b in range(B)]
    prompt = vlm.make_prompts(solver, images, [solver_prompt("How many circles?")] * B)
    vocab = solver.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (B * N, L), generator=torch.Generator().manual_seed(1))
    roll = vlm.Rollout([""] * (B * N), ids, torch.ones_like(ids))
    episode = update.Episode(prompt, roll, [0.0] * (B * N))
    adv = torch.linspace(-1, 1, B * N)
    opt = torch.optim.AdamW(solver.parameters(), lr=1e-4)
    update.update_policy(cfg, solver, opt, episode, adv, 0.01, Dist())  # AdamW state exists
    mt = tracker()
    mt.track_external(solver.model, opt)
    with mt:
        update.update_policy(cfg, solver, opt, episode, adv, 0.01, Dist())
    peak = mt.get_tracker_snapshot("peak")[torch.device("cpu")]
    measured = peak["Total"] - sum(peak.get(k, 0) for k in ("Parameter", "Buffer", "Optstate"))
    shapes = memplan.shapes_of(*memplan.read_model(model_dir))
    act, logits = memplan.update_bytes(cfg, shapes, prompt.length, micro_batch or B * N,
                                       checkpointing)
    grads = memplan.lora_params(cfg, shapes) * 4
    return {"measured": measured, "plan": act + logits + grads, "prompt": prompt.length}


def table(rows: list[tuple]) -> str:
    out = ["| model | B | N | L | checkpointing | micro-batch | prompt | measured MiB | plan MiB "
           "| plan / measured |", "|---|---|---|---|---|---|---|---|---|---|"]
    for preset, (B, N, L, gc, mb), r in rows:
        out.append(f"| {preset} | {B} | {N} | {L} | {'on' if gc else 'off'} | {mb or 'all'} | "
                   f"{r['prompt']} | {r['measured'] / 2**20:.2f} | {r['plan'] / 2**20:.2f} | "
                   f"{r['plan'] / r['measured']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny,mid", help="comma-separated: tiny, mid")
    p.add_argument("--root", default="runs", help="where the models are built")
    p.add_argument("--quick", action="store_true", help="the first three grid points only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for preset in args.preset.split(","):
        model = build(preset, args.root)
        for point in GRID[:3] if args.quick else GRID:
            rows.append((preset, point, measure(model, *point)))
            print(rows[-1], flush=True)
    print(table(rows))
    worst = max(abs(r["plan"] / r["measured"] - 1) for _, _, r in rows)
    print(f"largest deviation: {worst:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
