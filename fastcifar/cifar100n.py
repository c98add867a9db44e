"""CIFAR-100 images + CIFAR-100N human labels: download, verify (sha256, structure, alignment), load.

Layout of `data_dir` (what torchvision's CIFAR100 extracts, plus the label file):
    data_dir/cifar-100-python/{train,test,meta}   CIFAR's own Python-2 pickles
    data_dir/CIFAR-100_human.pt                   the CIFAR-100N label file (a torch pickle)
Nothing here runs an unrestricted unpickler: the CIFAR pickles go through `_CifarUnpickler`, which
admits only numpy arrays and dtypes, and the label file goes through torch's weights_only loader
after its sha256 has been checked. An existing directory is validated by its structure and by the
label alignment, not by torchvision's md5s, so test fixtures in the same format pass.
"""

from __future__ import annotations

import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from fastcifar.io import atomic_path
from fastcifar.sources import DataError, SourceData, Split, sha256_file

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"  # = torchvision CIFAR100.url
CIFAR_TGZ_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # = torchvision CIFAR100.tgz_md5
CIFAR_DIR = "cifar-100-python"
LABELS_URL = "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/CIFAR-100_human.pt"
LABELS_FILE = "CIFAR-100_human.pt"
LABELS_SHA256 = "bd2d80409754d420292d622e15e25248ba21e37d27429efac49c8da723f44394"
NUM_CLASSES = 100

try:  # numpy >= 2 moved the pickle helpers to numpy._core; old pickles name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global except the ones a pickled dict of numpy arrays needs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("_codecs").encode,  # bytes in protocol-2 pickles from Python 3
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def read_cifar_pickle(path: Path) -> dict:
    """Unpickle one CIFAR python batch (a dict); keys come back as str (latin-1, like torchvision)."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR python pickle ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def read_cifar_split(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, fine labels (N,) int64) from root/cifar-100-python/<name>."""
    path = root / CIFAR_DIR / name
    d = read_cifar_pickle(path)
    data, labels = d.get("data"), d.get("fine_labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be an (N, 3072) uint8 array, got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'fine_labels' must be a list of ints") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but 'fine_labels' has shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: fine labels outside [0, {NUM_CLASSES})")
    # rows are planar R, G, B planes of 32x32, row-major
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def read_class_names(root: Path) -> tuple[str, ...]:
    path = root / CIFAR_DIR / "meta"
    names = read_cifar_pickle(path).get("fine_label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise DataError(f"{path}: 'fine_label_names' must list {NUM_CLASSES} names")
    return tuple(str(n) for n in names)


def _torch_load_labels(path: Path) -> object:
    import torch

    globs = [np.ndarray, np.dtype, _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct")]
    if hasattr(np, "dtypes"):
        globs.append(np.dtypes.Int64DType)
    with torch.serialization.safe_globals(globs):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_label_file(path: Path, expected_sha256: str | None = LABELS_SHA256) -> dict[str, np.ndarray]:
    """{'clean_label', 'noisy_label'}: (N,) int64 each, from a CIFAR-100N label file.

    The sha256 is checked before anything is unpickled (None skips the check: tests only).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing. {_labels_help(path)}")
    if expected_sha256 is not None:
        sha = sha256_file(path)
        if sha != expected_sha256:
            raise DataError(f"{path}: sha256 is {sha}, expected {expected_sha256}: not the CIFAR-100N "
                            f"label file (or a damaged copy). {_labels_help(path)}")
    try:
        obj = _torch_load_labels(path)
    except Exception as e:
        raise DataError(f"{path}: cannot load as a CIFAR-100N label file ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or not {"clean_label", "noisy_label"} <= obj.keys():
        raise DataError(f"{path}: expected a dict with clean_label and noisy_label")
    out = {}
    for key in ("clean_label", "noisy_label"):
        a = np.asarray(obj[key])
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{path}: {key} must be a 1-D integer array, got {a.shape} {a.dtype}")
        out[key] = a.astype(np.int64)
    if len(out["clean_label"]) != len(out["noisy_label"]):
        raise DataError(f"{path}: clean_label and noisy_label differ in length")
    return out


def _labels_help(dest: Path) -> str:
    return f"Get it from {LABELS_URL} and put it at {dest}."


def _cifar_help(root: Path) -> str:
    return (f"Get {CIFAR_URL} (md5 {CIFAR_TGZ_MD5}) and extract it in {root}, "
            f"so that {root / CIFAR_DIR}/train, test and meta exist.")


def _download_labels(dest: Path, sha256: str) -> None:
    """Stream the label file to a temporary file, check its sha256, then publish it."""
    import hashlib

    print(f"downloading {LABELS_URL} -> {dest}")
    h = hashlib.sha256()
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(LABELS_URL, timeout=60) as r, open(tmp, "wb") as f:
            for block in iter(lambda: r.read(1 << 20), b""):
                h.update(block)
                f.write(block)
            if h.hexdigest() != sha256:
                raise DataError(f"downloaded {LABELS_URL}: sha256 {h.hexdigest()}, expected {sha256}; "
                                f"nothing was saved. {_labels_help(dest)}")
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"cannot download {LABELS_URL} ({e}). {_labels_help(dest)}") from None


def _download_cifar(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR_URL, download_root=str(root), md5=CIFAR_TGZ_MD5,
                                     remove_finished=True)
    except Exception as e:  # URLError, timeouts, a bad md5 (RuntimeError), a bad archive
        also = "" if (root / LABELS_FILE).is_file() else f" Also: {_labels_help(root / LABELS_FILE)}"
        raise DataError(f"cannot download CIFAR-100 ({e}). {_cifar_help(root)}{also}") from None


def ensure_files(root: Path, *, download: bool = True, label_sha256: str = LABELS_SHA256) -> tuple[Path, ...]:
    """Make sure root holds CIFAR-100 and the label file (downloading what is missing); return them."""
    files = tuple(root / CIFAR_DIR / n for n in ("train", "test", "meta"))
    if not all(f.is_file() for f in files):
        if not download:
            raise DataError(f"{root / CIFAR_DIR}: missing or incomplete. {_cifar_help(root)}")
        _download_cifar(root)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"after downloading, {missing} are still missing. {_cifar_help(root)}")
    labels = root / LABELS_FILE
    if not labels.is_file():
        if not download:
            raise DataError(f"{labels}: missing. {_labels_help(labels)}")
        _download_labels(labels, label_sha256)
    return files + (labels,)


def load(root: Path, *, labels: str = "noisy", label_sha256: str | None = LABELS_SHA256) -> SourceData:
    """CIFAR-100 with CIFAR-100N labels; refuses to go on unless clean_label == the train labels."""
    train_images, train_labels = read_cifar_split(root, "train")
    test_images, test_labels = read_cifar_split(root, "test")
    names = read_class_names(root)
    path = root / LABELS_FILE
    human = load_label_file(path, label_sha256)
    clean, noisy = human["clean_label"], human["noisy_label"]
    if len(clean) != len(train_labels):
        raise DataError(f"{path}: {len(clean)} labels but {root / CIFAR_DIR / 'train'} has "
                        f"{len(train_labels)} images")
    mismatch = np.flatnonzero(clean != train_labels)
    if len(mismatch):
        raise DataError(f"{path}: clean_label differs from the CIFAR-100 train labels at {len(mismatch)} "
                        f"positions (first: {mismatch[0]}); the label file does not belong to these images "
                        f"or is in another order")
    if noisy.min() < 0 or noisy.max() >= NUM_CLASSES:
        raise DataError(f"{path}: noisy_label outside [0, {NUM_CLASSES})")
    index = np.arange(len(clean), dtype=np.int64)
    train = Split(train_images, noisy if labels == "noisy" else clean, clean, index)
    test = Split(test_images, test_labels, test_labels.copy(), np.arange(len(test_labels), dtype=np.int64))
    what = "noisy human labels" if labels == "noisy" else "clean labels"
    return SourceData(train, test, NUM_CLASSES, names, f"CIFAR-100 + CIFAR-100N ({what})")
