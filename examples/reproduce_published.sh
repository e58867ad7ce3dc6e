#!/usr/bin/env bash
# The published runs, bugs aside: the seed command (examples/seed.sh) plus the flags that restore
# the published behaviour where ours differs (README, "Differences from the published reference
# code"; docs/fidelity.md). The two prompt files hold the published prompt texts, the solver's with
# {question} where its question goes; copy them from the published code (they are not in this
# repository).
#
#     DATA_DIR=/path/to/images PROPOSER_PROMPT=published_proposer.txt \
#         SOLVER_PROMPT=published_solver.txt bash examples/reproduce_published.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-/path/to/data}
PROPOSER_PROMPT=${PROPOSER_PROMPT:-published_proposer.txt}
SOLVER_PROMPT=${SOLVER_PROMPT:-published_solver.txt}

# --proposer_update_freq 0 in place of the seed's 5: the published proposer never learned.
python train.py \
  --data_dir "$DATA_DIR" \
  --wandb_mode online \
  --wandb_project iReasoner \
  --wandb_run_name iReasoner \
  --solver_model Qwen/Qwen2.5-VL-7B-Instruct \
  --proposer_model Qwen/Qwen2.5-VL-7B-Instruct \
  --use_lora_solver --use_lora_proposer \
  --lora_targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,mm_projector \
  --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 \
  --num_solver_samples 5 \
  --proposer_update_freq 0 \
  --total_steps 2500 \
  --kl_target 0.020 \
  --kl_adapt_rate 0.10 \
  --solver_soft_gamma 0.7 \
  --clear_cache_every 5 \
  --update_mode per_sample \
  --kl_error_clip 0 \
  --merge_generation_config \
  --proposer_prompt_file "$PROPOSER_PROMPT" \
  --solver_prompt_file "$SOLVER_PROMPT" \
  "$@"
