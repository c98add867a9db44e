"""Loaders over .beton splits: batches of uint8 images on the device, from ffcv or from memory.

Both backends yield the same batches in the same order for the same (seed, epoch, subset):
    ffcv    decodes batches on CPU threads through ffcv's compiled pipeline, then copies them to
            the device (needs ffcv; imported only when this backend is chosen);
    memory  reads the whole split once (no ffcv needed), keeps it as one uint8 tensor on the
            device and gathers every batch there: no host work per batch.
The order is ours, not ffcv's: a permutation from a CPU torch.Generator seeded with seed + epoch,
identical on every process. ffcv's own orders would not do: its single-process RANDOM order is a
numpy permutation while its distributed mode uses torch's DistributedSampler (another
permutation, padded to a multiple of the world size), so the two would not agree. With
distributed=True, rank r of W takes positions r::W of the (drop_last-trimmed) epoch order, so the
union over ranks of everyone's k-th batch is exactly the k-th batch of the single-process order.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fastcifar.beton import BetonIndex, open_beton, read_images, read_meta
from fastcifar.sources import DataError

BACKENDS = ("ffcv", "memory")
__all__ = ["BACKENDS", "Batch", "SplitLoader", "epoch_order", "keep_torch_threads", "open_split", "read_meta",
           "resolve_backend"]


class Batch(NamedTuple):
    images: Tensor  # (N, 3, H, W) uint8 on the device; storage is channels_last (NHWC)
    labels: Tensor  # (N,) int64, the training label
    clean_labels: Tensor  # (N,) int64, the true label or -1
    indices: Tensor  # (N,) int64, the sample's position in the source


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Undo ffcv's changes to torch's CPU thread count (its import and each Loader set it)."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def resolve_backend(name: str) -> str:
    """"ffcv" or "memory" for data.backend `name`: "auto" is ffcv where it imports (an optional
    extra, `pip install 'fastcifar[ffcv]'`), else the memory backend, which needs no ffcv."""
    if name != "auto":
        return name
    try:
        with keep_torch_threads():
            import ffcv  # noqa: F401
    except (ImportError, OSError):  # not installed, or a system library (libturbojpeg) missing
        return "memory"
    return "ffcv"


def epoch_order(rows: np.ndarray, *, shuffle: bool, seed: int, epoch: int, batch_size: int,
                drop_last: bool, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The rows ((M,) int64) this process visits in `epoch`, in order; cut into batch_size // world_size.

    Shuffled by torch.randperm with a CPU generator seeded seed + epoch (the same on every
    machine); drop_last trims to whole global batches before the ranks take positions r::W.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        rows = rows[torch.randperm(len(rows), generator=g).numpy()]
    if drop_last:
        rows = rows[: len(rows) // batch_size * batch_size]
    return rows[rank::world_size]


class _DeviceSplit:
    """A whole split on one device: images (N, H, W, 3) uint8; labels, clean_labels, indices (N,) int64."""

    def __init__(self, index: BetonIndex, device: torch.device):
        self.images = torch.from_numpy(read_images(index)).to(device)
        self.labels, self.clean_labels, self.indices = (
            torch.from_numpy(a).to(device) for a in (index.labels, index.clean_labels, index.indices))


# Loaders of the same file on the same device share one copy (the trainer opens the training
# split twice: shuffled for training, in order for scoring). Nothing writes to these tensors.
_resident: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _on_device(index: BetonIndex, device: torch.device) -> _DeviceSplit:
    stat = index.path.stat()
    key = (str(index.path.resolve()), stat.st_size, stat.st_mtime_ns, str(device))
    split = _resident.get(key)
    if split is None:
        split = _resident[key] = _DeviceSplit(index, device)
    return split


class _MemoryBackend:
    """The whole split as device tensors; a batch is one gather per field."""

    def __init__(self, split, device: torch.device):
        self.device = device
        self._split = split  # keeps a shared copy alive
        self.images, self.labels, self.clean_labels, self.indices = (
            split.images, split.labels, split.clean_labels, split.indices)

    def batches(self, rows: np.ndarray, local_batch: int) -> Iterator[Batch]:
        fields = (self.images, self.labels, self.clean_labels, self.indices)
        if self.device.type == "cpu":
            # numpy's single-threaded take: torch's gather runs on its OpenMP pool, which on a busy
            # 2-core machine was 30x slower (a 1.5 MB copy needs no threads); shares the tensors' memory
            arrays = [f.numpy() for f in fields]
            gather = lambda r: [torch.from_numpy(a.take(r, axis=0)) for a in arrays]  # noqa: E731
        else:
            rows = torch.from_numpy(rows).to(self.device)  # one copy per epoch, no sync per batch
            gather = lambda r: [f.index_select(0, r) for f in fields]  # noqa: E731  (x[r]: 7x slower)
        for start in range(0, len(rows), local_batch):
            images, labels, clean, indices = gather(rows[start: start + local_batch])
            yield Batch(images.permute(0, 3, 1, 2), labels, clean, indices)

    def arrays(self) -> dict[str, Tensor]:
        return {"images": self.images.permute(0, 3, 1, 2), "labels": self.labels,
                "clean_labels": self.clean_labels, "indices": self.indices}


class _FfcvBackend:
    """One ffcv Loader per split, compiled once; each epoch feeds it our order.

    ffcv's Loader fixes its sample list at construction (changing it means a new Loader and
    about a second of JIT), so each epoch drives ffcv 1.0.2's EpochIterator with our rows
    directly, as Loader.__iter__ does with its own order.
    """

    def __init__(self, index: BetonIndex, device: torch.device, local_batch: int, num_workers: int):
        with keep_torch_threads():
            try:
                import numba
                from ffcv.loader import Loader, OrderOption
                from ffcv.loader.epoch_iterator import EpochIterator
            except ImportError as e:
                raise DataError(f"the ffcv backend needs ffcv ({e}); install it (see README) or use "
                                f"backend 'memory' (data.backend=memory), which reads .beton files "
                                f"without ffcv") from None
            self._epoch_iterator = EpochIterator
            workers = max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))
            self.loader = Loader(str(index.path), batch_size=local_batch, num_workers=workers,
                                 order=OrderOption.SEQUENTIAL, drop_last=False, seed=0)
        self.index = index
        self.device = device
        self._arrays: _MemoryBackend | None = None

    def batches(self, rows: np.ndarray, local_batch: int) -> Iterator[Batch]:
        if not len(rows):
            return
        assert local_batch == self.loader.batch_size
        with keep_torch_threads():
            it = self._epoch_iterator(self.loader, rows.astype(np.uint64))
        threads = torch.get_num_threads()
        # ffcv reuses its buffers: copy before handing a batch out (on a CPU with numpy, as above)
        if self.device.type == "cpu":
            copy = lambda t: torch.from_numpy(t.numpy().copy())  # noqa: E731
        else:
            # Pinned + non_blocking: no host sync per batch, so loading overlaps the GPU's work; the
            # pinned block is not reused before its copy is done (torch's pinned allocator tracks it).
            copy = lambda t: t.pin_memory().to(self.device, non_blocking=True)  # noqa: E731
        try:
            for images, labels, clean, indices in it:
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                yield Batch(copy(images).permute(0, 3, 1, 2), *(copy(t.view(-1)) for t in (labels, clean, indices)))
        finally:
            it.close()

    def arrays(self) -> dict[str, Tensor]:
        if self._arrays is None:  # read on first use, then kept: callers ask every epoch
            self._arrays = _MemoryBackend(_on_device(self.index, self.device), self.device)
        return self._arrays.arrays()


class SplitLoader:
    """Batches of one .beton split; make it with `open_split`.

    num_samples: samples in the split; their indices (Batch.indices) are 0..num_samples-1, so
    per-sample arrays of length num_samples can be indexed by them. batch_size: global;
    local_batch_size: per process. Images: (N, 3, H, W) uint8 in channels_last storage.
    """

    def __init__(self, index: BetonIndex, backend, *, batch_size: int, shuffle: bool, drop_last: bool,
                 seed: int, rank: int, world_size: int):
        self.path = index.path
        self.num_samples = index.num_samples
        self.image_shape = index.image_shape
        self.batch_size, self.local_batch_size = batch_size, batch_size // world_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self._backend = backend  # open_beton has checked that sample index == row of the file

    def _rows(self, indices: Tensor | np.ndarray | None) -> np.ndarray:
        if indices is None:
            return np.arange(self.num_samples, dtype=np.int64)
        ids = indices.detach().cpu().numpy() if isinstance(indices, Tensor) else np.asarray(indices)
        if ids.dtype == np.bool_:
            if ids.shape != (self.num_samples,):
                raise ValueError(f"a boolean subset must have shape ({self.num_samples},), got {ids.shape}")
            return np.flatnonzero(ids)
        ids = ids.astype(np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise ValueError(f"subset indices must be sample indices in [0, {self.num_samples})")
        return ids

    def epoch(self, epoch: int, indices: Tensor | np.ndarray | None = None) -> Iterator[Batch]:
        """This process's batches for `epoch`.

        indices: a subset of sample indices (values of Batch.indices, any order; or a bool mask
        of length num_samples) to visit instead of the whole split; used in the order given
        unless shuffled. Batches are new tensors: keep them as long as you like.
        """
        rows = epoch_order(self._rows(indices), shuffle=self.shuffle, seed=self.seed, epoch=epoch,
                           batch_size=self.batch_size, drop_last=self.drop_last, rank=self.rank,
                           world_size=self.world_size)
        return self._backend.batches(rows, self.local_batch_size)

    def num_batches(self, num_samples: int | None = None) -> int:
        """Batches this process gets in an epoch over `num_samples` samples (default: all)."""
        n = self.num_samples if num_samples is None else num_samples
        if self.drop_last:
            return n // self.batch_size
        mine = len(range(self.rank, n, self.world_size))
        return -(-mine // self.local_batch_size)

    def arrays(self) -> dict[str, Tensor]:
        """The whole split on the device: images (N, 3, H, W) uint8 channels_last, labels,
        clean_labels, indices (N,) int64, in index order (ffcv backend: read on first call).
        Shared with other loaders of the same file: read them, do not write to them."""
        return self._backend.arrays()


class _ArraySplit(NamedTuple):
    """Arrays already in memory, laid out like _DeviceSplit, and the index facts SplitLoader reads."""

    images: Tensor  # (N, H, W, 3) uint8
    labels: Tensor
    clean_labels: Tensor
    indices: Tensor
    path: str
    num_samples: int
    image_shape: tuple


def memory_split(images, labels, clean_labels, *, device, batch_size: int, shuffle: bool, drop_last: bool,
                 seed: int = 0, distributed: bool = False) -> SplitLoader:
    """A memory-backend SplitLoader over arrays instead of a .beton (synthetic data, benchmarks).

    images: (N, H, W, 3) uint8 numpy array or tensor; labels, clean_labels: (N,) integers
    (clean -1 where unknown). Sample indices are 0..N-1.
    """
    device = torch.device(device)
    as_tensor = lambda a: torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a)  # noqa: E731
    images = as_tensor(images).to(device)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {tuple(images.shape)} {images.dtype}")
    n = len(images)
    labels, clean = (as_tensor(a).to(device, torch.int64) for a in (labels, clean_labels))
    if labels.shape != (n,) or clean.shape != (n,):
        raise ValueError(f"labels and clean_labels must have shape ({n},)")
    split = _ArraySplit(images, labels, clean, torch.arange(n, device=device), "<memory>", n,
                        tuple(images.shape[1:]))
    rank, world = _rank_and_world(distributed)
    _check_batch_size(batch_size, world)
    return SplitLoader(split, _MemoryBackend(split, device), batch_size=batch_size, shuffle=shuffle,
                       drop_last=drop_last, seed=seed, rank=rank, world_size=world)


def _check_batch_size(batch_size: int, world: int) -> None:
    if batch_size < 1 or batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of the world size {world}")


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group "
                         "(run under torchrun and call init_process_group first)")
    return dist.get_rank(), dist.get_world_size()


def open_split(path: str | Path, *, backend: str = "ffcv", device: str | torch.device = "cpu",
               batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0, distributed: bool = False,
               num_workers: int = 4) -> SplitLoader:
    """Open a .beton split for batched reading (see the module docstring for the order).

    batch_size is global: under distributed=True each of W processes gets batch_size // W
    (batch_size must divide by W). num_workers: ffcv decoding threads (capped at the core count).
    Raises DataError for a missing, truncated or foreign file or labels outside meta.json's classes.
    """
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    backend = resolve_backend(backend)
    rank, world = _rank_and_world(distributed)
    _check_batch_size(batch_size, world)
    path = Path(path)
    num_classes = read_meta(path.parent).get("num_classes") if (path.parent / "meta.json").is_file() else None
    index = open_beton(path, num_classes)
    device = torch.device(device)
    if backend == "memory":
        impl = _MemoryBackend(_on_device(index, device), device)
    else:
        impl = _FfcvBackend(index, device, batch_size // world, num_workers)
    return SplitLoader(index, impl, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                       rank=rank, world_size=world)
