#!/usr/bin/env bash
# transformers 4.57.1 + peft 0.17.1 (the versions EvoLMM's evaluation pins) into .compat/tf4,
# without dependencies so that they run on this environment's torch. tests/test_harness.py loads
# our checkpoints and exports there (PYTHONPATH=.compat/tf4); CI runs this before the tests.
#
#     bash scripts/install_compat.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=.compat/tf4
if [ -f "$target/INSTALL_OK" ]; then
  exit 0
fi
rm -rf "$target.tmp"
# huggingface_hub and tokenizers at EvoLMM's pins too: transformers 5 needs newer ones.
python -m pip install --quiet --disable-pip-version-check --no-deps --target "$target.tmp" \
  transformers==4.57.1 peft==0.17.1 huggingface_hub==0.36.0 tokenizers==0.22.1
PYTHONPATH="$target.tmp" python -c \
  "import transformers, peft; from transformers import Qwen2_5_VLForConditionalGeneration; \
assert transformers.__version__ == '4.57.1' and peft.__version__ == '0.17.1'"
touch "$target.tmp/INSTALL_OK"
rm -rf "$target"
mv "$target.tmp" "$target"
echo "installed transformers 4.57.1 + peft 0.17.1 in $target"
