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
