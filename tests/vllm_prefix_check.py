"""Prefix caching in the vLLM rollout engine changes nothing sampled: run inside the vLLM
environment by tests/test_vllm_prefix.py, it samples the same seeded requests (2 images, N = 4,
both roles) with prefix caching on and off, twice each with the cache on (the second call must
not reuse the first's blocks: the cache is reset at every generate), and prints one JSON line.

    .compat/vllm/bin/python tests/vllm_prefix_check.py MODEL IMAGES
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train  # noqa: E402
import vllm_engine  # noqa: E402
from config import Config  # noqa: E402
from data_and_utils import ImagePool  # noqa: E402
from distributed import Dist  # noqa: E402
from runtime import seed_all  # noqa: E402
from vlm import ROLES  # noqa: E402


def sample(model: str, images: str, prefix_caching: bool) -> tuple[list, dict]:
    """Two rollouts of the same 2 images with the same request seeds, and the engine's
    prefix-cache counters."""
    cfg = Config(data_dir=images, solver_model=model, proposer_model=model, dtype="float32",
                 device_map="cpu", use_lora_solver=True, use_lora_proposer=True,
                 lora_dropout=0.0, rollout_engine="vllm", num_solver_samples=4,
                 max_new_tokens_solver=24, max_new_tokens_proposer=16,
                 vllm_prefix_caching=prefix_caching)
    pool = ImagePool(cfg.data_dir, [], cfg.seed, cfg.max_pixels)
    seed_all(0)
    policies, _ = train.build_models(cfg, pool)
    engine = vllm_engine.start(cfg, policies, Dist(), pool.max_pixels, pool.factor)
    cached = []  # prompt tokens each finished request found in the prefix cache
    real_run = vllm_engine.VLLMEngine._run

    def run(self, ids, stop):
        done = real_run(self, ids, stop)
        cached.append([out.num_cached_tokens for out in done])
        return done
    vllm_engine.VLLMEngine._run = run
    try:
        imgs = [pool.get(i)[1] for i in range(2)]
        runs = [train.rollout(cfg, policies, imgs, None, engine=engine, key=(1, 0))
                for _ in range(2)]
    finally:
        vllm_engine.VLLMEngine._run = real_run
        engine.close()
    return [{r: (eps[r].rollout.ids, eps[r].rollout.logprobs) for r in ROLES}
            for eps in runs], cached


def compare(a: dict, b: dict) -> dict:
    return {r: {"same_ids": torch.equal(a[r][0], b[r][0]),
                "max_logprob_gap": (a[r][1] - b[r][1]).abs().max().item()} for r in ROLES}


def main() -> None:
    model, images = sys.argv[1], sys.argv[2]
    on, cached_on = sample(model, images, True)
    off, cached_off = sample(model, images, False)
    print(json.dumps({"on_vs_off": compare(on[0], off[0]), "on_again": compare(on[0], on[1]),
                      "cached_tokens_on": cached_on, "cached_tokens_off": cached_off}),
          flush=True)


if __name__ == "__main__":
    main()
