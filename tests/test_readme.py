"""The README tells the truth: its first commands, and every flag of Config.

    python -m pytest tests/test_readme.py
"""
import os
import re
from dataclasses import fields

from config import Config
from conftest import ROOT

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_first_commands_are_install_demo_and_tests():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["pip install -r requirements.txt", "python run.py", "python -m pytest"]


def test_every_flag_is_documented():
    missing = [f.name for f in fields(Config) if f"`--{f.name}`" not in README]
    assert not missing


def test_no_placeholder_left():
    assert not re.search(r"^[A-Z_]{6,}$", README, re.M)
