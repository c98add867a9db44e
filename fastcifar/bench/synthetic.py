"""Synthetic CIFAR-shaped data and in-memory loaders: timing the trainer with no download and no .beton.

The images are learnable but cheap to make: each class has a random 4x4 colour pattern, blown
up to the image size, plus uniform pixel noise. A `noise` share of the training labels is
flipped to a uniformly drawn other class (the clean label is kept), as CIFAR-100N's ~40%.
Timing does not depend on the pixels; learnability only makes accuracies in a report sane.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import Config
from ..distributed import DistInfo

PATTERN = 4  # side of each class's colour pattern, in cells
SIGNAL_MAX = 192  # pattern values lie in [0, SIGNAL_MAX); pixel noise in [0, 256 - SIGNAL_MAX)


@dataclass(frozen=True)
class SyntheticSplit:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, the label trained on (noisy for train)
    clean_labels: np.ndarray  # (N,) int64, the true class


def make_split(num: int, *, num_classes: int = 100, size: int = 32, noise: float = 0.0,
               seed: int = 0, stream: int = 0) -> SyntheticSplit:
    """`num` images of `size` x `size`; `stream` tells splits of one seed apart (train 0, test 1).

    The class patterns depend on `seed` only, so the train and test splits share them.
    """
    if size % PATTERN:
        raise ValueError(f"size must be a multiple of {PATTERN}, got {size}")
    patterns = np.random.default_rng([seed, 0]).integers(0, SIGNAL_MAX, (num_classes, PATTERN, PATTERN, 3),
                                                         dtype=np.uint8)
    cell = size // PATTERN
    patterns = patterns.repeat(cell, axis=1).repeat(cell, axis=2)  # (C, size, size, 3)
    rng = np.random.default_rng([seed, 1 + stream])
    clean = rng.integers(0, num_classes, num, dtype=np.int64)
    images = patterns[clean]
    images += rng.integers(0, 256 - SIGNAL_MAX, images.shape, dtype=np.uint8)  # never overflows
    labels = clean.copy()
    flip = rng.random(num) < noise
    # a uniformly drawn *other* class: shift by 1..C-1
    labels[flip] = (clean[flip] + rng.integers(1, num_classes, int(flip.sum()))) % num_classes
    return SyntheticSplit(images, labels, clean)


def make_dataset(num_train: int, num_test: int, *, num_classes: int = 100, size: int = 32,
                 noise: float = 0.4, seed: int = 0) -> tuple[SyntheticSplit, SyntheticSplit]:
    """(train, test): train labels carry `noise`, test labels are clean (as CIFAR-100N's test set)."""
    train = make_split(num_train, num_classes=num_classes, size=size, noise=noise, seed=seed, stream=0)
    test = make_split(num_test, num_classes=num_classes, size=size, noise=0.0, seed=seed, stream=1)
    return train, test


def save_npz(path: str | Path, train: SyntheticSplit, test: SyntheticSplit) -> Path:
    """Write the arrays `scripts/write_beton.py --source npz:PATH` reads (DESIGN contract 1)."""
    path = Path(path)
    np.savez(path, images=train.images, labels=train.labels, clean_labels=train.clean_labels,
             test_images=test.images, test_labels=test.labels)
    return path


def split_loaders(train: SyntheticSplit, test: SyntheticSplit, cfg: Config, device: torch.device,
                  dist: DistInfo):
    """fastcifar.train.Loaders over the arrays, on `device` (the memory backend, no file)."""
    from ..data import memory_split  # the memory backend built from arrays
    from ..train import Loaders

    def split(s: SyntheticSplit, batch_size: int, shuffle: bool):
        return memory_split(s.images, s.labels, s.clean_labels, device=device, batch_size=batch_size,
                            shuffle=shuffle, drop_last=shuffle, seed=cfg.run.seed, distributed=dist.enabled)

    t = cfg.train
    return Loaders(train=split(train, t.batch_size, True), test=split(test, t.test_batch_size, False),
                   score=split(train, t.test_batch_size, False), num_classes=cfg.model.num_classes,
                   num_train=len(train.labels))


def synthetic_loaders(cfg: Config, *, num_train: int = 50_000, num_test: int = 10_000, noise: float = 0.4,
                      seed: int = 0) -> Callable[[torch.device, DistInfo], object]:
    """A `make_loaders(device, dist)` for `fastcifar.train.run_training`: CIFAR-shaped synthetic data
    with cfg.model.num_classes classes, made once when called (about a second for 60k images)."""
    train, test = make_dataset(num_train, num_test, num_classes=cfg.model.num_classes, noise=noise, seed=seed)
    return lambda device, dist: split_loaders(train, test, cfg, device, dist)


def random_inputs(batch: int, *, size: int = 32, num_classes: int = 100, device: torch.device | str = "cpu",
                  channels_last: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised float32 batch (batch, 3, size, size) and int64 labels (batch,), as augmentation
    hands them to the model; for model-step benchmarks that leave the data pipeline out."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x, y.to(device)
