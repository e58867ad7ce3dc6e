"""A checkpoint's trainer state as plain data, so loading one never runs code.

trainer_state.json holds numbers, strings and the config; every tensor (optimizer moments, RNG
states) lives in trainer_state.safetensors and the JSON names it as {"__tensor__": key}.
Neither reader can execute anything, unlike torch.load(weights_only=False) on a pickle, which
runs whatever the file says. read_state + validate check every key and type before use.

The old format (a pickled trainer_state.pt) is refused; convert one you trust with

    python run.py convert-checkpoint runs/<run>/step_00002 --trust-pickle
    python -m pytest tests/test_statefile.py -q
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from errors import first_line

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
OLD_STATE_FILE = "trainer_state.pt"
FORMAT = 1
TENSOR = "__tensor__"
TOP_LEVEL = {"format": int, "step": int, "world_size": int, "train_state": dict, "config": dict,
             "rng": list, "optimizers": dict}
PY_RNG_WORDS, NP_RNG_WORDS = 625, 624  # Mersenne Twister state sizes (random, numpy)


class StateProblem(Exception):
    """What is wrong with a state file; checkpoint.py adds the folder and what to do."""


class OldFormat(StateProblem):
    """A pickled trainer_state.pt: refused unless converted with --trust-pickle."""


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
    """The state with its tensors in place. Raises OldFormat or StateProblem, never unpickles."""
    json_path = os.path.join(folder, STATE_JSON)
    if not os.path.isfile(json_path):
        if os.path.exists(os.path.join(folder, OLD_STATE_FILE)):
            raise OldFormat(f"holds a pickled {OLD_STATE_FILE} (the old format), which could run "
                            f"code when loaded, so it is refused. If you trust its origin, "
                            f"convert it once: python run.py convert-checkpoint {folder} "
                            f"--trust-pickle")
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
    # JSON has no tuples; AdamW's betas was one
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v
               for k, v in g.items()} for g in groups]
    return {"state": restored, "param_groups": groups}


# ---------------------------------------------------------------- the old, pickled format
def convert_old(folder: str) -> dict:
    """Load a pickled trainer_state.pt ONCE (the caller has the user's explicit trust) and write
    the plain format beside it. Returns the state as read back from the new files."""
    old = torch.load(os.path.join(folder, OLD_STATE_FILE), weights_only=False, map_location="cpu")
    try:
        state = {k: old[k] for k in ("step", "train_state", "config", "world_size", "optimizers")}
        state["rng"] = [_plain_rng(r) for r in old["rng"]]
    except (KeyError, TypeError, ValueError) as e:
        raise StateProblem(f"{OLD_STATE_FILE} is not a trainer state ({first_line(e)})") from e
    tmp = os.path.join(folder, ".convert-tmp")
    os.makedirs(tmp, exist_ok=True)
    write_state(tmp, state)
    # tensors, then the JSON: a kill in between leaves no JSON, so still the old format
    for name in (STATE_TENSORS, STATE_JSON):
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    os.rmdir(tmp)
    return read_state(folder)


def _plain_rng(r: dict) -> dict:
    version, keys, gauss = r["python"]
    name, mt, pos, has_gauss, cached = r["numpy"]
    return {"python": [version, list(keys), gauss],
            "numpy": {"name": name, "keys": [int(k) for k in mt], "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": r["torch"], "cuda": r["cuda"]}
