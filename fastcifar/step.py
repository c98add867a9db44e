"""The training step on static buffers: augmentation → forward → masked CE → backward → SGD → statistics.

Every step reads its batch from buffers allocated once, and everything that changes with time from
device tensors updated in place (`StepState`: the epoch's lr table and a step counter, the
thresholds, the minimum-kept guard, the augmentation key and noise, the MixUp/CutMix table).
Nothing in a step reads a value back to the host or depends on a Python number that changes, so
the same step runs eagerly, compiled (no recompiles: static shapes, tensors for every changing
value) or captured as one CUDA graph (`graphs`), whichever mode the ladder has settled on.

Why a fall-back never counts a step twice: compilation fails in the forward, before the optimizer
step and the statistics have run; capture fails anywhere in the body (the H200 met one in the
statistics), but capturing records the work without executing it. Either way the step runs again
in the next mode as if for the first time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import mixing
from .augment import TrainAugment
from .config import Config
from .distributed import DistInfo, all_gather_cat, all_reduce_sum
from .graphs import CompileStats, Graphed, ModeLadder, Mode, compile_fn
from .kernels import masked_cross_entropy
from .model import Precision
from .optim import PhaseSGD
from .select import Selector
from .stats import EpochStats


@dataclass
class StepState:
    """What changes with time, as device tensors written in place between (never during) steps."""

    lr_table: Tensor  # (max steps per epoch,) fp32: this epoch's lr per step
    counter: Tensor  # 0-d int64: steps taken this epoch
    thresholds: Tensor  # (C,) fp32 per-class loss thresholds in nats; inf keeps every finite loss
    guard: Tensor  # 0-d fp32: the minimum-kept guard (threshold floor); -inf = none
    aug_key: Tensor  # 0-d int64: this epoch's augmentation key
    noise: Tensor | None  # (L,) fp32 erasing noise of this epoch, when erasing draws noise
    mix: Tensor | None  # (max steps, mixing.ROW_WIDTH) float64 MixUp/CutMix draws, when mixing


@dataclass
class StepContext:
    """Everything the steps share; made by the Engine."""

    cfg: Config
    model: torch.nn.Module
    optimizer: PhaseSGD
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    dist: DistInfo
    augment: TrainAugment
    state: StepState
    stats: EpochStats
    ladder: ModeLadder
    compile_stats: CompileStats
    selector: Selector  # batch mode: every step's losses go into its per-class statistics
    capture: object  # graphs.CudaGraphCapture (or a test's stand-in)


def _static_images(n: int, shape: tuple[int, int, int], device: torch.device) -> Tensor:
    """(n, 3, H, W) uint8 in channels-last memory, as the loaders hand out batches."""
    h, w, c = shape
    return torch.zeros(n, h, w, c, dtype=torch.uint8, device=device).permute(0, 3, 1, 2)


def _row(table: Tensor, counter: Tensor) -> Tensor:
    return table.index_select(0, counter.view(1))[0]


class _Runner:
    """A step's body run in the ladder's mode: eager, compiled (`forward` through torch.compile) or
    captured as a graph of the compiled body. Subclasses give `body(forward)` and `forward`."""

    name = "step"

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self._impl: dict[str, Callable[[], None]] = {}
        self._graphed: dict[str, Graphed] = {}
        self._compiled: dict = {}  # torch.compile mode -> compiled forward (graphs and compiled share one)

    def forward(self, *args):  # the traced part, overridden
        raise NotImplementedError

    def body(self, forward: Callable) -> None:  # the whole step on the static buffers, overridden
        raise NotImplementedError

    def _build(self, mode: Mode) -> Callable[[], None]:
        if mode.name == "eager":
            return lambda: self.body(self.forward)
        if mode.compile_mode not in self._compiled:  # a step down from graphs reuses what compiled
            self._compiled[mode.compile_mode] = compile_fn(self.forward, self.name, mode, self.ctx.compile_stats)
        forward = self._compiled[mode.compile_mode]
        if mode.name == "compiled":
            if mode.inductor_graphs:  # inductor's graphs reuse their outputs' memory at the next step
                return lambda: (torch.compiler.cudagraph_mark_step_begin(), self.body(forward))
            return lambda: self.body(forward)
        graphed = self._graphed[mode.name] = Graphed(lambda: self.body(forward), self.ctx.capture)
        return graphed

    def _call(self, mode: Mode) -> None:
        if mode.name not in self._impl:
            self._impl[mode.name] = self._build(mode)
        self._impl[mode.name]()

    def _settled(self, mode: Mode) -> bool:
        graphed = self._graphed.get(mode.name)
        return graphed is None or graphed.ready

    def run(self) -> None:
        self.ctx.ladder.guard(self.name, self._call, self._settled)

    # -- shared pieces of a training step ---------------------------------------------------------
    def _loss(self, logits: Tensor, labels: Tensor, labels_b: Tensor | None, lam, thresholds: Tensor,
              guard: Tensor):
        thr = torch.maximum(thresholds, guard)  # the guard is a floor under every class's threshold
        return masked_cross_entropy(logits, labels, thr, labels_b=labels_b, lam=lam, reduction="sum",
                                    label_smoothing=self.ctx.cfg.optim.label_smoothing)

    def _optimize(self, loss_sum: Tensor, keep: Tensor) -> None:
        c = self.ctx
        c.optimizer.lr.copy_(_row(c.state.lr_table, c.state.counter))
        kept = all_reduce_sum(keep.sum().float(), c.dist)
        # Normalise by the global kept count; DDP averages gradients over processes, so scale back up.
        loss = loss_sum * c.dist.world_size / kept.clamp(min=1)
        c.optimizer.zero_grad()
        c.scaler.scale(loss).backward()
        c.scaler.step(c.optimizer.sgd)
        c.scaler.update()

    def _account(self, indices: Tensor, labels: Tensor, per_sample: Tensor, keep: Tensor,
                 logits: Tensor) -> None:
        """Statistics, the next step's guard and the step counter: the end of every step."""
        s = self.ctx.state
        bound = (s.guard > s.thresholds.index_select(0, labels)).any()
        self.ctx.stats.record(indices, labels, per_sample, keep, logits, bound)
        f = self.ctx.cfg.filter
        if f.mode == "batch":  # epoch mode reads its thresholds from the scoring pass instead
            self.ctx.selector.observe(per_sample, labels, logits.float().softmax(1))
        frac = f.min_kept_fraction if f.enabled and f.mode == "batch" else 0.0
        if frac > 0:  # the next step's floor: this step's k-th smallest loss (over every process)
            losses = all_gather_cat(per_sample, self.ctx.dist)
            k = max(1, math.ceil(frac * losses.numel()))
            s.guard.copy_(torch.nextafter(losses.kthvalue(k).values, torch.full_like(s.guard, math.inf)))
        s.counter += 1


class FullStep(_Runner):
    """One optimizer step of the whole network on a batch (phases that train the backbone)."""

    name = "full step"

    def __init__(self, ctx: StepContext, net: torch.nn.Module, batch_size: int, image_shape: tuple):
        super().__init__(ctx)
        self.net = net  # the model, or its DDP wrapper
        self.images = _static_images(batch_size, image_shape, ctx.device)
        self.indices = torch.zeros(batch_size, dtype=torch.int64, device=ctx.device)
        self.labels = torch.zeros_like(self.indices)

    def __call__(self, batch) -> None:
        self.images.copy_(batch.images)
        self.indices.copy_(batch.indices)
        self.labels.copy_(batch.labels)
        self.run()

    def forward(self, images, indices, labels, key, noise, mix, counter, thresholds, guard):
        c = self.ctx
        x = c.augment(images, indices, key, noise)
        labels_b, lam = None, 1.0
        if mix is not None:
            x, labels_b, lam = mixing.mix_rows(x, labels, _row(mix, counter))
        with c.precision.autocast(c.device):
            logits = self.net(x)
        out = self._loss(logits, labels, labels_b, lam, thresholds, guard)
        return out.loss, out.per_sample, out.keep, logits.detach()

    def body(self, forward: Callable) -> None:
        s = self.ctx.state
        loss, per_sample, keep, logits = forward(self.images, self.indices, self.labels, s.aug_key, s.noise,
                                                 s.mix, s.counter, s.thresholds, s.guard)
        self._optimize(loss, keep)
        self._account(self.indices, self.labels, per_sample, keep, logits)


class FrozenFeatures(_Runner):
    """The frozen phase's no-grad backbone pass over a chunk of `batches` batches (padded when short),
    with each batch's MixUp/CutMix, into static feature buffers the head steps read."""

    name = "frozen features"

    def __init__(self, ctx: StepContext, batch_size: int, batches: int, image_shape: tuple):
        super().__init__(ctx)
        n, self.batch_size, self.batches = batch_size * batches, batch_size, batches
        self.images = _static_images(n, image_shape, ctx.device)
        self.indices = torch.zeros(n, dtype=torch.int64, device=ctx.device)
        self.labels = torch.zeros_like(self.indices)
        self.labels_b = torch.zeros_like(self.indices)
        self.lam = torch.ones(batches, device=ctx.device)
        self.feats: Tensor | None = None  # (n, F, h, w) backbone features

    def __call__(self, chunk: list) -> None:
        """chunk: 1..batches Batch objects; rows past them keep their old contents (never trained on)."""
        for i, batch in enumerate(chunk):
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            self.images[rows].copy_(batch.images)
            self.indices[rows].copy_(batch.indices)
            self.labels[rows].copy_(batch.labels)
        self.run()

    def _inputs(self):
        s = self.ctx.state
        return s.aug_key, s.noise, s.mix, s.counter

    def forward(self, images, indices, labels, key, noise, mix, counter):
        c = self.ctx
        x = c.augment(images, indices, key, noise)
        labels_b, lams = labels, torch.ones(self.batches, device=c.device)
        if mix is not None:  # each batch mixes within itself, with the draw of its own step
            parts = [mixing.mix_rows(x[i * self.batch_size:(i + 1) * self.batch_size],
                                     labels[i * self.batch_size:(i + 1) * self.batch_size],
                                     _row(mix, (counter + i).clamp(max=len(mix) - 1)))
                     for i in range(self.batches)]  # clamped: a short last chunk's padding slots
            x = torch.cat([p[0] for p in parts])
            labels_b, lams = torch.cat([p[1] for p in parts]), torch.stack([p[2] for p in parts])
        with torch.no_grad(), c.precision.autocast(c.device):
            feats = c.model.features(x)
        return feats, labels_b, lams

    def body(self, forward: Callable) -> None:
        with torch.no_grad():
            feats, labels_b, lams = forward(self.images, self.indices, self.labels, *self._inputs())
            if self.feats is None:  # allocated by the first (never a captured) call, then reused
                self.feats = torch.empty_like(feats)
            self.feats.copy_(feats)
            self.labels_b.copy_(labels_b)
            self.lam.copy_(lams)


class HeadStep(_Runner):
    """One optimizer step of the head on a batch's slice of the frozen features."""

    name = "head step"

    def __init__(self, ctx: StepContext, net: torch.nn.Module, features: FrozenFeatures):
        super().__init__(ctx)
        self.net, self.source = net, features  # the head, or its DDP wrapper
        b = features.batch_size
        self.feats: Tensor | None = None
        self.indices = torch.zeros(b, dtype=torch.int64, device=ctx.device)
        self.labels, self.labels_b = torch.zeros_like(self.indices), torch.zeros_like(self.indices)
        self.lam = torch.ones((), device=ctx.device)

    def __call__(self, slot: int) -> None:
        src, b = self.source, self.source.batch_size
        rows = slice(slot * b, (slot + 1) * b)
        if self.feats is None:
            self.feats = torch.empty_like(src.feats[rows])
        self.feats.copy_(src.feats[rows])
        self.indices.copy_(src.indices[rows])
        self.labels.copy_(src.labels[rows])
        self.labels_b.copy_(src.labels_b[rows])
        self.lam.copy_(src.lam[slot])
        self.run()

    def forward(self, feats, labels, labels_b, lam, thresholds, guard):
        c = self.ctx
        with c.precision.autocast(c.device):
            logits = self.net(feats)
        mixed = c.state.mix is not None
        out = self._loss(logits, labels, labels_b if mixed else None, lam if mixed else 1.0, thresholds, guard)
        return out.loss, out.per_sample, out.keep, logits.detach()

    def body(self, forward: Callable) -> None:
        s = self.ctx.state
        loss, per_sample, keep, logits = forward(self.feats, self.labels, self.labels_b, self.lam,
                                                 s.thresholds, s.guard)
        self._optimize(loss, keep)
        self._account(self.indices, self.labels, per_sample, keep, logits)
