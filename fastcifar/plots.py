"""The run's plots from metrics.jsonl: accuracy, loss and filtering per epoch, the phases shaded on each.

Matplotlib's Agg canvas directly (no pyplot, no display, no global figure registry), with
constrained layout and the legend outside the axes, so that no title, label or legend covers
another or the curves.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from fastcifar.io import atomic_path

# Light fills for the phase spans, in the order phases appear.
_PHASE_FILLS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")
LOSS_NOTE = "train loss: mean over the kept samples only, so it drops when the filter starts dropping the hardest"


def _series(records: list[dict], key: str, where=lambda r: True) -> list[list] | None:
    """(epochs, values) of the records with a finite `key` (and `where(record)`); None if there are none."""
    points = [(r["epoch"], float(r[key])) for r in records
              if where(r) and r.get(key) is not None and math.isfinite(float(r[key]))]
    return [list(col) for col in zip(*points)] if points else None


def phase_spans(records: list[dict]) -> list[tuple[str, int, int]]:
    """(phase, first epoch, last epoch) for each run of consecutive records in one phase."""
    spans: list[list] = []
    for r in records:
        if spans and spans[-1][0] == r.get("phase") and r["epoch"] == spans[-1][2] + 1:
            spans[-1][2] = r["epoch"]
        else:
            spans.append([r.get("phase"), r["epoch"], r["epoch"]])
    return [(str(p), a, b) for p, a, b in spans]


def figure(records: list[dict], lines: list[tuple[str, str, float]], *, title: str, ylabel: str,
           note: str | None = None, twin: tuple[str, str] | None = None, ylim=None,
           where=lambda r: set(), hlines: tuple[tuple[float, str], ...] = ()):
    """One Figure: `lines` are (field, label, scale) on the left axis, `twin` (field, label) on a
    right axis starting at 0, `hlines` (y, label) dashed, phases as shaded spans named in the legend.

    where(record) -> set of fields not to plot for that record (e.g. noise scores before filtering).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles = []
    for i, (phase, first, last) in enumerate(phase_spans(records)):
        fill = _PHASE_FILLS[i % len(_PHASE_FILLS)]
        handles.append(ax.axvspan(first - 0.5, last + 0.5, color=fill, alpha=0.12, linewidth=0,
                                  label=f"phase {phase} ({first}-{last})"))
    for key, label, scale in lines:
        if (s := _series(records, key, lambda r, k=key: k not in where(r))) is not None:
            handles += ax.plot(s[0], [v * scale for v in s[1]], marker="o", markersize=3, label=label)
    for y, label in hlines:
        handles.append(ax.axhline(y, color="black", linestyle="--", linewidth=1, label=label))
    if twin is not None and (s := _series(records, twin[0])) is not None:
        ax2 = ax.twinx()
        handles += ax2.plot(s[0], s[1], color="grey", linestyle="-.", marker=".", label=twin[1])
        ax2.set_ylabel(twin[1])
        ax2.set_ylim(0, max(s[1]) * 1.08)
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs, not fractions of one
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_ylim(ylim)  # None keeps autoscaling
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    if note:
        ax.set_title(note, fontsize=8, style="italic")
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, max(len(handles), 1)), fontsize=8)
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")  # the temp name ends in .tmp, so the format must be explicit
    return path


def _filtered(record: dict) -> bool:
    """Whether the filter was on in this epoch (the trainer logs threshold=None while it is off)."""
    t = record.get("threshold")
    return t is not None and math.isfinite(float(t))


def figures(records: list[dict], noise_rate: float | None = None) -> dict[str, object]:
    """{"accuracy": Figure (paper Fig. 1), "loss": (Fig. 2), "filtering": ...} from metrics records.

    noise_rate: the share of wrong labels among those with a known clean label, the precision a
    filter dropping at random would have (a dashed line). Fields absent from every record are left
    out; noise scores are drawn only for epochs that filtered (threshold set) and have them.
    """
    not_filtering = lambda r: set() if _filtered(r) else {"noisy_precision", "noisy_recall"}  # noqa: E731
    has_noise = any(r.get("noisy_precision") is not None and _filtered(r) for r in records)
    base = ((noise_rate, f"precision of a random drop (noise rate {noise_rate:.0%})"),) \
        if noise_rate is not None and has_noise else ()
    return {
        "accuracy": figure(records, [("train_acc", "train (given labels)", 100.0), ("val_acc", "test", 100.0),
                                     ("noisy_val_acc", "noisy validation", 100.0)],
                           title="Accuracy per epoch", ylabel="accuracy (%)",
                           note="train: augmented batches scored against the given (noisy) labels"),
        "loss": figure(records, [("train_loss", "train (kept samples)", 1.0), ("val_loss", "test", 1.0)],
                       title="Cross-entropy loss per epoch", ylabel="cross-entropy (nats)", note=LOSS_NOTE),
        "filtering": figure(records, [("kept_fraction", "kept fraction", 1.0),
                                      ("noisy_precision", "noise precision", 1.0),
                                      ("noisy_recall", "noise recall", 1.0)],
                            title="Loss filter: kept samples and noise detection", ylabel="fraction",
                            ylim=(0.0, 1.02), twin=("threshold", "threshold (nats)"), where=not_filtering,
                            hlines=base, note="precision/recall: dropped samples scored as wrong-label detections"),
    }


def write_plots(run_dir: str | os.PathLike, records: list[dict], noise_rate: float | None = None) -> list[Path]:
    """plots/accuracy.png, plots/loss.png, plots/filtering.png (see `figures`); returns their paths."""
    if not records:
        return []
    plots = Path(run_dir) / "plots"
    return [_save(fig, plots / f"{name}.png") for name, fig in figures(records, noise_rate).items()]
