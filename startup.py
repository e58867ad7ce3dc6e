"""What a starting run says about itself: the images it found and where, the run folder, and
how to come back to it. Printed once by rank 0, before the first step."""
from __future__ import annotations

import os
from collections import Counter


def pool_summary(pool, known_bad: int = 0) -> str:
    """'found 14 images in data/: 9 in a/, 5 in b/; 2 known unreadable (skipped)'."""
    n = len(pool.paths)
    line = f"found {n} image{'s' if n != 1 else ''} in {pool.data_dir}"
    firsts = Counter(_first_folder(pool.data_dir, p) for p in pool.paths)
    if None not in firsts:  # the layout with first-level subfolders
        line += ": " + ", ".join(f"{count} in {name}/" for name, count in sorted(firsts.items()))
    if known_bad:
        line += f"; {known_bad} known unreadable from earlier steps (skipped)"
    return line


def _first_folder(data_dir: str, path: str) -> str | None:
    parts = os.path.relpath(path, data_dir).split(os.sep)
    return parts[0] if len(parts) > 1 and parts[0] != os.pardir else None


def run_summary(name: str, run_dir: str, resumed: str | None, next_step: int,
                generated: bool) -> str:
    """Where the run lives and how to resume it: a generated name is new at every launch, so
    rerunning the same command would start afresh."""
    if resumed:
        return f"run {name} ({run_dir}): resuming from {resumed} at step {next_step}"
    line = f"new run {name} in {run_dir}: starting at step 1"
    if generated:
        line += f"; to resume it later pass --wandb_run_name {name}"
    else:
        line += "; rerun the same command to resume it"
    return line
