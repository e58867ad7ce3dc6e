"""A run's checkpoints: resume() restores the newest complete one (or --resume_from) into a
train.Run, save() writes one. The files themselves, their validation and rotation are
checkpoint.py's.
"""
from __future__ import annotations

import logging

import checkpoint as ckpt
import image_stream
import lr_schedule
from distributed import UserError
from runtime import seed_all, set_rng_state
from vlm import ROLES

log = logging.getLogger("ireasoner")


def resume(run) -> str | None:
    """Restore the newest complete checkpoint (or --resume_from). Returns its path."""
    cfg, dist, st = run.cfg, run.dist, run.st
    path = None
    if dist.is_main:  # rank 0 decides, so every rank resumes from the same checkpoint
        ckpt.remove_temporaries(run.dir)
        newest = ckpt.complete_checkpoints(run.dir)
        path = cfg.resume_from or (newest[-1][1] if newest else None)
    path = dist.broadcast(path)
    if path is None:
        if dist.is_main:  # killed before its first checkpoint: every logged step will be redone
            ckpt.truncate_log(run.log_path, 0)
            ckpt.truncate_log(run.val_log_path, 0)
        return None
    # Validated against this run's own state and optimizers before anything is applied.
    # Older checkpoints may lack image_cursor and val (resumed with their defaults).
    template = {k: v for k, v in vars(st).items() if k not in ("image_cursor", "val")}
    saved = ckpt.load_checkpoint(path, run.policies, run.optimizers, template=template)
    changed = ckpt.changed_flags(path, saved["config"], cfg.to_dict())
    if changed and dist.is_main:
        log.warning("resuming %s with changed flags (the new values apply): %s", path,
                    ", ".join(changed))
    if "prompts" not in saved:
        log.warning("%s holds no prompt texts (an older checkpoint): cannot check that the "
                    "prompts are unchanged", path)
    elif cfg.prompt_mismatch(saved["prompts"]):
        raise UserError(f"{path} was trained with {cfg.prompt_mismatch(saved['prompts'])}")
    for role in ROLES:
        run.optimizers[role].load_state_dict(saved["optimizers"][role])
        for group in run.optimizers[role].param_groups:  # the flags given now win over saved ones
            group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
    try:  # the rate at the restored step, on the schedule the flags give now
        lr_schedule.restore(run.schedulers, saved.get("schedulers"), saved["step"], cfg.lr)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: its learning-rate schedule state is unusable ({e}); resume "
                        f"from an older checkpoint with --resume_from") from e
    for key in template:
        setattr(st, key, saved["train_state"][key])
    st.image_cursor = image_stream.saved_cursor(saved)
    st.val = saved["train_state"].get("val") or {}
    if not isinstance(st.val, dict):
        raise UserError(f"checkpoint {path}: train_state.val is not an object; "
                        f"{ckpt.older_hint(path)}")
    rngs = saved["rng"]
    rng = rngs[dist.rank] if dist.rank < len(rngs) else rngs[0]
    note = set_rng_state(rng, run.cuda_devices)
    if note:  # resumed on another number of GPUs
        log.warning("rank %d, %s: %s", dist.rank, path, note)
    if dist.rank >= len(rngs):
        seed_all(cfg.seed + dist.rank + st.step)
    dist.barrier()
    if dist.is_main:
        if cfg.resume_from:
            ckpt.set_aside_newer(run.dir, st.step)
        ckpt.truncate_log(run.log_path, st.step)
        ckpt.truncate_log(run.val_log_path, st.step)  # the validation series goes on from here
        if "best_step" in st.val:
            ckpt.point_best(run.dir, st.val["best_step"])
    return path


def save(run, rng: dict) -> str | None:
    """Rank 0 writes; every rank learns whether it worked, so none hangs on a failed write."""
    cfg, dist, st = run.cfg, run.dist, run.st
    rngs = dist.gather(rng)
    path, error = None, None
    if dist.is_main:
        state = {"step": st.step, "train_state": vars(st).copy(), "rng": rngs,
                 "optimizers": {r: o.state_dict() for r, o in run.optimizers.items()},
                 "schedulers": lr_schedule.state(run.schedulers),
                 "config": cfg.to_dict(), "prompts": cfg.prompt_texts(), "world_size": dist.world}
        try:
            path = ckpt.save_checkpoint(run.dir, st.step, run.policies, state, cfg.max_checkpoints,
                                        protect=st.val.get("best_step"))
            if st.val.get("best_step") == st.step:
                ckpt.point_best(run.dir, st.step)
        except UserError as e:
            error = str(e)
    error = dist.broadcast(error)
    if error:
        raise UserError(error)
    return path
