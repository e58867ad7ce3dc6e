"""The project's two exceptions and the one way an exception becomes a one-line message.

UserError: something the user must fix (a path, a flag, a full disk); entry points print it as
`error: ...` and exit 2. TrainingError: training cannot go on safely; printed the same way, exit 1.

    python -m pytest tests/test_faults.py -q
"""
from __future__ import annotations

import os
import sys
import time

# How long a rank other than 0 waits before leaving on an error every rank met (see report).
PEER_EXIT_DELAY_S = 3.0


class UserError(Exception):
    """A problem the user must fix (bad path, empty folder...), printed as one line.

    local=True marks an error only this process can have hit (say, the images of its own share
    of a step), so under data parallel it is printed by whichever rank raised it."""
    def __init__(self, message: str = "", local: bool = False):
        super().__init__(message)
        self.local = local


class TrainingError(RuntimeError):
    """Training cannot go on safely (printed as one line, exit 1)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """One line for an error message: strerror for OS errors, else the first line of str(e),
    else the exception's type name."""
    text = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]


def report(e: BaseException) -> None:
    """Print `error: ...` once per run. Under torchrun every rank meets the same error (a bad
    flag, a model that cannot load, a refused checkpoint: they all run the same code on the
    same files), so only rank 0 prints it and the others exit with the same code silently.
    An error only this rank hit (UserError(local=True)) is printed here, naming the rank."""
    rank = int(os.environ.get("RANK") or 0)
    if rank == 0:
        print(f"error: {e}", file=sys.stderr)
    elif getattr(e, "local", False):
        print(f"error: rank {rank}: {e}", file=sys.stderr)
    else:
        # The silent ranks leave a moment after rank 0: torchrun stops every other rank as soon
        # as one exits with an error, and a silent rank that got there first (a bad flag fails
        # in milliseconds) could have rank 0 stopped before its one line was out.
        time.sleep(PEER_EXIT_DELAY_S)
