"""torch.distributed set-up for torchrun (NCCL on GPU, gloo on CPU) and the few collectives we use."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_s: int = 300) -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process otherwise.

    The timeout bounds how long a collective waits for a dead peer (torchrun also tears the job
    down when a worker dies, so a dead process ends the job instead of hanging it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if device_type == "cuda":
            # Before any collective: NCCL (and broadcast_object_list) use the current device.
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum across processes (in place, returned); the identity for one process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equal-length 1-D tensors from all processes along dim 0, ordered by rank."""
    if not info.enabled:
        return t
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
