"""vLLM as the rollout engine (--rollout_engine vllm): one in-process engine per rank, on the rank's
own device, serving the frozen base once and the Proposer and Solver adapters as two LoRAs of it.

The trainer keeps its own peft copy for the update; after every update of a role, its adapter is
written to a fresh folder and loaded under a NEW LoRA id, and the old id is removed (vLLM caches an
adapter by id: re-using one silently keeps the old weights). Sampling is the HF path's (n,
temperature, top-p, top-k, repetition penalty, max tokens, the model's eos ids, vision
placeholders suppressed); the sampled ids are used as they are, never re-tokenized, with the
engine's log-prob of each one, which update.py compares with its own forward
(<role>_logprob_diff) and may weight by (--rollout_is_cap). Each request's seed comes from the run
seed, the step, the rank, the image and the role, so a resumed run samples what an unbroken one
would. Install: docs/vllm.md (CPU tests: scripts/install_vllm.sh).

    bash scripts/install_vllm.sh && python -m pytest tests/test_vllm.py  # via .compat/vllm's python
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import shutil
import tempfile

import torch

from distributed import TrainingError, UserError
from runtime import rng_state, set_rng_state
from sampling import Sampling
from vlm import Policy, Prompt, Rollout, chat_text, completion_mask, save_policy, suppressed_ids

log = logging.getLogger("ireasoner")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
SUPPRESS_BIAS = -100.0  # vLLM clamps logit_bias to [-100, 100]: e^-100 is never sampled
# The engine reports log-probs of its raw logits (before top-k/top-p, penalties and the bias), and
# start() has them divided by the sampling temperature T in the model itself: log_softmax(logits /
# T) over the whole vocabulary, what our sampler reports and update.py scores.
LOGPROBS_MODE = "raw_logprobs"
# The vLLM releases this file is written against (docs/vllm.md): the engine drives LLM.enqueue and
# LLMEngine.step itself and sets attributes of vLLM's layers, none of it a stable API.
VLLM_SERIES = ("0.32",)
# What it calls, as (module, attribute path): a release that lacks one is refused at start-up.
VLLM_API = (("vllm", "LLM.enqueue"), ("vllm", "LLM.apply_model"), ("vllm", "SamplingParams"),
            ("vllm.v1.engine.llm_engine", "LLMEngine.add_lora"),
            ("vllm.v1.engine.llm_engine", "LLMEngine.remove_lora"),
            ("vllm.v1.engine.llm_engine", "LLMEngine.abort_request"),
            ("vllm.v1.engine.llm_engine", "LLMEngine.step"),
            ("vllm.v1.engine.llm_engine", "LLMEngine.has_unfinished_requests"),
            ("vllm.lora.request", "LoRARequest"),
            ("vllm.model_executor.layers.logits_processor", "LogitsProcessor"),
            ("vllm.distributed.parallel_state", "destroy_model_parallel"),
            ("vllm.distributed.parallel_state", "destroy_distributed_environment"))


def check_vllm() -> str:
    """The installed vLLM's version, after checking that it is a release this file is written
    against and has every call it makes; otherwise one line naming the installed and the
    supported versions (UserError)."""
    import vllm
    version = getattr(vllm, "__version__", "(unknown)")
    supported = " or ".join(f"{s}.x" for s in VLLM_SERIES)
    if ".".join(version.split(".")[:2]) not in VLLM_SERIES:
        raise UserError(f"vLLM {version} is installed, but --rollout_engine vllm is written "
                        f"against vLLM {supported}; install that (docs/vllm.md)")
    for module, path in VLLM_API:
        try:
            obj = importlib.import_module(module)
            for name in path.split("."):
                obj = getattr(obj, name)
        except (ImportError, AttributeError):
            raise UserError(f"vLLM {version} has no {module}.{path}, which --rollout_engine vllm "
                            f"calls (supported: vLLM {supported}; docs/vllm.md)") from None
        if (path == "LLMEngine.abort_request"
                and "internal" not in inspect.signature(obj).parameters):
            raise UserError(f"vLLM {version}: {module}.{path} takes no `internal` argument, which "
                            f"--rollout_engine vllm passes (supported: vLLM {supported})")
    return version


def request_seed(seed: int, step: int, rank: int, image: int, role: str) -> int:
    """A request's sampling seed from the run seed, step, rank, image (its index in the step) and
    role; vLLM gives the n samples of a request seed + i."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}/{image}/{role}".encode()).digest()
    return int.from_bytes(digest[:6], "big")  # well below 2**63 - n


def _lora_rank(r: int) -> int:
    bigger = [x for x in LORA_RANKS if x >= r]
    if not bigger:
        raise UserError(f"--lora_r {r} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
    return bigger[0]


def max_model_len(cfg, policy: Policy, max_pixels: int, factor: int) -> int:
    """Longest prompt + completion a step can have: the largest image's tokens, the longer prompt
    text (the Solver's holds a question of up to max_new_tokens_proposer tokens), the longer
    completion; capped at the model's own limit."""
    from data_and_utils import proposer_prompt, solver_prompt
    tok = policy.processor.tokenizer
    texts = [chat_text(policy.processor, proposer_prompt(cfg.proposer_prompt_text)),
             chat_text(policy.processor, solver_prompt("", cfg.solver_prompt_text))]
    text = max(len(tok(t)["input_ids"]) for t in texts) + cfg.max_new_tokens_proposer + 16
    need = max_pixels // (factor * factor) + text + max(cfg.max_new_tokens_solver,
                                                         cfg.max_new_tokens_proposer)
    config = policy.model.config
    limit = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    return min(need, limit) if limit else need


class VLLMEngine:
    """The rollout engine of one rank. start() builds it; generate() samples like vlm.generate;
    sync() serves a role's current adapter; close() frees it."""

    def __init__(self, llm, workdir: str, owns_process_group: bool, temperature: float,
                 prefix_caching: bool = False, sleeps: bool = False):
        self.llm, self.workdir, self.temperature = llm, workdir, temperature
        self.prefix_caching, self.sleeps = prefix_caching, sleeps
        self.owns_process_group = owns_process_group  # one process: vLLM made the default group
        self.loras: dict = {}      # role -> the LoRARequest being served
        self.versions: dict = {}   # role -> how many times it was synced
        self.next_id = 1

    # ------------------------------------------------------------ adapters
    def sync(self, role: str, policy: Policy) -> None:
        """Serve this role's current adapter: saved to a new folder, loaded under a new LoRA id,
        the old id removed (and its folder deleted) first, so at most two are ever loaded."""
        from vllm.lora.request import LoRARequest
        self.versions[role] = self.versions.get(role, 0) + 1
        path = os.path.join(self.workdir, f"{role}-{self.versions[role]}")
        save_policy(policy, path)
        old = self.loras.pop(role, None)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        request = LoRARequest(f"{role}-{self.versions[role]}", self.next_id, path)
        self.next_id += 1
        if not self.llm.llm_engine.add_lora(request):
            raise TrainingError(f"vLLM refused the {role} adapter {path}")
        self.loras[role] = request

    # ------------------------------------------------------------ sampling
    def generate(self, policy: Policy, prompt: Prompt, texts: list[str], images: list, n: int,
                 sampling: Sampling, *, stop=None, seeds: list[int] | None = None) -> Rollout:
        """vlm.generate's Rollout (n consecutive rows per image, ids padded with pad_token_id)
        for prompt rows `texts` (the user text of each, before the chat template) with their
        `images`: the engine's log_softmax(logits / T) of every sampled id (0 on padding), as our
        sampler reports it; no entropies. `stop` is polled between engine steps; when it fires
        the requests are aborted and an empty rollout comes back (the trainer then abandons the
        step)."""
        from vllm import SamplingParams
        if sampling.score_temperature != self.temperature:
            raise TrainingError(f"the vLLM engine scores at temperature {self.temperature}, "
                                f"not {sampling.score_temperature}")
        eos = policy.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        bias = {i: SUPPRESS_BIAS for i in suppressed_ids(policy.processor)}
        seeds = seeds or [None] * len(texts)
        # The engine's logits are already divided by T (see start): vLLM samples them at 1.
        params = [SamplingParams(n=n, temperature=1.0 if sampling.temperature else 0.0,
                                 top_p=sampling.top_p, top_k=sampling.top_k,
                                 repetition_penalty=sampling.repetition_penalty,
                                 max_tokens=sampling.max_new_tokens, stop_token_ids=eos,
                                 logprobs=0, logit_bias=bias, seed=seed, detokenize=False)
                  for seed in seeds]
        # Hits only among this call's requests (its N samples share one prefill): what is
        # sampled never depends on earlier steps, so a resumed run samples what an unbroken one
        # does.
        if self.prefix_caching and not self.llm.reset_prefix_cache():
            raise TrainingError("vLLM could not reset its prefix cache before a generate")
        chats = [chat_text(policy.processor, text) for text in texts]
        requests = [{"prompt": chat, "multi_modal_data": {"image": image}}
                    for chat, image in zip(chats, images)]
        saved = rng_state()
        try:
            ids = self.llm.enqueue(requests, params, lora_request=self.loras[policy.role],
                                   use_tqdm=False)
            done = self._run(ids, stop)
        finally:
            set_rng_state(saved)  # sampling is seeded per request: the trainer's RNG is its own
        pad = policy.processor.tokenizer.pad_token_id
        if done is None:
            rows = len(texts) * n
            return Rollout([""] * rows, torch.full((rows, 1), pad), torch.zeros(rows, 1).long(),
                           torch.zeros(rows, 1), None, torch.zeros(rows, dtype=torch.bool))
        self._check_prompts(done, prompt)
        samples = [c for out in done for c in sorted(out.outputs, key=lambda c: c.index)]
        length = max(1, max(len(c.token_ids) for c in samples))
        tokens = torch.full((len(samples), length), pad, dtype=torch.long)
        logprobs = torch.zeros(len(samples), length)
        for row, c in enumerate(samples):
            tokens[row, :len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            logprobs[row, :len(c.token_ids)] = torch.tensor(
                [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
        mask = completion_mask(tokens, eos)
        texts_out = policy.processor.tokenizer.batch_decode(tokens * mask + pad * (1 - mask),
                                                           skip_special_tokens=True)
        device = policy.device
        ended = torch.isin(tokens, torch.tensor(eos)).any(1)
        return Rollout(texts_out, tokens.to(device), mask.to(device),
                       (logprobs * mask).to(device), None, ended.to(device))

    def _run(self, ids: list[str], stop) -> list | None:
        """Step the engine until these requests finish (in request order), or abort them when
        `stop` fires (None then)."""
        engine, finished = self.llm.llm_engine, []
        while engine.has_unfinished_requests():
            if stop is not None and stop.signum:
                engine.abort_request(ids, internal=True)  # enqueue returns internal ids
                while engine.has_unfinished_requests():
                    engine.step()
                return None
            finished += [out for out in engine.step() if out.finished]
        if len(finished) != len(ids):
            raise TrainingError(f"vLLM finished {len(finished)} of {len(ids)} requests")
        return sorted(finished, key=lambda out: int(out.request_id))  # as LLM.generate orders

    @staticmethod
    def _check_prompts(outputs: list, prompt: Prompt) -> None:
        """The engine must have seen the token ids the update scores (its own chat template and
        image expansion could differ): compared row by row, padding left out."""
        rows = prompt.inputs["input_ids"].cpu()
        mask = prompt.inputs["attention_mask"].cpu().bool()
        for b, out in enumerate(outputs):
            ours = rows[b][mask[b]].tolist()
            if list(out.prompt_token_ids) != ours:
                raise TrainingError(f"vLLM tokenized prompt {b} differently from the trainer "
                                    f"({len(out.prompt_token_ids)} vs {len(ours)} tokens)")

    # ------------------------------------------------------------ memory around the update
    def sleep(self) -> None:
        """Level 1 where supported (GPUs): weights to CPU memory, KV cache dropped, for the
        update's activations; wake() brings them back before the adapters are synced."""
        if self.sleeps:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.sleeps:
            self.llm.wake_up()

    def close(self) -> None:
        """Shut the engine down and leave torch.distributed as it was found."""
        from vllm.distributed import parallel_state as ps
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            ps.destroy_model_parallel()
            if self.owns_process_group:  # so it goes too
                ps.destroy_distributed_environment()
            elif ps._WORLD is not None:  # torchrun's group is the trainer's: only vLLM's part
                ps._WORLD.destroy()
                ps._WORLD = None
            self.llm = None
            shutil.rmtree(self.workdir, ignore_errors=True)


def _scale_logits(model, scale: float) -> int:
    """Multiply the model's logits by `scale` (1/T) in its logits processor, the one every LoRA
    wrapper delegates to. Penalties commute with the scale and top-k/top-p come after it, so
    vLLM sampling these at temperature 1 samples HF's distribution at T, and its raw log-probs
    are log_softmax(logits / T). Returns how many processors were set."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    # isinstance: LogitsProcessor is a PluggableLayer, which a platform or plugin may subclass.
    found = [m for m in model.modules() if isinstance(m, LogitsProcessor)]
    for m in found:
        m.scale = scale
    return len(found)


def sleep_supported() -> bool:
    """vLLM's sleep mode needs a GPU platform it supports (CUDA, ROCm, XPU); checked at start."""
    if not torch.cuda.is_available():
        return False
    from vllm.platforms import current_platform
    return current_platform.is_sleep_mode_available()


def memory_args(cfg, sleeps: bool) -> dict:
    """The engine's GPU memory: --vllm_gpu_memory_utilization if given, else the KV cache the
    memory plan leaves free (memfit.plan_run sets cfg.vllm_kv_cache_bytes); the CPU sizes its
    cache from VLLM_CPU_KVCACHE_SPACE."""
    kw = {"enable_sleep_mode": sleeps} if sleeps else {}
    if cfg.vllm_gpu_memory_utilization:
        return {**kw, "gpu_memory_utilization": cfg.vllm_gpu_memory_utilization}
    if torch.cuda.is_available():
        if not getattr(cfg, "vllm_kv_cache_bytes", 0):
            raise UserError("no memory plan gave the vLLM engine its KV cache: pass "
                            "--vllm_gpu_memory_utilization")
        return {**kw, "kv_cache_memory_bytes": int(cfg.vllm_kv_cache_bytes)}
    return kw


def start(cfg, policies: dict, dist, max_pixels: int, factor: int) -> VLLMEngine:
    """The rank's engine, serving both roles' current adapters. Restores what an in-process vLLM
    worker changes process-wide: the global RNG state (it seeds every generator) and
    torch.set_num_threads (a CPU worker makes it a no-op)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process, so adapters sync fast
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.vllm_cpu_kv_cache_gib)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        from vllm import LLM
    except ImportError as e:
        raise UserError(f"--rollout_engine vllm needs vLLM ({e}); see docs/vllm.md") from None
    log.info("vLLM %s", check_vllm())
    solver = policies["solver"]
    length = max_model_len(cfg, solver, max_pixels, factor)
    # A prompt prefilled in chunks discards the tokens sampled for its first chunks, and rewinds
    # the request's generator to do so: a CPU generator cannot ("CPU Generator does not use
    # offset", vllm-cpu 0.32.0, any seeded request). So on the CPU whole prompts only.
    chunked = torch.cuda.is_available()
    sleeps = sleep_supported()
    saved_rng, set_threads = rng_state(), torch.set_num_threads
    owned = not torch.distributed.is_initialized()
    try:
        llm = LLM(model=cfg.solver_model, tokenizer=cfg.solver_model, dtype=cfg.dtype,
                  seed=cfg.seed, enable_lora=True, max_loras=2, max_cpu_loras=3,
                  max_lora_rank=_lora_rank(cfg.lora_r),
                  max_model_len=length, enable_chunked_prefill=chunked,
                  max_num_batched_tokens=None if chunked else max(length, 8192),
                  max_num_seqs=max(cfg.images_per_step * cfg.num_solver_samples, 2),
                  limit_mm_per_prompt={"image": 1, "video": 0},
                  **memory_args(cfg, sleeps),
                  enforce_eager=cfg.vllm_enforce_eager or not torch.cuda.is_available(),
                  enable_prefix_caching=cfg.vllm_prefix_caching,  # reset at every generate
                  logprobs_mode=LOGPROBS_MODE, max_logprobs=0,
                  distributed_executor_backend="uni" if dist.world == 1 else "external_launcher")
    except (OSError, ValueError, RuntimeError) as e:
        log.debug("vLLM did not start", exc_info=True)
        raise UserError(f"vLLM cannot serve {cfg.solver_model}: {str(e).splitlines()[0]}") from e
    finally:
        torch.set_num_threads = set_threads
        set_rng_state(saved_rng)
    temperature = Sampling(temperature=cfg.temp).score_temperature
    scaled = llm.apply_model(lambda model: _scale_logits(model, 1.0 / temperature))
    if not all(scaled):
        raise TrainingError("found no logits processor to divide by the temperature in the "
                            "vLLM model")
    engine = VLLMEngine(llm, tempfile.mkdtemp(prefix="ireasoner-vllm-"), owned and dist.world == 1,
                        temperature, prefix_caching=cfg.vllm_prefix_caching, sleeps=sleeps)
    if dist.is_main:
        log.info("vLLM: prefix caching %s, sleep mode (level 1 around the update) %s",
                 "on" if cfg.vllm_prefix_caching else "off",
                 "on" if sleeps else
                 "unsupported here" if torch.cuda.is_available() else "off (CPU)")
    for role in ("solver", "proposer"):
        engine.sync(role, policies[role])
    return engine
