"""--deterministic: the settings under which a run, and a run resumed from its checkpoint, repeat
bit for bit on GPUs (docs/reliability.md, "Exactness").

Without it a resume restores everything a run decides with (data order, every RNG stream,
optimizer moments, baselines, KL coefficients), so it samples and updates as the unbroken run
would, but its numbers agree with that run's only up to the kernels that are not deterministic:
on GPUs, cuBLAS with several streams and the backward of SDPA and flash attention sum in an order
that varies from run to run, and a sampled token can flip once the logits differ in the last bit.
On a CPU the trainer is deterministic at any fixed thread count without the flag.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("ireasoner")

# cuBLAS's documented settings for reproducible results (its "Results reproducibility"):
# one fixed workspace per stream instead of a pool that streams share.
CUBLAS_WORKSPACE_CONFIGS = (":4096:8", ":16:8")


def use_deterministic_algorithms() -> dict:
    """Make every kernel this process runs deterministic, or raise where torch has none for an
    op (torch.use_deterministic_algorithms; no op in our path raises, see tests). cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when its first handle is made, so this runs before CUDA is
    initialized. Returns the settings, for the start-up log."""
    if torch.cuda.is_initialized():
        raise RuntimeError("use_deterministic_algorithms() must run before CUDA is initialized")
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_WORKSPACE_CONFIGS:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIGS[0]
    # transformers passes deterministic=True to flash-attn's backward (--attn_implementation
    # flash_attention_2) when this is set; torch's own SDPA kernels follow the global flag.
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False  # benchmarking may pick another algorithm per run
    return {"CUBLAS_WORKSPACE_CONFIG": os.environ["CUBLAS_WORKSPACE_CONFIG"],
            "FLASH_ATTENTION_DETERMINISTIC": "1", "use_deterministic_algorithms": True,
            "cudnn.deterministic": True, "cudnn.benchmark": False}
