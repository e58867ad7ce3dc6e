"""Write docs/flags.md from the dataclasses in config.py: every flag, its default and its help.

    python scripts/gen_flags.py            # rewrite docs/flags.md
    python scripts/gen_flags.py --check    # exit 1 if docs/flags.md is not what this writes

Config (train.py, run.py) is grouped by the `# ---- name ----` comments in config.py, in file
order; a flag added under one of them lands in that group. infer, eval and export get one table
per dataclass, each with the fields that dataclass adds to the ones it inherits.
tests/test_readme.py checks that the committed file is this script's output.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import config  # noqa: E402

OUT = os.path.join(ROOT, "docs", "flags.md")
SECTION = re.compile(r"^\s*# -+ (.+?) -+\s*$")
FIELD = re.compile(r"^    (\w+)\s*:")

HEADER = """# Flags

Generated from the dataclasses in `config.py` by `python scripts/gen_flags.py`; do not edit by
hand (`tests/test_readme.py` checks that this file is the script's output).

`python train.py --help` and `python run.py infer|eval|export --help` print the same. Booleans are
switches (`--use_lora_solver`); `--no_freeze_vision` turns the vision freeze off (full fine-tuning
only: a LoRA role keeps the tower frozen, with a warning, as the published code did). Every flag of
the published parser is accepted with its published meaning, by its name or as an alias of ours
(listed with the flag). `python run.py ...` takes every training flag exactly as
`python train.py ...` does.
"""

# (heading, dataclass, what it is for); each table lists the fields the class adds to its bases.
ENTRY_POINTS = [
    ("infer, eval and export", config.ModelArgs, "the base model every command loads"),
    ("infer and eval", config.SampleArgs, "sampling; the defaults are the training defaults"),
    ("infer", config.InferArgs, "`python run.py infer`: ask the Solver about one image"),
    ("eval", config.EvalArgs, "`python run.py eval`: score Solvers on a labeled JSONL"),
    ("export", config.ExportArgs, "`python run.py export`: merge the LoRA into the base"),
]


def config_sections() -> list[tuple[str, list[str]]]:
    """Config's field names grouped by the section comments of its class body."""
    lines, _ = inspect.getsourcelines(config.Config)
    names = {f.name for f in dataclasses.fields(config.Config)}
    sections: list[tuple[str, list[str]]] = [("Other", [])]
    for line in lines:
        heading = SECTION.match(line)
        if heading:
            title = heading.group(1)
            sections.append((title[0].upper() + title[1:], []))
            continue
        name = FIELD.match(line)
        if name and name.group(1) in names:
            sections[-1][1].append(name.group(1))
    listed = {n for _, group in sections for n in group}
    sections[0][1].extend(f.name for f in dataclasses.fields(config.Config) if f.name not in listed)
    return [(title, group) for title, group in sections if group]


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, list) and not value:
        return "(the base only)"
    return f"`{value}`"


def help_text(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "").strip()
    choices = f.metadata.get("choices")
    if choices:
        text = f"{text} One of: {', '.join(f'`{c}`' for c in choices)}.".strip()
    if f.metadata.get("action") == "append":
        text = f"{text} Repeatable."
    aliases = f.metadata.get("aliases")
    if aliases:
        text = f"{text} Published name: {', '.join(f'`{a}`' for a in aliases)}."
    return text.replace("|", "\\|")


def table(fs: list[dataclasses.Field]) -> list[str]:
    rows = ["| flag | default | what |", "|---|---|---|"]
    rows += [f"| `--{f.name}` | {default_text(f)} | {help_text(f)} |" for f in fs]
    return rows


def own_fields(cls) -> list[dataclasses.Field]:
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    return [f for f in dataclasses.fields(cls) if f.name not in inherited]


def render() -> str:
    by_name = {f.name: f for f in dataclasses.fields(config.Config)}
    out = [HEADER, "## Training flags", "", "`python train.py` and `python run.py` (`Config`).", ""]
    for title, names in config_sections():
        out += [f"### {title}", ""] + table([by_name[n] for n in names]) + [""]
    out += ["## infer, eval and export flags", "",
            "`python run.py infer|eval|export`: using the trained Solver (`ModelArgs` and the "
            "classes built on it).", ""]
    titles = {cls: title for title, cls, _ in ENTRY_POINTS}
    for title, cls, what in ENTRY_POINTS:
        out += [f"### {title} (`{cls.__name__}`)", "", f"{what[0].upper()}{what[1:]}."]
        bases = [titles[b] for b in reversed(cls.__mro__[1:]) if b in titles]
        if bases:
            out[-1] += " Also takes the flags of " + " and ".join(f"*{b}*" for b in bases) + "."
        out += [""] + table(own_fields(cls)) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python scripts/gen_flags.py", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true",
                   help="compare docs/flags.md with what would be written; exit 1 if they differ")
    args = cli.parse_or_exit(p, argv)
    text = render()
    if args.check:
        try:
            with open(OUT, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(f"{os.path.relpath(OUT, ROOT)} is out of date: run python scripts/gen_flags.py",
                  file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(OUT, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
