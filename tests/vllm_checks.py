"""Checks of the vLLM rollout engine that must run inside the vLLM environment (.compat/vllm, from
scripts/install_vllm.sh); tests/test_vllm.py runs them as subprocesses and reads the JSON line each
prints last.

    .compat/vllm/bin/python tests/vllm_checks.py parity MODEL IMAGES
    .compat/vllm/bin/python tests/vllm_checks.py withhold-sync STEP -- TRAIN_ARGS...
    .compat/vllm/bin/python tests/vllm_checks.py sigterm-in-rollout CALL -- TRAIN_ARGS...
    .compat/vllm/bin/python tests/vllm_checks.py api 0 -- TRAIN_ARGS...
"""
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train  # noqa: E402
import vllm_engine  # noqa: E402
from config import Config  # noqa: E402
from data_and_utils import ImagePool  # noqa: E402
from distributed import Dist  # noqa: E402
from runtime import seed_all  # noqa: E402
from update import completion_logits, row_images, score_temperature, token_logprobs  # noqa: E402
from vlm import ROLES, acting, suppressed_ids  # noqa: E402


def score(policy, episode, temperature: float) -> torch.Tensor:
    """This policy's log_softmax(logits / T) of each token of an episode (eval mode, as the
    engine samples)."""
    roll = episode.rollout
    with torch.no_grad(), acting(policy) as model:
        model.eval()
        logits = completion_logits(model, episode.prompt, roll.ids, roll.mask,
                                   row_images(episode.prompt, roll.ids.shape[0]))
    return token_logprobs(logits, roll.ids, temperature)[0]


def max_gap(policy, episode, temperature: float = 1.0) -> float:
    roll = episode.rollout
    return ((score(policy, episode, temperature) - roll.logprobs).abs() * roll.mask).max().item()


def parity(model: str, images: str, temperature: str = "1.0") -> dict:
    """Engine log-probs against the HF forward for both roles, at 1 and 3 images a step and
    the sampling temperature: each role's own adapter gives them within float32 rounding, the
    other adapter does not; seeded requests repeat; a changed adapter is served only once
    synced."""
    cfg = Config(data_dir=images, solver_model=model, proposer_model=model, dtype="float32",
                 device_map="cpu", use_lora_solver=True, use_lora_proposer=True,
                 lora_dropout=0.0, rollout_engine="vllm", num_solver_samples=4,
                 max_new_tokens_solver=24, max_new_tokens_proposer=16, temp=float(temperature))
    t = score_temperature(cfg)
    pool = ImagePool(cfg.data_dir, [], cfg.seed, cfg.max_pixels)
    seed_all(0)
    policies, _ = train.build_models(cfg, pool)
    # peft starts lora_B at zero, so both adapters would be the base: give each its own weights.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for role in ROLES:
            for name, p in policies[role].model.named_parameters():
                if f".{role}." in name and "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    engine = vllm_engine.start(cfg, policies, Dist(), pool.max_pixels, pool.factor)
    out = {"gap": {}, "cross_gap": {}}
    banned = set(suppressed_ids(policies["solver"].processor))
    try:
        for b in (1, 3):
            imgs = [pool.get(i)[1] for i in range(b)]
            eps = train.rollout(cfg, policies, imgs, None, engine=engine, key=(1, 0))
            for role, other in (("solver", "proposer"), ("proposer", "solver")):
                out["gap"][f"{role}@{b}"] = max_gap(policies[role], eps[role], t)
                out["cross_gap"][f"{role}@{b}"] = max_gap(policies[other], eps[role], t)
            out[f"rows@{b}"] = {r: list(eps[r].rollout.ids.shape) for r in ROLES}
            out[f"vision_ids_sampled@{b}"] = sum(
                int(i) in banned for r in ROLES for i in eps[r].rollout.ids.flatten())
            again = train.rollout(cfg, policies, imgs, None, engine=engine, key=(1, 0))
            other_key = train.rollout(cfg, policies, imgs, None, engine=engine, key=(2, 0))
            out[f"same_seed_repeats@{b}"] = all(
                torch.equal(eps[r].rollout.ids, again[r].rollout.ids) for r in ROLES)
            out[f"other_step_differs@{b}"] = not torch.equal(eps["solver"].rollout.ids,
                                                             other_key["solver"].rollout.ids)
        # Change the Solver's adapter as an update would: stale until synced.
        imgs = [pool.get(0)[1]]
        with torch.no_grad():
            for p in policies["solver"].parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        stale = train.rollout(cfg, policies, imgs, None, engine=engine, key=(3, 0))
        out["stale_gap"] = max_gap(policies["solver"], stale["solver"], t)
        engine.sync("solver", policies["solver"])
        fresh = train.rollout(cfg, policies, imgs, None, engine=engine, key=(3, 0))
        out["synced_gap"] = max_gap(policies["solver"], fresh["solver"], t)
        out["loaded_lora_ids"] = sorted(engine.llm.llm_engine.list_loras())
        out["served_ids"] = {r: engine.loras[r].lora_int_id for r in ROLES}
    finally:
        engine.close()
    return out


def withhold_sync(step: int, argv: list[str]) -> dict:
    """train.main with the Solver's sync after `step`'s update skipped (the control: the next
    step samples from stale weights)."""
    real = vllm_engine.VLLMEngine.sync
    calls = {"solver": 0}

    def sync(self, role, policy):
        if role == "solver":
            calls["solver"] += 1
            if calls["solver"] == step + 1:  # the first call serves the initial adapter
                return
        real(self, role, policy)
    vllm_engine.VLLMEngine.sync = sync
    return {"returncode": train.main(argv)}


def sigterm_in_rollout(call: int, argv: list[str]) -> dict:
    """train.main that sends itself SIGTERM after the first engine step of its `call`-th
    generate call (2 a step: the Proposer's, then the Solver's)."""
    real_generate, real_run = vllm_engine.VLLMEngine.generate, vllm_engine.VLLMEngine._run
    seen = {"calls": 0, "aborted": False, "steps_before": None}

    def generate(self, *args, **kwargs):
        seen["calls"] += 1
        return real_generate(self, *args, **kwargs)

    def run(self, ids, stop):
        if seen["calls"] != call:
            return real_run(self, ids, stop)
        engine = self.llm.llm_engine
        real_step = engine.step
        count = {"n": 0}

        def step():
            result = real_step()
            count["n"] += 1
            if count["n"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return result
        engine.step = step
        try:
            done = real_run(self, ids, stop)
        finally:
            engine.step = real_step
        seen["aborted"], seen["steps_before"] = done is None, count["n"]
        return done
    vllm_engine.VLLMEngine.generate, vllm_engine.VLLMEngine._run = generate, run
    return {"returncode": train.main(argv), **seen}


def api(_, argv: list[str]) -> dict:
    """check_vllm on the installed vLLM, on it with another version or without LLM.enqueue, and
    train.main (with these flags) under another version; _scale_logits on a subclass of
    vLLM's LogitsProcessor."""
    import contextlib
    import io

    import vllm
    from vllm import LLM
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from distributed import UserError

    def refusal() -> str:
        try:
            vllm_engine.check_vllm()
        except UserError as e:
            return str(e)
        return ""
    out = {"installed": vllm_engine.check_vllm()}
    installed, enqueue = vllm.__version__, LLM.enqueue
    for version in ("0.31.2", "0.33.0", "0.32.9.dev3+gabc"):
        vllm.__version__ = version
        out[version] = refusal()
    vllm.__version__ = "0.31.2"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        out["train_returncode"] = train.main(argv)
    out["train_errors"] = [line for line in stderr.getvalue().splitlines()
                           if line.startswith("error:")]
    vllm.__version__ = installed
    del LLM.enqueue
    out["no_enqueue"] = refusal()
    LLM.enqueue = enqueue

    class Plugged(LogitsProcessor):  # what a platform or plugin may put in its place
        pass
    layer = object.__new__(Plugged)  # without a vLLM config: _scale_logits sets only .scale
    torch.nn.Module.__init__(layer)
    layer.scale = 1.0
    out["subclass_scaled"] = vllm_engine._scale_logits(torch.nn.Sequential(layer), 0.5)
    out["subclass_scale"] = layer.scale
    return out


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "parity":
        result = parity(*args)
    else:
        cut = args.index("--")
        n, argv = int(args[0]), args[cut + 1:]
        result = {"withhold-sync": withhold_sync, "sigterm-in-rollout": sigterm_in_rollout,
                  "api": api}[command](n, argv)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
