"""Image-pool scan on a large generated folder: scan time, memory, time to the first training image.

    python scripts/bench_scan.py                      # 200,000 files in the temp folder (made once)
    python scripts/bench_scan.py --files 20000 --root scan-small

Generates ROOT/data/<4 subfolders>/<50 folders>/<10 folders>/img_N.png (tiny valid PNGs; the
scan never opens them), then times, in one process: a plain scan (os.walk + a stat per
file, the yardstick of the ratio), the pool's scan (os.scandir, d_type only), building the
ImagePool (scan + sort), and the first image the trainer would get (pool.get(0)). Memory is
the Python allocation peak of building the pool (tracemalloc) and the process's peak RSS.
Also checks that two pools (as on two ranks) give the same seeded order.
"""
from __future__ import annotations

import io
import os
import resource
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

import cli  # noqa: E402
import data_and_utils as D  # noqa: E402


def make_tree(data: str, files: int) -> None:
    """files tiny PNGs in 4 x 50 x 10 leaf folders; skipped when already complete."""
    done = os.path.join(data, ".complete")
    if os.path.exists(done):
        return
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    leaves = [os.path.join(data, f"part{a}", f"d{b:02d}", f"e{c}")
              for a in range(4) for b in range(50) for c in range(10)]
    for leaf in leaves:
        os.makedirs(leaf, exist_ok=True)
    for i in range(files):
        with open(os.path.join(leaves[i % len(leaves)], f"img_{i:07d}.png"), "wb") as f:
            f.write(png)
    open(done, "w").close()


def plain_scan(root: str) -> list[str]:
    """The plain walker: os.walk, realpath per folder, os.path.isfile (a stat) per file."""
    found, visited = [], set()
    for sub in sorted(os.listdir(root)):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub), followlinks=True):
            real = os.path.realpath(dirpath)
            if real in visited:
                dirnames[:] = []
                continue
            visited.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                path = os.path.join(dirpath, name)
                if (not name.startswith(".") and name.lower().endswith(D.IMAGE_EXTENSIONS)
                        and os.path.isfile(path)):
                    found.append(path)
    return found


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python scripts/bench_scan.py", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "ireasoner-scan-bench"))
    ap.add_argument("--files", type=int, default=200_000)
    args = cli.parse_or_exit(ap, argv)
    data = os.path.join(args.root, f"data-{args.files}")
    _, made = timed(lambda: make_tree(data, args.files))
    print(f"tree: {args.files} files in 2000 folders under {data} (made/checked in {made:.1f} s)")
    # warm the dentry cache the same way for both walkers, then time each in turn
    D.find_images(data, [])
    old, t_old = timed(lambda: plain_scan(data))
    new, t_new = timed(lambda: D.find_images(data, []))
    assert sorted(old) == sorted(new) and len(new) == args.files, (len(old), len(new))
    del old, new
    rss0 = rss_mib()
    t0 = time.perf_counter()
    pool = D.ImagePool(data, [], seed=42, max_pixels=256 * 28 * 28)
    t_pool = time.perf_counter() - t0
    path, image = pool.get(0)
    t_first = time.perf_counter() - t0
    rss1 = rss_mib()
    tracemalloc.start()  # slows allocation several-fold: a separate build, not timed
    D.ImagePool(data, [], seed=42, max_pixels=256 * 28 * 28).order(0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    other = D.ImagePool(data, [], seed=42, max_pixels=256 * 28 * 28)  # as a second rank builds it
    assert other.order(0) == pool.order(0) and other.fingerprint() == pool.fingerprint()
    print(f"plain scan (os.walk + stat per file):    {t_old:.2f} s")
    print(f"pool scan (os.scandir, d_type):           {t_new:.2f} s  ({t_old / t_new:.1f}x faster)")
    print(f"ImagePool built (scan + sort):            {t_pool:.2f} s")
    print(f"first training image (pool + get(0)):     {t_first:.2f} s  {os.path.basename(path)} "
          f"{image.size}")
    print(f"memory: the pool holds {rss1 - rss0:.0f} MiB of RSS; Python allocation peak while "
          f"building it and its first order: {peak / 2**20:.1f} MiB")
    print("order: two pools give the same seeded order (as every rank does)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
