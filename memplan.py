"""The memory plan: what one rank holds at its peak, from the model's config.json and the flags,
with no weights loaded. train.py logs it, chooses --update_micro_batch auto and automatic
gradient checkpointing from it, and refuses before loading when nothing fits a GPU's free memory.

    python run.py plan --solver_model Qwen/Qwen2.5-VL-7B-Instruct --use_lora_solver ...

The update's figures follow its code path op by op (update.py, peft's LoRA layers, the HF decoder
layer; docs/performance.md derives them): with the base frozen, autograd keeps only what a
gradient needs: each LoRA layer's float32 dropout output and mask, the RMSNorm inputs, the MLP's
three intermediate-wide tensors, sdpa's query, output and key/values repeated to all heads, and
over the vocabulary the log-softmax, its exp and the KL difference beside the reference's
log-probs. The CPU grid in tests/test_memplan.py and docs/performance.md checks it on real runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

GIB = 1024 ** 3
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
CUDA_CONTEXT = 1.0 * GIB   # CUDA context, cuBLAS workspaces and allocator slack per process
HEADROOM = 0.93            # the plan must fit in this share of the free memory (fragmentation)
TEMPLATE_TOKENS = 40       # chat template and vision markers around the prompt text
ENGINE_OVERHEAD = 2 * GIB  # a vLLM engine's activations, sampler and CUDA graphs


class PlanError(ValueError):
    """One line for the user: the config cannot be read, or nothing fits."""


# ---------------------------------------------------------------- the model's shapes
@dataclass
class Shapes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    vision_params: int
    pixels_per_token: int       # (patch * merge)^2 pixels make one image token
    processor_max_pixels: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def lm_params(self) -> int:
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def lora_dims(self, target: str) -> tuple[int, int] | None:
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i),
                "down_proj": (i, h)}.get(target)


def shipped_configs() -> dict[str, str]:
    """HF id -> shipped file (model_configs/, with the source of each in its "source")."""
    found = {}
    for name in sorted(os.listdir(CONFIG_DIR)):
        if name.endswith(".json"):
            with open(os.path.join(CONFIG_DIR, name)) as f:
                found[json.load(f)["hf_id"]] = os.path.join(CONFIG_DIR, name)
    return found


def read_model(name: str, download: bool = False) -> tuple[dict, dict]:
    """(config.json, preprocessor_config.json) of a local folder, a shipped config, or a hub
    id already in the local HF cache; `download`: else fetch those two small files (training
    does, as it downloads the model next)."""
    if os.path.isdir(name):
        return _read_json(name, "config.json"), _preprocessor(name)
    shipped = shipped_configs()
    if name in shipped:
        with open(shipped[name]) as f:
            data = json.load(f)
        return data["config"], data["preprocessor"]
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id: reported below like any unknown name
        path = None
    if not isinstance(path, str) and download:
        path = _fetch_config(name)
    if isinstance(path, str):
        folder = os.path.dirname(path)
        return _read_json(folder, "config.json"), _preprocessor(folder)
    raise PlanError(f"no config.json for {name}: give a local model folder or one of the shipped "
                    f"configs ({', '.join(shipped)})")


def _preprocessor(folder: str) -> dict:
    """The image processor's settings: preprocessor_config.json (hub layout), else the
    image_processor part of transformers 5's processor_config.json."""
    pre = _read_json(folder, "preprocessor_config.json", required=False)
    return pre or _read_json(folder, "processor_config.json", required=False).get(
        "image_processor", {})


def _fetch_config(name: str) -> str | None:
    try:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(name, "config.json")
        hf_hub_download(name, "preprocessor_config.json")
        return path
    except Exception:  # unreachable hub, unknown id: reported as no config.json
        return None


def _read_json(folder: str, name: str, required: bool = True) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        if required:
            raise PlanError(f"{folder} has no {name}")
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read {path}: {e}") from None


def shapes_of(config: dict, preprocessor: dict) -> Shapes:
    text = config.get("text_config") or config
    vision = config.get("vision_config") or {}
    get = lambda key: text.get(key, config.get(key))
    try:
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        shapes = Shapes(
            hidden=hidden, layers=int(get("num_hidden_layers")), heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate=int(get("intermediate_size")), vocab=int(get("vocab_size")),
            tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_params=_vision_params(vision, config.get("model_type", "")),
            pixels_per_token=(int(vision.get("patch_size", 14))
                              * int(vision.get("spatial_merge_size", 2))) ** 2,
            processor_max_pixels=_processor_max_pixels(preprocessor))
    except (TypeError, ValueError) as e:
        raise PlanError(f"config.json lacks a field the plan needs ({e})") from None
    return shapes


def _vision_params(v: dict, model_type: str) -> int:
    """The vision tower's parameter count (Qwen2-VL, Qwen2.5-VL and Qwen3-VL layouts)."""
    if not v:
        return 0
    hv = int(v.get("hidden_size") if model_type != "qwen2_vl" else v.get("embed_dim", 1280))
    iv = int(v.get("intermediate_size") or hv * v.get("mlp_ratio", 4))
    p, t, m = int(v.get("patch_size", 14)), int(v.get("temporal_patch_size", 2)), \
        int(v.get("spatial_merge_size", 2))
    out = int(v.get("out_hidden_size") or v.get("hidden_size", hv))
    gated = model_type == "qwen2_5_vl"
    block = 2 * hv + 3 * hv * hv + 3 * hv + hv * hv + hv + (3 if gated else 2) * hv * iv + 2 * iv
    merger = hv + (hv * m * m) ** 2 + hv * m * m + hv * m * m * out + out
    mergers = 1 + len(v.get("deepstack_visual_indexes", []))
    pos = int(v.get("num_position_embeddings", 0)) * hv
    return int(v.get("depth", 32)) * block + mergers * merger + 3 * t * p * p * hv + pos


def _processor_max_pixels(pre: dict) -> int:
    size = pre.get("size") or {}
    return int(pre.get("max_pixels") or size.get("longest_edge") or 12845056)


# ---------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Bytes per rank. fixed: held all run long; sampling and update: the peaks of the two
    phases on top of it (they never overlap); vllm: the engine's share (weights + KV cache)."""
    weights: int
    adapters: int               # trainable parameters, their AdamW state and the largest grads
    context: int
    sampling_kv: int
    update_activations: int
    update_logits: int
    vllm: int
    image_tokens: int
    prompt_tokens: int
    micro_batch: int            # completions per update chunk (resolved)
    checkpointing: bool
    vllm_sleeps: bool = False   # the engine sleeps (level 1) through the update

    @property
    def fixed(self) -> int:
        return self.weights + self.adapters + self.context

    @property
    def update(self) -> int:
        return self.update_activations + self.update_logits

    @property
    def peak(self) -> int:
        if self.vllm_sleeps:
            return self.fixed + max(self.vllm + self.sampling_kv, self.update)
        return self.fixed + self.vllm + max(self.sampling_kv, self.update)


def image_tokens(cfg, shapes: Shapes) -> int:
    cap = min(cfg.max_pixels, shapes.processor_max_pixels) if cfg.max_pixels \
        else shapes.processor_max_pixels
    return max(cap // shapes.pixels_per_token, 1)


def prompt_tokens(cfg, shapes: Shapes, images: int | None = None) -> int:
    """The Solver prompt's length: the image, the prompt text (~3 characters a token, on the
    safe side) and the longest question the Proposer may write."""
    images = image_tokens(cfg, shapes) if images is None else images
    return images + len(cfg.solver_prompt_text) // 3 + cfg.max_new_tokens_proposer + \
        TEMPLATE_TOKENS


def weight_bytes(cfg, shapes: Shapes) -> tuple[int, int]:
    """(frozen and trained weights, adapters + gradients + AdamW state)."""
    s = DTYPE_BYTES[cfg.dtype]
    total = shapes.lm_params() + shapes.vision_params
    lora = {"solver": cfg.use_lora_solver, "proposer": cfg.use_lora_proposer}
    shared = all(lora.values()) and cfg.solver_model == cfg.proposer_model
    weights, trained, grads = (total * s if shared else 0), 0, []
    for role in ("solver", "proposer"):
        if not shared:
            weights += total * s * (1 if lora[role] else 2)  # full fine-tuning: + frozen copy
        if lora[role]:
            # peft keeps 16-bit models' adapters in float32: params, grads and AdamW's 2 states.
            n = lora_params(cfg, shapes)
            trained += n * 4 * 3
            grads.append(n * 4)
        else:
            n = shapes.lm_params() + (0 if cfg.freeze_vision else shapes.vision_params)
            trained += n * s * 2
            grads.append(n * s)
    return weights, trained + max(grads)


def lora_params(cfg, shapes: Shapes) -> int:
    dims = [shapes.lora_dims(t) for t in cfg.lora_targets_list]
    return shapes.layers * sum(cfg.lora_r * (i + o) for i, o in filter(None, dims))


def _lora_inputs(cfg, shapes: Shapes) -> tuple[int, int]:
    """(sum of the adapted layers' input widths, their count), per decoder layer."""
    dims = [d for d in (shapes.lora_dims(t) for t in cfg.lora_targets_list) if d]
    return sum(i for i, _ in dims), len(dims)


def token_bytes(cfg, shapes: Shapes) -> int:
    """Bytes one token position leaves saved for backward in one decoder layer (attention's
    keys/values over the whole sequence counted apart)."""
    s, h, i, q = DTYPE_BYTES[cfg.dtype], shapes.hidden, shapes.intermediate, shapes.q_dim
    inputs, count = _lora_inputs(cfg, shapes) if _trains_lora(cfg) else (0, 0)
    drop = 5 if cfg.lora_dropout > 0 else 4   # float32 dropout output (+ its 1-byte mask)
    lora = drop * inputs + 4 * cfg.lora_r * count
    norms = 2 * 4 * h                          # RMSNorm keeps its input in float32
    attention = 2 * s * q                      # sdpa's query and output
    mlp = 3 * s * i                            # act(gate) input, its output and up
    if not _trains_lora(cfg):                  # full fine-tuning: every linear keeps its input
        lora = s * (2 * h + q + i)
    return lora + norms + attention + mlp


def _trains_lora(cfg) -> bool:
    return cfg.use_lora_solver


def update_bytes(cfg, shapes: Shapes, P: int, chunk: int, checkpointing: bool) -> tuple[int, int]:
    """(activations, vocabulary-sized tensors) of one update chunk of `chunk` completions of
    max_new_tokens_solver tokens each, prompt length P."""
    s, layers, L = DTYPE_BYTES[cfg.dtype], shapes.layers, cfg.max_new_tokens_solver
    N, B = cfg.num_solver_samples, cfg.images_per_step
    rows = min(chunk, B * N)
    images = min(B, -(-rows // N) + (1 if rows % N and N % rows else 0))
    per_tok, kv_rep = token_bytes(cfg, shapes), 2 * s * shapes.q_dim
    # The backward of one layer holds gradients of its MLP-wide and hidden-wide tensors.
    backward = 2 * s * (shapes.intermediate + shapes.hidden)
    if checkpointing:  # one joint forward of rows * (P + L) positions, no shared prompt
        T = rows * (P + L)
        act = (layers * T * s * shapes.hidden                  # each layer's saved input
               + T * (per_tok + kv_rep + backward)             # one layer recomputed, its grads
               + rows * (P + L) ** 2)                          # the boolean 4-D mask
    else:  # the prompts once with the cache, then the completions against it (update.py)
        T = images * P + rows * L
        act = layers * (T * per_tok + images * P * kv_rep
                        + rows * (P + L) * (kv_rep + 2 * s * shapes.kv_dim)) \
            + rows * L * (P + L) + T * backward
    vocab = rows * L * shapes.vocab * (s + 4 * 7)  # logits, ref, log-softmax, exp, diff, grads
    return act, vocab


def sampling_bytes(cfg, shapes: Shapes, P: int) -> int:
    """The Solver's batched sampling: the KV cache of B*N rows at full length, the no-grad
    prefill of the B prompts, and a step's float32 logits."""
    s, rows = DTYPE_BYTES[cfg.dtype], cfg.images_per_step * cfg.num_solver_samples
    kv = shapes.layers * rows * (P + cfg.max_new_tokens_solver) * 2 * s * shapes.kv_dim
    prefill = cfg.images_per_step * P * s * (4 * shapes.hidden + 3 * shapes.intermediate)
    return kv + prefill + rows * shapes.vocab * 4 * 4


def micro_batch_options(cfg) -> list[int]:
    """Chunk sizes auto may pick, largest first: whole images, then part of one image."""
    B, N = cfg.images_per_step, cfg.num_solver_samples
    return [b * N for b in range(B, 0, -1)] + list(range(N - 1, 0, -1))


def make_plan(cfg, shapes: Shapes, micro_batch: int, checkpointing: bool, device: str = "cuda",
              vllm_bytes: int = 0, images: int | None = None, vllm_sleeps: bool = False) -> Plan:
    images = image_tokens(cfg, shapes) if images is None else images
    P = prompt_tokens(cfg, shapes, images)
    weights, adapters = weight_bytes(cfg, shapes)
    chunk = micro_batch or cfg.images_per_step * cfg.num_solver_samples
    act, vocab = update_bytes(cfg, shapes, P, chunk, checkpointing)
    return Plan(weights=weights, adapters=adapters,
                context=CUDA_CONTEXT if device.startswith("cuda") else 0,
                sampling_kv=0 if cfg.rollout_engine == "vllm" else sampling_bytes(cfg, shapes, P),
                update_activations=act, update_logits=vocab, vllm=vllm_bytes,
                image_tokens=images, prompt_tokens=P, micro_batch=chunk,
                checkpointing=checkpointing, vllm_sleeps=vllm_sleeps)


def vllm_weight_bytes(cfg, shapes: Shapes) -> int:
    """The engine's own copy of the base and its two adapters, and its activations and CUDA
    graphs (ENGINE_OVERHEAD)."""
    s = DTYPE_BYTES[cfg.dtype]
    return ((shapes.lm_params() + shapes.vision_params) * s + 2 * lora_params(cfg, shapes) * s
            + ENGINE_OVERHEAD)


def vllm_min_bytes(cfg, shapes: Shapes, P: int) -> int:
    """The engine's weights and the KV cache one step's B*N rows need at full length (with
    prefix caching the N samples share the prompt's blocks; counted whole, on the safe side)."""
    s = DTYPE_BYTES[cfg.dtype]
    kv = shapes.layers * cfg.images_per_step * cfg.num_solver_samples * \
        (P + cfg.max_new_tokens_solver) * 2 * s * shapes.kv_dim
    return vllm_weight_bytes(cfg, shapes) + kv


def fmt(b: int) -> str:
    return f"{b / GIB:.1f} GiB"

