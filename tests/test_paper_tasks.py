"""The table's eight lmms-eval tasks against the installed lmms-eval's task registry (0.7.3 in
.compat/lmms-tasks, scripts/install_paper.sh): each name exists and is a task, with the metric
scripts/paper_table.py reads and the evaluation set scripts/prepare_paper_data.py keeps out;
examples/reproduce_paper.sh runs exactly these. And scripts/paper_table.py reads result files
that lmms-eval's own EvaluationTracker wrote. A renamed task fails here, not on the user's node.

    bash scripts/install_paper.sh && python -m pytest tests/test_paper_tasks.py
"""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_table  # noqa: E402
from paper_results import evaluator_results  # noqa: E402

LMMS = os.path.join(ROOT, ".compat", "lmms-tasks")
PROBE = os.path.join(ROOT, "tests", "lmms_tasks_probe.py")
DOCUMENTED_VERSION = "0.7.3"  # docs/evaluation.md, scripts/check_lmms_eval.sh


def run_probe(*args, stdin=None):
    if not os.path.isfile(os.path.join(LMMS, "INSTALL_OK")):
        message = f"{LMMS} is missing: run bash scripts/install_paper.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run([sys.executable, PROBE, *args], env={**ENV, "PYTHONPATH": LMMS},
                          input=stdin, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def registry():
    names = [b.task for b in paper_table.BENCHMARKS] + ["mathvista_testmini", "mathvista_testmni"]
    return json.loads(run_probe("tasks", *names))


def test_the_documented_lmms_eval(registry):
    assert registry["version"] == DOCUMENTED_VERSION


def test_every_task_of_the_table_is_in_the_registry(registry):
    for b in paper_table.BENCHMARKS:
        info = registry["tasks"][b.task]
        assert info["type"] == "task", (b.task, info)
        assert b.metric in info["metrics"], (b.task, info["metrics"])
        assert (info["dataset_path"], info["dataset_name"] or "", info["test_split"]) == \
            (b.dataset, b.dataset_name, b.split), b.task
    # MathVista testmini is a group of prompt variants; the table runs the format-prompt one.
    assert registry["tasks"]["mathvista_testmini"]["type"] == "group"
    assert "mathvista_testmini_format" in registry["tasks"]["mathvista_testmini"]["subtasks"]
    # A misspelt name is unknown to it: the check can fail.
    assert registry["tasks"]["mathvista_testmni"]["type"] is None


def test_the_example_runs_the_table_tasks():
    with open(os.path.join(ROOT, "examples", "reproduce_paper.sh")) as f:
        (tasks,) = re.findall(r"^TASKS=(\S+)$", f.read(), re.M)
    assert tasks == paper_table.TASKS


def test_table_reads_files_written_by_lmms_eval(tmp_path):
    """lmms-eval's tracker lays the files out (<output_path>/<model>/<date>_results.json) and
    adds its own fields; the table finds and reads them."""
    paths = {}
    for name, pretrained, shift in (("base", "Qwen/Qwen2.5-VL-7B-Instruct", 0.0),
                                    ("solver", "results/paper/merged-solver", 1.0)):
        scores = {b.task: b.paper_base + shift for b in paper_table.BENCHMARKS}
        paths[name] = run_probe("save", str(tmp_path / name),
                                f"pretrained={pretrained},max_pixels=12845056",
                                "2026-12-05T21:00:00",
                                stdin=json.dumps(evaluator_results(scores))).split()
    assert [os.path.relpath(p, tmp_path) for p in paths["base"]] == \
        [os.path.join("base", "Qwen__Qwen2.5-VL-7B-Instruct", "2026-12-05T21-00-00_results.json")]
    out = tmp_path / "table"
    assert paper_table.main(["--base", str(tmp_path / "base"), "--solver",
                             str(tmp_path / "solver"), "--out", str(out)]) == 0
    for line in (out / "table.md").read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert cells[4] == cells[1] and cells[6] == "+1.00", line  # base = paper base
    assert (out / "table.png").stat().st_size > 10_000
