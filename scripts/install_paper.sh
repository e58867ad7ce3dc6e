#!/usr/bin/env bash
# What the paper-reproduction tools and their tests need beyond requirements.txt (CI runs this):
# - `datasets` in this environment, for scripts/prepare_paper_data.py (tests/test_paper_data.py);
# - lmms-eval 0.7.3's task registry in .compat/lmms-tasks: the package without its dependencies
#   (torch, transformers, wandb==0.25.0 pins, ...), plus the few that importing
#   lmms_eval.tasks.TaskManager needs, for tests/test_paper_tasks.py (which fails without it).
#   It is not a working lmms-eval: scripts/check_lmms_eval.sh builds a full one in .compat/lmms.
#
#     bash scripts/install_paper.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "datasets>=3"
target=.compat/lmms-tasks
if [ -f "$target/INSTALL_OK" ]; then
  exit 0
fi
rm -rf "$target.tmp"
python -m pip install --quiet --disable-pip-version-check --no-deps --target "$target.tmp" \
  lmms-eval==0.7.3 loguru==0.7.3 evaluate==0.4.6 tenacity==9.2.1 pytz==2026.6 \
  sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.2.0
PYTHONPATH="$target.tmp" python -c "from importlib.metadata import version; \
from lmms_eval.tasks import TaskManager; assert version('lmms_eval') == '0.7.3'"
touch "$target.tmp/INSTALL_OK"
rm -rf "$target"
mv "$target.tmp" "$target"
echo "installed datasets, and lmms-eval 0.7.3's task registry in $target"
