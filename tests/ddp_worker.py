"""Processes of the two-process tests: the loader test's reader (a module of its own, so spawned children
import little) and, run as a script under torchrun, the trainer followed by a report of its live threads."""

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


def native_threads() -> list[str]:
    """Names of this process's OS threads (gloo's are gloo_tcp_loop and pt_gloo_runloop)."""
    import os

    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(names)


if __name__ == "__main__":
    # Under torchrun: `python -m fastcifar.train ARGS` in this process, then the threads still alive
    # once it has returned, i.e. what would meet interpreter exit.
    import sys

    from fastcifar.train import main

    code = main(sys.argv[1:])
    print(f"threads after main: {native_threads()}", flush=True)
    sys.exit(code)
