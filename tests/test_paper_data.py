"""scripts/prepare_paper_data.py on small fixtures in the formats it reads (built here, offline):
a hub snapshot of parquet shards, a single parquet file, a save_to_disk folder, an image folder.
Counts, seeding, layout, manifest, the leakage filter and duplicates.

    python -m pytest tests/test_paper_data.py
"""
import hashlib
import json
import os
import sys

import pytest

from conftest import ROOT

if not os.environ.get("CI"):  # CI installs it (scripts/install_paper.sh): there it must import
    pytest.importorskip("datasets", reason="run bash scripts/install_paper.sh")
from datasets import Dataset, DatasetDict, Features, Image, List, Value  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import prepare_paper_data as prep  # noqa: E402


def picture(k: int) -> PILImage.Image:
    """A distinct 8x6 picture per k."""
    im = PILImage.new("RGB", (8, 6), (k * 7 % 256, k * 13 % 256, k * 29 % 256))
    im.putpixel((k % 8, k % 6), (255 - k % 256, 0, 0))
    return im


def table(ks, column="image", listed=False, ids=True):
    feats = {column: List(Image()) if listed else Image()}
    data = {column: [[picture(k)] if listed else picture(k) for k in ks]}
    if ids:
        feats["id"] = Value("string")
        data["id"] = [f"q{k}" for k in ks]
    return Dataset.from_dict(data, features=Features(feats))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Six sources, 8 rows each (ChartQA: 10 rows on 8 charts, some charts asked twice, as
    in ChartQA), and an evaluation set that holds two of their training images."""
    d = tmp_path_factory.mktemp("paper_sources")
    snap = d / "chartqa" / "data"  # a hub snapshot: data/<split>-*.parquet
    snap.mkdir(parents=True)
    table([100, 101, 102, 103, 100, 104, 105, 101, 106, 107]).to_parquet(
        str(snap / "train-00000-of-00001.parquet"))
    table([900, 901]).to_parquet(str(snap / "test-00000-of-00001.parquet"))
    DatasetDict({"train": table(range(200, 208), "images", listed=True),  # the_cauldron layout
                 "test": table([910])}).save_to_disk(str(d / "ai2d"))
    table(range(300, 308), ids=False).to_parquet(str(d / "infovqa.parquet"))
    (d / "plotqa").mkdir()
    table(range(400, 408), "images", listed=True).to_parquet(
        str(d / "plotqa" / "train-00000-of-00001.parquet"))
    (d / "chartx").mkdir()  # the unzipped ChartX PNGs
    for k in range(500, 508):
        picture(k).save(d / "chartx" / f"chart_{k}.png")
    (d / "geometry3k" / "data").mkdir(parents=True)
    table(range(600, 608), "images", listed=True).to_parquet(
        str(d / "geometry3k" / "data" / "train-00000-of-00001.parquet"))
    # The evaluation set: ChartQA training chart 103 and Geometry3K 605 appear in it.
    eval_set = d / "eval.parquet"
    table([103, 605, 999], "decoded_image").to_parquet(str(eval_set))
    sources = [f"--source=chartqa={d / 'chartqa'}", f"--source=ai2d={d / 'ai2d'}",
               f"--source=infovqa={d / 'infovqa.parquet'}", f"--source=plotqa={d / 'plotqa'}",
               f"--source=chartx={d / 'chartx'}", f"--source=geometry3k={d / 'geometry3k'}"]
    return {"dir": d, "sources": sources, "eval": str(eval_set)}


def prepare(fixtures, out, *extra, total=42, eval_set=True):
    argv = ["--out", str(out), "--total", str(total), *fixtures["sources"], *extra]
    if eval_set:
        argv += ["--eval_set", fixtures["eval"]]
    return prep.main(argv)


def manifest(out):
    with open(out / "manifest.jsonl") as f:
        return [json.loads(line) for line in f]


def hash_of(rgb: PILImage.Image) -> str:
    """The manifest's content hash, worked out here independently: size, then RGB bytes."""
    data = f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pixels(path):
    with PILImage.open(path) as im:
        return hash_of(im.convert("RGB"))


@pytest.fixture(scope="module")
def prepared(fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_out") / "data"
    assert prepare(fixtures, out) == 0
    return out


def test_even_counts_of_2500():
    assert prep.equal_counts(2500) == {"chartqa": 417, "ai2d": 417, "infovqa": 417,
                                       "plotqa": 417, "chartx": 416, "geometry3k": 416}


def test_layout_counts_and_manifest(prepared):
    rows = manifest(prepared)
    assert sorted(os.listdir(prepared)) == ["ai2d", "chartqa", "chartx", "geometry3k", "infovqa",
                                            "manifest.jsonl", "plotqa", "summary.json"]
    for source in ("chartqa", "ai2d", "infovqa", "plotqa", "chartx", "geometry3k"):
        files = sorted(os.listdir(prepared / source))
        assert len(files) == 7, source  # 42 / 6
        assert sorted(os.path.basename(r["file"]) for r in rows if r["source"] == source) == files
    assert len(rows) == 42 and len({r["content_hash"] for r in rows}) == 42
    for r in rows:
        assert r["split"] == "train" and isinstance(r["row"], int)
        assert r["content_hash"] == pixels(prepared / r["file"])  # the hash of the written file
    chartqa = [r for r in rows if r["source"] == "chartqa"]
    assert all(r["id"].startswith("q1") for r in chartqa)
    assert all(r["id"] is None for r in rows if r["source"] == "infovqa")  # no id column
    # The trainer's scan finds them, and --include_subfolders picks sources.
    from data_and_utils import find_images
    assert len(find_images(str(prepared), [])) == 42
    picked = find_images(str(prepared), ["ai2d", "chartx"])
    assert len(picked) == 14
    assert {os.path.basename(os.path.dirname(p)) for p in picked} == {"ai2d", "chartx"}


def test_leakage_filter_drops_and_counts(prepared, fixtures):
    rows = manifest(prepared)
    taken = {r["content_hash"] for r in rows}
    for k in (103, 605):  # the two training images that are in the evaluation set
        assert pixels_of(k) not in taken
    summary = json.loads((prepared / "summary.json").read_text())
    assert summary["per_source"]["chartqa"]["leaked"] == 1
    assert summary["per_source"]["geometry3k"]["leaked"] == 1
    assert summary["leaked_dropped"] == 2
    assert summary["eval_sets_checked"] == [{"eval_set": fixtures["eval"], "images": 3}]
    # ChartQA's 8 charts minus the leaked one: all 7 taken, each once (its repeated rows are
    # duplicates: test_bad_input_is_one_line sees all 10 rows counted).
    chartqa = sorted(r["id"] for r in rows if r["source"] == "chartqa")
    assert chartqa == [f"q{k}" for k in (100, 101, 102, 104, 105, 106, 107)]


def pixels_of(k):
    return hash_of(picture(k))


def test_without_the_filter_the_leaked_images_can_be_drawn(fixtures, tmp_path):
    out = tmp_path / "e"
    assert prepare(fixtures, out, "--counts", "chartqa=8,geometry3k=8", "--eval_set", "none",
                   total=0, eval_set=False) == 0
    taken = {r["content_hash"] for r in manifest(out)}
    assert pixels_of(103) in taken and pixels_of(605) in taken


def test_seeded(fixtures, tmp_path):
    runs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert prepare(fixtures, tmp_path / name, "--seed", str(seed), total=18) == 0
        runs.append([(r["file"], r["content_hash"]) for r in manifest(tmp_path / name)])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    # One source's count does not move another's draw.
    assert prepare(fixtures, tmp_path / "d", "--seed", "1", "--counts", "chartqa=2", total=18) == 0
    ai2d = lambda rows: [r for r in rows if r["source"] == "ai2d"]  # noqa: E731
    assert ai2d(manifest(tmp_path / "d")) == ai2d([json.loads(line) for line in
                                                  open(tmp_path / "a" / "manifest.jsonl")])


def test_bad_input_is_one_line(fixtures, tmp_path, capsys, monkeypatch):
    cases = [
        # 10 rows on 8 charts, 1 of them in the evaluation set: 7 usable, 2 duplicates.
        (["--counts", "chartqa=9"], "only 7 usable images in"),
        (["--counts", "chartqa=9"], "'taken': 7, 'leaked': 1, 'duplicate': 2"),
        (["--source", "nosuch=/x"], "expected NAME=VALUE"),
        (["--source", f"chartqa={fixtures['dir'] / 'chartqa'}@test"], "evaluation split"),
        (["--source", f"ai2d={fixtures['dir'] / 'ai2d'}@dev"], "no split 'dev'"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert prepare(fixtures, out, *extra, total=6) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, err
        assert not out.exists() and not (tmp_path / "out.partial").exists()
    # No ChartX given and no default for it.
    assert prep.main(["--out", str(tmp_path / "x"), "--eval_set", "none"]) == 2
    assert "pass --source chartx=PATH" in capsys.readouterr().err
    # An existing folder is never written into.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.png").write_bytes(b"x")
    assert prepare(fixtures, tmp_path / "kept", total=6) == 2
    assert os.listdir(tmp_path / "kept") == ["mine.png"]
    assert "exists: pass a new folder" in capsys.readouterr().err
    # Without the datasets library: one line naming the install.
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert prepare(fixtures, tmp_path / "y", total=6) == 2
    assert capsys.readouterr().err.strip() == ("error: scripts/prepare_paper_data.py needs the "
                                               "datasets library: pip install datasets")


def test_an_eval_set_not_available_is_reported_not_fatal(fixtures, tmp_path):
    out = tmp_path / "out"
    no_images = tmp_path / "text_only.parquet"  # images stored some other way: not checkable
    Dataset.from_dict({"question": ["q"]}).to_parquet(str(no_images))
    assert prepare(fixtures, out, "--eval_set", str(tmp_path / "absent.parquet"),
                   "--eval_set", str(no_images), total=6, eval_set=False) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_sets_checked"] == []
    missing = summary["eval_sets_not_available"]
    assert [m["eval_set"] for m in missing] == [str(tmp_path / "absent.parquet"), str(no_images)]
    assert missing[1]["why"] == "no image column"
