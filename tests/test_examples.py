"""examples/*.sh: each runs (with stand-ins for python and torchrun that record their arguments),
and the flags it hands train.py parse through config.parse_config, as train.py would parse them.

    python -m pytest tests/test_examples.py
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from config import parse_config
from conftest import ROOT
from test_config import SEED_COMMAND

EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")))
# Each call's argv goes to ARGV_DIR/<name> (the last call) and CALLS_DIR/<n>.<name> (in order).
RECORDER = ('#!/bin/sh\n'
            'for a in "$@"; do printf "%s\\0" "$a"; done > "$ARGV_DIR/$(basename "$0")"\n'
            'cp "$ARGV_DIR/$(basename "$0")" '
            '"$CALLS_DIR/$(ls "$CALLS_DIR" | wc -l | tr -d " ").$(basename "$0")"\n')
LAUNCHERS = ("python", "torchrun", "accelerate")


def launch(script, tmp_path, args=(), **env):
    """Run an example with `python` and `torchrun` recording their argv; returns {name: argv}."""
    bin_dir, argv_dir, calls_dir = tmp_path / "bin", tmp_path / "argv", tmp_path / "calls"
    bin_dir.mkdir()
    argv_dir.mkdir()
    calls_dir.mkdir()
    for name in LAUNCHERS:
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "ARGV_DIR": str(argv_dir), "CALLS_DIR": str(calls_dir), **env}
    done = subprocess.run(["bash", script, *args], env=full_env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 0, done.stderr
    return {p.name: p.read_text().split("\0")[:-1] for p in argv_dir.iterdir()}


def calls_in_order(tmp_path):
    """[(launcher, argv)] of every launcher call of the last launch(), in order."""
    files = sorted((tmp_path / "calls").iterdir(), key=lambda p: int(p.name.split(".")[0]))
    return [(p.name.split(".", 1)[1], p.read_text().split("\0")[:-1]) for p in files]


def train_flags(calls):
    """The arguments after train.py, from whichever launcher ran it (the only call that runs
    train.py, among {name: argv} or [(name, argv)])."""
    calls = calls.values() if isinstance(calls, dict) else [argv for _, argv in calls]
    (argv,) = [a for a in calls if "train.py" in a]
    return argv[argv.index("train.py") + 1:]


def prompt_files(tmp_path):
    proposer, solver = tmp_path / "proposer.txt", tmp_path / "solver.txt"
    proposer.write_text("Ask one question about the image.\n")
    solver.write_text("Answer step by step: {question}\n")
    return {"PROPOSER_PROMPT": str(proposer), "SOLVER_PROMPT": str(solver)}


ENV = {"DATA_DIR": "/path/to/data", "NODE_RANK": "1", "MASTER_ADDR": "node0",
       "OPENAI_API_KEY": "stand-in", "CHARTX_DIR": "/path/to/ChartX_png"}


def test_there_are_the_four_recipes():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"seed.sh", "reproduce_published.sh", "multinode.sh", "reproduce_paper.sh"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=os.path.basename)
def test_every_example_parses(script, tmp_path):
    launch(script, tmp_path, ["--total_steps", "7"], **ENV, **prompt_files(tmp_path))
    cfg = parse_config(train_flags(calls_in_order(tmp_path)))
    assert cfg.data_dir == "/path/to/data"
    assert cfg.total_steps == 7  # the script's own arguments are passed on, last


def test_seed_example_is_the_seed_command(tmp_path):
    cfg = parse_config(train_flags(launch(os.path.join(ROOT, "examples", "seed.sh"), tmp_path,
                                          **ENV)))
    assert cfg.to_dict() == parse_config(SEED_COMMAND).to_dict()


def test_reproduce_published_sets_the_published_behaviour(tmp_path):
    files = prompt_files(tmp_path)
    cfg = parse_config(train_flags(launch(os.path.join(ROOT, "examples", "reproduce_published.sh"),
                                          tmp_path, **ENV, **files)))
    seed = parse_config(SEED_COMMAND)
    assert (cfg.update_mode, cfg.proposer_update_freq, cfg.kl_error_clip) == ("per_sample", 0, 0)
    assert cfg.merge_generation_config  # the published sampling: greedy on Qwen2.5-VL-7B
    assert cfg.proposer_prompt_text == "Ask one question about the image."
    assert cfg.solver_prompt_text == "Answer step by step: {question}"
    published = {"update_mode", "proposer_update_freq", "kl_error_clip", "proposer_prompt_file",
                 "solver_prompt_file", "merge_generation_config"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in published} == \
        {k: v for k, v in seed.to_dict().items() if k not in published}


def test_multinode_example_launches_torchrun_with_one_copy_per_rank(tmp_path):
    calls = launch(os.path.join(ROOT, "examples", "multinode.sh"), tmp_path, **ENV)
    argv = calls["torchrun"]
    launcher = argv[:argv.index("train.py")]
    assert launcher == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8",
                        "--master_addr", "node0", "--master_port", "29500"]
    cfg = parse_config(train_flags(calls))
    assert cfg.device_map == "local"
    seed = parse_config(SEED_COMMAND).to_dict()
    assert {k: v for k, v in cfg.to_dict().items() if k != "device_map"} == \
        {k: v for k, v in seed.items() if k != "device_map"}


def test_multinode_example_names_a_missing_node_rank(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR")}
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "multinode.sh")], env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode != 0 and "NODE_RANK" in done.stderr


def _paper_tasks():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from paper_table import TASKS
    return TASKS


PAPER = os.path.join(ROOT, "examples", "reproduce_paper.sh")
BASE_7B = "Qwen/Qwen2.5-VL-7B-Instruct"


def lmms_eval_call(argv, model, model_args, output):
    assert argv[:6] == ["launch", "--num_processes", "8", "--main_process_port", "12346", "-m"]
    assert argv[6:] == ["lmms_eval", "--model", model, "--model_args", model_args, "--tasks",
                        _paper_tasks(), "--batch_size", "1", "--output_path", output]


def test_reproduce_paper_runs_prepare_train_export_eval_table(tmp_path):
    launch(PAPER, tmp_path, **{**ENV, "DATA_DIR": str(tmp_path / "data"), "CHARTX_DIR": "/cx"})
    calls = calls_in_order(tmp_path)
    assert [name for name, _ in calls] == ["python", "python", "python", "accelerate",
                                           "accelerate", "python"]
    (_, prepare), (_, train), (_, export), (_, base), (_, solver), (_, table) = calls
    assert prepare == ["scripts/prepare_paper_data.py", "--out", str(tmp_path / "data"),
                       "--source", "chartx=/cx", "--seed", "42"]
    assert parse_config(train_flags(calls)).to_dict() == \
        parse_config([*SEED_COMMAND[:SEED_COMMAND.index("--data_dir")],
                      "--data_dir", str(tmp_path / "data"),
                      *SEED_COMMAND[SEED_COMMAND.index("--data_dir") + 2:]]).to_dict()
    solver_dir = "runs/iReasoner/step_02500/solver"
    assert export == ["run.py", "export", "--model", BASE_7B, "--adapter", solver_dir,
                      "--out", "results/paper/merged-solver"]
    lmms_eval_call(base, "qwen2_5_vl", f"pretrained={BASE_7B},max_pixels=12845056",
                   "results/paper/base")
    lmms_eval_call(solver, "qwen2_5_vl", "pretrained=results/paper/merged-solver,"
                   "max_pixels=12845056", "results/paper/solver")
    assert table == ["scripts/paper_table.py", "--base", "results/paper/base", "--solver",
                     "results/paper/solver", "--out", "results/paper"]


def test_reproduce_paper_with_evolmm_lora_path_and_stages(tmp_path):
    (tmp_path / "data").mkdir()  # prepared already: not prepared again
    launch(PAPER, tmp_path, **{**ENV, "DATA_DIR": str(tmp_path / "data"), "EVAL_MODEL": "lora",
                               "STEPS": "100", "NPROC": "8"})
    calls = calls_in_order(tmp_path)
    assert [name for name, _ in calls] == ["python", "accelerate", "accelerate", "python"]
    assert parse_config(train_flags(calls)).total_steps == 100
    lmms_eval_call(calls[2][1], "qwen2_5_vl_our",
                   f"pretrained={BASE_7B},base_model={BASE_7B},lora_path=runs/iReasoner/"
                   "step_00100/solver,max_pixels=12845056,interleave_visuals=False",
                   "results/paper/solver")
    for d in ("calls", "argv", "bin"):
        shutil.rmtree(tmp_path / d)
    launch(PAPER, tmp_path, **{**ENV, "STAGES": "eval,table"})
    assert [name for name, _ in calls_in_order(tmp_path)] == ["accelerate", "accelerate", "python"]


def test_reproduce_paper_names_what_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "API_TYPE",
                                                            "CHARTX_DIR")}
    for extra, message in (({"DATA_DIR": str(tmp_path / "none")}, "CHARTX_DIR"),
                           ({"STAGES": "eval"}, "OPENAI_API_KEY"),
                           ({"EVAL_MODEL": "vllm"}, "EVAL_MODEL")):
        done = subprocess.run(["bash", PAPER], env={**env, **extra}, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert done.returncode != 0 and message in done.stderr, done.stderr
