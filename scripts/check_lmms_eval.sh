#!/usr/bin/env bash
# Upstream lmms-eval 0.7 (from PyPI) answers one request with our merged export, no network:
# a tiny hub-layout base, 2 real training steps, `run.py export`, then lmms-eval's own qwen2_5_vl
# class (see scripts/check_lmms_eval.py). lmms-eval goes into its own virtual environment,
# .compat/lmms, which sees this environment's packages (torch) and adds its own on top. With
# .compat/tf4 (scripts/install_compat.sh) the answer step runs again under transformers 4.57.1
# (with datasets 4.3.0 in .compat/lmms-tf4, as EvoLMM pins them).
# Too heavy for every CI run (the install takes minutes): run it by hand.
#
#     bash scripts/check_lmms_eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.compat/lmms
if [ ! -f "$venv/INSTALL_OK" ]; then
  rm -rf "$venv"
  python -m venv "$venv"
  here=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  there=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$here" > "$there/project_env.pth"  # after the venv's own packages: lmms-eval's win
  # video-legacy brings decord, which lmms-eval's qwen2_5_vl module imports.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "lmms-eval[video-legacy]==0.7.3"
  touch "$venv/INSTALL_OK"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python scripts/check_lmms_eval.py prepare "$work"
"$venv/bin/python" scripts/check_lmms_eval.py answer "$work"
if [ -f .compat/tf4/INSTALL_OK ]; then
  # lmms-eval's newest datasets needs a newer huggingface_hub than transformers 4.57.1 allows:
  # add EvoLMM's pinned datasets beside it.
  if [ ! -f .compat/lmms-tf4/INSTALL_OK ]; then
    rm -rf .compat/lmms-tf4
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
      --target .compat/lmms-tf4 datasets==4.3.0
    touch .compat/lmms-tf4/INSTALL_OK
  fi
  PYTHONPATH=.compat/tf4:.compat/lmms-tf4 "$venv/bin/python" scripts/check_lmms_eval.py \
    answer "$work"
fi
echo "lmms-eval check passed"
