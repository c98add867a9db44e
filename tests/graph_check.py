"""A CPU stand-in for CUDA-graph capture that checks what a real capture relies on.

A CUDA graph replays the kernels its capture recorded: the same ops, on the same memory, with the
same scalar arguments, and a capture fails on anything that reads a device value back to the host.
`CheckedCapture` has the interface of `fastcifar.graphs.CudaGraphCapture`; its "graph" runs the
step for real every time (the CPU has no graphs) under a dispatch mode that records each aten op
with its non-tensor arguments and tensor shapes. The first replay is the recording; every later
replay must match it op for op, and a host read is an error, as it would be in a capture. A
Python float that changed between steps (an lr, a threshold) shows up as a mismatch.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops that need a device value on the host (an implicit sync; not allowed while capturing).
HOST_READS = {"aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.nonzero", "aten.masked_select",
              "aten._unique2", "aten.unique_dim", "aten.bincount"}
# A tensor made from host data inside the step: its values are baked into a graph, so they are
# part of the record (a Python scalar such as torch.where's 0.0 is fine while it stays the same).
FROM_HOST = {"aten.lift_fresh"}


class GraphUnsafe(RuntimeError):
    """What a real capture would have failed on, or replayed wrongly."""


def _leaf(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype)
    if isinstance(x, float):
        return ("float", repr(x))
    return x if isinstance(x, (int, bool, str, type(None), torch.dtype, torch.device)) else repr(type(x))


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name in HOST_READS:
            raise GraphUnsafe(f"{func} reads a device value on the host: a CUDA graph capture would fail")
        leaves, _ = tree_flatten((args, kwargs))
        record = tuple(_leaf(x) for x in leaves)
        if name in FROM_HOST:
            record += tuple(tuple(x.flatten().tolist()) for x in leaves if isinstance(x, torch.Tensor))
        self.ops.append((str(func), record))
        return func(*args, **kwargs)


class CheckedCapture:
    """warm(body) runs it; capture(body) returns a replay that records on its first call and then
    checks every later call against that record."""

    def __init__(self):
        self.captured: list[int] = []  # ops per captured body
        self.replays = 0

    def warm(self, body) -> None:
        body()

    def capture(self, body):
        recorded: list[tuple] | None = None

        def replay() -> None:
            nonlocal recorded
            with _Recorder() as rec:
                body()
            self.replays += 1
            if recorded is None:
                recorded = rec.ops
                self.captured.append(len(recorded))
                return
            if rec.ops != recorded:
                at = next((i for i, (a, b) in enumerate(zip(recorded, rec.ops)) if a != b), min(len(recorded), len(rec.ops)))
                raise GraphUnsafe(f"replay differs from the capture at op {at} of {len(recorded)}: "
                                  f"{recorded[at] if at < len(recorded) else None} -> "
                                  f"{rec.ops[at] if at < len(rec.ops) else None}")

        return replay
