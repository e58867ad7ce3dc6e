"""The paper's training images: 2,500 unlabeled images from the training splits of ChartQA, AI2D,
InfoGraphic-VQA, PlotQA, ChartX and Geometry3K, one first-level folder per source (so
--include_subfolders picks sources), a manifest, and no image of the table's evaluation sets.

    pip install datasets
    python scripts/prepare_paper_data.py --out data/paper --source chartx=/path/to/ChartX_png
    python scripts/prepare_paper_data.py --out data/paper --source chartqa=/mirror/chartqa \
        --source chartx=/path/to/ChartX_png --eval_set /mirror/chartqa_test.parquet   # offline

A source or evaluation set is a Hugging Face dataset id (read with `datasets.load_dataset`, from
the hub or the local cache) or a local copy: a parquet/arrow file, a folder of them or of images
(a downloaded hub snapshot), or a `save_to_disk` folder. Add `#config` and `@split` to either.
Per source, rows are taken in a seeded random order (seed and source name, so one source's count
never moves another's draw); an image is skipped when its pixels (SHA-256 of size and RGB bytes)
equal an evaluation image's (counted as leaked) or an image already taken (counted as
duplicate). Writes <out>/<source>/<source>_<row>.<ext>, <out>/manifest.jsonl (file, source,
dataset, config, split, row, id, content hash) and <out>/summary.json; <out> must not exist (it
is written as <out>.partial and renamed at the end). docs/reproduce.md: why these ids and counts.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper_table import BENCHMARKS  # noqa: E402  (the table's evaluation sets)


@dataclass(frozen=True)
class Source:
    name: str     # the folder and the manifest's source
    spec: str     # default dataset id (with #config), "" where none is loadable
    why: str


# The paper names the six sources and the total only. Ids: the original release where it is on
# the hub with images and a train split; else HuggingFaceM4/the_cauldron's subset (Idefics2's
# fine-tuning mix, from the sources' training data; the leakage filter checks it regardless).
SOURCES = (
    Source("chartqa", "HuggingFaceM4/ChartQA", "the authors' splits (train 28.3k questions)"),
    Source("ai2d", "HuggingFaceM4/the_cauldron#ai2d",
           "the AI2D copy lmms-eval scores is its test split"),
    Source("infovqa", "HuggingFaceM4/the_cauldron#infographic_vqa",
           "lmms-eval's copy is evaluation data"),
    Source("plotqa", "HuggingFaceM4/the_cauldron#plotqa", "PlotQA's train images with datasets"),
    Source("chartx", "", "ChartX (U4R/ChartX) is a zip of PNGs and JSON, no train split: "
           "unzip it and pass the folder"),
    Source("geometry3k", "hiyouga/geometry3k", "Geometry3K's train/validation/test as parquet"),
)
EVAL_SPLITS = ("test", "testmini", "validation", "val")


def equal_counts(total: int) -> dict[str, int]:
    """total split as evenly as possible, the first sources in the paper's order one more."""
    q, r = divmod(total, len(SOURCES))
    return {s.name: q + (i < r) for i, s in enumerate(SOURCES)}


def parse_spec(spec: str, default_split: str | None) -> tuple[str, str | None, str | None]:
    """'path_or_id#config@split' -> (path_or_id, config, split)."""
    split = default_split
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    config = None
    if "#" in spec:
        spec, config = spec.rsplit("#", 1)
    if not spec or split == "" or config == "":
        raise ValueError(f"bad dataset spec {spec!r}: expected ID_OR_PATH[#CONFIG][@SPLIT]")
    return spec, config, split


def load(spec: str, default_split: str | None):
    """A datasets Dataset (one split) or, when the split is None, a list of every split."""
    import datasets
    path, config, split = parse_spec(spec, default_split)
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                   for f in ("dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(path)
    elif os.path.isfile(path):
        ext = path.rsplit(".", 1)[-1].lower()
        if ext not in ("parquet", "arrow"):
            raise ValueError(f"{path}: expected a .parquet or .arrow file")
        ds = datasets.load_dataset(ext, data_files={split or "train": path})
    else:  # a hub id (or its local cache), or a local snapshot / image folder
        ds = datasets.load_dataset(path, name=config, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            return list(ds.values())
        if split not in ds:
            raise ValueError(f"{spec}: no split {split!r} (it has {', '.join(ds)})")
        return ds[split]
    return [ds] if split is None else ds


def _is_image(feature) -> bool:
    import datasets
    inner = getattr(feature, "feature", None)
    return isinstance(feature, datasets.Image) or isinstance(inner, datasets.Image)


def image_columns(ds) -> list[str]:
    return [name for name, f in ds.features.items() if _is_image(f)]


def undecoded(ds, columns):
    """The same rows with images as {"bytes", "path"}: decode only the images we hash."""
    import datasets
    for c in columns:
        f = ds.features[c]
        ds = ds.cast_column(c, datasets.Image(decode=False) if isinstance(f, datasets.Image)
                            else type(f)(datasets.Image(decode=False)))
    return ds


def image_bytes(value) -> bytes | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if not value:
        return None
    if value.get("bytes"):
        return value["bytes"]
    with open(value["path"], "rb") as f:
        return f.read()


def pixel_hash(data: bytes):
    """(sha256 of size + RGB pixels, PIL format): the same picture in another container or
    encoding of the same pixels hashes the same; a resized or re-compressed copy does not."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        rgb = im.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return "sha256:" + h.hexdigest(), fmt


def eval_hashes(specs: list[str], log) -> tuple[set, list, list]:
    hashes, checked, missing = set(), [], []
    for spec in specs:
        try:
            parts = load(spec, None)
        except Exception as e:  # not downloaded, offline, no such id: reported, not fatal
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
            missing.append({"eval_set": spec, "why": why})
            log(f"eval set {spec}: not available ({why})")
            continue
        if not any(image_columns(ds) for ds in parts):
            missing.append({"eval_set": spec, "why": "no image column"})
            log(f"eval set {spec}: no image column, not checked")
            continue
        n = 0
        for ds in parts:
            cols = image_columns(ds)
            for row in undecoded(ds, cols).select_columns(cols):
                for c in cols:
                    values = row[c] if isinstance(row[c], list) else [row[c]]
                    for v in values:
                        data = image_bytes(v)
                        if data:
                            hashes.add(pixel_hash(data)[0])
                            n += 1
        checked.append({"eval_set": spec, "images": n})
        log(f"eval set {spec}: {n} images hashed")
    return hashes, checked, missing


EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp",
              "TIFF": "tif"}
ID_COLUMNS = ("id", "imgname", "image_id", "pid", "question_id", "file_name")


def draw(source: str, spec: str, count: int, seed: int, out: str, leaked: set, seen: set):
    """Write `count` images of `spec`'s split in a seeded order; returns manifest rows, stats."""
    path, config, split = parse_spec(spec, "train")
    if split in EVAL_SPLITS:
        raise ValueError(f"{source}: split {split!r} is an evaluation split; the paper trains on "
                         "training splits")
    ds = load(spec, "train")
    cols = image_columns(ds)
    if not cols:
        raise ValueError(f"{source}: {spec} has no image column "
                         f"(columns: {', '.join(ds.features)})")
    id_col = next((c for c in ID_COLUMNS if c in ds.features), None)
    ds = undecoded(ds, cols[:1])
    order = list(range(len(ds)))
    random.Random(f"{seed}:{source}").shuffle(order)
    os.makedirs(os.path.join(out, source))
    rows, stats = [], {"taken": 0, "leaked": 0, "duplicate": 0, "no_image": 0, "unreadable": 0}
    for i in order:
        if len(rows) == count:
            break
        row = ds[i]
        data = image_bytes(row[cols[0]])
        if not data:
            stats["no_image"] += 1
            continue
        try:
            h, fmt = pixel_hash(data)
        except Exception:  # PIL's errors for a bad file are of many types
            stats["unreadable"] += 1
            continue
        if h in leaked:
            stats["leaked"] += 1
            continue
        if h in seen:
            stats["duplicate"] += 1
            continue
        seen.add(h)
        name = f"{source}/{source}_{i:07d}.{EXTENSIONS.get(fmt, 'png')}"
        if fmt in EXTENSIONS:
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
        else:  # a format the trainer's loader may not read: stored as PNG
            from PIL import Image
            with Image.open(io.BytesIO(data)) as im:
                im.convert("RGB").save(os.path.join(out, name))
        rows.append({"file": name, "source": source, "dataset": path, "config": config,
                     "split": split, "row": i, "id": None if id_col is None else str(row[id_col]),
                     "content_hash": h})
    stats["taken"] = len(rows)
    if len(rows) < count:
        raise ValueError(f"{source}: only {len(rows)} usable images in {spec} (need {count}; "
                         f"skipped: {stats})")
    return rows, stats


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    names = {s.name for s in SOURCES}
    pairs = {}
    for item in items:
        for part in filter(None, item.split(",") if what == "--counts" else [item]):
            name, sep, value = part.partition("=")
            if not sep or name not in names:
                raise ValueError(f"{what} {part!r}: expected NAME=VALUE, NAME one of "
                                 f"{', '.join(sorted(names))}")
            pairs[name] = value
    return pairs


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the image folder to create (must not exist)")
    ap.add_argument("--total", type=int, default=2500, help="images in all, split evenly")
    ap.add_argument("--counts", action="append", default=[],
                    help="per-source counts instead of the even split: chartqa=500,plotqa=300")
    ap.add_argument("--source", action="append", default=[],
                    help="NAME=ID_OR_PATH[#CONFIG][@SPLIT] (repeatable) in place of the default")
    ap.add_argument("--eval_set", action="append", default=None,
                    help="an evaluation set to keep out, ID_OR_PATH[#CONFIG][@SPLIT] (repeatable; "
                         "default: the table's eight by their lmms-eval dataset ids; 'none': no "
                         "filter)")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    if args.total < 0:
        ap.error("--total must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import datasets  # noqa: F401
    except ImportError:
        print("error: scripts/prepare_paper_data.py needs the datasets library: "
              "pip install datasets", file=sys.stderr)
        return 2
    partial = args.out.rstrip("/") + ".partial"
    try:
        counts = equal_counts(args.total)
        counts.update({k: int(v) for k, v in parse_pairs(args.counts, "--counts").items()})
        if any(v < 0 for v in counts.values()):
            raise ValueError("--counts must be >= 0")
        specs = {s.name: s.spec for s in SOURCES}
        specs.update(parse_pairs(args.source, "--source"))
        for s in SOURCES:
            if counts[s.name] and not specs[s.name]:
                raise ValueError(f"{s.name}: no default dataset ({s.why}): pass --source "
                                 f"{s.name}=PATH, or --counts {s.name}=0")
        if os.path.exists(args.out):
            raise ValueError(f"{args.out} exists: pass a new folder (nothing is overwritten)")
        evals = args.eval_set if args.eval_set is not None else \
            [f"{b.dataset}{'#' + b.dataset_name if b.dataset_name else ''}@{b.split}"
             for b in BENCHMARKS]
        evals = [] if evals == ["none"] else evals
        log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        leaked, checked, missing = eval_hashes(evals, log)
        shutil.rmtree(partial, ignore_errors=True)  # a crashed earlier run's leftovers only
        os.makedirs(partial)
        manifest, per_source, seen = [], {}, set()
        for s in SOURCES:
            if counts[s.name]:
                rows, per_source[s.name] = draw(s.name, specs[s.name], counts[s.name], args.seed,
                                                partial, leaked, seen)
                manifest += rows
                log(f"{s.name}: {per_source[s.name]}")
        with open(os.path.join(partial, "manifest.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in manifest)
        summary = {"seed": args.seed, "images": len(manifest), "counts": counts,
                   "sources": {k: specs[k] for k in counts if counts[k]}, "per_source": per_source,
                   "leaked_dropped": sum(v["leaked"] for v in per_source.values()),
                   "eval_sets_checked": checked, "eval_sets_not_available": missing}
        with open(os.path.join(partial, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        os.rename(partial, args.out)
    except Exception as e:  # one line: datasets' and PIL's errors come in many types
        shutil.rmtree(partial, ignore_errors=True)
        line = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {line}" if isinstance(e, ValueError) else
              f"error: {type(e).__name__}: {line}", file=sys.stderr)
        return 2
    per = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"{len(manifest)} images in {args.out} ({per});"
          f" dropped {summary['leaked_dropped']} found in the evaluation sets "
          f"({len(checked)} checked, {len(missing)} not available)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
