"""Data parallelism through accelerate: one full model per rank, gradients averaged.

With one process every helper is the identity, so single-process training is unchanged.

    torchrun --nproc_per_node 2 train.py --device_map local ...
"""
from __future__ import annotations

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
