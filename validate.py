"""Validation while training: the Solver on held-out rows before step 1, every --val_every steps
and at the last step, scored by evaluation.py (the code `run.py eval` runs).

Every validation samples row i from the same seed (--seed + i), with the training RNG saved before
and restored after, so two validations differ only by the weights and the training run is the one
it would be without them. Rows are sharded over ranks (rank r takes rows r, r + world, ...); every
rank gets every row's figures. One record per validation goes to <run>/val_log.jsonl (a resume
truncates it to the checkpoint's step, so the series neither repeats nor skips one), to W&B and to
the progress bar. --keep_best and the validation collapse alarm read the same record.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
from tqdm import tqdm

import collapse
from data_and_utils import BadImage, load_image
from evaluation import gold_forms, question_text, read_rows, row_result, sample_and_score
from runtime import append_log, rng_state, seed_all, set_rng_state
from distributed import UserError
from vlm import role_sampling

log = logging.getLogger("ireasoner")
VAL_LOG = "val_log.jsonl"
PER_ROW = ("correct_first", "correct_all", "correct_majority", "agreement", "step_agreement",
           "distinct_answers")
LABEL_FREE = ("val_agreement", "val_step_agreement")  # metrics that need no answers


def load_rows(cfg, is_main: bool) -> list:
    """The validation rows (rows without an answer allowed); bad lines are warned about once."""
    rows, bad = read_rows(cfg.val_data, cfg.val_max_rows, labeled=False, flag="--val_data")
    if is_main:
        for message in bad:
            log.warning("--val_data: skipping bad row: %s", message)
    if not rows:
        raise UserError(f"--val_data {cfg.val_data}: no usable rows ({len(bad)} bad)")
    needs_labels = [f"--{n} {getattr(cfg, n)}" for n in ("keep_best", "collapse_val_metric")
                    if getattr(cfg, n) and getattr(cfg, n) not in LABEL_FREE]
    if needs_labels and all(r.answer is None for r in rows):
        raise UserError(f"{', '.join(needs_labels)} needs labeled rows, but no row of "
                        f"{cfg.val_data} has an answer")
    return rows


def is_due(cfg, step: int) -> bool:
    return step % cfg.val_every == 0 or step == cfg.total_steps


def has_record(path: str, step: int) -> bool:
    """Whether val_log.jsonl already holds the validation of `step` (a resume's first step)."""
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                if json.loads(line).get("step") == step:
                    return True
            except (json.JSONDecodeError, AttributeError):
                continue
    return False


def score_rows(run, rows: list) -> list[dict]:
    """This rank's shard of the rows: {"row": i, per-row figures} or {"row": i, "bad": why}."""
    cfg, dist, pool = run.cfg, run.dist, run.pool
    solver = run.policies["solver"]
    sampling = role_sampling(cfg, solver)
    out = []
    mine = range(dist.rank, len(rows), dist.world)
    for i in tqdm(mine, desc="validation", leave=False, disable=not dist.is_main):
        row = rows[i]
        try:
            image = load_image(row.image, pool.max_pixels, pool.min_pixels, pool.factor)
        except BadImage as e:
            out.append({"row": i, "bad": f"{row.image}: {e}"})
            continue
        seed_all(cfg.seed + i)  # the same seed for row i in every validation
        _, rw = sample_and_score(solver, image, question_text(row), cfg.val_samples, sampling,
                                 cfg, cfg.solver_prompt_text)
        res = row_result(rw, gold_forms(row), cfg.answer_match)
        out.append({"row": i, **{k: res[k] for k in PER_ROW}, "digest": digest(res["samples"])})
    return out


def digest(texts: list[str]) -> str:
    """A fingerprint of sampled texts: equal digests, equal samples."""
    return hashlib.sha1("\x1f".join(texts).encode("utf-8", "backslashreplace")).hexdigest()[:16]


def summarize(step: int, results: list[dict], seconds: float) -> dict:
    """One val_log record: means over the rows (accuracy over the labeled rows only)."""
    ok = [r for r in results if "bad" not in r]
    labeled = [r for r in ok if r["correct_first"] is not None]
    mean = lambda rs, k: float(np.mean([float(r[k]) for r in rs])) if rs else None  # noqa: E731
    return {"step": step, "val_acc_first": mean(labeled, "correct_first"),
            "val_acc_mean": mean(labeled, "correct_all"),
            "val_maj_at_n": mean(labeled, "correct_majority"),
            "val_agreement": mean(ok, "agreement"),
            "val_step_agreement": mean(ok, "step_agreement"),
            "val_distinct_answers": mean(ok, "distinct_answers"),
            "val_rows": len(ok), "val_labeled_rows": len(labeled),
            "val_bad_rows": len(results) - len(ok), "val_seconds": round(seconds, 3),
            # of every row's samples in row order: two validations sampled the same or not
            "val_samples_digest": digest([r["digest"] for r in sorted(ok, key=lambda r: r["row"])])}


def validate(run, step: int, rows: list) -> dict:
    """Validate the current Solver on every rank's shard; every rank returns the same record."""
    t0, saved = time.time(), rng_state()
    try:
        mine = score_rows(run, rows)
    finally:
        set_rng_state(saved)  # training continues exactly as without this validation
    results = [r for part in run.dist.gather(mine) for r in part]
    if run.dist.is_main:
        for r in results:
            if "bad" in r:
                log.warning("--val_data: unreadable image %s", r["bad"])
    return summarize(step, results, time.time() - t0)


def new_best(cfg, state: dict, rec: dict) -> bool:
    """Whether `rec` sets a new best of --keep_best (kept in `state`, the trainer state)."""
    value = rec.get(cfg.keep_best) if cfg.keep_best else None
    if value is None:
        return False
    if "best_value" in state and value <= state["best_value"]:
        return False
    state.update(best_value=float(value), best_step=rec["step"], best_metric=cfg.keep_best)
    return True


def bar_text(rec: dict) -> str:
    """The progress bar's validation figure: accuracy over all samples, else agreement."""
    if rec.get("val_acc_mean") is not None:
        return f"acc {rec['val_acc_mean']:.3f}@{rec['step']}"
    return f"agree {rec['val_agreement']:.3f}@{rec['step']}"


def wandb_data(rec: dict) -> dict:
    return {f"val/{k[4:]}": v for k, v in rec.items()
            if k.startswith("val_") and isinstance(v, (int, float))}


def after_step(run, step: int, records: list[dict] | None, tracker) -> tuple[bool, bool]:
    """After step `step` (records None: before the first step of this process): validate when
    due, then both collapse alarms. Every rank decides alike (the records and the validation
    are every rank's). Returns (save now: a new --keep_best, stop: an alarm with
    --stop_on_collapse)."""
    cfg, dist, st = run.cfg, run.dist, run.st
    alarms = [collapse.label_free(cfg, st.val, step, records)] if records else []
    best = False
    due = run.val_rows is not None and is_due(cfg, step)
    if due and records is None:  # a resume: already validated before this checkpoint was saved?
        due = not dist.broadcast(dist.is_main and has_record(run.val_log_path, step))
    if due:
        rec = validate(run, step, run.val_rows)
        best = new_best(cfg, st.val, rec)
        alarms.append(collapse.from_validation(cfg, st.val, rec))
        run.val_text = bar_text(rec)
        if dist.is_main:
            append_log(run.val_log_path, [rec])
            log.info("validation at step %d: %s", step, ", ".join(
                f"{k[4:]} {v:.3f}" for k, v in rec.items() if k.startswith("val_")
                and isinstance(v, float) and k != "val_seconds"))
            if tracker is not None:  # wandb_guard.Tracker on the main rank
                tracker.log_data(wandb_data(rec), step)
    for message in filter(None, alarms):
        if dist.is_main:
            log.warning(message)
            if tracker is not None:
                tracker.alert("iReasoner collapse alarm", message)
    return best, cfg.stop_on_collapse and any(alarms)


def stop_line(run) -> str:
    """--stop_on_collapse's one line: where it stopped and the checkpoint to use."""
    v = run.st.val
    if "best_step" in v:
        where = (f"best checkpoint: {run.dir}/step_{v['best_step']:05d} ({v['best_metric']} "
                 f"{v['best_value']:.3f})")
    else:
        where = f"newest checkpoint: {run.dir}/step_{run.st.step:05d} (no --keep_best)"
    return f"stopped on a collapse alarm at step {run.st.step}; {where}"

