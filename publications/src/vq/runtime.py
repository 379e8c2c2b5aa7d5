"""Devices, mixed precision, seeding and the speed switches: what every script needs before it runs a model.

The speed switches of a run (`train.checkpointing`, `train.channels_last`) change memory and
layout, never values; `apply_speed_switches` turns them on where the run is set up.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import random
import re

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


class DeviceError(ValueError):
    """A device string that is malformed or names hardware this machine lacks."""


def resolve_device(name: str) -> torch.device:
    """Check `-d` values: cpu, cuda, cuda:N, mps. Raise DeviceError saying what is available."""
    text = name.strip().lower()
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise DeviceError(f"device {name!r} not understood; use cpu, cuda, cuda:N or mps")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available on this machine; use -d cpu")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        # Training and evaluation run fixed shapes (the crop), so cuDNN's per-shape autotuning pays off.
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", index)
    if text == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' requested but MPS is not available on this machine; use -d cpu")
    return torch.device(text)


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


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 hardware: 'amx_bf16', 'avx512_bf16', 'arm_bf16', or None.

    Without it, PyTorch emulates bf16 and autocast becomes far slower than fp32
    (measured 50x for a 3x3 convolution on an AVX2-only AMD EPYC).
    """
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        with contextlib.suppress(AttributeError, RuntimeError):
            if getattr(torch.cpu, probe)():
                return name
    if platform.machine().lower() in ("aarch64", "arm64"):
        with contextlib.suppress(AttributeError, RuntimeError):
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return "arm_bf16"
    return None


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype for train.amp = auto | bf16 | fp16 | none (None = full fp32).

    `auto` is bf16 on CUDA with bf16 (else fp16) and on CPUs with bf16 units
    (AMX, AVX512-BF16, Arm BF16); fp32 on other CPUs, where emulated bf16 is slow.
    """
    if mode == "none" or device.type == "mps":
        return None
    if mode == "fp16":
        if device.type != "cuda":
            raise DeviceError("train.amp=fp16 needs CUDA; use bf16 or none on CPU")
        return torch.float16
    if device.type == "cpu" and cpu_bf16_units() is None:
        if mode == "auto":
            _log_once("this CPU has no bf16 units (no AMX, AVX512-BF16 or Arm BF16): train.amp=auto runs in fp32")
            return None
        _log_once("train.amp=bf16 on a CPU without bf16 units: PyTorch emulates bf16, expect it to be much "
                  "slower than fp32 (train.amp=auto picks fp32 here)", logging.WARNING)
    if mode == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


_logged: set[str] = set()


def _log_once(message: str, level: int = logging.INFO) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """One autocast context for the model's forward; a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Put a module's 4-D parameters and buffers in channels_last, in place; returns it.

    `module.to(memory_format=torch.channels_last)` fails on the hyper-convs'
    5-D kernel banks (channels_last needs rank 4); their mixed kernels are 4-D
    and `F.conv2d` takes the input's layout.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


RECOMPUTE_CHUNK = 8
"""Rows per chunk under activation checkpointing (see `in_chunks`)."""


def run_block(block, *args, recompute: bool = False):
    """block(*args); with `recompute`, under autograd, through activation checkpointing:
    only the block's inputs are kept and its forward runs again in backward."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def in_chunks(fn, *tensors: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    """fn(*tensors), batch row by row independent; with `recompute`, under autograd, run in
    chunks of RECOMPUTE_CHUNK rows. Every layer here is per sample (convs, InstanceNorm,
    upsampling), so the result is the same; but backward then finishes one chunk before it
    recomputes the next, and the activations recomputed at any one time are a chunk's, not
    the whole batch's (a step decodes 6x its batch)."""
    if not (recompute and torch.is_grad_enabled()) or len(tensors[0]) <= RECOMPUTE_CHUNK:
        return fn(*tensors)
    return torch.cat([fn(*parts) for parts in zip(*(t.split(RECOMPUTE_CHUNK) for t in tensors))])


def apply_speed_switches(checkpointing: bool, channels_last: bool, model: torch.nn.Module,
                         perceptual: torch.nn.Module | None = None, sync_free: bool = True) -> None:
    """train.checkpointing: activation checkpointing of the model's encoder and decoder and of
    VGG19's blocks, plus glibc's fixed mmap threshold on CPU (`return_freed_memory`);
    train.channels_last: the model's and VGG19's 4-D weights in channels_last;
    train.sync_free false: the decoder groups a batch by target code on the host."""
    model.decoder.group_by_code = not sync_free
    if checkpointing:
        model.set_checkpointing(True)
        if perceptual is not None:
            perceptual.recompute = True
        if next(model.parameters()).device.type == "cpu":
            return_freed_memory()
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as plain tensors/lists, so a checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]) if isinstance(rest[0], list) else state["python"])
    name, keys, *tail = state["numpy"]
    np.random.set_state((name, keys.numpy(), *tail))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_name() -> str:
    """CPU model, core count, SIMD level and bf16 hardware, for logs and benchmarks."""
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        if m := re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read()):
            model = m.group(1).strip()
    simd = torch.backends.cpu.get_cpu_capability()
    return f"{model} ({os.cpu_count()} cores, {simd}, {cpu_bf16_units() or 'no bf16 units'})"


def device_name(device: torch.device) -> str:
    """The GPU's name, or `cpu_name()`."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
