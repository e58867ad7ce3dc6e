"""One data-parallel Solver update with --skip_zero_std where rank 0's group has a reward spread
and rank 1's has none, for tests/test_objective.py (not a test file itself).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_skip.py MODEL DATA OUT
"""
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddp_update  # noqa: E402
import train  # noqa: E402
import update  # noqa: E402
import vlm  # noqa: E402
from distributed import Dist  # noqa: E402
from sampling import Sampling  # noqa: E402

REWARDS = ([1.0, 0.0, 0.0], [0.5, 0.5, 0.5])  # rank 0: a spread; rank 1: none


def perturb(solver) -> None:
    """A trained-looking adapter (the same on every rank), so the KL to the base is not 0."""
    with torch.no_grad():
        for name, p in solver.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)


def main(model: str, data: str, out: str):
    dist = Dist()
    try:
        cfg, policies, pool = ddp_update.setup(model, data)
        cfg = replace(cfg, skip_zero_std=True, baseline="group", num_solver_samples=3)
        solver = policies["solver"]
        perturb(solver)
        train.seed_all(cfg.seed + dist.rank)
        prompt = ddp_update.prompt_for(solver, pool, dist.rank)
        roll = vlm.generate(solver, prompt, 3, Sampling(max_new_tokens=12))
        opt = torch.optim.AdamW(solver.parameters(), lr=cfg.lr)
        before = [p.detach().clone() for p in solver.parameters()]
        st = train.TrainState(kl_coef={"solver": 0.05, "proposer": 0.05})
        fields = update.update_role(cfg, "solver", policies, {"solver": opt},
                                    update.Episode(prompt, roll, list(REWARDS[dist.rank])), st,
                                    dist)
        torch.save({"before": before, "after": [p.detach().clone() for p in solver.parameters()],
                    "texts": roll.texts, "ids": roll.ids, "mask": roll.mask},
                   os.path.join(out, f"rank{dist.rank}.pt"))
        with open(os.path.join(out, f"rank{dist.rank}.json"), "w") as f:
            json.dump(fields, f)
    except BaseException:
        dist.close(wait=False)
        raise
    dist.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
