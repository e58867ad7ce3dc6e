"""scripts/paper_table.py: lmms-eval result files (the evaluator's format, laid out as
`--output_path` writes them) for base and Solver -> Markdown beside the paper's numbers, and a PNG.
tests/test_paper_tasks.py does the same with files written by lmms-eval's own tracker.

    python -m pytest tests/test_paper_table.py
"""
import json
import os
import sys

from PIL import Image

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_table  # noqa: E402
from paper_results import evaluator_results  # noqa: E402

BASE = {b.task: b.paper_base for b in paper_table.BENCHMARKS}
SOLVER = {b.task: b.paper_base + 0.5 + i for i, b in enumerate(paper_table.BENCHMARKS)}


def write(folder, scores, model="Qwen__Qwen2.5-VL-7B-Instruct", date="2026-12-05T21-00-00"):
    path = folder / model / f"{date}_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluator_results(scores), indent=2))
    return path


def rows(markdown):
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in markdown.splitlines()[2:]}


def test_markdown_and_png(tmp_path, capsys):
    write(tmp_path / "base", BASE)
    write(tmp_path / "solver", SOLVER, model="merged-solver")
    out = tmp_path / "table"
    assert paper_table.main(["--base", str(tmp_path / "base"), "--solver",
                             str(tmp_path / "solver"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "table.md").read_text()
    table = rows(printed)
    assert list(table) == [b.label for b in paper_table.BENCHMARKS]
    # columns: task, paper base, paper iReasoner, paper delta, base, Solver, delta, Solver - paper
    assert table["InfoVQA val"] == ["`infovqa_val`", "80.44", "81.56", "+1.12", "80.44", "80.94",
                                    "+0.50", "-0.62"]
    assert table["MathVerse"] == ["`mathverse_testmini`", "43.78", "45.91", "+2.13", "43.78",
                                  "51.28", "+7.50", "+5.37"]
    # MathVista: the format-prompt variant of the group, not cot or solution (5 points lower).
    assert table["MathVista"][4:6] == ["68.47", "73.97"]
    with Image.open(out / "table.png") as im:
        assert im.format == "PNG" and im.width > 800


def test_newest_file_wins_and_missing_tasks_show_a_dash(tmp_path, capsys):
    write(tmp_path / "base", {"chartqa": 80.0}, date="2026-12-01T10-00-00")
    write(tmp_path / "base", {"chartqa": 84.0, "ai2d": 82.61}, date="2026-12-02T10-00-00")
    write(tmp_path / "solver", {"chartqa": 85.5}, model="merged-solver")
    assert paper_table.main(["--base", str(tmp_path / "base"), "--solver",
                             str(tmp_path / "solver"), "--out", str(tmp_path / "t")]) == 0
    captured = capsys.readouterr()
    table = rows(captured.out)
    assert table["ChartQA"][4:] == ["84.00", "85.50", "+1.50", "-0.28"]
    assert table["AI2D"][4:] == ["82.61", "-", "-", "-"]
    assert table["MMMU val"][4:] == ["-", "-", "-", "-"]
    assert "no result for" in captured.err


def test_bad_input_is_one_line(tmp_path, capsys):
    write(tmp_path / "ok", BASE)
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "x_results.json").write_text("{not json")
    wrong = evaluator_results({"chartqa": 84.0})
    wrong["results"]["chartqa"]["relaxed_overall,other"] = 0.5  # two filters: which one?
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "x_results.json").write_text(json.dumps(wrong))
    (tmp_path / "empty").mkdir()
    for folder, message in (("absent", "no such file or folder"), ("empty", "no lmms-eval"),
                            ("garbled", "not an lmms-eval result file"),
                            ("two", "has 2 'relaxed_overall,<filter>' entries")):
        assert paper_table.main(["--base", str(tmp_path / "ok"), "--solver",
                                 str(tmp_path / folder), "--out", str(tmp_path / "t")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
