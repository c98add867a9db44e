"""The epoch loop: phase set-up, the per-epoch device state, the steps of an epoch, evaluation."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import evaluate as ev
from . import mixing
from .augment import TrainAugment, train_key
from .config import Config
from .distributed import DistInfo, all_reduce_sum
from .filtering import median_threshold
from .graphs import CompileStats, CudaGraphCapture, Mode, ModeLadder, inductor_cache_dir, plan_modes
from .model import NoisyLabelNet, Precision
from .optim import PhaseSGD
from .schedule import Phase, Schedule
from .select import build_selector
from .stats import EpochStats
from .step import FrozenFeatures, FullStep, HeadStep, StepContext, StepState


class Engine:
    """Owns the steps (per phase), their device state and the mode they run in; train.py drives it."""

    def __init__(self, cfg: Config, model: NoisyLabelNet, optimizer: PhaseSGD, scaler, precision: Precision,
                 device: torch.device, dist: DistInfo, schedule: Schedule, noisy: torch.Tensor,
                 known: torch.Tensor, *, num_samples: int, image_shape: tuple, max_steps: int,
                 modes: list[Mode] | None = None, capture=None, log: Callable[[str], None] | None = None):
        """noisy, known: (num_samples,) bool CPU tensors (wrong label / clean label known) for the
        noise-detection metrics. image_shape: (H, W, 3) of the data; max_steps: the most optimizer
        steps an epoch can have (sizes the lr and mixing tables). modes: the ladder to use instead of
        the configuration's (benchmarks); capture: a CUDA-graph capture stand-in (tests)."""
        self.cfg, self.model, self.schedule, self.dist = cfg, model, schedule, dist
        self.noisy, self.known, self.image_shape = noisy, known, tuple(image_shape)
        if modes is None:
            modes, self.mode_notes = plan_modes(cfg.model, device, distributed=dist.enabled,
                                                scaler=precision.use_scaler)
        else:
            self.mode_notes = []
        ladder = ModeLadder(modes, log)
        graph_safe = modes[0].compiles  # compiled or captured: no host reads in the augmentation
        h, w, _ = self.image_shape
        a = cfg.augment
        aug = TrainAugment(a, h, w, device, graph_safe=graph_safe)
        f32 = dict(dtype=torch.float32, device=device)
        state = StepState(
            lr_table=torch.zeros(max(max_steps, 1), **f32), counter=torch.zeros((), dtype=torch.int64, device=device),
            thresholds=torch.full((cfg.model.num_classes,), math.inf, **f32), guard=torch.full((), -math.inf, **f32),
            aug_key=torch.zeros((), dtype=torch.int64, device=device),
            noise=torch.zeros(aug.noise_length, **f32) if aug.uses_noise else None,
            mix=torch.zeros(max(max_steps, 1), mixing.ROW_WIDTH, dtype=torch.float64, device=device)
            if mixing.mixing_enabled(a) else None)
        self.selector = build_selector(cfg.filter, cfg.model.num_classes, device)
        self.ctx = StepContext(cfg, model, optimizer, scaler, precision, device, dist, aug, state,
                               EpochStats(num_samples, device), ladder, CompileStats(), self.selector,
                               capture or (CudaGraphCapture(device) if modes[0].name == "graphs" else None))
        self.eval_logits = ev.EvalLogits(self.ctx, cfg.train.test_batch_size, self.image_shape)
        self._phase_key: tuple | None = None
        self.full = self.features = self.head = None

    @property
    def mode(self) -> str:
        """The mode every function that has run is in, or "mixed" (see function_modes)."""
        return self.ctx.ladder.common_mode()

    def function_modes(self) -> dict[str, str]:
        """{function: the mode it runs in} for the functions that have run ("full step", "frozen
        features", "head step", "evaluation")."""
        return self.ctx.ladder.function_modes()

    # -- phase set-up ---------------------------------------------------------------------------
    def enter_phase(self, phase: Phase) -> None:
        """Freeze or unfreeze: the optimizer's parameters, the DDP wrappers, the phase's steps."""
        key = (phase.train_backbone,)
        if key == self._phase_key:
            return
        self._phase_key = key
        c, t = self.ctx, self.cfg.train
        self.full = self.features = self.head = None  # a stale DDP keeps hooks on the parameters
        ddp_args = dict(device_ids=[c.device.index]) if c.device.type == "cuda" else {}
        if phase.train_backbone:
            c.optimizer.enter(self.model.parameters())
            net = DDP(self.model, **ddp_args) if self.dist.enabled else self.model
            self.full = FullStep(c, net, t.batch_size // self.dist.world_size, self.image_shape)
        else:
            # Frozen: no-grad backbone passes over chunks of batches; only the head trains (and syncs).
            c.optimizer.enter(self.model.head.parameters())
            head = DDP(self.model.head, **ddp_args) if self.dist.enabled else self.model.head
            per_chunk = max(t.frozen_chunk // t.batch_size, 1)
            self.features = FrozenFeatures(c, t.batch_size // self.dist.world_size, per_chunk, self.image_shape)
            self.head = HeadStep(c, head, self.features)

    def _begin_epoch(self, epoch: int, steps: int, threshold: float) -> list[float]:
        """Write the epoch's schedule into the step state (in place, between steps); returns the lrs."""
        s, cfg = self.ctx.state, self.cfg
        if steps > len(s.lr_table):
            raise ValueError(f"an epoch of {steps} steps is longer than the {len(s.lr_table)} the engine was made for")
        lrs = [self.schedule.lr(epoch, step, steps) for step in range(steps)]
        s.lr_table[:steps].copy_(torch.tensor(lrs, dtype=torch.float32))
        s.counter.zero_()
        if math.isinf(threshold) or self.selector.kind == "threshold":
            s.thresholds.fill_(threshold)
        else:  # read from the previous epoch's losses at its end (inf for a class not seen yet)
            s.thresholds.copy_(self.selector.last)
        s.guard.fill_(-math.inf)
        s.aug_key.fill_(train_key(cfg.run.seed, epoch))
        if s.noise is not None:
            s.noise.copy_(self.ctx.augment.noise(cfg.run.seed, epoch, s.noise.device))
        if s.mix is not None:
            h, w, _ = self.image_shape
            table = mixing.mix_table(cfg.augment, seed=cfg.run.seed, epoch=epoch, steps=steps, height=h, width=w)
            s.mix[:steps].copy_(table)
        self.ctx.stats.reset()
        return lrs

    # -- training -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, batches: Iterable, steps_in_epoch: int, batch_filtering: bool = True,
                    progress: Callable[[], None] = lambda: None) -> dict:
        """One epoch of at most `steps_in_epoch` optimizer steps; its training metrics as plain numbers.

        batch_filtering=False trains on every sample given (epoch-level filtering chose them).
        """
        phase = self.schedule.phase(epoch)
        self.enter_phase(phase)
        self.model.train()
        # Frozen means: the backbone in eval mode (fixed norm statistics, no drop-path), run without
        # grad, and an optimizer over the head only. Its parameters keep requires_grad, so no compiled
        # function sees a flag change (a guard, hence a recompile) at the unfreeze.
        self.model.backbone.train(phase.train_backbone)
        filtering = phase.filtering and batch_filtering
        threshold = self.schedule.threshold(epoch) if filtering else math.inf
        lrs = self._begin_epoch(epoch, steps_in_epoch, threshold)
        run = self._full_steps if phase.train_backbone else self._frozen_steps
        run(batches, steps_in_epoch, progress)
        out = self.ctx.stats.reduce(self.dist, self.noisy, self.known, filtering)
        out.update(lr=lrs[-1] if lrs else self.schedule.lr(epoch, 0, 1), threshold=self._logged_threshold(filtering))
        if self.cfg.filter.mode == "batch":  # the next epoch's class thresholds and noise estimate
            base = torch.full((), threshold, device=self.ctx.device)
            self.selector.refresh(torch.empty_like(self.ctx.state.thresholds), base,
                                  lambda t: all_reduce_sum(t, self.dist))
            out["noise_rate_est"] = self.selector.noise_rate_value()
        return out

    def _logged_threshold(self, filtering: bool) -> float | None:
        """The paper's threshold, or the median class threshold; None while not filtering (no inf in JSON)."""
        return median_threshold(self.ctx.state.thresholds) if filtering else None

    def _full_steps(self, batches: Iterable, steps: int, progress: Callable[[], None]) -> None:
        for step, batch in enumerate(batches):
            if step >= steps:
                break
            self.full(batch)
            progress()

    def _frozen_steps(self, batches: Iterable, steps: int, progress: Callable[[], None]) -> None:
        chunk: list = []
        for step, batch in enumerate(batches):
            if step >= steps:
                break
            chunk.append(batch)
            if len(chunk) == self.features.batches:
                self._frozen_chunk(chunk, progress)
                chunk = []
        if chunk:
            self._frozen_chunk(chunk, progress)

    def _frozen_chunk(self, chunk: list, progress: Callable[[], None]) -> None:
        self.features(chunk)
        for slot in range(len(chunk)):
            self.head(slot)
            progress()

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, batches: Iterable, tta: bool = False) -> dict:
        """Accuracy and mean cross-entropy on the batches' labels (see fastcifar.evaluate)."""
        return ev.evaluate(self.eval_logits, batches, tta)

    def score(self, batches: Iterable, num_samples: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax (N, C) and per-sample CE (N,) of every sample in index order (see fastcifar.evaluate)."""
        return ev.score(self.eval_logits, batches, num_samples, num_classes)

    # -- what ran -------------------------------------------------------------------------------
    def report(self) -> dict:
        """The step mode that ran, its fall-backs, and what compilation cost (for summary.json)."""
        c = self.ctx
        return {"step_mode": c.ladder.describe(), "function_modes": self.function_modes(),
                "mode_fallbacks": list(c.ladder.fallbacks),
                "mode_notes": list(self.mode_notes), "compile_graphs": dict(c.compile_stats.graphs),
                "compile_seconds": round(c.compile_stats.seconds, 2),
                "inductor_cache": inductor_cache_dir() if c.compile_stats.graphs else None}

    def compile_note(self, since: dict) -> str | None:
        """A console line naming the graphs compiled since `since` (a `compile_graphs` dict) and the
        seconds compilation has taken so far; None when nothing new was compiled."""
        stats = self.ctx.compile_stats
        new = {k: v - since.get(k, 0) for k, v in stats.graphs.items() if v > since.get(k, 0)}
        if not new:
            return None
        modes = self.function_modes()
        ran = ", ".join(f"{name} {modes[name]}" for name in new if name in modes)
        return (f"  compiled: {', '.join(new)} ({sum(new.values())} graph(s)); {stats.seconds:.1f} s of "
                f"compilation so far (cache: {inductor_cache_dir()}); running: {ran}")
