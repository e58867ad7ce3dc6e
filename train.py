"""iReasoner training: a Proposer asks, a Solver answers N times, intrinsic rewards, REINFORCE + KL.

    python train.py --data_dir images/ --solver_model Qwen/Qwen2.5-VL-7B-Instruct \
        --proposer_model Qwen/Qwen2.5-VL-7B-Instruct --use_lora_solver --use_lora_proposer

train() opens the Run (start_run: lock, models, run_checkpoint.resume) and calls loop(), whose every step is
train_step(): rollout() -> rewards.compute_rewards() -> update.update_role() for the Solver (and
every proposer_update_freq steps for the Proposer) -> log -> checkpoint. The file goes from the
state, through one step, setup and the loop, to train() and main().
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm
from transformers import StoppingCriteria

import devices
import image_stream
import lr_schedule
import memfit
import rewards as R
import run_checkpoint
import startup
import validate as V
from config import Config, parse_config
from data_and_utils import (ImagePool, check_data_dir, extract_question, proposer_prompt,
                            solver_prompt)
from determinism import use_deterministic_algorithms
from distributed import Dist, TrainingError, UserError, report, run_lock
from runtime import (append_log, keep_freed_memory, load_config, log_record, rng_state,
                     role_fields, seed_all, step_signals)
from sampling import decode_path
from update import Episode, update_role
import vllm_engine
import wandb_guard
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
    image_cursor: int = 0  # the next unused position of the image stream (image_stream.py)
    nonfinite_skips: int = 0
    nonfinite_in_a_row: int = 0
    val: dict = field(default_factory=dict)  # --keep_best's best and the alarms' counters


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


@dataclass
class Run:
    """One training run: what every part of the loop reads or changes (start_run makes it)."""
    cfg: Config
    dist: Dist
    name: str
    dir: str                      # <output_dir>/<name>: checkpoints and the log
    pool: ImagePool
    policies: dict                # role -> vlm.Policy
    optimizers: dict              # role -> AdamW
    st: TrainState
    stop: Stop | None = None      # set by loop(): signals are caught from its start
    engine: object | None = None  # --rollout_engine vllm: the rank's vllm_engine.VLLMEngine
    cuda_devices: list = field(default_factory=list)  # this process's GPUs (devices.cuda_devices)
    val_rows: list | None = None  # --val_data's rows
    val_text: str = ""            # the newest validation, for the progress bar
    schedulers: dict = field(default_factory=dict)  # role -> its optimizer's LR scheduler

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "iter_log.jsonl")

    @property
    def val_log_path(self) -> str:
        return os.path.join(self.dir, V.VAL_LOG)


# ---------------------------------------------------------------- one step
def no_timer(phase: str):
    """The default phase timer of train_step: times nothing. scripts/bench.py passes one that records
    wall and CPU seconds per phase (prompts, <role>_generate, rewards, <role>_update)."""
    return nullcontext()


def rollout(cfg: Config, policies: dict, images: list, stop: Stop, timer=no_timer,
            engine=None, key: tuple = (0, 0)) -> dict[str, Episode]:
    """The Proposer writes one question per image, all in one batched call; the Solver samples
    N answers to each, all B*N in one batched call. Sampled by our own loop, or by `engine`
    (vllm_engine.py) with request seeds from `key` = (step, rank)."""
    proposer, solver = policies["proposer"], policies["solver"]

    def sample(policy, prompt, texts, n):
        if engine is None:
            return generate(policy, prompt, n, role_sampling(cfg, policy), stop=stop)
        seeds = [vllm_engine.request_seed(cfg.seed, *key, b, policy.role)
                 for b in range(len(images))]
        return engine.generate(policy, prompt, texts, images, n, role_sampling(cfg, policy),
                               stop=stop, seeds=seeds)

    p_texts = [proposer_prompt(cfg.proposer_prompt_text)] * len(images)
    with timer("prompts"):
        p_prompt = make_prompts(proposer, images, p_texts)
    with timer("proposer_generate"):
        p_roll = sample(proposer, p_prompt, p_texts, 1)
    questions = [extract_question(text) for text in p_roll.texts]
    shared = p_prompt.image_features if proposer.model is solver.model else None
    s_texts = [solver_prompt(q, cfg.solver_prompt_text) for q in questions]
    with timer("prompts"):
        s_prompt = make_prompts(solver, images, s_texts, image_features=shared)
    with timer("solver_generate"):
        s_roll = sample(solver, s_prompt, s_texts, cfg.num_solver_samples)
    return {"proposer": Episode(p_prompt, p_roll, []), "solver": Episode(s_prompt, s_roll, [])}


def train_step(run: Run, step: int, timer=no_timer) -> list[dict] | None:
    """One global step on every rank: images_per_step images each. Returns every rank's records,
    one per image (on every rank), or None if a signal arrived before any update, in which case
    nothing has changed. `timer(phase)` is a context manager around each phase (see no_timer)."""
    cfg, dist, st, policies = run.cfg, run.dist, run.st, run.policies
    t0, B, N = time.time(), cfg.images_per_step, cfg.num_solver_samples
    drawn, cursor, found = image_stream.draw(run.pool, st.image_cursor, dist.rank, dist.world,
                                             B, dist.gather)
    paths, images = zip(*drawn)
    eps = rollout(cfg, policies, list(images), run.stop, timer, run.engine, (step, dist.rank))
    if dist.any(bool(run.stop.signum)):
        return None
    st.image_cursor = cursor
    st.bad_images.update(found)  # every rank found the same: skipped, not retried, on resume too
    st.skipped_images = len(st.bad_images)
    solver, s_ep, p_ep = policies["solver"], eps["solver"], eps["proposer"]
    answers = [s_ep.rollout.texts[b * N:(b + 1) * N] for b in range(B)]
    with timer("rewards"):  # per image, one embedder call for all majority groups
        rws = R.compute_rewards_batch(cfg, answers, step, step_embedder(solver, cfg))
    s_ep.rewards = [r for rw in rws for r in rw["reward_final"]]
    p_ep.rewards = [rw["proposer_reward"] for rw in rws]
    if run.engine is not None:  # level 1 sleep where supported: its memory for the update
        run.engine.sleep()
    roles = update_role(cfg, "solver", policies, run.optimizers, s_ep, st, dist, timer)
    proposer_updated = cfg.proposer_update_freq > 0 and step % cfg.proposer_update_freq == 0
    roles.update(update_role(cfg, "proposer", policies, run.optimizers, p_ep, st, dist, timer)
                 if proposer_updated else
                 role_fields("proposer", None, per_sample=cfg.update_mode == "per_sample"))
    if run.engine is not None:  # the next rollout must come from the new weights
        run.engine.wake()
        with timer("solver_sync"):
            run.engine.sync("solver", solver)
        if proposer_updated:
            with timer("proposer_sync"):
                run.engine.sync("proposer", policies["proposer"])
    lr_schedule.step_all(run.schedulers)  # the schedule is by training step, for both roles
    # Ranks must hold identical adapters; the checksum in every record lets anyone check.
    # float64 accumulation without float64 copies of the weights, and one device sync (the
    # sums of a model split over devices gathered on the first parameter's).
    params = solver.parameters()
    checksum = torch.stack([p.detach().sum(dtype=torch.float64).to(params[0].device)
                            for p in params]).sum().item()
    seconds = round(time.time() - t0, 4)
    recs = [log_record(
        image={"step": step, "rank": dist.rank, "image_index": b, "image_path": paths[b],
               "question": extract_question(p_ep.rollout.texts[b]),
               "proposer_output": p_ep.rollout.texts[b], "solver_outputs": answers[b]},
        rewards=rw, signals=sampling_signals(s_ep.rollout.rows(slice(b * N, (b + 1) * N))),
        roles=roles,
        step={"proposer_updated": proposer_updated, "skipped_images": st.skipped_images,
              "solver_param_checksum": checksum, "nonfinite_skips": st.nonfinite_skips,
              "seconds": seconds, "generated_tokens": int(
                  p_ep.rollout.mask[b].sum() + s_ep.rollout.mask[b * N:(b + 1) * N].sum())})
        for b, rw in enumerate(rws)]
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


# ---------------------------------------------------------------- setup
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


def build_models(cfg: Config, pool: ImagePool) -> tuple[dict, dict]:
    """Both policies and one AdamW per role; sizes the pool's images as the processor expects.
    (scripts/bench.py builds its trainer through here too.)"""
    policies = build_policies(cfg)
    pool.min_pixels, pool.max_pixels, pool.factor = image_sizing(policies["solver"].processor,
                                                                 cfg.max_pixels)
    if cfg.gradient_checkpointing:
        for p in {id(p.model): p for p in policies.values()}.values():
            p.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policies, make_optimizers(cfg, policies)


def make_optimizers(cfg: Config, policies: dict) -> dict:
    """One AdamW per role over its trainable parameters."""
    return {r: torch.optim.AdamW(policies[r].parameters(), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay) for r in ROLES}


@contextmanager
def start_run(cfg: Config, dist: Dist):
    """The Run, inside its locked folder (one trainer per run, until exit): image pool, both
    policies and their optimizers, restored from the newest checkpoint if there is one."""
    resolve_device_map(cfg, dist)
    # Everything checkable without a model, before a run folder is made for nothing: the local
    # checks first, then those that may ask the network (W&B, the hub's config.json).
    check_data_dir(cfg.data_dir)
    pool = ImagePool(cfg.data_dir, cfg.include_subfolders_list, cfg.seed, cfg.max_pixels)
    if len(set(dist.gather(pool.fingerprint()))) > 1:  # the seeded order needs one path list
        raise UserError(f"the ranks found different image lists in {cfg.data_dir} (files "
                        f"added or removed while scanning?); rerun once the folder is stable")
    problem = dist.broadcast(wandb_guard.login_problem(cfg) if dist.is_main else None)
    if problem:
        raise UserError(problem)
    for model in dict.fromkeys((cfg.solver_model, cfg.proposer_model)):
        load_config(model)  # a wrong path or hub id; the weights are checked as they load
    try:  # before any weight is loaded: what fits this rank's device, or a one-line refusal
        memfit.plan_run(cfg, cfg.device_map, dist.is_main)
    except memfit.PlanError as e:
        raise UserError(str(e)) from None
    name = dist.broadcast(cfg.wandb_run_name or time.strftime("run-%Y%m%d-%H%M%S"))
    run_dir = os.path.join(cfg.output_dir, name)
    with run_lock(run_dir, name, dist):  # makes run_dir; removes it again if the start fails
        seed_all(cfg.seed)  # identical LoRA init on every rank
        policies, optimizers = build_models(cfg, pool)
        if dist.is_main:  # which decode step sampling runs, and why: a slow path must not be silent
            for role, p in policies.items():
                if cfg.rollout_engine == "vllm":
                    log.info("%s rollouts: vLLM, one in-process engine per rank", role)
                    continue
                log.info("%s decode path: %s (%s)", role, *decode_path(
                    core_model(p.model).language_model, p.model.get_output_embeddings(),
                    cfg.lean_decode))
            log_sampling(cfg, policies)
            devices.log_faster_command(cfg, dist.world, policies)
        run = Run(cfg=cfg, dist=dist, name=name, dir=run_dir, pool=pool, policies=policies,
                  optimizers=optimizers, st=TrainState(kl_coef={r: cfg.kl_coef for r in ROLES}),
                  cuda_devices=devices.cuda_devices(policies),
                  schedulers=lr_schedule.make_schedulers(cfg, optimizers))
        seed_all(cfg.seed + dist.rank)  # different samples on every rank
        resumed = run_checkpoint.resume(run)
        if dist.is_main:
            print(startup.pool_summary(pool, len(run.st.bad_images)), flush=True)
            print(startup.run_summary(name, run_dir, resumed, run.st.step + 1,
                                      generated=not cfg.wandb_run_name), flush=True)
        if cfg.rollout_engine == "vllm":  # after resume: serves the adapters training goes on from
            run.engine = vllm_engine.start(cfg, policies, dist, pool.max_pixels, pool.factor)
        try:
            yield run
        finally:
            if run.engine is not None:
                run.engine.close()


# ---------------------------------------------------------------- the loop
def show_progress(bar, records: list[dict], run: Run) -> None:
    """The bar's step and its postfix: the first image's reward and majority, the step's
    sampling signals, the Solver's KL and beta."""
    r, s = records[0], step_signals(records)
    bar.update(1)
    bar.set_postfix(reward=f"{np.mean(r['reward_final']):.3f}",
                    maj=f"{r['dominant_count']}/{run.cfg.num_solver_samples}",
                    distinct=f"{s['distinct_completions']:.1f}",
                    zero_std=f"{s['frac_reward_zero_std']:.2f}",
                    len=f"{s['completion_length_mean']:.0f}/{s['completion_length_max']}",
                    clipped=f"{s['clipped_ratio']:.2f}", entropy=f"{s['token_entropy']:.2f}",
                    kl=f"{r['solver_kl']:.2e}" if r["solver_kl"] is not None else "skipped",
                    beta=f"{run.st.kl_coef['solver']:.2e}",
                    **({"val": run.val_text} if run.val_text else {}))


def loop(run: Run) -> int:
    """Steps from the restored one to --total_steps: log each, validate and check the collapse
    alarms (validate.after_step), checkpoint every save_every, at a new --keep_best and at the
    end (or when a signal or --stop_on_collapse stops the run). Returns the exit code: 130 after
    SIGINT, else 0."""
    cfg, dist, st = run.cfg, run.dist, run.st
    if st.step >= cfg.total_steps:
        if dist.is_main:
            print(f"run {run.name} is already at step {st.step} of {cfg.total_steps}; nothing to do")
        return 0
    run.stop, rng, saved_step = Stop(), rng_state(run.cuda_devices), st.step
    listed = set(run.pool.paths)  # a file since removed from the folder must not count as a pool file
    run.pool.bad.update({path: why for path, why in st.bad_images.items() if path in listed})
    tracker = wandb_guard.Tracker(cfg, run.name, run.dir, st) if dist.is_main else None
    run.val_rows = V.load_rows(cfg, dist.is_main) if cfg.val_data else None
    bar = tqdm(total=cfg.total_steps, initial=st.step, disable=not dist.is_main, desc=run.name)
    try:
        best, collapsed = V.after_step(run, st.step, None, tracker)  # step 0's validation
        if best:
            run_checkpoint.save(run, rng)
        for step in range(st.step + 1, cfg.total_steps + 1):
            if collapsed:
                break
            records = train_step(run, step)
            if records is None:
                break  # a signal arrived mid-rollout: step abandoned, state is still step - 1's
            st.step, rng = step, rng_state(run.cuda_devices)
            if dist.is_main:
                append_log(run.log_path, records)
                tracker.log(records)
                show_progress(bar, records, run)
            best, collapsed = V.after_step(run, step, records, tracker)
            if best or collapsed or step % cfg.save_every == 0 or step == cfg.total_steps:
                run_checkpoint.save(run, rng)
                saved_step = step
            if (cfg.clear_cache_every and step % cfg.clear_cache_every == 0
                    and torch.cuda.is_available()):
                torch.cuda.empty_cache()
            if dist.any(bool(run.stop.signum)):
                break
    finally:  # closed on errors too, so `error: ...` gets its own line, not the bar's
        bar.close()
    if st.step != saved_step:
        run_checkpoint.save(run, rng)
    if tracker is not None:
        tracker.finish()
    if dist.is_main:
        print(f"checkpoints: {run.dir}/step_*/  log: {run.log_path}", flush=True)
        if collapsed:
            print(V.stop_line(run), flush=True)
    signum = max(dist.gather(run.stop.signum))  # the signal any rank received
    return 130 if signum == signal.SIGINT else 0


def train(cfg: Config) -> int:
    """Train, then leave the process group on every exit path (see Dist.close for why)."""
    keep_freed_memory()
    dist = Dist()
    try:
        with start_run(cfg, dist) as run:
            code = loop(run)
    except BaseException:
        # Every rank raises a failed checkpoint write or a non-finite stop together, after the
        # collective that agreed on it; but an unreadable data folder or a failed log write is
        # one rank's alone, and its peers may be in the next collective, where a barrier would
        # hang until the timeout. So no barrier here: only destroy, which cannot block.
        dist.close(wait=False)
        raise
    dist.close()  # finished, stopped by a signal, or nothing to do: every rank gets here
    return code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # distributed.report: one `error:` line per run, however many ranks raise it
    try:
        cfg = parse_config(argv)
    except ValueError as e:
        report(e)
        return 2
    if cfg.deterministic:  # before CUDA is initialized: cuBLAS reads its setting then
        log.info("deterministic: %s", use_deterministic_algorithms())
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
