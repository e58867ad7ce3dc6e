"""examples/*.sh: each runs (with stand-ins for python and torchrun that record their arguments),
and the flags it hands train.py parse through config.parse_config, as train.py would parse them.

    python -m pytest tests/test_examples.py
"""
import glob
import os
import subprocess

import pytest

from config import parse_config
from conftest import ROOT
from test_config import SEED_COMMAND

EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")))
RECORDER = '#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$ARGV_DIR/$(basename "$0")"\n'


def launch(script, tmp_path, args=(), **env):
    """Run an example with `python` and `torchrun` recording their argv; returns {name: argv}."""
    bin_dir, argv_dir = tmp_path / "bin", tmp_path / "argv"
    bin_dir.mkdir()
    argv_dir.mkdir()
    for name in ("python", "torchrun"):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "ARGV_DIR": str(argv_dir), **env}
    done = subprocess.run(["bash", script, *args], env=full_env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 0, done.stderr
    return {p.name: p.read_text().split("\0")[:-1] for p in argv_dir.iterdir()}


def train_flags(calls):
    """The arguments after train.py, from whichever launcher ran it."""
    (argv,) = calls.values()
    return argv[argv.index("train.py") + 1:]


def prompt_files(tmp_path):
    proposer, solver = tmp_path / "proposer.txt", tmp_path / "solver.txt"
    proposer.write_text("Ask one question about the image.\n")
    solver.write_text("Answer step by step: {question}\n")
    return {"PROPOSER_PROMPT": str(proposer), "SOLVER_PROMPT": str(solver)}


ENV = {"DATA_DIR": "/path/to/data", "NODE_RANK": "1", "MASTER_ADDR": "node0"}


def test_there_are_the_three_recipes():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"seed.sh", "reproduce_published.sh", "multinode.sh"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=os.path.basename)
def test_every_example_parses(script, tmp_path):
    flags = train_flags(launch(script, tmp_path, ["--total_steps", "7"], **ENV,
                               **prompt_files(tmp_path)))
    cfg = parse_config(flags)
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
