"""The command lines: run.py names its subcommands first, a mistyped one gets a did-you-mean,
no parser takes a prefix of a flag, and every mistake is one line pointing at --help.

    python -m pytest tests/test_cli.py -q
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import run  # noqa: E402


def call(main, argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_help_names_the_commands_before_the_training_flags(capsys):
    code, out, _ = call(run.main, ["--help"], capsys)
    assert code == 0
    head, flags = out.split("training flags:")
    for name, (summary, _) in run.COMMANDS.items():
        assert f"  {name}" in head and summary in head, name
    assert "--num_solver_samples" in flags and "--num_solver_samples" not in head


@pytest.mark.parametrize("argv,expected", [
    (["infr", "--image", "x"], "unknown command 'infr' (did you mean infer?)"),
    (["expot"], "unknown command 'expot' (did you mean export?)"),
    (["train"], "unknown command 'train'; commands: smoke, plot"),
    (["smoke", "now"], "takes no arguments"),
])
def test_unknown_command(argv, expected, capsys):
    code, _, err = call(run.main, argv, capsys)
    assert code == 2 and expected in one_error_line(err)


def train_flags(*extra) -> list[str]:
    return ["--data_dir", "/nonexistent", *extra]


@pytest.mark.parametrize("argv,expected", [
    (train_flags("--num_solver_sample", "5"), "did you mean --num_solver_samples?"),
    (train_flags("--lr", "abc"), "invalid float value: 'abc'"),
    (train_flags("--lr", "-1e-4"), "--lr must be > 0, got -0.0001"),  # a number, not a flag
    (train_flags("--total_steps"), "expected one argument"),
    (train_flags("--wandb_mode", "sometimes"), "--wandb_mode must be one of"),
])
def test_training_flag_mistakes_are_one_line(argv, expected, capsys):
    code, _, err = call(run.main, argv, capsys)
    line = one_error_line(err)
    assert code == 2 and expected in line
    assert "usage:" not in err


def test_every_parser_refuses_abbreviations(capsys, tmp_path):
    from tools import plot, tiny
    import bench
    import gen_flags
    cases = [(run.main, ["infer", "--mode", "m", "--image", "x"], "--mode"),
             (run.main, ["eval", "--model", "m", "--dat", "x"], "--dat"),
             (run.main, ["export", "--model", "m", "--adapt", "a", "--out", "o"], "--adapt"),
             (plot.main, [str(tmp_path), "--ou", "x.png"], "--ou"),
             (tiny.main, [str(tmp_path / "m"), "--fam", "qwen2_vl"], "--fam"),
             (bench.main, ["--step", "1"], "--step"),
             (gen_flags.main, ["--chec"], "--chec")]
    for main, argv, flag in cases:
        code, _, err = call(main, argv, capsys)
        line = one_error_line(err)
        assert code == 2 and flag in line and "--help" in line, (argv, line)
    assert not os.path.exists(tmp_path / "m")
