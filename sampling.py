"""The batched sampling loop behind vlm.generate: n completions of each prompt, token by token.

HF `generate` spends more per token on bookkeeping than a small model spends on its forward, and
it runs the prompt n times. Here the prompt (image included) runs once at batch 1 through the HF
model, its key/value cache is repeated to n rows, and each step feeds one token per row. For the
Qwen2-VL / Qwen2.5-VL text stack a decode step runs as plain tensor code (LeanDecoder) that does
exactly the ops of the HF layers and of peft's LoRA layers, in the same order (bit-identical
logits in float32, in bfloat16 with peft's float32 adapters, and in float16; see
tests/test_sampling.py; a float32 CPU adapter is folded into the weights, see _linear), without
their per-module Python; other models take the HF path, and decode_path says which and why.
Several prompts (--images_per_step) are left-padded and prefilled together; each row then has its
own position, the padding is masked, and the lean step keeps each prompt's keys and values once
for its n rows (SharedPrefix). Timings: scripts/bench.py.

    python -m pytest tests/test_sampling.py tests/test_batch.py -q
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

LEAN_TEXT_MODELS = ("qwen2_vl_text", "qwen2_5_vl_text")


@dataclass(frozen=True)
class Sampling:
    """How one role samples: what decode (and the vLLM engine) takes, and what the update reads
    its scoring temperature from. temperature 0 is greedy (argmax); top_k 0 and
    repetition_penalty 1 are off; top_p 1 is off. `lean`: use the lean decode step where
    decode_path allows it (False: always the HF layers; scripts/bench.py --decode hf)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    lean: bool = True

    def __post_init__(self):
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0
                and self.repetition_penalty > 0 and self.max_new_tokens >= 1):
            raise ValueError(f"invalid sampling settings: {self}")

    @property
    def greedy(self) -> bool:
        """One answer only, whatever n: every row of a prompt gets the same tokens."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def score_temperature(self) -> float:
        """The T of log_softmax(logits / T) that the sampler reports and the update scores:
        the sampling temperature (1 for greedy sampling, whose tempered softmax is degenerate)."""
        return self.temperature or 1.0

    def describe(self) -> str:
        return (f"temperature {self.temperature:g}, top_p {self.top_p:g}, top_k {self.top_k}"
                f"{' (off)' if self.top_k == 0 else ''}, repetition_penalty "
                f"{self.repetition_penalty:g}{' (off)' if self.repetition_penalty == 1 else ''}")


class Decoded(NamedTuple):
    """decode's result, one row per completion (n consecutive rows per prompt row)."""
    ids: torch.Tensor        # [rows * n, L] sampled ids; `pad` after a row's eos
    logprobs: torch.Tensor   # [rows * n, L] float32 log_softmax(logits / T)[sampled id], T =
                             # Sampling.score_temperature, over the whole vocabulary (before
                             # suppression, penalty, top-k and top-p): what the update scores
    entropy: torch.Tensor    # [rows * n, L] float32 entropy of that tempered softmax


def tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) in float32: the sampler's and the update's scoring distribution
    (TRL's GRPOTrainer and verl also divide by the sampling temperature)."""
    logits = logits.float()
    return F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)


@torch.no_grad()
def decode(core, head, inputs: dict, mm_kwargs: dict, n: int, sampling: Sampling, *,
           suppress=(), eos, pad: int, stop=None) -> Decoded:
    """n sampled completions per prompt row, as Decoded (ids, their tempered log-probs and the
    entropies), at most sampling.max_new_tokens long. `core` is the inner Qwen-VL model (vision +
    language), `head` the lm_head, `inputs` the processed prompts (one row, or several
    left-padded ones with their attention mask), `mm_kwargs` their vision inputs. Rows that ended
    keep emitting `pad`, as in HF; `stop` (a StoppingCriteria) is polled every token and ends the
    loop early when it fires. top_k and repetition_penalty act as in HF generate (see
    sampling_probs)."""
    max_new_tokens, temperature = sampling.max_new_tokens, sampling.score_temperature
    logits, step_logits, start = prefill(core, head, inputs, mm_kwargs, n, max_new_tokens,
                                         sampling.lean)
    device, rows = logits.device, logits.shape[0]
    eos = eos_tensor(eos, device)
    banned = torch.tensor(list(suppress), dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    seen = (prompt_ids_seen(inputs, n, logits.shape[-1], device)
            if sampling.repetition_penalty != 1.0 else None)
    tokens, logprobs, entropies = [], [], []
    for step in range(max_new_tokens):
        tok = sample_token(logits, sampling, banned, seen).masked_fill(done, pad)
        logp = tempered_logprobs(logits, temperature)
        logprobs.append(logp.gather(-1, tok[:, None]).squeeze(1))
        entropies.append(-(logp.exp() * logp).sum(-1))
        if seen is not None:
            seen[torch.arange(rows, device=device), tok] = True
        tokens.append(tok)
        done |= torch.isin(tok, eos)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if stop is not None and bool(stop(torch.stack(tokens, 1), None).any()):
            break
        logits = step_logits(tok, start + step)
    return Decoded(torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(entropies, 1))


def prefill(core, head, inputs: dict, mm_kwargs: dict, n: int, max_new_tokens: int,
            lean: bool = True):
    """Run the prompts once; return (first logits [rows * n, V], step(tokens, position) -> next
    logits, first position). Generated text continues from each prompt's largest (3-D rope)
    position, like HF's deltas: one int for one prompt; for several left-padded prompts one per
    row, with the padding masked for every later token, so a row's logits do not depend on its
    neighbours' lengths."""
    mask = inputs["attention_mask"]
    pos, _ = core.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                 image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    out = core(input_ids=inputs["input_ids"], attention_mask=mask,
               mm_token_type_ids=inputs["mm_token_type_ids"], position_ids=pos, **mm_kwargs,
               use_cache=True)
    step = _stepper(core.language_model, head, out.cache, mask.bool(), n, max_new_tokens, lean)
    start = (int(pos.max()) + 1 if mask.shape[0] == 1
             else (pos.amax(dim=(0, 2)) + 1).repeat_interleave(n))
    return head(out.last_hidden_state[:, -1]).repeat_interleave(n, 0), step, start


def prompt_ids_seen(inputs: dict, n: int, vocab: int, device=None) -> torch.Tensor:
    """[rows * n, V] bool on `device` (the logits'; default the prompt's): the ids of each row's
    prompt (its padding left out, so a row's penalty does not depend on its neighbours), n rows
    per prompt; generated ids are added as they come. HF's repetition penalty reads the same set
    from input_ids."""
    device = device or inputs["input_ids"].device
    ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device).bool()
    seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=device)
    row, col = mask.nonzero(as_tuple=True)
    seen[row, ids[row, col]] = True
    return seen.repeat_interleave(n, 0)


def eos_tensor(eos, device) -> torch.Tensor:
    """generation_config.eos_token_id (one id or a list) as a 1-D tensor for torch.isin."""
    return torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=device).reshape(-1)


def decode_path(lm, head, lean: bool = True) -> tuple[str, str]:
    """("lean", what it runs) or ("hf layers", why not lean): the decode step `decode` takes for
    this language model and lm_head with the active adapter, in eval mode as vlm.generate runs
    it, with Sampling.lean as given. Logged by train.py at start-up and printed by
    scripts/bench.py, so a slow path is never silent."""
    if not lean:
        return "hf layers", "switched off: Sampling.lean is False (--no_lean_decode; " \
                            "scripts/bench.py --decode hf)"
    layers = LeanDecoder._layers(lm, head, fold=False)
    if isinstance(layers, str):
        return "hf layers", layers
    weight, name = head.weight, lambda dtype: str(dtype).removeprefix("torch.")
    dtypes = {p[2].dtype for _, parts in layers for p in parts.values() if p[2] is not None}
    if not dtypes:
        lora = "no active LoRA adapter"
    elif dtypes == {weight.dtype}:
        folded = weight.dtype == torch.float32 and weight.device.type == "cpu"
        lora = f"{name(weight.dtype)} LoRA" + (", folded into the weights" if folded else "")
    else:
        lora = f"{'/'.join(sorted(map(name, dtypes)))} LoRA branch, added as peft does"
    devices = sorted({str(layer.input_layernorm.weight.device) for layer, _ in layers}
                     | {str(weight.device)})
    where = (weight.device.type if len(devices) == 1 else
             f"{' + '.join(devices)} (split by --device_map; the hidden state moves with the layers)")
    return "lean", f"{lm.config.model_type} in {name(weight.dtype)} on {where}, {lora}"


def _stepper(lm, head, cache, prompt_mask: torch.Tensor, n: int, max_new_tokens: int,
             lean: bool = True):
    """step(tokens [rows * n], position) -> next logits [rows * n, V], extending `cache` (of the
    prompts, `prompt_mask` [prompts, P] False on left padding) by one position. The lean step
    copies one prompt's keys and values to its n rows (KVBuffer) and keeps several prompts'
    once each (SharedPrefix); the HF layers get them repeated per row, masked when padded."""
    one = prompt_mask.shape[0] == 1
    lean = LeanDecoder.build(lm, head) if lean else None
    if lean is not None:
        if one:
            cache.batch_repeat_interleave(n)
            kv = [KVBuffer(layer.keys, layer.values, max_new_tokens) for layer in cache.layers]
        else:
            kv = [SharedPrefix(layer.keys, layer.values, prompt_mask, n, max_new_tokens)
                  for layer in cache.layers]
        return lambda tok, position: lean.step(tok, position, kv)
    cache.batch_repeat_interleave(n)
    mask = prompt_mask.long().repeat_interleave(n, 0)
    mask = None if one else torch.cat([mask, mask.new_ones(mask.shape[0], max_new_tokens)], 1)

    def hf_step(tok, position):
        # No image in new tokens: the language model alone, without the vision wrapper.
        ids = torch.as_tensor(position, device=tok.device).expand(3, tok.shape[0])[..., None]
        h = lm(input_ids=tok[:, None], position_ids=ids, cache=cache, use_cache=True,
               attention_mask=None if mask is None else mask[:, :cache.get_seq_length() + 1])
        return head(h.last_hidden_state[:, -1])
    return hf_step


def sample_token(logits: torch.Tensor, sampling: Sampling, suppress=(), seen=None) -> torch.Tensor:
    """One id per row from sampling_probs(...) (inverse-CDF: one uniform per row, where
    multinomial draws one per vocabulary entry); temperature 0: the argmax, drawing nothing."""
    if sampling.temperature == 0:
        return _processed_scores(logits, sampling.repetition_penalty, suppress, seen).argmax(-1)
    probs = sampling_probs(logits, sampling, suppress, seen)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def _processed_scores(logits, repetition_penalty: float, suppress, seen):
    """float32 logits with the suppressed ids at -inf and the repetition penalty applied on the
    ids in `seen` (a [n, V] bool mask of the row's prompt + generated ids; logit/p if > 0,
    logit*p if < 0), as HF's RepetitionPenaltyLogitsProcessor."""
    banned = torch.as_tensor(list(suppress) if isinstance(suppress, (list, tuple)) else suppress,
                             dtype=torch.long, device=logits.device)  # ids or a tensor
    scores = logits.float().index_fill(-1, banned, float("-inf"))
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    return scores


def sampling_probs(logits: torch.Tensor, sampling: Sampling, suppress=(), seen=None) -> torch.Tensor:
    """The distribution HF generate(do_sample=True) draws from, in HF's processor order
    (GenerationMixin._get_logits_processor): repetition penalty (see _processed_scores), then
    temperature, top-k (ties with the k-th kept), top-p (keep a token while the mass ranked above
    it is < top_p); temperature 0: all mass on the argmax. Suppressed ids (vision placeholders)
    never come out. The update scores the sampled token under log_softmax(logits / T)
    (tempered_logprobs), without the penalty and the truncations, as TRL does."""
    top_k, top_p = sampling.top_k, sampling.top_p
    scores = _processed_scores(logits, sampling.repetition_penalty, suppress, seen)
    if sampling.temperature == 0:
        return F.one_hot(scores.argmax(-1), scores.shape[-1]).float()
    scores = scores / sampling.temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1)
    if top_p < 1:
        ranked, order = probs.sort(-1, descending=True)
        ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, ranked)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# ---------------------------------------------------------------- the lean decode step
def _linear(module, fold: bool):
    """(weight, bias, lora_A, lora_B, scaling) of an nn.Linear or of a peft LoRA Linear with one
    active plain adapter (lora parts None when there is none), or a string saying why not.
    With `fold`, a float32 adapter on a float32 weight is folded into a transient copy of the
    weight: one matmul instead of three plus a scale and an add."""
    from peft.tuners.lora import LoraLayer
    if isinstance(module, torch.nn.Linear) and not isinstance(module, LoraLayer):
        return module.weight, module.bias, None, None, None
    if not isinstance(module, LoraLayer) or not isinstance(module.base_layer, torch.nn.Linear):
        return f"{type(module).__name__} is not a Linear or a peft LoRA Linear"
    base, names = module.base_layer, module.active_adapters
    if module.disable_adapters:
        return base.weight, base.bias, None, None, None
    if module.merged or len(names) != 1 or names[0] in module.lora_variant:
        return "a merged, multiple or variant (DoRA, ...) LoRA adapter"
    a, b = module.lora_A[names[0]], module.lora_B[names[0]]
    if a.bias is not None or b.bias is not None:
        return "a LoRA adapter with a bias"
    if a.weight.dtype != b.weight.dtype or (a.weight.dtype != base.weight.dtype and not getattr(
            module, "cast_input_dtype_enabled", True)):
        return "LoRA weights whose dtypes peft itself does not reconcile"
    scaling = module.scaling[names[0]]
    if fold and base.weight.dtype == a.weight.dtype == torch.float32:
        return torch.addmm(base.weight, b.weight, a.weight, alpha=scaling), base.bias, *[None] * 3
    return base.weight, base.bias, a.weight, b.weight, scaling


def _apply(x, parts):
    weight, bias, lora_a, lora_b, scaling = parts
    y = F.linear(x, weight, bias)
    if lora_a is None:
        return y
    # peft's LoRA Linear.forward (eval, so no dropout): x cast to the adapter's dtype, the branch
    # computed and scaled in it, added to the base result (a bfloat16 + float32 sum promotes to
    # float32), then the sum rounded to the base result's dtype. Same dtypes: the casts are no-ops.
    return (y + F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling).to(y.dtype)


def _rms(x, norm):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVBuffer:
    """One layer's keys and values in buffers sized for the whole completion: appending writes in
    place, where HF's cache concatenates (a new allocation and a full copy every token)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int):
        n, heads, self.length, dim = keys.shape
        self.keys = keys.new_empty(n, heads, self.length + extra, dim)
        self.values = values.new_empty(n, heads, self.length + extra, dim)
        self.keys[:, :, :self.length] = keys
        self.values[:, :, :self.length] = values

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one position; return views of everything stored so far."""
        self.keys[:, :, self.length] = k[:, :, 0]
        self.values[:, :, self.length] = v[:, :, 0]
        self.length += 1
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def attend(self, q, k, v, scale: float, gqa: bool) -> torch.Tensor:
        """Store this position's k, v; attention [n, heads, 1, d] of q over everything stored."""
        keys, values = self.append(k, v)
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=gqa)


class SharedPrefix:
    """One layer's keys and values for n rows per prompt (several left-padded prompts): each
    prompt's once, [prompts, kv heads, P, d], and each row's generated ones in a KVBuffer.
    Attention runs over the two parts and joins them in one softmax: the prompt part treats a
    prompt's n rows as extra queries, so its keys are read once per prompt, not once per row
    (decoding is memory-bound; the prompt is most of the cache)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prompt_mask: torch.Tensor,
                 n: int, extra: int):
        # float32 throughout (SDPA's accumulation type): 16-bit prompt keys are upcast once
        # here, a copy the size of one row's cache per prompt.
        self.keys, self.values, self.n = keys.float(), values.float(), n
        # additive mask over prompt keys: -inf on left padding, [prompts, 1, 1, P]
        self.bias = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=keys.device)
        padding = ~prompt_mask.to(keys.device)  # a split model's layers are on several devices
        self.bias = self.bias.masked_fill(padding, float("-inf"))[:, None, None]
        rows, (_, heads, _, dim) = keys.shape[0] * n, keys.shape
        self.generated = KVBuffer(keys.new_empty(rows, heads, 0, dim),
                                  values.new_empty(rows, heads, 0, dim), extra)

    def attend(self, q, k, v, scale: float, gqa: bool) -> torch.Tensor:
        rows, heads, _, d = q.shape
        prompts, kv = self.keys.shape[:2]
        n, g = self.n, heads // kv  # query head h reads key head h // g, as enable_gqa does
        keys, values = (x.float() for x in self.generated.append(k, v))
        qf = q.float().reshape(rows, kv, g, d)
        # [rows, kv, g, .] <-> [prompts, kv, n * g, .]: a prompt's rows as extra queries
        per_prompt = lambda x: x.reshape(prompts, n, kv, g, -1).transpose(1, 2).reshape(
            prompts, kv, n * g, -1)
        per_row = lambda x: x.reshape(prompts, kv, n, g, -1).transpose(1, 2).reshape(
            rows, kv, g, -1)
        sp = per_prompt(qf) @ self.keys.transpose(-1, -2) * scale + self.bias
        sg = qf @ keys.transpose(-1, -2) * scale
        top = torch.maximum(per_row(sp.amax(-1, keepdim=True)), sg.amax(-1, keepdim=True))
        ep, eg = (sp - per_prompt(top)).exp(), (sg - top).exp()
        total = per_row(ep.sum(-1, keepdim=True)) + eg.sum(-1, keepdim=True)
        out = (per_row(ep @ self.values) + eg @ values) / total
        return out.reshape(rows, heads, 1, d).to(q.dtype)


class LeanDecoder:
    """One decode step of a Qwen2(-VL) text stack as plain tensor ops, mirroring the HF layers
    op for op. New tokens are text, so the three M-RoPE axes share one position and the rotary
    angles are the 1-D ones. Built per generate call: it holds the live weights (LoRA included)."""

    def __init__(self, lm, head, layers):
        self.lm, self.head, self.layers = lm, head, layers

    @classmethod
    def build(cls, lm, head, fold: bool | None = None) -> "LeanDecoder | None":
        """None when the model is not one this class mirrors (decode_path says why) or is in
        training mode. `fold` (default: float32 on the CPU) folds float32 adapters into float32
        weights: ~7% of a CPU training step, for float32 rounding in the logits (~1e-6) and a
        copy of the adapted weights while sampling. Never in 16-bit, where rounding W + s*B@A to
        8 mantissa bits would wash a small adapter out: there the LoRA branch runs as peft runs
        it, in the adapter's dtype (float32 by default), and the logits stay bit-identical."""
        if lm.training:  # dropout in the LoRA branch
            return None
        layers = cls._layers(lm, head, head.weight.device.type == "cpu" if fold is None else fold)
        return None if isinstance(layers, str) else cls(lm, head, layers)

    @staticmethod
    def _layers(lm, head, fold: bool) -> "list | str":
        """[(layer, {projection: parts})], or why this model is not one the step mirrors."""
        cfg = lm.config
        if cfg.model_type not in LEAN_TEXT_MODELS:  # before reading attributes others may lack
            return f"model type {cfg.model_type!r} is not one of {', '.join(LEAN_TEXT_MODELS)}"
        attention = cfg._attn_implementation
        checks = (
            (cfg.hidden_act == "silu", f"activation {cfg.hidden_act!r} is not silu"),
            (attention == "sdpa", f"attention {attention!r}: sdpa's result is the one reproduced"),
            (not getattr(cfg, "use_sliding_window", False), "sliding-window attention"),
            (lm.rotary_emb.rope_type == "default", f"rope type {lm.rotary_emb.rope_type!r}"),
            (isinstance(head, torch.nn.Linear), f"lm_head is a {type(head).__name__}"),
            (not any(p.device.type == "meta" for p in (*lm.parameters(), head.weight)),
             "weights offloaded to the CPU or disk by --device_map auto (accelerate's hooks load "
             "them per call; the raw weights are placeholders)"))
        for ok, why in checks:
            if not ok:
                return why
        layers = []
        for i, layer in enumerate(lm.layers):
            parts = {name: _linear(getattr(layer.self_attn, name), fold)
                     for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
            parts.update({name: _linear(getattr(layer.mlp, name), fold)
                          for name in ("gate_proj", "up_proj", "down_proj")})
            for name, p in parts.items():
                if isinstance(p, str):
                    return f"layer {i} {name}: {p}"
            layers.append((layer, parts))
        return layers

    def step(self, tok: torch.Tensor, position, kv: list) -> torch.Tensor:
        """Next logits [n, V]; `position` an int, or a tensor [n] (one per row). On a model
        split over devices (--device_map auto) each layer runs on its weights' device: the hidden
        state and the rotary angles move there, as accelerate's hooks move them for the HF layers."""
        x = self.lm.embed_tokens(tok[:, None].to(self.lm.embed_tokens.weight.device))
        rotary = self.lm.rotary_emb
        inv_freq = rotary.inv_freq.to(device=x.device, dtype=torch.float)
        if isinstance(position, int):
            freqs = float(position) * inv_freq
        else:  # one position per row: angles [n, 1, 1, d/2] broadcast over heads
            freqs = (position.to(x.device, torch.float)[:, None] * inv_freq)[:, None, None]
        cos = (torch.cat((freqs.cos(), freqs.cos()), -1) * rotary.attention_scaling).to(x.dtype)
        sin = (torch.cat((freqs.sin(), freqs.sin()), -1) * rotary.attention_scaling).to(x.dtype)
        for (layer, parts), cache in zip(self.layers, kv):
            device = layer.input_layernorm.weight.device
            if x.device != device:
                x, cos, sin = x.to(device), cos.to(device), sin.to(device)
            x = x + self._attention(layer.self_attn, parts, _rms(x, layer.input_layernorm),
                                    cos, sin, cache)
            h = _rms(x, layer.post_attention_layernorm)
            x = x + _apply(F.silu(_apply(h, parts["gate_proj"])) * _apply(h, parts["up_proj"]),
                           parts["down_proj"])
        return self.head(_rms(x.to(self.lm.norm.weight.device), self.lm.norm))[:, -1]

    @staticmethod
    def _attention(attn, parts, h, cos, sin, cache):
        n, d = h.shape[0], attn.head_dim
        q, k, v = (_apply(h, parts[name]).view(n, 1, -1, d).transpose(1, 2)
                   for name in ("q_proj", "k_proj", "v_proj"))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = cache.attend(q, k, v, attn.scaling, attn.num_key_value_groups > 1)
        return _apply(out.transpose(1, 2).reshape(n, 1, -1), parts["o_proj"])
