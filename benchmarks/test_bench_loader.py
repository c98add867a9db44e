"""Loader throughput over one .beton split: ffcv vs the memory backend vs torch DataLoaders; and writing.

Each timed round is one shuffled epoch over N = 10,000 random 32x32 images in batches of 500,
each batch ending on the benchmark device as uint8 (N, 3, 32, 32) plus labels, clean labels and
indices. Cases:
- memory: fastcifar's memory backend (the split as one tensor on the device, gathered per batch);
- ffcv: fastcifar's ffcv backend (ffcv's compiled decoder on CPU threads, copied to the device);
  skipped where ffcv is not installed (the GPU machines have none);
- dataloader: torch.utils.data.DataLoader (main process) over the same arrays, one sample at a time,
  default collate: the plain-PyTorch way of feeding uint8 tensors;
- dataloader-pil: the same through PIL images and PILToTensor, as torchvision's CIFAR100
  dataset hands samples to its transforms in the paper's pipeline.
Plus the writer: one .beton of the N images per round. extra_info: images/s (median round).
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from fastcifar.beton import write_beton
from fastcifar.data import keep_torch_threads, open_split
from fastcifar.sources import Split

N, BATCH = 10_000, 500

try:
    with keep_torch_threads():  # importing ffcv sets torch's thread count to 1
        import ffcv  # noqa: F401
    HAS_FFCV = True
except ImportError:
    HAS_FFCV = False


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, N),
                  rng.integers(0, 100, N), np.arange(N, dtype=np.int64))
    path = tmp_path_factory.mktemp("bench") / "train.beton"
    write_beton(path, split, progress=False)
    return path, split


class _Arrays(torch.utils.data.Dataset):
    def __init__(self, split: Split, pil: bool):
        self.split, self.pil = split, pil
        if pil:
            from torchvision.transforms import v2

            self.to_tensor = v2.PILToTensor()

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        s = self.split
        if self.pil:
            from PIL import Image

            image = self.to_tensor(Image.fromarray(s.images[i]))
        else:
            image = torch.from_numpy(s.images[i]).permute(2, 0, 1)
        return image, int(s.labels[i]), int(s.clean_labels[i]), int(s.indices[i])


def _epochs(impl: str, path, split: Split, device: torch.device):
    """An endless supply of epochs, each an iterator over (images, labels, clean, indices) on `device`."""
    if impl in ("memory", "ffcv"):
        loader = open_split(path, backend=impl, device=device, batch_size=BATCH, shuffle=True, drop_last=False,
                            num_workers=torch.get_num_threads())
        return (loader.epoch(e) for e in range(10**9))
    pin = device.type == "cuda"
    dl = torch.utils.data.DataLoader(_Arrays(split, pil=impl == "dataloader-pil"), batch_size=BATCH, shuffle=True,
                                     num_workers=0, pin_memory=pin, generator=torch.Generator().manual_seed(0))
    return ((tuple(t.to(device, non_blocking=True) for t in b) for b in dl) for _ in range(10**9))


@pytest.mark.benchmark(group="loader")
@pytest.mark.parametrize("impl", ["memory", "ffcv", "dataloader", "dataloader-pil"])
def test_loader_epoch(bench, device, data, impl):
    if impl == "ffcv" and not HAS_FFCV:
        pytest.skip("ffcv is not installed on this machine")
    path, split = data
    epochs = _epochs(impl, path, split, device)

    def one_epoch():
        seen = 0
        for batch in epochs.__next__():
            seen += len(batch[0])
        assert seen == N

    seconds = statistics.median(bench.rounds(one_epoch, calls=1, rounds=3, warmup=1))
    bench.record(seconds_per_step=seconds, images_per_step=N, impl=impl, batch=BATCH, step="one epoch",
                 cpu_threads=torch.get_num_threads())


@pytest.mark.benchmark(group="loader-write")
def test_write_beton(bench, data, tmp_path):
    _, split = data
    seconds = statistics.median(bench.rounds(lambda: write_beton(tmp_path / "w.beton", split, progress=False),
                                             calls=1, rounds=3, warmup=1))
    bench.record(seconds_per_step=seconds, images_per_step=N, impl="fastcifar numpy writer", step="one file",
                 mb_per_s=(tmp_path / "w.beton").stat().st_size / seconds / 1e6)
