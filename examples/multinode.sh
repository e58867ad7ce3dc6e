#!/usr/bin/env bash
# Data parallel over several nodes with torchrun: one process per GPU, each with a full model
# (--device_map local), the seed's flags. Run it on every node, NODE_RANK 0 on the node whose
# address is MASTER_ADDR. OUTPUT_DIR must be a folder that all nodes share (checkpoints, the log,
# the run lock; see docs/training.md and docs/reliability.md).
#
#     NODE_RANK=0 MASTER_ADDR=node0 OUTPUT_DIR=/shared/runs DATA_DIR=/shared/images bash examples/multinode.sh
#     NODE_RANK=1 MASTER_ADDR=node0 OUTPUT_DIR=/shared/runs DATA_DIR=/shared/images bash examples/multinode.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NODE_RANK:?set NODE_RANK: 0 on the first node, 1, 2, ... on the others}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
DATA_DIR=${DATA_DIR:-/path/to/data}
OUTPUT_DIR=${OUTPUT_DIR:-runs}

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  train.py \
  --device_map local \
  --output_dir "$OUTPUT_DIR" \
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
