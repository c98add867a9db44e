"""MixUp and CutMix on a batch, drawn on the host per (seed, epoch, step) and applied from device tensors.

A batch's draw (MixUp or CutMix, lam, the CutMix box, the key of the partner permutation) is made
with a keyed numpy generator, so every process and every resume draws the same. A whole epoch of
draws is one small table (`mix_table`, one row per step); `mix_rows` applies a row that lives on
the device, so the training step reads nothing from the host and can run under torch.compile
(no Python ints that change per step, hence no recompiles) and inside a CUDA graph.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fastcifar import keyed_random as kr
from fastcifar.config import AugmentConfig

# Columns of a mix-table row (float64: every value below 2**53 is exact).
USE_CUTMIX, LAM, Y1, X1, Y2, X2, PERM_KEY = range(7)
ROW_WIDTH = 7


def mixing_enabled(cfg: AugmentConfig) -> bool:
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0


def cutmix_box(rng, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision CutMix's box for mixing weight `lam`: a centre uniform over the image and
    sides sqrt(1 - lam) times the image's, clipped to it. Returns (y1, x1, y2, x2)."""
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    r = 0.5 * math.sqrt(1.0 - lam)
    hh, hw = int(r * height), int(r * width)
    return max(cy - hh, 0), max(cx - hw, 0), min(cy + hh, height), min(cx + hw, width)


def mix_row(cfg: AugmentConfig, *, seed: int, epoch: int, step: int, height: int, width: int) -> list[float]:
    """One step's draw as a mix-table row (see the column names above).

    MixUp or CutMix at random per batch when both alphas are > 0; CutMix's lam is the unpasted
    area fraction, as the loss weights the two labels by it.
    """
    rng = kr.batch_generator(kr.MIX_BATCH, seed, epoch, step)
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    box = (0, 0, 0, 0)
    if use_cutmix:
        box = cutmix_box(rng, lam, height, width)
        lam = 1.0 - (box[2] - box[0]) * (box[3] - box[1]) / (height * width)
    return [float(use_cutmix), lam, *map(float, box), float(kr.stream_key(seed, epoch, kr.MIX_PERM, step))]


def mix_table(cfg: AugmentConfig, *, seed: int, epoch: int, steps: int, height: int, width: int) -> Tensor:
    """(steps, ROW_WIDTH) float64 CPU tensor: the draws of steps 0..steps-1 of `epoch`."""
    rows = [mix_row(cfg, seed=seed, epoch=epoch, step=s, height=height, width=width) for s in range(steps)]
    return torch.tensor(np.array(rows, dtype=np.float64).reshape(steps, ROW_WIDTH))


def mix_rows(images: Tensor, labels: Tensor, row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Apply one drawn row to a batch, with device ops only (static shapes, no host reads).

    images: (N, C, H, W) normalised float; labels: (N,) int64; row: (ROW_WIDTH,) float64 on the
    images' device. Returns (mixed images, labels_b (N,) int64 = the partners' labels, lam 0-d
    float32): for a loss lam * CE(labels) + (1 - lam) * CE(labels_b).
    """
    n, _, h, w = images.shape
    key = row[PERM_KEY].to(torch.int64)
    bits = kr.keyed_bits(key, torch.arange(n, device=images.device), 1)[:, 0]
    perm = torch.argsort(bits, stable=True)  # a uniform random permutation (ties are rare, and stable)
    partner = images.index_select(0, perm)
    lam = row[LAM].to(torch.float32)
    mixed_up = partner * (1.0 - lam) + images * lam
    ys = torch.arange(h, device=images.device).view(h, 1)
    xs = torch.arange(w, device=images.device).view(1, w)
    box = row[Y1:X2 + 1].to(torch.int64)
    inside = (ys >= box[0]) & (ys < box[2]) & (xs >= box[1]) & (xs < box[3])
    cut = torch.where(inside, partner, images)
    mixed = torch.where(row[USE_CUTMIX] > 0, cut, mixed_up)
    return mixed, labels.index_select(0, perm), lam


def mix_batch(images: Tensor, labels: Tensor, *, seed: int, epoch: int, step: int, cfg: AugmentConfig):
    """MixUp or CutMix of one batch, drawn for (seed, epoch, step): `mix_rows` of `mix_row`.

    Returns (images, labels, lam = 1) unchanged when both alphas are 0.
    """
    if not mixing_enabled(cfg):
        return images, labels, torch.ones((), dtype=torch.float32, device=images.device)
    h, w = images.shape[-2:]
    row = torch.tensor(mix_row(cfg, seed=seed, epoch=epoch, step=step, height=h, width=w), dtype=torch.float64)
    return mix_rows(images, labels, row.to(images.device))

