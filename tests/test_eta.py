"""The remaining-time estimate per phase and the run's time across resumes."""

import pytest

from fastcifar.config import build_config
from fastcifar.eta import RunClock, seconds_before
from fastcifar.schedule import build_schedule


def schedule():
    """head 0-1, full 2-5, full+filter 6-9."""
    cfg = build_config("paper", {"train.epochs": "10", "train.freeze_epochs": "2", "filter.start_epoch": "6"})
    return build_schedule(cfg)


def minutes(line: str) -> float:
    return float(line.split(" min")[0].split()[-1])


def test_estimate_is_made_per_phase_after_the_first_epoch_of_each():
    clock = RunClock(schedule())
    first = clock.epoch_done(0, 6.0)  # a cheap frozen epoch: the full phases are not measured yet
    assert first.startswith("  estimate: at least") and "full 4 x >=6.0 s" in first and "not reached yet" in first
    assert minutes(first) == pytest.approx(round(9 * 6.0 / 60, 1))
    assert clock.epoch_done(1, 6.0) is None  # not the first epoch of its phase
    second = clock.epoch_done(2, 60.0)  # the first unfrozen epoch: ten times dearer
    assert "at least" in second and minutes(second) == pytest.approx(round((3 + 4) * 60.0 / 60, 1))
    assert clock.epoch_done(3, 30.0) is None
    third = clock.epoch_done(6, 36.0)  # every remaining phase measured now
    assert third.startswith("  estimate: about") and "full+filter 3 x 36.0 s" in third and "not reached" not in third
    assert minutes(third) == pytest.approx(round(3 * 36.0 / 60, 1))
    assert clock.epoch_done(9, 1.0) is None  # nothing left


def test_a_resumed_run_estimates_from_its_own_epochs_and_keeps_the_earlier_time():
    clock = RunClock(schedule(), already=100.0)
    line = clock.epoch_done(4, 50.0)  # full measured in this attempt; full+filter not yet
    assert "full 1 x 50.0 s" in line and "full+filter 4 x >=50.0 s" in line
    assert clock.elapsed() >= 100.0


def test_seconds_before_reads_the_last_kept_epoch_or_sums_older_logs():
    assert seconds_before([]) == 0.0
    assert seconds_before([{"epoch": 0, "seconds": 2.0, "elapsed_seconds": 2.5},
                           {"epoch": 1, "seconds": 3.0, "elapsed_seconds": 5.75}]) == 5.75
    assert seconds_before([{"epoch": 0, "seconds": 2.0}, {"epoch": 1, "seconds": 3.0}]) == 5.0
