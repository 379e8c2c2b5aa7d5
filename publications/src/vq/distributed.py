"""torchrun support: process group, rank-0 guards, reductions. Single-process runs pass through unchanged."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_rank() -> int:
    """The rank torchrun gave this process (0 without torchrun), known before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: torch.device, timeout_s: float = 1800) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.

    On CUDA each process takes the GPU of its LOCAL_RANK. `timeout_s`: how long a collective
    waits for the other ranks (train.dist_timeout_s).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, local), device


def sum_across(d: Dist, *values: float) -> list[float]:
    """Sum plain numbers over all ranks (validation metrics)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def replicas_in_sync(d: Dist, model: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical weights (a check DDP should always pass); logged at the end
    of a run under torchrun."""
    if not d.enabled:
        return True
    flat = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(d.world_size)]
    dist.all_gather(gathered, flat)
    in_sync = all(torch.equal(gathered[0], g) for g in gathered[1:])
    logging.getLogger("train").log(logging.INFO if in_sync else logging.ERROR,
                                   "model weights identical on all %d ranks: %s", d.world_size, in_sync)
    return in_sync


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
