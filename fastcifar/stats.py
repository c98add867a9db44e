"""An epoch's training statistics, accumulated on the device by every step and read once at its end."""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import DistInfo, all_reduce_sum
from .report import noise_detection

# counts columns
KEPT, SEEN, CORRECT, GUARD_BINDS, STEPS, NON_FINITE = range(6)


class EpochStats:
    """Device-side accumulators, allocated once and zeroed in place at each epoch's start (a captured
    step writes the same memory every replay); `reduce` is the epoch's one host synchronisation."""

    def __init__(self, num_samples: int, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of kept per-sample losses
        self.counts = torch.zeros(6, dtype=torch.int64, device=device)  # see the columns above
        self.kept = torch.zeros(num_samples, dtype=torch.bool, device=device)  # this epoch's decision
        self.seen = torch.zeros_like(self.kept)

    def reset(self) -> None:
        for t in (self.loss_sum, self.counts, self.kept, self.seen):
            t.zero_()

    def record(self, indices: Tensor, labels: Tensor, per_sample: Tensor, keep: Tensor, logits: Tensor,
               guard_bound: Tensor) -> None:
        """One step's batch: indices, labels (B,) int64; per_sample (B,) fp32; keep (B,) bool;
        logits (B, C); guard_bound 0-d bool (the minimum-kept guard raised a threshold)."""
        self.loss_sum += torch.where(keep, per_sample, 0.0).sum()
        correct = (logits.argmax(1) == labels).sum()
        # A non-finite loss is never "< threshold", so it would be silently dropped: count it.
        bad = (~torch.isfinite(per_sample)).sum()
        seen = torch.full((), len(labels), dtype=torch.int64, device=labels.device)
        self.counts += torch.stack([keep.sum(), seen, correct, guard_bound.long(), torch.ones_like(seen), bad])
        self.kept[indices] = keep
        # index_fill_, not `seen[indices] = True`: that copies a host scalar tensor over, which a
        # CUDA graph refuses while capturing (the H200, 2026-12-04: the head step fell back to compiled).
        self.seen.index_fill_(0, indices, True)

    def reduce(self, dist: DistInfo, noisy: Tensor, known: Tensor, filtering: bool) -> dict:
        """Sum over processes and return plain numbers (the one host sync).

        noisy, known: (num_samples,) bool CPU tensors: the label is wrong / the clean label is known.
        The noise-detection metrics exist only where samples were filtered (else null: unknown).
        """
        flags = torch.stack([self.kept, self.seen]).to(torch.uint8)
        all_reduce_sum(self.loss_sum, dist), all_reduce_sum(self.counts, dist), all_reduce_sum(flags, dist)
        kept, seen = flags.bool().cpu()
        kept_n, seen_n, correct, guard, steps, non_finite = self.counts.tolist()
        out = {
            "train_loss": self.loss_sum.item() / max(kept_n, 1),
            "train_acc": correct / max(seen_n, 1),
            "kept_fraction": kept_n / max(seen_n, 1),
            "guard_bound_steps": guard,
            "steps": steps,
            "non_finite": non_finite,
            "noisy_precision": None, "noisy_recall": None, "noisy_f1": None,
        }
        mask = known & seen
        if filtering and bool(mask.any()):
            out.update(noise_detection(~kept[mask], noisy[mask]))
        return out
