"""Which training samples to keep from a scoring pass: the epoch-mode decision and the final verdict.

Both start from an eval-mode pass over the whole training split (per-sample losses and softmax,
no augmentation) and ask the selector for exact per-class thresholds; the minimum kept fraction
guards the decision against a collapsing kept set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .select import Selector


@dataclass(frozen=True)
class Verdict:
    """A selector's decision over every training sample (all tensors (N,), in index order)."""

    keep: Tensor  # bool
    # fp32, higher = more suspicious; > 0 exactly where the thresholds drop a sample (not where the
    # guard overrode them, nor for held-out pool rows, which are never kept)
    evidence: Tensor
    thresholds: Tensor  # (C,) fp32 per-class thresholds in nats (inf: the class keeps all)
    guard_bound: bool  # the minimum kept fraction overrode the thresholds
    noise_rate_est: float | None  # the selector's estimate of the share of wrong labels


def judge(selector: Selector, losses: Tensor, labels: Tensor, probs: Tensor, base: float,
          min_kept_fraction: float, pool: Tensor | None = None) -> Verdict:
    """Keep per the selector's exact thresholds from these losses; if that keeps fewer than
    `min_kept_fraction` of the samples, keep that many lowest losses instead.

    losses (N,) fp32, labels (N,) int64, probs (N, C) fp32 on one device; base: the schedule's
    absolute threshold in nats (what the `threshold` selector applies); pool (N,) bool: the
    samples that may be kept (the others, a held-out validation split, inform nothing and are
    never kept); evidence still covers every sample.
    """
    pool = torch.ones_like(labels, dtype=torch.bool) if pool is None else pool
    base_t = torch.full((), base, device=losses.device)
    thresholds = selector.from_losses(losses[pool], labels[pool], base_t, probs[pool])
    keep = (losses < thresholds[labels]) & pool
    evidence = selector.evidence(losses, labels)
    k = math.ceil(min_kept_fraction * int(pool.sum()))
    guard = int(keep.sum()) < k
    if guard:  # the kept set would collapse: keep the k lowest losses instead
        keep = torch.zeros_like(keep)
        keep[losses.masked_fill(~pool, math.inf).argsort()[:k]] = True
    return Verdict(keep, evidence, thresholds, guard, selector.noise_rate_value())


def median_threshold(thresholds: Tensor) -> float | None:
    """A one-number summary of per-class thresholds for the log (None when every class keeps all)."""
    finite = thresholds[torch.isfinite(thresholds)]
    return float(finite.median()) if len(finite) else None
