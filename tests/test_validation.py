"""Validation while training, --keep_best and the collapse alarms, on the tiny model (validate.py,
collapse.py). The alarms on the demo and on the sign-flip control: tests/test_learning.py.

    python -m pytest tests/test_validation.py
"""
import json
import os

import pytest

import collapse
import train
import validate
from config import Config
from conftest import train_args
from tools.tiny import make_counting_eval_set


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def without_time(recs):
    return [{k: v for k, v in r.items() if k != "val_seconds"} for r in recs]


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    """Four labeled counting rows and one without an answer (label-free figures only)."""
    path = make_counting_eval_set(str(tmp_path_factory.mktemp("valset")), n=4)
    rows = read_jsonl(path)
    rows[-1].pop("answer")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.mark.slow
def test_validation_series_resumes_and_leaves_training_unchanged(tiny_model, image_dir, val_set,
                                                                  tmp_path):
    """Steps 0, 2, 4 validated; a run stopped at step 2 and resumed writes the same series as one
    that ran through (same seeds per row; none repeated or skipped), and its training records
    are those of a run without validation (the training RNG is restored)."""
    out = str(tmp_path)
    val = dict(val_data=val_set, val_every=2, val_samples=3, num_solver_samples=3)
    assert train.main(train_args(tiny_model, image_dir, out, "through", steps=4, **val)) == 0
    assert train.main(train_args(tiny_model, image_dir, out, "split", steps=2, **val)) == 0
    assert train.main(train_args(tiny_model, image_dir, out, "split", steps=4, **val)) == 0
    assert train.main(train_args(tiny_model, image_dir, out, "plain", steps=4,
                                 num_solver_samples=3)) == 0
    through = read_jsonl(os.path.join(out, "through", validate.VAL_LOG))
    split = read_jsonl(os.path.join(out, "split", validate.VAL_LOG))
    assert [r["step"] for r in through] == [0, 2, 4]
    assert without_time(split) == without_time(through)
    assert through[0]["val_rows"] == 4 and through[0]["val_labeled_rows"] == 3
    for key in ("val_acc_first", "val_acc_mean", "val_maj_at_n", "val_agreement",
                "val_step_agreement", "val_distinct_answers"):
        assert isinstance(through[0][key], float), key
    logs = {name: read_jsonl(os.path.join(out, name, "iter_log.jsonl"))
            for name in ("through", "plain")}
    assert [r["reward_final"] for r in logs["through"]] == [r["reward_final"] for r in logs["plain"]]
    assert logs["through"][-1]["solver_param_checksum"] == logs["plain"][-1]["solver_param_checksum"]


SCRIPT = {0: 0.10, 1: 0.50, 2: 0.30, 3: 0.20, 4: 0.40, 5: 0.45, 6: 0.20}


@pytest.fixture
def scripted(monkeypatch):
    """Validations that return SCRIPT's val_acc_mean at each step (no sampling)."""
    def fake(run, step, rows):
        return {"step": step, "val_acc_mean": SCRIPT[step], "val_agreement": 0.5}
    monkeypatch.setattr(validate, "validate", fake)


@pytest.mark.slow
def test_keep_best_survives_rotation_and_resume(tiny_model, image_dir, val_set, scripted,
                                                tmp_path):
    out = str(tmp_path)
    flags = dict(val_data=val_set, val_every=1, keep_best="val_acc_mean", save_every=1,
                 max_checkpoints=1, collapse_val_patience=0, max_new_tokens_solver=4,
                 num_solver_samples=2)
    assert train.main(train_args(tiny_model, image_dir, out, "kb", steps=3, **flags)) == 0
    assert train.main(train_args(tiny_model, image_dir, out, "kb", steps=6, **flags)) == 0
    run_dir = os.path.join(out, "kb")
    steps = sorted(n for n in os.listdir(run_dir) if n.startswith("step_"))
    assert steps == ["step_00001", "step_00006"]  # the best (0.50 at step 1), and the newest
    assert os.readlink(os.path.join(run_dir, "best")) == "step_00001"
    with open(os.path.join(run_dir, "step_00006", "trainer_state.json")) as f:
        kept = json.load(f)["train_state"]["val"]
    assert (kept["best_step"], kept["best_value"]) == (1, 0.5)
    assert [r["step"] for r in read_jsonl(os.path.join(run_dir, validate.VAL_LOG))] == list(range(7))


@pytest.mark.slow
def test_stop_on_collapse_saves_and_names_the_best(tiny_model, image_dir, val_set, scripted,
                                                   tmp_path, capsys):
    out = str(tmp_path)
    flags = dict(val_data=val_set, val_every=1, keep_best="val_acc_mean", save_every=10,
                 stop_on_collapse="", max_new_tokens_solver=4, num_solver_samples=2)
    assert train.main(train_args(tiny_model, image_dir, out, "stop", steps=6, **flags)) == 0
    # 0.30 and 0.20 lie 0.05 or more below 0.50: the second in a row (step 3) stops the run
    printed = capsys.readouterr().out
    assert (f"stopped on a collapse alarm at step 3; best checkpoint: "
            f"{os.path.join(out, 'stop')}/step_00001 (val_acc_mean 0.500)") in printed
    assert sorted(n for n in os.listdir(os.path.join(out, "stop")) if n.startswith("step_")) \
        == ["step_00000", "step_00001", "step_00003"]


def records(n_images=4, n=5, unanimous=0, entropy=0.12, length=30):
    """One step's log records: `unanimous` images whose N answers (and rewards) are all one."""
    out = []
    for b in range(n_images):
        one = b < unanimous
        out.append({"dominant_count": n if one else 2, "reward_final": [1.0] * n if one else
                    [0.4, 0.4, 0.2, 0.2, 0.2][:n], "distinct_completions": 1 if one else 4,
                    "completion_lengths": [length] * n, "completions_clipped": 0,
                    "token_entropy": entropy})
    return out


def test_label_free_alarm_on_the_window_mean():
    cfg = Config(collapse_patience=4)
    state = {}
    fired = [collapse.label_free(cfg, state, s, records(unanimous=u))
             for s, u in enumerate([4, 4, 3, 4, 4, 4, 4, 4, 0, 4], 1)]
    # shares 1, 1, .75, 1: mean .94 < .95 at step 4; the window (1, .75, 1, 1) until step 6,
    # (.75, 1, 1, 1) at 6: still .94; (1, 1, 1, 1) at 7: fires once, and not again while it stays
    assert [bool(f) for f in fired] == [False] * 6 + [True, False, False, False]
    assert "one_answer 1" in fired[6] and "zero_std 1" in fired[6]
    state = {}
    fired = [collapse.label_free(cfg, state, s, records(entropy=0.001, length=2))
             for s in range(1, 5)]
    assert "entropy" in fired[3] and "length" in fired[3] and not any(fired[:3])
    assert not any(collapse.label_free(Config(), {}, s, records(unanimous=3)) for s in range(40))


def test_validation_alarm_margin_and_patience():
    cfg = Config(collapse_val_margin=0.05, collapse_val_patience=2)  # not the defaults
    state = {}
    series = [0.50, 0.47, 0.44, 0.46, 0.44, 0.43, 0.60]
    fired = [collapse.from_validation(cfg, state, {"step": i, "val_acc_mean": v})
             for i, v in enumerate(series)]
    # 0.47 is within 0.05 of 0.50; 0.44 and 0.46 are not below 0.45 together; 0.44, 0.43 are
    assert [bool(f) for f in fired] == [False] * 5 + [True, False]
    assert not collapse.from_validation(cfg, {}, {"step": 0, "val_agreement": 0.1})  # no labels


@pytest.mark.slow
def test_step_0_validation_is_run_py_eval_of_the_base(tiny_model, image_dir, tmp_path):
    """One implementation: the validation before step 1 gives eval's numbers for the base model
    with the same seed (row i from seed + i in both)."""
    from tools import infer
    data = make_counting_eval_set(str(tmp_path / "set"), n=3)
    assert train.main(train_args(tiny_model, image_dir, str(tmp_path), "v", steps=1, val_data=data,
                                 val_samples=3, num_solver_samples=3, seed=7)) == 0
    step0 = read_jsonl(os.path.join(tmp_path, "v", validate.VAL_LOG))[0]
    out = str(tmp_path / "eval.jsonl")
    assert infer.main(["eval", "--model", tiny_model, "--adapter", "none", "--data", data,
                       "--samples", "3", "--max_new_tokens", "16", "--seed", "7", "--out", out]) == 0
    rows = [next(iter(r["results"].values())) for r in read_jsonl(out)]
    mean = lambda key: sum(float(r[key]) for r in rows) / len(rows)  # noqa: E731
    assert step0["val_agreement"] == pytest.approx(mean("agreement"), abs=1e-12)
    assert step0["val_step_agreement"] == pytest.approx(mean("step_agreement"), abs=1e-12)
    assert step0["val_acc_first"] == pytest.approx(mean("correct_first"), abs=1e-12)
    assert step0["val_distinct_answers"] == pytest.approx(mean("distinct_answers"), abs=1e-12)
    assert step0["val_samples_digest"] == validate.digest([validate.digest(r["samples"])
                                                           for r in rows])


def test_bad_validation_flags_are_one_line_errors(tmp_path, capsys):
    assert train.main(["--data_dir", str(tmp_path), "--val_data", str(tmp_path / "no.jsonl")]) == 2
    assert train.main(["--data_dir", str(tmp_path), "--keep_best", "val_acc_mean"]) == 2
    assert train.main(["--data_dir", str(tmp_path), "--keep_best", "val_loss"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "no.jsonl does not exist" in err[0] and "needs validation" in err[1]
