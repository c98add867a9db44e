"""The schedule as data: phases, which parameters train, the lr curve and the threshold sequence."""

import math

import pytest

from fastcifar.config import build_config
from fastcifar.schedule import build_schedule


def paper_schedule(**overrides):
    return build_schedule(build_config("paper", overrides))


def test_paper_phases_cross_at_15_and_25():
    s = paper_schedule()
    assert [(p.name, p.first_epoch, p.last_epoch) for p in s.phases] == [
        ("head", 0, 14), ("full", 15, 24), ("full+filter", 25, 99)]
    assert not s.phase(14).train_backbone and s.phase(15).train_backbone
    assert not s.phase(24).filtering and s.phase(25).filtering
    assert s.boundaries() == [15, 25]
    with pytest.raises(IndexError):
        s.phase(100)


def test_threshold_sequence_matches_paper():
    s = paper_schedule()
    assert math.isinf(s.threshold(24))
    assert s.threshold(25) == pytest.approx(2.0)
    assert s.threshold(26) == pytest.approx(2.0 * 0.995)
    assert s.threshold(50) == pytest.approx(2.0 * 0.995 ** 25)  # about 1.765
    assert 1.76 < s.threshold(50) < 1.77
    thresholds = [s.threshold(e) for e in range(25, 100)]
    assert all(a > b for a, b in zip(thresholds, thresholds[1:]))


def test_filter_disabled_means_no_filter_phase():
    s = paper_schedule(**{"filter.enabled": "false"})
    assert [p.name for p in s.phases] == ["head", "full"]
    assert all(math.isinf(s.threshold(e)) for e in range(100))


def test_lr_warms_up_linearly_then_follows_cosine_to_zero():
    s = paper_schedule()
    steps = 500
    assert s.lr(0, 0, steps) == pytest.approx(1e-3 / (5 * steps))
    assert s.lr(2, 250, steps) == pytest.approx(1e-3 * 2.5 / 5 + 1e-3 / (5 * steps))
    assert s.lr(5, 0, steps) == pytest.approx(1e-3)  # peak at the end of warm-up
    assert s.lr(52, 250, steps) == pytest.approx(0.5e-3)  # half-way through the cosine
    assert s.lr(99, steps - 1, steps) < 1e-8
    curve = [s.lr(e, i, steps) for e in range(100) for i in range(0, steps, 50)]
    peak = curve.index(max(curve))
    assert all(a <= b for a, b in zip(curve[:peak], curve[1:peak + 1]))
    assert all(a >= b for a, b in zip(curve[peak:], curve[peak + 1:]))


def test_lr_uses_fractional_epochs_so_short_epochs_follow_the_same_curve():
    s = paper_schedule()
    assert s.lr(40, 100, 200) == pytest.approx(s.lr(40, 250, 500))


def test_smoke_preset_crosses_every_boundary():
    s = build_schedule(build_config("smoke"))
    names = [p.name for p in s.phases]
    assert names == ["head", "full", "full+filter"]
    assert s.phases[-1].last_epoch >= s.phases[-1].first_epoch + 1  # at least two filtering epochs
    assert s.warmup_epochs < s.epochs


def test_freeze_longer_than_filter_start_gives_head_filter_phase():
    s = paper_schedule(**{"train.freeze_epochs": "30"})
    assert [p.name for p in s.phases] == ["head", "head+filter", "full+filter"]


def test_short_run_may_stay_frozen():
    s = paper_schedule(**{"train.epochs": "3"})
    assert [p.name for p in s.phases] == ["head"] and s.phase(2).last_epoch == 2
