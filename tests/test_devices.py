"""Every tensor on the right device, on fake CUDA devices (no GPU needed): one training step's real
code on the tiny Qwen2.5-VL,

(a) whole on cuda:1, as rank 1 of a two-process data-parallel run (--device_map local), and
(b) split over cuda:0 and cuda:1 in one process, as --device_map auto splits it (vision tower
    and embeddings on cuda:0, the decoder layers half and half, lm_head on cuda:1; placed by
    accelerate's dispatch_model with transformers' auto map, see fake_devices.split_map).

What runs on fake devices (torch's FakeTensorMode: any op that mixes two devices raises): the
prompts' tensors and the vision tower, the prefill and the decode loop (the lean step and the
HF layers) for the token limit, the step embeddings, the update's forward with the reference
forward and the KL (micro-batched and not, gradient checkpointing on and off), the gradient
averaging, clipping (global and per device), the AdamW step and the parameter checksum.

What does not: the image processor and the tokenizer (CPU code on PIL images and strings; their
tensors are moved to the devices as the trainer moves them); values. The step first runs for
real on the CPU, and every value the fake run needs (the sampled ids read back as text, the
decode loop's "all rows done?", rewards, losses, the multimodal rope index computed from the
image grid) is the real run's, replayed (fake_devices.py). Backward needs a CUDA context, so in
the fake run each trainable parameter gets a fake gradient on its own device instead; backward
itself is tested on real CPU tensors (test_update.py, test_fidelity.py).

    python -m pytest tests/test_devices.py
"""
import logging
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import checkpoint
import devices
import runtime
import train
import vlm
from config import Config
from data_and_utils import ImagePool
from fake_devices import PlayedRank, Tape, place_split, place_whole, recording, replaying, split_map
from sampling import decode_path

MAX_TOKENS = 4


def make_cfg(model, images, **flags):
    base = dict(data_dir=images, solver_model=model, proposer_model=model, use_lora_solver=True,
                use_lora_proposer=True, dtype="float32", device_map="cpu", lora_dropout=0.0,
                max_new_tokens_solver=MAX_TOKENS, max_new_tokens_proposer=MAX_TOKENS,
                proposer_update_freq=1, num_solver_samples=3, repetition_penalty=1.05,
                step_embedder="hidden_states")
    return Config(**{**base, **flags})


def new_run(cfg, dist, policies=None, pool=None):
    torch.manual_seed(0)
    if policies is None:
        pool = ImagePool(cfg.data_dir, cfg.include_subfolders_list, cfg.seed, cfg.max_pixels)
        policies, _ = train.build_models(cfg, pool)
    return train.Run(cfg=cfg, dist=dist, name="fake", dir="unused", pool=pool, policies=policies,
                     optimizers=train.make_optimizers(cfg, policies),
                     st=train.TrainState(kl_coef={r: cfg.kl_coef for r in vlm.ROLES}),
                     stop=no_signal_stop())


def no_signal_stop() -> train.Stop:
    """The trainer's Stop (polled every decode step) without its signal handlers."""
    stop = train.Stop.__new__(train.Stop)
    stop.signum = 0
    return stop


STEPS = ["Step 1: count the red circles", "Step 2: there are 3"]


def step_and_embeddings(run):
    records = train.train_step(run, 1)
    solver = run.policies["solver"]
    embeddings = [vlm.embed_steps(solver, STEPS, kind, 16)
                  for kind in ("input_embeddings", "hidden_states")]
    return records, embeddings


def on_fake_devices(cfg, placement: str):
    """One step for real on the CPU (recorded), then the same step with the same policies placed
    on fake devices (replayed). Returns (real records, fake records, the fake run's devices)."""
    real_dist, fake_dist = {"whole": (PlayedRank(1, 2, "cpu"), PlayedRank(1, 2, "cuda:1")),
                            "split": (PlayedRank(0, 1, "cpu"), PlayedRank(0, 1, "cuda:0"))}[placement]
    run = new_run(cfg, real_dist)
    tape = Tape()
    with recording(tape):
        real = step_and_embeddings(run)
    models = list({id(p.model): p.model for p in run.policies.values()}.values())
    with replaying(tape, models):
        for model in models:
            if placement == "whole":
                place_whole(model, "cuda:1")
            else:
                place_split(model.get_base_model(), split_map(model.get_base_model()))
        run = new_run(cfg, fake_dist, run.policies, run.pool)  # optimizers over the placed parameters
        fake = step_and_embeddings(run)
        path = decode_path(vlm.core_model(models[0]).language_model,
                           models[0].get_output_embeddings(), cfg.lean_decode)
    assert devices.cuda_devices(run.policies) == ([1] if placement == "whole" else [0, 1])
    used = {str(p.device) for m in models for p in m.parameters()}
    assert all(isinstance(p, FakeTensor) for m in models for p in m.parameters())
    assert tape.replayed > 0
    return real, fake, used, path


CASES = {  # name: (placement, flags)
    "rank1-lean": ("whole", dict(images_per_step=2)),
    "rank1-hf-checkpointing-micro": ("whole", dict(lean_decode=False, gradient_checkpointing=True,
                                                   update_micro_batch=2)),
    "auto-lean-micro-per-device-clip": ("split", dict(images_per_step=2, update_micro_batch=2,
                                                      grad_clip_per_device=True)),
    "auto-hf-checkpointing": ("split", dict(lean_decode=False, gradient_checkpointing=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_training_step_on_fake_devices(case, tiny_model, image_dir):
    placement, flags = CASES[case]
    cfg = make_cfg(tiny_model, image_dir, **flags)
    (real, real_emb), (fake, fake_emb), used, path = on_fake_devices(cfg, placement)
    assert used == ({"cuda:1"} if placement == "whole" else {"cuda:0", "cuda:1"})
    assert [r["solver_outputs"] for r in fake] == [r["solver_outputs"] for r in real]
    assert max(n for r in real for n in r["completion_lengths"]) == MAX_TOKENS
    assert [tuple(e.shape) for e in fake_emb] == [tuple(e.shape) for e in real_emb]
    # The lean step runs on a split model too, and says so at start-up.
    if cfg.lean_decode:
        assert path[0] == "lean"
        assert ("cuda:0 + cuda:1 (split" in path[1]) == (placement == "split"), path


def test_offloaded_weights_take_the_hf_layers(tiny_model, image_dir):
    """--device_map auto offloads what the GPUs cannot hold (weights on the meta device, loaded
    by accelerate's hooks per call): the lean step, which reads raw weights, is not taken."""
    policies = vlm.build_policies(make_cfg(tiny_model, image_dir))
    model = policies["solver"].model
    with replaying(Tape(), [model]):
        device_map = split_map(model.get_base_model())
        device_map["model.language_model.layers.1"] = "cpu"
        place_split(model.get_base_model(), device_map)
        path, why = decode_path(vlm.core_model(model).language_model,
                                model.get_output_embeddings())
    assert path == "hf layers" and "offloaded" in why


# ---------------------------------------------------------------- the faster command
def spread_policies(layout: dict):
    """Policies whose one shared model has a 1000x1000 float32 Linear (4 MB) on each device of
    `layout` ({device: trainable}), on fake devices."""
    with FakeTensorMode():
        layers = [torch.nn.Linear(1000, 1000, bias=False, device=d).requires_grad_(t)
                  for d, t in layout.items()]
    model = torch.nn.Sequential(*layers)
    return {r: SimpleNamespace(model=model, ref_model=None) for r in vlm.ROLES}


ARGV = ["train.py", "--data_dir", "my images", "--device_map", "auto", "--images_per_step", "2"]


def test_faster_command_when_auto_spreads_a_model_that_fits_on_one_gpu():
    policies = spread_policies({"cuda:0": False, "cuda:1": False, "cuda:2": False, "cuda:3": True})
    cfg = Config(device_map="auto", images_per_step=2)
    assert devices.cuda_devices(policies) == [0, 1, 2, 3]
    # 4 x 4 MB of weights, 4 MB of gradients and 8 MB of AdamW moments for the trainable one
    assert devices.training_bytes(policies) == 4 * 4_000_000 + 12_000_000
    note = devices.faster_command(cfg, 1, policies, ARGV, gpu_bytes=lambda i: 80 << 30)
    assert note.endswith(": torchrun --nproc_per_node 4 train.py --data_dir 'my images' "
                         "--images_per_step 2 --device_map local"), note
    assert "about 4 times as many images at once (4 x --images_per_step 2 per step)" in note
    # --device_map=auto, or no --device_map (auto is the default): the same command
    for argv in (ARGV[:3] + ["--device_map=auto"] + ARGV[5:], ARGV[:3] + ARGV[5:]):
        assert devices.faster_command(cfg, 1, policies, argv, gpu_bytes=lambda i: 80 << 30) == note


def test_no_faster_command_where_there_is_none():
    spread = spread_policies({"cuda:0": True, "cuda:1": True})
    fits = lambda i: 80 << 30  # noqa: E731
    assert devices.faster_command(Config(device_map="auto"), 1, spread, ARGV, fits) is not None
    # too large for one GPU (24 MB needed, more than half of 40 MB)
    assert devices.faster_command(Config(device_map="auto"), 1, spread, ARGV,
                                  gpu_bytes=lambda i: 40_000_000) is None
    # one GPU; already one process per GPU; a device map the user chose
    one = spread_policies({"cuda:1": True})
    assert devices.faster_command(Config(device_map="auto"), 1, one, ARGV, fits) is None
    assert devices.faster_command(Config(device_map="auto"), 2, spread, ARGV, fits) is None
    assert devices.faster_command(Config(device_map="cpu"), 1, spread, ARGV, fits) is None


def test_faster_command_is_in_the_start_up_log(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=80 << 30))
    monkeypatch.setattr("sys.argv", ARGV)
    with caplog.at_level(logging.INFO, logger="ireasoner"):
        devices.log_faster_command(Config(device_map="auto"), 1,
                                   spread_policies({"cuda:0": True, "cuda:1": True}))
    assert "torchrun --nproc_per_node 2 train.py" in caplog.text


# ---------------------------------------------------------------- RNG state per device
class FakeCuda:
    """torch.cuda's RNG calls on `count` visible GPUs: one distinct state per device; a device
    index past the count raises, as CUDA does."""

    def __init__(self, monkeypatch, count: int):
        self.count, self.states, self.read, self.written = count, {}, [], {}
        for name in ("is_available", "device_count", "current_device", "get_rng_state",
                     "set_rng_state"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self):
        return True

    def device_count(self):
        return self.count

    def current_device(self):
        return 0

    def _check(self, device):
        if not 0 <= device < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {device}")

    def get_rng_state(self, device):
        self._check(device)
        self.read.append(device)
        return torch.full((16,), device, dtype=torch.uint8)

    def set_rng_state(self, state, device):
        self._check(device)
        self.written[device] = int(state[0])


def round_trip(tmp_path, rngs: list) -> dict:
    """The RNG states through a checkpoint's state files and their validation."""
    state = {"step": 1, "world_size": len(rngs), "train_state": {"step": 1}, "config": {},
             "rng": rngs, "optimizers": {}}
    checkpoint.write_state(str(tmp_path), state)
    return checkpoint.validate(checkpoint.read_state(str(tmp_path)), 1)["rng"]


def test_each_rank_saves_only_its_own_gpu_and_resumes_on_fewer(monkeypatch, tmp_path):
    cuda = FakeCuda(monkeypatch, 2)
    rngs = [runtime.rng_state([0]), runtime.rng_state([1])]  # rank 0 on cuda:0, rank 1 on cuda:1
    assert cuda.read == [0, 1]  # no rank touched the other's GPU
    assert [r["cuda_devices"] for r in rngs] == [[0], [1]]
    rngs = round_trip(tmp_path, rngs)
    cuda = FakeCuda(monkeypatch, 1)  # resumed on one GPU, one process
    assert runtime.set_rng_state(rngs[0], [0]) is None and cuda.written == {0: 0}
    cuda = FakeCuda(monkeypatch, 2)  # resumed on two, under torchrun: rank 1 on cuda:1
    assert runtime.set_rng_state(rngs[1], [1]) is None and cuda.written == {1: 1}


def test_a_split_model_resumes_on_another_number_of_gpus(monkeypatch, tmp_path):
    FakeCuda(monkeypatch, 4)
    saved = round_trip(tmp_path, [runtime.rng_state([0, 1, 2, 3])])[0]
    cuda = FakeCuda(monkeypatch, 2)
    note = runtime.set_rng_state(saved, [0, 1])
    assert cuda.written == {0: 0, 1: 1} and "4 saved CUDA RNG states for 2 GPUs" in note
    cuda = FakeCuda(monkeypatch, 8)
    note = runtime.set_rng_state(saved, list(range(8)))
    assert cuda.written == {0: 0, 1: 1, 2: 2, 3: 3} and "4 restored" in note


def test_older_checkpoints_with_every_visible_gpu_still_resume(monkeypatch, tmp_path):
    """Before "cuda_devices", each rank saved every visible GPU's state, by index."""
    cuda = FakeCuda(monkeypatch, 8)
    old = [runtime.rng_state(list(range(8))) for rank in range(2)]
    for rng in old:
        del rng["cuda_devices"]
    old = round_trip(tmp_path, old)[1]
    cuda = FakeCuda(monkeypatch, 2)  # rank 1 of 2, on a node with 2 GPUs
    assert runtime.set_rng_state(old, [1]) is None and cuda.written == {1: 1}


def test_malformed_cuda_devices_are_refused_in_one_line(monkeypatch, tmp_path):
    FakeCuda(monkeypatch, 2)
    rng = runtime.rng_state([0, 1])
    rng["cuda_devices"] = [0]
    with pytest.raises(checkpoint.StateProblem, match="cuda_devices does not name one device "
                                                      "index per CUDA state"):
        round_trip(tmp_path, [rng])
