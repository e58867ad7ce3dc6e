"""Faults never lose a run: signals, kills mid-save, failing and corrupted checkpoints, NaN.

Everything goes through the real command line on the tiny model: as a subprocess wherever a
signal is involved, in-process (train.main) where a writer or the loss must be patched.

    python -m pytest tests/test_faults.py -q
"""
import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint as ckpt  # noqa: E402
import run_checkpoint  # noqa: E402
import train  # noqa: E402
import update  # noqa: E402
from config import Config, parse_config  # noqa: E402
from conftest import ENV, strict_json_lines, train_args  # noqa: E402
from distributed import Dist, UserError  # noqa: E402
from runtime import rng_state  # noqa: E402
from vlm import build_policies  # noqa: E402

# Long Solver answers make step 3's rollout long enough to be hit by a signal reliably.
LONG = {"max_new_tokens_solver": 128}
STEPS = 4



def read_log(run_dir) -> list[dict]:
    """Complete records only (a line still being written does not parse yet)."""
    path = os.path.join(run_dir, "iter_log.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the trainer is mid-write; the next poll sees it whole
    return records


def comparable(records: list[dict]) -> list[dict]:
    """Records without wall-clock fields, as JSON text so that NaN == NaN."""
    return [json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
            for r in records]


def steps_of(run_dir) -> list[int]:
    return [r["step"] for r in read_log(run_dir)]


def checkpoint_steps(run_dir) -> list[int]:
    return [step for step, _ in ckpt.complete_checkpoints(str(run_dir))]


def leftovers(run_dir) -> list[str]:
    return [n for n in os.listdir(run_dir) if ckpt.TMP_MARK in n]


def assert_loadable(path) -> dict:
    """A checkpoint folder whose files all read back (without building a model)."""
    assert os.path.isfile(os.path.join(path, ckpt.DONE_FILE))
    for role in train.ROLES:
        assert load_file(os.path.join(path, role, "adapter_model.safetensors"))
    return ckpt.read_state(path)


def error_lines(text: str) -> list[str]:
    assert "Traceback" not in text, text[-3000:]
    # tqdm redraws with \r and no newline, so \r also ends a line here.
    return [line for line in re.split(r"[\r\n]+", text) if line.startswith("error:")]


# ---------------------------------------------------------------- running the trainer
def start(argv: list, log_dir, tag: str) -> subprocess.Popen:
    """train.py in its own process; stdout/stderr go to files (a full pipe would block it)."""
    with open(os.path.join(log_dir, f"{tag}.out"), "w") as out, \
            open(os.path.join(log_dir, f"{tag}.err"), "w") as err:
        return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV,
                                stdout=out, stderr=err)


def stderr_of(log_dir, tag: str) -> str:
    with open(os.path.join(log_dir, f"{tag}.err"), encoding="utf-8", errors="replace") as f:
        return f.read()


def finish(proc: subprocess.Popen, log_dir, tag: str, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{tag} hung:\n{stderr_of(log_dir, tag)[-3000:]}")


def wait_until(predicate, proc: subprocess.Popen, log_dir, tag: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"{tag} exited ({proc.returncode}) before the signal:\n"
                                 f"{stderr_of(log_dir, tag)[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{tag}: condition not reached in {timeout} s")
        time.sleep(0.01)


@contextlib.contextmanager
def own_signal_handlers():
    """train.Stop installs SIGTERM/SIGINT handlers; give pytest its own back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def run_inprocess(argv: list) -> int:
    with own_signal_handlers():
        return train.main(argv)


@pytest.fixture(scope="module")
def reference(tiny_model, image_dir, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4) that the fault runs must reproduce."""
    out = str(tmp_path_factory.mktemp("reference"))
    argv = train_args(tiny_model, image_dir, out, "ref", steps=STEPS, **LONG)
    proc = start(argv, out, "ref")
    assert finish(proc, out, "ref") == 0, stderr_of(out, "ref")[-3000:]
    run_dir = os.path.join(out, "ref")
    assert steps_of(run_dir) == [1, 2, 3, 4] and checkpoint_steps(run_dir) == [2, 4]
    return {"run_dir": run_dir, "log": read_log(run_dir)}


def copy_run(reference, tmp_path, name: str = "ref") -> tuple[str, str]:
    """A private copy of the reference run (same run name, so the same command resumes it)."""
    out = str(tmp_path / "out")
    shutil.copytree(reference["run_dir"], os.path.join(out, name))
    return out, os.path.join(out, name)


# ---------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_mid_step_saves_last_step_and_resume_matches(tiny_model, image_dir, reference,
                                                             tmp_path):
    out = str(tmp_path)
    # save_every 100: the only checkpoint can come from the signal path.
    argv = train_args(tiny_model, image_dir, out, "ref", steps=STEPS, save_every=100, **LONG)
    run_dir = os.path.join(out, "ref")
    proc = start(argv, out, "term")
    wait_until(lambda: 2 in steps_of(run_dir), proc, out, "term")
    proc.send_signal(signal.SIGTERM)  # step 3 is rolling out now
    assert finish(proc, out, "term") == 0, stderr_of(out, "term")[-3000:]
    assert "signal 15" in stderr_of(out, "term")
    assert steps_of(run_dir) == [1, 2]
    assert checkpoint_steps(run_dir) == [2] and leftovers(run_dir) == []
    state = assert_loadable(os.path.join(run_dir, "step_00002"))
    assert state["step"] == 2 and state["train_state"]["step"] == 2

    proc = start(argv, out, "resume")
    assert finish(proc, out, "resume") == 0, stderr_of(out, "resume")[-3000:]
    assert comparable(read_log(run_dir)) == comparable(reference["log"])
    assert checkpoint_steps(run_dir) == [2, 4]


def start_past_step_one(model: str, data: str, out: str, name: str):
    """A long run (no periodic saves) that has logged step 1: (process, run folder)."""
    argv = train_args(model, data, out, name, steps=STEPS, save_every=100, **LONG)
    run_dir = os.path.join(out, name)
    proc = start(argv, out, name)
    wait_until(lambda: 1 in steps_of(run_dir), proc, out, name)
    return proc, run_dir


@pytest.mark.slow
def test_sigint_exits_130_after_a_clean_checkpoint(tiny_model, image_dir, tmp_path):
    out = str(tmp_path)
    proc, run_dir = start_past_step_one(tiny_model, image_dir, out, "int")
    proc.send_signal(signal.SIGINT)
    assert finish(proc, out, "int") == 130, stderr_of(out, "int")[-3000:]
    assert steps_of(run_dir) == [1] and checkpoint_steps(run_dir) == [1]
    assert assert_loadable(os.path.join(run_dir, "step_00001"))["step"] == 1
    assert "KeyboardInterrupt" not in stderr_of(out, "int")


@pytest.mark.slow
def test_second_signal_exits_at_once_without_corrupting(tiny_model, image_dir, tmp_path):
    out = str(tmp_path)
    proc, run_dir = start_past_step_one(tiny_model, image_dir, out, "twice")
    proc.send_signal(signal.SIGTERM)
    # The second must come after the first was handled (two pending ones would merge into one),
    # and it lands while step 2 is being abandoned or step 1 saved.
    wait_until(lambda: "signal 15" in stderr_of(out, "twice"), proc, out, "twice")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, out, "twice", timeout=30) == 128 + signal.SIGTERM
    # Whatever was in flight, every checkpoint that looks complete is, and the log parses.
    assert steps_of(run_dir) == [1]
    for _, path in ckpt.complete_checkpoints(run_dir):
        assert_loadable(path)
    with open(os.path.join(run_dir, "iter_log.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == steps_of(run_dir)


# ---------------------------------------------------------------- kills
def half_write(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.mark.slow
def test_kill_mid_checkpoint_write_resumes_from_newest_complete(tiny_model, image_dir, reference,
                                                                tmp_path):
    out, run_dir = copy_run(reference, tmp_path)
    # The leftovers of a SIGKILL while step 4 was being saved: its folder is still temporary,
    # half-written and without SAVE_OK; and of one in the middle of a log line.
    tmp = os.path.join(run_dir, "step_00004.tmp-12345")
    os.rename(os.path.join(run_dir, "step_00004"), tmp)
    os.remove(os.path.join(tmp, ckpt.DONE_FILE))
    half_write(os.path.join(tmp, ckpt.STATE_TENSORS))
    with open(os.path.join(run_dir, "iter_log.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 5, "rank": 0, "image_pa')
    assert checkpoint_steps(run_dir) == [2]

    argv = train_args(tiny_model, image_dir, out, "ref", steps=STEPS, **LONG)
    assert run_inprocess(argv) == 0
    assert leftovers(run_dir) == []
    assert steps_of(run_dir) == [1, 2, 3, 4]  # none twice, none missing
    assert comparable(read_log(run_dir)) == comparable(reference["log"])
    assert checkpoint_steps(run_dir) == [2, 4]
    assert assert_loadable(os.path.join(run_dir, "step_00004"))["step"] == 4


def test_kill_before_first_checkpoint_empties_the_log(tiny_model, image_dir, tmp_path):
    """No complete checkpoint: the run restarts at step 1, so its old records must go."""
    run_dir = tmp_path / "r"
    (run_dir / "step_00002.tmp-7").mkdir(parents=True)
    (run_dir / "iter_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "ra')
    cfg = parse_config(train_args(tiny_model, image_dir, str(tmp_path), "r"))
    st = train.TrainState(kl_coef={r: cfg.kl_coef for r in train.ROLES})
    run = train.Run(cfg=cfg, dist=Dist(), name="r", dir=str(run_dir), pool=None, policies={},
                    optimizers={}, st=st)
    assert run_checkpoint.resume(run) is None
    assert st.step == 0
    assert (run_dir / "iter_log.jsonl").read_text() == ""
    assert os.listdir(run_dir) == ["iter_log.jsonl"]


# ---------------------------------------------------------------- failing writes
class FailingCall:
    """Wraps a writer; the calls numbered in `failing` (1-based) run `fail` instead."""
    def __init__(self, real, failing: set, fail):
        self.real, self.failing, self.fail, self.calls = real, failing, fail, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.failing:
            return self.fail(self.real, *args, **kwargs)
        return self.real(*args, **kwargs)


def raise_enospc(real, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """The kernel refuses writes past nbytes (EFBIG), like a full disk, to the real writers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def write_with_tiny_disk(real, *args, **kwargs):
    with file_size_limit(4096):
        return real(*args, **kwargs)


def check_failed_save(code: int, err: str, run_dir: str, step: int, kept: list, reason: str):
    """Exit 2 with one line naming the failed checkpoint and why; earlier ones intact."""
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and f"step_{step:05d} failed ({reason}" in lines[0], lines
    assert "earlier checkpoints" in lines[0]
    assert checkpoint_steps(run_dir) == kept and leftovers(run_dir) == []
    for step_done in kept:
        assert_loadable(os.path.join(run_dir, f"step_{step_done:05d}"))


@pytest.mark.slow
def test_failing_checkpoint_write_stops_cleanly_and_keeps_earlier(tiny_model, image_dir,
                                                                  tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    run_dir = os.path.join(out, "full")
    argv = train_args(tiny_model, image_dir, out, "full", steps=3, save_every=1, max_checkpoints=5)
    # 1) save_policy runs twice per save (solver, proposer): call 3 is the second save.
    monkeypatch.setattr(ckpt, "save_policy", FailingCall(ckpt.save_policy, {3}, raise_enospc))
    check_failed_save(run_inprocess(argv), capsys.readouterr().err, run_dir, 2, [1],
                      "No space left on device")
    monkeypatch.undo()

    # 2) Resume from step 1; now the real safetensors writer hits a full disk at step 2's save.
    monkeypatch.setattr(ckpt, "save_policy",
                        FailingCall(ckpt.save_policy, {1}, write_with_tiny_disk))
    check_failed_save(run_inprocess(argv), capsys.readouterr().err, run_dir, 2, [1],
                      "Error while serializing: I/O error: File too large")
    monkeypatch.undo()

    # 3) Resume again; the trainer state's tensors hit the full disk at step 3's save.
    monkeypatch.setattr(ckpt, "write_state",
                        FailingCall(ckpt.write_state, {2}, write_with_tiny_disk))
    check_failed_save(run_inprocess(argv), capsys.readouterr().err, run_dir, 3, [1, 2],
                      "Error while serializing: I/O error: File too large")
    monkeypatch.undo()

    # 4) The disk has room again: the run finishes from the intact step 2.
    assert run_inprocess(argv) == 0
    capsys.readouterr()
    assert steps_of(run_dir) == [1, 2, 3] and checkpoint_steps(run_dir) == [1, 2, 3]


# ---------------------------------------------------------------- corrupted checkpoints
def corrupt(run_dir: str, kind: str) -> None:
    newest = os.path.join(run_dir, "step_00004")
    if kind == "truncated_state":
        half_write(os.path.join(newest, ckpt.STATE_TENSORS))
    elif kind == "garbage_state":
        with open(os.path.join(newest, ckpt.STATE_JSON), "wb") as f:
            f.write(b"\x80\x04not JSON at all")
    elif kind == "missing_adapter":
        shutil.rmtree(os.path.join(newest, "proposer"))
    elif kind == "truncated_adapter":
        half_write(os.path.join(newest, "solver", "adapter_model.safetensors"))
    else:
        raise ValueError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated_state", "garbage_state", "missing_adapter",
                                  "truncated_adapter"])
def test_corrupted_newest_checkpoint_is_named(kind, tiny_model, image_dir, reference, tmp_path,
                                              capsys):
    out, run_dir = copy_run(reference, tmp_path)
    corrupt(run_dir, kind)
    argv = train_args(tiny_model, image_dir, out, "ref", steps=STEPS, **LONG)
    assert run_inprocess(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and os.path.join(run_dir, "step_00004") in lines[0]
    assert "--resume_from" in lines[0]
    assert checkpoint_steps(run_dir) == [2, 4]  # nothing was touched
    assert steps_of(run_dir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_from_older_checkpoint_after_corruption(tiny_model, image_dir, reference, tmp_path,
                                                       capsys):
    out, run_dir = copy_run(reference, tmp_path)
    corrupt(run_dir, "truncated_state")
    older = os.path.join(run_dir, "step_00002")
    argv = train_args(tiny_model, image_dir, out, "ref", steps=STEPS, resume_from=older, **LONG)
    assert run_inprocess(argv) == 0, capsys.readouterr().err[-3000:]
    assert comparable(read_log(run_dir)) == comparable(reference["log"])
    assert checkpoint_steps(run_dir) == [2, 4]
    assert assert_loadable(os.path.join(run_dir, "step_00004"))["step"] == 4
    aside = [n for n in os.listdir(run_dir) if n.startswith("step_00004.superseded-")]
    assert len(aside) == 1  # the corrupted one is kept for inspection, out of the way



def test_adapter_of_another_shape_is_a_mismatch_not_damage(tiny_model, tmp_path):
    """A rank-4 checkpoint loaded into rank-8 adapters: the files are fine, the model differs,
    so the message must not send the user to an older checkpoint of the same run."""
    def policies(rank):
        return build_policies(Config(solver_model=tiny_model, proposer_model=tiny_model,
                                     use_lora_solver=True, use_lora_proposer=True,
                                     dtype="float32", device_map="cpu", lora_r=rank))
    state = {"step": 1, "world_size": 1, "train_state": {"step": 1}, "config": {},
             "rng": [rng_state()], "optimizers": {}}  # a valid state: only the weights differ
    path = ckpt.save_checkpoint(str(tmp_path), 1, policies(4), state, keep=2)
    with pytest.raises(UserError) as e:
        ckpt.load_checkpoint(path, policies(8))
    assert "solver/ does not fit this model" in str(e.value)
    assert "--resume_from" not in str(e.value)

# ---------------------------------------------------------------- non-finite updates
def nan_logits_on(calls: set):
    """An update.completion_logits whose numbered policy calls (1-based) return NaN (still in the
    graph). The reference's calls (under no_grad) pass through and are not counted."""
    real = update.completion_logits

    def fail(_real, *args, **kwargs):
        return _real(*args, **kwargs) * float("nan")
    policy_calls = FailingCall(real, calls, fail)

    def call(*args, **kwargs):
        return policy_calls(*args, **kwargs) if torch.is_grad_enabled() else real(*args, **kwargs)
    return call


@pytest.mark.slow
def test_one_nonfinite_update_is_skipped_and_counted(tiny_model, image_dir, tmp_path,
                                                     monkeypatch, caplog):
    out = str(tmp_path)
    run_dir = os.path.join(out, "nan1")
    argv = train_args(tiny_model, image_dir, out, "nan1", steps=3, save_every=1, max_checkpoints=3)
    # Calls: step 1 solver, step 2 solver (NaN) and proposer, step 3 solver.
    monkeypatch.setattr(update, "completion_logits", nan_logits_on({2}))
    assert run_inprocess(argv) == 0
    log = read_log(run_dir)
    assert [r["nonfinite_skips"] for r in log] == [0, 1, 1]
    # strict JSON: the NaN loss is null, and the record says what it was
    assert log[1]["solver_loss"] is None and log[1]["nonfinite"]["solver_loss"] == "NaN"
    assert "nonfinite" not in log[0] and "nonfinite" not in log[2]
    assert strict_json_lines(os.path.join(run_dir, "iter_log.jsonl")) == log
    assert any("non-finite solver" in r.getMessage() for r in caplog.records)
    adapter = lambda step, role: load_file(  # noqa: E731
        os.path.join(run_dir, f"step_{step:05d}", role, "adapter_model.safetensors"))
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(adapter(1, "solver"), adapter(2, "solver"))          # the skipped update
    assert not same(adapter(1, "proposer"), adapter(2, "proposer"))  # step 2's finite one
    assert not same(adapter(2, "solver"), adapter(3, "solver"))      # training went on


@pytest.mark.slow
def test_three_nonfinite_in_a_row_stop_without_saving(tiny_model, image_dir, tmp_path,
                                                      monkeypatch, capsys):
    out = str(tmp_path)
    run_dir = os.path.join(out, "nan3")
    argv = train_args(tiny_model, image_dir, out, "nan3", steps=4, save_every=1, max_checkpoints=5)
    # From call 2 on: step 2 solver, step 2 proposer, step 3 solver -> the third in a row.
    monkeypatch.setattr(update, "completion_logits", nan_logits_on(set(range(2, 100))))
    assert run_inprocess(argv) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "3 non-finite updates in a row" in lines[0]
    assert checkpoint_steps(run_dir) == [1, 2] and leftovers(run_dir) == []
    assert steps_of(run_dir) == [1, 2]
    assert read_log(run_dir)[-1]["nonfinite_skips"] == 2
