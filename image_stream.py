"""Which images one training step trains, on which rank.

The pool's seeded per-epoch orders, laid end to end, form one endless stream of positions.
A cursor (saved in the trainer state) marks the first position no step has used yet. Each
step walks the stream from the cursor, skips the files known to be unreadable, and deals the
next readable ones out in blocks of `count`, rank 0 first. Each rank decodes only its own
block. A file that fails to decode is reported to every rank (one gather), joins the known-bad
set, and the ranks that lost an image are dealt replacements from further down the stream, in
rank order. The cursor then moves past every position walked.

So every position is used by exactly one rank exactly once: each readable image trains once per
epoch, whatever is unreadable, and the per-rank blocks are disjoint. The walk depends only on
the cursor and the known-bad set, which every rank holds identically and every checkpoint
saves, so a resumed run draws what the unbroken run drew.

Why not check every file up front: a header check misses truncated files, and decoding the
whole folder before step 1 costs a full pass over the data (hours on a large folder).
"""
from __future__ import annotations

import logging

from data_and_utils import BadImage, ImagePool
from distributed import UserError

log = logging.getLogger("ireasoner")


def position(pool: ImagePool, pos: int) -> str:
    """The path at a stream position: epoch pos // n, index pos % n."""
    n = len(pool.paths)
    return pool.order(pos // n)[pos % n]


def deal(pool: ImagePool, cursor: int, needs: list[int]) -> tuple[list[list[str]], int]:
    """From `cursor` on, skipping pool.bad, the next readable paths: needs[r] of them for rank r,
    in rank order. Returns (paths per rank, the position after the last one walked)."""
    n = len(pool.paths)
    if len(pool.bad) >= n:
        example = next(iter(pool.bad))
        raise UserError(f"no readable image in {pool.data_dir}: all {n} files failed to load "
                        f"(e.g. {example}: {pool.bad[example]})")
    out: list[list[str]] = []
    for need in needs:
        mine: list[str] = []
        while len(mine) < need:
            path = position(pool, cursor)
            cursor += 1
            if path not in pool.bad:
                mine.append(path)
        out.append(mine)
    return out, cursor


def draw(pool: ImagePool, cursor: int, rank: int, world: int, count: int, gather,
         max_failures: int | None = None) -> tuple[list[tuple[str, object]], int, dict]:
    """This rank's `count` (path, image) pairs for one step. `gather(obj)` returns every
    rank's obj in rank order (Dist.gather). Returns (pairs, the new cursor, the files found
    unreadable in this draw by any rank: path -> reason). Known-bad files are never retried."""
    max_failures = pool.max_retries if max_failures is None else max_failures
    needs, got, found = [count] * world, [], {}
    while any(needs):
        blocks, cursor = deal(pool, cursor, needs)
        failed: list[tuple[str, str]] = []  # a list: a block crossing epochs may hold a file twice
        for path in blocks[rank]:
            if path in dict(failed):
                failed.append((path, dict(failed)[path]))
                continue
            try:
                got.append((path, pool.load(path)))
            except BadImage as e:
                log.warning("skipping bad image %s: %s", path, e)
                failed.append((path, str(e)))
        reports = gather(failed)
        needs = [len(r) for r in reports]
        for r in reports:
            pool.bad.update(r)
            found.update(r)
        if len(found) >= max_failures and any(needs):
            raise UserError(f"{len(found)} unreadable images in one step in {pool.data_dir} "
                            f"(last: {next(reversed(found))}); check the data folder")
    pool.skipped += len(found)
    return got, cursor, found


def saved_cursor(saved: dict) -> int:
    """The cursor of a checkpoint's state. Checkpoints from before the cursor existed used
    position ((step - 1) * world + rank) * B at step `step`, so they continue after step's."""
    cursor = saved["train_state"].get("image_cursor")
    if isinstance(cursor, int) and not isinstance(cursor, bool) and cursor >= 0:
        return cursor
    if cursor is not None:
        raise UserError(f"checkpoint of step {saved['step']}: train_state.image_cursor is "
                        f"{cursor!r}, not a position; resume from an older checkpoint")
    config = saved.get("config") or {}
    return saved["step"] * int(saved.get("world_size") or 1) * int(config.get("images_per_step") or 1)
