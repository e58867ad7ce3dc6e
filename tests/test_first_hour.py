"""A new user's first hour: W&B without a login, W&B failing mid-run, failed starts that must
leave no run folder, and what a start says about itself.

    python -m pytest tests/test_first_hour.py -q
"""
import json
import logging
import os
import subprocess
import sys
import types

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
import wandb_guard  # noqa: E402
from conftest import ENV, train_args  # noqa: E402


def images(folder, names=("a.png", "b.png")) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40, 40), (i * 60, 90, 30)).save(os.path.join(folder, name))
    return str(folder)


# ---------------------------------------------------------------- W&B
def test_wandb_online_without_login_fails_before_loading(tmp_path):
    """No key anywhere: one line naming both ways out, before the (missing) model is touched,
    and no run folder."""
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"),
               WANDB_CONFIG_DIR=str(tmp_path / "home" / "wandb"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "train.py", "--data_dir", images(tmp_path / "data"), "--solver_model",
         str(tmp_path / "no-such-model"), "--proposer_model", str(tmp_path / "no-such-model"),
         "--wandb_mode", "online", "--output_dir", str(out), "--wandb_run_name", "r"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "wandb login" in lines[0] and "--wandb_mode offline" in lines[0]
    assert "Traceback" not in proc.stderr and "no-such-model" not in proc.stderr
    assert not (out / "r").exists()


class FakeWandb:
    """init fails for online runs (a network error); an offline run logs until `fail_log_at`."""
    def __init__(self, fail_log_at=None):
        self.calls, self.logged, self.fail_log_at = [], [], fail_log_at

    def init(self, mode, **kw):
        self.calls.append(mode)
        if mode == "online":
            raise ConnectionError("api.wandb.ai: Network is unreachable")
        fake = self

        def log(data, step):
            if fake.fail_log_at is not None and step >= fake.fail_log_at:
                raise PermissionError(13, "Permission denied", "wandb/run.wandb")
            fake.logged.append(step)
        return types.SimpleNamespace(log=log, finish=lambda quiet=None: None)

    Table = staticmethod(lambda columns, data: None)
    Image = staticmethod(lambda path, caption: None)


def test_tracker_warns_once_and_goes_on_offline(monkeypatch, caplog):
    fake = FakeWandb(fail_log_at=2)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logged = []
    monkeypatch.setattr(wandb_guard, "log_wandb",
                        lambda run, records, every: (run.log({}, records[0]["step"]),
                                                     logged.append(records[0]["step"])))
    cfg = types.SimpleNamespace(wandb_mode="online", wandb_project="p", wandb_entity="",
                                wandb_log_images_every=0, to_dict=dict)
    st = types.SimpleNamespace(wandb_id="")
    with caplog.at_level(logging.WARNING, logger="ireasoner"):
        tracker = wandb_guard.Tracker(cfg, "r", "/tmp/r", st)
        for step in (1, 2, 3, 4):
            tracker.log([{"step": step}])
        tracker.finish()
    assert fake.calls == ["online", "offline"]   # the network error: reopened offline
    assert cfg.wandb_mode == "online"            # the run's saved config is not changed
    assert fake.logged == [1]                     # step 2's failure drops W&B, not the run
    warnings = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert len(warnings) == 2 and "offline" in warnings[0] and "without W&B" in warnings[1]


@pytest.mark.slow
def test_a_wandb_failure_mid_run_keeps_the_local_log(tiny_model, image_dir, tmp_path,
                                                     monkeypatch, capsys):
    fake = FakeWandb(fail_log_at=2)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = str(tmp_path / "out")
    assert train.main(train_args(tiny_model, image_dir, out, "w", steps=3,
                                 wandb_mode="offline")) == 0
    said = capsys.readouterr().out
    assert f"found 8 images in {image_dir}" in said
    assert f"new run w in {os.path.join(out, 'w')}: starting at step 1" in said
    with open(os.path.join(out, "w", "iter_log.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    assert fake.logged == [1]
    umask = os.umask(0)
    os.umask(umask)
    assert modes(os.path.join(out, "w", "step_00002")) == {oct(0o777 & ~umask), oct(0o666 & ~umask)}


# ---------------------------------------------------------------- failed starts
@pytest.mark.parametrize("case", ["no images", "unknown subfolder", "model cannot load"])
def test_a_failed_start_leaves_no_run_folder(tmp_path, case, capsys):
    data = tmp_path / "data"
    os.makedirs(data / "a")
    model = str(tmp_path / "no-such-model")
    extra = {}
    if case != "no images":
        images(data / "a")
    if case == "unknown subfolder":
        extra["include_subfolders"] = "b"
    out = tmp_path / "out"
    out.mkdir()
    assert train.main(train_args(model, str(data), str(out), "r", **extra)) == 2
    assert capsys.readouterr().err.count("error:") == 1
    assert os.listdir(out) == []


def test_a_failed_start_keeps_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "out"
    (out / "r").mkdir(parents=True)
    (out / "r" / "notes.txt").write_text("mine\n")
    (out / "s").mkdir()
    model = str(tmp_path / "no-such-model")
    data = images(tmp_path / "data")
    assert train.main(train_args(model, data, str(out), "r")) == 2
    assert train.main(train_args(model, data, str(out), "s")) == 2
    assert sorted(os.listdir(out)) == ["r", "s"]
    assert set(os.listdir(out / "r")) - {"run.lock"} == {"notes.txt"}  # the lock: as any start


# ---------------------------------------------------------------- permissions
def modes(folder) -> set:
    out = {oct(os.stat(folder).st_mode & 0o777)}
    for root, dirs, files in os.walk(folder):
        out |= {oct(os.stat(os.path.join(root, n)).st_mode & 0o777) for n in dirs + files}
    return out


@pytest.mark.parametrize("umask,expected", [(0o022, {"0o755", "0o644"}),
                                            (0o002, {"0o775", "0o664"})])
def test_written_folders_get_the_umasks_permissions(tmp_path, umask, expected):
    """safetensors writes 0600 whatever the umask; atomic_dir (checkpoints, exports) fixes it."""
    import torch
    from safetensors.torch import save_file
    from runtime import atomic_dir
    old = os.umask(umask)
    try:
        with atomic_dir(str(tmp_path / "ckpt"), str(tmp_path / "ckpt.tmp")) as tmp:
            os.makedirs(os.path.join(tmp, "solver"))
            save_file({"w": torch.zeros(2)}, os.path.join(tmp, "solver", "adapter.safetensors"))
            with open(os.path.join(tmp, "state.json"), "w") as f:
                f.write("{}")
    finally:
        os.umask(old)
    assert modes(tmp_path / "ckpt") == expected


# ---------------------------------------------------------------- what a start says
def test_start_says_what_it_found_and_how_to_resume(tmp_path):
    import startup
    from data_and_utils import ImagePool
    data = tmp_path / "data"
    images(data / "cats", ("a.png", "b.png", "c.png"))
    images(data / "dogs", ("d.png",))
    pool = ImagePool(str(data), None, 0, 64 * 28 * 28)
    assert startup.pool_summary(pool) == f"found 4 images in {data}: 3 in cats/, 1 in dogs/"
    assert startup.pool_summary(pool, 2).endswith("; 2 known unreadable from earlier steps (skipped)")
    flat = ImagePool(str(data / "cats"), None, 0, 64 * 28 * 28)
    assert startup.pool_summary(flat) == f"found 3 images in {data / 'cats'}"
    line = startup.run_summary("run-20260101-000000", "runs/run-20260101-000000", None, 1, True)
    assert line.startswith("new run run-20260101-000000 in runs/run-20260101-000000")
    assert line.endswith("to resume it later pass --wandb_run_name run-20260101-000000")
    assert "rerun the same command" in startup.run_summary("mine", "runs/mine", None, 1, False)
    assert "resuming from runs/mine/step_00004 at step 5" in startup.run_summary(
        "mine", "runs/mine", "runs/mine/step_00004", 5, False)


def test_one_solver_sample_warns(caplog):
    from config import parse_config
    with caplog.at_level(logging.WARNING, logger="ireasoner"):
        parse_config(["--num_solver_samples", "2"])
        assert not caplog.records
        parse_config(["--num_solver_samples", "1"])
    assert any("--num_solver_samples 1" in r.getMessage() for r in caplog.records)
