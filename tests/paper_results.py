"""lmms-eval result dicts in the evaluator's format (lmms_eval/evaluator.py, 0.7.3: "results" per
task with "<metric>,<filter>", "<metric>_stderr,<filter>", "<metric>_stderr_clt,<filter>" and
"alias"; a group with its subtasks aliased " - name"; "group_subtasks", "configs", "versions",
"n-shot", "higher_is_better", "n-samples"), for tests/test_paper_table.py and
tests/test_paper_tasks.py."""
from paper_table import BENCHMARKS


def evaluator_results(scores: dict[str, float]) -> dict:
    """{task: percent} -> the evaluator's dict, each value in its metric's own scale (a
    fraction for anls/exact_match/..., percent for the judged math tasks), MathVista run as
    the mathvista_testmini group, as `--tasks mathvista_testmini` would."""
    results, subtasks = {}, {}
    for b in BENCHMARKS:
        if b.task not in scores:
            continue
        filt = "flexible-extract" if b.task == "ai2d" else "none"
        value = scores[b.task] / b.scale
        entry = {"alias": b.task, f"{b.metric},{filt}": value,
                 f"{b.metric}_stderr,{filt}": "N/A" if b.scale == 1 else 0.01,
                 f"{b.metric}_stderr_clt,{filt}": 0.01}
        if b.task == "chartqa":  # chartqa's two other metrics come before and after
            entry = {"relaxed_human_split,none": value - 0.05, **entry,
                     "relaxed_augmented_split,none": value + 0.05}
        if b.task.startswith("mathvista_testmini_"):
            results["mathvista_testmini"] = {"alias": "mathvista_testmini"}
            for variant in ("cot", "solution"):
                results[f"mathvista_testmini_{variant}"] = {
                    "alias": f" - mathvista_testmini_{variant}",
                    f"{b.metric},none": value - 5.0, f"{b.metric}_stderr,none": "N/A"}
            entry["alias"] = " - " + b.task
            subtasks["mathvista_testmini"] = ["mathvista_testmini_cot",
                                              "mathvista_testmini_solution", b.task]
        else:
            subtasks[b.task] = []
        results[b.task] = entry
    tasks = [t for t in results if t != "mathvista_testmini"]
    return {"results": results, "group_subtasks": subtasks,
            "configs": {t: {"task": t} for t in tasks}, "versions": {t: "Yaml" for t in tasks},
            "n-shot": {t: 0 for t in tasks},
            "higher_is_better": {t: {"x": True} for t in tasks},
            "n-samples": {t: {"original": 100, "effective": 100} for t in tasks},
            "config": {"model": "qwen2_5_vl", "batch_size": "1"}, "git_hash": None,
            "date": "20261205_210000"}
