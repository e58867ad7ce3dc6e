#!/usr/bin/env bash
# The seed repository's training command: Qwen2.5-VL-7B, LoRA on both roles, one model sharded
# over the GPUs of one node (--device_map auto, the default). Flags after the script are passed on.
#
#     DATA_DIR=/path/to/images bash examples/seed.sh [--total_steps 100 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-/path/to/data}

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
  --proposer_update_freq 5 \
  --total_steps 2500 \
  --kl_target 0.020 \
  --kl_adapt_rate 0.10 \
  --solver_soft_gamma 0.7 \
  --clear_cache_every 5 \
  "$@"
