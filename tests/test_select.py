"""Sample selectors on synthetic losses with known answers: quantiles, mixtures, noise rate, graph safety."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastcifar.config import ConfigError, FilterConfig, build_config, parse_overrides
from fastcifar.select import SELECTORS, Selector, build_selector

SMALL = dict(bins=256, em_iters=32, grid=256)  # fast on a CPU; resolution still well below 1%
BASE = torch.tensor(2.0)


def noisy_probs(num_classes, per_class, rate, kind, confusion=0.0, seed=0):
    """Softmax of simulated logits: the true class gets a margin of 3..9 nats over N(0, 1) noise;
    with `pairflip` the flip partner shares `confusion` of it (the model learns the confusion).
    Returns per-sample CE on the given label (N,), probs (N, C), given labels (N,), noisy (N,)."""
    g = torch.Generator().manual_seed(seed)
    n = num_classes * per_class
    true = torch.arange(num_classes).repeat(per_class)
    noisy = torch.rand(n, generator=g) < rate
    if kind == "symmetric":
        other = (true + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    else:
        other = (true + 1) % num_classes
    given = torch.where(noisy, other, true)
    z = torch.randn(n, num_classes, generator=g)
    margin = 6.0 * (0.5 + torch.rand(n, generator=g))
    z[torch.arange(n), true] += margin
    if kind == "pairflip":
        z[torch.arange(n), (true + 1) % num_classes] += confusion * margin
    probs = z.softmax(1)
    return -probs[torch.arange(n), given].log(), probs, given, noisy


def two_modes(n_low, n_high, num_classes=3, seed=0):
    """Losses N(0.5, 0.1) (clean) and N(4, 0.4) (noisy) in every class; returns loss, labels, is_high."""
    g = torch.Generator().manual_seed(seed)
    low = 0.5 + 0.1 * torch.randn(num_classes * n_low, generator=g)
    high = 4.0 + 0.4 * torch.randn(num_classes * n_high, generator=g)
    labels = torch.cat([torch.arange(num_classes).repeat(n_low), torch.arange(num_classes).repeat(n_high)])
    is_high = torch.cat([torch.zeros(len(low), dtype=torch.bool), torch.ones(len(high), dtype=torch.bool)])
    return torch.cat([low, high]).clamp_min(0), labels, is_high


def observe_all(sel, loss, labels, probs=None, batch=64):
    for i in range(0, len(loss), batch):
        sel.observe(loss[i:i + batch], labels[i:i + batch], None if probs is None else probs[i:i + batch])


def refreshed(sel, base=BASE):
    thr = torch.zeros(sel.num_classes)
    sel.refresh(thr, base)
    return thr


def thresholds_in(mode, sel, loss, labels):
    """(C,) thresholds from `loss` the way `mode` (epoch | batch) reads them."""
    if mode == "epoch":
        return sel.from_losses(loss, labels, BASE)
    observe_all(sel, loss, labels)
    return refreshed(sel)


def selector(kind, num_classes, fraction=0.6, **overrides):
    """class_quantile with `fraction`; the others with the default (they reject a fraction)."""
    return Selector(kind, num_classes, "cpu", keep_fraction=fraction if kind == "class_quantile" else 0.0,
                    **{**SMALL, **overrides})


def kept_per_class(loss, labels, thr, num_classes):
    keep = (loss < thr[labels]).float()
    return torch.zeros(num_classes).scatter_add_(0, labels, keep)


def counts(labels, num_classes):
    return torch.zeros(num_classes).scatter_add_(0, labels, torch.ones(len(labels)))


# -- class_quantile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.6, 0.25, 1.0])
def test_class_quantile_is_exact_in_epoch_mode(fraction):
    g = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([7, 100, 33, 1, 250])])
    loss = torch.rand(len(labels), generator=g) * (labels + 1)  # a different scale per class
    sel = Selector("class_quantile", 5, "cpu", keep_fraction=fraction, **SMALL)
    thr = sel.from_losses(loss, labels, BASE)
    n = counts(labels, 5)
    expected = (fraction * n + 0.5).floor().clamp(min=1)
    assert torch.equal(kept_per_class(loss, labels, thr, 5), expected)


def test_class_quantile_histogram_is_within_one_bin():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (4000,), generator=g)
    loss = torch.distributions.Gamma(2.0, 1.0 + labels.float()).sample()  # skewed, class-dependent
    sel = Selector("class_quantile", 4, "cpu", keep_fraction=0.6, em_iters=4)  # default bins
    observe_all(sel, loss, labels)
    hist = sel.hist[:, :-1].clone()
    thr = refreshed(sel)
    n = counts(labels, 4)
    share = kept_per_class(loss, labels, thr, 4) / n
    # The threshold is the upper edge of the bin holding the quantile: never less, at most that bin more.
    bin_of_thr = torch.searchsorted(sel._edges, thr, right=False) - 1
    bin_share = hist.gather(1, bin_of_thr[:, None])[:, 0] / n
    assert (share >= 0.6 - 1e-6).all() and (share <= 0.6 + bin_share + 1e-6).all()
    assert (bin_share < 0.01).all()  # and the default resolution is fine: under 1% of a class per bin
    assert float(sel.hist.sum()) == 0  # refresh resets the statistics


def test_estimated_keep_fraction_follows_the_noise_rate():
    loss, probs, labels, noisy = noisy_probs(5, 400, 0.3, "symmetric", seed=3)
    sel = Selector("class_quantile", 5, "cpu", keep_fraction=0.0, **SMALL)
    thr = sel.from_losses(loss, labels, BASE, probs=probs)
    share = kept_per_class(loss, labels, thr, 5) / counts(labels, 5)
    true_clean = 1 - torch.zeros(5).scatter_add_(0, labels, noisy.float()) / counts(labels, 5)
    assert torch.allclose(share, true_clean, atol=0.04)
    dropped = loss >= thr[labels]
    assert (dropped & noisy).sum() / dropped.sum() > 0.9  # the dropped ones are the wrong labels


# -- gmm --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["epoch", "batch"])
def test_gmm_recovers_a_clear_two_mode_mixture_and_keeps_the_low_mode(mode):
    loss, labels, is_high = two_modes(700, 300)
    sel = selector("gmm", 3)
    thr = thresholds_in(mode, sel, loss, labels)
    lo, span = sel.norm[:, 0:1], sel.norm[:, 1:2]
    weights, means = sel.mixture[..., 0], lo + sel.mixture[..., 1] * span  # means back in nats
    assert torch.allclose(weights, torch.tensor([0.7, 0.3]).expand(3, 2), atol=0.02)
    assert torch.allclose(means, torch.tensor([0.5, 4.0]).expand(3, 2), atol=0.05)
    keep = loss < thr[labels]
    assert keep[~is_high].float().mean() > 0.999 and keep[is_high].float().mean() < 0.001
    assert ((thr > 1.0) & (thr < 3.5)).all()  # between the modes
    assert abs(float(sel.noise_rate()) - 0.3) < 0.03  # no probabilities: the mixture's weight


# -- the noise-rate estimate ------------------------------------------------------------------------
@pytest.mark.parametrize("rate, kind, confusion", [
    (0.4, "symmetric", 0.0), (0.2, "symmetric", 0.0), (0.4, "pairflip", 0.5), (0.0, "symmetric", 0.0)])
def test_noise_rate_estimate_on_known_mixtures(rate, kind, confusion):
    loss, probs, labels, noisy = noisy_probs(10, 300, rate, kind, confusion, seed=4)
    true = float(noisy.float().mean())
    sel = selector("threshold", 10, em_iters=8)  # probabilities given: the mixture is not used
    sel.from_losses(loss, labels, BASE, probs=probs)
    assert abs(float(sel.noise_rate()) - true) < 0.03
    per_class_true = torch.zeros(10).scatter_add_(0, labels, noisy.float()) / counts(labels, 10)
    assert (sel.class_noise - per_class_true).abs().max() < 0.06
    # Batch mode: the first epoch counts against plain argmax, the second against its thresholds.
    batch = selector("threshold", 10, em_iters=8)
    for _ in range(2):
        observe_all(batch, loss, labels, probs, batch=500)
        refreshed(batch)
        assert abs(float(batch.noise_rate()) - true) < 0.03


def test_noise_rate_is_nan_before_any_estimate():
    assert math.isnan(float(Selector("gmm", 3, "cpu", **SMALL).noise_rate()))


# -- degenerate inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["class_quantile", "gmm"])
@pytest.mark.parametrize("mode", ["epoch", "batch"])
def test_classes_with_no_samples_keep_everything(kind, mode):
    loss, labels, _ = two_modes(50, 20, num_classes=2)
    labels = labels * 2  # classes 0 and 2 observed; 1 and 3 never
    sel = selector(kind, 4)
    thr = thresholds_in(mode, sel, loss, labels)
    assert torch.isinf(thr[[1, 3]]).all() and torch.isfinite(thr[[0, 2]]).all()
    assert math.isfinite(float(sel.noise_rate()))


@pytest.mark.parametrize("mode", ["epoch", "batch"])
def test_all_equal_losses_and_a_single_sample_keep_everything(mode):
    loss = torch.cat([torch.full((40,), 1.25), torch.tensor([0.7])])
    labels = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(1, dtype=torch.long)])
    for kind in ("class_quantile", "gmm"):
        sel = selector(kind, 2, fraction=0.5)
        thr = thresholds_in(mode, sel, loss, labels)
        assert (loss < thr[labels]).all(), (kind, thr)
        assert float(sel.noise_rate()) == 0.0  # nothing separable: counted as clean


@pytest.mark.parametrize("kind", SELECTORS)
def test_non_finite_losses_are_counted_and_dropped_from_the_statistics(kind):
    loss, labels, _ = two_modes(200, 100, num_classes=2, seed=5)
    bad = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    bad_labels = torch.tensor([0, 1, 0, 2])  # class 2 has nothing but a NaN
    clean, dirty = selector(kind, 3), selector(kind, 3)
    observe_all(clean, loss, labels)
    observe_all(dirty, torch.cat([bad[:2], loss, bad[2:]]), torch.cat([bad_labels[:2], labels, bad_labels[2:]]))
    assert dirty.hist[:, -1].tolist() == [2.0, 1.0, 1.0]  # counted in the non-finite column
    assert torch.equal(dirty.hist[:, :-1], clean.hist[:, :-1])  # and nowhere else
    thr_clean, thr_dirty = refreshed(clean), refreshed(dirty)
    assert torch.equal(thr_dirty, thr_clean) and torch.equal(dirty.noise, clean.noise)
    exact = selector(kind, 3)
    thr = exact.from_losses(torch.cat([loss, bad]), torch.cat([labels, bad_labels]), BASE)
    assert torch.isfinite(exact.mixture).all() and math.isfinite(float(exact.noise_rate()))
    assert torch.equal(thr[:2], exact.from_losses(loss, labels, BASE)[:2])
    assert torch.isinf(exact.evidence(bad, bad_labels)).all()  # the most suspicious of all


# -- evidence and the threshold selector ------------------------------------------------------------
@pytest.mark.parametrize("kind", SELECTORS)
def test_evidence_is_positive_exactly_where_a_sample_is_dropped(kind):
    loss, labels, is_high = two_modes(300, 100, seed=6)
    sel = selector(kind, 3, fraction=0.7)
    thr = sel.from_losses(loss, labels, BASE)
    evidence = sel.evidence(loss, labels)
    assert torch.equal(evidence > 0, loss >= thr[labels])
    top = evidence.argsort(descending=True)[:300]
    assert is_high[top].float().mean() > 0.95  # the top of the ranking is the high-loss mode


def test_threshold_selector_copies_the_schedule_threshold_in_place():
    loss, labels, _ = two_modes(100, 30)
    sel = build_selector(FilterConfig(), 3, "cpu")
    observe_all(sel, loss, labels)
    thr = torch.zeros(3)
    ptr = thr.data_ptr()
    sel.refresh(thr, torch.tensor(1.77))
    assert thr.data_ptr() == ptr and torch.equal(thr, torch.full((3,), 1.77))
    sel.refresh(thr, torch.tensor(math.inf))  # a phase without filtering
    assert torch.isinf(thr).all()


def test_refresh_sums_statistics_across_processes():
    loss, probs, labels, _ = noisy_probs(4, 200, 0.4, "symmetric", seed=7)
    whole, rank0, rank1 = (Selector("class_quantile", 4, "cpu", **SMALL) for _ in range(3))
    observe_all(whole, loss, labels, probs)
    half = len(loss) // 2
    observe_all(rank0, loss[:half], labels[:half], probs[:half])
    observe_all(rank1, loss[half:], labels[half:], probs[half:])
    other = rank1.stats.clone()
    thr_whole, thr_rank0 = refreshed(whole), torch.zeros(4)
    rank0.refresh(thr_rank0, BASE, reduce_sum=lambda t: t.add_(other))
    assert torch.equal(thr_rank0, thr_whole) and torch.allclose(rank0.noise, whole.noise)


# -- graph safety -----------------------------------------------------------------------------------
class _NoSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host; records (op, output shapes)."""

    def __init__(self):
        super().__init__()
        self.trace = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host synchronisation: {func}")
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                  if isinstance(t, torch.Tensor)]
        self.trace.append((str(func), shapes))
        return out


def _batch(seed, with_nan=False, num_classes=5, size=32):
    loss, probs, labels, _ = noisy_probs(num_classes, 40, 0.4, "symmetric", seed=seed)
    if with_nan:
        loss[3] = math.nan
    return loss[:size], labels[:size], probs[:size]


@pytest.mark.parametrize("kind", SELECTORS)
def test_observe_and_refresh_never_sync_and_keep_static_shapes(kind):
    traces = []
    for seed in (0, 1):
        sel, thr = selector(kind, 5, em_iters=4), torch.zeros(5)  # the trace grows with iterations
        # Other values, and in the second run a non-finite loss: a data-dependent shape would show.
        batches = [_batch(seed * 10 + step, with_nan=seed == 1) for step in range(3)]
        with _NoSync() as mode:
            for batch in batches:
                sel.observe(*batch)
            sel.refresh(thr, BASE)
            sel.evidence(*batches[0][:2])
        traces.append(mode.trace)
    assert traces[0] == traces[1]  # the same ops with the same shapes whatever the values


def test_observe_and_refresh_run_on_fake_cuda_tensors():
    """FakeTensorMode fails on a data-dependent op (.item(), nonzero) and on mixed devices."""
    with FakeTensorMode():
        sel = Selector("gmm", 5, "cuda", **SMALL)
        loss, labels, probs = (t.cuda() for t in _batch(0))
        sel.observe(loss, labels, probs)
        thr = torch.zeros(5, device="cuda")
        sel.refresh(thr, torch.tensor(2.0, device="cuda"))
        sel.from_losses(loss, labels, torch.tensor(2.0, device="cuda"), probs=probs)
        assert thr.device.type == "cuda" and sel.noise_rate().device.type == "cuda"


def test_observe_and_refresh_trace_as_one_graph():
    """fullgraph=True fails on any graph break (a sync, a data-dependent branch); the eager backend
    only traces, so this costs seconds, not a compile."""
    eager, traced = selector("class_quantile", 5, em_iters=4), selector("class_quantile", 5, em_iters=4)
    observe = torch.compile(traced.observe, fullgraph=True, backend="eager")
    refresh = torch.compile(traced.refresh, fullgraph=True, backend="eager")
    for step in range(3):
        batch = _batch(step, with_nan=step == 2)
        eager.observe(*batch)
        observe(*batch)
    assert torch.equal(traced.stats, eager.stats)
    thr = torch.zeros(5)
    refresh(thr, BASE)
    assert torch.equal(thr, refreshed(eager))


# -- state, config, errors --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SELECTORS)
def test_state_dict_round_trip_continues_exactly(kind):
    loss, probs, labels, _ = noisy_probs(4, 150, 0.4, "pairflip", 0.5, seed=8)
    straight, first = selector(kind, 4), selector(kind, 4)
    half = len(loss) // 2
    for sel in (straight, first):  # one full epoch first, so every piece of state is set
        observe_all(sel, loss, labels, probs)
        refreshed(sel)
        observe_all(sel, loss[:half], labels[:half], probs[:half])
    resumed = selector(kind, 4)
    resumed.load_state_dict(first.state_dict())
    for sel in (straight, resumed):
        observe_all(sel, loss[half:], labels[half:], probs[half:])
    assert torch.equal(refreshed(straight), refreshed(resumed))
    assert torch.equal(straight.noise, resumed.noise)
    assert torch.equal(straight.evidence(loss, labels), resumed.evidence(loss, labels))


def test_load_state_dict_rejects_another_selector():
    state = Selector("gmm", 4, "cpu", **SMALL).state_dict()
    with pytest.raises(ValueError, match="kind='gmm'"):
        Selector("class_quantile", 4, "cpu", **SMALL).load_state_dict(state)
    with pytest.raises(ValueError, match="another class count"):
        Selector("gmm", 5, "cpu", **SMALL).load_state_dict(state)


def test_bad_shapes_are_one_clear_error():
    sel = Selector("gmm", 3, "cpu", **SMALL)
    with pytest.raises(ValueError, match="same 1-D shape"):
        sel.observe(torch.zeros(4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"probs must be \(4, 3\)"):
        sel.observe(torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"thresholds must be \(3,\) float32"):
        sel.refresh(torch.zeros(2), BASE)


@pytest.mark.parametrize("cfg, num_classes, message", [
    (FilterConfig(selector="median"), 10, "filter.selector='median'; valid: threshold, class_quantile, gmm"),
    (FilterConfig(selector="class_quantile", keep_fraction=1.5), 10, "must be in (0, 1]"),
    (FilterConfig(selector="gmm", keep_fraction=0.6), 10, "class_quantile only"),
    (FilterConfig(), 0, "num_classes=0"),
])
def test_build_selector_rejects_bad_configs(cfg, num_classes, message):
    with pytest.raises(ConfigError) as err:
        build_selector(cfg, num_classes, "cpu")
    assert message in str(err.value)


def test_config_keys_parse_and_validate():
    cfg = build_config("paper", parse_overrides(["filter.selector=class_quantile", "filter.keep_fraction=0.6"]))
    assert (cfg.filter.selector, cfg.filter.keep_fraction) == ("class_quantile", 0.6)
    assert build_config("paper").filter.selector == "threshold"  # the paper's stays the default
    sel = build_selector(cfg.filter, cfg.model.num_classes, "cpu")
    assert (sel.kind, sel.keep_fraction, sel.min_keep) == ("class_quantile", 0.6, cfg.filter.min_kept_fraction)
    for bad, message in [("filter.selector=median", "valid: threshold, class_quantile, gmm"),
                         ("filter.keep_fraction=-0.1", "filter.keep_fraction must be in (0, 1]"),
                         ("filter.keep_fraction=0.5", "class_quantile only")]:
        with pytest.raises(ConfigError, match=r"(?s)" + message.replace("(", r"\(").replace(")", r"\)")):
            build_config("paper", parse_overrides([bad]))


def test_the_start_up_line_names_what_the_filter_does():
    from fastcifar.config import FilterConfig
    from fastcifar.select import describe

    assert describe(FilterConfig(enabled=False)) == "filtering off"
    assert describe(FilterConfig()) == "threshold 2.0 x0.995/epoch, batch filtering"
    assert describe(FilterConfig(selector="class_quantile", keep_fraction=0.6, mode="epoch")) == (
        "keep 60% of each label, lowest loss first (class_quantile), epoch filtering")
    assert "estimated noise rate" in describe(FilterConfig(selector="class_quantile"))
    assert "(gmm)" in describe(FilterConfig(selector="gmm"))
