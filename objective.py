"""The objective's knobs, each off by default (then the update is exactly the REINFORCE + KL one
of update.py, bit for bit): advantages scaled by the group's reward std (GRPO), groups with no
reward spread left out (DAPO's dynamic sampling, without resampling), the loss aggregation over
tokens (seq_mean / token_mean / seq_sum_norm), the PPO-clipped ratio to the sampler's policy for
--num_iterations K passes over one batch of rollouts, and an entropy bonus. update.py calls
these; the learning-rate schedule is in lr_schedule.py.

    python -m pytest tests/test_objective.py -q
"""
from __future__ import annotations

import torch

LOSS_AGGS = ("seq_mean", "token_mean", "seq_sum_norm")
STD_EPS = 1e-4  # TRL's GRPOTrainer: (r - mean) / (std + 1e-4)
ZERO_STD = 1e-8  # runtime.step_signals' frac_reward_zero_std: np.isclose(std, 0)


def group_std(rewards: list[float], group_size: int) -> torch.Tensor:
    """Each consecutive group of `group_size` rewards (one image's N): its population std,
    repeated for each row [len(rewards)]."""
    r = torch.tensor(rewards, dtype=torch.float32)
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    return r.view(-1, group_size).std(1, unbiased=False).repeat_interleave(group_size)


def advantage_scale(rewards: list[float], group_size: int) -> torch.Tensor:
    """--scale_advantages: what each row's advantage is divided by, GRPO's group reward std (the
    sample std, as TRL and DeepSeekMath) plus STD_EPS, per row [len(rewards)]."""
    if group_size < 2 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size} >= 2")
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return (r.std(1, unbiased=True) + STD_EPS).repeat_interleave(group_size)


def kept_rows(rewards: list[float], group_size: int) -> torch.Tensor:
    """--skip_zero_std: True for each row whose group's N rewards have some spread (the same test
    as the logged frac_reward_zero_std), False for rows of unanimous groups."""
    return group_std(rewards, group_size) > ZERO_STD


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy [n, L] of each position's tempered softmax, from its full log-softmax [n, L, V]."""
    return -(logp.exp() * logp).sum(-1)


def clipped_surrogate(tok_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) with
    rho = exp(log pi - log pi_old) [n, L] (A per row [n]); and where the clip bound (no
    gradient through rho there)."""
    ratio = (tok_logp - old_logp).exp()
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, n: float, tokens,
              max_len: int) -> torch.Tensor:
    """Sum of a per-token loss [n, L] (masked by `mask`) over one chunk, normalised so chunks add
    up to the batch's loss: seq_mean = mean over the batch's n sequences of each one's token mean;
    token_mean = over all the batch's `tokens` completion tokens; seq_sum_norm (Dr. GRPO) = each
    sequence's token sum over max_len (the token limit), mean over the n sequences."""
    if agg == "seq_mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n
    if agg == "token_mean":
        return (per_token * mask).sum() / tokens
    if agg == "seq_sum_norm":
        return (per_token * mask).sum() / (n * max_len)
    raise ValueError(f"--loss_agg must be one of {LOSS_AGGS}, got {agg!r}")


def policy_loss(cfg, tok_logp: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor,
                weight: torch.Tensor, m: torch.Tensor, old_logp: torch.Tensor | None, n, tokens,
                max_len: int, stats: dict | None = None) -> torch.Tensor:
    """One chunk's policy term of the loss (the KL term is update.py's). With every knob off it
    is today's expression, op for op: mean over sequences of A_i times the token-mean NLL."""
    if cfg.loss_agg == "seq_mean" and not clipping(cfg) and not cfg.entropy_coef:
        nll = -(tok_logp * weight).sum(1) / m.sum(1).clamp(min=1)
        return (advantages.to(nll.device) * nll).sum() / n
    adv = advantages.to(tok_logp.device)
    if clipping(cfg):
        if old_logp is None:
            raise ValueError("--clip_eps needs the sampler's log-probs of the rollout (the old "
                             "policy), and this rollout carries none")
        # (config.py refuses --rollout_is_cap with clipping: the ratio already corrects for
        # the sampler, so `weight` is the mask here)
        per_token, bound = clipped_surrogate(tok_logp, old_logp.to(tok_logp.device), adv,
                                             cfg.clip_eps, clip_eps_high(cfg))
        if stats is not None:
            stats["clipped_tokens"] = (stats.get("clipped_tokens", 0.0)
                                       + (bound.float() * m).sum().item())
    else:
        per_token = -tok_logp * weight * adv[:, None]
    loss = aggregate(per_token, m, cfg.loss_agg, n, tokens, max_len)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * aggregate(token_entropy(logp), m, cfg.loss_agg, n,
                                                   tokens, max_len)
    return loss


def clipping(cfg) -> bool:
    return cfg.clip_eps > 0


def clip_eps_high(cfg) -> float:
    return cfg.clip_eps_high if cfg.clip_eps_high is not None else cfg.clip_eps
