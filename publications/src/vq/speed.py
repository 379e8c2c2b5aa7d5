"""Memory and speed strategies, applied to a model from outside: the model's code reads as the method.

`apply_speed_switches` turns on what a run's config asks for (docs/speed.md):
- train.checkpointing: activation checkpointing of the encoder's layers, the decoder's blocks and
  VGG19's blocks, each module run in chunks of `CHUNK` rows, and glibc's fixed mmap threshold on a
  CPU (`return_freed_memory`);
- train.channels_last: 4-D weights in channels_last (`to_channels_last`);
- train.sync_free false: the decoder groups a batch by target code on the host.
None of them changes a value. A strategy gives the module a subclass of its own class whose forward
wraps the class's (as `torch.distributed.fsdp.fully_shard` does): weights, state_dict and type
checks stay those of the class, and a deep copy (the weight average) keeps the strategy.
"""
from __future__ import annotations

import ctypes
import itertools
import platform
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK = 8
"""Rows per chunk under activation checkpointing: backward then finishes one chunk before it recomputes
the next, so the activations recomputed at any one time are a chunk's (a step decodes 6x its batch)."""


def recomputed(forward: Callable) -> Callable:
    """forward under autograd through activation checkpointing: only its inputs are kept, and it runs
    again in backward."""
    def run(self, *args):
        if torch.is_grad_enabled():
            return checkpoint(forward, self, *args, use_reentrant=False)
        return forward(self, *args)
    return run


def chunked(forward: Callable) -> Callable:
    """forward under autograd in chunks of `CHUNK` rows: the arguments with the first one's rows are
    split, the others (a shared code row, a list of features) go to every chunk. Every layer here is
    per sample (convolutions, InstanceNorm, upsampling), so the result is the same."""
    def run(self, x, *rest):
        if not torch.is_grad_enabled() or len(x) <= CHUNK:
            return forward(self, x, *rest)
        parts = [a.split(CHUNK) if isinstance(a, torch.Tensor) and len(a) == len(x) else itertools.repeat(a)
                 for a in (x, *rest)]
        return torch.cat([forward(self, *args) for args in zip(*parts)])
    return run


def grouped_by_code(forward: Callable) -> Callable:
    """A decoder's forward(x, code) for a batch of mixed codes group by group: rows of one code decode
    together through ordinary convolutions, instead of one grouped convolution of per-sample kernels.
    One host read of the groups: 1.5x faster on a CPU, where the read costs nothing."""
    def run(self, x, code):
        if len(code) > 1:
            codes, inverse = torch.unique(code, dim=0, return_inverse=True)  # (G, code_dim), (B,)
            if len(codes) < len(code):
                order = inverse.argsort(stable=True)
                groups = x[order].split(torch.bincount(inverse).tolist())
                return torch.cat([forward(self, rows, codes[g:g + 1]) for g, rows in enumerate(groups)])[
                    order.argsort()]
        return forward(self, x, code)
    return run


_subclasses: dict[tuple[type, Callable], type] = {}


def wrap_forward(module: nn.Module, strategy: Callable) -> nn.Module:
    """Give `module` the subclass of its class whose forward is strategy(the class's forward); returns it.
    A module that has the strategy already keeps it once (a VGG19 shared by several runs, a benchmark's).
    The subclass lives here, not in the class's module: pickle a wrapped module's state_dict, not the module."""
    cls = type(module)
    if strategy in getattr(cls, "speed_strategies", ()):
        return module
    if (cls, strategy) not in _subclasses:
        _subclasses[cls, strategy] = type(f"{cls.__name__}_{strategy.__name__}", (cls,), {
            "forward": strategy(cls.forward), "__module__": __name__,
            "speed_strategies": (*getattr(cls, "speed_strategies", ()), strategy)})
    module.__class__ = _subclasses[cls, strategy]
    return module


def checkpoint_model(model: nn.Module, perceptual: nn.Module | None = None) -> None:
    """Activation checkpointing of the encoder's layers, the decoder's blocks and VGG19's blocks, each of the
    three run in chunks of rows."""
    for block in [*model.encoder.net, *model.decoder.res, *model.decoder.up, model.decoder.out,
                  *(perceptual.blocks if perceptual is not None else [])]:
        wrap_forward(block, recomputed)
    for module in (model.encoder, model.decoder, perceptual):
        if module is not None:
            wrap_forward(module, chunked)


def return_freed_memory() -> bool:
    """Make glibc's malloc hand every freed block of 1 MiB or more back to the OS at once.

    By default glibc raises its mmap threshold up to 32 MiB as large blocks are freed, so
    tensors below that size later come from the heap, whose free space the process keeps:
    the resident set then grows well past what the tensors need (measured at batch 8 with
    activation checkpointing: the decoder's chunks of 8 rows are 19-75 MB). A fixed
    threshold costs some speed in page faults, so only the memory-saving mode asks for it.
    Returns False where malloc is not glibc's (nothing changes there).
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>; setting it also stops glibc's dynamic adjustment
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20))
    except (OSError, AttributeError):
        return False


def to_channels_last(module: nn.Module) -> nn.Module:
    """Put a module's 4-D parameters and buffers in channels_last, in place; returns it.

    `module.to(memory_format=torch.channels_last)` fails on the hyper-convs'
    5-D kernel banks (channels_last needs rank 4); their mixed kernels are 4-D
    and `F.conv2d` takes the input's layout.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


def apply_speed_switches(checkpointing: bool, channels_last: bool, model: nn.Module,
                         perceptual: nn.Module | None = None, sync_free: bool = True) -> None:
    """The switches of a run's config on its model and VGG19 (see the module's docstring)."""
    if checkpointing:
        checkpoint_model(model, perceptual)
        if next(model.parameters()).device.type == "cpu":
            return_freed_memory()
    if not sync_free:  # after the chunking: a group's rows are chunked, not a chunk's rows grouped
        wrap_forward(model.decoder, grouped_by_code)
    if channels_last:
        for module in (model, perceptual):
            if module is not None:
                to_channels_last(module)


def capture_cuda_graph(step, warmup=None) -> torch.cuda.CUDAGraph:
    """`step()` recorded as a CUDA graph (not run), after `warmup()` (default: `step`) ran three
    times on a side stream, where cuDNN picks its algorithms and the allocator settles."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            (warmup or step)()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


class GraphedStep:
    """A step recorded as a CUDA graph once per key (a training phase) on a static copy of its batch,
    then replayed with each batch copied in. The lr is a device tensor (`make_optimizer(capturable=True)`),
    so `set_lr` reaches the replays."""

    def __init__(self):
        self.graphs: dict = {}

    def __call__(self, key, batch: dict[str, torch.Tensor], step: Callable, warmup: Callable) -> None:
        """step(static batch) and warmup(static batch): the step to record and what runs before recording."""
        if key not in self.graphs:
            static = {name: value.clone() for name, value in batch.items()}
            self.graphs[key] = capture_cuda_graph(lambda: step(static), lambda: warmup(static)), static
        graph, static = self.graphs[key]
        for name, value in static.items():
            value.copy_(batch[name])
        graph.replay()


class Undo:
    """What an optimizer step changes (weights, buffers such as the codebook counters, optimizer state),
    kept before the step, to give back on the device where the step is not to count: the skip of a
    degenerate batch without reading its check on the host (train.sync_free)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.before = [t.clone() for t in self.tensors()]

    def tensors(self) -> list[torch.Tensor]:
        state = [t.detach() for t in [*self.model.parameters(), *self.model.buffers()]]
        for p in self.model.parameters():
            state += [v for v in self.optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        return state

    def unless(self, ok: torch.Tensor) -> None:
        """After the step: every changed tensor back to its value before, where `ok` (a 0-d bool) is false."""
        after = self.tensors()  # the optimizer's state exists after its first step
        before = self.before + [torch.zeros_like(t) for t in after[len(self.before):]]  # AdamW's initial state is 0
        for tensor, old in zip(after, before):
            tensor.copy_(torch.where(ok, tensor, old))

