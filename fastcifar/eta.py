"""A run's wall time across resumes, and the remaining-time estimate, made per phase."""

from __future__ import annotations

import time

from .schedule import Schedule


def seconds_before(records: list[dict]) -> float:
    """Training time already spent on the epochs in `records` (metrics.jsonl after a resume's truncation).

    Each record carries `elapsed_seconds`, the run's training time at its end, earlier attempts
    included; older logs lack it, and then the epochs' own `seconds` are summed.
    """
    if not records:
        return 0.0
    last = records[-1].get("elapsed_seconds")
    return float(last) if last is not None else float(sum(r.get("seconds") or 0.0 for r in records))


class RunClock:
    """Wall time of the training loop, summed across resumes, and its estimate of what is left.

    An epoch's cost depends on its phase (a frozen backbone is far cheaper than a full one), so the
    estimate uses each phase's own latest measured epoch and is printed after the first epoch of
    every phase; phases not reached yet are counted at the slowest rate measured so far, and the
    line then says "at least".
    """

    def __init__(self, schedule: Schedule, already: float = 0.0):
        self.schedule, self.already = schedule, already
        self.per_epoch: dict[str, float] = {}  # phase name -> seconds of its latest epoch
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training so far, earlier attempts included (up to the epoch resumed from)."""
        return self.already + time.perf_counter() - self.started

    def epoch_done(self, epoch: int, seconds: float) -> str | None:
        """Record an epoch's seconds; after the first epoch of a phase (in this attempt), the estimate line."""
        name = self.schedule.phase(epoch).name
        first = name not in self.per_epoch
        self.per_epoch[name] = seconds
        if not first:
            return None
        return self.estimate(epoch)

    def estimate(self, epoch: int) -> str | None:
        """One line: the remaining epochs after `epoch`, priced per phase, and how that was made."""
        left = range(epoch + 1, self.schedule.epochs)
        if not left:
            return None
        slowest = max(self.per_epoch.values())
        total, guessed, parts = 0.0, False, []
        for p in self.schedule.phases:
            n = len(set(range(p.first_epoch, p.last_epoch + 1)) & set(left))
            if not n:
                continue
            rate = self.per_epoch.get(p.name)
            guessed |= rate is None
            total += n * (slowest if rate is None else rate)
            parts.append(f"{p.name} {n} x {'>=' if rate is None else ''}{slowest if rate is None else rate:.1f} s")
        how = "per phase, from its latest epoch; a phase's first epoch includes compilation"
        if guessed:
            how += "; '>=': not reached yet, counted like the slowest phase so far, revised after its first epoch"
        return (f"  estimate: {'at least' if guessed else 'about'} {total / 60:.1f} min for the remaining "
                f"{len(left)} epochs [{', '.join(parts)}] ({how})")
