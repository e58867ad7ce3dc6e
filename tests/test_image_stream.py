"""Every readable image trains once per epoch on one rank, whatever is unreadable, and a resume
draws what the unbroken run drew (image_stream.py). Ranks are threads with a real gather.

    python -m pytest tests/test_image_stream.py -q
"""
import json
import os
import sys
import threading
from collections import Counter

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import image_stream  # noqa: E402
from data_and_utils import ImagePool  # noqa: E402
from distributed import UserError  # noqa: E402

MAX_PIXELS = 64 * 28 * 28
BAD_CONTENT = [b"", b"not an image\n" * 10, b"\x89PNG\r\n\x1a\n\x00\x00"]


def make_folder(root, n_files: int, bad_at: list[int], seed: int = 1) -> tuple[str, set]:
    """n_files PNGs; those at positions bad_at of epoch 0's order are then made unreadable.
    Returns (folder, the readable paths)."""
    folder = os.path.join(root, "imgs")
    os.makedirs(folder)
    for i in range(n_files):
        Image.new("RGB", (32, 32), (i * 20 % 256, 40, 90)).save(os.path.join(folder, f"{i:02d}.png"))
    order = ImagePool(folder, None, seed, MAX_PIXELS).order(0)
    for k, pos in enumerate(bad_at):
        with open(order[pos], "wb") as f:
            f.write(BAD_CONTENT[k % len(BAD_CONTENT)])
    return folder, {p for i, p in enumerate(order) if i not in bad_at}


def run_steps(folder, world: int, count: int, steps: int, cursor: int = 0, bad: dict | None = None,
              seed: int = 1) -> tuple[list, int, dict]:
    """`steps` steps on `world` thread-ranks, each with its own pool, as the trainer does.
    Returns ([[rank 0's paths, rank 1's, ...] per step], the cursor, the bad files)."""
    pools = [ImagePool(folder, None, seed, MAX_PIXELS) for _ in range(world)]
    for pool in pools:
        pool.bad.update(bad or {})
    box, barrier = [None] * world, threading.Barrier(world)

    def gather(rank):
        def _gather(obj):
            box[rank] = obj
            barrier.wait()
            out = list(box)
            barrier.wait()
            return out
        return _gather

    result, errors = [[None] * world for _ in range(steps)], []
    cursors, found_all = [cursor] * world, [dict(bad or {}) for _ in range(world)]

    def rank_main(rank):
        try:
            for s in range(steps):
                got, cursors[rank], found = image_stream.draw(
                    pools[rank], cursors[rank], rank, world, count, gather(rank))
                result[s][rank] = [p for p, _ in got]
                found_all[rank].update(found)
        except Exception as e:  # noqa: BLE001 -- re-raised in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    assert len(set(cursors)) == 1 and all(f == found_all[0] for f in found_all)
    return result, cursors[0], found_all[0]


@pytest.mark.parametrize("world,count", [(1, 1), (1, 3), (2, 1), (2, 2)])
@pytest.mark.parametrize("bad_at", [[0], [5], [11], [0, 1, 5, 11]], ids=["start", "middle",
                                                                        "end", "all"])
def test_each_readable_image_once_per_epoch(tmp_path, world, count, bad_at):
    folder, readable = make_folder(str(tmp_path), 12, bad_at)
    per_step = world * count
    epochs = 2
    steps = epochs * len(readable) // per_step
    drawn, _, bad = run_steps(folder, world, count, steps)
    assert set(bad) == {p for p in ImagePool(folder, None, 1, MAX_PIXELS).paths} - readable
    flat = [p for step in drawn for rank in step for p in rank]
    assert all(len(rank) == count for step in drawn for rank in step)
    for e in range(epochs):  # the readable images of epoch e, each exactly once
        window = flat[e * len(readable):(e + 1) * len(readable)]
        if len(window) == len(readable):
            assert Counter(window) == Counter(readable), f"epoch {e}"
    # The ranks' blocks are disjoint (a step that straddles two epochs may meet an image of
    # each, as any per-epoch shuffle does).
    for step in drawn[:len(readable) // per_step]:
        paths = [p for rank in step for p in rank]
        assert len(paths) == len(set(paths))


@pytest.mark.parametrize("world,count", [(1, 2), (2, 1), (2, 2)])
def test_resume_draws_what_the_unbroken_run_drew(tmp_path, world, count):
    folder, readable = make_folder(str(tmp_path), 12, [0, 4, 5, 11])
    unbroken, _, _ = run_steps(folder, world, count, 8)
    for stop in (1, 2, 3, 5):
        first, cursor, bad = run_steps(folder, world, count, stop)
        saved = json.loads(json.dumps({"cursor": cursor, "bad": bad}))  # as a checkpoint holds them
        rest, _, _ = run_steps(folder, world, count, 8 - stop, saved["cursor"], saved["bad"])
        assert first + rest == unbroken, f"stopped after step {stop}"


def test_issue_reproduction_no_image_twice(tmp_path):
    """astronaut.png, coffee.png and an empty bad.png, 3 single-image steps: the old pool gave
    astronaut.png at steps 1 and 2 (the bad file's place was filled by the next image)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("astronaut.png", "coffee.png"):
        Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / name)
    (folder / "bad.png").write_bytes(b"")
    for seed in range(6):  # whatever the order, the two readable images alternate
        drawn, _, _ = run_steps(str(folder), 1, 1, 4, seed=seed)
        names = [os.path.basename(s[0][0]) for s in drawn]
        assert names[0] != names[1] and names[2] != names[3], (seed, names)
        assert sorted(names[:2]) == ["astronaut.png", "coffee.png"]


def test_all_unreadable_is_one_error_on_every_rank(tmp_path):
    folder, _ = make_folder(str(tmp_path), 3, [0, 1, 2])
    with pytest.raises(UserError, match="all 3 files failed"):
        run_steps(folder, 2, 1, 1)


def test_old_checkpoint_cursor():
    state = {"step": 6, "world_size": 2, "config": {"images_per_step": 3}, "train_state": {}}
    assert image_stream.saved_cursor(state) == 36  # step 7 began at ((7 - 1) * 2 + 0) * 3
    state["train_state"]["image_cursor"] = 40
    assert image_stream.saved_cursor(state) == 40
    state["train_state"]["image_cursor"] = -1
    with pytest.raises(UserError, match="image_cursor"):
        image_stream.saved_cursor(state)
