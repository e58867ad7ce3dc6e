"""Process setup shared by every entry point (train.py, run.py, bench.py): seeding, the RNG
state a checkpoint saves per rank, and the allocator setting the training loop wants.

    python -m pytest tests/test_train.py -q
"""
from __future__ import annotations

import ctypes
import logging
import random

import numpy as np
import torch

log = logging.getLogger("ireasoner")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator a step draws from: saved so a resumed run samples what an unbroken one
    would. Plain data only (lists, numbers, tensors), so a checkpoint stores it as JSON plus
    safetensors and loading it never unpickles anything (checkpoint.py)."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(keys), gauss],
            "numpy": {"name": name, "keys": mt.tolist(), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    """Inverse of rng_state. Raises ValueError/TypeError/KeyError on a malformed state."""
    version, keys, gauss = s["python"]
    random.setstate((version, tuple(keys), gauss))
    n = s["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def keep_freed_memory() -> None:
    """Every step allocates and frees the same large CPU tensors. glibc returns blocks over
    128 KiB to the kernel on free, so the next step page-faults them back in: ~40k faults and
    0.1-0.5 s of system time per tiny-model CPU step, measured on a 2-core CPU (bench.py). Keep
    freed memory for reuse instead; the process then stays at its peak RSS. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        log.debug("no glibc: malloc left as is")
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, from <malloc.h>
    for param in (m_mmap_threshold, m_trim_threshold):
        if not libc.mallopt(param, 1 << 30):
            log.debug("glibc refused mallopt(%d)", param)
