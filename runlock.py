"""One trainer per run folder: an exclusive OS lock on runs/<run>/run.lock, held from before
resume until the process exits.

Two trainers on one run (a requeued job whose old copy still runs, a double launch) would both
write the log and the checkpoints. The second one now stops at once with one line naming the
holder (its pid and host are written into the lock file). The lock is flock(2): the kernel
drops it when the holder's last descriptor closes, so a SIGKILLed holder leaves no stale
lock; the file itself stays (deleting it would race with the next trainer taking it).
Under data parallel, rank 0 takes it and every rank learns the outcome.

    python -m pytest tests/test_reliability.py -q -k lock
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from contextlib import contextmanager

from errors import UserError, first_line

LOCK_FILE = "run.lock"


def acquire(run_dir: str, run_name: str) -> int:
    """Take the lock; returns its descriptor (close it to release). UserError if held."""
    path = os.path.join(run_dir, LOCK_FILE)
    # os.open's descriptors are not inherited by child processes (W&B's service, say), so
    # the lock dies with this process and nothing else.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process that is starting"
        os.close(fd)
        raise UserError(f"run {run_name} is already being trained by {holder} (lock {path}); "
                        f"wait for it to finish or stop it, or use another --wandb_run_name") from None
    except OSError as e:
        os.close(fd)
        hint = (" (ENOLCK/ENOSYS: this filesystem does not support flock; put --output_dir on "
                "one that does, see README 'Reliability')"
                if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP) else "")
        raise UserError(f"cannot lock run {run_name} at {path}: {first_line(e)}{hint}") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return fd


@contextmanager
def run_lock(run_dir: str, run_name: str, dist):
    """Make run_dir; rank 0 holds the lock for the body; a refusal is raised on every rank."""
    fd, error = None, None
    try:
        os.makedirs(run_dir, exist_ok=True)  # every rank: a node without the folder fails here
    except OSError as e:
        raise UserError(f"cannot create run folder {run_dir} ({first_line(e)})") from e
    if dist.is_main:
        try:
            fd = acquire(run_dir, run_name)
        except UserError as e:
            error = str(e)
    error = dist.broadcast(error)
    if error:
        raise UserError(error)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
