"""What a run writes about itself (checkpoints and plots aside): metrics, console lines, summary, suspects."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fastcifar.io import atomic_path, atomic_write_text

# Accuracies, kept_fraction and noisy_* are fractions in [0, 1]; lr per batch; seconds of wall time.
EPOCH_FIELDS = ("epoch", "phase", "lr", "threshold", "kept_fraction", "train_loss", "train_acc",
                "val_loss", "val_acc", "seconds")
NOISE_FIELDS = ("noisy_precision", "noisy_recall", "noisy_f1")


def _numpy(x, name: str) -> np.ndarray:
    """A torch tensor (any device, any dtype) or array-like as a 1-D numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x  # bf16/fp16 have no numpy form
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    return x


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {lengths}")
    return next(iter(lengths.values()))


def noise_detection(dropped, noisy) -> dict[str, float]:
    """Score the filter's dropped samples as detections of wrongly labelled ones.

    dropped, noisy: (N,) bool tensors or arrays over the samples seen; noisy = label != clean_label,
    passed only where clean_label >= 0. Precision is 0 when nothing is dropped (no detections
    claimed), recall is 0 when nothing is noisy, and F1 is 0 when both are 0.
    """
    d, n = _numpy(dropped, "dropped").astype(bool), _numpy(noisy, "noisy").astype(bool)
    _same_length(dropped=d, noisy=n)
    hits = int(np.count_nonzero(d & n))
    n_dropped, n_noisy = int(np.count_nonzero(d)), int(np.count_nonzero(n))
    precision = hits / n_dropped if n_dropped else 0.0
    recall = hits / n_noisy if n_noisy else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"noisy_precision": precision, "noisy_recall": recall, "noisy_f1": f1}


def _plain(x: Any) -> Any:
    """json.dumps fallback: numpy scalars/arrays and 0-d or small tensors to Python values."""
    if hasattr(x, "detach"):
        return x.detach().cpu().tolist()
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


class MetricsLog:
    """metrics.jsonl in the run dir: one JSON object per epoch, appended and flushed+fsynced per epoch.

    A record is committed once its line, newline included, is on disk. A final line without a
    newline is what a crash mid-write leaves: `read` ignores it (with a warning) and the next
    `append` or `truncate_after` removes it, so a resumed run continues from the last complete
    epoch. A malformed line anywhere else is corruption and raises ValueError.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / "metrics.jsonl"

    def _load(self) -> tuple[list[dict], bool]:
        """(complete records, whether a torn final line was found)."""
        if not self.path.exists():
            return [], False
        text = self.path.read_text()
        lines = text.split("\n")
        torn = lines.pop() != ""  # text after the last newline was never committed
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{number}: malformed record ({e.msg})") from None
        return records, torn

    def read(self) -> list[dict]:
        records, torn = self._load()
        if torn:
            warnings.warn(f"{self.path}: ignoring a torn final line (a crash mid-write)", stacklevel=2)
        return records

    def _rewrite(self, records: list[dict]) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r, default=_plain) + "\n" for r in records))

    def _ends_torn(self) -> bool:
        """Whether the file ends in an uncommitted line; reads one byte, not the whole log."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def append(self, record: dict) -> None:
        if "epoch" not in record:
            raise ValueError(f"a metrics record needs an 'epoch', got keys {sorted(record)}")
        line = json.dumps(record, default=_plain) + "\n"
        if self._ends_torn():  # appending after the partial line would glue two records together
            self._rewrite(self._load()[0])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, epoch: int) -> None:
        """Keep only records with record["epoch"] <= epoch (atomic rewrite; used by --resume)."""
        self._rewrite([r for r in self._load()[0] if r["epoch"] <= epoch])


# (field, title, width, format); kept and accuracies are shown in percent.
_COLUMNS = (
    ("epoch", "epoch", 5, "d"), ("phase", "phase", 11, "s"), ("lr", "lr", 8, ".2e"),
    ("threshold", "thresh", 6, ".3f"), ("kept_fraction", "kept%", 6, "%"),
    ("train_loss", "loss", 7, ".4f"), ("val_acc", "val%", 6, "%"),
    ("noisy_precision", "noiseP", 6, "%"), ("noisy_recall", "noiseR", 6, "%"),
    ("noise_rate_est", "noise~", 6, "%"), ("seconds", "sec", 7, ".1f"),
)  # noise~: the selector's estimate of the share of wrong labels (filter.keep_fraction=0 keeps the rest)


def _cell(value: Any, width: int, fmt: str) -> str:
    """`value` in exactly `width` characters: '-' when absent, scientific or '#' when too wide."""
    if value is None:
        text = "-"
    elif fmt == "s":
        text = str(value)[:width]
    elif fmt == "d":
        text = str(int(value))
    elif not math.isfinite(float(value)):
        text = str(float(value))  # nan, inf, -inf
    else:
        value = float(value) * 100 if fmt == "%" else float(value)
        text = format(value, ".1f" if fmt == "%" else fmt)
        if len(text) > width:
            text = format(value, ".0e")
    if len(text) > width:
        text = "#" * width
    return text.ljust(width) if fmt == "s" else text.rjust(width)


def epoch_header() -> str:
    """Column titles for `format_epoch`, aligned with it."""
    return " ".join(title.rjust(w) if fmt != "s" else title.ljust(w) for _, title, w, fmt in _COLUMNS)


def format_epoch(record: dict) -> str:
    """One fixed-width console line; missing fields (e.g. noise metrics without clean labels) show '-'."""
    return " ".join(_cell(record.get(key), w, fmt) for key, _, w, fmt in _COLUMNS)


def write_summary(run_dir: str | os.PathLike, summary: dict) -> None:
    """summary.json in the run dir, atomically; numpy and tensor values become plain JSON."""
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2, default=_plain) + "\n")


def write_suspects(run_dir: str | os.PathLike, *, indices, labels, pred, pred_prob, loss, kept, evidence=None,
                   clean_labels=None, class_names=None, paths=None) -> Path:
    """suspects.csv: one row per training sample, the most suspicious first.

    All inputs are (N,) tensors or arrays: indices, labels, pred, clean_labels integer
    (clean_label -1 = unknown), pred_prob, loss and evidence float, kept bool. Rows are ranked by
    `evidence` (the selector's: higher = more suspicious), else by loss; ties by loss, then index.
    class_names (C,) adds given_name and predicted_name; paths (N,) (an ImageFolder's files, by
    index) adds path; clean_label is written only when some clean label is known (>= 0).
    """
    labels, pred = _numpy(labels, "labels").astype(np.int64), _numpy(pred, "pred").astype(np.int64)
    loss = _numpy(loss, "loss").astype(np.float64)
    cols = {"index": _numpy(indices, "indices").astype(np.int64), "given_label": labels}
    names = np.asarray(class_names, dtype=object) if class_names is not None else None
    if names is not None:
        cols["given_name"] = names[labels]
    cols["predicted_label"] = pred
    if names is not None:
        cols["predicted_name"] = names[pred]
    cols.update(predicted_prob=_numpy(pred_prob, "pred_prob").astype(np.float64), loss=loss)
    rank = loss if evidence is None else _numpy(evidence, "evidence").astype(np.float64)
    if evidence is not None:
        cols["evidence"] = rank
    cols["kept"] = _numpy(kept, "kept").astype(bool).astype(np.int64)
    if clean_labels is not None:
        clean = _numpy(clean_labels, "clean_labels").astype(np.int64)
        if (clean >= 0).any():
            cols["clean_label"] = clean
    if paths is not None:
        cols["path"] = np.asarray(paths, dtype=object)
    _same_length(**cols)
    if len(np.unique(cols["index"])) != len(cols["index"]):
        raise ValueError("indices must be unique: one row per training sample")
    order = np.lexsort((cols["index"], -loss, -rank))  # last key is primary: most suspicious first
    path = Path(run_dir) / "suspects.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        floats = {"predicted_prob", "loss", "evidence"}
        table = [[f"{v:.6g}" if k in floats else str(v) for v in cols[k][order].tolist()] for k in cols]
        writer.writerows(zip(*table))
    return path


def write_pred_probs(run_dir: str | os.PathLike, probs) -> Path:
    """pred_probs.npy: probs (N, C) softmax over the training split, row i = sample index i, saved
    as float32 — the form cleanlab.filter.find_label_issues(labels, pred_probs) takes.

    Rows must be probabilities (in [0, 1], summing to 1 within 1e-2, which bf16 softmax meets);
    logits are refused.
    """
    if hasattr(probs, "detach"):
        probs = probs.detach().float().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any() \
            or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-2):
        raise ValueError("probs rows must be softmax probabilities (did you pass logits?)")
    path = Path(run_dir) / "pred_probs.npy"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, probs)  # through a file object: np.save(path) would append '.npy' to the temp name
    return path


def _table_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of `columns` (missing keys blank); numeric columns are right-aligned."""
    cells = [[_table_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), 3] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool)
                   for r in rows if r.get(c) is not None) for c in columns]

    def line(parts: list[str]) -> str:
        return "| " + " | ".join(parts) + " |"

    out = [line([c.ljust(w) for c, w in zip(columns, widths)]),
           line([("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric)])]
    out += [line([v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)])
            for row in cells]
    return "\n".join(out)
