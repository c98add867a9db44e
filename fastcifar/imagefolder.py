"""Image-folder sources: root/train/<class>/<image> (and root/test/...), optional clean-label CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fastcifar.sources import DataError, SourceData, Split, holdout_splits

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def class_files(folder: Path) -> dict[str, list[Path]]:
    """{class folder name: its image files, sorted}; {} when `folder` is missing."""
    if not folder.is_dir():
        return {}
    return {d.name: sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)  # centre square, then resize: no distortion
            if (w, h) != (size, size):
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def _folder_split(files: dict[str, list[Path]], classes: list[str], size: int, root: Path, what: str,
                  progress: bool = True):
    from tqdm import tqdm

    unknown = sorted(set(files) - set(classes))
    if unknown:
        raise DataError(f"{root}/{what}: class folders {unknown} have no counterpart in train/")
    items = [(p, classes.index(c)) for c in sorted(files) for p in files[c]]
    if not items:
        raise DataError(f"{root}/{what}: no images (expected {what}/<class>/<image> files)")
    images = np.stack([_read_image(p, size) for p, _ in tqdm(items, desc=f"reading {what}/", unit="img",
                                                             leave=False, disable=not progress)])
    labels = np.array([c for _, c in items], np.int64)
    return images, labels, [p.relative_to(root / what).as_posix() for p, _ in items]


def _read_clean_csv(path: Path, names: list[str], classes: list[str]) -> np.ndarray:
    """CSV with columns path (relative to train/) and clean_label (a class folder name)."""
    row_of = {n: i for i, n in enumerate(names)}
    clean = np.full(len(names), -1, np.int64)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{path}: cannot read clean-label CSV ({e})") from None
    for line, row in enumerate(rows, start=2):
        if "path" not in row or "clean_label" not in row:
            raise DataError(f"{path}: needs a header with columns path,clean_label")
        if row["path"] not in row_of:
            raise DataError(f"{path}:{line}: {row['path']!r} is not an image under train/")
        if row["clean_label"] not in classes:
            raise DataError(f"{path}:{line}: {row['clean_label']!r} is not a class folder name")
        clean[row_of[row["path"]]] = classes.index(row["clean_label"])
    return clean


def load_imagefolder(root: Path, *, image_size: int, clean_csv: Path | None, holdout: float,
                     seed: int, progress: bool = True) -> SourceData:
    """root/train/<class>/*.png (and root/test/<class>/...); images centre-cropped, resized to a square."""
    train_files = class_files(root / "train")
    if not train_files:
        raise DataError(f"{root}: expected class folders under {root / 'train'} (train/<class>/<image>)")
    classes = sorted(train_files)
    images, labels, names = _folder_split(train_files, classes, image_size, root, "train", progress)
    clean = (_read_clean_csv(clean_csv, names, classes) if clean_csv
             else np.full(len(labels), -1, np.int64))
    notes, rows = [], None
    test_files = class_files(root / "test")
    if test_files:
        t_images, t_labels, _ = _folder_split(test_files, classes, image_size, root, "test", progress)
        absent = [c for i, c in enumerate(classes) if not (t_labels == i).any()]
        if absent:
            notes.append(f"{root}/test has no images of {len(absent)} of the {len(classes)} classes "
                         f"({', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}): the test accuracy "
                         f"says nothing about them")
        train = Split(images, labels, clean, np.arange(len(labels), dtype=np.int64))
        test = Split(t_images, t_labels, t_labels.copy(), np.arange(len(t_labels), dtype=np.int64))
    else:
        train, test, note, rows = holdout_splits(images, labels, clean, holdout, seed, f"{root}")
        notes.append(note)
        names = [names[i] for i in rows[0]]
    return SourceData(train, test, len(classes), tuple(classes), f"imagefolder:{root}",
                      tuple(notes), tuple(names), rows)
