"""Checkpoints off the critical path: copy to host memory, then write, fsync and rename in a thread.

The training loop blocks only for the copy of the state to host memory (pinned, queued on the
CUDA stream without a host sync; on the CPU a plain copy) and, when the previous write has not
finished, for that write. The host buffers are kept and reused, so pinned memory is allocated
once. Each file goes through `save_checkpoint`: a temporary file beside it, fsync, atomic rename,
so a crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, save_checkpoint


class CheckpointWriter:
    """One background write at a time; `blocking_seconds` is what the caller spent waiting."""

    def __init__(self, device: torch.device):
        self.device = device
        self.blocking_seconds = 0.0
        self.writes = 0
        self._pool: dict[tuple, list[torch.Tensor]] = {}  # (shape, strides, dtype) -> host buffers, reused
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, files: list[tuple[Path, dict[str, Any]]]) -> None:
        """Write each (path, state) in order, in the background; returns once the state is copied."""
        t0 = time.perf_counter()
        self._join()  # the host buffers are about to be overwritten: the last write must be done
        copies: dict[int, torch.Tensor] = {}  # a tensor in two files (the model in best and last) once
        used: dict[tuple, int] = {}  # buffers of each (shape, dtype) taken in this save
        host = [(path, self._to_host(state, copies, used)) for path, state in files]
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()  # the copies are queued on the stream; the writer waits for this, not we
        self._thread = threading.Thread(target=self._write, args=(host, done), name="checkpoint-writer")
        self._thread.start()
        self.blocking_seconds += time.perf_counter() - t0

    def _to_host(self, obj: Any, copies: dict[int, torch.Tensor], used: dict[tuple, int]) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in copies:
                copies[id(obj)] = self._host_copy(obj.detach(), used)
            return copies[id(obj)]
        if isinstance(obj, dict):
            return {k: self._to_host(v, copies, used) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._to_host(v, copies, used) for v in obj)
        return obj

    def _host_copy(self, t: torch.Tensor, used: dict[tuple, int]) -> torch.Tensor:
        """Copy into the next free host buffer of t's shape, strides and dtype (made once, pinned for
        CUDA; the strides kept, so a channels_last tensor is saved and restored as channels_last)."""
        key = (tuple(t.shape), t.stride(), t.dtype)
        pool, i = self._pool.setdefault(key, []), used.get(key, 0)
        used[key] = i + 1
        if i == len(pool):
            pool.append(torch.empty_like(t, device="cpu", pin_memory=t.device.type == "cuda"))
        return pool[i].copy_(t, non_blocking=t.device.type == "cuda")

    def _write(self, host: list, done) -> None:
        try:
            if done is not None:
                done.synchronize()
            for path, state in host:
                save_checkpoint(path, state)
            self.writes += 1
        except BaseException as e:  # noqa: BLE001  (reported by the next wait, in the training thread)
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error (a CheckpointError) if it failed."""
        t0 = time.perf_counter()
        self._join()
        self.blocking_seconds += time.perf_counter() - t0

    def drain(self) -> None:
        """Let the write in flight finish, for a run that is stopping on another error (a failure
        of this write is then only reported, so that it does not hide that error)."""
        try:
            self._join()
        except CheckpointError as e:
            print(f"note: {e}", file=sys.stderr, flush=True)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if isinstance(error, CheckpointError):
            raise error
        if error is not None:
            raise CheckpointError(f"writing a checkpoint failed: {type(error).__name__}: {error}") from error


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (never a finished checkpoint)."""
    stale = sorted(folder.glob(".*.pt.*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
