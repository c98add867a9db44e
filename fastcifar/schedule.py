"""The training schedule as data: phases by epoch, the lr curve and the filter threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config


@dataclass(frozen=True)
class Phase:
    name: str  # "head", "full", "head+filter" or "full+filter"
    first_epoch: int
    last_epoch: int  # inclusive
    train_backbone: bool  # False: only the head trains, the backbone is frozen
    filtering: bool  # drop samples whose loss is not below the threshold


@dataclass(frozen=True)
class Schedule:
    """Everything that changes with time. The loop asks; it never tests epoch numbers itself."""

    phases: tuple[Phase, ...]
    epochs: int
    peak_lr: float  # per optimiser step
    warmup_epochs: int
    threshold0: float  # nats, at the first filtering epoch
    threshold_decay: float  # multiplier per epoch after that
    filter_start: int  # first filtering epoch, or `epochs` when filtering is off

    def phase(self, epoch: int) -> Phase:
        for p in self.phases:
            if p.first_epoch <= epoch <= p.last_epoch:
                return p
        raise IndexError(f"epoch {epoch} is outside the schedule (0..{self.epochs - 1})")

    def lr(self, epoch: int, step: int, steps_in_epoch: int) -> float:
        """Linear warm-up over `warmup_epochs`, then cosine to 0 at the end of the last epoch.

        Time is measured in fractional epochs, so a shorter epoch (epoch-level filtering trains on a
        subset) still follows the same curve.
        """
        t = epoch + step / max(steps_in_epoch, 1)
        if t < self.warmup_epochs:
            return self.peak_lr * (t + 1 / max(steps_in_epoch, 1)) / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-9)
        return self.peak_lr * 0.5 * (1 + math.cos(math.pi * (t - self.warmup_epochs) / span))

    def threshold(self, epoch: int) -> float:
        """Loss threshold in nats for `epoch`; inf where the phase does not filter."""
        if not self.phase(epoch).filtering:
            return math.inf
        return self.threshold0 * self.threshold_decay ** (epoch - self.filter_start)

    def boundaries(self) -> list[int]:
        """Epochs at which a new phase begins (after epoch 0)."""
        return [p.first_epoch for p in self.phases[1:]]


def build_schedule(cfg: Config) -> Schedule:
    t, f = cfg.train, cfg.filter
    filter_start = f.start_epoch if f.enabled else t.epochs
    cuts = sorted({0, t.freeze_epochs, filter_start} & set(range(t.epochs)))
    phases = []
    for first, nxt in zip(cuts, cuts[1:] + [t.epochs]):
        backbone = first >= t.freeze_epochs
        filtering = first >= filter_start
        name = ("full" if backbone else "head") + ("+filter" if filtering else "")
        phases.append(Phase(name, first, nxt - 1, backbone, filtering))
    return Schedule(
        phases=tuple(phases),
        epochs=t.epochs,
        peak_lr=cfg.optim.lr,
        warmup_epochs=cfg.optim.warmup_epochs,
        threshold0=f.threshold,
        threshold_decay=f.decay,
        filter_start=filter_start,
    )
