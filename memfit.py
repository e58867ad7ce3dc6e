"""What fits: --update_micro_batch auto, automatic gradient checkpointing and the refusal,
chosen from the memory plan (memplan.py) and a device's free memory; `python run.py plan`.

On a GPU the budget is its free memory at start (or --memory_budget_gib). On the CPU there is no
budget unless --memory_budget_gib gives one: auto then means all completions in one chunk and no
checkpointing, today's behaviour, so CPU runs (tests, the demo, exact resume) are unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from memplan import (GIB, HEADROOM, Plan, PlanError, Shapes, fmt, image_tokens, make_plan,
                     micro_batch_options)

log = logging.getLogger("ireasoner")


# ---------------------------------------------------------------- what fits
@dataclass
class Fit:
    plan: Plan
    budget: int | None          # bytes the plan must fit in (None: no budget, the CPU)
    note: str                   # how micro-batch and checkpointing were chosen


def options(cfg) -> list[tuple[int, bool]]:
    """(micro_batch, checkpointing) in the order auto tries them: whole images without
    checkpointing, then with it, then part of an image; explicit flags pin their value."""
    sizes = micro_batch_options(cfg)
    N = cfg.num_solver_samples
    if cfg.update_micro_batch != "auto":
        sizes = [int(cfg.update_micro_batch)]
    checks = [False, True] if cfg.gradient_checkpointing is None else [cfg.gradient_checkpointing]
    whole = [(m, c) for c in checks for m in sizes if m == 0 or m >= N]
    part = [(m, c) for c in checks for m in sizes if 0 < m < N]
    return whole + part


def fits(plan: Plan, budget: int) -> bool:
    return plan.peak <= budget * HEADROOM


def choose(cfg, shapes: Shapes, budget: int | None, device: str = "cuda",
           vllm_bytes: int = 0, sleeps: bool = False) -> Fit:
    """The first option that fits `budget`; with no budget (the CPU), today's behaviour: all
    completions in one chunk and checkpointing only if asked. Raises PlanError, naming the
    flags to change, when nothing fits."""
    if budget is None:
        m = 0 if cfg.update_micro_batch == "auto" else int(cfg.update_micro_batch)
        plan = make_plan(cfg, shapes, m, bool(cfg.gradient_checkpointing), device, vllm_bytes,
                         vllm_sleeps=sleeps)
        return Fit(plan, None, "no device budget (CPU): no automatic micro-batching or "
                               "checkpointing")
    for m, c in options(cfg):
        plan = make_plan(cfg, shapes, m, c, device, vllm_bytes, vllm_sleeps=sleeps)
        if fits(plan, budget):
            return Fit(plan, budget, _note(cfg, plan))
    raise PlanError(refusal(cfg, shapes, budget, device, vllm_bytes, sleeps))


def _note(cfg, plan: Plan) -> str:
    parts = []
    if cfg.update_micro_batch == "auto":
        parts.append(f"--update_micro_batch auto -> {plan.micro_batch}")
    if cfg.gradient_checkpointing is None:
        parts.append("gradient checkpointing " + ("switched on: the plan needs it"
                                                  if plan.checkpointing else "off (not needed)"))
    return "; ".join(parts) or "as the flags say"


def refusal(cfg, shapes: Shapes, budget: int, device: str, vllm_bytes: int,
            sleeps: bool = False) -> str:
    """One line: what the plan needs at best, and the flags that would make it fit."""
    usable = budget * HEADROOM
    pinned = options(cfg)
    best = min((make_plan(cfg, shapes, m, c, device, vllm_bytes, vllm_sleeps=sleeps)
                for m, c in pinned),
               key=lambda p: p.peak)
    have = f"{fmt(int(usable))} of the {fmt(budget)} free"
    head = (f"the memory plan needs {fmt(best.peak)} per rank at best (--update_micro_batch "
            f"{best.micro_batch}, checkpointing {'on' if best.checkpointing else 'off'}), "
            f"{have} is usable")
    if best.fixed + best.vllm > usable:
        return (f"{head}: the weights, adapters and optimizer state alone take "
                f"{fmt(best.fixed + best.vllm)}; use a smaller model, --dtype bfloat16, LoRA "
                f"(--use_lora_solver --use_lora_proposer) or a larger GPU")
    loose = [(m, c) for m in micro_batch_options(cfg) for c in (False, True)]
    for m, c in loose:
        plan = make_plan(cfg, shapes, m, c, device, vllm_bytes, vllm_sleeps=sleeps)
        if fits(plan, budget):
            return (f"{head}: it fits with --update_micro_batch {m} --gradient_checkpointing "
                    f"{str(c).lower()} ({fmt(plan.peak)}); drop or change the explicit flags")
    pixels = fitting_pixels(cfg, shapes, budget, device, vllm_bytes, sleeps)
    if pixels:
        return (f"{head}, with images of up to {best.image_tokens} tokens: set --max_pixels "
                f"{pixels} (or lower --images_per_step {cfg.images_per_step}, "
                f"--max_new_tokens_solver {cfg.max_new_tokens_solver})")
    return (f"{head}: lower --images_per_step ({cfg.images_per_step}), --num_solver_samples "
            f"({cfg.num_solver_samples}) or --max_new_tokens_solver "
            f"({cfg.max_new_tokens_solver})")


def fitting_pixels(cfg, shapes: Shapes, budget: int, device: str, vllm_bytes: int,
                   sleeps: bool = False) -> int:
    """The largest --max_pixels (a multiple of the token area) at which the leanest option
    fits, or 0."""
    def ok(tokens):
        return fits(make_plan(cfg, shapes, 1, True, device, vllm_bytes, images=tokens,
                              vllm_sleeps=sleeps), budget)
    lo, hi = 4, image_tokens(cfg, shapes)
    if not ok(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo * shapes.pixels_per_token


def report(fit: Fit, cfg, free: int | None = None, device: str = "") -> str:
    """The plan as a few lines: the breakdown, and where there is one the free memory."""
    p = fit.plan
    lines = [f"memory plan per rank ({cfg.solver_model}, {cfg.dtype}, B={cfg.images_per_step}, "
             f"N={cfg.num_solver_samples}, {cfg.max_new_tokens_solver}-token answers, prompt "
             f"{p.prompt_tokens} tokens of which image {p.image_tokens})",
             f"  weights {fmt(p.weights)} | adapters + optimizer state {fmt(p.adapters)} | "
             f"CUDA context {fmt(p.context)}",
             f"  sampling KV cache {fmt(p.sampling_kv)} | update activations "
             f"{fmt(p.update_activations)} + logits/KL {fmt(p.update_logits)} (micro-batch "
             f"{p.micro_batch}, checkpointing {'on' if p.checkpointing else 'off'}) | vLLM "
             f"{fmt(p.vllm)}",
             f"  peak {fmt(p.peak)}" + (f"; {device} free {fmt(free)}" if free is not None else
                                        "; no GPU: nothing to fit")]
    lines.append(f"  {fit.note}")
    return "\n".join(lines)


# ---------------------------------------------------------------- at the start of training
def device_budget(cfg, device_map: str) -> tuple[int | None, int | None, str]:
    """(budget, free bytes, device name) for the plan. device_map auto over several GPUs shards
    one model, so their free memory adds up (the per-rank plan is then conservative)."""
    import torch
    budget = int(cfg.memory_budget_gib * GIB) or None
    if device_map == "cpu" or not torch.cuda.is_available():
        return budget, None, "cpu"
    devices = (list(range(torch.cuda.device_count())) if device_map == "auto"
               else [torch.device(device_map).index or 0])
    free = sum(torch.cuda.mem_get_info(d)[0] for d in devices)
    name = "cuda:" + ",".join(map(str, devices))
    return budget or free, free, name


def plan_run(cfg, device_map: str, is_main: bool = True) -> Fit | None:
    """Before any weight is loaded: the plan against the device's free memory. Resolves
    --update_micro_batch auto (cfg.auto_micro_batch), an unset --gradient_checkpointing and,
    for --rollout_engine vllm on a GPU, the engine's KV cache (cfg.vllm_kv_cache_bytes);
    raises PlanError when nothing fits. A config that cannot be read is not refused here: the
    loader, which cannot read it either, says why in its own words."""
    from memplan import read_model, shapes_of
    try:
        shapes = shapes_of(*read_model(cfg.solver_model, download=True))
    except PlanError as e:  # loading fails next, with the loader's own one-line error
        log.warning("no memory plan (%s): all completions in one chunk, checkpointing only if "
                    "asked", e)
        cfg.auto_micro_batch, cfg.gradient_checkpointing = 0, bool(cfg.gradient_checkpointing)
        return None
    budget, free, device = device_budget(cfg, device_map)
    fit = fit_with_engine(cfg, shapes, budget, device)
    cfg.auto_micro_batch = fit.plan.micro_batch
    if cfg.gradient_checkpointing is None:
        cfg.gradient_checkpointing = fit.plan.checkpointing
    if is_main:
        log.info("%s", report(fit, cfg, free, device))
    return fit


def fit_with_engine(cfg, shapes: Shapes, budget: int | None, device: str) -> Fit:
    """choose(), with a vLLM engine on a GPU given what the trainer leaves: all the rest of the
    budget, less the update's peak unless the engine sleeps through it (level 1, on GPUs)."""
    from memplan import prompt_tokens, vllm_min_bytes, vllm_weight_bytes
    if cfg.rollout_engine != "vllm" or device == "cpu" or budget is None:
        return choose(cfg, shapes, budget, device)
    sleeps = device.startswith("cuda")
    if cfg.vllm_gpu_memory_utilization:  # explicit: that share of the card, as vLLM counts it
        return choose(cfg, shapes, budget, device,
                      int(cfg.vllm_gpu_memory_utilization * budget), sleeps)
    least = vllm_min_bytes(cfg, shapes, prompt_tokens(cfg, shapes))
    fit = choose(cfg, shapes, budget, device, least, sleeps)
    p = fit.plan
    share = int(budget * HEADROOM) - p.fixed - (0 if sleeps else p.update)
    p.vllm = share
    cfg.vllm_kv_cache_bytes = share - vllm_weight_bytes(cfg, shapes)
    fit.note += (f"; vLLM gets {fmt(share)} (KV cache {fmt(cfg.vllm_kv_cache_bytes)}), "
                 f"{'asleep' if sleeps else 'awake'} during the update")
    return fit


# ---------------------------------------------------------------- python run.py plan
def main(argv: list[str]) -> int:
    """`python run.py plan <training flags>`: the plan for those flags, on this machine's GPU,
    or for --memory_budget_gib, or (neither) an 80 GiB card."""
    import sys
    from config import parse_config
    from memplan import read_model, shapes_of
    try:
        cfg = parse_config(argv)
        shapes = shapes_of(*read_model(cfg.solver_model))
        budget, free, device = device_budget(cfg, cfg.device_map)
        if device == "cpu":  # planning for a GPU on a machine without one
            budget = budget or 80 * GIB
            device = (f"cuda (no GPU here: a card with {fmt(budget)} free assumed; "
                      f"--memory_budget_gib sets another)")
        fit = fit_with_engine(cfg, shapes, budget, device)
    except ValueError as e:  # PlanError and Config's checks: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(fit, cfg, free if free is not None else budget, device.split(" (")[0]
                 if free is not None else device))
    return 0
