"""lmms-eval result dicts in the evaluator's format (lmms_eval/evaluator.py, 0.7.3: "results" per
task with "<metric>,<filter>", "<metric>_stderr,<filter>", "<metric>_stderr_clt,<filter>" and
"alias"; a group with its subtasks aliased " - name"; "group_subtasks", "configs", "versions",
"n-shot", "higher_is_better", "n-samples"), for tests/test_paper_table.py and
tests/test_paper_tasks.py."""
from paper_table import BENCHMARKS

# task -> (metric, filter, the metric's own scale), read off lmms-eval 0.7.3's sources, not
# taken from paper_table: anls, exact_match, mmmu_acc and relaxed_overall aggregate to a fraction
# (a mean of per-sample scores; mmmu_aggregate_results' "Overall" acc); the judged math tasks'
# aggregations return round(correct / total * 100, 2). ai2d's one filter is flexible-extract.
NATIVE = {"infovqa_val": ("anls", "none", 0.01), "ai2d": ("exact_match", "flexible-extract", 0.01),
          "scienceqa_img": ("exact_match", "none", 0.01), "mmmu_val": ("mmmu_acc", "none", 0.01),
          "chartqa": ("relaxed_overall", "none", 0.01),
          "mathvista_testmini_format": ("llm_as_judge_eval", "none", 1),
          "mathvision_test": ("mathvision_standard_eval", "none", 1),
          "mathverse_testmini": ("gpt_eval_score", "none", 1)}


def evaluator_results(scores: dict[str, float]) -> dict:
    """{task: percent} -> the evaluator's dict, each value in its metric's own scale (a
    fraction for anls/exact_match/..., percent for the judged math tasks), MathVista run as
    the mathvista_testmini group, as `--tasks mathvista_testmini` would."""
    results, subtasks = {}, {}
    for b in BENCHMARKS:
        if b.task not in scores:
            continue
        metric, filt, scale = NATIVE[b.task]
        value = scores[b.task] * scale
        entry = {"alias": b.task, f"{metric},{filt}": value,
                 f"{metric}_stderr,{filt}": "N/A" if scale == 1 else 0.01,
                 f"{metric}_stderr_clt,{filt}": 0.01}
        if b.task == "chartqa":  # chartqa's two other metrics come before and after
            entry = {"relaxed_human_split,none": value - 0.05, **entry,
                     "relaxed_augmented_split,none": value + 0.05}
        if b.task.startswith("mathvista_testmini_"):
            results["mathvista_testmini"] = {"alias": "mathvista_testmini"}
            for variant in ("cot", "solution"):
                results[f"mathvista_testmini_{variant}"] = {
                    "alias": f" - mathvista_testmini_{variant}",
                    f"{metric},none": value - 5.0, f"{metric}_stderr,none": "N/A"}
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
