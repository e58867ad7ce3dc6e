#!/usr/bin/env bash
# One GPU check of the rollout engines: a random Qwen2.5-VL-3B-shaped model built here (no
# download), then the same training step with our loop and the lean decode step, our loop with
# the HF layers, and vLLM, in bfloat16, at 1, 8 and 32 images per step, in one run of
# scripts/bench.py. Prints one table (s/step, generated tokens/s, peak memory per engine and B)
# and writes runs/gpu_check.json (the full output: runs/gpu_check.log). Meant for one H100/H200
# (under 8 minutes); needs vLLM (docs/vllm.md) in the python it runs:
#
#     bash scripts/gpu_check.sh                # PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
"$py" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA device'; \
print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
mkdir -p runs
# 3 steps per engine and B (the first a warm-up); 128-token answers, 48-token questions, N=5;
# micro-batches of 16 completions keep the exact KL over the 151,936-token vocabulary in memory.
"$py" scripts/bench.py --preset 3b --device cuda --dtype bfloat16 \
  --engines hf,hf_layers,vllm --images_per_step 1,8,32 --steps 3 --baseline_steps 0 \
  --update_micro_batch 16 --json runs/gpu_check.json > runs/gpu_check.log 2>&1 ||
  { tail -40 runs/gpu_check.log; echo "gpu_check: bench failed (full log: runs/gpu_check.log)"; exit 1; }
sed -n '/^rollout engines/,$p' runs/gpu_check.log
