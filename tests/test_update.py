"""The policy update on the tiny Qwen2.5-VL: chunking, completion-only logits, checkpointing.

    python -m pytest tests/test_update.py -q
"""
import pytest
import torch
from PIL import Image

import update
import vlm
from sampling import Sampling
from config import Config
from data_and_utils import solver_prompt
from distributed import Dist

SEED_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,mm_projector"
N = 5


def make_policies(model_dir: str, **kw) -> dict:
    # No LoRA dropout: two updates can only agree to 1e-6 if the forward is deterministic.
    cfg = Config(solver_model=model_dir, proposer_model=model_dir, use_lora_solver=True,
                 use_lora_proposer=True, dtype="float32", device_map="cpu",
                 lora_targets=SEED_TARGETS, lora_dropout=0.0, **kw)
    torch.manual_seed(0)
    policies = vlm.build_policies(cfg)
    if cfg.gradient_checkpointing:
        policies["solver"].model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.no_grad():  # a trained-looking adapter, so the policy differs from the reference
        for name, p in policies["solver"].model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    return cfg, policies


@pytest.fixture(scope="module")
def setup(tiny_model):
    cfg, policies = make_policies(tiny_model)
    solver = policies["solver"]
    prompt = vlm.make_prompt(solver, Image.new("RGB", (112, 84), (200, 30, 30)),
                             solver_prompt("How many circles?"))
    torch.manual_seed(1)
    roll = vlm.generate(solver, prompt, N, Sampling(max_new_tokens=12))
    roll.mask[1, 7:] = 0  # one shorter completion: padding must not change the others
    episode = update.Episode(prompt, roll, [0.0] * N)
    return cfg, policies, episode


def sgd_update(cfg, policy, episode, micro_batch: int) -> tuple[dict, dict]:
    """One update_policy with plain SGD (lr 1), so new params = old - clipped gradient; the
    adapter is restored afterwards. Returns (update_policy's figures, {name: new param})."""
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}
    cfg.update_micro_batch = micro_batch
    adv = torch.tensor([0.5, -1.0, 0.25, 1.5, -0.75])
    out = update.update_policy(cfg, policy, torch.optim.SGD(policy.parameters(), lr=1.0), episode,
                              adv, 0.3, Dist())
    after = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if n in before:
                p.copy_(before[n])
    return out, after


def test_chunked_update_equals_unchunked(setup):
    cfg, policies, episode = setup
    solver = policies["solver"]
    whole, after_whole = sgd_update(cfg, solver, episode, 0)
    chunked, after_chunked = sgd_update(cfg, solver, episode, 2)  # chunks of 2, 2 and 1
    assert whole["finite"] and whole["kl"] > 0 and whole["grad_norm"] > 0
    assert chunked["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    assert chunked["kl"] == pytest.approx(whole["kl"], abs=1e-6)
    assert chunked["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    current = dict(solver.model.named_parameters())  # sgd_update put the old values back
    assert any(not torch.equal(after_whole[n], current[n]) for n in after_whole if ".solver" in n)
    for name, value in after_whole.items():
        assert torch.allclose(after_chunked[name], value, atol=1e-6, rtol=0), name


def test_lm_head_sees_only_completion_positions(setup):
    _, policies, episode = setup
    solver = policies["solver"]
    long_text = solver_prompt("How many circles? " + "Look at every part of the image. " * 60)
    prompt = vlm.make_prompt(solver, Image.new("RGB", (112, 84), (0, 90, 200)), long_text)
    ids, mask = episode.rollout.ids, episode.rollout.mask
    n, length = ids.shape
    assert prompt.length > 300 > length + 1
    seen = []
    head = solver.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inputs, output: seen.append(inputs[0].shape))
    try:
        with torch.no_grad(), vlm.acting(solver) as model:
            model.eval()
            logits = update.completion_logits(model, prompt, ids, mask)
    finally:
        hook.remove()
    assert logits.shape == (n, length, head.out_features)
    assert [s[1] for s in seen] == [length + 1], f"lm_head inputs {seen}, prompt {prompt.length}"


def test_gradient_checkpointing_gives_the_same_update(tiny_model, setup):
    cfg, policies, episode = setup
    plain, _ = sgd_update(cfg, policies["solver"], episode, 0)
    gc_cfg, gc_policies = make_policies(tiny_model, gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False)
               for m in gc_policies["solver"].model.modules())
    checkpointed, after = sgd_update(gc_cfg, gc_policies["solver"], episode, 0)
    assert checkpointed["finite"] and checkpointed["grad_norm"] > 0
    assert checkpointed["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    assert checkpointed["kl"] == pytest.approx(plain["kl"], abs=1e-5)
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


def test_per_device_clipping_is_the_global_clip_on_one_device():
    """The published per-device rule clips each device's group separately; on one device it is
    the global clip, and its returned norm is the norm before clipping."""
    def grads():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
        for p in ps:
            p.grad = torch.randn(4) * 3
        return ps
    a, b = grads(), grads()
    na, nb = update.clip_gradients(a, 1.0), update.clip_gradients(b, 1.0, per_device=True)
    assert torch.allclose(na, nb) and na > 1
    assert all(torch.allclose(x.grad, y.grad) for x, y in zip(a, b))
    assert abs(torch.cat([p.grad for p in b]).norm().item() - 1.0) < 1e-5
