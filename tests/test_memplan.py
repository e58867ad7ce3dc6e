"""The memory plan: run.py plan on the shipped configs, auto micro-batching and checkpointing,
the refusal before loading, the image cap, and the plan against MemTracker on real updates.

    python -m pytest tests/test_memplan.py -q
"""
import logging
import os

import pytest
from PIL import Image

import memfit
import memplan
import train
from config import Config
from data_and_utils import ImagePool
from tests.conftest import train_args

GIB = memplan.GIB
SEVEN_B = "Qwen/Qwen2.5-VL-7B-Instruct"


def lora_cfg(**kw) -> Config:
    kw.setdefault("solver_model", SEVEN_B)
    kw.setdefault("proposer_model", kw["solver_model"])
    return Config(use_lora_solver=True, use_lora_proposer=True, **kw)


def seven_b() -> memplan.Shapes:
    return memplan.shapes_of(*memplan.read_model(SEVEN_B))


def test_shipped_configs_have_the_published_sizes():
    sizes = {"3B": 3.75, "7B": 8.29, "32B": 33.4, "72B": 73.4, "Qwen3-VL-8B": 8.77}
    shipped = memplan.shipped_configs()
    for name in shipped:
        data = memplan.read_model(name)
        shapes = memplan.shapes_of(*data)
        params = (shapes.lm_params() + shapes.vision_params) / 1e9
        key = next(k for k in sizes if k in name)
        assert params == pytest.approx(sizes[key], rel=0.01), name
    assert len(shipped) == 5


def test_run_py_plan_answers_for_the_7b_config(capsys):
    import run
    code = run.main(["plan", "--use_lora_solver", "--use_lora_proposer", "--max_pixels",
                     "1003520", "--memory_budget_gib", "80"])
    out = capsys.readouterr().out
    assert code == 0
    assert "prompt 1596 tokens of which image 1280" in out and "micro-batch 5" in out
    assert "weights 15.4 GiB" in out


def test_plan_refuses_unknown_model_in_one_line(capsys):
    import run
    assert run.main(["plan", "--solver_model", "no/such-model", "--proposer_model",
                     "no/such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no config.json for no/such-model") and err.count("\n") == 1


def test_auto_picks_the_largest_chunk_that_fits_and_checkpointing_when_needed():
    shapes = seven_b()
    cfg = lora_cfg(images_per_step=8, max_pixels=1003520)
    roomy = memfit.choose(cfg, shapes, budget=10_000 * GIB)
    assert (roomy.plan.micro_batch, roomy.plan.checkpointing) == (40, False)
    h100 = memfit.choose(cfg, shapes, budget=80 * GIB)
    assert h100.plan.micro_batch in (5, 10) and not h100.plan.checkpointing
    assert h100.plan.peak <= 80 * GIB * memplan.HEADROOM
    # The published cap (12.8 MP: 16,384 image tokens) only fits with checkpointing.
    big = memfit.choose(lora_cfg(), shapes, budget=80 * GIB)
    assert big.plan.checkpointing and "switched on" in big.note


def test_explicit_flags_win():
    shapes = seven_b()
    cfg = lora_cfg(images_per_step=8, max_pixels=1003520, update_micro_batch="10",
                   gradient_checkpointing=True)
    fit = memfit.choose(cfg, shapes, budget=10_000 * GIB)
    assert (fit.plan.micro_batch, fit.plan.checkpointing) == (10, True)
    pinned = lora_cfg(gradient_checkpointing=False)  # 16,384-token images need checkpointing
    with pytest.raises(memfit.PlanError, match="--gradient_checkpointing true"):
        memfit.choose(pinned, shapes, budget=80 * GIB)


def test_refusal_names_max_pixels_that_fits():
    shapes = seven_b()
    with pytest.raises(memfit.PlanError) as e:
        memfit.choose(lora_cfg(), shapes, budget=30 * GIB)
    message = str(e.value)
    assert "\n" not in message and "--max_pixels" in message
    pixels = int(message.split("--max_pixels ")[1].split()[0])
    assert memfit.choose(lora_cfg(max_pixels=pixels), shapes, budget=30 * GIB)
    with pytest.raises(memfit.PlanError, match="weights, adapters and optimizer state alone"):
        memfit.choose(lora_cfg(), shapes, budget=12 * GIB)


def test_vllm_gets_what_the_plan_leaves():
    shapes = seven_b()
    cfg = lora_cfg(rollout_engine="vllm", max_pixels=1003520, images_per_step=4)
    fit = memfit.fit_with_engine(cfg, shapes, 80 * GIB, "cuda:0")
    assert fit.plan.vllm_sleeps and fit.plan.sampling_kv == 0  # the engine samples, and sleeps
    assert fit.plan.vllm == int(80 * GIB * memplan.HEADROOM) - fit.plan.fixed
    assert cfg.vllm_kv_cache_bytes == fit.plan.vllm - memplan.vllm_weight_bytes(cfg, shapes)
    assert cfg.vllm_kv_cache_bytes > 30 * GIB and "vLLM gets" in fit.note
    pinned = lora_cfg(rollout_engine="vllm", max_pixels=1003520, vllm_gpu_memory_utilization=0.3)
    assert memfit.fit_with_engine(pinned, shapes, 80 * GIB, "cuda:0").plan.vllm == int(24 * GIB)


def test_cpu_without_budget_keeps_todays_behaviour(tiny_model):
    cfg = lora_cfg(solver_model=tiny_model, dtype="float32", images_per_step=2)
    fit = memfit.plan_run(cfg, "cpu")
    assert fit.budget is None and cfg.gradient_checkpointing is False
    assert cfg.auto_micro_batch == 10
    tight = lora_cfg(solver_model=tiny_model, dtype="float32", images_per_step=2,
                     memory_budget_gib=0.15)
    memfit.plan_run(tight, "cpu")
    assert tight.auto_micro_batch == 5 and tight.gradient_checkpointing is False


def test_training_refuses_before_loading(tiny_model, image_dir, tmp_path, capsys):
    args = train_args(tiny_model, image_dir, str(tmp_path), "refused", memory_budget_gib="0.01")
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "memory plan needs" in err[0] and "--" in err[0]
    assert not os.path.exists(tmp_path / "refused")  # nothing made, nothing loaded


@pytest.mark.slow
def test_training_logs_the_plan_and_runs_the_chunk_it_chose(tiny_model, image_dir, tmp_path,
                                                            caplog):
    args = train_args(tiny_model, image_dir, str(tmp_path), "auto", steps=1, images_per_step="2",
                      memory_budget_gib="0.03")
    with caplog.at_level(logging.INFO, logger="ireasoner"):
        assert train.main(args) == 0
    assert "memory plan per rank" in caplog.text
    assert "--update_micro_batch auto -> 5; gradient checkpointing off" in caplog.text


def test_images_above_the_cap_are_resized_counted_and_logged(tmp_path, caplog):
    Image.new("RGB", (640, 480), (10, 20, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (56, 56), (10, 20, 30)).save(tmp_path / "small.png")
    pool = ImagePool(str(tmp_path), None, 0, max_pixels=112 * 112)
    with caplog.at_level(logging.INFO, logger="ireasoner"):
        sizes = [pool.get(i)[1].size for i in range(2)]
    assert pool.downscaled == 1 and max(w * h for w, h in sizes) <= 112 * 112
    assert "above the image cap" in caplog.text


# The issue asks for +-25%; the grid of docs/performance.md measured 0.94-1.09, so 15% here.
GRID_POINTS = [("tiny", (1, 5, 32, False, 0)), ("tiny", (2, 5, 32, False, 5)),
               ("tiny", (1, 5, 32, True, 0)), ("mid", (1, 5, 32, False, 0))]


@pytest.fixture(scope="module")
def grid_models(tmp_path_factory):
    from tools.memcheck import build
    root = str(tmp_path_factory.mktemp("memcheck"))
    return {preset: build(preset, root) for preset in ("tiny", "mid")}


@pytest.mark.parametrize("preset,point", GRID_POINTS)
def test_plan_within_15_percent_of_measured_update_peak(grid_models, preset, point):
    from tools.memcheck import measure
    r = measure(grid_models[preset], *point)
    assert r["plan"] == pytest.approx(r["measured"], rel=0.15), r
