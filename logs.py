"""The per-step log: iter_log.jsonl lines and, when enabled, the same scalars in W&B.

    python -m pytest tests/test_train.py -q
"""
from __future__ import annotations

import json
import math
import uuid

import numpy as np

from errors import UserError, first_line


def start_wandb(cfg, run_name: str, run_dir: str, st):
    """A W&B run (None when disabled); its id lives in the trainer state, so a resume continues it."""
    if cfg.wandb_mode == "disabled":
        return None
    import wandb
    st.wandb_id = st.wandb_id or uuid.uuid4().hex[:12]  # stored in checkpoints: resumes the run
    return wandb.init(project=cfg.wandb_project, name=run_name, id=st.wandb_id, resume="allow",
                      mode=cfg.wandb_mode, dir=run_dir, config=cfg.to_dict())


def log_wandb(run, records: list[dict]) -> None:
    if run is None:
        return
    import wandb
    r = records[0]
    mean = lambda key: float(np.mean([x for rec in records for x in rec[key]]))
    data = {"train/reward_final": mean("reward_final"), "train/reward_outcome": mean("reward_outcome"),
            "train/answer_entropy": float(np.mean([x["answer_entropy"] for x in records])),
            "train/step_reward_weight": r["step_reward_weight"], "train/seconds": r["seconds"],
            "train/skipped_images": r["skipped_images"],
            "solver/kl": r["solver_kl"], "solver/kl_coef": r["kl_coef_solver_after"],
            "solver/loss": r["solver_loss"], "solver/baseline": r["solver_baseline_before"],
            "proposer/reward": float(np.mean([x["proposer_reward"] for x in records])),
            **{f"reasoning_step_agreement/{k}": v for k, v in r["step_info"].items()}}
    if r["proposer_updated"]:
        data.update({"proposer/kl": r["proposer_kl"], "proposer/kl_coef": r["kl_coef_proposer_after"],
                     "proposer/loss": r["proposer_loss"]})
    table = wandb.Table(columns=["question", "answers", "dominant"],
                        data=[[x["question"], " | ".join(x["answers"]), x["dominant_answer"]]
                              for x in records])
    run.log({**data, "samples": table}, step=r["step"])


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
