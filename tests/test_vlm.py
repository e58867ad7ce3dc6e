"""vlm.py on the tiny Qwen2.5-VL: LoRA placement, batched sampling, log-probs, KL, embeddings.

    python -m pytest tests/test_vlm.py
"""
import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import update
import vlm
from sampling import Sampling
from config import Config
from data_and_utils import solver_prompt

SEED_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,mm_projector"


def make_cfg(model, **kw):
    base = dict(solver_model=model, proposer_model=model, use_lora_solver=True,
                use_lora_proposer=True, dtype="float32", device_map="cpu", lora_targets=SEED_TARGETS)
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def policies(tiny_model):
    torch.manual_seed(0)
    return vlm.build_policies(make_cfg(tiny_model))


@pytest.fixture(scope="module")
def prompt(policies):
    image = Image.new("RGB", (112, 84), (200, 30, 30))
    return vlm.make_prompt(policies["solver"], image, solver_prompt("How many circles?"))


def test_lora_only_in_language_model(policies):
    model = policies["solver"].model
    trainable = [n for n, p in model.named_parameters() if "lora_" in n]
    assert trainable and all(".language_model." in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".visual." in n)
    assert not any("lora_" in n for n, _ in model.named_modules() if ".visual." in n)
    # gate_proj/up_proj/down_proj exist in the vision MLP too: they must not be adapted there.
    assert any(n.endswith("visual.blocks.0.mlp.gate_proj") for n, _ in model.named_modules())


def test_unmatched_target_warns_and_none_matching_fails(tiny_model, caplog):
    model, _ = vlm.load_backbone(tiny_model, "float32", "cpu", "sdpa")
    with caplog.at_level(logging.WARNING, logger="ireasoner"):
        names = vlm.lora_target_names(model, ["q_proj", "mm_projector"])
    assert names and all(n.endswith("q_proj") for n in names)
    assert sum("mm_projector" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="match no language-model module"):
        vlm.lora_target_names(model, ["mm_projector"])


def test_roles_share_backbone_with_separate_adapters(policies):
    solver, proposer = policies["solver"], policies["proposer"]
    assert solver.model is proposer.model
    s_ids = {id(p) for p in solver.parameters()}
    p_ids = {id(p) for p in proposer.parameters()}
    assert s_ids and p_ids and not s_ids & p_ids and len(s_ids) == len(p_ids)


def test_batched_generation_returns_n_completions_with_ids(policies, prompt):
    torch.manual_seed(1)
    roll = vlm.generate(policies["solver"], prompt, 4, Sampling(max_new_tokens=12))
    assert len(roll.texts) == 4 and roll.ids.shape[0] == 4 and roll.ids.shape[1] <= 12
    assert roll.mask.shape == roll.ids.shape and (roll.mask.sum(1) >= 1).all()
    tok = policies["solver"].processor.tokenizer
    for text, ids, mask in zip(roll.texts, roll.ids, roll.mask):
        assert text == tok.decode(ids[mask.bool()], skip_special_tokens=True)
    banned = torch.tensor(vlm.suppressed_ids(policies["solver"].processor))
    assert not torch.isin(roll.ids, banned).any()


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 7, 2, 0, 0], [5, 2, 9, 2, 4], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(vlm.completion_mask(ids, [2, 0]), expected)


def full_sequence_logprobs(model, prompt, ids):
    """The straightforward way: full forward with pixel values, log-softmax over everything."""
    n = ids.shape[0]
    p = prompt.inputs
    logits = model(input_ids=torch.cat([p["input_ids"].expand(n, -1), ids], 1),
                   attention_mask=torch.ones(n, prompt.length + ids.shape[1], dtype=torch.long),
                   mm_token_type_ids=torch.cat([p["mm_token_type_ids"].expand(n, -1),
                                                torch.zeros_like(ids)], 1),
                   pixel_values=p["pixel_values"].repeat(n, 1),
                   image_grid_thw=p["image_grid_thw"].repeat(n, 1)).logits
    logp = F.log_softmax(logits.float(), -1)[:, prompt.length - 1:-1]
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def test_batched_logprobs_equal_full_sequence(policies, prompt):
    torch.manual_seed(2)
    roll = vlm.generate(policies["solver"], prompt, 3, Sampling(max_new_tokens=10))
    mask = roll.mask.clone()
    mask[1, 6:] = 0  # a shorter row: padding must not change the others
    model = policies["solver"].model
    model.eval()
    with torch.no_grad(), vlm.acting(policies["solver"]):
        batched, _ = update.token_logprobs(update.completion_logits(model, prompt, roll.ids, mask), roll.ids)
        full = full_sequence_logprobs(model, prompt, roll.ids)
    m = mask.bool()
    assert torch.allclose(batched[m], full[m], atol=1e-5)


def test_kl_zero_at_init_then_positive_after_one_step(tiny_model, prompt):
    torch.manual_seed(0)
    pol = vlm.build_policies(make_cfg(tiny_model))
    solver, proposer = pol["solver"], pol["proposer"]
    torch.manual_seed(3)
    roll = vlm.generate(solver, prompt, 3, Sampling(max_new_tokens=10))

    def kl():
        with torch.no_grad(), vlm.acting(solver) as model:
            model.eval()
            _, logp = update.token_logprobs(update.completion_logits(model, prompt, roll.ids, roll.mask), roll.ids)
            ref = update.reference_logprobs(solver, prompt, roll.ids, roll.mask)
            return update.kl_per_token(logp, ref, roll.ids)[roll.mask.bool()].mean().item()

    assert kl() == 0.0
    before = [p.detach().clone() for p in proposer.parameters()]
    opt = torch.optim.AdamW(solver.parameters(), lr=1e-2)
    with vlm.acting(solver) as model:
        model.train()
        tok, _ = update.token_logprobs(update.completion_logits(model, prompt, roll.ids, roll.mask), roll.ids)
        (-(tok * roll.mask).sum()).backward()
    opt.step()
    assert kl() > 1e-6
    assert all(torch.equal(a, b) for a, b in zip(before, proposer.parameters()))


def test_k3_estimator_is_zero_for_equal_policies_and_positive_otherwise():
    logp = F.log_softmax(torch.randn(2, 3, 11), -1)
    ids = torch.randint(0, 11, (2, 3))
    assert torch.allclose(update.kl_per_token(logp, logp, ids, "k3"), torch.zeros(2, 3))
    other = F.log_softmax(torch.randn(2, 3, 11), -1)
    assert (update.kl_per_token(logp, other, ids, "k3") >= 0).all()
    assert (update.kl_per_token(logp, other, ids, "exact") >= -1e-6).all()


@pytest.mark.parametrize("kind", ["input_embeddings", "hidden_states"])
def test_step_embeddings_batched_and_normalised(policies, kind):
    steps = ["Step one counts the circles", "two", "a much longer step " * 30]
    batched = vlm.embed_steps(policies["solver"], steps, kind, 64)
    assert batched.shape[0] == 3 and torch.allclose(batched.norm(dim=-1), torch.ones(3), atol=1e-5)
    single = torch.cat([vlm.embed_steps(policies["solver"], [s], kind, 64) for s in steps])
    assert torch.allclose(batched, single, atol=1e-4)
    assert vlm.embed_steps(policies["solver"], [], kind, 64).shape[0] == 0


def test_input_embedding_is_mean_of_token_vectors(policies):
    solver = policies["solver"]
    ids = solver.processor.tokenizer("red circle", add_special_tokens=False)["input_ids"]
    table = solver.model.get_input_embeddings().weight.detach()
    expected = F.normalize(table[ids].mean(0), dim=-1)
    assert torch.allclose(vlm.embed_steps(solver, ["red circle"], "input_embeddings", 64)[0],
                          expected, atol=1e-6)


def test_full_finetune_role_has_frozen_reference(tiny_model, tiny_model_b):
    pol = vlm.build_policies(make_cfg(tiny_model, proposer_model=tiny_model_b,
                                      use_lora_proposer=False))
    solver, proposer = pol["solver"], pol["proposer"]
    assert solver.model is not proposer.model and proposer.adapter is None
    assert not any(p.requires_grad for p in proposer.ref_model.parameters())
    trainable = [n for n, p in proposer.model.named_parameters() if p.requires_grad]
    assert trainable and not any(".visual." in n for n in trainable)
