"""How well a run finds the wrong labels: its suspects.csv ranking beside cleanlab's, where clean labels are known.

Both rankings are scored on the same run's outputs: ours is suspects.csv's order (the selector's
evidence), cleanlab's is `cleanlab.filter.find_label_issues(labels, pred_probs,
return_indices_ranked_by="self_confidence")` on the run's pred_probs.npy. Precision at k is the
share of the top k that is truly mislabelled (k = 100, and k = the true number of wrong labels,
where precision equals recall). cleanlab flags only the samples it believes mislabelled; when it
flags fewer than k, its precision at k is over the flagged ones and `flagged` says how many.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def read_suspects(run_dir: Path) -> dict[str, np.ndarray]:
    """suspects.csv as arrays in its (ranked) row order: index, given_label, clean_label (-1 unknown)."""
    with open(Path(run_dir) / "suspects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "clean_label" not in rows[0]:
        raise ValueError(f"{run_dir}/suspects.csv has no clean_label column: the true labels are unknown")
    return {k: np.array([int(r[k]) for r in rows]) for k in ("index", "given_label", "clean_label")}


def precision_at(ranked: np.ndarray, wrong: np.ndarray, k: int) -> tuple[float, int]:
    """(share of the first min(k, len(ranked)) sample indices that are wrong, how many were scored)."""
    top = ranked[:k]
    return (float(wrong[top].mean()) if len(top) else 0.0), len(top)


def cleanlab_ranking(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Sample indices cleanlab flags as label issues, most likely first (needs cleanlab: the bench extra)."""
    from cleanlab.filter import find_label_issues

    return np.asarray(find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence"))


def compare(run_dir: Path, with_cleanlab: bool = True) -> dict:
    """Precision at 100 and at the true count, for our ranking and (if asked) cleanlab's."""
    s = read_suspects(run_dir)
    order = np.argsort(s["index"])  # back to sample-index order
    labels, clean = s["given_label"][order], s["clean_label"][order]
    known = clean >= 0
    if not known.all():
        raise ValueError(f"{run_dir}: some clean labels are unknown; precision needs all of them")
    wrong = labels != clean
    ks = {"100": 100, "true": int(wrong.sum())}
    out = {"wrong_labels": int(wrong.sum()), "samples": len(labels)}
    for name, k in ks.items():
        out[f"ours_p@{name}"] = precision_at(s["index"], wrong, k)[0]
    if with_cleanlab:
        ranked = cleanlab_ranking(labels, np.load(Path(run_dir) / "pred_probs.npy"))
        out["cleanlab_flagged"] = len(ranked)
        for name, k in ks.items():
            out[f"cleanlab_p@{name}"] = precision_at(ranked, wrong, k)[0]
    return out
