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


# ---------------------------------------------------------------- every command in the docs
# Every command line in README.md and docs/*.md (fenced blocks and inline `code`) is either
# parsed by the real parser of the program it runs (stopped right after parsing: nothing is
# built, loaded or written), or checked in the way its row in COMMAND_RULES says. Parsing is
# the cheapest honest check: a renamed flag, a wrong value type or choice, a missing required
# flag or an unknown subcommand fails it; what the flags then do is the other tests' job.
PROGRAMS = ("python", "torchrun", "accelerate", "bash", "pip", ".compat/vllm/bin/python")
NOT_RUN_HERE = {  # command prefix -> why it is not parsed here
    "pip install vllm": "an install from the registry (scripts/install_vllm.sh in CI)",
    "pip install --no-deps transformers": "an install from the registry",
    "pip install datasets": "an install from the registry (scripts/install_paper.sh in CI)",
    "accelerate launch --num_processes 8 -m lmms_eval": "lmms-eval's own command line "
    "(scripts/check_lmms_eval.sh runs it for real)",
    "python run.py convert-checkpoint": "a subcommand of commit 2403201, as the text says",
    "python -m pytest": "pytest's own command line; the test files it names must exist",
}


class Parsed(BaseException):
    """Raised right after a successful parse: the command stops before doing anything."""


def doc_commands() -> list[tuple[str, str]]:
    """(file, command) for each command line in the README and docs/."""
    found = []
    for path in [os.path.join(ROOT, "README.md"), *DOCS]:
        text = open(path, encoding="utf-8").read()
        name = os.path.relpath(path, ROOT)
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if _program(line):
                    found.append((name, line))
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for span in re.findall(r"`([^`\n]+)`", prose):
            if _program(span) and not span.startswith("error:"):
                found.append((name, span))
    return found


def _program(line: str) -> str | None:
    words = [w for w in line.split() if not re.match(r"^[A-Z_]+=", w)]  # env assignments
    return words[0] if words and words[0] in PROGRAMS else None


def _argv(command: str) -> tuple[str, list[str]]:
    """(entry, argv): which main() parses the command, and its arguments. Placeholders: `...`
    is dropped; from a `<placeholder>` on, the command is a prefix (what comes before must
    parse); `a|b` is expanded by the caller."""
    import shlex
    words = [w for w in shlex.split(command.replace("$", "")) if not re.match(r"^[A-Z_]+=", w)]
    words = [w for w in words if w != "..."]
    if any(w.startswith("<") for w in words):
        words = words[:next(i for i, w in enumerate(words) if w.startswith("<"))]
    prog, rest = words[0], words[1:]
    if not rest:
        return "mention", []  # a program named in prose, e.g. `.compat/vllm/bin/python`
    if prog in ("torchrun", "accelerate"):  # the launcher's own flags up to the script
        script = [i for i, w in enumerate(rest) if w.endswith(".py")]
        if not script:
            return "mention", []  # the launcher named in prose, e.g. `accelerate launch`
        rest = rest[script[0]:]
    elif prog == "bash":
        return "file", rest[:1]
    elif prog == "pip":
        return ("file", [rest[rest.index("-r") + 1]]) if "-r" in rest else ("?", rest)
    if rest[:1] == ["-m"]:
        return rest[1], rest[2:]
    if rest[:1] == ["-c"]:
        return "-c", rest[1:]
    return rest[0], rest[1:]


def check_command(command: str, monkeypatch) -> None:
    import argparse
    import importlib
    for prefix in NOT_RUN_HERE:
        if command.startswith(prefix):
            if prefix == "python -m pytest":
                for arg in command.split()[3:]:
                    assert os.path.exists(os.path.join(ROOT, arg)), arg
            return
    entry, argv = _argv(command)
    if entry == "mention":
        return
    if entry == "file":
        assert os.path.isfile(os.path.join(ROOT, argv[0])), f"{argv[0]} does not exist"
        return
    if entry == "-c":
        compile(argv[0], "<doc>", "exec")
        return
    import run
    if entry == "run.py" and len(argv) <= 1 and (argv or ["smoke"])[0] in run.COMMANDS:
        return  # the demo, or a subcommand named without its flags (as docs/flags.md's headings)
    mains = {"run.py": run.main, "train.py": lambda a: importlib.import_module("train").main(a)}
    if entry.startswith(("tools.", "scripts/")):
        module = entry[len("scripts/"):-len(".py")] if entry.startswith("scripts/") else entry
        mains[entry] = lambda a: importlib.import_module(module).main(a)
    assert entry in mains, f"no rule for {command!r}: add one to tests/test_readme.py"
    original = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        _, unknown = original(self, args, namespace)
        if unknown:  # every entry point refuses them (after this call, so say it here)
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        raise Parsed()
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    try:
        code = mains[entry](argv)
    except Parsed:
        return
    except SystemExit as e:  # --help
        code = e.code
    finally:
        monkeypatch.undo()
    assert code == 0, f"{command!r} does not parse (exit {code})"


def test_every_command_in_the_docs_parses(monkeypatch, capsys):
    commands = doc_commands()
    assert len(commands) > 40  # the extraction finds them
    failures = []
    for name, command in commands:
        for variant in _expand(command):
            try:
                check_command(variant, monkeypatch)
            except Exception as e:  # noqa: BLE001 -- reported with the command
                failures.append(f"{name}: {variant}: {e} {capsys.readouterr().err.strip()}")
    assert not failures, "\n".join(failures)


def _expand(command: str) -> list[str]:
    """`infer|eval|export` -> one command per alternative."""
    m = re.search(r"(\S+\|\S+)", command)
    if not m:
        return [command]
    return [command[:m.start()] + alt + command[m.end():] for alt in m.group(1).split("|")]
