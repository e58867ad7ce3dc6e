"""Images, prompts and text parsing for the iReasoner trainer. No model code lives here.

Run the tests for this file with:

    python -m pytest tests/test_data.py tests/test_parsing.py -q
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import struct
import unicodedata
import warnings

import numpy as np
from PIL import Image, ImageOps
from qwen_vl_utils import smart_resize

from distributed import UserError, first_line

log = logging.getLogger("ireasoner")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# smart_resize refuses aspect ratios above 200; we pad to 150 so rounding can never cross it.
MAX_ASPECT = 150.0


class BadImage(Exception):
    """One image file could not be turned into an RGB picture; the pool skips it."""


# -----------------------------------------------------------------------------
# image loading

# Everything PIL (or a broken file) is known to raise while opening/decoding. Anything else
# is a bug in our code and should crash loudly rather than be counted as a bad image.
_LOAD_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                Image.DecompressionBombError, Image.DecompressionBombWarning)


def load_image(path: str, max_pixels: int, min_pixels: int = 56 * 56, factor: int = 28) -> Image.Image:
    """Open any image file as RGB, resized so both sides are multiples of `factor` and the
    pixel count is within [min_pixels, max_pixels]. Raises BadImage for unreadable files."""
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})")
    try:
        with warnings.catch_warnings():
            # PIL only *warns* between 1x and 2x MAX_IMAGE_PIXELS; a bomb is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)  # animated GIF/WebP/APNG: first frame
                img.load()   # decode now, so truncated files fail here and not later
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except _LOAD_ERRORS as e:
        raise BadImage(f"{type(e).__name__}: {first_line(e)}"[:200]) from e
    out = _resize(rgb, max_pixels, min_pixels, factor)
    out.info["source_pixels"] = rgb.width * rgb.height  # ImagePool counts the downscaled ones
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB without the classic pitfalls (16-bit -> white, alpha -> black)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # PIL's own convert clips these to 0..255, which turns most 16-bit photos pure white.
        gray = Image.fromarray(_to_uint8(np.asarray(img), mode))  # 2-D uint8 -> "L"
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "P", "La", "RGBa") and _has_alpha(img):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")  # RGB (copy), L, 1, CMYK, YCbCr, P without transparency


def _has_alpha(img: Image.Image) -> bool:
    return img.mode != "P" or "transparency" in img.info


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16/32-bit or float grayscale array to 0..255. The nominal range of the data
    decides the scale; only data outside every nominal range is min-max stretched."""
    arr = arr.astype(np.float32)  # float32: exact for 16-bit, half the memory of float64
    if arr.size == 0:
        return arr.astype(np.uint8)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0               # float image in [0, 1]
    elif lo >= 0.0 and hi <= 255.0 and not mode.startswith("I;16"):
        scaled = arr                       # already 8-bit values stored in a wide type
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = arr / 257.0               # 16-bit range: 65535 -> 255
    else:
        scaled = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


def _resize(img: Image.Image, max_pixels: int, min_pixels: int, factor: int) -> Image.Image:
    """Resize with qwen's smart_resize; extreme aspect ratios are padded (white, centred)."""
    w, h = img.size
    # The short side must stay >= factor after scaling down to max_pixels, which caps the ratio.
    max_ratio = max(1.0, min(MAX_ASPECT, max_pixels / (2 * factor * factor)))
    pad_w, pad_h = w, h
    if w / h > max_ratio:
        pad_h = math.ceil(w / max_ratio)
    elif h / w > max_ratio:
        pad_w = math.ceil(h / max_ratio)
    th, tw = smart_resize(pad_h, pad_w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    if (pad_w, pad_h) == (w, h):
        return img.resize((tw, th), Image.Resampling.BICUBIC)
    # Scale the content first and paste it into the target canvas: padding the full-size
    # image first could allocate gigabytes for a 1 x 80,000 strip.
    cw = min(tw, max(1, round(w * tw / pad_w)))
    ch = min(th, max(1, round(h * th / pad_h)))
    canvas = Image.new("RGB", (tw, th), (255, 255, 255))
    canvas.paste(img.resize((cw, ch), Image.Resampling.BICUBIC), ((tw - cw) // 2, (th - ch) // 2))
    return canvas


# -----------------------------------------------------------------------------
# the image pool


class ImagePool:
    """All images under data_dir in a seeded order that is reshuffled every epoch.
    `get(i)` returns the i-th image of that endless stream, skipping unreadable files."""

    def __init__(self, data_dir: str, include_subfolders: list[str] | None, seed: int,
                 max_pixels: int, min_pixels: int = 56 * 56, factor: int = 28,
                 max_retries: int = 64):
        # max_pixels 0: the processor's own limit, set by the trainer once the model is loaded.
        if max_pixels and min_pixels > max_pixels:
            raise UserError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
        self.data_dir, self.seed = data_dir, seed
        self.max_pixels, self.min_pixels, self.factor = max_pixels, min_pixels, factor
        self.max_retries = max_retries
        self.paths = sorted(find_images(data_dir, include_subfolders or []))
        if not self.paths:
            raise UserError(f"no images found in {data_dir} (looked for {' '.join(IMAGE_EXTENSIONS)})")
        self.bad: dict[str, str] = {}  # path -> reason; known-bad files are skipped instantly
        self.skipped = 0
        self.downscaled = 0  # images above max_pixels (the memory plan's image-token cap)
        self._order_cache: tuple[int, list[str]] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """A hash of the path list: ranks compare it to know they draw from the same pool."""
        return hashlib.sha1("\n".join(self.paths).encode("utf-8", "surrogateescape")).hexdigest()

    def order(self, epoch: int) -> list[str]:
        return list(self._order(epoch))

    def _order(self, epoch: int) -> list[str]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            perm = list(self.paths)
            random.Random(self.seed if epoch == 0 else f"{self.seed}:{epoch}").shuffle(perm)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def get(self, index: int) -> tuple[str, Image.Image]:
        """The image at stream position `index`, or the next readable one after it: for tools
        and benchmarks that want one image. The trainer draws through image_stream.draw, which
        never gives a bad file's place to an image another step trains."""
        n = len(self.paths)
        budget = min(self.max_retries, n)  # fresh load failures allowed in this call
        failures, consecutive = 0, 0
        # 2n positions always contain one whole epoch, so every path is seen by then.
        for pos in range(index, index + 2 * n):
            path = self._order(pos // n)[pos % n]
            if path not in self.bad:
                try:
                    return path, self.load(path)
                except BadImage as e:
                    log.warning("skipping bad image %s: %s", path, e)
                    self.bad[path] = str(e)
                    self.skipped += 1
                    failures += 1
            consecutive += 1
            if len(self.bad) == n:
                raise UserError(f"no readable image in {self.data_dir}: all {n} files failed to "
                                f"load (e.g. {path}: {self.bad[path]})", local=True)
            if failures >= budget:
                raise UserError(f"{consecutive} consecutive unreadable images in {self.data_dir} "
                                f"starting at position {index} (last: {path}: {self.bad[path]}); "
                                f"check the data folder", local=True)
        raise AssertionError("unreachable: 2n positions cover every path")

    def load(self, path: str) -> Image.Image:
        """One image at the pool's size (BadImage if unreadable). The memory plan assumes no
        image above max_pixels: larger ones are resized down to it, counted, and logged (the
        first, then every 100th)."""
        image = load_image(path, self.max_pixels, self.min_pixels, self.factor)
        if image.info.get("source_pixels", 0) <= self.max_pixels:
            return image
        self.downscaled += 1
        if self.downscaled == 1 or self.downscaled % 100 == 0:
            log.info("%s: %d pixels, above the image cap the memory plan assumes (max_pixels "
                     "%d): resized down to %dx%d (%d images so far)", path,
                     image.info["source_pixels"], self.max_pixels, *image.size, self.downscaled)
        return image


def check_data_dir(data_dir: str) -> None:
    """Cheap checks, made before a run folder is created or locked."""
    if not data_dir:
        raise UserError("--data_dir is required: the folder of unlabeled training images")
    if not os.path.isdir(data_dir):
        what = "does not exist" if not os.path.exists(data_dir) else "is not a directory"
        raise UserError(f"--data_dir {data_dir} {what}")


def find_images(data_dir: str, include: list[str]) -> list[str]:
    """The image files of the pool, unsorted: those in data_dir's first-level subfolders (only
    `include`'s, when given) when it has any, else those under data_dir itself."""
    check_data_dir(data_dir)
    subfolders = sorted(e.name for e in os.scandir(data_dir)
                        if not e.name.startswith(".") and e.is_dir())  # is_dir follows symlinks
    missing = [name for name in include if name not in subfolders]
    if missing:
        raise UserError(f"--include_subfolders {','.join(missing)} not found in {data_dir}; "
                        f"existing subfolders: {', '.join(subfolders) or '(none)'}")
    # The documented layout: first-level subfolders when there are any, else data_dir itself.
    if subfolders:
        roots = [os.path.join(data_dir, name) for name in (include or subfolders)]
        top = [e.name for e in os.scandir(data_dir) if e.is_file() and not e.name.startswith(".")
               and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        if top:
            log.warning("%d images directly in %s are not used: it has subfolders, so only "
                        "those are read", len(top), data_dir)
    else:
        roots = [data_dir]
    visited: set = set()  # (device, inode) of each folder entered
    found: list[str] = []
    for root in roots:
        found.extend(_walk_images(root, visited))
    return found


def _walk_images(root: str, visited: set) -> list[str]:
    """Images under root, following symlinked folders but entering each real folder once
    (so symlink loops terminate and a folder linked twice is not counted twice).

    os.scandir's entries carry the file type from the directory listing itself, so a plain
    file costs no stat: one stat per folder, not per file. On 200,000 files that is what keeps
    the scan to seconds (scripts/bench_scan.py). Symlinks are still followed (is_file/is_dir
    stat those), and a broken one is skipped, not an error."""
    found: list[str] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in visited:
                continue
            visited.add(key)
            with os.scandir(folder) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError as err:
            log.warning("cannot read folder %s: %s", folder, err.strerror)
            continue
        subfolders = []
        for e in entries:
            try:
                if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    found.append(e.path)
                elif e.is_dir():
                    subfolders.append(e.path)
            except OSError as err:  # vanished or unreadable entry: skip it like a broken link
                log.warning("cannot read %s: %s", e.path, err.strerror)
        stack.extend(sorted(subfolders, reverse=True))  # depth first, in name order
    return found


# -----------------------------------------------------------------------------
# prompts

# Our own wording of the published prompts, with every instruction in the published order.
# --proposer_prompt_file / --solver_prompt_file replace them (byte-exact published prompts too).
QUESTION_PLACEHOLDER = "{question}"

PROPOSER_PROMPT = """You propose questions about images.
Look at the image and write a single question with a short answer that the image alone is enough to answer.
The question must not be ambiguous, and must not be a trivial counting question.
Phrase it in one or two clear and specific sentences.
If the answer is a number, say what is measured and in which unit.
Do not give the answer.
Reply with exactly these two tags and nothing else:
<question>the question</question>
<rationale>why the question is not trivial, yet can be answered from the image</rationale>"""

SOLVER_PROMPT = """You reason carefully about images and text.
Answer the question below using only what the image shows.
First reason inside <think>...</think>, one numbered line per step:
<think>
Step 1: ...
Step 2: ...
</think>
Each step states one concrete claim about what is visible or about how the problem is structured.
Then give the short final answer inside <answer>...</answer>.
Write nothing outside the <think> and <answer> tags.

Question: {question}"""


def proposer_prompt(template: str | None = None) -> str:
    return PROPOSER_PROMPT if template is None else template


def solver_prompt(question: str, template: str | None = None) -> str:
    """The template with {question} replaced (str.replace: other braces in a file stay as they
    are, where str.format would fail on them)."""
    return (SOLVER_PROMPT if template is None else template).replace(QUESTION_PLACEHOLDER, question)


def read_prompt_file(path: str, flag: str, placeholder: str | None = None) -> str:
    """A prompt template from a UTF-8 text file; ValueError (one line) when unreadable, empty,
    or missing the placeholder."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path}: cannot read it as UTF-8 text "
                         f"({first_line(e)})") from e
    # Editors end a file with a newline the prompt did not have: drop exactly one.
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text.strip():
        raise ValueError(f"{flag} {path} is empty")
    if placeholder is not None and placeholder not in text:
        raise ValueError(f"{flag} {path} has no {placeholder} placeholder: the question is put "
                         f"there")
    return text


# -----------------------------------------------------------------------------
# parsing: pure functions on model output; they must accept any string without crashing

DEFAULT_QUESTION = "What is the most prominent value shown in the image?"

# A chat/vision control token spelled out in sampled text (<|image_pad|>, <|im_end|>). Put back
# into a prompt, the tokenizer reads it as the real token: an extra <|image_pad|> makes the
# processor fail (more image slots than images), an <|im_end|> would close the user turn.
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
# A bare tag token such as <think>, </answer>, <br/> -- but not "a < b > c".
_TAG_TOKEN = re.compile(r"</?[A-Za-z][\w-]*\s*/?>")
_STEP_MARKER = re.compile(
    r"^[\s*#>•-]*(?:step\s*\d+\b\s*[:.)\-–—]?|\d+[.)](?=\s|$))\s*", re.IGNORECASE)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def _pair_pattern(tag: str) -> re.Pattern:
    # Content may not contain another opening tag, so nested pairs yield the innermost one.
    t = re.escape(tag)
    return re.compile(rf"<{t}>((?:(?!<{t}>).)*?)</{t}>", re.IGNORECASE | re.DOTALL)


def extract_tag(text: str, tag: str) -> str | None:
    m = _pair_pattern(tag).search(text)
    return m.group(1).strip() if m else None


def extract_question(text: str) -> str:
    """The <question> content, else the whole text; it goes into the Solver's prompt, so control
    tokens are removed and it is never empty."""
    question = extract_tag(text, "question") or text.strip()
    return _CONTROL_TOKEN.sub("", question).strip() or DEFAULT_QUESTION


def extract_answer(text: str) -> str:
    """The <answer> content (even if empty); else, after an unclosed <answer> (a completion cut
    off at the token limit, or a missing closing tag), the text after the last one; else the last
    non-empty line. Tags are removed from the last two."""
    answer = extract_tag(text, "answer")
    if answer is not None:
        return answer
    opened = list(re.finditer(r"<answer>", text, re.IGNORECASE))
    if opened:  # `...</think><answer>5` on one line: the 5, not the line it shares
        return " ".join(_TAG_TOKEN.sub(" ", text[opened[-1].end():]).split())
    lines = [line.strip() for line in _TAG_TOKEN.sub(" ", text).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def _before_answer(text: str) -> str:
    m = re.search(r"<answer>", text, re.IGNORECASE)
    return text[:m.start()] if m else text


def normalize_answer(s: str) -> str:
    """The published rule, on unicode: NFKC, lowercase, drop commas, collapse whitespace, strip
    every punctuation or symbol character (unicode P* and S*) at both ends, so $5, 5., +5, (5)
    and "5" are all 5. One exception, our fix: a leading minus directly before a digit or a
    decimal point stays (-5 != 5); the published code strips it. U+2212 counts as a minus."""
    s = unicodedata.normalize("NFKC", s).lower().replace(",", "").replace("\u2212", "-")
    s = " ".join(s.split())

    def strippable(c: str) -> bool:
        return c.isspace() or unicodedata.category(c)[0] in "PS"

    start, end = 0, len(s)
    while start < end and strippable(s[start]):
        if s[start] == "-" and start + 1 < end and (s[start + 1].isdigit() or s[start + 1] == "."):
            break
        start += 1
    while end > start and strippable(s[end - 1]):
        end -= 1
    return s[start:end]


def count_pre_answer_words(text: str) -> int:
    return len(_before_answer(text).split())


def extract_steps(text: str, max_steps: int) -> list[str]:
    """Reasoning steps: <step> tags, else `Step k:` / `k.` / `k)` lines, else sentences."""
    think = extract_tag(text, "think")
    region = think if think is not None else _before_answer(text)
    tagged = [s.strip() for s in _pair_pattern("step").findall(region)]
    if tagged:
        steps = tagged
    else:
        region = _TAG_TOKEN.sub(" ", region)  # e.g. an unclosed <think> left in the text
        steps = _marked_steps(region)
        if steps is None:
            steps = [s.strip() for s in _SENTENCE_SPLIT.split(region)]
    return [s for s in steps if s][:max(0, max_steps)]


def _marked_steps(region: str) -> list[str] | None:
    """Numbered-line steps, with unnumbered lines joined to the step above; None if no markers."""
    steps: list[str] | None = None
    for line in region.splitlines():
        m = _STEP_MARKER.match(line)
        if m:
            steps = steps if steps is not None else []
            steps.append(line[m.end():].strip().strip("*").strip())  # "**Step 1:** x"
        elif steps is not None and line.strip():
            steps[-1] = f"{steps[-1]} {line.strip()}".strip()
        # lines before the first marker are preamble ("Let me think.") and are ignored
    return steps
