"""Processes: data parallelism through accelerate, one trainer per run folder, and errors that
reach the user as one line, printed once per run.

- Dist: one full model per rank, gradients averaged. With one process every helper is the
  identity, so single-process training is unchanged.
- run_lock: an exclusive OS lock on runs/<run>/run.lock, held from before resume until the
  process exits. Two trainers on one run (a requeued job whose old copy still runs, a double
  launch) would both write the log and the checkpoints; the second stops at once with one line
  naming the holder (pid and host are in the lock file). flock(2) is dropped by the kernel when
  the holder's last descriptor closes, so a SIGKILLed holder leaves no stale lock; the file
  stays (deleting it would race with the next trainer taking it). Rank 0 takes it and every
  rank learns the outcome.
- UserError: something the user must fix (a path, a flag, a full disk); entry points print it
  as `error: ...` and exit 2. TrainingError: training cannot go on safely; exit 1.

    torchrun --nproc_per_node 2 train.py --device_map local ...
    python -m pytest tests/test_distributed.py tests/test_faults.py -q
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from contextlib import contextmanager

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

class Dist:
    def __init__(self):
        # PartialState reads the torchrun / accelerate launch environment (gloo on CPU, nccl on GPU).
        # cpu=True makes a CPU-only torchrun/accelerate launch use gloo instead of staying local.
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index
        self.world = self.state.num_processes
        self.is_main = self.state.is_main_process

    @property
    def device(self) -> torch.device:
        return self.state.device

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, obj) -> list:
        """[value of rank 0, value of rank 1, ...] on every rank."""
        return [obj] if self.world == 1 else gather_object([obj])

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def any(self, flag: bool) -> bool:
        return self.mean(1.0 if flag else 0.0) > 0

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce the mean of the gradients, in one flat buffer (one collective a step)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()

    def barrier(self):
        if self.world > 1:
            self.state.wait_for_everyone()

    def close(self, wait: bool = True) -> None:
        """Meet every rank at a barrier (wait=True), then destroy the process group.

        Why this must run before the process exits: without it the gloo group is never
        destroyed, so its native threads (one per collective worker, plus the transport loop)
        are still running, and may still hold the last collective's tensors, while Python
        finalizes and C++ statics are torn down. "terminate called without an active exception"
        (SIGABRT) after a complete run is that teardown: a native thread destroyed while
        joinable, or forced out by pthread_exit when it asks a finalizing interpreter for the
        GIL. It races with the peer's exit and with the scheduler, so it hit the busy 2-core
        test suite in most runs and a quiet standalone run rarely. destroy_process_group joins
        those threads while the interpreter is alive. The barrier first lets every rank finish
        its collectives, so no rank closes its connections while a peer still waits on one.

        wait=False is for an exception only this rank may have raised: its peers may be inside
        another collective, which a barrier would pair with and hang on until the timeout;
        destroying the group at once closes the connections, so a waiting peer fails now."""
        if not torch.distributed.is_initialized():
            return
        if wait:
            self.barrier()
        self.state.destroy_process_group()


# ---------------------------------------------------------------- errors: one line, printed once per run
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


# ---------------------------------------------------------------- one trainer per run folder
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
                "one that does, see docs/reliability.md)"
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
    created = not os.path.isdir(run_dir)
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
    except BaseException:
        if fd is not None and created:  # a failed start leaves no folder behind
            remove_if_only_lock(run_dir)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def remove_if_only_lock(run_dir: str) -> None:
    """Remove run_dir if it holds nothing but our lock (called while still holding it)."""
    try:
        if os.listdir(run_dir) == [LOCK_FILE]:
            os.unlink(os.path.join(run_dir, LOCK_FILE))
            os.rmdir(run_dir)
    except OSError:
        pass  # best effort: the start has failed already, and that error is the one to show
