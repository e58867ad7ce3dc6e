"""Checkpoints: atomic writes, newest-complete resume, rotation, iter_log repair, and the
trainer state as plain data.

A checkpoint is runs/<run>/step_NNNNN/ with solver/, proposer/, trainer_state.json,
trainer_state.safetensors and SAVE_OK. It is written to a temporary sibling folder and renamed,
so a folder with that name is either complete or absent; SAVE_OK is written last as a second
witness. trainer_state.json holds numbers, strings and the config; every tensor (optimizer
moments, RNG states) lives in trainer_state.safetensors and the JSON names it as
{"__tensor__": key}. Neither reader can execute anything, unlike torch.load on a pickle, so a
checkpoint from anywhere cannot run code; read_state + validate check every key and type
before use.

    python -m pytest tests/test_train.py tests/test_statefile.py -q
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from distributed import UserError, first_line
from runtime import atomic_dir, write_text
from vlm import load_policy, save_policy

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


def save_checkpoint(run_dir: str, step: int, policies: dict, state: dict, keep: int,
                    protect: int | None = None) -> str:
    """Write step_NNNNN atomically, then drop the oldest complete ones beyond `keep`; the one at
    step `protect` (--keep_best's) is never dropped and does not count toward `keep`."""
    final = os.path.join(run_dir, f"step_{step:05d}")
    try:
        # replace: a finished step saved twice (a signal right after a save)
        with atomic_dir(final, f"{final}{TMP_MARK}{os.getpid()}", replace=True) as tmp:
            for role, policy in policies.items():
                save_policy(policy, os.path.join(tmp, role))
            write_state(tmp, state)
            with open(os.path.join(tmp, DONE_FILE), "w") as f:
                f.write(f"step {step}\n")
                f.flush()
                os.fsync(f.fileno())
    except WRITE_ERRORS as e:
        raise UserError(f"writing checkpoint {final} failed ({first_line(e)}); "
                        f"earlier checkpoints in {run_dir} are intact") from e
    for _, old in [c for c in complete_checkpoints(run_dir) if c[0] != protect][:-keep]:
        # Renamed first, so a kill mid-delete leaves a temporary (cleaned on resume), never a
        # half-deleted folder that still looks complete.
        doomed = f"{old}{TMP_MARK}{os.getpid()}"
        try:
            os.rename(old, doomed)
            shutil.rmtree(doomed)
        except OSError as e:  # the new checkpoint is safe; an old one left over is only space
            log.warning("could not remove old checkpoint %s: %s", old, first_line(e))
    return final


BEST_LINK = "best"


def point_best(run_dir: str, step: int) -> None:
    """<run>/best -> step_NNNNN (a relative symlink, replaced atomically)."""
    tmp = os.path.join(run_dir, f"{BEST_LINK}{TMP_MARK}{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(f"step_{step:05d}", tmp)
        os.replace(tmp, os.path.join(run_dir, BEST_LINK))
    except OSError as e:  # the checkpoint itself is safe; only the pointer is missing
        log.warning("could not point %s/%s at step_%05d: %s", run_dir, BEST_LINK, step,
                    first_line(e))


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
        state = read_state(path)
        if m is None:
            raise StateProblem("its name is not step_NNNNN, so its step cannot be checked")
        state = validate(state, int(m.group(1)), optimizers, template)
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



def read_run_settings(step_dir: str) -> dict | None:
    """{"config": ..., "prompts": ...} saved in a checkpoint folder, or None when the folder is not
    a complete checkpoint (e.g. an adapter copied elsewhere). Errors name the file."""
    if not os.path.isfile(os.path.join(step_dir, DONE_FILE)):
        return None
    try:
        state = read_state(step_dir)
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
             "attn_implementation", "gradient_checkpointing", "update_micro_batch",
             "deterministic",
             "val_data", "val_every", "val_samples", "val_max_rows", "keep_best",
             "collapse_patience", "collapse_one_answer_frac", "collapse_zero_std_frac",
             "collapse_min_entropy", "collapse_min_length", "collapse_val_metric",
             "collapse_val_margin", "collapse_val_patience", "stop_on_collapse")


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


# ---------------------------------------------------------------- the trainer state as plain data
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
OLD_STATE_FILE = "trainer_state.pt"
CONVERTER_COMMIT = "2403201"  # the last commit with `run.py convert-checkpoint`
FORMAT = 1
TENSOR = "__tensor__"
TOP_LEVEL = {"format": int, "step": int, "world_size": int, "train_state": dict, "config": dict,
             "rng": list, "optimizers": dict}
PY_RNG_WORDS, NP_RNG_WORDS = 625, 624  # Mersenne Twister state sizes (random, numpy)


class StateProblem(Exception):
    """What is wrong with a state file; load_checkpoint adds the folder and what to do."""


class OldFormat(StateProblem):
    """A pickled trainer_state.pt, a format this trainer no longer reads."""




# ---------------------------------------------------------------- writing
def write_state(folder: str, state: dict) -> None:
    """Tensors first, the JSON last: the JSON names the tensors, so it is the file whose
    presence says the state is whole. Raises what the writers raise (OSError, SafetensorError)."""
    tensors: dict[str, torch.Tensor] = {}
    plain = {"format": FORMAT, **_split(state, "", tensors)}
    save_file(tensors, os.path.join(folder, STATE_TENSORS))
    # allow_nan=False: a NaN here is a bug to see now, not a file strict readers reject later
    text = json.dumps(plain, allow_nan=False, indent=1)
    with open(os.path.join(folder, STATE_JSON), "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _split(obj, key: str, tensors: dict):
    """JSON-able copy of obj with each tensor moved into `tensors` under its path."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {TENSOR: key}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{key}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state {key}: {type(obj).__name__} is not plain data")  # a bug


# ---------------------------------------------------------------- reading
def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_state(folder: str) -> dict:
    """The state with its tensors in place. Raises StateProblem (OldFormat for a pickle), never unpickles."""
    json_path = os.path.join(folder, STATE_JSON)
    if not os.path.isfile(json_path):
        if os.path.exists(os.path.join(folder, OLD_STATE_FILE)):
            raise OldFormat(f"holds a pickled {OLD_STATE_FILE}, an old format this trainer no "
                            f"longer reads (loading it could run code). If you trust its origin, "
                            f"convert it with the trainer at commit {CONVERTER_COMMIT}: python "
                            f"run.py convert-checkpoint {folder} --trust-pickle")
        raise StateProblem(f"has no {STATE_JSON}")
    try:
        with open(json_path, encoding="utf-8") as f:
            plain = json.loads(f.read(), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StateProblem(f"{STATE_JSON} is unreadable ({first_line(e)})") from e
    if not isinstance(plain, dict):
        raise StateProblem(f"{STATE_JSON} holds a {type(plain).__name__}, not an object")
    try:
        with safe_open(os.path.join(folder, STATE_TENSORS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise StateProblem(f"{STATE_TENSORS} is unreadable ({first_line(e)})") from e
    return _join(plain, tensors)


def _join(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {TENSOR}:
            if obj[TENSOR] not in tensors:
                raise StateProblem(f"{STATE_JSON} names tensor {obj[TENSOR]!r}, which "
                                   f"{STATE_TENSORS} lacks")
            return tensors[obj[TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------- validation
def _need(ok: bool, problem: str) -> None:
    if not ok:
        raise StateProblem(problem)


def _is(value, kind: type) -> bool:
    """Exact JSON types: a bool is not an int here; an int is a fine float."""
    return type(value) in (int, float) if kind is float else type(value) is kind


def _typed(mapping: dict, key: str, kind: type, where: str):
    _need(key in mapping, f"{where}{key} is missing")
    value = mapping[key]
    _need(_is(value, kind), f"{where}{key} is a {type(value).__name__}, expected {kind.__name__}")
    return value


def validate(state: dict, folder_step: int, optimizers: dict | None = None,
             template: dict | None = None) -> dict:
    """Check keys, types, the step and (given the optimizers) that each optimizer's state fits
    its parameters. Returns the state with optimizer states in torch's own form."""
    for key, kind in TOP_LEVEL.items():
        _typed(state, key, kind, "")
    _need(state["format"] == FORMAT, f"format {state['format']} is not {FORMAT}")
    _need(state["step"] == folder_step,
          f"step {state['step']} does not match the folder name (step {folder_step})")
    ts = state["train_state"]
    _need(_typed(ts, "step", int, "train_state.") == folder_step,
          f"train_state.step {ts['step']} does not match the folder name (step {folder_step})")
    for key, default in (template or {}).items():
        value = _typed(ts, key, type(default), "train_state.")
        if isinstance(default, dict):
            for k, v in default.items():
                _typed(value, k, type(v), f"train_state.{key}.")
    _need(len(state["rng"]) >= 1, "rng is empty")
    for rank, rng in enumerate(state["rng"]):
        _check_rng(rng, f"rng[{rank}].")
    out = dict(state)
    if optimizers is not None:
        out["optimizers"] = {role: _optimizer_state(state["optimizers"], role, opt)
                             for role, opt in optimizers.items()}
    return out


def _check_rng(rng, where: str) -> None:
    _need(isinstance(rng, dict), f"{where[:-1]} is not an object")
    py = _typed(rng, "python", list, where)
    _need(len(py) == 3 and _is(py[0], int) and isinstance(py[1], list)
          and len(py[1]) == PY_RNG_WORDS and all(_is(w, int) for w in py[1])
          and (py[2] is None or _is(py[2], float)), f"{where}python is not a random state")
    np_state = _typed(rng, "numpy", dict, where)
    keys = _typed(np_state, "keys", list, f"{where}numpy.")
    _need(len(keys) == NP_RNG_WORDS and all(_is(w, int) and 0 <= w < 2**32 for w in keys),
          f"{where}numpy.keys is not a Mersenne Twister state")
    _typed(np_state, "name", str, f"{where}numpy.")
    for key in ("pos", "has_gauss"):
        _typed(np_state, key, int, f"{where}numpy.")
    _typed(np_state, "cached_gaussian", float, f"{where}numpy.")
    cpu = _typed(rng, "torch", torch.Tensor, where)
    _need(cpu.dtype == torch.uint8 and cpu.shape == torch.get_rng_state().shape,
          f"{where}torch is not a torch generator state")
    _need("cuda" in rng, f"{where}cuda is missing")
    cuda = rng["cuda"]
    _need(cuda is None or (isinstance(cuda, list) and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)),
        f"{where}cuda is not a list of CUDA generator states")
    if "cuda_devices" in rng:  # absent in older states, whose list holds every visible device's
        devices = _typed(rng, "cuda_devices", list, where)
        _need(all(_is(d, int) and d >= 0 for d in devices) and len(devices) == len(cuda or []),
              f"{where}cuda_devices does not name one device index per CUDA state")


def _optimizer_state(saved_all: dict, role: str, optimizer) -> dict:
    """Torch's state_dict form of one saved optimizer, after checking it fits `optimizer`."""
    where = f"optimizers.{role}."
    saved = _typed(saved_all, role, dict, "optimizers.")
    groups = _typed(saved, "param_groups", list, where)
    state = _typed(saved, "state", dict, where)
    _need(len(groups) == len(optimizer.param_groups),
          f"{where}param_groups has {len(groups)} groups, the optimizer {len(optimizer.param_groups)}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, (group, live) in enumerate(zip(groups, optimizer.param_groups)):
        _need(isinstance(group, dict), f"{where}param_groups[{i}] is not an object")
        ids = _typed(group, "params", list, f"{where}param_groups[{i}].")
        _need(len(ids) == len(live["params"]),
              f"{where}param_groups[{i}] has {len(ids)} parameters, the model {len(live['params'])}")
    restored = {}
    for key, entry in state.items():
        _need(key.isdigit() and int(key) < len(params), f"{where}state has unknown parameter {key}")
        _need(isinstance(entry, dict) and all(isinstance(t, torch.Tensor) for t in entry.values()),
              f"{where}state.{key} is not a set of tensors")
        shape = tuple(params[int(key)].shape)
        for name, t in entry.items():
            _need(t.dim() == 0 or tuple(t.shape) == shape,
                  f"{where}state.{key}.{name} has shape {tuple(t.shape)}, its parameter {shape}")
        restored[int(key)] = entry
    # JSON has no tuples; AdamW's betas is one
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v
               for k, v in g.items()} for g in groups]
    return {"state": restored, "param_groups": groups}



