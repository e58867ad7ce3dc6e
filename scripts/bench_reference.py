"""The yardstick scripts/bench.py times ours against: one training step the way the published reference
ran it. N separate generate calls, the text re-tokenized for the loss, a full-sequence
full-vocabulary log-softmax, the image re-encoded in every forward, N backward passes and
optimizer steps. Same N, tokens, rewards and schedule as ours.

    python scripts/bench.py --baseline_steps 3
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import rewards
from data_and_utils import extract_question, proposer_prompt, solver_prompt
from sampling import eos_tensor
from vlm import acting, chat_text, reference, step_embedder, suppressed_ids


def reference_step(cfg, policies, optimizers, image, st, step, split) -> None:
    """One step the way the published reference ran it (same N, tokens, rewards, schedule)."""
    proposer, solver = policies["proposer"], policies["solver"]
    p_chat = chat_text(proposer.processor, proposer_prompt())
    with split.phase("proposer_generate"):
        p_text = _ref_generate(cfg, proposer, image, p_chat, cfg.max_new_tokens_proposer, split)
    s_chat = chat_text(solver.processor, solver_prompt(extract_question(p_text)))
    with split.phase("solver_generate"):
        texts = [_ref_generate(cfg, solver, image, s_chat, cfg.max_new_tokens_solver, split)
                 for _ in range(cfg.num_solver_samples)]
    with split.phase("rewards"):
        rw = rewards.compute_rewards(cfg, texts, step, step_embedder(solver, cfg))
    with split.phase("solver_update"):
        adv = rewards.advantages_for(rw["reward_final"], st.baseline["solver"])
        for text, a in zip(texts, adv.tolist()):
            _ref_update(cfg, solver, optimizers["solver"], image, s_chat, text, a,
                        st.kl_coef["solver"])
    if step % cfg.proposer_update_freq == 0:
        with split.phase("proposer_update"):
            _ref_update(cfg, proposer, optimizers["proposer"], image, p_chat, p_text,
                        rw["proposer_reward"] - st.baseline["proposer"], st.kl_coef["proposer"])


@torch.no_grad()
def _ref_generate(cfg, policy, image, chat: str, max_new_tokens: int, split) -> str:
    inputs = policy.processor(text=[chat], images=[image], return_tensors="pt").to(policy.device)
    with acting(policy) as model:
        model.eval()
        out = model.generate(**inputs, do_sample=True, temperature=cfg.temp, top_p=cfg.top_p,
                             top_k=0, max_new_tokens=max_new_tokens,
                             suppress_tokens=suppressed_ids(policy.processor))
    ids = out[0, inputs["input_ids"].shape[1]:]
    hits = torch.isin(ids, eos_tensor(model.generation_config.eos_token_id, ids.device)).nonzero()
    split.tokens += int(hits[0, 0]) + 1 if len(hits) else ids.numel()
    return policy.processor.tokenizer.decode(ids, skip_special_tokens=True)


def _ref_update(cfg, policy, optimizer, image, chat: str, text: str, adv: float, beta: float):
    """Re-tokenize prompt + text, full forward (image re-encoded), log-softmax over every position
    and the whole vocabulary, a separate reference forward, then its own backward and step."""
    proc = policy.processor
    prompt_len = proc(text=[chat], images=[image], return_tensors="pt")["input_ids"].shape[1]
    full = proc(text=[chat + text], images=[image], return_tensors="pt").to(policy.device)
    targets = full["input_ids"][:, prompt_len:]
    if targets.shape[1] == 0:
        return
    with acting(policy) as model:
        model.train()
        logp = F.log_softmax(model(**full).logits.float(), dim=-1)
    with torch.no_grad(), reference(policy) as ref:
        ref.eval()
        ref_logp = F.log_softmax(ref(**full).logits.float(), dim=-1)
        ref.train()
    pos = slice(prompt_len - 1, -1)
    tok = logp[:, pos].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kl = (logp[:, pos].exp() * (logp[:, pos] - ref_logp[:, pos])).sum(-1).mean()
    loss = -adv * tok.mean() + beta * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    optimizer.step()
