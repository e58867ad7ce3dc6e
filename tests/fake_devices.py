"""Fake CUDA devices on a CPU-only machine, for tests/test_devices.py.

torch's FakeTensorMode makes tensors on cuda:0 ... cuda:7 that have a shape, a dtype and a device
but no values, allocates nothing, and raises FakeTensorDeviceMismatchError on any op that mixes
two devices: the error a GPU run would raise. What it cannot do is anything that needs a value:
`.item()`, `bool(t)`, `.tolist()` (sampled ids to text, the decode loop's "all rows done?"),
and ops whose output shape depends on values (`nonzero`, boolean indexing). So a piece of the
trainer runs twice, in this order:

1. for real, on the CPU, under `recording(tape)`: every value-dependent result, keyed by the line
   of code that asked for it, goes on the tape (a Tape: one queue per line, in call order);
2. on fake devices, under `replaying(tape)`: the same code, where each value-dependent op whose
   fake version cannot answer gets the real run's answer from its line's queue (a fake tensor
   of the recorded shape, on the device its inputs are on). Every other op runs fake, with
   torch's device checks.

The two runs take the same decisions (same texts, same number of decode steps), and the fake run
checks that every tensor of those decisions is on the device it must be on: torch's checks, plus
CUDA's rule for index tensors, which fake tensors lack (check_index_devices). A few things
cannot run fake at all and run only in step 1, their results replayed whole (REAL_FUNCTIONS:
the multimodal rope index, which builds a tensor from a list of tensors, something a fake tensor
cannot do). Backward needs a CUDA context, so `replaying` replaces it with one that gives each
trainable parameter a fake gradient on its own device; the backward itself is tested on real
CPU tensors (tests/test_update.py, tests/test_fidelity.py).
"""
from __future__ import annotations

import collections
import os
import sys
from contextlib import ExitStack, contextmanager

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                           DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode, unset_fake_temporarily)
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from distributed import Dist

TORCH_DIR = os.path.dirname(torch.__file__)
HERE = os.path.abspath(__file__)
VALUE_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
CANNOT_FAKE = (DataDependentOutputException, DynamicOutputShapeException)


def real_functions():
    """(class, method) pairs that run only for real: their outputs are replayed whole."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    return [(Qwen2_5_VLModel, "get_rope_index")]


def value_dependent(func) -> bool:
    return isinstance(func, torch._ops.OpOverload) and any(t in func.tags for t in VALUE_TAGS)


def call_site() -> tuple[str, int] | None:
    """File and line of the first caller outside torch and this module: the line whose
    value-dependent op this is (the same line in the real and in the fake run)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR)
                                 or frame.f_code.co_filename == HERE):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame else None


class Tape:
    """The real run's value-dependent results, one queue per (what, line)."""

    def __init__(self):
        self.queues = collections.defaultdict(collections.deque)
        self.recorded = self.replayed = 0
        self.paused = 0  # inside a REAL_FUNCTIONS call: its inner ops are not replayed one by one

    def record(self, key, value) -> None:
        if not self.paused:
            self.queues[key].append(value)
            self.recorded += 1

    def pop(self, key):
        queue = self.queues.get(key)
        return queue.popleft() if queue else None


def _fake_like(mode: FakeTensorMode, real: torch.Tensor, device) -> FakeTensor:
    with no_dispatch():
        meta = real.to("meta")
    return FakeTensor(mode, meta, torch.device(device))


def _device_of(args, kwargs):
    """The device of the first tensor argument: where a replayed output belongs."""
    return next((a.device for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)),
                torch.device("cpu"))


class _Recording(TorchDispatchMode):
    def __init__(self, tape: Tape):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if value_dependent(func):
            self.tape.record((str(func), call_site()), out)
        return out


aten = torch.ops.aten
INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default)


def check_index_devices(func, args) -> None:
    """CUDA's rule for advanced indexing, which fake tensors do not check: index tensors on the
    CPU or on the indexed tensor's device (x[i] with x on cuda:1 and i on cuda:0 raises)."""
    target, indices = args[0], args[1]
    for index in indices:
        if (index is not None and index.device.type != "cpu" and index.device != target.device):
            raise RuntimeError(f"{func}: indices should be either on cpu or on the same device "
                               f"as the indexed tensor ({target.device}), not on {index.device}")


class ReplayingFakeMode(FakeTensorMode):
    """FakeTensorMode whose value-dependent ops, where the fake version cannot answer, take the
    real run's answer for the same line. Ops that fake tensors answer themselves (a value known
    as a constant, integer indexing) still use up their line's entry, so the queues stay in
    step with the real run."""

    def __init__(self, tape: Tape):
        super().__init__(allow_non_fake_inputs=True)
        self.tape, self.depth = tape, 0

    def dispatch(self, func, types, args=(), kwargs=None):
        if func in INDEX_OPS:
            check_index_devices(func, args)
        top = self.depth == 0 and value_dependent(func)  # not the inner ops of a fake kernel
        key = (str(func), call_site()) if top else None
        entry = self.tape.pop(key) if top else None
        self.depth += 1
        try:
            return super().dispatch(func, types, args, kwargs)
        except CANNOT_FAKE:
            if not top:
                raise
            if entry is None:
                raise AssertionError(f"the fake run asked for {func} at {key[1]}, which the real "
                                     f"run did not: the two runs took different paths") from None
            self.tape.replayed += 1
            device = _device_of(args, kwargs)
            return tree_map_only(torch.Tensor, lambda t: _fake_like(self, t, device), entry)
        finally:
            self.depth -= 1


@contextmanager
def _patched(owner, name, replacement):
    original = getattr(owner, name)
    setattr(owner, name, replacement(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _tolist(tape: Tape, mode: FakeTensorMode | None):
    """Tensor.tolist recorded (mode None) or replayed: a real tensor's tolist reads memory
    without any op, so it is caught here and not in the dispatch."""
    def wrap(original):
        def tolist(t):
            key = ("tolist", call_site())
            if mode is None:
                out = original(t)
                tape.record(key, out)
                return out
            entry = tape.pop(key)
            if not isinstance(t, FakeTensor):
                return original(t)
            if entry is None:
                raise AssertionError(f"the fake run asked for tolist() at {key[1]}, which the "
                                     f"real run did not")
            tape.replayed += 1
            return entry
        return tolist
    return wrap


def _real_function(tape: Tape, owner, name: str, mode: FakeTensorMode | None):
    key = ("function", owner.__name__, name)

    def wrap(original):
        def function(*args, **kwargs):
            if mode is None:
                tape.paused += 1
                try:
                    out = original(*args, **kwargs)
                finally:
                    tape.paused -= 1
                tape.record(key, out)
                return out
            entry = tape.pop(key)
            if entry is None:
                raise AssertionError(f"the fake run called {owner.__name__}.{name} more often "
                                     f"than the real run")
            device = _device_of(args, kwargs)
            return tree_map_only(torch.Tensor, lambda t: _fake_like(mode, t, device), entry)
        return function
    return wrap


@contextmanager
def recording(tape: Tape):
    """Run the code for real (CPU), putting its value-dependent results on `tape`
    (torch.distributed.all_reduce a no-op, as under `replaying`)."""
    with ExitStack() as stack:
        stack.enter_context(_patched(torch.Tensor, "tolist", _tolist(tape, None)))
        stack.enter_context(_patched(torch.distributed, "all_reduce", lambda _: all_reduce))
        for owner, name in real_functions():
            stack.enter_context(_patched(owner, name, _real_function(tape, owner, name, None)))
        stack.enter_context(_Recording(tape))
        yield tape


@contextmanager
def replaying(tape: Tape, models: list):
    """The ReplayingFakeMode over `tape`, with backward replaced (see fake_backward) for the
    trainable parameters of `models`, and torch.distributed.all_reduce a no-op (one process
    plays a rank: the collective's device handling around it is what is checked)."""
    mode = ReplayingFakeMode(tape)
    with ExitStack() as stack:
        stack.enter_context(_patched(torch.Tensor, "tolist", _tolist(tape, mode)))
        stack.enter_context(_patched(FakeTensor, "tolist", _tolist(tape, mode)))
        for owner, name in real_functions():
            stack.enter_context(_patched(owner, name, _real_function(tape, owner, name, mode)))
        stack.enter_context(_patched(torch.Tensor, "backward", lambda _: fake_backward(models)))
        stack.enter_context(_patched(torch.distributed, "all_reduce", lambda _: all_reduce))
        stack.enter_context(mode)
        yield mode


def all_reduce(tensor, *args, **kwargs):
    """One process standing in for every rank: the sum over ranks is its own tensor."""


def fake_backward(models: list):
    """loss.backward() under fake tensors: each trainable parameter of `models` gets a fake
    gradient on its own device (added to one it has, as backward accumulates)."""
    def backward(loss, *args, **kwargs):
        assert isinstance(loss, FakeTensor) and loss.dim() == 0 and loss.requires_grad, loss
        for model in models:
            for p in model.parameters():
                if p.requires_grad:
                    grad = torch.zeros_like(p)
                    p.grad = grad if p.grad is None else p.grad + grad
    return backward


# ---------------------------------------------------------------- placing a model
def place_whole(model, device: str) -> None:
    """Every parameter and buffer of `model` (real CPU tensors) onto fake `device`, as
    from_pretrained(device_map=device) would load it. Call under the fake mode."""
    model.to(device)


def split_map(model, devices: int = 2) -> dict:
    """The device map --device_map auto gives `model` (a *ForConditionalGeneration) on two
    80 GB GPUs, computed by transformers' own _get_device_map (the balanced map of
    from_pretrained(device_map="auto")), with its decoder layers then split half and half, as
    that map splits a 7B's 28 layers (the tiny model is too small for the balanced map to split
    its two layers): vision tower and embeddings on cuda:0, lm_head on the last device, a device
    boundary inside the layer stack."""
    from transformers.integrations.accelerate import _get_device_map
    memory = {i: 80 << 30 for i in range(devices)}
    with unset_fake_temporarily():
        auto = dict(_get_device_map(model, "auto", memory, None))
    layers = model.model.language_model.layers
    prefix = "model.language_model.layers"
    split = {k: v for k, v in auto.items() if not k.startswith(prefix)}
    for i in range(len(layers)):
        split[f"{prefix}.{i}"] = i * devices // len(layers)
    return split


def place_split(model, device_map: dict) -> None:
    """Dispatch `model` over fake GPUs with accelerate's dispatch_model, as from_pretrained
    does after loading with a device map: each module's weights on its device, and the hooks
    that move a module's inputs to it. Call under the fake mode."""
    from accelerate import dispatch_model
    dispatch_model(model, device_map)


class PlayedRank(Dist):
    """A Dist for one process playing rank `rank` of `world` on `device`: gather returns this
    rank's value for every rank; mean, any and average_gradients run their own code, with
    torch.distributed.all_reduce a no-op under `recording` and `replaying`."""

    def __init__(self, rank: int, world: int, device: str):
        self.rank, self.world, self.is_main = rank, world, rank == 0
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def broadcast(self, obj):
        return obj

    def gather(self, obj) -> list:
        return [obj] * self.world

    def barrier(self):
        pass

    def close(self, wait: bool = True) -> None:
        pass
