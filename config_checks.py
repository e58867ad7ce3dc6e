"""The checks of a Config, run by its __post_init__: choices, ranges and flags that conflict.

Each raises ValueError saying what to change (parse_config prints it as one line). Grouped by
topic; the choices each flag takes are named here and shown in config.py's help texts.
"""
from __future__ import annotations

import logging
import os

from answers import check_match
from lr_schedule import LR_SCHEDULERS
from objective import LOSS_AGGS

WANDB_MODES = ("disabled", "offline", "online")
# Validation metrics where higher is better (validate.py).
KEEP_BEST_METRICS = ("val_acc_first", "val_acc_mean", "val_maj_at_n", "val_agreement",
                     "val_step_agreement")
DTYPES = ("bfloat16", "float16", "float32")
STEP_EMBEDDERS = ("input_embeddings", "hidden_states")
BASELINES = ("ema", "group")
UPDATE_MODES = ("batched", "per_sample")
KL_ESTIMATORS = ("exact", "k3")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
ROLLOUT_ENGINES = ("hf", "vllm")

log = logging.getLogger("ireasoner")


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def check(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


def check_sampling(top_k, repetition_penalty):
    check(top_k is None or top_k >= 0, f"--top_k must be >= 0 (0 = off), got {top_k}")
    check(repetition_penalty is None or repetition_penalty > 0,
          f"--repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")


def check_config(cfg) -> None:
    """Every check, in the order a user meets them."""
    check_ranges(cfg)
    check_roles(cfg)
    check_engine(cfg)
    warn_no_signal(cfg)
    check_memory(cfg)
    check_validation(cfg)
    check_objective(cfg)


def check_ranges(cfg) -> None:
    """Each flag on its own: a choice among its names, or a number in its range."""
    for name, choices in (("wandb_mode", WANDB_MODES), ("dtype", DTYPES),
                          ("step_embedder", STEP_EMBEDDERS), ("baseline", BASELINES),
                          ("update_mode", UPDATE_MODES), ("kl_estimator", KL_ESTIMATORS),
                          ("attn_implementation", ATTN_IMPLEMENTATIONS)):
        check(getattr(cfg, name) in choices, f"--{name} must be one of {choices}")
    for name in ("num_solver_samples", "total_steps", "lora_r", "lora_alpha", "save_every",
                 "max_checkpoints", "max_new_tokens_solver",
                 "max_new_tokens_proposer", "max_reasoning_steps", "step_embed_max_tokens",
                 "min_step_group_size", "images_per_step"):
        check(getattr(cfg, name) >= 1, f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "kl_target", "kl_coef", "step_sim_temperature",
                 "proposer_reward_sigma", "len_penalty_target_words"):
        check(getattr(cfg, name) > 0, f"--{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("weight_decay", "grad_clip", "kl_adapt_rate", "kl_error_clip", "solver_soft_gamma",
                 "len_penalty_weight", "step_group_density_gamma", "step_position_decay",
                 "clear_cache_every", "max_pixels",
                 "proposer_update_freq", "temp", "wandb_log_images_every"):
        check(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    check(0 < cfg.top_p <= 1, f"--top_p must be in (0, 1], got {cfg.top_p}")
    check_sampling(cfg.top_k, cfg.repetition_penalty)
    check(0 <= cfg.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    check(0 <= cfg.baseline_momentum < 1,
          f"--baseline_momentum must be in [0, 1), got {cfg.baseline_momentum}")
    check(0 <= cfg.step_reward_warmup < 1,
          f"--step_reward_warmup must be in [0, 1), got {cfg.step_reward_warmup}")
    for name in ("step_reward_weight_start", "step_reward_weight_end"):
        check(0 <= getattr(cfg, name) <= 1, f"--{name} must be in [0, 1]")


def check_roles(cfg) -> None:
    """LoRA, the vision tower and the published --device."""
    lora_flags = " and ".join(f"--use_lora_{r}" for r in ("solver", "proposer")
                              if getattr(cfg, f"use_lora_{r}"))
    if not cfg.freeze_vision and lora_flags:
        # Published: peft froze every base weight of a LoRA role, the tower's included, so
        # the flag changed nothing there; the published train.sh users keep working.
        log.warning("--no_freeze_vision does not train the vision tower of a LoRA role (%s): its "
                    "base weights stay frozen, as in the published code; it applies to "
                    "full-finetune roles only", lora_flags)
    if cfg.device and cfg.device_map == "cpu":
        cfg.device_map = cfg.device  # the published model.to(device) after loading
    check(bool(cfg.lora_targets_list) or not lora_flags,
          f"--lora_targets is empty but {lora_flags} is set: name at least one module, "
          f"e.g. q_proj,v_proj")
    check(cfg.images_per_step == 1 or cfg.update_mode != "per_sample",
          f"--update_mode per_sample conflicts with --images_per_step "
          f"{cfg.images_per_step}: per_sample steps image by image, as published; use "
          f"--update_mode batched or --images_per_step 1")


def check_engine(cfg) -> None:
    """--rollout_engine vllm and its flags."""
    check(cfg.rollout_engine in ROLLOUT_ENGINES,
          f"--rollout_engine must be one of {ROLLOUT_ENGINES}, got {cfg.rollout_engine!r}")
    if cfg.rollout_engine == "vllm":
        # Full fine-tuning would mean reloading the engine's weights after every update, and
        # a second base a second engine: both are refused rather than run slowly.
        check(cfg.use_lora_solver and cfg.use_lora_proposer
              and cfg.solver_model == cfg.proposer_model and cfg.freeze_vision,
              "--rollout_engine vllm serves both roles as LoRA adapters of one frozen base: "
              "it needs --use_lora_solver, --use_lora_proposer, one model in --solver_model "
              "and --proposer_model, and no --no_freeze_vision (full fine-tuning, two bases "
              "or a trained vision tower: --rollout_engine hf)")
    check(cfg.rollout_is_cap >= 0, f"--rollout_is_cap must be >= 0, got {cfg.rollout_is_cap}")
    check(not cfg.rollout_is_cap or cfg.rollout_engine == "vllm",
          "--rollout_is_cap corrects for a rollout engine other than the trainer: it needs "
          "--rollout_engine vllm")
    check(0 <= cfg.vllm_gpu_memory_utilization <= 1,
          f"--vllm_gpu_memory_utilization must be in [0, 1], got "
          f"{cfg.vllm_gpu_memory_utilization}")
    check(cfg.vllm_cpu_kv_cache_gib >= 1,
          f"--vllm_cpu_kv_cache_gib must be >= 1, got {cfg.vllm_cpu_kv_cache_gib}")


def warn_no_signal(cfg) -> None:
    """Settings that train nothing, said before anything loads."""
    if cfg.num_solver_samples == 1:
        log.warning("--num_solver_samples 1: a single answer is its own majority, so every "
                    "image's outcome reward is the same (p = 1; only the length penalty varies) "
                    "and the answer entropy is 0 (the Proposer's reward is constant): "
                    "self-consistency needs N >= 2 (default 5)")


def check_memory(cfg) -> None:
    """--update_micro_batch: auto (from the memory plan, memfit.py) or a number of completions."""
    micro = str(cfg.update_micro_batch)
    check(micro == "auto" or micro.isdigit(),
          f"--update_micro_batch must be auto or an integer >= 0, got {micro}")
    cfg.update_micro_batch = micro if micro == "auto" else int(micro)
    check(cfg.memory_budget_gib >= 0, f"--memory_budget_gib must be >= 0, got {cfg.memory_budget_gib}")


def check_validation(cfg) -> None:
    """Validation, keep-best, the collapse alarms and answer matching (docs/validation.md)."""
    check_match(cfg.answer_match)
    check(not cfg.val_data or os.path.isfile(cfg.val_data),
          f"--val_data {cfg.val_data} does not exist")
    for name in ("val_every", "val_samples"):
        check(getattr(cfg, name) >= 1, f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("val_max_rows", "collapse_patience", "collapse_val_patience",
                 "collapse_val_margin", "collapse_min_entropy", "collapse_min_length"):
        check(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("collapse_one_answer_frac", "collapse_zero_std_frac"):
        check(0 < getattr(cfg, name) <= 1, f"--{name} must be in (0, 1], got {getattr(cfg, name)}")
    for name in ("keep_best", "collapse_val_metric"):
        check(getattr(cfg, name) in ("", *KEEP_BEST_METRICS),
              f"--{name} must be one of {KEEP_BEST_METRICS}, got {getattr(cfg, name)!r}")
        check(not getattr(cfg, name) or bool(cfg.val_data),
              f"--{name} needs validation: add --val_data labeled.jsonl")


def check_objective(cfg) -> None:
    """The objective knobs (objective.py, lr_schedule.py)."""
    check(cfg.lr_scheduler in LR_SCHEDULERS,
          f"--lr_scheduler must be one of {LR_SCHEDULERS}, got {cfg.lr_scheduler!r}")
    check(0 <= cfg.warmup_steps <= cfg.total_steps,
          f"--warmup_steps must be in [0, --total_steps], got {cfg.warmup_steps}")
    check(0 <= cfg.warmup_ratio <= 1, f"--warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    check(not (cfg.warmup_steps and cfg.warmup_ratio),
          "give --warmup_steps or --warmup_ratio, not both")
    check(cfg.loss_agg in LOSS_AGGS, f"--loss_agg must be one of {LOSS_AGGS}, got {cfg.loss_agg!r}")
    check(cfg.num_iterations >= 1, f"--num_iterations must be >= 1, got {cfg.num_iterations}")
    check(0 <= cfg.clip_eps < 1, f"--clip_eps must be in [0, 1), got {cfg.clip_eps}")
    check(cfg.clip_eps_high is None or (cfg.clip_eps > 0 and cfg.clip_eps_high >= 0),
          "--clip_eps_high needs --clip_eps > 0 and must be >= 0")
    check(cfg.num_iterations == 1 or cfg.clip_eps > 0,
          f"--num_iterations {cfg.num_iterations} reuses each rollout for several steps: "
          f"bound the ratio with --clip_eps (e.g. 0.2)")
    check(cfg.num_iterations == 1 or cfg.update_mode == "batched",
          "--num_iterations > 1 needs --update_mode batched")
    check(not (cfg.clip_eps and cfg.rollout_is_cap),
          "--clip_eps already weighs each token by its ratio to the sampler's policy: "
          "drop --rollout_is_cap")
    check(cfg.entropy_coef >= 0, f"--entropy_coef must be >= 0, got {cfg.entropy_coef}")
    check(not cfg.scale_advantages or cfg.baseline == "group",
          "--scale_advantages divides r - mean(group) by the group's std (GRPO); with "
          "--baseline ema a unanimous group would get (r - b) / 1e-4: add --baseline group")
    for flag in ("scale_advantages", "skip_zero_std"):
        check(not getattr(cfg, flag) or cfg.num_solver_samples >= 2,
              f"--{flag} needs a reward spread: --num_solver_samples >= 2")
