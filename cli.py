"""How every command line of the project parses: no prefix matching (--num_solver_sample is an
error, not --num_solver_samples), a negative number is a value (--lr -1e-4 reaches the check
that says lr must be > 0), and a mistake is one line pointing at --help instead of argparse's
usage dump.

    python -m pytest tests/test_cli.py -q
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys

from transformers import HfArgumentParser

# argparse (before Python 3.13) reads only -5 and -.5 as negative numbers; -1e-4 became a flag.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class CommandLineError(ValueError):
    """A mistake on the command line: printed as one `error:` line, exit 2."""


class _Strict:
    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        raise CommandLineError(f"{message} (see {self.prog} --help)")

    def unrecognized(self, unknown: list[str]):
        """The error for flags no option has, naming the closest one (`--num_solver_sample`:
        did you mean --num_solver_samples?)."""
        flags = [s for a in self._actions for s in a.option_strings]
        hint = ""
        for arg in unknown:
            close = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.8)
            if arg.startswith("--") and close:
                hint = f"; did you mean {close[0]}?"
                break
        self.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


class ArgumentParser(_Strict, argparse.ArgumentParser):
    """argparse.ArgumentParser with the project's rules; errors raise CommandLineError."""


class DataclassParser(_Strict, HfArgumentParser):
    """HfArgumentParser (keyword arguments go to argparse) with the project's rules."""


def parse_or_exit(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """parser.parse_args for scripts without an error path of their own: one line, exit 2."""
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.unrecognized(unknown)
        return args
    except CommandLineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
