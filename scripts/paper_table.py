"""The paper's table beside yours: lmms-eval result files for the base model and the trained
Solver, next to the paper's numbers (Qwen2.5-VL-7B -> iReasoner), as Markdown and a bar chart.

    python scripts/paper_table.py --base results/paper/base --solver results/paper/solver \
        --out results/paper/table          # writes table.md and table.png, prints the Markdown

--base and --solver are lmms-eval --output_path folders (or single *_results.json files). lmms-eval
writes <output_path>/<model>/<date>_results.json, one per run, {"results": {task: {"<metric>,
<filter>": value, "<metric>_stderr,<filter>": ..., "alias": ...}}, "configs": ..., ...}. For each
task the newest file that holds it is used. A benchmark missing from a folder is shown as "-".
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    label: str            # the paper's column
    task: str             # lmms-eval 0.7.3 task name
    metric: str           # the task's metric (its key in results is "<metric>,<filter>")
    scale: float          # to percent: 100 for metrics in [0, 1], 1 for those already in percent
    paper_base: float     # the paper's Qwen2.5-VL-7B row
    paper_ireasoner: float  # the paper's iReasoner row
    dataset: str          # the task's evaluation set (lmms-eval's dataset_path, name, split):
    dataset_name: str     # what scripts/prepare_paper_data.py checks training images against
    split: str


# The eight benchmarks of the paper's table (arXiv 2601.05877), with lmms-eval 0.7.3's names.
# mathvista_testmini is a group of three prompt variants in 0.7.3; the table reads the
# format-prompt one. mathvision_test is the full 3,040-problem test set (the paper's base figure,
# 23.91, is 727/3040). tests/test_paper_tasks.py checks every name, metric and dataset here
# against the installed lmms-eval's task registry.
BENCHMARKS = (
    Benchmark("InfoVQA val", "infovqa_val", "anls", 100, 80.44, 81.56,
              "lmms-lab-encoder/DocVQA", "InfographicVQA", "validation"),
    Benchmark("AI2D", "ai2d", "exact_match", 100, 82.61, 83.89,
              "lmms-lab-encoder/ai2d", "", "test"),
    Benchmark("ScienceQA", "scienceqa_img", "exact_match", 100, 88.30, 89.92,
              "lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test"),
    Benchmark("MMMU val", "mmmu_val", "mmmu_acc", 100, 51.11, 52.37,
              "lmms-lab-encoder/MMMU", "", "validation"),
    Benchmark("ChartQA", "chartqa", "relaxed_overall", 100, 84.00, 85.78,
              "lmms-lab-encoder/ChartQA", "", "test"),
    Benchmark("MathVista", "mathvista_testmini_format", "llm_as_judge_eval", 1, 68.47, 69.74,
              "AI4Math/MathVista", "", "testmini"),
    Benchmark("MathVision", "mathvision_test", "mathvision_standard_eval", 1, 23.91, 25.29,
              "MathLLMs/MathVision", "", "test"),
    Benchmark("MathVerse", "mathverse_testmini", "gpt_eval_score", 1, 43.78, 45.91,
              "CaraJ/MathVerse-lmmseval", "testmini", "testmini"),
)
TASKS = ",".join(b.task for b in BENCHMARKS)


def result_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such file or folder")
    files = glob.glob(os.path.join(path, "**", "*_results.json"), recursive=True)
    # lmms-eval names them <date>_results.json: the name's date orders them, then the mtime.
    return sorted(files, key=lambda f: (os.path.basename(f), os.path.getmtime(f)))


def metric_value(task: str, entry: dict, metric: str, scale: float, source: str) -> float:
    keys = [k for k in entry if k.split(",")[0] == metric and "," in k]
    if len(keys) != 1:
        raise ValueError(f"{source}: task {task} has {len(keys)} '{metric},<filter>' entries "
                         f"(keys: {sorted(entry)})")
    value = entry[keys[0]]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{source}: task {task}: {keys[0]} is {value!r}, not a number")
    return float(value) * scale


def read_scores(path: str) -> dict[str, float]:
    """{task: percent} for the table's tasks, from the newest result file holding each."""
    files = result_files(path)
    if not files:
        raise ValueError(f"{path}: no lmms-eval *_results.json in it")
    scores = {}
    for f in files:  # oldest first: newer files overwrite
        try:
            with open(f, encoding="utf-8") as fh:
                results = json.load(fh)["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not an lmms-eval result file ({type(e).__name__}: {e})")
        for b in BENCHMARKS:
            if b.task in results:
                scores[b.task] = metric_value(b.task, results[b.task], b.metric, b.scale, f)
    return scores


def _cell(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _delta(x: float | None, y: float | None) -> str:
    return "-" if x is None or y is None else f"{x - y:+.2f}"


def markdown(base: dict[str, float], solver: dict[str, float]) -> str:
    rows = ["| benchmark | lmms-eval task | paper base | paper iReasoner | paper delta | "
            "your base | your Solver | your delta | Solver - paper iReasoner |",
            "|---|---|---|---|---|---|---|---|---|"]
    for b in BENCHMARKS:
        yb, ys = base.get(b.task), solver.get(b.task)
        rows.append(f"| {b.label} | `{b.task}` | {b.paper_base:.2f} | {b.paper_ireasoner:.2f} | "
                    f"{b.paper_ireasoner - b.paper_base:+.2f} | {_cell(yb)} | {_cell(ys)} | "
                    f"{_delta(ys, yb)} | {_delta(ys, b.paper_ireasoner)} |")
    return "\n".join(rows) + "\n"


def bar_chart(base: dict[str, float], solver: dict[str, float], path: str) -> None:
    """Per benchmark: your base, the paper's iReasoner, your Solver (a missing one is left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, width = len(BENCHMARKS), 0.27
    fig, ax = plt.subplots(figsize=(12, 4.5))
    bars = (("your base", [base.get(b.task) for b in BENCHMARKS], "#9e9e9e"),
            ("paper iReasoner", [b.paper_ireasoner for b in BENCHMARKS], "#1f77b4"),
            ("your Solver", [solver.get(b.task) for b in BENCHMARKS], "#ff7f0e"))
    for k, (label, values, colour) in enumerate(bars):
        xs = [i + (k - 1) * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label, color=colour)
    ax.set_xticks(range(n), [b.label for b in BENCHMARKS], rotation=20)
    ax.set_ylabel("score (%)")
    ax.set_title("Qwen2.5-VL-7B: your base and Solver beside the paper's iReasoner")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="lmms-eval --output_path of the base model")
    ap.add_argument("--solver", required=True, help="lmms-eval --output_path of the Solver")
    ap.add_argument("--out", required=True, help="folder for table.md and table.png")
    args = ap.parse_args(argv)
    try:
        base, solver = read_scores(args.base), read_scores(args.solver)
        if not base and not solver:
            raise ValueError(f"none of the tasks {TASKS} in {args.base} or {args.solver}")
        os.makedirs(args.out, exist_ok=True)
        table = markdown(base, solver)
        with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
            f.write(table)
        bar_chart(base, solver, os.path.join(args.out, "table.png"))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    missing = [b.task for b in BENCHMARKS if b.task not in base or b.task not in solver]
    if missing:
        print(f"note: no result for {', '.join(missing)} in one of the folders", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
