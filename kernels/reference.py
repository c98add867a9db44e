"""Plain-PyTorch masked cross-entropy: the reference the Triton kernel is tested against.

Also holds what both implementations share: the `MaskedCE` result and the input checks.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MaskedCE(NamedTuple):
    """Result of a masked cross-entropy.

    loss: 0-d fp32, differentiable w.r.t. the logits only.
    per_sample: (N,) fp32, detached; the loss of every sample, kept or not.
    keep: (N,) bool; per_sample < threshold (or < threshold[labels] for per-class thresholds).
    """

    loss: Tensor
    per_sample: Tensor
    keep: Tensor


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_scalar_tensor(name: str, t: Tensor, device: torch.device) -> None:
    if t.dim() != 0 or not t.is_floating_point():
        raise ValueError(f"{name} must be a 0-d floating tensor, got shape {tuple(t.shape)} {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")


def _check_threshold(threshold, logits: Tensor) -> None:
    """A real number (not NaN), a 0-d floating tensor, or a (C,) floating tensor of per-class
    thresholds, a tensor on the logits' device."""
    if not isinstance(threshold, Tensor):
        if not _is_number(threshold) or math.isnan(threshold):
            raise ValueError(f"threshold must be a real number, a 0-d tensor or a (C,) tensor, "
                             f"got {threshold!r}")
        return
    n_classes = logits.shape[1]
    if threshold.dim() > 1 or not threshold.is_floating_point():
        raise ValueError(f"threshold must be a 0-d or ({n_classes},) floating tensor, got shape "
                         f"{tuple(threshold.shape)} {threshold.dtype}")
    if threshold.dim() == 1 and threshold.shape[0] != n_classes:
        raise ValueError(f"a per-class threshold needs one entry per class: shape "
                         f"({n_classes},), got ({threshold.shape[0]},)")
    if threshold.device != logits.device:
        raise ValueError(f"threshold is on {threshold.device} but the logits are on "
                         f"{logits.device}")


def _check_labels(name: str, labels: Tensor, logits: Tensor) -> None:
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:1]:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{name} must have shape ({logits.shape[0]},), got {got}")
    if labels.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"{name} is on {labels.device} but the logits are on {logits.device}")


def check_inputs(logits, labels, threshold, label_smoothing, labels_b, lam, reduction) -> None:
    """Validate the arguments of a masked cross-entropy without reading any device memory.

    Checked (shapes, dtypes, devices and Python numbers only, so no host synchronisation):
    logits (N, C) with C >= 1 in fp32/fp16/bf16; labels and labels_b (N,) int64 on the same
    device; threshold a real number (not NaN), a 0-d floating tensor or a (C,) floating tensor
    of per-class thresholds on that device; lam a number in [0, 1] or a 0-d floating tensor on
    that device; label_smoothing in [0, 1); reduction "mean" or "sum".
    The caller's duty (checking it would need the values, hence a sync): every label lies in
    [0, C) (the data layer validates labels when files are written and read; the Triton
    kernel turns an out-of-range label into a NaN loss that is never kept, the reference
    raises or asserts like F.cross_entropy), and a lam tensor lies in [0, 1].
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (N, C) with C >= 1, got {got}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be fp32, fp16 or bf16, got {logits.dtype}")
    _check_labels("labels", labels, logits)
    if labels_b is not None:
        _check_labels("labels_b", labels_b, logits)
    _check_threshold(threshold, logits)
    if isinstance(lam, Tensor):
        _check_scalar_tensor("lam", lam, logits.device)
    elif not _is_number(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] or a 0-d tensor, got {lam!r}")
    if not _is_number(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}')


def _per_class_threshold(threshold: Tensor, labels: Tensor) -> Tensor:
    """threshold[labels] as (N,) fp32 from a (C,) tensor and (N,) int64 labels; NaN (never kept)
    where a label lies outside [0, C).

    The gather index is clamped so that an invalid label fails only where F.cross_entropy
    fails, with its error, and never wraps around to another class (a negative index would);
    its ignore_index -100, for which F.cross_entropy gives 0, is then dropped as in Triton.
    """
    n_classes = threshold.shape[0]
    valid = (labels >= 0) & (labels < n_classes)
    thr = threshold.float()[labels.clamp(0, n_classes - 1)]
    return torch.where(valid, thr, float("nan"))


def reference_masked_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    threshold: float | Tensor,
    *,
    label_smoothing: float = 0.0,
    labels_b: Tensor | None = None,
    lam: float | Tensor = 1.0,
    reduction: str = "mean",
) -> MaskedCE:
    """Per-sample cross-entropy, the keep mask and the masked loss, with PyTorch ops.

    logits: (N, C) fp32/fp16/bf16, computed in fp32. labels, labels_b: (N,) int64 in [0, C).
    threshold: float, 0-d tensor, or (C,) floating tensor of per-class thresholds; sample i is
    kept when its loss is below the threshold, or below threshold[labels[i]] (the first label's
    class, also with a partner), compared in fp32. lam: weight of `labels` when a MixUp/CutMix
    partner `labels_b` is given.
    Returns MaskedCE(loss 0-d fp32, per_sample (N,) fp32 detached, keep (N,) bool); the loss
    is the kept mean ("mean", 0 when nothing is kept) or the kept sum ("sum").
    """
    check_inputs(logits, labels, threshold, label_smoothing, labels_b, lam, reduction)
    x = logits.float()  # fp32 math whatever the logits' dtype; autograd casts the grad back
    ce = F.cross_entropy(x, labels, reduction="none", label_smoothing=label_smoothing)
    if labels_b is not None:
        w = lam.float() if isinstance(lam, Tensor) else lam
        ce_b = F.cross_entropy(x, labels_b, reduction="none", label_smoothing=label_smoothing)
        ce = w * ce + (1 - w) * ce_b
    per_sample = ce.detach()
    if isinstance(threshold, Tensor) and threshold.dim() == 1:
        thr = _per_class_threshold(threshold, labels)
    elif isinstance(threshold, Tensor):
        thr = threshold.float()
    else:  # a fill on the device, not a host-to-device copy (which could synchronise)
        thr = torch.full((), threshold, dtype=torch.float32, device=logits.device)
    keep = per_sample < thr
    total = torch.where(keep, ce, 0.0).sum()
    if reduction == "mean":
        total = total / keep.sum().clamp(min=1)
    return MaskedCE(total, per_sample, keep)
