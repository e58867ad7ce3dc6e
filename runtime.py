"""What every entry point (train.py, run.py, tools/, scripts/) stands on: loading a base model
with one clear line for each way that fails, seeding and the RNG state a checkpoint saves per
rank, atomic writes, and the per-step log (iter_log.jsonl and W&B).

- load_backbone: the hub client and transformers report a missing folder, an unreachable hub, a
  text-only model, a damaged weights file or a missing tokenizer as 20-line tracebacks (or, for
  a missing tokenizer, not at all: transformers 5 builds an empty one). It checks each in turn,
  cheapest first, and raises UserError("cannot load model NAME: CAUSE").
- atomic_dir / write_text: write to a temporary, then rename, so a file or folder under its
  final name is either complete or absent.
- the log schema (IMAGE_KEYS ... STEP_KEYS): the one list of a record's keys, from which
  log_record and role_fields build every record of iter_log.jsonl.

    python -m pytest tests/test_train.py tests/test_reliability.py -q
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import pickle
import random
import shutil
import uuid
from contextlib import contextmanager

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from distributed import UserError, first_line

log = logging.getLogger("ireasoner")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(cuda_devices: list[int] | None = None) -> dict:
    """Every generator a step draws from: saved so a resumed run samples what an unbroken one
    would. Plain data only (lists, numbers, tensors), so a checkpoint stores it as JSON plus
    safetensors and loading it never unpickles anything (checkpoint.py). CUDA: the generators of
    `cuda_devices` only, the devices this process computes on (devices.cuda_devices: its own
    under torchrun, every one a --device_map auto model spans; default the current device),
    named in "cuda_devices". Never every visible device's: that would make a CUDA context on
    each GPU from every rank."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    devices = _cuda_devices(cuda_devices)
    return {"python": [version, list(keys), gauss],
            "numpy": {"name": name, "keys": mt.tolist(), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(d) for d in devices] if devices else None,
            "cuda_devices": devices}


def _cuda_devices(given: list[int] | None) -> list[int]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.current_device()] if given is None else list(given)


def set_rng_state(s: dict, cuda_devices: list[int] | None = None) -> str | None:
    """Inverse of rng_state, for a process computing on `cuda_devices` (default the current
    device): the saved CUDA states go to them in order (a rank's one state to the rank's device,
    whatever its index now). A state written before "cuda_devices" existed holds every visible
    device's, by index. Devices without a saved state keep theirs (seeded). Returns a note when
    states and devices do not match one to one (another number of GPUs), else None. Raises
    ValueError/TypeError/KeyError on a malformed state."""
    version, keys, gauss = s["python"]
    random.setstate((version, tuple(keys), gauss))
    n = s["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(s["torch"])
    saved = s["cuda"] or []
    devices = _cuda_devices(cuda_devices)
    if "cuda_devices" in s:
        pairs = list(zip(devices, saved))
    else:  # torch.cuda.get_rng_state_all(): list index = device index
        pairs = [(d, saved[d]) for d in devices if d < len(saved)]
    for device, state in pairs:
        torch.cuda.set_rng_state(state, device)
    unmatched = len(pairs) != len(devices) or ("cuda_devices" in s and len(saved) != len(devices))
    if saved and unmatched:
        return (f"{len(saved)} saved CUDA RNG states for {len(devices)} GPUs now: {len(pairs)} "
                f"restored, the others seeded; sampling goes on, not as an unbroken run would")
    return None


def keep_freed_memory() -> None:
    """Every step allocates and frees the same large CPU tensors. glibc returns blocks over
    128 KiB to the kernel on free, so the next step page-faults them back in: ~40k faults and
    0.1-0.5 s of system time per tiny-model CPU step, measured on a 2-core CPU (scripts/bench.py). Keep
    freed memory for reuse instead; the process then stays at its peak RSS. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        log.debug("no glibc: malloc left as is")
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, from <malloc.h>
    for param in (m_mmap_threshold, m_trim_threshold):
        if not libc.mallopt(param, 1 << 30):
            log.debug("glibc refused mallopt(%d)", param)


# ---------------------------------------------------------------- atomic files and folders
@contextmanager
def atomic_dir(final: str, tmp: str, replace: bool = False):
    """Yield the temporary folder `tmp` (emptied first); on success rename it to `final`.
    An existing `final` is removed first when `replace` (it must otherwise be absent or empty).
    On an error the temporary is removed and the error propagates."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        umask_permissions(tmp)
        if os.path.isdir(final):
            if replace:
                shutil.rmtree(final)
            else:
                os.rmdir(final)  # empty by contract: fails loudly otherwise
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask_permissions(folder: str) -> None:
    """Give the folder and everything in it the permissions the umask allows (what `open` and
    `mkdir` would give): safetensors writes weight files 0600 whatever the umask, so teammates
    on a shared cluster could not read a checkpoint or an export."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):  # a link's target is not ours
                os.chmod(os.path.join(root, name), 0o666 & ~umask)


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    """Replace the file at `path` with `text` in one rename."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding=encoding) as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- loading a base model
def _looks_local(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else can only be a folder."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith("/")
            or name.count("/") > 1)


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _hub_cause(e: OSError) -> str:
    """transformers wraps the hub client's errors in OSErrors of varying text; the original is
    in the exception chain."""
    from huggingface_hub.errors import RepositoryNotFoundError
    if any(isinstance(x, RepositoryNotFoundError) for x in _chain(e)):
        return "not a local folder and not a model on the Hugging Face Hub (a typo?)"
    text = str(e)
    if "couldn't connect" in text or "offline" in text.lower():
        return ("not a local folder, not in the Hugging Face cache, and the Hub cannot be "
                "reached (offline?); download it first, or pass a local folder")
    if "not a valid model identifier" in text or "Repository Not Found" in text:
        return "not a local folder and not a model on the Hugging Face Hub (a typo?)"
    return first_line(e)


def load_config(name: str):
    """The model's config, or UserError saying why there is none."""
    if not os.path.isdir(name) and _looks_local(name):
        what = "is a file, not a folder" if os.path.exists(name) else "does not exist"
        raise UserError(f"cannot load model {name}: the local folder {what}")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(f"cannot load model {name}: the folder has no config.json")
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as e:
        raise UserError(f"cannot load model {name}: {_hub_cause(e)}") from e
    except (ValueError, KeyError) as e:  # an unknown or missing model_type
        raise UserError(f"cannot load model {name}: config.json is not a model this "
                        f"transformers knows ({first_line(e)})") from e


def load_processor(name: str):
    """The processor, checked to have a real tokenizer and an image processor."""
    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        cause = ("its image processor config is missing (processor_config.json or "
                 "preprocessor_config.json)" if "image processor" in str(e) else
                 f"its processor or tokenizer cannot be loaded ({first_line(e)})")
        raise UserError(f"cannot load model {name}: {cause}") from e
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(processor, "image_processor", None) is None or tokenizer is None:
        raise UserError(f"cannot load model {name}: it has no image processor and tokenizer "
                        f"(processor_config.json / preprocessor_config.json, tokenizer files)")
    image_token = getattr(processor, "image_token", None)
    # Without tokenizer files transformers 5 quietly builds an empty tokenizer (1 token).
    if len(tokenizer) <= 1 or (image_token is not None and
                               tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id)):
        raise UserError(f"cannot load model {name}: its tokenizer files are missing or do not "
                        f"know the image token (tokenizer.json / tokenizer_config.json)")
    return processor


def load_backbone(name: str, dtype: torch.dtype, device_map: str, attn_implementation: str):
    """(model, processor), frozen. Every failure is one UserError naming the model and cause."""
    config = load_config(name)
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise UserError(f"cannot load model {name}: it is not an image-text model (model_type "
                        f"{config.model_type!r}); pass a vision-language model such as "
                        f"Qwen/Qwen2.5-VL-7B-Instruct")
    processor = load_processor(name)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation)
    except SafetensorError as e:
        raise UserError(f"cannot load model {name}: a weights file is damaged or truncated "
                        f"({first_line(e)})") from e
    except (OSError, EOFError, RuntimeError, ValueError, ImportError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot load model {name}: its weights cannot be loaded "
                        f"({first_line(e)})") from e
    model.requires_grad_(False)
    return model, processor


# ---------------------------------------------------------------- the per-step log
# The keys of a log record (one per image per step), in log order, grouped by where their values
# are made. A record holds exactly these keys: adding one is a line here plus its value where
# its group is made (a key without a value raises KeyError).
IMAGE_KEYS = ("step", "rank", "image_index", "image_path", "question", "proposer_output",
              "solver_outputs")                                   # train.train_step
REWARD_KEYS = ("answers", "answers_norm", "pre_answer_words", "steps_per_sample",
               "dominant_answer", "dominant_count", "answer_entropy", "reward_outcome",
               "reward_steps", "step_reward_weight", "reward_final", "proposer_reward",
               "step_info")                                       # rewards.compute_rewards
ROLE_KEYS = {"baseline_before": "{role}_baseline_before", "kl": "{role}_kl",
             "kl_coef_before": "kl_coef_{role}_before", "kl_coef_after": "kl_coef_{role}_after",
             "loss": "{role}_loss",
             # mean |sampler's log-prob - the update's| per completion token (vllm_engine.py)
             "logprob_diff": "{role}_logprob_diff",
             # the rate this update used (--lr_scheduler); groups --skip_zero_std left out (null
             # when off); share of completion tokens whose ratio the clip bound (--clip_eps)
             "lr": "{role}_lr", "groups_skipped": "{role}_groups_skipped",
             "clip_frac": "{role}_clip_frac"}                      # update.update_role
PER_SAMPLE_KEYS = {"baseline_per_sample": "{role}_baseline_per_sample",
                   "kl_coef_per_sample": "kl_coef_{role}_per_sample",
                   "kl_per_sample": "{role}_kl_per_sample"}       # ... with --update_mode per_sample
SIGNAL_KEYS = ("distinct_completions", "completion_lengths", "completions_clipped",
               "token_entropy")                                   # train.sampling_signals
STEP_KEYS = ("proposer_updated", "skipped_images", "solver_param_checksum", "nonfinite_skips",
             "seconds", "generated_tokens")                       # train.train_step


ROLES_LOGGED = ("solver", "proposer")


def role_fields(role: str, values: dict | None, per_sample: bool) -> dict:
    """A role's update keys (ROLE_KEYS, and PER_SAMPLE_KEYS when `per_sample`) named for `role`,
    from `values` by short name; None: the role was not updated this step, its keys are null."""
    names = {**ROLE_KEYS, **(PER_SAMPLE_KEYS if per_sample else {})}
    values = dict.fromkeys(names) if values is None else values
    return {template.format(role=role): values[name] for name, template in names.items()}


def log_record(image: dict, rewards: dict, signals: dict, roles: dict, step: dict) -> dict:
    """One log record from its groups: `image` (IMAGE_KEYS), the image's compute_rewards result
    (REWARD_KEYS), its sampling signals (SIGNAL_KEYS), both roles' role_fields, and `step`
    (STEP_KEYS)."""
    pick = lambda values, keys: {k: values[k] for k in keys}  # noqa: E731
    return {**pick(image, IMAGE_KEYS), **pick(rewards, REWARD_KEYS),
            **pick(signals, SIGNAL_KEYS), **roles, **pick(step, STEP_KEYS)}


def start_wandb(cfg, run_name: str, run_dir: str, st):
    """A W&B run (None when disabled); its id lives in the trainer state, so a resume continues it."""
    if cfg.wandb_mode == "disabled":
        return None
    import wandb
    st.wandb_id = st.wandb_id or uuid.uuid4().hex[:12]  # stored in checkpoints: resumes the run
    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, name=run_name,
                      id=st.wandb_id, resume="allow", mode=cfg.wandb_mode, dir=run_dir,
                      config=cfg.to_dict())


def step_signals(records: list[dict]) -> dict:
    """One step's sampling signals over all its images (every rank's records): the mean number
    of distinct Solver completions, the share of images whose N rewards are all equal (TRL's
    frac_reward_zero_std: a zero advantage under a group baseline), completion length mean and
    max in tokens, the share of completions clipped at the token limit, and the mean entropy of
    the tempered softmax at the sampled tokens (token-weighted)."""
    lengths = [n for r in records for n in r["completion_lengths"]]
    tokens = [sum(r["completion_lengths"]) for r in records]
    entropy = [(r["token_entropy"] or 0.0) * t for r, t in zip(records, tokens)]
    return {"distinct_completions": float(np.mean([r["distinct_completions"] for r in records])),
            "frac_reward_zero_std": float(np.mean([float(np.isclose(np.std(r["reward_final"]), 0))
                                                   for r in records])),
            "completion_length_mean": float(np.mean(lengths)),
            "completion_length_max": int(max(lengths)),
            "clipped_ratio": sum(r["completions_clipped"] for r in records) / len(lengths),
            "token_entropy": sum(entropy) / max(sum(tokens), 1)}


def log_wandb(run, records: list[dict], images_every: int = 0) -> None:
    """One W&B point per step; every `images_every` steps (0 = never) also a table of each
    image with its question and answers (the published --wandb_log_images_every)."""
    if run is None:
        return
    import wandb
    r = records[0]
    s = step_signals(records)
    mean = lambda key: float(np.mean([x for rec in records for x in rec[key]]))
    data = {"train/reward_final": mean("reward_final"), "train/reward_outcome": mean("reward_outcome"),
            "train/answer_entropy": float(np.mean([x["answer_entropy"] for x in records])),
            "train/step_reward_weight": r["step_reward_weight"], "train/seconds": r["seconds"],
            "train/skipped_images": r["skipped_images"],
            "solver/kl": r["solver_kl"], "solver/kl_coef": r["kl_coef_solver_after"],
            "solver/loss": r["solver_loss"], "solver/baseline": r["solver_baseline_before"],
            "proposer/reward": float(np.mean([x["proposer_reward"] for x in records])),
            **{f"reasoning_step_agreement/{k}": v for k, v in r["step_info"].items()}}
    data.update({"train/frac_reward_zero_std": s["frac_reward_zero_std"],
                 "train/distinct_completions": s["distinct_completions"],
                 "completions/mean_length": s["completion_length_mean"],
                 "completions/max_length": s["completion_length_max"],
                 "completions/clipped_ratio": s["clipped_ratio"],
                 "solver/entropy": s["token_entropy"]})
    if r["proposer_updated"]:
        data.update({"proposer/kl": r["proposer_kl"], "proposer/kl_coef": r["kl_coef_proposer_after"],
                     "proposer/loss": r["proposer_loss"]})
    # the objective knobs' (update.update_role): null when off, or the role was not updated
    data.update({f"{role}/{key}": r.get(f"{role}_{key}") for role in ROLES_LOGGED
                 for key in ("lr", "groups_skipped", "clip_frac")})
    data = {k: v for k, v in data.items() if v is not None}  # e.g. a step --skip_zero_std skipped
    for role in ROLES_LOGGED:  # the sampler's log-probs against the update's
        if r[f"{role}_logprob_diff"] is not None:
            data[f"{role}/logprob_diff"] = r[f"{role}_logprob_diff"]
    table = wandb.Table(columns=["question", "answers", "dominant"],
                        data=[[x["question"], " | ".join(x["answers"]), x["dominant_answer"]]
                              for x in records])
    data["samples"] = table
    if images_every and r["step"] % images_every == 0:
        data["images"] = wandb.Table(
            columns=["image", "question", "answers"],
            data=[[wandb.Image(x["image_path"], caption=f"step {x['step']}"), x["question"],
                   " | ".join(x["answers"])] for x in records])
    run.log(data, step=r["step"])


def finite(record: dict) -> dict:
    """A copy that strict JSON can hold: each NaN/Infinity becomes null, and the record's
    "nonfinite" field maps that field's path to the value it had ("NaN", "Infinity",
    "-Infinity"), so a skipped update stays visible. Python's json would write bare NaN,
    which jq and every strict parser reject."""
    found: dict[str, str] = {}

    def clean(value, path: str):
        if isinstance(value, float) and not math.isfinite(value):
            found[path] = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if found:
        out["nonfinite"] = found
    return out


def json_line(record: dict) -> str:
    """One strict JSON line (allow_nan=False: a non-finite number that slipped past finite()
    is a bug, raised here rather than written)."""
    return json.dumps(finite(record), ensure_ascii=False, allow_nan=False) + "\n"


def append_log(log_path: str, records: list[dict]) -> None:
    """One strict JSON line per record. A file name that is not UTF-8 reaches us with lone
    surrogates; backslashreplace writes them as \\u escapes, so the line stays valid JSON."""
    text = "".join(json_line(r) for r in records)
    try:
        with open(log_path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"writing {log_path} failed ({first_line(e)}); the last checkpoint "
                        f"is intact: free space, then rerun the same command to resume") from e
