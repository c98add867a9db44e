"""Small CIFAR-100 + CIFAR-100N directories in the original file formats, for tests.

The CIFAR python batches were written by Python 2's cPickle: strings and the arrays' raw bytes
are py2 `str` (BINSTRING opcodes) and numpy's helper is named numpy.core.multiarray._reconstruct.
`write_py2_pickle` writes the same opcodes from Python 3, so the tests read what users download.
The label file is a torch pickle of a dict of numpy int64 arrays and lists, as published.
"""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcifar.cifar100n import CIFAR_DIR, LABELS_FILE, _reconstruct
from fastcifar.sources import sha256_file


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table we can extend
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:  # as a py2 str, not _codecs.encode(...)
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None) -> None:
        if obj is _reconstruct:  # numpy 1.x's (and py2's) module path
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_py2_pickle(obj, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    Path(path).write_bytes(buf.getvalue())


def write_label_file(path: Path, clean, noisy) -> str:
    """A CIFAR-100N-format label file; returns its sha256."""
    clean, noisy = np.asarray(clean, np.int64), np.asarray(noisy, np.int64)
    torch.save({"clean_label": clean, "noisy_label": noisy,
                "clean_coarse_label": [int(c) // 5 for c in clean],
                "noisy_coarse_label": [int(c) // 5 for c in noisy]}, path)
    return sha256_file(path)


@dataclass
class FakeCifar:
    root: Path
    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int64 clean
    noisy_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    label_sha256: str


def _batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    planar = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # CIFAR rows: R, G, B planes
    return {b"batch_label": name.encode(), b"fine_labels": [int(x) for x in labels],
            b"coarse_labels": [int(x) // 5 for x in labels],
            b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(labels))],
            b"data": np.ascontiguousarray(planar)}


def make_fake_cifar(root: Path, n_train: int = 300, n_test: int = 100, noise: float = 0.4,
                    seed: int = 0) -> FakeCifar:
    """root/cifar-100-python/{train,test,meta} + root/CIFAR-100_human.pt with random content."""
    rng = np.random.default_rng(seed)
    train_images = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    train_labels = rng.integers(0, 100, n_train).astype(np.int64)
    test_labels = rng.integers(0, 100, n_test).astype(np.int64)
    flip = rng.random(n_train) < noise
    noisy = np.where(flip, (train_labels + rng.integers(1, 100, n_train)) % 100, train_labels)
    d = Path(root) / CIFAR_DIR
    d.mkdir(parents=True, exist_ok=True)
    write_py2_pickle(_batch(train_images, train_labels, "training batch 1 of 1"), d / "train")
    write_py2_pickle(_batch(test_images, test_labels, "testing batch 1 of 1"), d / "test")
    write_py2_pickle({b"fine_label_names": [f"class{c:02d}".encode() for c in range(100)],
                      b"coarse_label_names": [f"super{c:02d}".encode() for c in range(20)]}, d / "meta")
    sha = write_label_file(Path(root) / LABELS_FILE, train_labels, noisy)
    return FakeCifar(Path(root), train_images, train_labels, noisy.astype(np.int64), test_images,
                     test_labels, sha)
