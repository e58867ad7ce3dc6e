"""Checkpoints: atomic writes, newest-complete resume, rotation, and iter_log repair.

A checkpoint is runs/<run>/step_NNNNN/ with solver/, proposer/, trainer_state.json,
trainer_state.safetensors and SAVE_OK. It is written to a temporary sibling folder and renamed,
so a folder with that name is either complete or absent; SAVE_OK is written last as a second
witness. The trainer state is plain data (statefile.py): loading a checkpoint never unpickles,
so a checkpoint from anywhere cannot run code. Old pickled trainer_state.pt files are refused
until converted on purpose: python run.py convert-checkpoint runs/<run>/step_NNNNN --trust-pickle

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

from safetensors import SafetensorError

import statefile
from atomic import atomic_dir, write_text
from errors import UserError, first_line
from statefile import STATE_JSON, OLD_STATE_FILE, OldFormat, StateProblem
from vlm import save_policy, load_policy

log = logging.getLogger("ireasoner")
STEP_DIR = re.compile(r"^step_(\d{5,})$")
TMP_MARK = ".tmp-"
DONE_FILE = "SAVE_OK"
# What the writers raise on a full disk or a denied write: torch.save (full models) reports it
# as a RuntimeError ("unexpected pos"), safetensors as SafetensorError, plain files as OSError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# What a truncated or garbled weights file raises on load.
READ_ERRORS = (OSError, EOFError, SafetensorError, pickle.UnpicklingError)  # a refused .bin
# For weights, these mean the tensors do not fit this model (a shape or key mismatch), which an
# older checkpoint of the same run would not fix.
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
            statefile.write_state(tmp, state)
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


def older_hint(path: str) -> str:
    """What to do about a bad checkpoint: an older one of the same run, only if one exists."""
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    step = int(m.group(1)) if m else None
    older = [p for s, p in complete_checkpoints(os.path.dirname(os.path.normpath(path)))
             if step is not None and s < step]
    if older:
        return f"pick an older one with --resume_from {older[-1]}"
    return "no older checkpoint exists; start afresh under another --wandb_run_name"


def load_checkpoint(path: str, policies: dict, optimizers: dict | None = None,
                    template: dict | None = None) -> dict:
    """Read and validate the trainer state (before any weights: a refused state changes
    nothing), then load both roles' weights. Returns the state with optimizer states in
    torch's form. Every problem is a UserError naming the folder."""
    if not os.path.isfile(os.path.join(path, DONE_FILE)):
        raise UserError(f"{path} is not a complete checkpoint (no {DONE_FILE})")
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    try:
        state = statefile.read_state(path)
        if m is None:
            raise StateProblem("its name is not step_NNNNN, so its step cannot be checked")
        state = statefile.validate(state, int(m.group(1)), optimizers, template)
    except OldFormat as e:
        raise UserError(f"checkpoint {path} {e}") from e
    except StateProblem as e:
        raise UserError(f"checkpoint {path}: {e}; {older_hint(path)}") from e
    for role, policy in policies.items():
        role_dir = os.path.join(path, role)
        if not os.path.isdir(role_dir):
            raise UserError(f"checkpoint {path} is missing {role}/; {older_hint(path)}")
        try:
            load_policy(policy, role_dir)
        except READ_ERRORS as e:
            raise UserError(f"checkpoint {path}: cannot load {role}/ ({first_line(e)}); "
                            f"{older_hint(path)}") from e
        except MISMATCH_ERRORS as e:
            raise UserError(f"checkpoint {path}: {role}/ does not fit this model "
                            f"({first_line(e)}); resume with the model and LoRA flags it was "
                            f"trained with, or start afresh under another --wandb_run_name") from e
    return state


def convert_checkpoints(path: str, trust_pickle: bool) -> list[str]:
    """`run.py convert-checkpoint`: rewrite old pickled trainer states (one step folder, or
    every step folder of a run) in the plain format. Returns the folders converted."""
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a folder")
    folders = [path] if STEP_DIR.match(os.path.basename(os.path.normpath(path))) else \
        [os.path.join(path, n) for n in sorted(os.listdir(path)) if STEP_DIR.match(n)]
    old = [f for f in folders if os.path.isfile(os.path.join(f, OLD_STATE_FILE))
           and not os.path.isfile(os.path.join(f, STATE_JSON))]
    if not old:
        raise UserError(f"{path} holds no old-format checkpoint (a step_NNNNN folder with "
                        f"{OLD_STATE_FILE} and no {STATE_JSON})")
    if not trust_pickle:
        raise UserError(f"converting loads {OLD_STATE_FILE} with pickle, which runs any code the "
                        f"file carries; only if you trust where {path} came from, rerun with "
                        f"--trust-pickle")
    for folder in old:
        try:
            state = statefile.convert_old(folder)
            statefile.validate(state, int(STEP_DIR.match(os.path.basename(
                os.path.normpath(folder))).group(1)))
        except StateProblem as e:
            raise UserError(f"checkpoint {folder}: {e}") from e
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
            raise UserError(f"checkpoint {folder}: converting {OLD_STATE_FILE} failed "
                            f"({first_line(e)})") from e
    return old


def read_run_settings(step_dir: str) -> dict | None:
    """{"config": ..., "prompts": ...} saved in a checkpoint folder, or None when the folder is not
    a complete checkpoint (e.g. an adapter copied elsewhere). Errors name the file."""
    if not os.path.isfile(os.path.join(step_dir, DONE_FILE)):
        return None
    try:
        state = statefile.read_state(step_dir)
    except StateProblem as e:
        raise UserError(f"checkpoint {step_dir}: {e}") from e
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


# Flags that decide what the saved weights are: resuming under other values is an error.
MODEL_FLAGS = ("solver_model", "proposer_model", "use_lora_solver", "use_lora_proposer",
               "lora_r", "lora_alpha", "lora_targets", "freeze_vision")
# Flags about where, how often or how fast, not what is learned: changing them is routine.
RUN_FLAGS = ("total_steps", "output_dir", "wandb_run_name", "wandb_project", "wandb_mode",
             "resume_from", "save_every", "max_checkpoints", "clear_cache_every", "device_map",
             "attn_implementation", "gradient_checkpointing", "update_micro_batch")


def changed_flags(path: str, saved: dict, now: dict) -> list[str]:
    """`--flag old -> new` for every training flag that differs from the checkpoint's config.
    A changed model or LoRA flag is a UserError: the saved weights belong to the old one."""
    missing = [key for key in MODEL_FLAGS if key not in saved]
    if missing:  # every checkpoint records them: without them the weights cannot be matched
        raise UserError(f"checkpoint {path}: config.{missing[0]} is missing from {STATE_JSON}; "
                        f"{older_hint(path)}")
    for key in MODEL_FLAGS:
        if saved[key] != now[key]:
            raise UserError(f"{path} was trained with --{key} {saved[key]}, not {now[key]}; "
                            f"use another --wandb_run_name to start afresh")
    return [f"--{key} {saved[key] if key in saved else '(not recorded)'} -> {value}"
            for key, value in now.items()
            if key not in MODEL_FLAGS + RUN_FLAGS and (key not in saved or saved[key] != value)]
