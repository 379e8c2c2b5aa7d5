"""Devices, mixed precision and seeding: what every script needs before it runs a model.
(The speed switches that change memory and layout, never values, are `vq.speed`'s.)"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import re

import numpy as np
import torch

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
