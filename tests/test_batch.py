"""Several images per step (--images_per_step): left-padded prompts score and sample as each row
alone, the batched update is the sum of per-image updates, and whole runs log, resume and split
across ranks exactly.

    python -m pytest tests/test_batch.py -q
"""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import rewards as R
import sampling
import train
import update
import vlm
from sampling import Sampling
from config import Config
from conftest import ROOT, train_args
from data_and_utils import solver_prompt
from test_distributed import torchrun
from test_train import run_cli
from test_update import make_policies

B, N = 4, 3
SIZES = [(112, 84), (224, 168), (56, 112), (168, 168)]  # different image-token counts
QUESTIONS = ["How many?", "What colour is the largest shape in this picture?", "Why?",
             "Is there a circle?"]


@pytest.fixture(scope="module")
def batch(tiny_model):
    cfg, policies = make_policies(tiny_model)
    solver = policies["solver"]
    images = [Image.new("RGB", s, (40 * i, 200 - 40 * i, 90)) for i, s in enumerate(SIZES)]
    texts = [solver_prompt(q) for q in QUESTIONS]
    prompt = vlm.make_prompts(solver, images, texts)
    alone = [vlm.make_prompt(solver, i, t) for i, t in zip(images, texts)]
    torch.manual_seed(3)
    roll = vlm.generate(solver, prompt, N, Sampling(max_new_tokens=10))
    roll.mask[1, 6:] = 0  # a shorter completion: its padding must not change the others
    return cfg, policies, prompt, alone, roll


def rows(b):
    return slice(b * N, (b + 1) * N)


def test_prompts_are_left_padded_to_different_lengths(batch):
    _, _, prompt, alone, roll = batch
    lengths = prompt.inputs["attention_mask"].sum(1).tolist()
    assert lengths == [p.length for p in alone] and len(set(lengths)) == B
    assert prompt.images == B and roll.ids.shape[0] == B * N
    for b, p in enumerate(alone):  # left padding: the real tokens end every row
        assert torch.equal(prompt.inputs["input_ids"][b, -p.length:], p.inputs["input_ids"][0])


@pytest.mark.parametrize("chunk", [B * N, 2, 5])
def test_padded_row_scores_as_the_same_completion_alone(batch, chunk):
    """Sampled-token log-probs of the policy and the reference, batched (chunks that cut across
    images included) against each image's prompt alone."""
    _, policies, prompt, alone, roll = batch
    solver, ids, mask = policies["solver"], roll.ids, roll.mask
    owner = update.row_images(prompt, ids.shape[0])
    with torch.no_grad(), vlm.acting(solver) as model:
        model.eval()
        got = torch.cat([update.completion_logits(model, prompt, ids[lo:lo + chunk],
                                               mask[lo:lo + chunk], owner[lo:lo + chunk])
                         for lo in range(0, B * N, chunk)])
        ref = torch.cat([update.reference_logprobs(solver, prompt, ids[lo:lo + chunk],
                                                mask[lo:lo + chunk], owner[lo:lo + chunk])
                         for lo in range(0, B * N, chunk)])
        for b in range(B):
            own = update.completion_logits(model, alone[b], ids[rows(b)], mask[rows(b)])
            own_ref = update.reference_logprobs(solver, alone[b], ids[rows(b)], mask[rows(b)])
            tok, _ = update.token_logprobs(got[rows(b)], ids[rows(b)])
            expected, _ = update.token_logprobs(own, ids[rows(b)])
            m = mask[rows(b)].bool()
            assert torch.allclose(tok[m], expected[m], atol=1e-5, rtol=0), b
            gather = lambda lp: lp.gather(-1, ids[rows(b), :, None])[..., 0][m]
            assert torch.allclose(gather(ref[rows(b)]), gather(own_ref), atol=1e-5, rtol=0), b
            assert not torch.allclose(tok[m], gather(own_ref), atol=1e-3)  # adapter is active


@pytest.mark.parametrize("lean", [True, False])
def test_padded_decode_steps_match_each_prompt_alone(batch, lean, monkeypatch):
    """The first logits and 6 decode steps (the lean step with each prompt's keys shared by its
    rows, and the HF layers with an attention mask) of left-padded rows equal those of each
    prompt decoded alone."""
    _, policies, prompt, alone, roll = batch
    if not lean:
        monkeypatch.setattr(sampling.LeanDecoder, "build", classmethod(lambda *a, **k: None))
    tokens = roll.ids[:, :6]
    with torch.no_grad(), vlm.acting(policies["solver"]) as model:
        model.eval()
        core, head = vlm.core_model(model), model.get_output_embeddings()
        mm = vlm.vision_inputs(prompt, list(range(B)))
        logits, step, start = sampling.prefill(core, head, prompt.inputs, mm, N, 7)
        batched = [logits] + [step(tokens[:, j], start + j) for j in range(6)]
        for b, p in enumerate(alone):
            logits, step, start = sampling.prefill(core, head, p.inputs, vlm.vision_inputs(p, [0]), N, 7)
            assert isinstance(start, int)  # one prompt keeps the unpadded path
            single = [logits] + [step(tokens[rows(b), j], start + j) for j in range(6)]
            for got, expected in zip(batched, single):
                assert torch.allclose(got[rows(b)], expected, atol=1e-5, rtol=0), b


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_shared_prefix_attention_equals_sdpa_over_repeated_rows(dtype):
    """SharedPrefix against SDPA over each row's own copy of its padded prompt plus its tokens."""
    torch.manual_seed(0)
    prompts, n, kv, g, P, d, dt = 3, 4, 2, 3, 9, 8, getattr(torch, dtype)
    keys, values = (torch.randn(prompts, kv, P, d, dtype=dt) for _ in range(2))
    mask = torch.ones(prompts, P, dtype=torch.bool)
    mask[1, :4], mask[2, :2] = False, False
    cache = sampling.SharedPrefix(keys, values, mask, n, 5)
    plain = sampling.KVBuffer(keys.repeat_interleave(n, 0), values.repeat_interleave(n, 0), 5)
    key_mask = torch.cat([mask.repeat_interleave(n, 0),
                          torch.ones(prompts * n, 5, dtype=torch.bool)], 1)
    for step in range(3):
        q, k, v = (torch.randn(prompts * n, h, 1, d, dtype=dt) for h in (kv * g, kv, kv))
        got = cache.attend(q, k, v, 0.3, True)
        ks, vs = plain.append(k, v)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.float(), ks.float(), vs.float(), attn_mask=key_mask[:, None, None, :ks.shape[2]],
            scale=0.3, enable_gqa=True)
        assert got.dtype == dt and cache.generated.length == step + 1
        assert torch.allclose(got.float(), expected, atol=1e-5 if dtype == "float32" else 1e-2)


def grads(policy) -> dict:
    return {n: p.grad.detach().clone() for n, p in policy.model.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize("micro_batch", [0, 5])
def test_batched_gradient_is_the_sum_of_per_image_gradients(batch, micro_batch):
    cfg, policies, prompt, alone, roll = batch
    solver = policies["solver"]
    cfg.update_micro_batch = micro_batch
    adv = torch.linspace(-1.0, 1.2, B * N)
    solver.model.zero_grad(set_to_none=True)
    loss, kl = update.accumulate_gradients(cfg, solver, update.Episode(prompt, roll, []), adv, 0.3)
    batched = grads(solver)
    solver.model.zero_grad(set_to_none=True)
    norm, parts = (B * N, int(roll.mask.sum())), []
    for b in range(B):  # each image's own update, with the batch's means: grads add up in .grad
        one = vlm.Rollout(roll.texts[rows(b)], roll.ids[rows(b)], roll.mask[rows(b)])
        parts.append(update.accumulate_gradients(cfg, solver, update.Episode(alone[b], one, []),
                                                adv[rows(b)], 0.3, norm=norm))
    summed = grads(solver)
    solver.model.zero_grad(set_to_none=True)
    assert batched.keys() == summed.keys() and batched
    assert any(g.abs().max() > 1e-4 for g in batched.values())
    for name, g in batched.items():
        assert torch.allclose(g, summed[name], atol=1e-6, rtol=0), name
    assert loss == pytest.approx(sum(p[0] for p in parts), abs=1e-6)
    assert kl == pytest.approx(sum(p[1] for p in parts), abs=1e-5) and kl > 0


def test_gradient_checkpointing_batched_update_is_the_same(tiny_model, batch):
    """The joint-forward fallback (no shared cache) over left-padded rows, chunks across images."""
    cfg, policies, prompt, _, roll = batch
    adv = torch.linspace(-1.0, 1.2, B * N)
    episode = update.Episode(prompt, roll, [])
    cfg.update_micro_batch = 0
    solver = policies["solver"]
    solver.model.zero_grad(set_to_none=True)
    update.accumulate_gradients(cfg, solver, episode, adv, 0.3)
    plain = grads(solver)
    solver.model.zero_grad(set_to_none=True)
    gc_cfg, gc_policies = make_policies(tiny_model, gradient_checkpointing=True,
                                        update_micro_batch=5)
    update.accumulate_gradients(gc_cfg, gc_policies["solver"], episode, adv, 0.3)
    checkpointed = grads(gc_policies["solver"])
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-6, rtol=1e-4), name


def test_group_baseline_is_each_images_own_mean():
    adv = R.advantages_for([1.0, 0.0, 0.5, 0.2, 0.2, 0.8], None, 3)
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.0, -0.2, -0.2, 0.4])
    assert R.advantages_for([1.0, 0.0], 0.25, 1).tolist() == [0.75, -0.25]
    with pytest.raises(ValueError):
        R.advantages_for([1.0, 0.0, 0.5], None, 2)


def test_config_checks_images_per_step():
    with pytest.raises(ValueError, match="images_per_step"):
        Config(images_per_step=0)

    with pytest.raises(ValueError, match="--update_mode per_sample conflicts with --images_per_step"):
        Config(images_per_step=2, update_mode="per_sample")
    assert Config(images_per_step=1, update_mode="per_sample").images_per_step == 1


# ---------------------------------------------------------------- whole runs
def read_log(run_dir):
    with open(os.path.join(run_dir, "iter_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def batched_args(model, data, out, name, steps):
    return train_args(model, data, out, name, steps=steps, lr="0.01", images_per_step=str(B),
                      num_solver_samples=str(N), step_reward_weight_start="0.5",
                      step_reward_weight_end="0.5", update_micro_batch="5")


@pytest.fixture(scope="module")
def runs(tiny_model, image_dir, tmp_path_factory):
    """4 steps of B=4, and the same run as 2 steps + resume + 2 steps."""
    out = str(tmp_path_factory.mktemp("batch"))
    for name, steps in (("once", 4), ("split", 2), ("split", 4)):
        proc = run_cli(batched_args(model=tiny_model, data=image_dir, out=out, name=name,
                                    steps=steps), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_batched_run_logs_one_record_per_image_with_recomputable_rewards(runs, tiny_model):
    records = read_log(os.path.join(runs, "once"))
    assert [(r["step"], r["image_index"]) for r in records] == \
        [(s, b) for s in range(1, 5) for b in range(B)]
    # 8 images: the first two steps are one epoch, no repeats
    assert len({r["image_path"] for r in records if r["step"] in (1, 2)}) == 2 * B
    cfg = train.parse_config(batched_args(tiny_model, "", "", "x", 4))
    embed = vlm.step_embedder(vlm.build_policies(cfg)["solver"], cfg)  # the frozen base embeds
    baseline = 0.0
    for step in range(1, 5):
        recs = [r for r in records if r["step"] == step]
        assert recs[0]["solver_baseline_before"] == pytest.approx(baseline, abs=1e-12)
        for r in recs:  # rewards recomputed from this image's own outputs alone
            again = R.compute_rewards(cfg, r["solver_outputs"], step, embed)
            assert again["reward_final"] == pytest.approx(r["reward_final"], abs=1e-6)
            assert again["proposer_reward"] == pytest.approx(r["proposer_reward"], abs=1e-12)
            assert len(r["solver_outputs"]) == N and r["generated_tokens"] > 0
        baseline = R.update_ema_baseline(baseline, [x for r in recs for x in r["reward_final"]],
                                         cfg.baseline_momentum)
    assert [r["proposer_updated"] for r in records[::B]] == [False, True, False, True]


@pytest.mark.slow
def test_batched_two_steps_resume_two_steps_equals_four(runs):
    once, split = read_log(os.path.join(runs, "once")), read_log(os.path.join(runs, "split"))
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in once] == [drop(r) for r in split]
    for role in ("solver", "proposer"):
        a = load_file(os.path.join(runs, "once", "step_00004", role, "adapter_model.safetensors"))
        b = load_file(os.path.join(runs, "split", "step_00004", role, "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_take_eight_distinct_images_per_step(tiny_model, image_dir, tmp_path):
    args = batched_args(tiny_model, image_dir, str(tmp_path), "ddp", 1)
    args[args.index("--device_map") + 1] = "auto"  # under torchrun: one full copy per rank
    proc = torchrun([os.path.join(ROOT, "train.py"), *args], timeout=400)
    assert proc.stderr.count("one full model copy per rank") == 1
    records = read_log(os.path.join(tmp_path, "ddp"))
    assert [(r["rank"], r["image_index"]) for r in records] == \
        [(k, b) for k in (0, 1) for b in range(B)]
    assert len({r["image_path"] for r in records}) == 2 * B
    assert len({r["solver_param_checksum"] for r in records}) == 1


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_other_families_pad_exactly(family, tmp_path):
    """Qwen2-VL (lean decode step) and Qwen3-VL (HF layers, deepstack features) with left-padded
    prompts: scoring and decoding each row as its prompt alone."""
    from tools.tiny import build_tiny_model
    model, processor = vlm.load_backbone(build_tiny_model(str(tmp_path / family), family=family),
                                         "float32", "cpu", "sdpa")
    policy = vlm.Policy("solver", model, processor)
    images = [Image.new("RGB", s, (60, 60 * i, 120)) for i, s in enumerate(SIZES[:3])]
    texts = [solver_prompt(q) for q in QUESTIONS[:3]]
    prompt = vlm.make_prompts(policy, images, texts)
    torch.manual_seed(0)
    roll = vlm.generate(policy, prompt, 2, Sampling(max_new_tokens=6))
    owner = update.row_images(prompt, 6)
    with torch.no_grad():
        got = update.completion_logits(model, prompt, roll.ids, roll.mask, owner)
        core, head = vlm.core_model(model), model.get_output_embeddings()
        first, step, start = sampling.prefill(core, head, prompt.inputs,
                                              vlm.vision_inputs(prompt, [0, 1, 2]), 2, 3)
        after = step(roll.ids[:, 0], start)
        for b in range(3):
            alone = vlm.make_prompt(policy, images[b], texts[b])
            rows_b = slice(2 * b, 2 * b + 2)
            own = update.completion_logits(model, alone, roll.ids[rows_b], roll.mask[rows_b])
            m = roll.mask[rows_b].bool()
            assert torch.allclose(got[rows_b][m], own[m], atol=1e-5, rtol=0), b
            first1, step1, start1 = sampling.prefill(core, head, alone.inputs,
                                                     vlm.vision_inputs(alone, [0]), 2, 3)
            assert torch.allclose(first[rows_b], first1, atol=1e-5, rtol=0), b
            assert torch.allclose(after[rows_b], step1(roll.ids[rows_b, 0], start1), atol=1e-5,
                                  rtol=0), b
