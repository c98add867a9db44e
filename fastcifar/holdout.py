"""The noisy validation split (train.select_on=noisy_val): a stratified share of the training data,
kept with its noisy labels and never trained on, on which the best checkpoint is chosen.

This is the CIFAR-N challenge's protocol: the clean test labels then only report, they never
choose. The default (train.select_on=test) chooses on the test split, as the paper does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .sources import stratified_holdout


class RowsLoader:
    """A SplitLoader limited to some of its sample indices (`rows`, sorted (M,) int64).

    Batches still carry the split's own sample indices, so per-sample arrays of length
    `num_samples` (the whole split) keep working.
    """

    def __init__(self, inner, rows: np.ndarray):
        self.inner, self.rows = inner, np.asarray(rows, dtype=np.int64)
        self.num_samples, self.batch_size = inner.num_samples, inner.batch_size
        self.image_shape = inner.image_shape

    def epoch(self, epoch: int, indices=None):
        """`inner.epoch` over `rows`, or over the given indices (or bool mask) that are in `rows`."""
        if indices is None:
            return self.inner.epoch(epoch, self.rows)
        ids = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        ids = np.flatnonzero(ids) if ids.dtype == np.bool_ else ids.astype(np.int64).reshape(-1)
        return self.inner.epoch(epoch, ids[np.isin(ids, self.rows)])

    def num_batches(self, num_samples: int | None = None) -> int:
        return self.inner.num_batches(len(self.rows) if num_samples is None else num_samples)

    def arrays(self):
        return self.inner.arrays()


def split_noisy_val(loaders, fraction: float, seed: int):
    """`loaders` with `val` (the held-out rows of the training split, in order, noisy labels) and
    `train` limited to the rest; `holdout` is the (num_train,) bool CPU mask of the held-out rows.

    Stratified by the given (noisy) label, seeded by the run's seed, the same in every process.
    """
    labels = loaders.score.arrays()["labels"].cpu().numpy()
    kept, held = stratified_holdout(labels, fraction, seed)
    holdout = torch.zeros(len(labels), dtype=torch.bool)
    holdout[torch.from_numpy(held)] = True
    return dataclasses.replace(loaders, train=RowsLoader(loaders.train, kept),
                               val=RowsLoader(loaders.score, held), holdout=holdout)
