#!/usr/bin/env bash
# The first GPU figure (scripts/gpu_check.py): preflight (versions, vLLM's API, GPU memory), a
# random model with Qwen2.5-VL-7B's shapes built on the GPU in bfloat16, then the legs hf B=1,
# B=2 micro-batched, B=8 with gradient checkpointing, vllm B=1 and B=8, and a resume under
# torchrun; 1024x768 images, 256/128 new tokens, a Proposer update and its sync in every leg.
# Under 8 minutes of device time is the budget (--budget_s 480: legs not started by then are
# skipped). Prints a line per leg; runs/gpu_check/gpu_check.json is rewritten after every leg.
# Needs vLLM 0.32 in the python it runs for the vllm legs (docs/vllm.md); without it they are
# recorded as skipped.
#
#     bash scripts/gpu_check.sh                   # PYTHON=... picks the interpreter
#     bash scripts/gpu_check.sh --legs hf_b1,vllm_b1
#     python scripts/gpu_check.py --cpu_dry_run   # the same legs on a tiny model, no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
