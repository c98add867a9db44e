"""Raw data sources (npz, digits; image folders in imagefolder.py, CIFAR-100N in cifar100n.py): load,
check, add noise.

Every source ends as a `SourceData`: two `Split`s of uint8 images with int64 labels, clean labels
(-1 where unknown) and sample indices 0..N-1, checked by `check_split` before anything is written.
Problems raise `DataError` with one message that names the file and says what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

NOISE_KINDS = ("symmetric", "pairflip")


class DataError(Exception):
    """Bad, missing or inconsistent data; the message names the file and what to do about it."""


@dataclass(frozen=True)
class Split:
    """One split in memory.

    images: (N, H, W, 3) uint8; labels: (N,) int64, the training label; clean_labels: (N,) int64,
    the true label or -1 where unknown; indices: (N,) int64, each sample's position in the source,
    which is always 0..N-1 (a split held out of a bigger source records the source rows in
    `SourceData.source_rows` instead, so that per-sample arrays can be indexed by `indices`).
    """

    images: np.ndarray
    labels: np.ndarray
    clean_labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SourceData:
    train: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...] | None
    description: str
    notes: tuple[str, ...] = ()  # things the user should know (a hold-out, injected noise)
    train_names: tuple[str, ...] | None = None  # per training sample (e.g. its file), by row
    # for splits held out of one source: each sample's row in that source ((N,) int64 per split)
    source_rows: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class PreparedSource:
    """A source that is present on disk and can be loaded; `inputs` and `options` fingerprint it."""

    description: str
    inputs: tuple[Path, ...]
    options: dict
    load: Callable[[], SourceData]


def check_split(split: Split, num_classes: int, what: str) -> None:
    """Raise DataError unless `split` has consistent shapes, dtypes and label ranges."""
    im = split.images
    if im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
        raise DataError(f"{what}: images must be (N, H, W, 3) uint8, got {im.shape} {im.dtype}")
    n = im.shape[0]
    if n == 0:
        raise DataError(f"{what}: no samples")
    for name in ("labels", "clean_labels", "indices"):
        a = getattr(split, name)
        if a.dtype != np.int64 or a.shape != (n,):
            raise DataError(f"{what}: {name} must be ({n},) int64, got {a.shape} {a.dtype}")
    bad = (split.labels < 0) | (split.labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{what}: label {split.labels[i]} at position {i} is outside "
                        f"[0, {num_classes}) ({int(bad.sum())} such labels)")
    bad = (split.clean_labels < -1) | (split.clean_labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{what}: clean label {split.clean_labels[i]} at position {i} is outside "
                        f"[-1, {num_classes})")
    if not np.array_equal(split.indices, np.arange(n)):
        raise DataError(f"{what}: sample indices must be 0..{n - 1} in order")


def noise_rate(split: Split) -> float | None:
    """Fraction of samples with a known clean label whose label differs from it (None if none known)."""
    known = split.clean_labels >= 0
    if not known.any():
        return None
    return float((split.labels[known] != split.clean_labels[known]).mean())


def inject_noise(labels: np.ndarray, num_classes: int, rate: float, kind: str, seed: int) -> np.ndarray:
    """Return a copy of `labels` ((N,) int64) with exactly round(rate * N) labels changed.

    symmetric: a changed label becomes a uniformly drawn *other* class; pairflip: class c becomes
    (c + 1) mod num_classes. Seeded by `seed` alone, so a rerun gives the same labels.
    """
    if kind not in NOISE_KINDS:
        raise DataError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    if not 0.0 <= rate < 1.0 or num_classes < 2:
        raise DataError(f"noise rate must be in [0, 1) with at least 2 classes, got {rate}")
    rng = np.random.default_rng([seed, 0x6E6F6973])  # own stream: independent of the hold-out
    out = labels.copy()
    flip = rng.permutation(len(labels))[: round(rate * len(labels))]
    if kind == "pairflip":
        out[flip] = (labels[flip] + 1) % num_classes
    else:  # an offset in [1, C) never maps a class to itself
        out[flip] = (labels[flip] + rng.integers(1, num_classes, len(flip))) % num_classes
    return out


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..N-1 into (train, test), each sorted, with `fraction` of every class in test."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"hold-out fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 0x686F6C64])
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: round(fraction * len(members))])
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test), test


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _int_labels(a: np.ndarray, what: str, n: int) -> np.ndarray:
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{what} must be ({n},) integers, got {a.shape} {a.dtype}")
    return a.astype(np.int64)


def holdout_splits(images, labels, clean, fraction, seed, what):
    """(train, test, note, (train rows, test rows)) from one labelled set, stratified by (and tested
    on) the clean label where known; each split's indices are 0..N-1, its source rows returned."""
    rows = stratified_holdout(np.where(clean >= 0, clean, labels), fraction, seed)
    train, test = (Split(images[r], labels[r], clean[r], np.arange(len(r), dtype=np.int64)) for r in rows)
    test = dataclasses.replace(test, labels=np.where(test.clean_labels >= 0, test.clean_labels, test.labels))
    note = (f"{what} has no test split: held out a stratified {fraction:.0%} "
            f"({len(rows[1])} samples, seed {seed}) as the test split; meta.json lists the source rows")
    return train, test, note, rows


def load_npz(path: Path, *, num_classes: int | None, holdout: float, seed: int) -> SourceData:
    """Arrays images (N,H,W,3) uint8, labels, optional clean_labels, test_images + test_labels, class_names."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected an .npz made with numpy.savez)") from None
    except ValueError as e:  # object arrays need pickle, which is refused
        raise DataError(f"{path}: {e}; store plain numeric/string arrays") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    for key in ("images", "labels"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (has {sorted(arrays)})")
    if ("test_images" in arrays) != ("test_labels" in arrays):
        raise DataError(f"{path}: give both test_images and test_labels, or neither")
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    n = len(images)
    labels = _int_labels(arrays["labels"], f"{path}: labels", n)
    clean = (_int_labels(arrays["clean_labels"], f"{path}: clean_labels", n)
             if "clean_labels" in arrays else np.full(n, -1, np.int64))
    names = None
    if "class_names" in arrays:
        names = tuple(str(s) for s in arrays["class_names"].reshape(-1))
    notes, rows = [], None
    test_labels = None
    if "test_images" in arrays:
        test_images = arrays["test_images"]
        if test_images.dtype != np.uint8 or test_images.shape[1:] != images.shape[1:]:
            raise DataError(f"{path}: test_images must be (M, {', '.join(map(str, images.shape[1:]))}) "
                            f"uint8 like images, got {test_images.shape} {test_images.dtype}")
        test_labels = _int_labels(arrays["test_labels"], f"{path}: test_labels", len(test_images))
    given = [labels, clean] + ([] if test_labels is None else [test_labels])
    num_classes = _num_classes(num_classes, names, given, str(path))
    _check_npz_labels(path, num_classes, labels=labels, clean_labels=clean, test_labels=test_labels)
    if test_labels is not None:
        train = Split(images, labels, clean, np.arange(n, dtype=np.int64))
        test = Split(test_images, test_labels, test_labels.copy(),
                     np.arange(len(test_labels), dtype=np.int64))
    else:
        train, test, note, rows = holdout_splits(images, labels, clean, holdout, seed, str(path))
        notes.append(note)
    return SourceData(train, test, num_classes, names, f"npz:{path}", tuple(notes), source_rows=rows)


def _num_classes(given: int | None, names, label_arrays: list[np.ndarray], what: str) -> int:
    if names is not None:
        if given is not None and given != len(names):
            raise DataError(f"{what}: {len(names)} class names but --num-classes {given}")
        return len(names)
    if given is not None:
        return given
    return int(max(a.max() for a in label_arrays if len(a))) + 1


def _check_npz_labels(path: Path, num_classes: int, **arrays: np.ndarray | None) -> None:
    """Label ranges in the npz's own rows (before any hold-out renumbers them); one DataError."""
    for name, a in arrays.items():
        if a is None:
            continue
        low = -1 if name == "clean_labels" else 0  # -1: clean label unknown
        bad = (a < low) | (a >= num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: {name}[{i}] = {a[i]} is outside [{low}, {num_classes}) (row {i} of the "
                            f"npz; {int(bad.sum())} such values); fix the labels or pass --num-classes")


def load_digits(*, holdout: float, seed: int) -> SourceData:
    """scikit-learn's 1,797 8x8 digits, upscaled (bilinear) to 32x32 grey RGB; a stratified test split."""
    import torch
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images * (255.0 / 16.0)).float()[:, None]  # (N, 1, 8, 8) in [0, 255]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)
    images = np.ascontiguousarray(images.numpy())
    labels = d.target.astype(np.int64)
    train, test, note, rows = holdout_splits(images, labels, labels.copy(), holdout, seed, "digits")
    return SourceData(train, test, 10, tuple(str(c) for c in range(10)),
                      "scikit-learn digits (8x8 upscaled to 32x32 RGB)", (note,), source_rows=rows)


def with_noise(data: SourceData, rate: float, kind: str, seed: int) -> SourceData:
    """Inject label noise into the training labels; unknown clean labels become the pre-noise ones."""
    train = data.train
    noisy = inject_noise(train.labels, data.num_classes, rate, kind, seed)
    clean = np.where(train.clean_labels >= 0, train.clean_labels, train.labels)
    note = f"injected {kind} label noise into {rate:.1%} of the training labels (seed {seed})"
    return dataclasses.replace(data, train=dataclasses.replace(train, labels=noisy, clean_labels=clean),
                               description=f"{data.description} + {kind} noise {rate:g}",
                               notes=data.notes + (note,))


def prepare_source(source: str = "cifar100n", *, data_dir: str | Path = "data/raw", labels: str = "noisy",
                   label_sha256: str | None = None, noise: float = 0.0, noise_kind: str = "symmetric",
                   seed: int = 0, holdout: float = 0.1, image_size: int = 32,
                   clean_csv: str | Path | None = None, num_classes: int | None = None,
                   download: bool = True, progress: bool = True) -> PreparedSource:
    """Resolve a source spec (cifar100n | npz:PATH | imagefolder:PATH | digits); download CIFAR if needed."""
    kind, _, arg = source.partition(":")
    options = dict(source=source, noise=noise, noise_kind=noise_kind if noise else None, seed=seed)
    if noise and noise_kind not in NOISE_KINDS:
        raise DataError(f"--noise-kind must be one of {NOISE_KINDS}, got {noise_kind!r}")
    if kind == "cifar100n" and not arg:
        from fastcifar import cifar100n

        if labels not in ("noisy", "clean"):
            raise DataError(f"--labels must be noisy or clean, got {labels!r}")
        if noise and labels == "noisy":
            raise DataError("--noise on top of CIFAR-100N's human noise: use --labels clean with --noise")
        sha = label_sha256 or cifar100n.LABELS_SHA256
        inputs = cifar100n.ensure_files(Path(data_dir), download=download, label_sha256=sha)
        options.update(labels=labels, label_sha256=sha)
        load = lambda: cifar100n.load(Path(data_dir), labels=labels, label_sha256=sha)  # noqa: E731
    elif kind == "npz" and arg:
        if not Path(arg).is_file():
            raise DataError(f"{arg}: no such file (expected an .npz made with numpy.savez)")
        inputs = (Path(arg),)
        options.update(num_classes=num_classes, holdout=holdout)
        load = lambda: load_npz(Path(arg), num_classes=num_classes, holdout=holdout, seed=seed)  # noqa: E731
    elif kind == "imagefolder" and arg:
        from fastcifar.imagefolder import class_files, load_imagefolder

        root = Path(arg)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder (expected {root}/train/<class>/<image>)")
        if image_size < 1:
            raise DataError(f"--image-size must be positive, got {image_size}")
        inputs = tuple(p for c in class_files(root / "train").values() for p in c) + tuple(
            p for c in class_files(root / "test").values() for p in c) + ((Path(clean_csv),) if clean_csv else ())
        options.update(image_size=image_size, holdout=holdout, clean_csv=str(clean_csv) if clean_csv else None)
        load = lambda: load_imagefolder(root, image_size=image_size, holdout=holdout, seed=seed,  # noqa: E731
                                        clean_csv=Path(clean_csv) if clean_csv else None, progress=progress)
    elif kind == "digits" and not arg:
        import sklearn

        inputs = ()
        options.update(holdout=holdout, sklearn=sklearn.__version__)
        load = lambda: load_digits(holdout=holdout, seed=seed)  # noqa: E731
    else:
        raise DataError(f"unknown --source {source!r}: use cifar100n, npz:PATH, imagefolder:PATH or digits")

    def load_checked() -> SourceData:
        data = load()
        if noise:
            data = with_noise(data, noise, noise_kind, seed)
        check_split(data.train, data.num_classes, f"{source} train split")
        check_split(data.test, data.num_classes, f"{source} test split")
        if data.train.images.shape[1:] != data.test.images.shape[1:]:
            raise DataError(f"{source}: train and test images differ in shape "
                            f"({data.train.images.shape[1:]} vs {data.test.images.shape[1:]})")
        return data

    return PreparedSource(source if kind != "cifar100n" else "CIFAR-100 + CIFAR-100N", inputs,
                          options, load_checked)
