"""Image loading and the image pool, on small images written into tmp_path. Run with:

    python -m pytest tests/test_data.py -q
"""
import logging
import os
import random
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_and_utils import BadImage, ImagePool, load_image  # noqa: E402
from distributed import UserError  # noqa: E402

MAX_PIXELS = 1024 * 28 * 28
MIN_PIXELS = 56 * 56


def save(path, size=(8, 8), color=(200, 30, 30), mode="RGB", **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path, **kw)
    return str(path)


def write_bytes(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def check_size(img, max_pixels=MAX_PIXELS):
    w, h = img.size
    assert img.mode == "RGB"
    assert w % 28 == 0 and h % 28 == 0
    assert MIN_PIXELS <= w * h <= max_pixels


def centre(img):
    return img.getpixel((img.width // 2, img.height // 2))


@pytest.fixture
def two_folders(tmp_path):
    d = tmp_path / "data"
    save(d / "a" / "1.png")
    save(d / "a" / "2.jpg")
    save(d / "a" / "deep" / "3.PNG")
    save(d / "b" / "4.webp")
    save(d / ".hidden" / "5.png")          # hidden folder: ignored
    save(d / "a" / ".6.png")               # hidden file: ignored
    write_bytes(d / "a" / "notes.txt", b"not an image")
    write_bytes(d / "b" / "labels.json", b"{}")
    return d


def names(pool):
    return sorted(os.path.basename(p) for p in pool.paths)


# -----------------------------------------------------------------------------
# scanning and user errors

def test_scan_subfolders_hidden_and_extensions(two_folders):
    pool = ImagePool(str(two_folders), None, seed=0, max_pixels=MAX_PIXELS)
    assert names(pool) == ["1.png", "2.jpg", "3.PNG", "4.webp"]
    assert len(pool) == 4 and pool.paths == sorted(pool.paths)


def test_include_subfolders(two_folders):
    pool = ImagePool(str(two_folders), ["a"], seed=0, max_pixels=MAX_PIXELS)
    assert names(pool) == ["1.png", "2.jpg", "3.PNG"]
    pool = ImagePool(str(two_folders), ["b"], seed=0, max_pixels=MAX_PIXELS)
    assert names(pool) == ["4.webp"]


def test_missing_subfolder_lists_existing(two_folders):
    with pytest.raises(UserError) as e:
        ImagePool(str(two_folders), ["a", "c"], seed=0, max_pixels=MAX_PIXELS)
    msg = str(e.value)
    assert "c" in msg and "existing subfolders: a, b" in msg and ".hidden" not in msg


def test_flat_folder(tmp_path):
    save(tmp_path / "x.png")
    save(tmp_path / "y.bmp")
    assert names(ImagePool(str(tmp_path), None, 0, MAX_PIXELS)) == ["x.png", "y.bmp"]


def test_missing_empty_and_file_data_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImagePool(str(tmp_path / "nope"), None, 0, MAX_PIXELS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        ImagePool(str(tmp_path / "empty"), None, 0, MAX_PIXELS)
    f = write_bytes(tmp_path / "file.png", b"x")
    with pytest.raises(UserError, match="not a directory"):
        ImagePool(f, None, 0, MAX_PIXELS)
    write_bytes(tmp_path / "txt" / "a.txt", b"x")
    with pytest.raises(UserError, match="no images found"):
        ImagePool(str(tmp_path / "txt"), None, 0, MAX_PIXELS)


def test_symlink_loop_and_broken_link(two_folders, tmp_path):
    os.symlink(two_folders, two_folders / "a" / "deep" / "loop")        # loop back to the root
    os.symlink(two_folders / "b", two_folders / "a" / "b_again")         # same folder twice
    os.symlink(tmp_path / "gone.png", two_folders / "a" / "broken.png")  # dangling
    save(tmp_path / "outside" / "7.gif")
    os.symlink(tmp_path / "outside", two_folders / "linked")             # followed
    pool = ImagePool(str(two_folders), None, seed=0, max_pixels=MAX_PIXELS)
    assert names(pool) == ["1.png", "2.jpg", "3.PNG", "4.webp", "7.gif"]


# -----------------------------------------------------------------------------
# bad images and the retry logic

@pytest.fixture
def with_bad(tmp_path):
    d = tmp_path / "data"
    save(d / "good.png")
    write_bytes(d / "zero.jpg", b"")
    write_bytes(d / "text.jpg", b"hello, I am not a JPEG\n" * 10)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    write_bytes(d / "truncated.png", data[: len(data) // 2])
    return d


@pytest.mark.parametrize("name", ["zero.jpg", "text.jpg", "truncated.png"])
def test_load_bad_image_raises(with_bad, name):
    with pytest.raises(BadImage):
        load_image(str(with_bad / name), MAX_PIXELS)


def test_load_vanished_file(tmp_path):
    with pytest.raises(BadImage, match="FileNotFoundError"):
        load_image(str(tmp_path / "gone.png"), MAX_PIXELS)


def test_bad_images_skipped_and_counted(with_bad, caplog):
    pool = ImagePool(str(with_bad), None, seed=3, max_pixels=MAX_PIXELS)
    assert len(pool) == 4
    with caplog.at_level(logging.WARNING):
        got = [pool.get(i)[0] for i in range(8)]  # two epochs
    assert all(p.endswith("good.png") for p in got)
    assert pool.skipped == 3  # each bad file fails once, then is skipped instantly
    warned = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(warned) == 3


def test_next_image_is_used(with_bad):
    pool = ImagePool(str(with_bad), None, seed=3, max_pixels=MAX_PIXELS)
    order = pool.order(0)
    k = next(i for i, p in enumerate(order) if not p.endswith("good.png"))
    expected = next(p for p in (order + pool.order(1))[k:] if p.endswith("good.png"))
    path, img = pool.get(k)
    assert path == expected and img.mode == "RGB"


def test_all_bad_is_a_user_error(with_bad):
    os.remove(with_bad / "good.png")
    pool = ImagePool(str(with_bad), None, seed=0, max_pixels=MAX_PIXELS)
    with pytest.raises(UserError, match="all 3 files failed"):
        pool.get(0)


def test_retry_budget_is_a_user_error(with_bad):
    pool = ImagePool(str(with_bad), None, seed=0, max_pixels=MAX_PIXELS, max_retries=1)
    k = next(i for i, p in enumerate(pool.order(0)) if not p.endswith("good.png"))
    with pytest.raises(UserError, match="1 consecutive unreadable"):
        pool.get(k)


def test_file_deleted_after_scan(tmp_path):
    a = save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    pool = ImagePool(str(tmp_path), None, seed=0, max_pixels=MAX_PIXELS)
    os.remove(a)
    assert [pool.get(i)[0] for i in range(4)] == [str(tmp_path / "b.png")] * 4
    assert pool.skipped == 1


def test_decompression_bomb(tmp_path, monkeypatch):
    path = save(tmp_path / "bomb.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 10,000 px > 2x limit: PIL error
    with pytest.raises(BadImage, match="DecompressionBomb"):
        load_image(path, MAX_PIXELS)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)   # 1x..2x limit: PIL only warns
    with pytest.raises(BadImage, match="DecompressionBomb"):
        load_image(path, MAX_PIXELS)


# -----------------------------------------------------------------------------
# sizes and aspect ratios

def test_one_pixel_image(tmp_path):
    img = load_image(save(tmp_path / "1.png", size=(1, 1)), MAX_PIXELS)
    check_size(img)
    assert img.size == (56, 56)


def test_large_image_is_scaled_down(tmp_path):
    max_pixels = 256 * 28 * 28
    img = load_image(save(tmp_path / "big.png", size=(3000, 2000)), max_pixels)
    check_size(img, max_pixels)
    assert img.width > img.height


def test_extreme_aspect_is_padded(tmp_path):
    img = load_image(save(tmp_path / "strip.png", size=(1, 400), color=(0, 0, 0)), MAX_PIXELS)
    check_size(img)
    assert img.height / img.width <= 200
    mid = img.height // 2
    assert img.getpixel((0, mid)) == (255, 255, 255)         # white padding at the side
    assert img.getpixel((img.width // 2, mid))[0] < 60        # the dark strip in the middle
    wide = load_image(save(tmp_path / "wide.png", size=(20000, 1)), MAX_PIXELS)
    check_size(wide)
    assert wide.width > wide.height


# -----------------------------------------------------------------------------
# colour modes, EXIF, animation

def test_cmyk(tmp_path):
    img = load_image(save(tmp_path / "c.jpg", mode="CMYK", color=(0, 255, 255, 0)), MAX_PIXELS)
    check_size(img)
    r, g, b = centre(img)
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    arr = np.full((10, 10), 32896, dtype=np.uint16)  # 32896/257 = 128
    path = str(tmp_path / "g16.png")
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode == "I;16"
    img = load_image(path, MAX_PIXELS)
    check_size(img)
    assert centre(img) == (128, 128, 128)
    i32 = save(tmp_path / "i.tif", mode="I", color=32896)
    assert centre(load_image(i32, MAX_PIXELS)) == (128, 128, 128)
    i8 = save(tmp_path / "i8.tif", mode="I", color=100)       # 8-bit values in a wide mode
    assert centre(load_image(i8, MAX_PIXELS)) == (100, 100, 100)
    f = save(tmp_path / "f.tif", mode="F", color=0.5)         # float in [0, 1]
    assert centre(load_image(f, MAX_PIXELS)) == (128, 128, 128)


def test_alpha_modes_composite_on_white(tmp_path):
    rgba = save(tmp_path / "rgba.png", mode="RGBA", color=(255, 0, 0, 0))   # fully transparent
    assert centre(load_image(rgba, MAX_PIXELS)) == (255, 255, 255)
    half = save(tmp_path / "half.png", mode="RGBA", color=(0, 0, 0, 128))
    assert abs(centre(load_image(half, MAX_PIXELS))[0] - 127) <= 2
    la = save(tmp_path / "la.png", mode="LA", color=(0, 0))
    assert centre(load_image(la, MAX_PIXELS)) == (255, 255, 255)
    la_opaque = save(tmp_path / "la2.png", mode="LA", color=(50, 255))
    assert centre(load_image(la_opaque, MAX_PIXELS)) == (50, 50, 50)


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * (3 * 254))  # index 0 black, index 1 green
    p.putpixel((0, 0), 1)
    path = str(tmp_path / "p.png")
    p.save(path, transparency=0)
    img = load_image(path, MAX_PIXELS)
    check_size(img)
    assert centre(img) == (255, 255, 255)  # transparent black -> white, not black
    assert img.getpixel((0, 0))[1] > 200


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = str(tmp_path / "anim.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    r, g, b = centre(load_image(path, MAX_PIXELS))
    assert r > 200 and b < 60


def test_exif_rotation(tmp_path):
    img = Image.new("RGB", (300, 100), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = str(tmp_path / "rot.jpg")
    img.save(path, exif=exif)
    out = load_image(path, MAX_PIXELS)
    check_size(out)
    assert out.height > out.width  # 300x100 stored, shown as 100x300
    plain = load_image(save(tmp_path / "plain.jpg", size=(300, 100)), MAX_PIXELS)
    assert plain.width > plain.height


# -----------------------------------------------------------------------------
# order and determinism

@pytest.fixture
def eight(tmp_path):
    for k in range(8):
        save(tmp_path / f"{k}.png", color=(k * 30, 0, 0))
    return tmp_path


def test_determinism_and_seed(eight):
    seq = lambda pool: [pool.get(i)[0] for i in range(16)]  # noqa: E731
    a = ImagePool(str(eight), None, seed=7, max_pixels=MAX_PIXELS)
    b = ImagePool(str(eight), None, seed=7, max_pixels=MAX_PIXELS)
    c = ImagePool(str(eight), None, seed=8, max_pixels=MAX_PIXELS)
    assert seq(a) == seq(b)
    assert seq(a) != seq(c)
    assert np.array_equal(np.asarray(a.get(3)[1]), np.asarray(b.get(3)[1]))


def test_epoch_reshuffle(eight):
    pool = ImagePool(str(eight), None, seed=7, max_pixels=MAX_PIXELS)
    expected0 = sorted(pool.paths)
    random.Random(7).shuffle(expected0)
    assert pool.order(0) == expected0
    expected1 = sorted(pool.paths)
    random.Random("7:1").shuffle(expected1)
    assert pool.order(1) == expected1 != expected0
    assert sorted(pool.order(2)) == pool.paths
    assert [pool.get(8 + k)[0] for k in range(8)] == expected1
    assert pool.get(2 * 8 + 5)[0] == pool.order(2)[5]
