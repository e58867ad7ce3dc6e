"""Completion log-probs and the KL to the frozen reference, for the update: logits at completion
positions only, from the sampled ids (never re-tokenized text), with the shared prompt run once
and its key/value cache shared by the completions of each image.

    python -m pytest tests/test_vlm.py tests/test_batch.py -q
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm import Policy, Prompt, _core, _mm_kwargs, _select_mm, reference


def row_images(prompt: Prompt, rows: int) -> torch.Tensor | None:
    """Image index of each of `rows` completions of a several-image prompt (each image's rows
    consecutive, as generate returns them); None for a one-image prompt."""
    if prompt.images == 1:
        return None
    return torch.arange(prompt.images).repeat_interleave(rows // prompt.images)


def completion_logits(model, prompt: Prompt, ids: torch.Tensor, mask: torch.Tensor,
                      owner: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n, L, V] that predict each completion token, computed at completion positions only:
    the lm_head (and so the vocabulary-sized tensor) never sees the prompt or the image tokens.
    The n rows share one prompt, so it runs once and the completions attend to its key/value
    cache: the same function (gradients flow back through the shared cache) at P + n*L instead
    of n*(P + L) token positions. With a several-image prompt, `owner` names each row's image."""
    if owner is not None:
        return _owned_completion_logits(model, prompt, ids, mask, owner)
    n, length = ids.shape
    p = prompt.inputs
    full = {"input_ids": torch.cat([p["input_ids"].expand(n, -1), ids], 1),
            "attention_mask": torch.cat([p["attention_mask"].expand(n, -1), mask], 1),
            "mm_token_type_ids": torch.cat([p["mm_token_type_ids"].expand(n, -1),
                                            torch.zeros_like(ids)], 1)}
    if _drops_cache(model):
        out = model(**full, **_mm_kwargs(prompt, n), logits_to_keep=length + 1, use_cache=False)
        return out.logits[:, :-1]  # the last kept position predicts the token after the completion
    core = _core(model)
    # The (3-D, image-aware) positions one joint forward would use, sliced for the two parts.
    pos, _ = core.get_rope_index(full["input_ids"], full["mm_token_type_ids"],
                                 image_grid_thw=p["image_grid_thw"].repeat(n, 1),
                                 attention_mask=full["attention_mask"])
    P = prompt.length
    pre = core(input_ids=p["input_ids"], attention_mask=p["attention_mask"],
               mm_token_type_ids=p["mm_token_type_ids"], position_ids=pos[:, :1, :P],
               **_mm_kwargs(prompt, 1), use_cache=True)
    pre.cache.batch_repeat_interleave(n)
    out = core(input_ids=ids, attention_mask=full["attention_mask"], position_ids=pos[:, :, P:],
               cache=pre.cache, use_cache=True)
    hidden = torch.cat([pre.last_hidden_state[:, -1:].expand(n, -1, -1), out.last_hidden_state], 1)
    return model.get_output_embeddings()(hidden)[:, :-1]  # same L + 1 positions as above


def _owned_completion_logits(model, prompt: Prompt, ids, mask, owner) -> torch.Tensor:
    """completion_logits for rows of a left-padded several-image prompt: each image this chunk
    needs runs once, its key/value rows are gathered per completion, and padding is masked, with
    positions from the mask, so a row's logits are those of its image's prompt alone."""
    length, P, p = ids.shape[1], prompt.length, prompt.inputs
    used = sorted(set(owner.tolist()))
    local = torch.tensor([used.index(i) for i in owner.tolist()], device=ids.device)
    full = {"input_ids": torch.cat([p["input_ids"][owner], ids], 1),
            "attention_mask": torch.cat([p["attention_mask"][owner], mask], 1),
            "mm_token_type_ids": torch.cat([p["mm_token_type_ids"][owner],
                                            torch.zeros_like(ids)], 1)}
    if _drops_cache(model):
        out = model(**full, **_select_mm(prompt, owner.tolist()), logits_to_keep=length + 1,
                    use_cache=False)
        return out.logits[:, :-1]
    core = _core(model)
    pos, _ = core.get_rope_index(full["input_ids"], full["mm_token_type_ids"],
                                 image_grid_thw=p["image_grid_thw"][owner],
                                 attention_mask=full["attention_mask"])
    first = [owner.tolist().index(i) for i in used]  # a row of each used image
    pre = core(input_ids=p["input_ids"][used], attention_mask=p["attention_mask"][used],
               mm_token_type_ids=p["mm_token_type_ids"][used], position_ids=pos[:, first, :P],
               **_select_mm(prompt, used), use_cache=True)
    pre.cache.batch_select_indices(local)
    out = core(input_ids=ids, attention_mask=full["attention_mask"], position_ids=pos[:, :, P:],
               cache=pre.cache, use_cache=True)
    hidden = torch.cat([pre.last_hidden_state[local, -1:], out.last_hidden_state], 1)
    return model.get_output_embeddings()(hidden)[:, :-1]


def _drops_cache(model) -> bool:
    """HF gradient checkpointing discards the cache in a training forward with gradients, so the
    shared-prompt path cannot be used there: fall back to one joint forward."""
    layers = _core(model).language_model.layers
    return (model.training and torch.is_grad_enabled()
            and any(getattr(layer, "gradient_checkpointing", False) for layer in layers))


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor):
    """(log-prob of each sampled token [n, L], full log-softmax [n, L, V]), in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
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
def reference_logprobs(policy: Policy, prompt: Prompt, ids, mask, owner=None) -> torch.Tensor:
    with reference(policy) as ref:
        was_training = ref.training
        ref.eval()
        logits = completion_logits(ref, prompt, ids, mask, owner)
        ref.train(was_training)
    return F.log_softmax(logits.float(), dim=-1)
