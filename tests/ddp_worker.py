"""A process of the two-process loader test; a module of its own so spawned children import little."""

from __future__ import annotations


def read_epoch(rank: int, world: int, path: str, port: int, results) -> None:
    """Join a gloo group and report this rank's batch indices for epoch 2 and its num_batches()."""
    import torch.distributed as dist

    from fastcifar.data import open_split

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = open_split(path, backend="memory", batch_size=20, shuffle=True, drop_last=True, seed=3,
                            distributed=True)
        results.put((rank, [b.indices.tolist() for b in loader.epoch(2)], loader.num_batches()))
    finally:
        dist.destroy_process_group()
