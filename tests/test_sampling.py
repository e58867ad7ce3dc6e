"""sampling.py: our decode loop against HF's model and HF's sampling rules on the tiny Qwen2.5-VL
(float32, bfloat16, float16), and which decode path each tiny Qwen-VL generation takes.

    python -m pytest tests/test_sampling.py -q
"""
import pytest
import torch
from PIL import Image
from transformers.generation.logits_process import TopPLogitsWarper

import sampling
from tools import tiny
import vlm
from config import Config
from sampling import Sampling
from data_and_utils import solver_prompt


def _policy(model_dir: str, dtype: str):
    cfg = Config(solver_model=model_dir, proposer_model=model_dir, use_lora_solver=True,
                 use_lora_proposer=True, dtype=dtype, device_map="cpu")
    torch.manual_seed(0)
    policy = vlm.build_policies(cfg)["solver"]
    with torch.no_grad():  # a non-zero adapter, so the LoRA terms are exercised
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompt = vlm.make_prompt(policy, Image.new("RGB", (112, 84), (40, 160, 60)),
                             solver_prompt("How many squares?"))
    return policy, prompt


@pytest.fixture(scope="module")
def solver(tiny_model):
    return _policy(tiny_model, "float32")


def _lm_and_head(model):
    return vlm.core_model(model).language_model, model.get_output_embeddings()


# float16 only where this CPU has float16 matmuls (older torch CPU builds lack them).
try:
    torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
    HALF = ["float16"]
except RuntimeError:
    HALF = []


@pytest.mark.parametrize("dtype,fold", [("float32", False), ("float32", True),
                                        ("bfloat16", False)] + [(h, False) for h in HALF])
def test_lean_decode_step_reproduces_hf_layers(tiny_model, dtype, fold):
    """Op for op the HF and peft layers' result, bit for bit, over 32 steps; with the adapter
    folded into the weights, up to float32 rounding. In 16-bit, peft keeps the adapter in
    float32 (its default upcast), so this also checks the mixed-dtype LoRA branch."""
    policy, prompt = _policy(tiny_model, dtype)
    p, n, steps = prompt.inputs, 3, 32
    with torch.no_grad(), vlm.acting(policy) as model:
        model.eval()
        core, head = vlm.core_model(model), model.get_output_embeddings()
        lora = {q.dtype for name, q in model.named_parameters() if "lora_" in name}
        assert head.weight.dtype == getattr(torch, dtype) and lora == {torch.float32}
        lean = sampling.LeanDecoder.build(core.language_model, head, fold=fold)
        assert lean is not None
        pos, _ = core.get_rope_index(p["input_ids"], p["mm_token_type_ids"],
                                     image_grid_thw=p["image_grid_thw"],
                                     attention_mask=p["attention_mask"])
        out = core(**{k: p[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")},
                   position_ids=pos, **vlm.vision_inputs(prompt, [0]), use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(n)
        kv = [sampling.KVBuffer(layer.keys, layer.values, steps + 1) for layer in cache.layers]
        start = int(pos.max()) + 1
        for step in range(steps):
            gen = torch.Generator().manual_seed(step)
            tok = torch.randint(0, head.out_features, (n,), generator=gen)
            ours = lean.step(tok, start + step, kv)
            ids = torch.full((3, n, 1), start + step)
            hf = core.language_model(input_ids=tok[:, None], position_ids=ids, cache=cache,
                                     use_cache=True).last_hidden_state
            expected = head(hf)[:, -1]
            assert ours.dtype == expected.dtype
            if fold:
                assert torch.allclose(ours, expected, atol=1e-5, rtol=0), f"step {step}"
            else:
                assert torch.equal(ours, expected), f"step {step}"
        # The test can fail: an adapter dropped from the step changes the logits.
        with model.disable_adapter():
            assert not torch.equal(head(core.language_model(
                input_ids=tok[:, None], position_ids=ids + 1, cache=cache,
                use_cache=True).last_hidden_state)[:, -1], lean.step(tok, start + steps, kv))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def family(request, tmp_path_factory):
    if request.param == "qwen2_5_vl":
        return request.param, request.getfixturevalue("tiny_model")
    path = str(tmp_path_factory.mktemp("sampling-families") / request.param)
    return request.param, tiny.build_tiny_model(path, family=request.param)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_path_is_lean_for_qwen2_and_qwen2_5_vl(family, dtype):
    """Fails if the lean step silently stops being used (a transformers or peft upgrade that
    renames a module, a new adapter dtype, ...): the reason is in the assertion message."""
    name, model_dir = family
    cfg = Config(solver_model=model_dir, proposer_model=model_dir, use_lora_solver=True,
                 use_lora_proposer=True, dtype=dtype, device_map="cpu")
    policy = vlm.build_policies(cfg)["solver"]
    with vlm.acting(policy) as model:
        model.eval()
        lm, head = _lm_and_head(model)
        path, why = sampling.decode_path(lm, head)
        built = sampling.LeanDecoder.build(lm, head)
    if name == "qwen3_vl":  # not mirrored (q/k norms, different rope): HF layers, with a reason
        assert path == "hf layers" and "qwen3_vl_text" in why and built is None
    else:
        assert path == "lean" and built is not None, why
        assert dtype in why and ("added as peft does" in why) == (dtype == "bfloat16"), why


def test_greedy_decode_matches_hf_generate(solver):
    policy, prompt = solver
    suppress = vlm.suppressed_ids(policy.processor)
    with torch.no_grad(), vlm.acting(policy) as model:
        model.eval()
        eos = model.generation_config.eos_token_id
        ours = sampling.decode(vlm.core_model(model), model.get_output_embeddings(), prompt.inputs,
                               vlm.vision_inputs(prompt, [0]), 2, Sampling(0, max_new_tokens=24),
                               suppress=suppress, eos=eos, pad=0).ids
        hf = model.generate(**{k: prompt.inputs[k] for k in ("input_ids", "attention_mask",
                                                              "mm_token_type_ids")},
                            **vlm.vision_inputs(prompt, [0]), do_sample=False, max_new_tokens=24,
                            suppress_tokens=suppress)[:, prompt.length:]
    length = hf.shape[1]
    assert ours.shape[1] == length and (ours == hf[0]).all()


@pytest.mark.parametrize("top_p,temperature", [(1.0, 1.0), (0.6, 1.0), (0.8, 0.5)])
def test_sample_token_follows_softmax_within_top_p(top_p, temperature):
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 0.8
    scores = (logits / temperature).index_fill(-1, torch.tensor([3]), float("-inf"))
    expected = TopPLogitsWarper(top_p)(None, scores).softmax(-1)[0] if top_p < 1 \
        else scores.softmax(-1)[0]
    draws = sampling.sample_token(logits.expand(100_000, -1), Sampling(temperature, top_p), [3])
    freq = torch.bincount(draws, minlength=40).double() / draws.numel()
    assert ((freq > 0) <= (expected > 0)).all()  # never outside the nucleus, never id 3
    assert (freq - expected).abs().max() < 0.006


def test_rows_after_eos_emit_pad_and_stop_ends_early(solver):
    policy, prompt = solver
    calls = []

    def stop(ids, scores):
        calls.append(ids.shape[1])
        return torch.full((ids.shape[0],), ids.shape[1] >= 5)

    with torch.no_grad(), vlm.acting(policy) as model:
        model.eval()
        args = (vlm.core_model(model), model.get_output_embeddings(), prompt.inputs,
                vlm.vision_inputs(prompt, [0]))
        stopped = sampling.decode(*args, 2, Sampling(max_new_tokens=20), eos=[7], pad=0,
                                  stop=stop).ids
        torch.manual_seed(3)  # odd ids end a row, so rows end at different steps
        odd = list(range(1, args[1].out_features, 2))
        ended = sampling.decode(*args, 6, Sampling(max_new_tokens=40), eos=odd, pad=2).ids
    assert stopped.shape == (2, 5) and calls[-1] == 5
    is_eos = ended % 2 == 1
    first = is_eos.float().argmax(1)
    assert is_eos.any(1).all() and len(set(first.tolist())) > 1
    assert ended.shape[1] == int(first.max()) + 1  # the loop ends when the last row has
    for row, end in zip(ended, first):
        assert (row[end + 1:] == 2).all()


# ---------------------------------------------------------------- top-k, repetition penalty
def test_sampling_probs_apply_hf_processors_in_hf_order():
    # HF generate(do_sample=True) runs repetition penalty, then temperature, top-k, top-p.
    from transformers.generation.logits_process import (LogitsProcessorList,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper)
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2
    input_ids = torch.randint(0, 40, (3, 12))
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter_(1, input_ids, True)
    for penalty, temperature, top_k, top_p in [(1.3, 0.7, 5, 0.9), (1.05, 1.0, 50, 1.0),
                                               (2.0, 1.5, 0, 0.8), (1.0, 1.0, 3, 1.0)]:
        hf = LogitsProcessorList(
            ([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1 else [])
            + ([TemperatureLogitsWarper(temperature)] if temperature != 1 else [])
            + ([TopKLogitsWarper(top_k)] if top_k else [])
            + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))(input_ids, logits.clone())
        ours = sampling.sampling_probs(logits, Sampling(temperature, top_p, top_k, penalty), [],
                                       seen)
        assert torch.allclose(ours, hf.softmax(-1), atol=1e-6), (penalty, temperature, top_k)


def test_top_k_3_samples_only_the_steps_3_highest_logits(solver, monkeypatch):
    policy, prompt = solver
    seen_steps = []
    real = sampling.sample_token

    def recording(logits, *args):
        tok = real(logits, *args)
        seen_steps.append((logits.clone(), tok))
        return tok

    monkeypatch.setattr(sampling, "sample_token", recording)
    torch.manual_seed(5)
    roll = vlm.generate(policy, prompt, 5, Sampling(1.5, top_k=3, max_new_tokens=16))
    assert len(seen_steps) >= 8 and roll.ids.shape[0] == 5
    distinct = set()
    for logits, tok in seen_steps:
        top3 = logits.topk(3, dim=-1).indices
        assert (top3 == tok[:, None]).any(1).all()
        distinct.update(tok.tolist())
    assert len(distinct) > 3  # it sampled, not a greedy pick


def test_repetition_penalty_sees_prompt_and_generated_ids(solver, monkeypatch):
    policy, prompt = solver
    masks, toks = [], []
    real = sampling.sample_token

    def recording(logits, how, banned, seen):
        masks.append(seen.clone())
        tok = real(logits, how, banned, seen)
        toks.append(tok)
        return tok

    monkeypatch.setattr(sampling, "sample_token", recording)
    torch.manual_seed(2)
    vlm.generate(policy, prompt, 3, Sampling(repetition_penalty=1.2, max_new_tokens=6))
    prompt_ids = set(prompt.inputs["input_ids"][0].tolist())
    for step, seen in enumerate(masks):
        for row in range(3):
            expected = prompt_ids | {int(t[row]) for t in toks[:step]}
            assert set(seen[row].nonzero().squeeze(1).tolist()) == expected


def test_top_k_and_penalty_are_off_unless_merged_from_the_generation_config(real_config_model):
    """By default the model's generation_config.json sampling values are ignored (Qwen2.5-VL's
    top_k 1 would sample greedily); --merge_generation_config takes its top_k and
    repetition_penalty, as HF generate did for the published code; flags win over both."""
    policy = vlm.Policy("solver", vlm.load_backbone(real_config_model, "float32", "cpu",
                                                    "sdpa")[0], None)
    assert vlm.model_sampling_values(policy) == tiny.QWEN2_5_VL_7B_GENERATION
    got, source = vlm.resolve_sampling(policy, Config(temp=0.7), 16)
    assert got == Sampling(0.7, 1.0, 0, 1.0, 16) and source == \
        "top_k 0 (off), repetition_penalty 1 (off)"
    merged, source = vlm.resolve_sampling(policy, Config(merge_generation_config=True), 16)
    assert (merged.top_k, merged.repetition_penalty, merged.temperature, merged.top_p) == \
        (1, 1.05, 1.0, 1.0)  # temperature and top_p were always the call's, as published
    assert merged.greedy and "top_k 1 (the model's generation_config, merged)" in source
    flags = Config(merge_generation_config=True, top_k=7, repetition_penalty=1.0)
    assert vlm.resolve_sampling(policy, flags, 16)[0].top_k == 7


def test_hf_defaults_are_merged_when_the_model_sets_none(tiny_model):
    plain = vlm.Policy("solver", vlm.load_backbone(tiny_model, "float32", "cpu", "sdpa")[0], None)
    assert vlm.model_sampling_values(plain) == {}
    merged, source = vlm.resolve_sampling(plain, Config(merge_generation_config=True), 8)
    assert (merged.top_k, merged.repetition_penalty) == (50, 1.0)  # what HF generate used
    assert "top_k 50 (HF default, merged)" in source


def test_temperature_zero_is_greedy_and_scores_at_one():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    greedy = Sampling(0.0)
    assert greedy.greedy and greedy.score_temperature == 1.0
    assert torch.equal(sampling.sample_token(logits, greedy, [int(logits[0].argmax())]),
                       torch.cat([logits[:1].topk(2).indices[:, 1], logits[1:].argmax(-1)]))
    with pytest.raises(ValueError):
        Sampling(-1.0)
