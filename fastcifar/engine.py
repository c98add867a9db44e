"""One epoch of training and evaluation: augmentation, forward, masked loss, optimiser step, stats."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import augment
from .config import Config
from .distributed import DistInfo, all_gather_cat, all_reduce_sum
from .kernels import masked_cross_entropy
from .model import NoisyLabelNet, Precision, maybe_compile, set_backbone_trainable
from .report import noise_detection
from .schedule import Phase, Schedule


@dataclass
class EpochStats:
    """Device-side accumulators for one epoch; read once at its end (one host sync per epoch)."""

    num_samples: int
    device: torch.device
    loss_sum: torch.Tensor = field(init=False)  # sum of kept per-sample losses
    counts: torch.Tensor = field(init=False)  # [kept, seen, correct, guard_binds, steps, non-finite]
    kept: torch.Tensor = field(init=False)  # (num_samples,) bool, this epoch's decision per sample
    seen: torch.Tensor = field(init=False)  # (num_samples,) bool

    def __post_init__(self):
        z = dict(device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, **z)
        self.counts = torch.zeros(6, dtype=torch.int64, **z)
        self.kept = torch.zeros(self.num_samples, dtype=torch.bool, **z)
        self.seen = torch.zeros_like(self.kept)

    def record(self, indices, labels, per_sample, keep, logits, guard_bound):
        self.loss_sum += (per_sample * keep).sum()
        correct = (logits.argmax(1) == labels).sum()
        one = torch.ones((), dtype=torch.int64, device=self.device)
        # A non-finite loss is never "< threshold", so it would be silently dropped: count it.
        bad = (~torch.isfinite(per_sample)).sum()
        self.counts += torch.stack([keep.sum(), one * len(labels), correct, guard_bound.long(), one, bad])
        self.kept[indices] = keep
        self.seen[indices] = True

    def reduce(self, dist: DistInfo, noisy: torch.Tensor, known: torch.Tensor) -> dict:
        """Sum over processes and return plain numbers (the one host sync).

        noisy, known: (num_samples,) bool CPU tensors: the label is wrong / the clean label is known.
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
        }
        mask = known & seen
        if bool(mask.any()):
            out.update(noise_detection(~kept[mask], noisy[mask]))
        return out


class Engine:
    """Owns the model wrappers (compiled, DDP) and runs epochs; the loop in train.py drives it."""

    def __init__(self, cfg: Config, model: NoisyLabelNet, optimizer, scaler, precision: Precision,
                 device: torch.device, dist: DistInfo, schedule: Schedule, noisy: torch.Tensor,
                 known: torch.Tensor):
        """noisy, known: (num_train,) bool CPU tensors (wrong label / clean label known) for the
        noise-detection metrics."""
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.precision, self.device, self.dist, self.schedule = precision, device, dist, schedule
        self.noisy, self.known = noisy, known
        self.mixing = cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0
        self._phase_key: tuple | None = None
        self.eval_forward = maybe_compile(model, cfg.model, device)
        # CUDA graphs (reduce-overhead) reuse their output memory at the next replay.
        self.cuda_graphs = cfg.model.compile_mode == "reduce-overhead"
        self.threshold = torch.full((), math.inf, device=device)  # a tensor: no recompiles as it decays
        self._inf = self.threshold.clone()

    # -- phase set-up ---------------------------------------------------------------------------
    def enter_phase(self, phase: Phase) -> None:
        """Freeze or unfreeze and (re)build the DDP/compile wrappers; a no-op within a phase."""
        key = (phase.train_backbone,)
        if key == self._phase_key:
            return
        self._phase_key = key
        # Drop the previous phase's wrappers: a stale DDP keeps hooks on the parameters.
        self.train_forward = self.head = self.frozen_features = None
        set_backbone_trainable(self.model, phase.train_backbone)
        mc = self.cfg.model
        ddp_args = dict(device_ids=[self.device.index]) if self.device.type == "cuda" else {}
        if phase.train_backbone:
            net = DDP(self.model, **ddp_args) if self.dist.enabled else self.model
            self.train_forward = maybe_compile(net, mc, self.device)
        else:
            # Frozen backbone: features without grad, in big chunks; only the head trains (and syncs).
            self.frozen_features = maybe_compile(self.model.features, mc, self.device)
            head = DDP(self.model.head, **ddp_args) if self.dist.enabled else self.model.head
            self.head = maybe_compile(head, mc, self.device)

    # -- training -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, batches: Iterable, steps_in_epoch: int, num_samples: int,
                    batch_filtering: bool = True, progress: Callable[[], None] = lambda: None) -> dict:
        """One epoch of optimiser steps; returns the epoch's training metrics as plain numbers.

        batch_filtering=False trains on every sample given (epoch-level filtering chose them);
        at most `steps_in_epoch` steps run.
        """
        phase = self.schedule.phase(epoch)
        self.enter_phase(phase)
        self.model.train()
        set_backbone_trainable(self.model, phase.train_backbone)
        self.filtering = phase.filtering and batch_filtering
        threshold = self.schedule.threshold(epoch) if self.filtering else math.inf
        self.threshold.fill_(threshold)
        self.guard = self.threshold.clone()
        stats = EpochStats(num_samples, self.device)
        steps = self._frozen_steps(batches, epoch) if not phase.train_backbone else self._full_steps(batches, epoch)
        lr = self.schedule.lr(epoch, 0, steps_in_epoch)
        for step, (batch, inputs, labels_b, lam) in enumerate(steps):
            if step >= steps_in_epoch:
                break
            lr = self.schedule.lr(epoch, step, steps_in_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._step(batch, inputs, labels_b, lam, stats, head_only=not phase.train_backbone)
            progress()
        out = stats.reduce(self.dist, self.noisy, self.known)
        out.update(lr=lr, threshold=None if math.isinf(threshold) else threshold)  # JSON has no inf
        return out

    def _full_steps(self, batches, epoch) -> Iterator:
        for step, batch in enumerate(batches):
            yield batch, *self._augment(batch, epoch, step)

    def _frozen_steps(self, batches, epoch) -> Iterator:
        """Run the frozen backbone on `frozen_chunk` images at a time; yield per-step feature slices."""
        per_chunk = max(self.cfg.train.frozen_chunk // self.cfg.train.batch_size, 1)
        chunk: list = []
        for step, batch in enumerate(batches):
            chunk.append((batch, *self._augment(batch, epoch, step)))
            if len(chunk) == per_chunk:
                yield from self._features_of(chunk)
                chunk = []
        yield from self._features_of(chunk)

    def _features_of(self, chunk: list) -> Iterator:
        if not chunk:
            return
        with torch.no_grad(), self.precision.autocast(self.device):
            feats = self.frozen_features(torch.cat([x for _, x, _, _ in chunk]))
        if self.cuda_graphs:  # the head's graph replays would overwrite the features' graph output
            feats = feats.clone()
        start = 0
        for batch, x, labels_b, lam in chunk:
            yield batch, feats[start:start + len(x)], labels_b, lam
            start += len(x)

    def _augment(self, batch, epoch: int, step: int):
        a = self.cfg.augment
        x = augment.train_augment(batch.images, batch.indices, seed=self.cfg.run.seed, epoch=epoch, cfg=a)
        if not self.mixing:
            return x, None, 1.0
        # Keyed by (seed, epoch, step): the same draw in every process and after a resume.
        return augment.mix_batch(x, batch.labels, seed=self.cfg.run.seed, epoch=epoch, step=step, cfg=a)

    def _step(self, batch, inputs, labels_b, lam, stats: EpochStats, head_only: bool) -> None:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self.precision.autocast(self.device):
            logits = self.head(inputs) if head_only else self.train_forward(inputs)
        threshold = torch.maximum(self.threshold, self.guard)
        out = masked_cross_entropy(logits, batch.labels, threshold, labels_b=labels_b, lam=lam,
                                   label_smoothing=self.cfg.optim.label_smoothing, reduction="sum")
        kept = all_reduce_sum(out.keep.sum().float(), self.dist)
        # Normalise by the global kept count; DDP averages gradients over processes, so scale back up.
        loss = out.loss * self.dist.world_size / kept.clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        stats.record(batch.indices, batch.labels, out.per_sample, out.keep,
                     logits.detach(), guard_bound=self.guard > self.threshold)
        self._update_guard(out.per_sample)

    def _update_guard(self, per_sample: torch.Tensor) -> None:
        """Minimum kept fraction: the next step's threshold is at least this step's k-th smallest loss.

        It lags one step (the kernel decides in one pass, so the current batch cannot be re-decided);
        the losses are gathered across processes so every process applies the same threshold.
        """
        frac = self.cfg.filter.min_kept_fraction
        if frac <= 0 or not self.filtering:
            return
        losses = all_gather_cat(per_sample, self.dist)
        k = max(1, math.ceil(frac * losses.numel()))
        kth = losses.float().kthvalue(k).values
        self.guard = torch.nextafter(kth, self._inf)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable, tta: bool = False) -> dict:
        """Accuracy and mean cross-entropy on clean labels; flip TTA averages probabilities."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, correct
        count = 0
        for batch in batches:
            x = augment.eval_transform(batch.images, cfg=self.cfg.augment)
            with self.precision.autocast(self.device):
                if tta:
                    probs = augment.tta_probs(lambda v: self.eval_forward(v).float(), x)
                    loss = F.nll_loss(probs.clamp_min(1e-12).log(), batch.labels, reduction="sum")
                    pred = probs.argmax(1)
                else:
                    logits = self.eval_forward(x).float()
                    loss = F.cross_entropy(logits, batch.labels, reduction="sum")
                    pred = logits.argmax(1)
            sums += torch.stack([loss.double(), (pred == batch.labels).sum().double()])
            count += len(pred)
        counts = all_reduce_sum(torch.tensor([count], device=self.device), self.dist)
        (loss, correct), count = all_reduce_sum(sums, self.dist).tolist(), int(counts)
        return {"val_loss": loss / max(count, 1), "val_acc": correct / max(count, 1)}

    @torch.no_grad()
    def score(self, batches: Iterable, num_samples: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax and per-sample CE (given labels) for every sample, in index order, eval mode, no aug.

        Returns probs (num_samples, C) float32 and losses (num_samples,) float32, on the device,
        identical in every process.
        """
        self.model.eval()
        probs = torch.zeros(num_samples, num_classes, device=self.device)
        losses = torch.zeros(num_samples, device=self.device)
        for batch in batches:
            x = augment.eval_transform(batch.images, cfg=self.cfg.augment)
            with self.precision.autocast(self.device):
                logits = self.eval_forward(x).float()
            probs[batch.indices] = logits.softmax(1)
            losses[batch.indices] = F.cross_entropy(logits, batch.labels, reduction="none")
        return all_reduce_sum(probs, self.dist), all_reduce_sum(losses, self.dist)

