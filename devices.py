"""Where the models' tensors live: the CUDA devices a process computes on (whose RNG states a
checkpoint saves, runtime.rng_state), and the faster command when one process spreads a model
over several GPUs that one GPU could hold.

`--device_map auto` in one process places one model copy over every visible GPU (accelerate's
dispatch: layers on each, their inputs moved from GPU to GPU). Only one GPU computes at a time.
Where the model fits on one GPU, `torchrun --nproc_per_node k ... --device_map local` runs k
processes, each with a full copy on its own GPU and its own --images_per_step images: about k
times the images at once. start_run logs that command (faster_command).

    python -m pytest tests/test_devices.py -q
"""
from __future__ import annotations

import logging
import shlex
import sys

import torch

log = logging.getLogger("ireasoner")

# The weights, gradients and AdamW moments may take this share of one GPU for faster_command
# to suggest one model per GPU: the rest is for activations, the rollouts' key/value caches and
# the allocator's slack.
FITS_SHARE = 0.5


def models_of(policies: dict) -> list[torch.nn.Module]:
    """Every distinct model the policies hold: a shared backbone once, frozen reference copies
    (full fine-tuning) too."""
    found = {}
    for policy in policies.values():
        for model in (policy.model, policy.ref_model):
            if model is not None:
                found[id(model)] = model
    return list(found.values())


def cuda_devices(policies: dict) -> list[int]:
    """Indices of the CUDA devices the policies' weights are on, in order: the rank's own device
    under torchrun (--device_map local), every GPU a --device_map auto model spans."""
    return sorted({p.device.index for model in models_of(policies) for p in model.parameters()
                   if p.device.type == "cuda"})


def training_bytes(policies: dict) -> int:
    """Bytes of the weights and buffers of every model, plus each trainable parameter's gradient
    (its dtype) and AdamW's two float32 moments."""
    total = 0
    for model in models_of(policies):
        for t in (*model.parameters(), *model.buffers()):
            total += t.numel() * t.element_size()
        total += sum(p.numel() * (p.element_size() + 8) for p in model.parameters()
                     if p.requires_grad)
    return total


def torchrun_command(argv: list[str], processes: int) -> str:
    """`argv` (a train.py command line, script first) under torchrun with one process per GPU:
    --device_map local in place of the one given (or added)."""
    script, args, out = argv[0], list(argv[1:]), []
    while args:
        arg = args.pop(0)
        if arg == "--device_map" and args:
            args.pop(0)
        elif not arg.startswith("--device_map="):
            out.append(arg)
    return shlex.join(["torchrun", "--nproc_per_node", str(processes), script, *out,
                       "--device_map", "local"])


def faster_command(cfg, world: int, policies: dict, argv: list[str] | None = None,
                   gpu_bytes=None) -> str | None:
    """The start-up note for --device_map auto in one process over k > 1 GPUs when the model
    (with its gradients and optimizer state) would fit in FITS_SHARE of one of them: the exact
    torchrun command that runs one copy per GPU instead. None when there is nothing faster.
    `gpu_bytes(index)`: a GPU's memory (default: torch.cuda's device properties)."""
    devices = cuda_devices(policies)
    if cfg.device_map != "auto" or world > 1 or len(devices) < 2:
        return None
    gpu_bytes = gpu_bytes or (lambda i: torch.cuda.get_device_properties(i).total_memory)
    need, smallest = training_bytes(policies), min(gpu_bytes(i) for i in devices)
    if need > FITS_SHARE * smallest:
        return None
    k, gib = len(devices), lambda b: f"{b / 2**30:.1f} GiB"
    return (f"--device_map auto spreads the model over {k} GPUs in one process, where only one "
            f"computes at a time, but it fits on one (weights, gradients and optimizer state "
            f"{gib(need)} of {gib(smallest)}). One process per GPU runs about {k} times as many "
            f"images at once ({k} x --images_per_step {cfg.images_per_step} per step): "
            f"{torchrun_command(argv or sys.argv, k)}")


def log_faster_command(cfg, world: int, policies: dict) -> None:
    """faster_command in the start-up log, if there is one."""
    note = faster_command(cfg, world, policies)
    if note:
        log.info(note)
