"""Evaluation, flip TTA and the scoring pass over the training split, on one static batch shape.

One function makes logits of a fixed-size batch in eval mode: the last, partial batch of a split
is padded to that size (its padding rows are computed and ignored), and TTA's mirrored view goes
through the same function, so evaluation, TTA and scoring share one compiled graph (or one CUDA
graph) and nothing recompiles for a shape.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import augment
from .distributed import all_reduce_sum
from .step import StepContext, _Runner, _static_images


class EvalLogits(_Runner):
    """fp32 logits (n, C) of up to `batch_size` uint8 images, the model in eval mode, no grad."""

    name = "evaluation"

    def __init__(self, ctx: StepContext, batch_size: int, image_shape: tuple):
        super().__init__(ctx)
        self.images = _static_images(batch_size, image_shape, ctx.device)
        self.constants = augment.eval_constants(ctx.cfg.augment, image_shape[1], ctx.device)
        self.logits: Tensor | None = None  # (batch_size, C) fp32

    def forward(self, images: Tensor) -> Tensor:
        c = self.ctx
        x = augment.eval_transform(images, cfg=c.cfg.augment, constants=self.constants)
        with c.precision.autocast(c.device):
            return c.model(x).float()

    def body(self, forward: Callable) -> None:
        with torch.no_grad():
            logits = forward(self.images)
            if self.logits is None:  # allocated by the first (never a captured) call, then reused
                self.logits = torch.empty_like(logits)
            self.logits.copy_(logits)

    def __call__(self, images: Tensor, mirrored: bool = False) -> Tensor:
        """images: (n, 3, H, W) uint8, n <= batch_size. Returns a view of the static logits: read it
        before the next call."""
        n = len(images)
        self.images[:n].copy_(images.flip(-1) if mirrored else images)
        self.run()
        return self.logits[:n]


def mean_probs(logits_of: EvalLogits, images: Tensor, tta: bool) -> Tensor:
    """(n, C) fp32 softmax, averaged with the mirrored view's when `tta` (augment.tta_views' pair)."""
    probs = logits_of(images).softmax(1)  # a new tensor: safe from the next call's overwrite
    if tta:
        probs = (probs + logits_of(images, mirrored=True).softmax(1)) / 2
    return probs


@torch.no_grad()
def evaluate(logits_of: EvalLogits, batches: Iterable, tta: bool = False) -> dict:
    """Accuracy and mean cross-entropy on the batches' labels; flip TTA averages probabilities."""
    ctx = logits_of.ctx
    ctx.model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, correct, count
    for batch in batches:
        if tta:
            probs = mean_probs(logits_of, batch.images, tta=True)
            loss = F.nll_loss(probs.clamp_min(1e-12).log(), batch.labels, reduction="sum")
        else:
            probs = logits_of(batch.images)  # logits: the same argmax, and an exact cross-entropy
            loss = F.cross_entropy(probs, batch.labels, reduction="sum")
        correct = (probs.argmax(1) == batch.labels).sum()
        sums += torch.stack([loss.double(), correct.double(), torch.full_like(loss, len(probs)).double()])
    loss, correct, count = all_reduce_sum(sums, ctx.dist).tolist()
    return {"val_loss": loss / max(count, 1), "val_acc": correct / max(count, 1)}


@torch.no_grad()
def score(logits_of: EvalLogits, batches: Iterable, num_samples: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Softmax and per-sample CE (given labels) for every sample, in index order, eval mode, no aug.

    Returns probs (num_samples, C) float32 and losses (num_samples,) float32, on the device,
    identical in every process.
    """
    ctx = logits_of.ctx
    ctx.model.eval()
    probs = torch.zeros(num_samples, num_classes, device=ctx.device)
    losses = torch.zeros(num_samples, device=ctx.device)
    for batch in batches:
        logits = logits_of(batch.images)
        probs[batch.indices] = logits.softmax(1)
        losses[batch.indices] = F.cross_entropy(logits, batch.labels, reduction="none")
    return all_reduce_sum(probs, ctx.dist), all_reduce_sum(losses, ctx.dist)
