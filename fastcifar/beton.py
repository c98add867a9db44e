"""The .beton files: write them with numpy, validate and read them back without ffcv, plus meta.json.

A .beton is ffcv 1.0.2's file format (version 2), which this module writes and reads itself so
that neither needs ffcv (the GPU machines have none); `ffcv.loader.Loader` reads the same files.
Layout, all little-endian:
    header (24 B)            version u2 = 2, num_fields u2, page_size u4, num_samples u8,
                             alloc_table_ptr u8 (the header is the last thing ffcv writes)
    field descriptors        per field: type_id u1, name u1[16] (NUL-padded ASCII), arguments u1[1024]
    metadata (N x 40 B)      per sample, a C-aligned struct: image (mode u1, width u2, height u2,
                             data_ptr u8; 13 B packed), label i8, clean_label i8, index i8
    zero padding to a page boundary, then pages of `page_size` bytes holding the raw HxWx3 pixels
    allocation table         per sample: sample_id u8, ptr u8, size u8 (ffcv looks sizes up here)
Our files hold exactly the fields image (RGBImageField, raw), label, clean_label, index (IntField).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastcifar.io import atomic_path, atomic_write_text
from fastcifar.sources import DataError, PreparedSource, SourceData, Split, noise_rate, sha256_file

FIELDS = ("image", "label", "clean_label", "index")
_TYPE_IDS = (2, 1, 1, 1)  # ffcv's ids for RGBImageField and IntField
VERSION = 2
RAW_MODE = 1  # ffcv's image mode for uncompressed pixels (0 is JPEG)
MIN_PAGE_SIZE = 1 << 21  # ffcv's minimum; also keeps small files small
META_FORMAT = 1  # bump when meta.json or the written bytes change meaning (invalidates fingerprints)

_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                    ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_FIELD = np.dtype([("type_id", "<u1"), ("name", "<u1", 16), ("arguments", "<u1", 1024)], align=True)
_IMAGE = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_SAMPLE = np.dtype([("image", _IMAGE), ("label", "<i8"), ("clean_label", "<i8"), ("index", "<i8")],
                   align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_META_START = _HEADER.itemsize + len(FIELDS) * _FIELD.itemsize


@dataclass(frozen=True)
class BetonIndex:
    """A validated .beton: everything but the pixels. labels, clean_labels, indices: (N,) int64."""

    path: Path
    num_samples: int
    image_shape: tuple[int, int, int]  # (H, W, 3)
    data_ptr: np.ndarray  # (N,) uint64 file offset of each image's pixels
    labels: np.ndarray
    clean_labels: np.ndarray
    indices: np.ndarray


def _layout(n: int, image_bytes: int) -> tuple[int, int, int]:
    """(page_size, images per page, data start) for n images of image_bytes each."""
    page_size = max(MIN_PAGE_SIZE, 1 << (image_bytes - 1).bit_length())
    data_start = -(-(_META_START + n * _SAMPLE.itemsize) // page_size) * page_size
    return page_size, page_size // image_bytes, data_start


def write_beton(path: str | Path, split: Split, *, progress: bool = True) -> None:
    """Write `split` (already checked) to `path` atomically, byte-identical to ffcv's DatasetWriter
    with one worker: samples fill pages in order, and a sample never straddles two pages."""
    from tqdm import tqdm

    n, h, w, _ = split.images.shape
    nbytes = h * w * 3
    page_size, per_page, data_start = _layout(n, nbytes)
    num_pages = -(-n // per_page)
    slot = np.arange(n, dtype=np.uint64)
    ptr = data_start + (slot // per_page) * page_size + (slot % per_page) * nbytes

    header = np.zeros(1, _HEADER)
    header[0] = (VERSION, len(FIELDS), page_size, n, data_start + num_pages * page_size)
    fields = np.zeros(len(FIELDS), _FIELD)
    for i, (name, type_id) in enumerate(zip(FIELDS, _TYPE_IDS)):
        fields[i]["type_id"] = type_id
        fields[i]["name"][: len(name)] = np.frombuffer(name.encode("ascii"), np.uint8)
    meta = np.zeros(n, _SAMPLE)
    meta["image"]["mode"], meta["image"]["width"], meta["image"]["height"] = RAW_MODE, w, h
    meta["image"]["data_ptr"] = ptr
    meta["label"], meta["clean_label"], meta["index"] = split.labels, split.clean_labels, split.indices
    alloc = np.zeros(n, _ALLOC)
    alloc["sample_id"], alloc["ptr"], alloc["size"] = slot, ptr, nbytes

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            tqdm(total=n, unit="img", desc=f"writing {path.name}", disable=not progress) as bar:
        f.write(header.tobytes() + fields.tobytes() + meta.tobytes())
        f.write(bytes(data_start - f.tell()))
        for first in range(0, n, per_page):
            chunk = np.ascontiguousarray(split.images[first: first + per_page])
            f.write(chunk.tobytes())
            f.write(bytes(page_size - chunk.nbytes))
            bar.update(len(chunk))
        f.write(alloc.tobytes())


def _fail(path: Path, why: str) -> DataError:
    return DataError(f"{path}: {why}; rewrite it with scripts/write_beton.py (add --force)")


def open_beton(path: str | Path, num_classes: int | None = None) -> BetonIndex:
    """Validate a .beton written by `write_beton` (or ffcv with our four fields) and index it.

    Raises DataError for a missing, truncated, unfinished or foreign file, or bad labels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing; write it with scripts/write_beton.py")
    size = path.stat().st_size
    if size < _META_START:
        raise _fail(path, f"only {size} bytes: truncated, or not a .beton file")
    with open(path, "rb") as f:
        head = f.read(_META_START)
        header = np.frombuffer(head, _HEADER, count=1)[0]
        fields = np.frombuffer(head, _FIELD, count=len(FIELDS), offset=_HEADER.itemsize)
        if header["version"] != VERSION:
            why = ("an unfinished write (empty header)" if not any(head[:_HEADER.itemsize])
                   else f"format version {header['version']} (expected {VERSION}): not an ffcv .beton")
            raise _fail(path, why)
        names = tuple(bytes(fd["name"]).split(b"\0")[0].decode("ascii", "replace") for fd in fields)
        if header["num_fields"] != len(FIELDS) or names != FIELDS or tuple(fields["type_id"]) != _TYPE_IDS:
            raise _fail(path, f"fields {names[: header['num_fields']]} are not {FIELDS}: a foreign .beton")
        n = int(header["num_samples"])
        table = int(header["alloc_table_ptr"])
        if not 0 < n < (1 << 40) or size != table + n * _ALLOC.itemsize or table < _META_START + n * _SAMPLE.itemsize:
            raise _fail(path, f"{size} bytes do not match the header ({n} samples, allocation table at "
                              f"{table}): truncated or damaged")
        meta = np.fromfile(f, _SAMPLE, count=n, offset=0)
        f.seek(table)
        alloc = np.fromfile(f, _ALLOC, count=n)
    image = meta["image"]
    if (image["mode"] != RAW_MODE).any():
        raise _fail(path, "holds JPEG-compressed images; fastcifar writes raw pixels only")
    h, w = int(image["height"][0]), int(image["width"][0])
    if h == 0 or w == 0 or (image["height"] != h).any() or (image["width"] != w).any():
        raise _fail(path, "images are not all the same (non-zero) size")
    ptr = image["data_ptr"]
    alloc_ptr = np.sort(alloc["ptr"])
    at = np.minimum(np.searchsorted(alloc_ptr, ptr), n - 1)
    if (alloc_ptr[at] != ptr).any() or (alloc["size"] != h * w * 3).any() or \
            (ptr < _META_START + n * _SAMPLE.itemsize).any() or (ptr + np.uint64(h * w * 3) > table).any():
        raise _fail(path, "image pointers and the allocation table disagree: damaged")
    index = BetonIndex(path, n, (h, w, 3), ptr.copy(), meta["label"].copy(), meta["clean_label"].copy(),
                       meta["index"].copy())
    _check_labels(index, num_classes)
    return index


def _check_labels(index: BetonIndex, num_classes: int | None) -> None:
    hi = num_classes if num_classes is not None else np.iinfo(np.int64).max
    if index.labels.min() < 0 or index.labels.max() >= hi:
        raise _fail(index.path, f"labels span [{index.labels.min()}, {index.labels.max()}], outside [0, {hi})")
    if index.clean_labels.min() < -1 or index.clean_labels.max() >= hi:
        raise _fail(index.path, f"clean labels outside [-1, {hi})")
    if not np.array_equal(index.indices, np.arange(index.num_samples)):
        raise _fail(index.path, "the index field is not 0..N-1 in order, as fastcifar writes it")


def read_images(index: BetonIndex) -> np.ndarray:
    """All images of a validated .beton as one (N, H, W, 3) uint8 array, in sample order."""
    n, nbytes = index.num_samples, int(np.prod(index.image_shape))
    out = np.empty((n, *index.image_shape), np.uint8)
    order = np.argsort(index.data_ptr, kind="stable")
    ptr = index.data_ptr[order].astype(np.int64)
    # images lie back to back within a page: copy each run of neighbours with one slice
    cuts = np.flatnonzero(np.diff(ptr) != nbytes) + 1
    data = np.memmap(index.path, np.uint8, mode="r")
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
        block = data[ptr[lo]: ptr[lo] + (hi - lo) * nbytes].reshape(hi - lo, *index.image_shape)
        rows = order[lo:hi]
        if rows[-1] - rows[0] == hi - lo - 1 and (np.diff(rows) == 1).all():
            out[rows[0]: rows[-1] + 1] = block
        else:
            out[rows] = block
    del data
    return out


def read_meta(beton_dir: str | Path) -> dict:
    """meta.json beside the .beton files (num_classes, class_names, counts, noise rate, ...)."""
    path = Path(beton_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; write the data with scripts/write_beton.py") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); rewrite it with scripts/write_beton.py --force") from None


def fingerprint(prepared: PreparedSource) -> str:
    """sha256 over the writer's format, the options and the content of every input file."""
    import hashlib

    try:
        inputs = [[p.name, sha256_file(p)] for p in prepared.inputs]
    except OSError as e:
        raise DataError(f"cannot read an input: {e}") from None
    record = {"format": META_FORMAT, "options": prepared.options, "inputs": inputs}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _up_to_date(out_dir: Path) -> dict | None:
    """The current meta.json if both .beton files still have the sizes it records, else None."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        for split in ("train", "test"):
            info = meta["splits"][split]
            if (out_dir / info["file"]).stat().st_size != info["bytes"]:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _split_meta(split: Split, path: Path, source_rows: np.ndarray | None) -> dict:
    rate = noise_rate(split)
    return {"file": path.name, "num_samples": len(split), "bytes": path.stat().st_size,
            "known_clean": int((split.clean_labels >= 0).sum()),
            "noise_rate": None if rate is None else round(rate, 6),
            # sample index -> row of the source it was held out of (None: the same)
            "source_rows": None if source_rows is None else source_rows.tolist()}


def write_dataset(prepared: PreparedSource, out_dir: str | Path, *, force: bool = False,
                  progress: bool = True, print_fn=print) -> dict:
    """Write out_dir/train.beton, test.beton, then meta.json (each atomically); return the meta.

    An identical rerun (same fingerprint, files intact) is skipped unless `force`. meta.json is
    removed first and written last, so a killed writer never leaves a set that looks complete.
    """
    out_dir = Path(out_dir)
    fp = fingerprint(prepared)
    old = _up_to_date(out_dir)
    if old is not None and old.get("fingerprint") == fp and not force:
        print_fn(f"{out_dir}: up to date ({old['source']}); use --force to rewrite")
        return old
    if old is not None and old.get("fingerprint") != fp:
        print_fn(f"{out_dir}: replacing {old.get('source')}")
    data: SourceData = prepared.load()
    for note in data.notes:
        print_fn(f"note: {note}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    start = time.perf_counter()
    splits = {}
    rows = data.source_rows or (None, None)
    for name, split, source_rows in (("train", data.train, rows[0]), ("test", data.test, rows[1])):
        path = out_dir / f"{name}.beton"
        write_beton(path, split, progress=progress)
        splits[name] = _split_meta(split, path, source_rows)
    seconds = time.perf_counter() - start
    meta = {
        "format": META_FORMAT, "num_classes": data.num_classes,
        "class_names": list(data.class_names) if data.class_names else None,
        "source": data.description, "image_shape": list(data.train.images.shape[1:]),
        "noise_rate": splits["train"]["noise_rate"], "splits": splits, "notes": list(data.notes),
        "fingerprint": fp, "options": prepared.options, "write_seconds": round(seconds, 3),
        "train_names": list(data.train_names) if data.train_names else None,
    }
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1, default=str) + "\n")
    n = len(data.train) + len(data.test)
    print_fn(f"wrote {out_dir}: {len(data.train)} train + {len(data.test)} test images "
             f"({n / max(seconds, 1e-9):,.0f} images/s)")
    return meta


def write_digits_betons(out_dir: str | Path, noise: float = 0.4, kind: str = "symmetric", seed: int = 0,
                        *, force: bool = False, progress: bool = False) -> dict:
    """The offline demo data (scikit-learn digits with injected noise) as .beton files; returns meta."""
    from fastcifar.sources import prepare_source

    prepared = prepare_source("digits", noise=noise, noise_kind=kind, seed=seed)
    return write_dataset(prepared, out_dir, force=force, progress=progress, print_fn=lambda *_: None)
