"""The paper's pipeline as its authors ran it, timed one epoch per phase beside ours, and projected.

Paper-equivalent pipeline: a Dataset that hands out PIL images (as torchvision's CIFAR100 does)
through per-image torchvision v2 transforms (random crop 32 with padding 4, horizontal flip,
RandAugment(2, 9), ToImage/ToDtype, Normalize, RandomErasing), a DataLoader at batch 100 with
worker processes started every epoch, the same timm model in NCHW, eager, fp16 autocast with a
GradScaler on CUDA (fp32 on the CPU), no torch.compile, the backend flags the trainer sets
(fastcifar.backend.setup_backend: cuDNN autotuning on CUDA); per-sample cross-entropy with the
small-loss mask, SGD with momentum, and the running loss read with `.item()` every step, as a
typical training loop logs it. Every epoch ends with a pass over the test set at batch 500.

Ours: `fastcifar.engine.Engine` as `python -m fastcifar.train` drives it, on the loaders given.
Both are timed for one training epoch with the backbone frozen ("head"), one with everything
training ("full") and one evaluation pass ("eval"); the filtering phase costs what "full" costs
in both pipelines (the mask is per batch), so a schedule is projected from these three.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backend import setup_backend
from ..config import AugmentConfig, Config, ModelConfig
from ..model import build_model, set_backbone_trainable
from ..schedule import Schedule


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds of one pass of each kind, and the images each pass processed."""

    head: float  # a training epoch with the backbone frozen
    full: float  # a training epoch with everything training
    eval: float  # a pass over the test set
    head_images: int
    full_images: int
    eval_images: int
    note: str = ""

    def epoch(self, train_backbone: bool) -> float:
        """A schedule epoch: training (head or full) plus the evaluation after it."""
        return (self.full if train_backbone else self.head) + self.eval

    def as_dict(self) -> dict:
        out = asdict(self)
        for k in ("head", "full", "eval"):
            out[f"{k}_images_per_s"] = getattr(self, f"{k}_images") / getattr(self, k)
        return out


def project_schedule(times: PhaseTimes, schedule: Schedule) -> float:
    """Seconds for every epoch of `schedule` at these per-epoch costs (a projection, not a measurement)."""
    return sum(times.epoch(schedule.phase(e).train_backbone) for e in range(schedule.epochs))


def compare(paper: PhaseTimes, ours: PhaseTimes, schedule: Schedule) -> dict:
    """Speedups per pass and for the projected schedule (paper seconds / our seconds)."""
    p, o = project_schedule(paper, schedule), project_schedule(ours, schedule)
    return {
        "paper": paper.as_dict(), "ours": ours.as_dict(),
        "speedup": {k: getattr(paper, k) / getattr(ours, k) for k in ("head", "full", "eval")} | {"schedule": p / o},
        "paper_schedule_s_projected": p, "ours_schedule_s_projected": o, "epochs": schedule.epochs,
    }


# ---- the paper's pipeline ----


class PilArrays(torch.utils.data.Dataset):
    """(N, H, W, 3) uint8 images and labels served one PIL image at a time through `transform`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def paper_transforms(cfg: AugmentConfig, train: bool):
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    if not train:
        return v2.Compose(tail)
    size = cfg.image_size
    head = [v2.RandomCrop(size, padding=cfg.crop_padding), v2.RandomHorizontalFlip(),
            v2.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude)]
    return v2.Compose(head + tail + [v2.RandomErasing(p=cfg.erasing_p)])


def default_workers(device: torch.device) -> int:
    """DataLoader workers: none on the CPU (the benchmark is small there), up to 8 on a GPU host."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


class PaperPipeline:
    """The paper's training and evaluation loops, eager, on (N, H, W, 3) uint8 arrays."""

    def __init__(self, train_images, train_labels, test_images, test_labels, cfg: Config,
                 device: torch.device, num_workers: int | None = None):
        self.cfg, self.device = cfg, device
        setup_backend(device)  # the trainer's flags: the pipelines differ, not cuDNN's algorithm choice
        self.num_workers = default_workers(device) if num_workers is None else num_workers
        model_cfg = ModelConfig(**{**asdict(cfg.model), "channels_last": False, "compile": "off"})
        self.model = build_model(model_cfg).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.amp = device.type == "cuda"  # fp16 autocast + GradScaler, as the paper
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        self.train_set = PilArrays(train_images, train_labels, paper_transforms(cfg.augment, True))
        self.test_set = PilArrays(test_images, test_labels, paper_transforms(cfg.augment, False))

    def _loader(self, dataset, batch_size: int, train: bool):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train,
                                           num_workers=self.num_workers, pin_memory=self.device.type == "cuda")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, threshold: float) -> float:
        """One optimiser step on a (B, 3, H, W) float batch; returns the loss (a host sync, as logged)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self._autocast():
            losses = F.cross_entropy(self.model(x), y, reduction="none")
        keep = losses < threshold
        loss = (losses * keep).sum() / keep.sum().clamp(min=1)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def train_epoch(self, train_backbone: bool, max_steps: int | None = None) -> tuple[float, int]:
        """(seconds, images) of one training epoch (or its first max_steps steps), workers included."""
        self.model.train()
        set_backbone_trainable(self.model, train_backbone)
        self._warm(train_backbone)
        loader = self._loader(self.train_set, self.cfg.train.batch_size, train=True)
        sync(self.device)
        t0, images = time.perf_counter(), 0
        for x, y in itertools.islice(loader, max_steps):
            self.train_step(x, y, math.inf)
            images += len(y)
        sync(self.device)
        return time.perf_counter() - t0, images

    @torch.no_grad()
    def eval_epoch(self, max_steps: int | None = None) -> tuple[float, int]:
        """(seconds, images) of one pass over the test set (or its first max_steps batches), workers included."""
        self.model.eval()
        size, b = self.cfg.augment.image_size, self.cfg.train.test_batch_size
        with self._autocast():  # untimed: cuDNN picks its algorithms for the evaluation batch here
            self.model(torch.randn(b, 3, size, size, device=self.device))
        loader = self._loader(self.test_set, self.cfg.train.test_batch_size, train=False)
        sync(self.device)
        t0, images = time.perf_counter(), 0
        for x, y in itertools.islice(loader, max_steps):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                self.model(x)  # timed only: no per-batch accuracy read-back to slow the baseline
            images += len(y)
        sync(self.device)
        return time.perf_counter() - t0, images

    def _warm(self, train_backbone: bool, steps: int = 3) -> None:
        """A few untimed steps on a random batch (library initialisation, cuDNN/cuBLAS handles)."""
        size, b = self.cfg.augment.image_size, self.cfg.train.batch_size
        x, y = torch.randn(b, 3, size, size), torch.randint(0, self.cfg.model.num_classes, (b,))
        for _ in range(steps):
            self.train_step(x, y, math.inf)


def time_paper(train_images, train_labels, test_images, test_labels, cfg: Config, device: torch.device,
               num_workers: int | None = None, max_steps: int | None = None) -> PhaseTimes:
    """Time the paper's pipeline: one head epoch, one full epoch, one evaluation pass.

    max_steps: time only that many batches of each and scale up to the whole pass (noted).
    """
    pipe = PaperPipeline(train_images, train_labels, test_images, test_labels, cfg, device, num_workers)
    head_s, head_n = pipe.train_epoch(False, max_steps)
    full_s, full_n = pipe.train_epoch(True, max_steps)
    eval_s, eval_n = pipe.eval_epoch(max_steps)
    note = f"DataLoader with {pipe.num_workers} workers"
    if max_steps is not None:  # scale partial passes to whole ones
        n_train = len(train_labels) // cfg.train.batch_size * cfg.train.batch_size
        head_s, full_s = head_s * n_train / head_n, full_s * n_train / full_n
        eval_s *= len(test_labels) / eval_n
        head_n, full_n, eval_n = n_train, n_train, len(test_labels)
        note += f"; projected from the first {max_steps} batches of each pass"
    return PhaseTimes(head_s, full_s, eval_s, head_n, full_n, eval_n, note)


# ---- ours ----


def time_ours(cfg: Config, loaders, device: torch.device, run_dir: Path, note: str = "") -> PhaseTimes:
    """Time fastcifar's Engine on `loaders` (fastcifar.train.Loaders): head epoch, full epoch, eval.

    Each pass is first run on a few batches untimed (torch.compile, Triton, CUDA graphs warm up).
    """
    from ..distributed import DistInfo
    from ..train import Run

    run = Run(cfg, run_dir, DistInfo(0, 1, 0), device, loaders)
    engine, train = run.engine, run.loaders.train
    steps = train.num_batches()
    warm_batches = 2 * max(cfg.train.frozen_chunk // cfg.train.batch_size, 1)
    out = {}
    for name, epoch in (("head", 0), ("full", cfg.train.freeze_epochs)):
        engine.train_epoch(epoch, itertools.islice(train.epoch(epoch), warm_batches), steps)
        sync(device)
        t0 = time.perf_counter()
        rec = engine.train_epoch(epoch, train.epoch(epoch), steps)
        sync(device)
        out[name] = (time.perf_counter() - t0, rec["steps"] * cfg.train.batch_size)
    engine.evaluate(itertools.islice(run.loaders.test.epoch(0), 2))
    sync(device)
    t0 = time.perf_counter()
    engine.evaluate(run.loaders.test.epoch(0))
    sync(device)
    out["eval"] = (time.perf_counter() - t0, run.loaders.test.num_samples)
    return PhaseTimes(out["head"][0], out["full"][0], out["eval"][0], out["head"][1], out["full"][1],
                      out["eval"][1], note or f"fastcifar Engine, model.compile={cfg.model.compile}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
