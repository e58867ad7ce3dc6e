"""The cost of --answer_match math against string: the reward phase of a step (rewards.
compute_rewards_batch) on the same answers, timed in turns within one run.

    python scripts/bench_answer_match.py                 # 200 steps, 1 image of N=5 each
    python scripts/bench_answer_match.py --images 8 --steps 100

Answers are drawn as a math benchmark's would be: integers, decimals, fractions, negative
numbers, expressions, choice letters ("(B)", "B) 12") and words, several spellings of one value
per image. Each step's answers are new numbers, so math-verify's parse cache (answers.py) does not
help: the worst case; repeated answers in a real run cost less. The step embedder is a stub
(a hash to a vector), so the figures isolate the vote and the scoring; a real step adds its
embedder forward to both. Figures are medians of per-step wall and CPU seconds.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rewards  # noqa: E402
from config import Config  # noqa: E402


def spellings(rng: random.Random) -> list[str]:
    """One value in several forms, and a few other answers."""
    a, b = rng.randint(1, 99), rng.randint(2, 9)
    value = [f"{a}/{b}", f"{a / b:.6g}", f"\\frac{{{a}}}{{{b}}}"]
    letter = rng.choice("ABCD")
    return value + [str(-a), str(a * b), f"({letter})", f"{letter}) {a}", "blue", f"{a}x+{b}",
                    f"{b}+{a}x", f"{a}.0"]


def answers(rng: random.Random, n: int) -> list[str]:
    pool = spellings(rng)
    steps = "Step 1: read the figure.\nStep 2: compute."
    return [f"<think>{steps}</think><answer>{rng.choice(pool)}</answer>" for _ in range(n)]


def embed(steps: list[str]) -> torch.Tensor:
    return torch.stack([torch.tensor([float((hash(s) >> k) & 255) for k in range(0, 64, 8)])
                        for s in steps]) if steps else torch.zeros(0, 8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--images", type=int, default=1, help="images per step")
    p.add_argument("--samples", type=int, default=5, help="N answers per image")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfgs = {m: Config(answer_match=m) for m in ("string", "math")}
    rng = random.Random(args.seed)
    rewards.compute_rewards_batch(cfgs["math"], [answers(rng, args.samples)], 1, embed)  # imports
    times = {m: ([], []) for m in cfgs}
    votes = {m: [] for m in cfgs}
    for step in range(1, args.steps + 1):
        groups = [answers(rng, args.samples) for _ in range(args.images)]
        for m in (("string", "math") if step % 2 else ("math", "string")):  # turns: fair load
            w, c = time.perf_counter(), time.process_time()
            out = rewards.compute_rewards_batch(cfgs[m], groups, step, embed)
            times[m][0].append(time.perf_counter() - w)
            times[m][1].append(time.process_time() - c)
            votes[m] += [r["dominant_count"] for r in out]
    med = {m: (statistics.median(w), statistics.median(c)) for m, (w, c) in times.items()}
    print(f"reward phase per step ({args.images} image(s) x N={args.samples}, {args.steps} steps, "
          f"medians):")
    for m, (w, c) in med.items():
        print(f"  {m:6s}  wall {w * 1e3:8.2f} ms  cpu {c * 1e3:8.2f} ms  "
              f"mean majority {statistics.mean(votes[m]):.2f}/{args.samples}")
    print(f"math / string: wall {med['math'][0] / med['string'][0]:.1f}x, "
          f"cpu {med['math'][1] / med['string'][1]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
