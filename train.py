"""iReasoner training: a Proposer asks, a Solver answers N times, intrinsic rewards, REINFORCE + KL.

    python train.py --data_dir images/ --solver_model Qwen/Qwen2.5-VL-7B-Instruct \
        --proposer_model Qwen/Qwen2.5-VL-7B-Instruct --use_lora_solver --use_lora_proposer

Reads top to bottom: one step is rollout() -> rewards.compute_rewards() -> update.update_role() for
the Solver (and every proposer_update_freq steps for the Proposer) -> log -> checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm
from transformers import StoppingCriteria

import checkpoint as ckpt
import rewards as R
from config import Config, parse_config
from data_and_utils import (ImagePool, check_data_dir, extract_question, proposer_prompt,
                            solver_prompt)
from distributed import Dist
from distributed import TrainingError, UserError, report
from runtime import append_log, log_wandb, start_wandb, step_signals
from distributed import run_lock
from runtime import keep_freed_memory, rng_state, seed_all, set_rng_state
from sampling import decode_path
from update import Episode, update_role
from vlm import (ROLES, build_policies, core_model, generate, image_sizing, log_sampling,
                 make_prompts, role_sampling, step_embedder)

log = logging.getLogger("ireasoner")


# ---------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything besides weights and optimizers that a resume must restore."""
    step: int = 0
    baseline: dict = field(default_factory=lambda: {"solver": 0.0, "proposer": 0.0})
    kl_coef: dict = field(default_factory=dict)
    wandb_id: str = ""
    skipped_images: int = 0
    bad_images: dict = field(default_factory=dict)  # path -> reason: a resume skips, not re-counts
    nonfinite_skips: int = 0
    nonfinite_in_a_row: int = 0


class Stop(StoppingCriteria):
    """SIGTERM/SIGINT set a flag (a second one exits at once). Generation polls it, so a signal
    ends the current rollout early; the step is then abandoned before any update."""
    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:  # second signal: writes are atomic, so leaving now corrupts nothing
            os._exit(128 + signum)
        self.signum = signum
        log.warning("signal %d: stopping after a clean checkpoint (again to exit now)", signum)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), bool(self.signum), device=input_ids.device)


# ---------------------------------------------------------------- one step
def no_timer(phase: str):
    """The default phase timer of train_step: times nothing. scripts/bench.py passes one that records
    wall and CPU seconds per phase (prompts, <role>_generate, rewards, <role>_update)."""
    return nullcontext()


def rollout(cfg: Config, policies: dict, images: list, stop: Stop,
            timer=no_timer) -> dict[str, Episode]:
    """The Proposer writes one question per image, all in one batched call; the Solver samples
    N answers to each, all B*N in one batched call."""
    proposer, solver = policies["proposer"], policies["solver"]
    with timer("prompts"):
        p_prompt = make_prompts(proposer, images,
                                [proposer_prompt(cfg.proposer_prompt_text)] * len(images))
    with timer("proposer_generate"):
        p_roll = generate(proposer, p_prompt, 1, role_sampling(cfg, proposer), stop=stop)
    questions = [extract_question(text) for text in p_roll.texts]
    shared = p_prompt.image_features if proposer.model is solver.model else None
    with timer("prompts"):
        s_prompt = make_prompts(solver, images,
                                [solver_prompt(q, cfg.solver_prompt_text) for q in questions],
                                image_features=shared)
    with timer("solver_generate"):
        s_roll = generate(solver, s_prompt, cfg.num_solver_samples, role_sampling(cfg, solver),
                          stop=stop)
    return {"proposer": Episode(p_prompt, p_roll, []), "solver": Episode(s_prompt, s_roll, [])}


PER_IMAGE = ("answers", "answers_norm", "pre_answer_words", "steps_per_sample", "dominant_answer",
             "dominant_count", "answer_entropy", "reward_outcome", "reward_steps",
             "step_reward_weight", "reward_final", "proposer_reward")


def train_step(cfg: Config, policies: dict, optimizers: dict, pool: ImagePool, st: TrainState,
               step: int, dist: Dist, stop: Stop, timer=no_timer) -> list[dict] | None:
    """One global step on every rank: images_per_step images each. Returns every rank's records,
    one per image (on every rank), or None if a signal arrived before any update, in which case
    nothing has changed. `timer(phase)` is a context manager around each phase (see no_timer)."""
    t0, B, N = time.time(), cfg.images_per_step, cfg.num_solver_samples
    first = ((step - 1) * dist.world + dist.rank) * B  # ranks take consecutive blocks of B
    paths, images = zip(*[pool.get(first + b) for b in range(B)])
    eps = rollout(cfg, policies, list(images), stop, timer)
    if dist.any(bool(stop.signum)):
        return None
    solver, s_ep, p_ep = policies["solver"], eps["solver"], eps["proposer"]
    texts = s_ep.rollout.texts
    with timer("rewards"):  # per image, one embedder call for all majority groups
        rws = R.compute_rewards_batch(cfg, [texts[b * N:(b + 1) * N] for b in range(B)], step,
                                      step_embedder(solver, cfg))
    recs = [{"step": step, "rank": dist.rank, "image_index": b, "image_path": paths[b],
             "question": extract_question(p_ep.rollout.texts[b]),
             "proposer_output": p_ep.rollout.texts[b], "solver_outputs": texts[b * N:(b + 1) * N],
             **{k: rw[k] for k in PER_IMAGE},
             **sampling_signals(s_ep.rollout.rows(slice(b * N, (b + 1) * N)))}
            for b, rw in enumerate(rws)]
    s_ep.rewards = [r for rw in rws for r in rw["reward_final"]]
    p_ep.rewards = [rw["proposer_reward"] for rw in rws]
    shared = update_role(cfg, "solver", policies, optimizers, s_ep, st, dist, timer)
    shared["proposer_updated"] = (cfg.proposer_update_freq > 0
                                  and step % cfg.proposer_update_freq == 0)
    if shared["proposer_updated"]:
        shared.update(update_role(cfg, "proposer", policies, optimizers, p_ep, st, dist, timer))
    else:
        shared.update({"proposer_kl": None, "kl_coef_proposer_before": None,
                       "kl_coef_proposer_after": None, "proposer_loss": None})
    sync_bad_images(pool, st, dist)
    # Ranks must hold identical adapters; the checksum in every record lets anyone check.
    # float64 accumulation without float64 copies of the weights, and one device sync.
    checksum = torch.stack([p.detach().sum(dtype=torch.float64)
                            for p in solver.parameters()]).sum().item()
    seconds = round(time.time() - t0, 4)
    for b, (rec, rw) in enumerate(zip(recs, rws)):
        tokens = p_ep.rollout.mask[b].sum() + s_ep.rollout.mask[b * N:(b + 1) * N].sum()
        rec.update(shared)
        rec.update(step_info=rw["step_info"], skipped_images=st.skipped_images,
                   solver_param_checksum=checksum, nonfinite_skips=st.nonfinite_skips,
                   seconds=seconds, generated_tokens=int(tokens))
    return [rec for rank_recs in dist.gather(recs) for rec in rank_recs]


def sampling_signals(roll) -> dict:
    """Per image, what shows at once whether the Solver samples at all (TRL's GRPOTrainer logs
    the same): distinct completions among its N, their token lengths (eos included), how many
    hit the token limit without an eos, and the mean entropy of the tempered softmax at the
    sampled tokens. runtime.step_signals sums them up per step."""
    mask = roll.mask.bool()
    tokens = int(mask.sum())
    entropy = float(roll.entropy[mask].sum()) / max(tokens, 1) if roll.entropy is not None else None
    return {"distinct_completions": len(set(roll.texts)),
            "completion_lengths": roll.mask.sum(1).tolist(),
            "completions_clipped": int((~roll.ended).sum()) if roll.ended is not None else 0,
            "token_entropy": entropy}


def sync_bad_images(pool: ImagePool, st: TrainState, dist: Dist) -> None:
    """Unreadable images found by any rank join one checkpointed set that every rank skips, so
    skipped_images counts distinct files, and a resumed run neither retries nor re-counts them."""
    new = {path: why for path, why in pool.bad.items() if path not in st.bad_images}
    for found in dist.gather(new):
        st.bad_images.update(found)
        pool.bad.update(found)
    st.skipped_images = len(st.bad_images)


# ---------------------------------------------------------------- setup, resume, loop
def resolve_device_map(cfg: Config, dist: Dist) -> None:
    """Under a multi-process launcher each rank holds one full copy on its own device, so 'auto'
    (shard one copy over all GPUs) means 'local' there: a plain torchrun command just works."""
    if dist.world > 1 and cfg.device_map == "auto":
        if dist.is_main:
            log.info("--device_map auto with %d processes: one full model copy per rank on its "
                     "local device (as --device_map local)", dist.world)
        cfg.device_map = "local"
    if cfg.device_map == "local":
        cfg.device_map = str(dist.device)


def resume(cfg: Config, run_dir: str, policies: dict, optimizers: dict, st: TrainState,
           dist: Dist) -> str | None:
    """Restore the newest complete checkpoint (or --resume_from). Returns its path."""
    path = None
    if dist.is_main:  # rank 0 decides, so every rank resumes from the same checkpoint
        ckpt.remove_temporaries(run_dir)
        newest = ckpt.complete_checkpoints(run_dir)
        path = cfg.resume_from or (newest[-1][1] if newest else None)
    path = dist.broadcast(path)
    if path is None:
        if dist.is_main:  # killed before its first checkpoint: every logged step will be redone
            ckpt.truncate_log(os.path.join(run_dir, "iter_log.jsonl"), 0)
        return None
    # Validated against this run's own state and optimizers before anything is applied.
    saved = ckpt.load_checkpoint(path, policies, optimizers, template=vars(st))
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
        optimizers[role].load_state_dict(saved["optimizers"][role])
        for group in optimizers[role].param_groups:  # the flags given now win over saved ones
            group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
    for key in vars(st):
        setattr(st, key, saved["train_state"][key])
    rngs = saved["rng"]
    set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
    if dist.rank >= len(rngs):
        seed_all(cfg.seed + dist.rank + st.step)
    dist.barrier()
    if dist.is_main:
        if cfg.resume_from:
            ckpt.set_aside_newer(run_dir, st.step)
        ckpt.truncate_log(os.path.join(run_dir, "iter_log.jsonl"), st.step)
    return path


def save(cfg: Config, run_dir: str, policies: dict, optimizers: dict, st: TrainState,
         rng: dict, dist: Dist) -> str | None:
    """Rank 0 writes; every rank learns whether it worked, so none hangs on a failed write."""
    rngs = dist.gather(rng)
    path, error = None, None
    if dist.is_main:
        state = {"step": st.step, "train_state": vars(st).copy(), "rng": rngs,
                 "optimizers": {r: o.state_dict() for r, o in optimizers.items()},
                 "config": cfg.to_dict(), "prompts": cfg.prompt_texts(), "world_size": dist.world}
        try:
            path = ckpt.save_checkpoint(run_dir, st.step, policies, state, cfg.max_checkpoints)
        except UserError as e:
            error = str(e)
    error = dist.broadcast(error)
    if error:
        raise UserError(error)
    return path


def build_models(cfg: Config, pool: ImagePool) -> tuple[dict, dict]:
    """Both policies and one AdamW per role; sizes the pool's images as the processor expects.
    (scripts/bench.py builds its trainer through here too.)"""
    policies = build_policies(cfg)
    pool.min_pixels, pool.max_pixels, pool.factor = image_sizing(policies["solver"].processor,
                                                                 cfg.max_pixels)
    if cfg.gradient_checkpointing:
        for p in {id(p.model): p for p in policies.values()}.values():
            p.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizers = {r: torch.optim.AdamW(policies[r].parameters(), lr=cfg.lr,
                                       weight_decay=cfg.weight_decay) for r in ROLES}
    return policies, optimizers


def train(cfg: Config) -> int:
    """Train, then leave the process group on every exit path (see Dist.close for why)."""
    keep_freed_memory()
    dist = Dist()
    try:
        code = run_training(cfg, dist)
    except BaseException:
        # Every rank raises a failed checkpoint write or a non-finite stop together, after the
        # collective that agreed on it; but an unreadable data folder or a failed log write is
        # one rank's alone, and its peers may be in the next collective, where a barrier would
        # hang until the timeout. So no barrier here: only destroy, which cannot block.
        dist.close(wait=False)
        raise
    dist.close()  # finished, stopped by a signal, or nothing to do: every rank gets here
    return code


def run_training(cfg: Config, dist: Dist) -> int:
    resolve_device_map(cfg, dist)
    check_data_dir(cfg.data_dir)  # before a run folder is made for nothing
    run_name = dist.broadcast(cfg.wandb_run_name or time.strftime("run-%Y%m%d-%H%M%S"))
    run_dir = os.path.join(cfg.output_dir, run_name)
    with run_lock(run_dir, run_name, dist):  # makes run_dir; one trainer per run, until exit
        return run_locked(cfg, dist, run_name, run_dir)


def run_locked(cfg: Config, dist: Dist, run_name: str, run_dir: str) -> int:
    pool = ImagePool(cfg.data_dir, cfg.include_subfolders_list, cfg.seed, cfg.max_pixels)
    if len(set(dist.gather(pool.fingerprint()))) > 1:  # the seeded order needs one path list
        raise UserError(f"the ranks found different image lists in {cfg.data_dir} (files added "
                        f"or removed while scanning?); rerun once the folder is stable")
    seed_all(cfg.seed)  # identical LoRA init on every rank
    policies, optimizers = build_models(cfg, pool)
    if dist.is_main:  # which decode step sampling runs, and why: a slow path must not be silent
        for role, p in policies.items():
            log.info("%s decode path: %s (%s)", role,
                     *decode_path(core_model(p.model).language_model, p.model.get_output_embeddings(),
                                  cfg.lean_decode))
        log_sampling(cfg, policies)
    st = TrainState(kl_coef={r: cfg.kl_coef for r in ROLES})
    seed_all(cfg.seed + dist.rank)  # different samples on every rank
    resumed = resume(cfg, run_dir, policies, optimizers, st, dist)
    if dist.is_main:
        print(f"run {run_name}: " + (f"resuming from {resumed} at step {st.step + 1}"
                                     if resumed else "starting at step 1"), flush=True)
    if st.step >= cfg.total_steps:
        if dist.is_main:
            print(f"run {run_name} is already at step {st.step} of {cfg.total_steps}; nothing to do")
        return 0
    return loop(cfg, run_name, run_dir, policies, optimizers, pool, st, dist)


def loop(cfg, run_name, run_dir, policies, optimizers, pool, st, dist) -> int:
    stop, rng, saved_step = Stop(), rng_state(), st.step
    listed = set(pool.paths)  # a file since removed from the folder must not count as a pool file
    pool.bad.update({path: why for path, why in st.bad_images.items() if path in listed})
    wandb_run = start_wandb(cfg, run_name, run_dir, st) if dist.is_main else None
    log_path = os.path.join(run_dir, "iter_log.jsonl")
    bar = tqdm(total=cfg.total_steps, initial=st.step, disable=not dist.is_main, desc=run_name)
    try:
        for step in range(st.step + 1, cfg.total_steps + 1):
            records = train_step(cfg, policies, optimizers, pool, st, step, dist, stop)
            if records is None:
                break  # a signal arrived mid-rollout: step abandoned, state is still step - 1's
            st.step, rng = step, rng_state()
            if dist.is_main:
                append_log(log_path, records)
                log_wandb(wandb_run, records, cfg.wandb_log_images_every)
                r, s = records[0], step_signals(records)
                bar.update(1)
                bar.set_postfix(reward=f"{np.mean(r['reward_final']):.3f}",
                                maj=f"{r['dominant_count']}/{cfg.num_solver_samples}",
                                distinct=f"{s['distinct_completions']:.1f}",
                                zero_std=f"{s['frac_reward_zero_std']:.2f}",
                                len=f"{s['completion_length_mean']:.0f}/"
                                    f"{s['completion_length_max']}",
                                clipped=f"{s['clipped_ratio']:.2f}",
                                entropy=f"{s['token_entropy']:.2f}",
                                kl=f"{r['solver_kl']:.2e}", beta=f"{st.kl_coef['solver']:.2e}")
            if step % cfg.save_every == 0 or step == cfg.total_steps:
                save(cfg, run_dir, policies, optimizers, st, rng, dist)
                saved_step = step
            if (cfg.clear_cache_every and step % cfg.clear_cache_every == 0
                    and torch.cuda.is_available()):
                torch.cuda.empty_cache()
            if dist.any(bool(stop.signum)):
                break
    finally:  # closed on errors too, so `error: ...` gets its own line, not the bar's
        bar.close()
    if st.step != saved_step:
        save(cfg, run_dir, policies, optimizers, st, rng, dist)
    if wandb_run is not None:
        wandb_run.finish()
    if dist.is_main:
        print(f"checkpoints: {run_dir}/step_*/  log: {log_path}", flush=True)
    signum = max(dist.gather(stop.signum))  # the signal any rank received
    return 130 if signum == signal.SIGINT else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # errors.report: one `error:` line per run, however many ranks raise it
    try:
        cfg = parse_config(argv)
    except ValueError as e:
        report(e)
        return 2
    try:
        return train(cfg)
    except UserError as e:
        report(e)
        return 2
    except TrainingError as e:
        report(e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
