"""One data-parallel solver update, for tests/test_distributed.py (not a test file itself).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_update.py MODEL DATA OUT
Each rank samples its own rollout, then update.update_policy averages the gradients; every rank
saves its rollout and its resulting adapter so a single process can redo the update.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
import update  # noqa: E402
import vlm  # noqa: E402
from sampling import Sampling
from config import Config  # noqa: E402
from data_and_utils import ImagePool, solver_prompt  # noqa: E402
from distributed import Dist  # noqa: E402

BETA = 0.05


def setup(model: str, data: str):
    """Config, policies (seeded LoRA init, as in train.py) and the image pool."""
    cfg = Config(solver_model=model, proposer_model=model, use_lora_solver=True,
                 use_lora_proposer=True, dtype="float32", device_map="cpu", lora_dropout=0.0,
                 lr=1e-2, data_dir=data)
    train.seed_all(cfg.seed)
    policies = vlm.build_policies(cfg)
    pool = ImagePool(data, [], cfg.seed, cfg.max_pixels)
    pool.min_pixels, pool.max_pixels, pool.factor = vlm.image_sizing(
        policies["solver"].processor, cfg.max_pixels)
    return cfg, policies, pool


def prompt_for(policy, pool, rank: int):
    _, image = pool.get(rank)
    return vlm.make_prompt(policy, image, solver_prompt("How many shapes are there?"))


def advantages(rank: int) -> torch.Tensor:
    return torch.tensor([0.5, -0.2, 0.1]) * (rank + 1)


def main(model: str, data: str, out: str):
    dist = Dist()
    try:
        update_and_save(model, data, out, dist)
    except BaseException:  # as in train.train: no barrier after an error, which may be ours alone
        dist.close(wait=False)
        raise
    dist.close()  # gloo worker threads must be joined before exit (Dist.close says why)


def update_and_save(model: str, data: str, out: str, dist: Dist):
    cfg, policies, pool = setup(model, data)
    solver = policies["solver"]
    train.seed_all(cfg.seed + dist.rank)
    prompt = prompt_for(solver, pool, dist.rank)
    roll = vlm.generate(solver, prompt, 3, Sampling(max_new_tokens=12))
    opt = torch.optim.AdamW(solver.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    update.update_policy(cfg, solver, opt, update.Episode(prompt, roll, []),
                        advantages(dist.rank), BETA, dist)
    torch.save({"texts": roll.texts, "ids": roll.ids, "mask": roll.mask,
                "params": [p.detach().clone() for p in solver.parameters()]},
               os.path.join(out, f"rank{dist.rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
