"""Every option of the iReasoner trainer, in one dataclass.

The command line is generated from `Config` by `transformers.HfArgumentParser`, so the
defaults below are the only defaults. See all flags with:

    python train.py --help
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields

from typing import Optional


from cli import CommandLineError, DataclassParser
from answers import MATCHES, check_match
from config_checks import (ATTN_IMPLEMENTATIONS, BASELINES, DTYPES, KEEP_BEST_METRICS,
                           KL_ESTIMATORS, ROLLOUT_ENGINES, STEP_EMBEDDERS, UPDATE_MODES,
                           WANDB_MODES, check, check_config, check_sampling, split)
from data_and_utils import PROPOSER_PROMPT, QUESTION_PLACEHOLDER, SOLVER_PROMPT, read_prompt_file
from lr_schedule import LR_SCHEDULERS
from objective import LOSS_AGGS


def _help(text: str, aliases: tuple[str, ...] = (), **kw):
    """A field with its --help text; `aliases`: other flag names for it (the published
    parser's names where ours differ)."""
    metadata = {"help": text, **({"aliases": list(aliases)} if aliases else {})}
    return field(metadata=metadata, **kw)


@dataclass
class Config:
    # ---- data ----
    data_dir: str = _help("Folder of unlabeled images (scanned recursively).", default="")
    include_subfolders: str = _help(
        "Comma-separated first-level subfolders of data_dir to use (default: all).", default="")
    max_pixels: int = _help("Upper bound on image pixels after resizing (0 = the processor's own "
                            "limit, as published; Qwen2.5-VL: 12,845,056).", default=0)
    seed: int = _help("Seed for the image order, sampling and LoRA init.", default=42)

    # ---- models ----
    solver_model: str = _help("HF id or local folder of the Solver backbone.",
                              default="Qwen/Qwen2.5-VL-7B-Instruct")
    proposer_model: str = _help("HF id or local folder of the Proposer backbone.",
                                default="Qwen/Qwen2.5-VL-7B-Instruct")
    dtype: str = _help(f"Model dtype: one of {DTYPES}.", default="bfloat16")
    device_map: str = _help("'auto' shards one model over the visible GPUs (one process); 'local' "
                            "puts a full copy on each rank's own device (data parallel); or "
                            "'cpu', 'cuda:0'.", default="auto")
    device: str = _help("Published flag: where the published code moved a model that --device_map "
                        "cpu had put on the CPU; here --device X with --device_map cpu means "
                        "--device_map X. With any other --device_map it changes nothing (the "
                        "model's own device is used), as published.", default="")
    attn_implementation: str = _help(f"Attention kernel: one of {ATTN_IMPLEMENTATIONS}.",
                                     default="sdpa")
    gradient_checkpointing: Optional[bool] = _help(
        "Recompute activations in the update pass to save memory. Default: on when the memory "
        "plan needs it on a GPU (the log says so); off on the CPU. An explicit true/false wins.",
        default=None)
    freeze_vision: bool = _help("Freeze the vision tower (visual.*). --no_freeze_vision (or the "
                                "published --no-freeze-vision) trains it in full-finetune roles; "
                                "a LoRA role keeps it frozen either way, as published.",
                                default=True)

    # ---- LoRA ----
    use_lora_solver: bool = _help("Train the Solver as a LoRA adapter (else full language model).",
                                  default=False)
    use_lora_proposer: bool = _help("Train the Proposer as a LoRA adapter (else full LM).",
                                    default=False)
    lora_targets: str = _help("Comma-separated module names; matched in the language model only.",
                              default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA alpha.", default=32)
    lora_dropout: float = _help("LoRA dropout.", default=0.05)

    # ---- sampling ----
    num_solver_samples: int = _help("N: Solver answers sampled per question.", default=5)
    temp: float = _help("Sampling temperature (0 = greedy). The update scores each sampled token "
                        "with log_softmax(logits / temp), and the KL compares policy and "
                        "reference at the same temp.", default=1.0)
    top_p: float = _help("Nucleus sampling top-p, in (0, 1].", default=1.0)
    max_new_tokens_solver: int = _help("Max new tokens per Solver answer.", default=256)
    max_new_tokens_proposer: int = _help("Max new tokens for the Proposer's question.", default=128)
    top_k: Optional[int] = _help("Top-k sampling (0 = off). Default: off, whatever the model's "
                                 "generation_config.json says (see --merge_generation_config).",
                                 default=None)
    repetition_penalty: Optional[float] = _help(
        "HF repetition penalty over prompt + generated ids (1 = off). Default: off, whatever the "
        "model's generation_config.json says (see --merge_generation_config).", default=None)
    merge_generation_config: bool = _help(
        "Published behaviour: top_k and repetition_penalty not given as flags come from the "
        "model's generation_config.json (else HF's 50 and 1.0), as HF generate merged them for "
        "the published code. Qwen2.5-VL-7B-Instruct's sets top_k 1: greedy, all N answers the "
        "same, constant rewards.", default=False)
    lean_decode: bool = _help("Sample with the lean decode step where the model allows it "
                              "(--no_lean_decode: always the HF layers; same samples, slower).",
                              default=True)
    rollout_engine: str = _help(f"Who samples the rollouts: one of {ROLLOUT_ENGINES}. hf: our own "
                                f"loop over the HF model; vllm: an in-process vLLM engine per "
                                f"rank serving both LoRA adapters (docs/vllm.md).", default="hf")
    rollout_is_cap: float = _help("vllm only: weight each token's REINFORCE term by "
                                  "min(pi_train/pi_rollout, C), truncated importance sampling "
                                  "against engine/trainer mismatch (0 = off).", default=0.0)
    vllm_gpu_memory_utilization: float = _help(
        "vllm on a GPU: the share of the GPU's memory the engine may take (weights + KV cache), "
        "beside the trainer's own copy (0 = what the memory plan leaves free, given to it as "
        "kv_cache_memory_bytes).", default=0.0)
    vllm_cpu_kv_cache_gib: int = _help("vllm on the CPU: its KV cache in GiB "
                                       "(VLLM_CPU_KVCACHE_SPACE).", default=1)
    vllm_enforce_eager: bool = _help("vllm on a GPU: no CUDA graphs or torch.compile (faster "
                                     "start, slower steps; always so on the CPU).", default=False)
    proposer_prompt_file: str = _help("UTF-8 text file replacing the Proposer prompt.", default="")
    solver_prompt_file: str = _help("UTF-8 text file replacing the Solver prompt; must contain "
                                    "{question}.", default="")

    # ---- optimisation ----
    total_steps: int = _help("Training steps (images_per_step images on each rank each).",
                             default=2500)
    images_per_step: int = _help("B: images per step on each rank. Their B questions are sampled "
                                 "in one batched call, their B*N answers in another, and one "
                                 "Solver update covers all B*N (published recipe: 1).", default=1)
    lr: float = _help("AdamW learning rate (both roles).", default=1e-6)
    weight_decay: float = _help("AdamW weight decay.", default=0.01)
    grad_clip: float = _help("Global gradient-norm clip.", default=1.0)
    grad_clip_per_device: bool = _help("Published behaviour: clip each device's parameters to "
                                       "--grad_clip separately (with --device_map auto over k "
                                       "GPUs the global norm may reach sqrt(k) times it).",
                                       default=False)
    proposer_update_freq: int = _help("Update the Proposer every this many steps (0 = never, "
                                      "which is what the published code did in effect).", default=5)
    update_mode: str = _help(f"One of {UPDATE_MODES}: one optimizer step per image over its N "
                             f"answers, or one per answer in sample order (published).",
                             default="batched")
    baseline: str = _help(f"Advantage baseline: one of {BASELINES} (ema = running mean).",
                          default="ema")
    baseline_momentum: float = _help("EMA baseline: b <- m*b + (1-m)*reward.", default=0.9)
    update_micro_batch: str = _help("Completions per forward/backward chunk in the update "
                                    "(0 = all B*N at once). Same result, less memory. auto: the "
                                    "largest chunk the memory plan fits on the GPU, at most one "
                                    "image's N when memory is short (on the CPU: 0).",
                                    default="auto")

    # ---- KL ----
    kl_coef: float = _help("Initial KL coefficient beta.", default=1e-3)
    kl_target: float = _help("Target KL for the adaptive beta.", default=0.02)
    kl_adapt_rate: float = _help("beta <- beta*exp(rate*e), e = clip((KL-target)/target, -c, c).",
                                 default=0.1)
    kl_error_clip: float = _help("c: bound on the relative KL error per update (Ziegler et al. "
                                 "2019, TRL: 0.2); 0 = unclipped, the published rule.", default=0.2)
    kl_estimator: str = _help(f"KL estimator: one of {KL_ESTIMATORS} (exact = full vocabulary).",
                              default="exact")

    # ---- outcome reward ----
    solver_soft_gamma: float = _help("Soft-majority exponent: r = p(answer)^gamma.", default=0.7)
    len_penalty_weight: float = _help("Weight of the length penalty.", default=0.05)
    len_penalty_target_words: int = _help("Words before <answer> allowed without penalty.",
                                          default=64)

    # ---- trajectory-aware step agreement ----
    max_reasoning_steps: int = _help("Steps read from <think> per sample.", default=8)
    min_step_group_size: int = _help("Majority-group members needed for step rewards, and at "
                                     "each step position.", default=2)
    step_group_density_gamma: float = _help("Density weight (|D|/N)^gamma.", default=0.7)
    step_position_decay: float = _help("Position weight exp(-decay*j).", default=0.15)
    step_sim_temperature: float = _help("If != 1, cosine s -> tanh(s/T).", default=1.0)
    step_reward_weight_start: float = _help("Step-reward mixing weight at the start.", default=0.0,
                                            aliases=("--step_reward_w_start",))
    step_reward_weight_end: float = _help("Step-reward mixing weight at the end.", default=0.7,
                                          aliases=("--step_reward_w_end",))
    step_reward_warmup: float = _help("Fraction of training before the mixing weight ramps.",
                                      default=0.3, aliases=("--step_reward_warmup_frac",))
    step_embedder: str = _help(f"Step embedding: one of {STEP_EMBEDDERS}.",
                               default="input_embeddings")
    step_embed_max_tokens: int = _help("Tokens per step used by the embedder.", default=64)

    # ---- proposer reward ----
    proposer_reward_mu: float = _help("Gaussian centre on the Solver answer entropy (nats).",
                                      default=0.90, aliases=("--prop_entropy_mu",))
    proposer_reward_sigma: float = _help("Gaussian width on the answer entropy.", default=0.35,
                                         aliases=("--prop_entropy_sigma",))

    # ---- checkpoints, logging ----
    output_dir: str = _help("Runs live in output_dir/<run_name>/.", default="runs")
    save_every: int = _help("Save a checkpoint every this many steps (and at the last).",
                            default=50)
    max_checkpoints: int = _help("Complete checkpoints kept (newest first).", default=2)
    resume_from: str = _help("Resume from this checkpoint folder instead of the newest.",
                             default="")
    clear_cache_every: int = _help("Free the CUDA cache every this many steps (0 = never).",
                                   default=5)
    wandb_mode: str = _help(f"W&B mode: one of {WANDB_MODES}.", default="disabled")
    wandb_project: str = _help("W&B project.", default="iReasoner")
    wandb_entity: str = _help("W&B entity (user or team; default: your W&B default).", default="")
    wandb_log_images_every: int = _help("Every this many steps, log a W&B table of each image "
                                        "with its question and answers (0 = never).", default=0)
    wandb_run_name: str = _help("Run name; also the folder under output_dir. Keep it fixed to "
                                "auto-resume (generated when empty).", default="")

    # ---- determinism ----
    deterministic: bool = _help(
        "Deterministic kernels only (torch.use_deterministic_algorithms, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8, cuDNN deterministic, flash-attn deterministic "
        "backward), so that a GPU run and its resume repeat bit for bit; slower on GPUs. CPU runs "
        "are deterministic without it (docs/reliability.md).", default=False)

    # ---- memory plan ----
    memory_budget_gib: float = _help("GiB per rank the memory plan must fit (0 = the GPU's free "
                                     "memory at start; on the CPU no budget). See "
                                     "`python run.py plan`.", default=0.0)
    vllm_prefix_caching: bool = _help("vllm: share the prompt's prefill among its N samples "
                                      "(the cache is reset at every generate, so a resumed run "
                                      "samples what an unbroken one does).", default=True)

    # ---- validation, keep-best, collapse alarm, answer matching (docs/validation.md) ----
    answer_match: str = _help(f"When two answers count as one vote, in the rewards, eval and "
                              f"validation: one of {MATCHES}. string: equal after normalisation "
                              f"(published); math: also equal as numbers or expressions "
                              f"(math-verify: 0.5 = 1/2) and a choice letter equal to (B), B. or "
                              f"B) text.", default="string")
    val_data: str = _help("Validation JSONL (run.py eval's row format; rows without an answer get "
                          "the label-free figures only). Validates before step 1 and every "
                          "--val_every steps; results in <run>/val_log.jsonl.", default="")
    val_every: int = _help("Validate every this many steps (with --val_data).", default=50)
    val_samples: int = _help("Answers sampled per validation row (N of maj@N).", default=5)
    val_max_rows: int = _help("Validate on the first M good rows (0 = all).", default=0)
    keep_best: str = _help(f"Keep the checkpoint with the best value of this validation metric "
                           f"(one of {KEEP_BEST_METRICS}) out of rotation, saving one when a "
                           f"validation sets a new best; <run>/best points to it.", default="")
    collapse_patience: int = _help("Label-free alarm: warn when a training signal's mean over "
                                   "the last this many steps passes its floor (0 = off).",
                                   default=20)
    collapse_one_answer_frac: float = _help(
        "Label-free alarm: the share of images whose N answers are all one, at or above which.",
        default=0.95)
    collapse_zero_std_frac: float = _help(
        "Label-free alarm: the share of images whose N rewards are all equal, at or above which.",
        default=0.95)
    collapse_min_entropy: float = _help(
        "Label-free alarm: the Solver's token entropy (nats), below which.", default=0.02)
    collapse_min_length: float = _help(
        "Label-free alarm: the Solver's completion length (tokens), below which.", default=4.0)
    collapse_val_metric: str = _help(f"Validation alarm's metric, one of {KEEP_BEST_METRICS} "
                                     f"(default: --keep_best's, else val_acc_mean on labeled "
                                     f"rows).", default="")
    collapse_val_margin: float = _help("Validation alarm: warn when the metric lies at least this "
                                       "far below its best ...", default=0.03)
    collapse_val_patience: int = _help("... for this many validations in a row (0 = off).",
                                       default=2)
    stop_on_collapse: bool = _help("On an alarm: save, stop with exit 0 and name the best "
                                   "checkpoint.", default=False)

    # ---- objective knobs (objective.py, lr_schedule.py; all off by default) ----
    lr_scheduler: str = _help(f"Learning-rate schedule of both roles over the training steps: "
                              f"one of {LR_SCHEDULERS} (after any warm-up).", default="constant")
    warmup_steps: int = _help("Linear learning-rate warm-up from 0 over this many steps.",
                              default=0)
    warmup_ratio: float = _help("Warm-up as a share of --total_steps (instead of "
                                "--warmup_steps).", default=0.0)
    scale_advantages: bool = _help("Divide each Solver advantage by its group's reward std "
                                   "(sample std + 1e-4), as GRPO does (needs --baseline group).",
                                   default=False)
    skip_zero_std: bool = _help("Leave Solver groups whose N rewards are all equal out of the "
                                "update (no gradient; counted as solver_groups_skipped). A step "
                                "with every group skipped takes no optimizer step.",
                                default=False)
    loss_agg: str = _help(f"Policy-loss aggregation, one of {LOSS_AGGS}: mean over completions of "
                          f"the token mean; mean over all completion tokens; token sum over the "
                          f"token limit, mean over completions (Dr. GRPO). The KL term stays "
                          f"the token mean.", default="seq_mean")
    num_iterations: int = _help("Optimizer steps per batch of rollouts (PPO epochs): K > 1 "
                                "needs --clip_eps.", default=1)
    clip_eps: float = _help("PPO clip of the ratio to the sampler's policy (its tempered "
                            "log-probs): 1 - eps .. 1 + eps (0 = off: plain REINFORCE).",
                            default=0.0)
    clip_eps_high: Optional[float] = _help("Upper clip 1 + this (DAPO's clip-higher; default "
                                           "--clip_eps).", default=None)
    entropy_coef: float = _help("Entropy bonus: minus this times the tempered softmax's entropy, "
                                "aggregated as --loss_agg, is added to the loss.", default=0.0)

    def __post_init__(self):
        self.include_subfolders_list = split(self.include_subfolders)
        self.lora_targets_list = split(self.lora_targets)
        self.proposer_prompt_text = (read_prompt_file(self.proposer_prompt_file,
                                                      "--proposer_prompt_file")
                                     if self.proposer_prompt_file else PROPOSER_PROMPT)
        self.solver_prompt_text = (read_prompt_file(self.solver_prompt_file, "--solver_prompt_file",
                                                    QUESTION_PLACEHOLDER)
                                   if self.solver_prompt_file else SOLVER_PROMPT)
        check_config(self)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def prompt_texts(self) -> dict:
        """The prompt texts in use: saved with every checkpoint, checked on resume."""
        return {"proposer": self.proposer_prompt_text, "solver": self.solver_prompt_text}

    def prompt_mismatch(self, saved: dict) -> str | None:
        """Why prompt texts saved by a run differ from these (resuming would change the task
        mid-run), or None."""
        for role, text in self.prompt_texts().items():
            if saved.get(role) != text:
                source = getattr(self, f"{role}_prompt_file") or "the built-in prompt"
                return (f"another {role} prompt than {source}; resume with the same "
                        f"--{role}_prompt_file (its text is saved in trainer_state.json) or use "
                        f"another --wandb_run_name")
        return None


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse a command line into a Config. Unknown flags are an error."""
    script = os.path.basename(sys.argv[0])
    parser = DataclassParser(Config, prog=f"python {script if script == 'run.py' else 'train.py'}",
                             usage="%(prog)s --data_dir DIR [--flag value ...] (the flags below)")
    try:
        cfg, unknown = parser.parse_args_into_dataclasses(
            args=sys.argv[1:] if argv is None else argv, return_remaining_strings=True)
    except CommandLineError:
        raise
    except ValueError as e:  # a check of __post_init__
        raise CommandLineError(f"{e} (see {parser.prog} --help)") from e
    if unknown:
        parser.unrecognized(unknown)
    return cfg


# ---------------------------------------------------------------- run.py infer / eval / export
# The same HfArgumentParser reads these; sampling and image defaults are Config's, so inference
# samples the way training did unless told otherwise.
@dataclass(kw_only=True)
class ModelArgs:
    """Options every `run.py infer|eval|export` command takes."""
    model: str = _help("Base model: HF id or local folder.")
    device: str = _help("device_map: cpu, cuda, cuda:0 or auto.", default="cpu")
    dtype: str = field(default="auto", metadata={
        "help": "auto: float32 on cpu, else bfloat16 (export: the checkpoint's dtype).",
        "choices": ("auto", *DTYPES)})
    attn_implementation: str = field(default=Config.attn_implementation, metadata={
        "help": "Attention kernel.", "choices": ATTN_IMPLEMENTATIONS})


@dataclass(kw_only=True)
class ExportArgs(ModelArgs):
    adapter: str = _help("LoRA adapter folder to merge.")
    out: str = _help("Folder for the merged model (must not exist).")


@dataclass(kw_only=True)
class SampleArgs(ModelArgs):
    """Sampling options of `infer` and `eval`."""
    max_pixels: int = _help("Image pixel cap (0 = the processor's own).", default=Config.max_pixels)
    samples: int = _help("Answers sampled per question (N).", default=Config.num_solver_samples)
    max_new_tokens: int = _help("Max new tokens per answer.", default=Config.max_new_tokens_solver)
    temp: float = _help("Sampling temperature.", default=Config.temp)
    top_p: float = _help("Nucleus top-p.", default=Config.top_p)
    top_k: Optional[int] = _help("Top-k (0 = off; default off, as in training).",
                                 default=Config.top_k)
    repetition_penalty: Optional[float] = _help(
        "Repetition penalty (1 = off; default off, as in training).",
        default=Config.repetition_penalty)
    merge_generation_config: bool = _help(
        "top_k and repetition_penalty not given come from the model's generation_config.json, "
        "as published (see train.py --help).", default=Config.merge_generation_config)
    seed: int = _help("Sampling seed.", default=0)

    def __post_init__(self):
        for name in ("samples", "max_new_tokens"):
            check(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        check(self.max_pixels >= 0, f"--max_pixels must be >= 0, got {self.max_pixels}")
        check_sampling(self.top_k, self.repetition_penalty)
        check(self.temp >= 0 and 0 < self.top_p <= 1,
               f"need --temp >= 0 (0 = greedy) and 0 < --top_p <= 1, got {self.temp}, {self.top_p}")


@dataclass(kw_only=True)
class InferArgs(SampleArgs):
    adapter: str = _help("Solver folder, or none for the base.", default="none")
    image: str = _help("Image file.")
    question: str = _help("Default: the checkpoint's proposer asks.", default="")
    max_new_tokens_proposer: int = _help("Max new tokens for the proposer's question.",
                                         default=Config.max_new_tokens_proposer)

    def __post_init__(self):
        super().__post_init__()
        check(self.max_new_tokens_proposer >= 1,
               f"--max_new_tokens_proposer must be >= 1, got {self.max_new_tokens_proposer}")


@dataclass(kw_only=True)
class EvalArgs(SampleArgs):
    adapter: list[str] = field(default_factory=list, metadata={
        "help": "Solver folder or none (the base); repeat to compare side by side.",
        "action": "append"})
    data: str = _help("JSONL: image (relative to the file), question, answer, optional choices.")
    limit: int = _help("Evaluate the first K good rows.", default=0)
    out: str = _help("Write one JSON result line per row here.", default="")
    answer_match: str = _help("When two answers count as one (string or math, see train.py "
                              "--answer_match); default: the run's setting (string for the base).",
                              default="")

    def __post_init__(self):
        super().__post_init__()
        if self.answer_match:
            check_match(self.answer_match)
        # argparse's append of a nargs="+" flag gives one list per --adapter: flatten them.
        self.adapter = [a for group in self.adapter
                        for a in (group if isinstance(group, list) else [group])]

