"""The REINFORCE + KL update of one role: completion log-probs against the frozen reference,
gradients averaged over ranks, one AdamW step (batched) or one per completion (per_sample, the
published order), then the running baseline and the adaptive beta. train.py calls update_role.

Log-probs come from logits at completion positions only, from the sampled ids (never
re-tokenized text), with the shared prompt run once and its key/value cache shared by the
completions of each image. They are those of the distribution that was sampled: log_softmax of
logits / T at the sampling temperature T (as TRL's GRPOTrainer and verl score), for the policy
and for the reference of the KL alike (greedy sampling, T = 0, scores at T = 1).

    python -m pytest tests/test_update.py tests/test_fidelity.py tests/test_vlm.py -q
"""
from __future__ import annotations

import itertools
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import objective
import rewards as R
from config import Config
from distributed import Dist, TrainingError
from runtime import role_fields
from sampling import Sampling, tempered_logprobs
from vlm import Policy, Prompt, Rollout, acting, core_model, reference, vision_inputs

log = logging.getLogger("ireasoner")
MAX_NONFINITE_IN_A_ROW = 3


@dataclass
class Episode:
    """One role's sampled completions for the step's images (each image's rows consecutive),
    with their rewards."""
    prompt: Prompt
    rollout: Rollout
    rewards: list[float]



def accumulate_gradients(cfg: Config, policy: Policy, episode: Episode, advantages: torch.Tensor,
                         beta: float, norm: tuple | None = None, stats: dict | None = None,
                         keep: torch.Tensor | None = None) -> tuple[float, float]:
    """Backward of loss = mean_i(A_i NLL_i) + beta KL over all completions (of all the step's
    images), adding into .grad. Chunks of update_micro_batch completions sum to exactly the
    unchunked gradient, and only one chunk's [rows, L, V] tensors are alive at a time. `norm`
    (completions, tokens) replaces the episode's own counts in the two means: an episode that is
    part of a larger batch then adds its exact share of that batch's gradient.
    A rollout that carries its sampler's log-probs (our loop's, or vllm_engine.py's) adds their
    absolute difference from this forward's, summed over tokens, to stats["logprob_diff_sum"];
    with --rollout_is_cap C each token's REINFORCE term is weighted by min(pi_train/pi_rollout,
    C) (truncated importance sampling, the weight a constant). The objective's knobs (clipped
    ratio to the sampler's log-probs, --loss_agg, entropy) are objective.policy_loss's; `keep`
    [n] bool (--skip_zero_std) leaves rows out of the loss and of both counts. Returns (loss,
    KL summed over tokens)."""
    ids, mask = episode.rollout.ids, episode.rollout.mask
    if keep is not None:
        mask = mask * keep[:, None].to(mask.device, mask.dtype)
    n, tokens = ids.shape[0] if keep is None else int(keep.sum()), mask.sum().clamp(min=1)
    if norm is not None:
        n, tokens = norm[0], torch.as_tensor(norm[1], dtype=tokens.dtype)
    owner = row_images(episode.prompt, ids.shape[0])
    chunk = micro_batch(cfg) or ids.shape[0]
    temperature = score_temperature(cfg)
    max_len = getattr(cfg, f"max_new_tokens_{policy.role}")  # --loss_agg seq_sum_norm's constant
    if stats is not None and episode.rollout.logprobs is not None:  # a rank whose rows were all
        stats.setdefault("logprob_diff_sum", 0.0)  # left out still joins the ranks' mean of it
    loss_sum, kl_sum = 0.0, 0.0
    with acting(policy) as model:
        for lo in range(0, ids.shape[0], chunk):
            part = slice(lo, lo + chunk)
            if keep is not None and not keep[part].any():
                continue
            own = owner[part]
            ref_logp = reference_logprobs(policy, episode.prompt, ids[part], mask[part], own,
                                          temperature)
            model.train()
            logits = completion_logits(model, episode.prompt, ids[part], mask[part], own)
            # a split model's logits are on the lm_head's device, the rollout on the embedding's
            tok_logp, logp = token_logprobs(logits, ids[part].to(logits.device), temperature)
            m = mask[part].to(logits.device).float()
            weight, old = m, None
            if episode.rollout.logprobs is not None:
                old = episode.rollout.logprobs[part]
                gap = (tok_logp.detach() - old.to(m.device)) * m
                if stats is not None:
                    stats["logprob_diff_sum"] = (stats.get("logprob_diff_sum", 0.0)
                                                 + gap.abs().sum().item())
                if cfg.rollout_is_cap:
                    weight = m * gap.exp().clamp(max=cfg.rollout_is_cap)
            pg = objective.policy_loss(cfg, tok_logp, logp, advantages[part], weight, m, old, n,
                                       tokens.to(m.device), max_len, stats)
            kl = (kl_per_token(logp, ref_logp.to(logp.device), ids[part].to(logp.device),
                               cfg.kl_estimator) * m).sum()
            loss = pg + beta * kl / tokens.to(kl.device)
            loss.backward()
            loss_sum += loss.item()
            kl_sum += kl.item()
            del ref_logp, logits, tok_logp, logp, pg, loss  # before the next chunk's are made
    return loss_sum, kl_sum


def micro_batch(cfg: Config) -> int:
    """--update_micro_batch as a number: auto is resolved at start from the memory plan
    (memfit.py sets cfg.auto_micro_batch); a Config never resolved (built in code) means 0."""
    if cfg.update_micro_batch == "auto":
        return getattr(cfg, "auto_micro_batch", 0)
    return int(cfg.update_micro_batch)


def update_policy(cfg: Config, policy: Policy, optimizer, episode: Episode,
                  advantages: torch.Tensor, beta: float, dist: Dist,
                  keep: torch.Tensor | None = None) -> dict:
    """--num_iterations (default 1) REINFORCE + KL optimizer steps on one batch of rollouts;
    gradients are averaged over ranks before clipping. A non-finite loss or gradient on any rank
    skips the step on all ranks, and the passes left. `keep`: accumulate_gradients'."""
    params = policy.parameters()
    stats, losses, clipped = {}, [], 0.0
    for k in range(cfg.num_iterations):
        it = {}
        optimizer.zero_grad(set_to_none=True)
        loss, kl_sum = accumulate_gradients(cfg, policy, episode, advantages, beta, stats=it,
                                            keep=keep)
        if k == 0:  # the sampler's policy against the weights it sampled with
            stats = it
        clipped += it.get("clipped_tokens", 0.0)
        losses.append(loss)
        dist.average_gradients(params)
        grad_norm = clip_gradients(params, cfg.grad_clip, cfg.grad_clip_per_device)
        finite = not dist.any(not (math.isfinite(loss) and torch.isfinite(grad_norm).item()))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not finite:
            break
    mask = episode.rollout.mask if keep is None else episode.rollout.mask * keep[:, None]
    tokens = max(int(mask.sum()), 1)
    return {"loss": sum(losses) / len(losses), "kl": kl_sum / tokens,
            "grad_norm": grad_norm.item(), "finite": finite,
            "logprob_diff_sum": stats.get("logprob_diff_sum"), "tokens": tokens,
            "clip_frac": clipped / (tokens * len(losses)) if objective.clipping(cfg) else None}


def clip_gradients(params: list, max_norm: float, per_device: bool = False) -> torch.Tensor:
    """Clip the global gradient norm to max_norm; returns the norm before clipping. per_device
    (the published rule): each device's parameters are clipped separately, so over k devices
    (--device_map auto) the global norm may reach sqrt(k) * max_norm; the global norm is then
    returned."""
    if not per_device:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    by_device = {}
    for p in params:
        if p.grad is not None:
            by_device.setdefault(p.grad.device, []).append(p)
    norms = [torch.nn.utils.clip_grad_norm_(group, max_norm) for group in by_device.values()]
    if not norms:
        return torch.zeros(())
    return torch.stack([n.float().cpu() for n in norms]).norm()


def update_role(cfg: Config, role: str, policies: dict, optimizers: dict, episode: Episode,
                 st, dist: Dist, timer=None) -> dict:
    """Update one role; after each optimizer step fold every rank's rewards of that step (rank
    order) into its baseline and adapt its beta with the rank-averaged KL, so both stay identical
    across ranks. batched: one step over all N completions. per_sample (the published order):
    one step per completion, in sample order, each with the baseline and beta the samples
    before it left (on several ranks, step i takes every rank's i-th sample). A step whose rows
    --skip_zero_std leaves out on every rank is not taken (its rewards still fold in)."""
    timer = timer or (lambda phase: nullcontext())
    b, beta = st.baseline[role], st.kl_coef[role]
    # A one-sample group has zero advantage, so the Proposer always uses the running baseline.
    use_group = cfg.baseline == "group" and role == "solver"
    # Every image's advantages use the baseline from before the step; then all rewards fold in,
    # rank by rank and image by image. A group baseline is each image's own N rewards.
    group_size = len(episode.rewards) // episode.prompt.images
    group_adv = R.advantages_for(episode.rewards, None, group_size)
    scale, keep = solver_knobs(cfg, role, episode.rewards, group_size)
    parts = per_sample_episodes(episode) if cfg.update_mode == "per_sample" else [(0, episode)]
    per = {"baseline": [], "kl_coef": [], "kl": [], "loss": [], "diff": [], "tokens": [],
           "clip": []}
    for first, part in parts:
        per["baseline"].append(st.baseline[role])
        per["kl_coef"].append(st.kl_coef[role])
        rows = slice(first, first + len(part.rewards))
        adv = (group_adv[rows] if use_group
               else R.advantages_for(part.rewards, st.baseline[role]))
        if scale is not None:
            adv = adv / scale[rows]
        part_keep = None if keep is None else keep[rows]
        if part_keep is not None and not dist.any(bool(part_keep.any())):
            out = None  # every rank's groups of this step have equal rewards: nothing to learn
        else:
            with timer(f"{role}_update"):
                out = update_policy(cfg, policies[role], optimizers[role], part, adv,
                                    st.kl_coef[role], dist, keep=part_keep)
        per["kl"].append(None if out is None else _rank_mean_kl(out["kl"], part_keep, dist))
        per["loss"].append(None if out is None else out["loss"])
        per["diff"].append(None if out is None else out["logprob_diff_sum"])
        per["tokens"].append(0 if out is None else out["tokens"])
        per["clip"].append(None if out is None else out["clip_frac"])
        all_rewards = [r for rank_rewards in dist.gather(part.rewards) for r in rank_rewards]
        st.baseline[role] = R.update_ema_baseline(st.baseline[role], all_rewards,
                                                  cfg.baseline_momentum)
        if out is not None:
            _adapt_kl_coef(cfg, role, st, per["kl"][-1], out["finite"])
    skipped = count_skipped(keep, group_size, dist)
    if skipped is not None and None in per["loss"] and dist.is_main:
        log.info("%s: %d of %d groups have equal rewards and were left out (--skip_zero_std); "
                 "%d of %d optimizer steps not taken", role, skipped,
                 dist.world * episode.prompt.images, per["loss"].count(None), len(parts))
    values = {"baseline_before": b, "kl": _mean(per["kl"]),
              "kl_coef_before": beta, "kl_coef_after": st.kl_coef[role],
              "loss": _mean(per["loss"]),
              "baseline_per_sample": per["baseline"], "kl_coef_per_sample": per["kl_coef"],
              "kl_per_sample": per["kl"],
              "logprob_diff": None if all(d is None for d in per["diff"]) else
              dist.mean(sum(d for d in per["diff"] if d is not None)
                        / max(sum(per["tokens"]), 1)),
              "lr": lr_now(optimizers[role]), "groups_skipped": skipped,
              "clip_frac": _mean(per["clip"])}
    return role_fields(role, values, per_sample=cfg.update_mode == "per_sample")


def solver_knobs(cfg: Config, role: str, rewards: list[float], group_size: int):
    """(per-row divisor of --scale_advantages, per-row keep of --skip_zero_std), each None when
    off. The Solver's only: the Proposer's group is one question, with no reward spread."""
    if role != "solver":
        return None, None
    return (objective.advantage_scale(rewards, group_size) if cfg.scale_advantages else None,
            objective.kept_rows(rewards, group_size) if cfg.skip_zero_std else None)


def count_skipped(keep: torch.Tensor | None, group_size: int, dist: Dist) -> int | None:
    """Groups left out by --skip_zero_std on all ranks (None when off)."""
    if keep is None:
        return None
    return sum(dist.gather(int((~keep.view(-1, group_size).any(1)).sum())))


def _rank_mean_kl(kl: float, keep: torch.Tensor | None, dist: Dist) -> float:
    """The mean over ranks of their KL, over the ranks that kept rows (--skip_zero_std): a rank
    whose groups were all left out measured none."""
    mean = dist.mean(kl)
    return mean if keep is None else mean / dist.mean(float(keep.any()))


def lr_now(optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def _mean(values: list) -> float | None:
    """Mean of the steps taken (None: none was)."""
    taken = [v for v in values if v is not None]
    return sum(taken) / len(taken) if taken else None


def per_sample_episodes(episode: Episode) -> list[tuple[int, Episode]]:
    """(index, one-completion episode) for each sample, in sample order."""
    roll = episode.rollout
    return [(i, Episode(episode.prompt, roll.rows(slice(i, i + 1)), [reward]))
            for i, reward in enumerate(episode.rewards)]


def _adapt_kl_coef(cfg: Config, role: str, st, kl: float, finite: bool) -> None:
    """beta follows a finite update's KL; a skipped update is counted, and 3 in a row stop."""
    if finite:
        st.kl_coef[role] = R.update_kl_coef(st.kl_coef[role], kl, cfg.kl_target,
                                            cfg.kl_adapt_rate, cfg.kl_error_clip)
        st.nonfinite_in_a_row = 0
        return
    st.nonfinite_skips += 1
    st.nonfinite_in_a_row += 1
    log.warning("non-finite %s loss or gradient: update skipped (%d in a row)", role,
                st.nonfinite_in_a_row)
    if st.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise TrainingError(f"{MAX_NONFINITE_IN_A_ROW} non-finite updates in a row; stopped "
                            f"without saving. Lower --lr or check the data, then rerun to "
                            f"resume from the last checkpoint")


# ---------------------------------------------------------------- completion log-probs and the KL to the reference
def row_images(prompt: Prompt, rows: int) -> torch.Tensor:
    """Image index of each of `rows` completions (each image's rows consecutive, as generate
    returns them): all 0 for a one-image prompt."""
    return torch.arange(prompt.images).repeat_interleave(rows // prompt.images)


def completion_logits(model, prompt: Prompt, ids: torch.Tensor, mask: torch.Tensor,
                      owner: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n, L, V] that predict each completion token, computed at completion positions only:
    the lm_head (and so the vocabulary-sized tensor) never sees the prompt or the image tokens.
    `owner` names each row's image (default: row_images). Each image the rows need runs once and
    its completions attend to its key/value cache: the same function (gradients flow back through
    the shared cache) at P + n*L instead of n*(P + L) token positions. Left padding of a
    several-image prompt is masked, with positions from the mask, so a row's logits are those of
    its image's prompt alone."""
    n, length = ids.shape
    P, p = prompt.length, prompt.inputs
    owner = row_images(prompt, n) if owner is None else owner
    rows = owner.tolist()
    used = sorted(set(rows))
    runs = [(used.index(i), len(list(same))) for i, same in itertools.groupby(rows)]
    full = {"input_ids": torch.cat([p["input_ids"][owner], ids], 1),
            "attention_mask": torch.cat([p["attention_mask"][owner], mask], 1),
            "mm_token_type_ids": torch.cat([p["mm_token_type_ids"][owner],
                                            torch.zeros_like(ids)], 1)}
    if _drops_cache(model):
        out = model(**full, **vision_inputs(prompt, rows), logits_to_keep=length + 1,
                    use_cache=False)
        return out.logits[:, :-1]  # the last kept position predicts the token after the completion
    core = core_model(model)
    # The (3-D, image-aware) positions one joint forward would use, sliced for the two parts.
    pos, _ = core.get_rope_index(full["input_ids"], full["mm_token_type_ids"],
                                 image_grid_thw=p["image_grid_thw"][owner],
                                 attention_mask=full["attention_mask"])
    first = [rows.index(i) for i in used]  # a row of each used image
    pre = core(input_ids=p["input_ids"][used], attention_mask=p["attention_mask"][used],
               mm_token_type_ids=p["mm_token_type_ids"][used], position_ids=pos[:, first, :P],
               **vision_inputs(prompt, used), use_cache=True)
    for layer in pre.cache.layers:
        layer.keys, layer.values = repeat_rows(layer.keys, runs), repeat_rows(layer.values, runs)
    out = core(input_ids=ids, attention_mask=full["attention_mask"], position_ids=pos[:, :, P:],
               cache=pre.cache, use_cache=True)
    hidden = torch.cat([repeat_rows(pre.last_hidden_state[:, -1:], runs), out.last_hidden_state], 1)
    return model.get_output_embeddings()(hidden)[:, :-1]  # same L + 1 positions as above


def repeat_rows(x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """Rows of x in the order `runs` gives: (row, count) for each run of equal rows. Expanded
    slices, so the backward sums each row's copies in a fixed order. Advanced indexing
    (x[index], cache.batch_select_indices) gives the same rows, but its backward,
    index_put(accumulate=True), adds float32 with atomics on a CPU with 2+ threads (for 32,768+
    elements): the order, and so the last bits of the gradient, changed from run to run.
    index_select's backward uses atomics on CUDA."""
    parts = [x[row:row + 1].expand(count, *x.shape[1:]) for row, count in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _drops_cache(model) -> bool:
    """HF gradient checkpointing discards the cache in a training forward with gradients, so the
    shared-prompt path cannot be used there: fall back to one joint forward."""
    layers = core_model(model).language_model.layers
    return (model.training and torch.is_grad_enabled()
            and any(getattr(layer, "gradient_checkpointing", False) for layer in layers))


def score_temperature(cfg: Config) -> float:
    """The T the update scores at: the sampling temperature (Sampling.score_temperature)."""
    return Sampling(temperature=cfg.temp).score_temperature


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    """(log-prob of each sampled token [n, L], full log-softmax [n, L, V]) of logits / T, in
    float32: the sampler's tempered_logprobs."""
    logp = tempered_logprobs(logits, temperature)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), logp


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, ids: torch.Tensor,
                 estimator: str = "exact") -> torch.Tensor:
    """KL(pi || ref) per completion token [n, L]: exact over the vocabulary, or k3 on samples."""
    if estimator == "exact":
        return (logp.exp() * (logp - ref_logp)).sum(-1)
    tok = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref_tok = ref_logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    log_ratio = ref_tok - tok
    return log_ratio.exp() - log_ratio - 1


@torch.no_grad()
def reference_logprobs(policy: Policy, prompt: Prompt, ids, mask, owner=None,
                       temperature: float = 1.0) -> torch.Tensor:
    """The frozen reference's log_softmax(logits / T) [n, L, V] at the completion positions."""
    with reference(policy) as ref:
        was_training = ref.training
        ref.eval()
        logits = completion_logits(ref, prompt, ids, mask, owner)
        ref.train(was_training)
    return tempered_logprobs(logits, temperature)
