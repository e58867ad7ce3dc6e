"""Run with lmms-eval importable (PYTHONPATH=.compat/lmms-tasks).

    python tests/lmms_tasks_probe.py tasks chartqa mathvista_testmini
        prints, as JSON, what the installed lmms-eval's task registry says about each name: its
        kind (task, group, tag, or null when unknown) and, for a task, its dataset, split,
        metrics and filters from its YAML.
    python tests/lmms_tasks_probe.py save OUTPUT_PATH MODEL_ARGS DATETIME < results.json
        writes the evaluator's results dict the way `python -m lmms_eval --output_path` does
        (lmms-eval's own EvaluationTracker), and prints the file's path.
"""
import json
import logging
import sys
from importlib.metadata import version

from loguru import logger

logger.remove()  # the registry scan logs a line per unreadable YAML
logging.disable(logging.WARNING)
from lmms_eval import utils  # noqa: E402


def save(output_path, model_args, datetime_str):
    import glob
    import os

    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    tracker = EvaluationTracker(output_path=output_path)
    tracker.general_config_tracker.log_experiment_args(
        model_source="qwen2_5_vl", model_args=model_args, system_instruction=None,
        chat_template=None, fewshot_as_multiturn=False)
    tracker.save_results_aggregated(results=json.load(sys.stdin), samples=None,
                                    datetime_str=datetime_str)
    print(*glob.glob(os.path.join(output_path, "**", "*_results.json"), recursive=True))


if sys.argv[1] == "save":
    save(*sys.argv[2:5])
    sys.exit(0)
from lmms_eval.tasks import TaskManager  # noqa: E402

index = TaskManager()._task_index
out = {"version": version("lmms_eval"), "tasks": {}}
for name in sys.argv[2:]:
    entry = index.get(name)
    info = {"type": None if entry is None else entry["type"]}
    if entry is not None and entry["type"] == "task":
        cfg = utils.load_yaml_config(entry["yaml_path"], mode="simple")
        info.update(dataset_path=cfg.get("dataset_path"), dataset_name=cfg.get("dataset_name"),
                    test_split=cfg.get("test_split"),
                    metrics=[m["metric"] for m in cfg.get("metric_list", [])],
                    filters=[f["name"] for f in cfg.get("filter_list", [])])
    elif entry is not None and entry["type"] == "group":
        cfg = utils.load_yaml_config(entry["yaml_path"], mode="simple")
        info["subtasks"] = cfg.get("task")
    out["tasks"][name] = info
print(json.dumps(out))
