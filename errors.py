"""The project's two exceptions and the one way an exception becomes a one-line message.

UserError: something the user must fix (a path, a flag, a full disk); entry points print it as
`error: ...` and exit 2. TrainingError: training cannot go on safely; printed the same way, exit 1.

    python -m pytest tests/test_faults.py -q
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user must fix (bad path, empty folder...), printed as one line."""


class TrainingError(RuntimeError):
    """Training cannot go on safely (printed as one line, exit 1)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """One line for an error message: strerror for OS errors, else the first line of str(e),
    else the exception's type name."""
    text = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
