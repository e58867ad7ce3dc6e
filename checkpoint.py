"""Checkpoints: atomic writes, newest-complete resume, rotation, and iter_log repair.

A checkpoint is runs/<run>/step_NNNNN/ with solver/, proposer/, trainer_state.pt and SAVE_OK.
It is written to a temporary sibling folder and renamed, so a folder with that name is either
complete or absent; SAVE_OK is written last as a second witness.

    python -m pytest tests/test_train.py -q
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time

import torch
from safetensors import SafetensorError

from atomic import atomic_dir, write_text
from errors import UserError, first_line
from vlm import save_policy, load_policy

log = logging.getLogger("ireasoner")
STEP_DIR = re.compile(r"^step_(\d{5,})$")
TMP_MARK = ".tmp-"
STATE_FILE = "trainer_state.pt"
DONE_FILE = "SAVE_OK"
# What the writers raise on a full disk or a denied write: torch.save reports it as a
# RuntimeError ("unexpected pos"), safetensors as SafetensorError, plain files as OSError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# What a truncated or garbled file raises on load.
READ_ERRORS = (OSError, EOFError, pickle.UnpicklingError, SafetensorError)
# torch.load also reports a damaged zip as RuntimeError/ValueError. For the trainer state that
# is damage too; for weights the same types mean the tensors do not fit this model (a shape or
# key mismatch), which an older checkpoint of the same run would not fix.
STATE_READ_ERRORS = READ_ERRORS + (RuntimeError, ValueError)
MISMATCH_ERRORS = (RuntimeError, ValueError)


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first. Temporary folders never count."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = STEP_DIR.match(name)
        path = os.path.join(run_dir, name)
        if m and os.path.isfile(os.path.join(path, DONE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def remove_temporaries(run_dir: str) -> None:
    """Leftovers of a write that was killed: never complete, safe to remove."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        if TMP_MARK in name and name.startswith("step_"):
            log.warning("removing incomplete checkpoint folder %s", name)
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def save_checkpoint(run_dir: str, step: int, policies: dict, state: dict, keep: int) -> str:
    """Write step_NNNNN atomically, then drop the oldest complete ones beyond `keep`."""
    final = os.path.join(run_dir, f"step_{step:05d}")
    try:
        # replace: a finished step saved twice (a signal right after a save)
        with atomic_dir(final, f"{final}{TMP_MARK}{os.getpid()}", replace=True) as tmp:
            for role, policy in policies.items():
                save_policy(policy, os.path.join(tmp, role))
            torch.save(state, os.path.join(tmp, STATE_FILE))
            with open(os.path.join(tmp, DONE_FILE), "w") as f:
                f.write(f"step {step}\n")
                f.flush()
                os.fsync(f.fileno())
    except WRITE_ERRORS as e:
        raise UserError(f"writing checkpoint {final} failed ({first_line(e)}); "
                        f"earlier checkpoints in {run_dir} are intact") from e
    for _, old in complete_checkpoints(run_dir)[:-keep]:
        # Renamed first, so a kill mid-delete leaves a temporary (cleaned on resume), never a
        # half-deleted folder that still looks complete.
        doomed = f"{old}{TMP_MARK}{os.getpid()}"
        try:
            os.rename(old, doomed)
            shutil.rmtree(doomed)
        except OSError as e:  # the new checkpoint is safe; an old one left over is only space
            log.warning("could not remove old checkpoint %s: %s", old, first_line(e))
    return final


def load_checkpoint(path: str, policies: dict) -> dict:
    """Load both roles' weights and return the trainer state. Errors name the folder."""
    if not os.path.isfile(os.path.join(path, DONE_FILE)):
        raise UserError(f"{path} is not a complete checkpoint (no {DONE_FILE})")
    for role, policy in policies.items():
        role_dir = os.path.join(path, role)
        if not os.path.isdir(role_dir):
            raise UserError(f"checkpoint {path} is missing {role}/; pick an older one "
                            f"with --resume_from")
        try:
            load_policy(policy, role_dir)
        except READ_ERRORS as e:
            raise UserError(f"checkpoint {path}: cannot load {role}/ ({first_line(e)}); "
                            f"pick an older one with --resume_from") from e
        except MISMATCH_ERRORS as e:
            raise UserError(f"checkpoint {path}: {role}/ does not fit this model "
                            f"({first_line(e)}); resume with the model and LoRA flags it was "
                            f"trained with, or start afresh under another --wandb_run_name") from e
    try:
        return torch.load(os.path.join(path, STATE_FILE), weights_only=False, map_location="cpu")
    except STATE_READ_ERRORS as e:
        raise UserError(f"checkpoint {path}: {STATE_FILE} is unreadable "
                        f"({first_line(e)}); pick an older one with --resume_from") from e


def read_run_settings(step_dir: str) -> dict | None:
    """{"config": ..., "prompts": ...} saved in a checkpoint folder, or None when the folder is not
    a complete checkpoint (e.g. an adapter copied elsewhere). Errors name the file."""
    if not os.path.isfile(os.path.join(step_dir, DONE_FILE)):
        return None
    try:
        state = torch.load(os.path.join(step_dir, STATE_FILE), weights_only=False,
                           map_location="cpu")
    except STATE_READ_ERRORS as e:
        raise UserError(f"checkpoint {step_dir}: {STATE_FILE} is unreadable "
                        f"({first_line(e)})") from e
    return {"config": state.get("config", {}), "prompts": state.get("prompts")}


def set_aside_newer(run_dir: str, step: int) -> None:
    """Resuming from an older checkpoint: keep newer ones, but out of the way, under new names."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for newer_step, path in complete_checkpoints(run_dir):
        if newer_step > step:
            aside = f"{path}.superseded-{stamp}"
            log.warning("resuming from step %d: moving newer %s to %s", step, path, aside)
            os.rename(path, aside)


def truncate_log(log_path: str, step: int) -> None:
    """Keep only records up to `step`, so a resumed run neither repeats nor misses a step.
    A half-written last line (a kill mid-write) is dropped."""
    if not os.path.exists(log_path):
        return
    kept = []
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("dropping a partial line from %s", log_path)
                continue
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_text(log_path, "".join(kept))
