"""Accidents a user makes, each ending in one clear line: two trainers on one run, a model that
cannot load, a missing or conflicting flag, a multi-process run with a bad flag, resuming with
changed flags, and the pool's order on large folders.

    python -m pytest tests/test_reliability.py -q
"""
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_and_utils as D  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402
from conftest import ENV, strict_json_lines, train_args  # noqa: E402
from distributed import LOCK_FILE  # noqa: E402


def error_lines(text: str) -> list[str]:
    assert "Traceback" not in text, text[-3000:]
    return [line for line in re.split(r"[\r\n]+", text) if line.startswith("error:")]


def cli(argv: list, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def start(argv: list, out: str, tag: str) -> subprocess.Popen:
    with open(os.path.join(out, f"{tag}.err"), "w") as err:
        return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=err)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.05)


def log_steps(run_dir: str) -> list[int]:
    return [r["step"] for r in strict_json_lines(os.path.join(run_dir, "iter_log.jsonl"))]


# ---------------------------------------------------------------- the run lock
@pytest.mark.slow
def test_second_trainer_on_a_run_exits_2_and_the_first_completes(tiny_model, image_dir, tmp_path):
    out = str(tmp_path)
    run_dir = os.path.join(out, "busy")
    argv = train_args(tiny_model, image_dir, out, "busy", steps=4, max_new_tokens_solver=64)
    first = start(argv, out, "first")
    lock = os.path.join(run_dir, LOCK_FILE)
    wait_for(lambda: os.path.exists(lock) and f"pid {first.pid} " in open(lock).read(), first,
             "the lock")
    # Paused while the second starts, so it is surely still running (and holding the lock)
    # however slow the machine is; a paused holder is also what a hung job looks like.
    first.send_signal(signal.SIGSTOP)
    try:
        second = cli(argv)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = error_lines(second.stderr)
    assert len(lines) == 1, lines
    assert "run busy" in lines[0] and f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
    assert "resuming" not in second.stdout and "starting" not in second.stdout
    assert first.wait(timeout=600) == 0
    assert log_steps(run_dir) == [1, 2, 3, 4]  # one writer: every step once, in order


@pytest.mark.slow
def test_sigkilled_holder_leaves_no_stale_lock(tiny_model, image_dir, tmp_path):
    out = str(tmp_path)
    run_dir = os.path.join(out, "killed")
    argv = train_args(tiny_model, image_dir, out, "killed", steps=4, max_new_tokens_solver=64)
    proc = start(argv, out, "killed")
    wait_for(lambda: os.path.isfile(os.path.join(run_dir, "step_00002", "SAVE_OK")), proc,
             "checkpoint 2")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(os.path.join(run_dir, LOCK_FILE))  # the file stays; the lock does not
    again = cli(argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    assert log_steps(run_dir) == [1, 2, 3, 4]


# ---------------------------------------------------------------- models that cannot load
def damaged_copy(tiny_model: str, dest: str, kind: str) -> str:
    shutil.copytree(tiny_model, dest)
    if kind == "truncated_weights":
        # the first weights file: model.safetensors, or the hub layout's first shard
        path = os.path.join(dest, sorted(n for n in os.listdir(dest)
                                         if n.startswith("model") and n.endswith(".safetensors"))[0])
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "text_only":
        with open(os.path.join(dest, "config.json"), "w") as f:
            json.dump({"model_type": "qwen2", "hidden_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 1,
                       "intermediate_size": 32, "vocab_size": 1024}, f)
    elif kind == "no_tokenizer":
        for name in os.listdir(dest):
            if name.startswith("tokenizer"):
                os.remove(os.path.join(dest, name))
    elif kind == "no_processor":
        for name in ("processor_config.json", "preprocessor_config.json"):
            if os.path.exists(os.path.join(dest, name)):
                os.remove(os.path.join(dest, name))
    return dest


MODEL_FAULTS = {
    "missing_folder": "the local folder does not exist",
    "truncated_weights": "a weights file is damaged or truncated",
    "text_only": "it is not an image-text model (model_type 'qwen2')",
    "no_tokenizer": "tokenizer files are missing",
    "no_processor": "image processor config is missing",
}


@pytest.mark.parametrize("kind", list(MODEL_FAULTS))
def test_model_that_cannot_load_is_one_line_naming_model_and_cause(kind, tiny_model, image_dir,
                                                                   tmp_path, capsys):
    model = str(tmp_path / "model")
    if kind != "missing_folder":
        damaged_copy(tiny_model, model, kind)
    argv = train_args(model, image_dir, str(tmp_path), "m", steps=1)
    assert train.main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"cannot load model {model}: " in lines[0], lines
    assert MODEL_FAULTS[kind] in lines[0], lines
    if kind == "missing_folder":  # infer/eval/export load through the same code
        image = next(os.path.join(d, f) for d, _, fs in sorted(os.walk(image_dir)) for f in fs)
        assert run.main(["infer", "--model", model, "--image", image, "--question", "q?"]) == 2
        assert MODEL_FAULTS[kind] in error_lines(capsys.readouterr().err)[0]


@pytest.mark.slow
def test_hub_id_while_offline_is_one_line(image_dir, tmp_path):
    name = "Qwen/Qwen2.5-VL-7B-Instruct-not-cached"
    proc = cli(train_args(name, image_dir, str(tmp_path), "hub", steps=1),
               env={**ENV, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and f"cannot load model {name}: " in lines[0]
    assert "Hub cannot be reached" in lines[0]


# ---------------------------------------------------------------- flags
def test_empty_data_dir_says_it_is_required(tiny_model, tmp_path, capsys):
    argv = train_args(tiny_model, "", str(tmp_path), "d", steps=1)
    assert train.main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["error: --data_dir is required: the folder of unlabeled training images"]
    assert not os.path.exists(tmp_path / "d")  # nothing made for a run that cannot start


def test_conflicting_flags_name_both(tiny_model, image_dir, tmp_path, capsys):
    # (--no_freeze_vision with LoRA is no conflict: the published train.sh may pass it, and
    # there it changed nothing; tests/test_config.py checks the warning.)
    argv = train_args(tiny_model, image_dir, str(tmp_path), "c", steps=1,
                      update_mode="per_sample", images_per_step=2)
    assert train.main(argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--update_mode per_sample" in line and "--images_per_step 2" in line


@pytest.mark.slow
@pytest.mark.parametrize("bad", [{"temp": "-1"}, {"solver_model": "/no/such/model"}])
def test_two_process_error_is_printed_once(bad, tiny_model, image_dir, tmp_path):
    """A bad flag (refused before the process group starts) and a model that cannot load
    (after): both ranks fail with exit 2, one `error:` line in all."""
    argv = train_args(tiny_model, image_dir, str(tmp_path), "ddp", steps=1, **bad)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(ROOT, "train.py"), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert ("--temp" in lines[0]) if "temp" in bad else ("/no/such/model" in lines[0])
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary: the rank's own code


# ---------------------------------------------------------------- resume with changed flags
@pytest.mark.slow
def test_resume_with_changed_flags_warns_listing_exactly_those(tiny_model, image_dir, tmp_path,
                                                               caplog, capsys):
    out = str(tmp_path)
    assert train.main(train_args(tiny_model, image_dir, out, "flags", steps=2)) == 0
    # total_steps and save_every change how long and how often, not what is learned: no warning
    argv = train_args(tiny_model, image_dir, out, "flags", steps=2, lr="2e-5", temp="0.7",
                      save_every="5")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ireasoner"):
        assert train.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "changed flags" in r.getMessage()]
    assert len(warnings) == 1
    listed = warnings[0].split("(the new values apply): ")[1].split(", ")
    assert listed == ["--temp 1.0 -> 0.7", "--lr 1e-06 -> 2e-05"]
    # a LoRA flag stays an error: the saved adapters belong to the old value
    assert train.main(train_args(tiny_model, image_dir, out, "flags", steps=2,
                                 lora_alpha="64")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--lora_alpha 32, not 64" in line


# ---------------------------------------------------------------- large image folders
def test_pool_order_is_seeded_and_independent_of_creation_order(tmp_path):
    """Two folders with the same files made in opposite orders (as two nodes' views of one
    share may list them) give the same path list, fingerprint and seeded order."""
    pools = []
    for tag, names in (("a", range(60)), ("b", reversed(range(60)))):
        root = tmp_path / tag
        for i in names:
            sub = root / f"s{i % 3}" / f"n{i % 7}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"img{i}.png").write_bytes(b"")
        pools.append(D.ImagePool(str(root), [], seed=5, max_pixels=28 * 28 * 4))
    rel = lambda p, tag: [os.path.relpath(x, tmp_path / tag) for x in p]  # noqa: E731
    assert rel(pools[0].order(0), "a") == rel(pools[1].order(0), "b")
    assert rel(pools[0].order(1), "a") == rel(pools[1].order(1), "b")
    assert pools[0].order(0) != pools[0].order(1)  # reshuffled every epoch
    assert len(pools[0]) == 60
    other_seed = D.ImagePool(str(tmp_path / "a"), [], seed=6, max_pixels=28 * 28 * 4)
    assert other_seed.order(0) != pools[0].order(0)


def test_hub_id_that_does_not_exist_says_so(monkeypatch):
    """The hub answers 404 (simulated: this machine has no network); transformers wraps it in
    an OSError whose cause is the hub client's RepositoryNotFoundError."""
    import httpx
    import transformers.utils.hub as hub
    from huggingface_hub.errors import RepositoryNotFoundError

    import runtime

    def not_found(*args, **kwargs):
        request = httpx.Request("GET", "https://huggingface.co/Qwen/typo/resolve/main/config.json")
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found",
                                      response=httpx.Response(404, request=request))
    monkeypatch.setattr(hub, "hf_hub_download", not_found)
    with pytest.raises(train.UserError, match=r"cannot load model Qwen/typo: not a local folder "
                                              r"and not a model on the Hugging Face Hub"):
        runtime.load_backbone("Qwen/typo", None, "cpu", "sdpa")
