"""The README and docs/ tell the truth: the first commands, docs/flags.md as generated from
config.py, and every local link pointing at a file that exists.

    python -m pytest tests/test_readme.py
"""
import glob
import os
import re
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gen_flags  # noqa: E402

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def test_first_commands_are_install_demo_and_tests():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["pip install -r requirements.txt", "python run.py", "python -m pytest"]


def test_flags_md_is_generated_from_config():
    with open(gen_flags.OUT, encoding="utf-8") as f:
        current = f.read()
    assert current == gen_flags.render(), (
        "docs/flags.md is not what config.py gives: regenerate it with "
        "`python scripts/gen_flags.py` and commit the result")


def test_flags_md_lists_every_flag():
    import dataclasses
    import config
    text = open(gen_flags.OUT, encoding="utf-8").read()
    for cls in (config.Config, config.InferArgs, config.EvalArgs, config.ExportArgs):
        missing = [f.name for f in dataclasses.fields(cls) if f"`--{f.name}`" not in text]
        assert not missing, f"{cls.__name__}: {missing}"


def anchors(path: str) -> set:
    """GitHub's heading anchors of a Markdown file: lowercase, punctuation dropped, spaces to -."""
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_local_links_resolve():
    """[text](path#anchor) in the README and docs/ points at a file of the repository and, with
    an anchor, at one of that file's headings."""
    broken = []
    for path in [os.path.join(ROOT, "README.md"), *DOCS]:
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(file) or (anchor and anchor not in anchors(file)):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target}")
    assert not broken


def test_readme_indexes_every_doc():
    missing = [os.path.basename(p) for p in DOCS if f"(docs/{os.path.basename(p)})" not in README]
    assert not missing


def test_no_placeholder_left():
    assert not re.search(r"^[A-Z_]{6,}$", README, re.M)
