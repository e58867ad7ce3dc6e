"""Rewards, advantages and small schedules for the iReasoner trainer: pure functions, no model.

Each reward function returns (rewards, info); info holds plain Python values for logging.
compute_rewards() puts them together for one question; the step embedder is passed in as a
callable, so this file never touches a model. Run the tests with:

    python -m pytest tests/test_rewards.py -q
"""
from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F

from answers import classes
from data_and_utils import count_pre_answer_words, extract_answer, extract_steps, normalize_answer


# -----------------------------------------------------------------------------
# outcome reward: soft majority vote with a length penalty

def majority(answers_norm: list[str]) -> tuple[str, int]:
    """Most frequent answer and its count; ties go to the answer seen first."""
    if not answers_norm:
        raise ValueError("majority() needs at least one answer")
    counts = Counter(answers_norm)
    best = max(counts.values())
    # Counter keeps first-insertion order, so the first answer reaching `best` was seen first.
    answer = next(a for a, c in counts.items() if c == best)
    return answer, best


def majority_group(answers_norm: list[str], dominant: str | None = None) -> list[int]:
    """Indices of the samples whose answer is `dominant` (default: the majority answer)."""
    if dominant is None:
        dominant, _ = majority(answers_norm)
    return [i for i, a in enumerate(answers_norm) if a == dominant]


def answer_entropy(answers_norm: list[str]) -> float:
    """Shannon entropy (nats) of the empirical answer distribution."""
    n = len(answers_norm)
    if n == 0:
        raise ValueError("answer_entropy() needs at least one answer")
    h = -sum((c / n) * math.log(c / n) for c in Counter(answers_norm).values())
    return max(0.0, h)  # -0.0 (or a rounding speck below 0) when all answers agree


def outcome_rewards(outputs: list[str], gamma: float, len_penalty_weight: float,
                    len_penalty_target_words: int, match: str = "string") -> tuple[list[float], dict]:
    """r_i = p_i**gamma * (1 - weight * pen_i): p_i is the share of samples whose (normalized)
    answer counts as the same as i's under `match` (answers.py), pen_i in [0, 1] grows with the
    words written before <answer>. info's answer_classes name each sample's class."""
    if not outputs:
        raise ValueError("outcome_rewards() needs at least one output")
    if len_penalty_target_words <= 0:
        raise ValueError(f"len_penalty_target_words must be > 0, got {len_penalty_target_words}")
    n = len(outputs)
    answers = [extract_answer(o) for o in outputs]
    answers_norm = [normalize_answer(a) for a in answers]
    keys = classes(answers_norm, match)
    words = [count_pre_answer_words(o) for o in outputs]
    counts = Counter(keys)
    target = len_penalty_target_words
    rewards = []
    for a, w in zip(keys, words):
        pen = min(1.0, max(0.0, (w - target) / target))
        rewards.append((counts[a] / n) ** gamma * (1.0 - len_penalty_weight * pen))
    dominant, dominant_count = majority(keys)
    info = {"answers": answers, "answers_norm": answers_norm, "answer_classes": keys,
            "pre_answer_words": words, "dominant_answer": dominant,
            "dominant_count": dominant_count, "answer_entropy": answer_entropy(keys)}
    return rewards, info


# -----------------------------------------------------------------------------
# trajectory-aware step agreement

def step_agreement_rewards(group: list[int], step_embeddings: list[torch.Tensor],
                           min_group_size: int, density_gamma: float, position_decay: float,
                           sim_temperature: float) -> tuple[list[float], dict]:
    """Reward samples in the majority-answer `group` (indices into `step_embeddings`, one
    [steps, d] tensor per sample) whose reasoning steps point the same way as the group's
    average step at each position. Everyone else gets 0. `min_group_size` applies twice: to the
    group, and to each step position (members that have a step there)."""
    n = len(step_embeddings)
    outside = [i for i in group if not 0 <= i < n]
    if outside:
        raise ValueError(f"group member {outside[0]} has no embedding set ({n} given)")
    rewards = [0.0] * n
    info = {"group_size": len(group), "positions_used": 0, "mean_cos": 0.0, "density": 0.0}
    if len(group) < min_group_size:
        return rewards, info
    density = (len(group) / n) ** density_gamma
    info["density"] = density
    # float64 on CPU: a handful of small vectors, and exact enough for hand-checked tests.
    emb = {i: F.normalize(step_embeddings[i].detach().to("cpu", torch.float64), dim=-1, eps=1e-12)
           for i in group}
    num = {i: 0.0 for i in group}  # sum_j w_j * u_ij
    den = {i: 0.0 for i in group}  # sum_j w_j over the positions i has
    cosines = []
    for j in range(max(emb[i].shape[0] for i in group)):
        members = [i for i in group if emb[i].shape[0] > j]
        # The published rule: a position counts only when min_group_size members reach it.
        if len(members) < min_group_size:
            continue
        info["positions_used"] += 1
        centre = F.normalize(torch.stack([emb[i][j] for i in members]).mean(0), dim=-1, eps=1e-12)
        w = math.exp(-position_decay * j)
        for i in members:
            s = max(-1.0, min(1.0, float(emb[i][j] @ centre)))
            cosines.append(s)
            if sim_temperature != 1.0:
                s = math.tanh(s / sim_temperature)
            num[i] += w * (s + 1.0) / 2.0
            den[i] += w
    for i in group:
        if den[i] > 0:
            rewards[i] = num[i] / den[i] * density
    info["mean_cos"] = sum(cosines) / len(cosines) if cosines else 0.0
    return rewards, info


# -----------------------------------------------------------------------------
# mixing, proposer reward, schedules

def step_reward_weight(step: int, total_steps: int, w_start: float, w_end: float,
                       warmup: float) -> float:
    """Flat at w_start for the first `warmup` fraction of training, then linear to w_end."""
    if total_steps <= 0 or not 0 <= warmup < 1:
        raise ValueError(f"need total_steps > 0 and 0 <= warmup < 1, got {total_steps}, {warmup}")
    progress = step / total_steps
    ramp = min(1.0, max(0.0, (progress - warmup) / (1.0 - warmup)))
    return w_start + (w_end - w_start) * ramp


def mix_rewards(outcome: list[float], steps: list[float], weight: float) -> tuple[list[float], dict]:
    if len(outcome) != len(steps):
        raise ValueError(f"{len(outcome)} outcome rewards but {len(steps)} step rewards")
    mixed = [(1.0 - weight) * o + weight * s for o, s in zip(outcome, steps)]
    return mixed, {"step_reward_weight": float(weight)}


def proposer_reward(entropy: float, mu: float, sigma: float) -> tuple[float, dict]:
    """Gaussian in the Solver's answer entropy: questions that split the Solver about `mu`
    nats (neither trivial nor hopeless) score highest."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = math.exp(-((entropy - mu) ** 2) / (2.0 * sigma ** 2))
    return r, {"proposer_reward": r, "answer_entropy": float(entropy)}


def update_kl_coef(beta: float, kl: float, target: float, rate: float,
                   error_clip: float = 0.2) -> float:
    """Adaptive KL (Ziegler et al. 2019): e = clip((KL - target)/target, -c, c), then
    beta <- clip(beta * exp(rate * e), 1e-8, 100). The clip bounds one update to a factor of
    exp(rate * c): without it, one step at 30x the target multiplies beta by e^2.9.
    error_clip 0 = the unclipped published rule (exponent capped at +-50, so exp cannot overflow)."""
    if not math.isfinite(kl):
        raise ValueError(f"KL is not finite ({kl}); refusing to update the KL coefficient")
    if target <= 0:
        raise ValueError(f"KL target must be > 0, got {target}")
    if error_clip < 0:
        raise ValueError(f"KL error clip must be >= 0, got {error_clip}")
    error = (kl - target) / target
    if error_clip > 0:
        error = min(error_clip, max(-error_clip, error))
    exponent = min(50.0, max(-50.0, rate * error))
    return min(100.0, max(1e-8, beta * math.exp(exponent)))


def update_ema_baseline(b: float, rewards: list[float], momentum: float) -> float:
    for r in rewards:
        b = momentum * b + (1.0 - momentum) * r
    return b


def advantages_for(rewards: list[float], baseline: float | None,
                   group_size: int | None = None) -> torch.Tensor:
    """A_i = r_i - b with the running baseline, or r_i - mean(r) (group) when b is None; with
    `group_size`, each consecutive group of that many rewards (one image's N) is its own group."""
    r = torch.tensor(rewards, dtype=torch.float32)
    if baseline is not None:
        return r - baseline
    if group_size is None or group_size == len(rewards):
        return r - r.mean()
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    groups = r.view(-1, group_size)
    return (groups - groups.mean(1, keepdim=True)).reshape(-1)


# -----------------------------------------------------------------------------
# one question's rewards, everything above put together

def compute_rewards(cfg, texts: list[str], step: int, embed) -> dict:
    """Outcome self-consistency + trajectory-aware step agreement, mixed; proposer reward.
    `cfg` is a Config; `embed(steps) -> [len(steps), d]` embeds reasoning steps."""
    return compute_rewards_batch(cfg, [texts], step, embed)[0]


def compute_rewards_batch(cfg, groups: list[list[str]], step: int, embed) -> list[dict]:
    """compute_rewards for several questions (one list of N answers each), with one embed call
    for the steps of every question's majority group."""
    prepared = [_outcome_and_steps(cfg, texts) for texts in groups]
    # Only the majority group's steps are compared, so only those are embedded (one call).
    vectors = embed([s for _, info, steps, group in prepared for i in group for s in steps[i]])
    results, offset = [], 0
    for outcome, info, steps, group in prepared:
        per_sample = [vectors[:0]] * len(steps)
        for i in group:
            per_sample[i] = vectors[offset:offset + len(steps[i])]
            offset += len(steps[i])
        results.append(_mix(cfg, step, outcome, info, steps, group, per_sample))
    return results


def _outcome_and_steps(cfg, texts: list[str]):
    outcome, info = outcome_rewards(texts, cfg.solver_soft_gamma, cfg.len_penalty_weight,
                                    cfg.len_penalty_target_words, cfg.answer_match)
    steps = [extract_steps(t, cfg.max_reasoning_steps) for t in texts]
    return outcome, info, steps, majority_group(info["answer_classes"], info["dominant_answer"])


def _mix(cfg, step: int, outcome, info, steps, group, per_sample) -> dict:
    step_r, step_info = step_agreement_rewards(
        group, per_sample, cfg.min_step_group_size, cfg.step_group_density_gamma,
        cfg.step_position_decay, cfg.step_sim_temperature)
    weight = step_reward_weight(step, cfg.total_steps, cfg.step_reward_weight_start,
                                cfg.step_reward_weight_end, cfg.step_reward_warmup)
    final, mix_info = mix_rewards(outcome, step_r, weight)  # its info: step_reward_weight
    prop_r, prop_info = proposer_reward(info["answer_entropy"], cfg.proposer_reward_mu,
                                        cfg.proposer_reward_sigma)  # proposer_reward, entropy
    return {**info, **mix_info, **prop_info, "steps_per_sample": steps,
            "reward_outcome": outcome, "reward_steps": step_r, "reward_final": final,
            "step_info": step_info}
