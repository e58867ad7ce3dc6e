"""Loading a checkpoint never runs code: the trainer state is JSON + safetensors, validated on
load; an old pickled trainer_state.pt is refused, naming the commit whose converter reads it.

    python -m pytest tests/test_statefile.py -q
"""
import json
import os
import pickle
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import run  # noqa: E402
import checkpoint  # noqa: E402
import train  # noqa: E402
from conftest import train_args  # noqa: E402
from checkpoint import CONVERTER_COMMIT, OLD_STATE_FILE, STATE_JSON, STATE_TENSORS  # noqa: E402

pytestmark = pytest.mark.slow


def error_lines(text: str) -> list[str]:
    assert "Traceback" not in text, text[-3000:]
    return [line for line in re.split(r"[\r\n]+", text) if line.startswith("error:")]


def read_log(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "iter_log.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


@pytest.fixture(scope="module")
def saved_run(tiny_model, image_dir, tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2."""
    out = str(tmp_path_factory.mktemp("state"))
    argv = train_args(tiny_model, image_dir, out, "base", steps=2, save_every=1)
    assert train.main(argv) == 0
    return os.path.join(out, "base")


def copy_of(saved_run, tmp_path, name="r") -> tuple[str, str]:
    out = str(tmp_path / "out")
    shutil.copytree(saved_run, os.path.join(out, name))
    return out, os.path.join(out, name)


def argv_for(tiny_model, image_dir, out, name="r", steps=2, **extra):
    return train_args(tiny_model, image_dir, out, name, steps=steps, save_every=1, **extra)


class CreatesFile:
    """Unpickling this runs os.system: what a hostile trainer_state.pt can do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_pickle(step_dir: str, marker: str) -> None:
    for name in (STATE_JSON, STATE_TENSORS):
        os.remove(os.path.join(step_dir, name))
    with open(os.path.join(step_dir, OLD_STATE_FILE), "wb") as f:
        pickle.dump({"step": 2, "payload": CreatesFile(marker)}, f)


@pytest.mark.parametrize("how", ["run_name", "resume_from"])
def test_hostile_pickle_is_refused_and_never_runs(how, saved_run, tiny_model, image_dir, tmp_path,
                                                  capsys):
    out, run_dir = copy_of(saved_run, tmp_path)
    step2 = os.path.join(run_dir, "step_00002")
    marker = str(tmp_path / "pwned")
    plant_pickle(step2, marker)
    extra = {"resume_from": step2} if how == "resume_from" else {}
    name = "r" if how == "run_name" else "other"
    assert train.main(argv_for(tiny_model, image_dir, out, name, steps=3, **extra)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and step2 in lines[0] and "--trust-pickle" in lines[0], lines
    assert not os.path.exists(marker)
    assert sorted(os.listdir(step2)) == sorted(["SAVE_OK", OLD_STATE_FILE, "proposer", "solver"])


def edit_json(step_dir: str, change) -> None:
    path = os.path.join(step_dir, STATE_JSON)
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    change(state)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(state, f)


def wrong_optimizer_shape(step_dir: str) -> None:
    path = os.path.join(step_dir, STATE_TENSORS)
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("/optimizers/solver/state/") and
               k.endswith("exp_avg"))
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, path)


BREAKS = {
    "missing_key": (lambda d: edit_json(d, lambda s: s["train_state"].pop("baseline")),
                    "train_state.baseline is missing"),
    "wrong_type": (lambda d: edit_json(d, lambda s: s.update(world_size="1")),
                   "world_size is a str, expected int"),
    "step_mismatch": (lambda d: edit_json(d, lambda s: s.update(step=7)),
                      "step 7 does not match the folder name (step 2)"),
    "optimizer_shape": (wrong_optimizer_shape, "has shape (3, 5), its parameter"),
}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_malformed_state_is_one_line_naming_folder_and_problem(kind, saved_run, tiny_model,
                                                               image_dir, tmp_path, capsys):
    out, run_dir = copy_of(saved_run, tmp_path)
    step2 = os.path.join(run_dir, "step_00002")
    damage, problem = BREAKS[kind]
    damage(step2)
    if kind == "wrong_type":  # no older checkpoint: then none is suggested
        shutil.rmtree(os.path.join(run_dir, "step_00001"))
    before = sorted(os.listdir(run_dir))
    assert train.main(argv_for(tiny_model, image_dir, out, steps=3)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and step2 in lines[0] and problem in lines[0], lines
    if kind == "wrong_type":
        assert "--resume_from" not in lines[0] and "no older checkpoint" in lines[0]
    else:
        assert f"--resume_from {os.path.join(run_dir, 'step_00001')}" in lines[0]
    assert sorted(os.listdir(run_dir)) == before


def write_old_format(step_dir: str) -> None:
    """A trainer_state.pt in the pickled format (OLD_STATE_FILE): one pickle of tuples, numpy arrays,
    tensors and torch's optimizer state_dicts (int keys, tuple betas)."""
    s = checkpoint.read_state(step_dir)
    rng = [{"python": (r["python"][0], tuple(r["python"][1]), r["python"][2]),
            "numpy": (r["numpy"]["name"], np.asarray(r["numpy"]["keys"], dtype=np.uint32),
                      r["numpy"]["pos"], r["numpy"]["has_gauss"], r["numpy"]["cached_gaussian"]),
            "torch": r["torch"], "cuda": r["cuda"]} for r in s["rng"]]
    opts = {role: {"state": {int(k): v for k, v in o["state"].items()},
                   "param_groups": [{**g, "betas": tuple(g["betas"])} for g in o["param_groups"]]}
            for role, o in s["optimizers"].items()}
    old = {"step": s["step"], "train_state": s["train_state"], "rng": rng, "optimizers": opts,
           "config": s["config"], "world_size": s["world_size"]}
    torch.save(old, os.path.join(step_dir, OLD_STATE_FILE))
    for name in (STATE_JSON, STATE_TENSORS):
        os.remove(os.path.join(step_dir, name))


def test_old_format_is_refused_naming_the_converter(saved_run, tiny_model, image_dir, tmp_path,
                                                     capsys):
    """A genuine old-format checkpoint (torch.save of the same state): one line naming the commit
    whose `run.py convert-checkpoint` converts it; nothing in the folder changes."""
    out, run_dir = copy_of(saved_run, tmp_path)
    step1 = os.path.join(run_dir, "step_00001")
    shutil.rmtree(os.path.join(run_dir, "step_00002"))
    write_old_format(step1)
    before = sorted(os.listdir(step1))
    assert train.main(argv_for(tiny_model, image_dir, out)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and step1 in lines[0], lines
    assert f"commit {CONVERTER_COMMIT}" in lines[0]
    assert f"convert-checkpoint {step1} --trust-pickle" in lines[0]
    assert sorted(os.listdir(step1)) == before


@pytest.mark.parametrize("command", ["infer", "export"])
def test_infer_and_export_never_unpickle_an_adapter(command, saved_run, tiny_model, image_dir,
                                                    tmp_path, capsys):
    """An adapter folder carrying a hostile adapter_model.bin instead of safetensors: peft and
    transformers load .bin files with weights_only=True, which refuses it; one line, exit 2."""
    adapter = str(tmp_path / "solver")
    shutil.copytree(os.path.join(saved_run, "step_00002", "solver"), adapter)
    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    marker = str(tmp_path / "pwned")
    with open(os.path.join(adapter, "adapter_model.bin"), "wb") as f:
        pickle.dump({"w": CreatesFile(marker)}, f)
    image = next(os.path.join(d, f) for d, _, files in sorted(os.walk(image_dir)) for f in files)
    extra = (["--image", image, "--question", "q?", "--samples", "1", "--max_new_tokens", "2"]
             if command == "infer" else ["--out", str(tmp_path / "merged")])
    code = run.main([command, "--model", tiny_model, "--adapter", adapter, *extra])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and adapter in lines[0], lines
    assert not os.path.exists(marker)
