"""torch.distributed set-up for torchrun (NCCL on GPU, gloo on CPU), the collectives we use, and
the agreement on failures that lets every process stop the same way."""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


class SharedError(RuntimeError):
    """Another process failed at a point where every process checks in; raised on the others.

    kind: the class name of the original exception; rank: the process it happened on.
    """

    def __init__(self, kind: str, message: str, rank: int):
        super().__init__(message)
        self.kind, self.rank = kind, rank


def env_rank() -> int:
    """This process's global rank as torchrun sets it (0 outside torchrun), before any group exists."""
    return int(os.environ.get("RANK", "0"))


def is_shared(error: BaseException) -> bool:
    """Whether every process knows about `error` (so only rank 0 needs to print it)."""
    return isinstance(error, SharedError) or getattr(error, "_fastcifar_shared", False)


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
        _import_before_group()
        timeout = datetime.timedelta(seconds=timeout_s)
        if device_type == "cuda":
            # Before any collective: NCCL (and broadcast_object_list) use the current device.
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _import_before_group() -> None:
    """Import, before the process group exists, the torch modules that capture it at import time.

    torch.distributed.nn.functional (and fsdp's ShardedGradScaler) take `group=group.WORLD` as a
    default argument, evaluated on import. DDP's constructor imports them (through torch._dynamo);
    imported after init_process_group they would hold the live group forever, so that
    destroy_process_group could not free it and gloo's threads would run on into interpreter exit,
    where they rarely abort the process ("terminate called without an active exception").
    Imported first, those defaults are None and resolve the group when called.
    """
    import torch._dynamo  # noqa: F401  (pulls in torch.distributed.nn and torch.distributed.fsdp)
    import torch.distributed.nn  # noqa: F401


def shutdown() -> None:
    """Destroy the process group so that gloo's threads end now, not during interpreter exit.

    Call it once nothing that holds the group is left (DDP wrappers do): the collection first
    frees such objects caught in reference cycles, so the group's last reference goes here.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def agree(info: DistInfo, error: Exception | None) -> None:
    """Every process calls this at the same point; if any failed, all raise (none waits forever).

    The process that failed re-raises its own exception (marked as shared); the others raise a
    SharedError carrying the first failure's class name, message and rank.
    """
    if not info.enabled:
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error).__name__, str(error))
    reports = [None] * info.world_size
    dist.all_gather_object(reports, mine)
    failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if not failed:
        return
    if error is not None:
        error._fastcifar_shared = True  # type: ignore[attr-defined]
        raise error
    rank, (kind, message) = failed[0]
    raise SharedError(kind, message, rank)


def run_on_all(info: DistInfo, fn: Callable[[], T]) -> T:
    """fn() on every process, then `agree`: a failure anywhere stops every process."""
    try:
        result, error = fn(), None
    except Exception as e:  # any failure must reach the other processes, not only the known kinds
        result, error = None, e
    agree(info, error)
    return result  # type: ignore[return-value]


def on_main(info: DistInfo, fn: Callable[[], T]) -> T:
    """fn() on rank 0 only; every process gets its result, or raises its failure."""
    if not info.enabled:
        return fn()
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
    box = [(result, None if error is None else (type(error).__name__, str(error)))]
    dist.broadcast_object_list(box, src=0)
    result, report = box[0]
    if error is not None:
        error._fastcifar_shared = True  # type: ignore[attr-defined]
        raise error
    if report is not None:
        raise SharedError(report[0], report[1], 0)
    return result


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


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
