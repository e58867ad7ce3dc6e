"""Model side of iReasoner: loading, LoRA adapters, prompts and their vision inputs, batched
sampling (the loop itself is sampling.py), step embeddings, and saving a role. Completion
log-probs and the KL are update.py's. Everything here takes token ids, never re-tokenized text.

    python -m pytest tests/test_vlm.py -q
"""
from __future__ import annotations

import copy
import logging
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText
from transformers.modeling_outputs import BaseModelOutputWithPooling

import runtime
import config
from sampling import Sampling, decode, eos_tensor

# peft (0.17 to 0.18) reads model.is_gradient_checkpointing when it wraps or loads an adapter,
# which transformers 5 deprecates with a FutureWarning on every command; the call is peft's to
# change, so only that one warning is silenced.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)

log = logging.getLogger("ireasoner")
ROLES = ("solver", "proposer")
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
DTYPES = {name: getattr(torch, name) for name in config.DTYPES}  # --dtype name -> torch dtype


@dataclass
class Policy:
    """One role. LoRA roles name an adapter on a (possibly shared) PeftModel; full-finetune
    roles own their model and keep a frozen copy as the reference."""
    role: str
    model: torch.nn.Module
    processor: object
    adapter: str | None = None
    ref_model: torch.nn.Module | None = None
    vision_trainable: bool = False

    def parameters(self) -> list[torch.nn.Parameter]:
        if self.adapter is None:
            return [p for p in self.model.parameters() if p.requires_grad]
        tag = f".{self.adapter}."
        return [p for n, p in self.model.named_parameters() if "lora_" in n and tag in n]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


@dataclass
class Prompt:
    """A processed (image, text) prompt: tensors made once per step and reused everywhere."""
    inputs: dict                       # input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw
    image_features: object | None      # precomputed vision output (None when the vision tower trains)

    @property
    def length(self) -> int:
        return self.inputs["input_ids"].shape[1]

    @property
    def images(self) -> int:
        """Prompt rows, one image each (several rows are left-padded to one length)."""
        return self.inputs["input_ids"].shape[0]


# ---------------------------------------------------------------- loading
def load_backbone(name: str, dtype: str, device_map: str, attn_implementation: str):
    """(model, processor), frozen; any failure is a one-line UserError (runtime.py)."""
    return runtime.load_backbone(name, DTYPES[dtype], device_map, attn_implementation)


def core_model(model):
    """The inner *Model (visual + language_model) under PEFT and *ForConditionalGeneration: what
    the prefill and the shared-prompt forwards call, below the lm_head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def lora_target_names(model, targets: list[str]) -> list[str]:
    """Full names of the Linear layers to adapt: language model only, never the vision tower."""
    found, names = set(), []
    for name, module in model.named_modules():
        parts = name.split(".")
        if "language_model" not in parts or "visual" in parts:
            continue
        if isinstance(module, torch.nn.Linear) and parts[-1] in targets:
            names.append(name)
            found.add(parts[-1])
    for missing in [t for t in targets if t not in found]:
        log.warning("LoRA target %r matches no language-model module; skipped", missing)
    if not names:
        raise ValueError(f"--lora_targets {','.join(targets)} match no language-model module")
    return names


def _lora_config(cfg, model):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_target_names(model, cfg.lora_targets_list),
                      bias="none", task_type="CAUSAL_LM")


def _full_finetune(role: str, model, processor, cfg) -> Policy:
    """Train the language model (and the vision tower if not frozen); reference = frozen copy."""
    ref = copy.deepcopy(model).eval()
    core = core_model(model)
    core.language_model.requires_grad_(True)
    model.get_output_embeddings().requires_grad_(True)
    if not cfg.freeze_vision:
        core.visual.requires_grad_(True)
    return Policy(role, model, processor, ref_model=ref, vision_trainable=not cfg.freeze_vision)


def build_policies(cfg) -> dict[str, Policy]:
    """Solver and proposer. Same model name + LoRA on both: one backbone, two named adapters."""
    from peft import get_peft_model
    names = {"solver": cfg.solver_model, "proposer": cfg.proposer_model}
    lora = {"solver": cfg.use_lora_solver, "proposer": cfg.use_lora_proposer}
    load = lambda n: load_backbone(n, cfg.dtype, cfg.device_map, cfg.attn_implementation)
    if all(lora.values()) and names["solver"] == names["proposer"]:
        base, processor = load(names["solver"])
        lora_config = _lora_config(cfg, base)
        peft = get_peft_model(base, copy.deepcopy(lora_config), adapter_name="solver")
        peft.add_adapter("proposer", lora_config)
        return {r: Policy(r, peft, processor, adapter=r) for r in ROLES}
    policies = {}
    for role in ROLES:
        base, processor = load(names[role])
        if lora[role]:
            peft = get_peft_model(base, _lora_config(cfg, base), adapter_name=role)
            policies[role] = Policy(role, peft, processor, adapter=role)
        else:
            policies[role] = _full_finetune(role, base, processor, cfg)
    return policies


@contextmanager
def acting(policy: Policy):
    """Make this role's adapter the active one (peft also marks only it trainable)."""
    if policy.adapter is not None:
        policy.model.set_adapter(policy.adapter)
    yield policy.model


def reference(policy: Policy):
    """The frozen base policy: adapters disabled (the `with` matters), or the frozen copy."""
    if policy.adapter is not None:
        return _disabled(policy.model)
    return nullcontext(policy.ref_model)


@contextmanager
def _disabled(model):
    with model.disable_adapter():
        yield model


# ---------------------------------------------------------------- prompts and generation
def chat_text(processor, text: str) -> str:
    """One user turn holding the image and `text`, through the model's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def make_prompt(policy: Policy, image, text: str, image_features=None) -> Prompt:
    """make_prompts for one (image, text): one unpadded prompt row."""
    return make_prompts(policy, [image], [text], image_features)


def make_prompts(policy: Policy, images: list, texts: list[str], image_features=None) -> Prompt:
    """One prompt row per (image, text), through the processor once: several rows are left-padded
    to one length (attention mask 0 on the padding; one row has none). The images are encoded in
    one vision call, unless the vision tower is trained."""
    chats = [chat_text(policy.processor, text) for text in texts]
    inputs = policy.processor(text=chats, images=images, padding=True, padding_side="left",
                              return_tensors="pt")
    inputs = {k: v.to(policy.device) for k, v in inputs.items()}
    if image_features is None and not policy.vision_trainable:
        image_features = encode_image(policy.model, inputs)
    return Prompt(inputs, image_features)


@torch.no_grad()
def encode_image(model, inputs) -> BaseModelOutputWithPooling:
    # LoRA lives in the language model only, so the vision output is the same for every
    # adapter, for the reference and for all N samples: compute it once per image.
    return core_model(model).get_image_features(inputs["pixel_values"],
                                                inputs["image_grid_thw"], return_dict=True)


def vision_inputs(prompt: Prompt, owner: list[int]) -> dict:
    """The model's vision inputs for rows that show images `owner` of the prompt (an image index
    per row, in row order: the model fills image tokens in row-major order). Precomputed
    features go in as a fresh output object per call (generate() rewrites its fields in place).
    Qwen3-VL's deepstack features are per image like pooler_output, so they are selected
    alongside; dropping them would silently change the logits (tests/test_families.py)."""
    grid = prompt.inputs["image_grid_thw"][owner]
    if prompt.image_features is None:
        patches = prompt.inputs["pixel_values"].split(
            prompt.inputs["image_grid_thw"].prod(-1).tolist())
        return {"pixel_values": torch.cat([patches[i] for i in owner]), "image_grid_thw": grid}
    feats = prompt.image_features
    extra = {}
    if getattr(feats, "deepstack_features", None) is not None:
        extra["deepstack_features"] = [tuple(layer[i] for i in owner)
                                       for layer in feats.deepstack_features]
    rows = type(feats)(pooler_output=tuple(feats.pooler_output[i] for i in owner), **extra)
    return {"mm_encoder_outputs": {"image": rows}, "image_grid_thw": grid}


def suppressed_ids(processor) -> list[int]:
    # A sampled vision placeholder would break the image-token count of the loss forward.
    tok = processor.tokenizer
    return [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS if t in tok.get_vocab()]


@dataclass
class Rollout:
    texts: list[str]          # decoded completions
    ids: torch.Tensor         # [n, L] sampled token ids (padded with pad_token_id)
    mask: torch.Tensor        # [n, L] 1 for real completion tokens (up to and incl. eos)
    logprobs: torch.Tensor | None = None  # [n, L] the sampler's tempered log-prob of each id
    entropy: torch.Tensor | None = None   # [n, L] entropy of the tempered softmax at each id
    ended: torch.Tensor | None = None     # [n] bool: the row has an eos (else it was clipped)

    def rows(self, part: slice) -> "Rollout":
        pick = lambda t: None if t is None else t[part]
        return Rollout(self.texts[part], self.ids[part], self.mask[part], pick(self.logprobs),
                       pick(self.entropy), pick(self.ended))


@torch.no_grad()
def generate(policy: Policy, prompt: Prompt, n: int, sampling: Sampling, *,
             stop=None) -> Rollout:
    """Sample n completions of each prompt row in one batched call (rows of one image are
    consecutive); return text, the sampled ids and the sampler's tempered log-probs. `sampling`
    is used as given (resolve_sampling makes it from the flags); `stop` is an optional
    StoppingCriteria (the trainer's signal flag), polled every token."""
    with acting(policy) as model:
        model.eval()
        eos = model.generation_config.eos_token_id
        # Our own loop (sampling.py): the prompt runs once, not n times, and the per-token
        # overhead is a fraction of HF generate's. HF's processors, in HF's order.
        mm = vision_inputs(prompt, list(range(prompt.images)))
        out = decode(core_model(model), model.get_output_embeddings(), prompt.inputs, mm, n, sampling,
                     suppress=suppressed_ids(policy.processor), eos=eos, pad=_pad_id(policy),
                     stop=stop)
    # On the prompts' device, which the update joins them to (a model split over devices
    # samples on its lm_head's).
    out = type(out)(*(t.to(policy.device) for t in out))
    mask = completion_mask(out.ids, eos)
    texts = policy.processor.tokenizer.batch_decode(out.ids * mask + _pad_id(policy) * (1 - mask),
                                                   skip_special_tokens=True)
    ended = torch.isin(out.ids, eos_tensor(eos, out.ids.device)).any(1)
    return Rollout(texts, out.ids, mask, out.logprobs, out.entropy, ended)


# What HF generate uses when neither the call nor the model's generation_config sets a value.
HF_DEFAULT_TOP_K, HF_DEFAULT_REPETITION_PENALTY = 50, 1.0
# generation_config.json fields that change what is sampled (logged at start, for information).
MODEL_SAMPLING_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def model_sampling_values(policy: Policy) -> dict:
    """What the model's generation_config.json sets among MODEL_SAMPLING_FIELDS (as loaded:
    transformers fills in none of them for a folder whose file omits them)."""
    gen = policy.model.generation_config
    return {name: getattr(gen, name) for name in MODEL_SAMPLING_FIELDS
            if getattr(gen, name, None) is not None}


def resolve_sampling(policy: Policy, args, max_new_tokens: int) -> tuple[Sampling, str]:
    """(the Sampling a role uses, where top_k and repetition_penalty came from). `args` is a
    Config or an infer/eval SampleArgs: temp, top_p, top_k, repetition_penalty,
    merge_generation_config (and lean_decode). Temperature and top-p are always the flags'.
    top_k / repetition_penalty: the flag when given; else off (0 / 1), the plain tempered
    softmax, whatever the model's generation_config.json says; with --merge_generation_config,
    the model's generation_config value, else HF's default (50 / 1.0): what the published code
    got from HF generate, which it passed only temperature and top_p."""
    model = model_sampling_values(policy)
    merge = getattr(args, "merge_generation_config", False)
    chosen, sources = [], []
    for name, off, hf_default in (("top_k", 0, HF_DEFAULT_TOP_K),
                                  ("repetition_penalty", 1.0, HF_DEFAULT_REPETITION_PENALTY)):
        given = getattr(args, name)
        if given is not None:
            chosen.append(given), sources.append(f"{name} {given:g} (flag)")
        elif not merge:
            chosen.append(off), sources.append(f"{name} {off:g} (off)")
        elif name in model:
            chosen.append(model[name]), sources.append(
                f"{name} {model[name]:g} (the model's generation_config, merged)")
        else:
            chosen.append(hf_default), sources.append(f"{name} {hf_default:g} (HF default, merged)")
    sampling = Sampling(temperature=args.temp, top_p=args.top_p, top_k=int(chosen[0]),
                        repetition_penalty=float(chosen[1]), max_new_tokens=max_new_tokens,
                        lean=getattr(args, "lean_decode", True))
    return sampling, ", ".join(sources)


def role_sampling(cfg, policy: Policy) -> Sampling:
    """The Sampling a training role uses: resolve_sampling with the role's token limit."""
    limit = cfg.max_new_tokens_solver if policy.role == "solver" else cfg.max_new_tokens_proposer
    return resolve_sampling(policy, cfg, limit)[0]


def greedy_warning(role: str, sampling: Sampling, n: int) -> str | None:
    """The warning for greedy sampling of n > 1 answers, or None."""
    if not sampling.greedy or n <= 1:
        return None
    why = "temperature 0" if sampling.temperature == 0 else "top_k 1"
    return (f"{role} samples greedily ({why}) with N={n}: all {n} answers to a question are the "
            f"same, so the rewards are constant (outcome and step reward 1, answer entropy 0, "
            f"zero advantage) and nothing is learnt; eval's maj@N equals acc. Use a temperature "
            f"> 0 and --top_k 0 (off) or a larger value")


def log_sampling(cfg, policies: dict) -> None:
    """The sampling settings in use, logged once at start, with the model's own
    generation_config values for information (used only with --merge_generation_config), and a
    warning for greedy sampling of N > 1 answers."""
    for role, policy in policies.items():
        sampling, source = resolve_sampling(policy, cfg, 1)
        log.info("%s sampling: temperature %g, top_p %g, %s", role, sampling.temperature,
                 sampling.top_p, source)
        model = model_sampling_values(policy)
        if model:
            log.info("%s: the model's generation_config.json sets %s (%s)", role,
                     ", ".join(f"{k} {v}" for k, v in model.items()),
                     "top_k and repetition_penalty merged: --merge_generation_config"
                     if cfg.merge_generation_config else
                     "for information, not used; --merge_generation_config takes its top_k and "
                     "repetition_penalty, as the published code did")
        n = cfg.num_solver_samples if role == "solver" else 1
        warning = greedy_warning(role, sampling, n)
        if warning:
            log.warning(warning)
    log.info("update: %s; proposer %s", cfg.update_mode,
             f"every {cfg.proposer_update_freq} steps" if cfg.proposer_update_freq else "never")


def _pad_id(policy: Policy) -> int:
    return policy.processor.tokenizer.pad_token_id


def completion_mask(ids: torch.Tensor, eos) -> torch.Tensor:
    """1 up to and including the first eos of each row, 0 after it."""
    is_eos = torch.isin(ids, eos_tensor(eos, ids.device)).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).long()


# ---------------------------------------------------------------- step embeddings
@torch.no_grad()
def embed_steps(policy: Policy, steps: list[str], kind: str, max_tokens: int) -> torch.Tensor:
    """L2-normalised embeddings [len(steps), d] of reasoning steps, in one batched call, from the
    frozen base: mean input-embedding vectors (the paper's) or mean last hidden state."""
    with reference(policy) as ref:
        dim = ref.get_input_embeddings().weight.shape[1]
        if not steps:
            return torch.zeros(0, dim)
        enc = policy.processor.tokenizer(steps, add_special_tokens=False, truncation=True,
                                         max_length=max_tokens, padding=True, padding_side="right",
                                         return_tensors="pt")
        ids, mask = enc["input_ids"].to(policy.device), enc["attention_mask"].to(policy.device)
        if kind == "input_embeddings":
            h = ref.get_input_embeddings()(ids)
        else:
            h = core_model(ref).language_model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.device, h.dtype)  # a split model ends on another device
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1)
    return F.normalize(mean.float(), dim=-1).cpu()


def step_embedder(policy: Policy, cfg):
    """The `embed(steps)` callable rewards.compute_rewards takes, as the Config asks for it."""
    return lambda steps: embed_steps(policy, steps, cfg.step_embedder, cfg.step_embed_max_tokens)


# ---------------------------------------------------------------- saving and loading
ADAPTER_FILE = "adapter_model.safetensors"


def save_policy(policy: Policy, path: str) -> None:
    """A standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors at its top
    level, loadable by PeftModel.from_pretrained: EvoLMM's lmms-eval `qwen2_5_vl_our` takes it as
    lora_path; upstream lmms-eval needs the merged export), or a full model."""
    if policy.adapter is None:
        policy.model.save_pretrained(path)
        policy.processor.save_pretrained(path)
        return
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    policy.model.peft_config[policy.adapter].save_pretrained(path)
    state = get_peft_model_state_dict(policy.model, adapter_name=policy.adapter)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              os.path.join(path, ADAPTER_FILE), metadata={"format": "pt"})


def load_policy(policy: Policy, path: str) -> None:
    """Load weights written by save_policy into this role (in place)."""
    if policy.adapter is None:
        loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=policy.model.dtype)
        policy.model.load_state_dict(loaded.state_dict())
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = load_file(os.path.join(path, ADAPTER_FILE), device=str(policy.device))
    result = set_peft_model_state_dict(policy.model, state, adapter_name=policy.adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{path}: adapter has keys this model lacks, e.g. {unexpected[0]}")


def image_sizing(processor, max_pixels: int) -> tuple[int, int, int]:
    """(min_pixels, max_pixels, factor) the processor accepts without resizing again.
    max_pixels 0: the processor's own limit, as the published code (which let the processor
    size images) had it; a positive value caps it."""
    ip = processor.image_processor
    size = ip.size or {}
    own = size.get("longest_edge") or getattr(ip, "max_pixels", None)
    if not max_pixels and not own:
        raise ValueError(f"{type(ip).__name__} names no max_pixels of its own: pass --max_pixels")
    upper = min(max_pixels, own) if max_pixels and own else (max_pixels or own)
    return size.get("shortest_edge", 56 * 56), upper, ip.patch_size * ip.merge_size
