"""Sample selectors for the loss filter: per-class thresholds from device-side loss statistics."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import ConfigError, FilterConfig

SELECTORS = ("threshold", "class_quantile", "gmm")
_TINY = 1e-12  # floor for weights and counts before a division or a log


def _log_component(weight, mean, var, x):
    """log(weight * N(x; mean, var)) up to the shared constant; broadcasting tensors."""
    return torch.log(weight.clamp_min(_TINY)) - 0.5 * torch.log(var) - (x - mean) ** 2 / (2 * var)


def _posterior_high(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """P(high-mean component | x). params (..., 2, 3) [weight, mean, var], broadcastable with x."""
    lo = _log_component(params[..., 0, 0], params[..., 0, 1], params[..., 0, 2], x)
    hi = _log_component(params[..., 1, 0], params[..., 1, 1], params[..., 1, 2], x)
    return torch.sigmoid(hi - lo)


def _m_step(per_class: Callable, wk, x, cls, n, reg: float) -> torch.Tensor:
    """One component's (C, 3) [weight, mean, var] from point weights wk (P,) times its responsibility."""
    nk = per_class(wk)
    denom = nk.clamp_min(_TINY)  # an empty component gets weight 0, mean 0, var `reg`: harmless
    mean = per_class(wk * x) / denom
    var = per_class(wk * (x - mean[cls]) ** 2) / denom + reg
    return torch.stack([nk / n, mean, var], 1)


def fit_mixture(x: torch.Tensor, w: torch.Tensor, cls: torch.Tensor, num_classes: int,
                iters: int = 64, reg: float = 5e-4) -> torch.Tensor:
    """Per-class two-component 1-D Gaussian mixture by EM with a fixed iteration count (no sync).

    x (P,) fp32 positions (min-max normalised losses); w (P,) fp32 weights (histogram counts, or
    1 per sample, 0 = absent); cls (P,) int64 class of each point. reg is added to every variance
    (as sklearn's reg_covar; 5e-4 as DivideMix) so a component on one value stays a density.
    Returns (C, 2, 3) fp32 [weight, mean, var], the low-mean component first.
    """
    def per_class(v):
        return torch.zeros(num_classes, dtype=v.dtype, device=v.device).scatter_add_(0, cls, v)

    n = per_class(w).clamp_min(_TINY)
    # Start from a split at the class mean: one k-means step, deterministic, no random restarts.
    r = (x > (per_class(w * x) / n)[cls]).to(x.dtype)
    mix = torch.stack([_m_step(per_class, w * (1 - r), x, cls, n, reg),
                       _m_step(per_class, w * r, x, cls, n, reg)], 1)
    for _ in range(iters):
        r = _posterior_high(mix[cls], x)
        mix = torch.stack([_m_step(per_class, w * (1 - r), x, cls, n, reg),
                           _m_step(per_class, w * r, x, cls, n, reg)], 1)
    swap = mix[:, 0, 1] > mix[:, 1, 1]
    return torch.where(swap[:, None, None], mix.flip(1), mix)


def confident_joint(probs: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor,
                    thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident learning's counts (Northcutt et al. 2021) for one batch of samples, no sync.

    probs (B, C) fp32 softmax; labels (B,) int64; ok (B,) bool, samples to count; thr (C,) fp32
    per-class confidence thresholds. A sample with label i counts at (i, j), j the most probable
    class with probs[j] >= thr[j] (none: not counted). Returns the joint (C, C) fp32 and
    (2, C) fp32 [sum of probs[label], count] per label, from which the next thresholds follow.
    """
    num_classes = probs.shape[1]
    p = torch.where(ok[:, None], probs.float(), 0.0)
    cand = (p >= thr[None]) & ok[:, None]
    j = torch.where(cand, p, -1.0).argmax(1)
    joint = p.new_zeros(num_classes * num_classes).scatter_add_(0, labels * num_classes + j, cand.any(1).float())
    own = p.gather(1, labels[:, None])[:, 0]
    sums = p.new_zeros(2 * num_classes).scatter_add_(0, torch.cat([labels, labels + num_classes]),
                                                     torch.cat([own, ok.float()]))
    return joint.view(num_classes, num_classes), sums.view(2, num_classes)


def joint_noise_rate(joint: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimated share of wrong labels from the confident joint (C, C) and label counts (C,):
    each row scaled to its label's count, then the off-diagonal share. Returns (0-d, (C,)) fp32,
    overall and per given label (0 where nothing was counted)."""
    calibrated = joint / joint.sum(1, keepdim=True).clamp_min(1) * count[:, None]
    wrong = calibrated.sum(1) - calibrated.diagonal()
    return wrong.sum() / count.sum().clamp_min(1), wrong / count.clamp_min(1)


class Selector:
    """Per-class loss thresholds (C,) fp32 for `masked_cross_entropy`: keep = loss < thr[label].

    Batch mode: `observe` folds each step's losses into `hist` (C, bins + 1) fp32 counts on the
    device, in place, static shapes, no host sync (safe inside a captured CUDA graph); `refresh`
    reads the thresholds from it once per epoch and resets it. Bins are uniform in log1p(loss)
    over [0, max_loss] nats, so they are finest where clean losses sit; larger losses land in the
    last bin. Column `bins` counts non-finite losses, which are dropped from every statistic (the
    kernel never keeps them either). Counts are exact in fp32 up to 2**24 per bin and refresh.
    Epoch mode: `from_losses` gives exact thresholds from every training sample's loss.
    """

    def __init__(self, kind: str, num_classes: int, device, *, keep_fraction: float = 0.0,
                 min_keep: float = 0.0, bins: int = 1024, max_loss: float = 32.0,
                 em_iters: int = 64, grid: int = 1024):
        """keep_fraction: class_quantile's kept share, 0 = 1 - noise_rate(); min_keep: the floor of
        an estimated share; max_loss: nats; em_iters: EM iterations; grid: points on [0, 1] where
        the mixture's posterior is tabulated (threshold and evidence resolution)."""
        self.kind, self.num_classes, self.device = kind, num_classes, torch.device(device)
        self.keep_fraction, self.min_keep, self.em_iters = keep_fraction, min_keep, em_iters
        self.bins, self.max_loss = bins, max_loss
        z = dict(device=self.device, dtype=torch.float32)
        c, hist_size = num_classes, num_classes * (bins + 1)
        # One flat buffer for everything observed, so DDP needs one all-reduce and reset one fill.
        self.stats = torch.zeros(hist_size + c * c + 2 * c, **z)
        self.hist = self.stats[:hist_size].view(c, bins + 1)
        self.joint = self.stats[hist_size:hist_size + c * c].view(c, c)  # confident joint
        self.conf = self.stats[hist_size + c * c:].view(2, c)  # [sum of p(label), count] per label
        self.conf_thr = torch.zeros(c, **z)  # confident-learning thresholds, from the last refresh
        self.last = torch.full((c,), math.inf, **z)  # the latest thresholds (evidence)
        self.mixture = torch.zeros(c, 2, 3, **z)  # latest fit, normalised units
        self.mixture[..., 2] = 1.0
        self.norm = torch.zeros(c, 2, **z)  # [lowest loss, loss span] of the fit, nats
        self.noise = torch.full((), math.nan, **z)  # NaN until the first estimate
        self.class_noise = torch.full((c,), math.nan, **z)  # per given label; NaN: none counted
        u = torch.linspace(0, 1, bins + 1, **z)
        self._edges = torch.expm1(u * math.log1p(max_loss))  # (bins + 1,) nats
        self._centers = torch.expm1((u[:-1] + 0.5 / bins) * math.log1p(max_loss))
        self._bin_class = torch.arange(num_classes, device=self.device).repeat_interleave(bins)
        self._grid = torch.linspace(0, 1, grid, **z)

    # -- batch mode -------------------------------------------------------------------------------
    def observe(self, per_sample: torch.Tensor, labels: torch.Tensor,
                probs: torch.Tensor | None = None) -> None:
        """Add one step's losses (and softmax, for the noise estimate) to the running statistics.

        In place, static shapes, no host sync. per_sample (B,) fp32 nats; labels (B,) int64 in
        [0, C) (an index outside it is a device error); probs (B, C) softmax of the same logits.
        """
        loss, finite = self._check(per_sample, labels, probs, "observe")
        u = torch.log1p(torch.where(finite, loss, 0.0).clamp(0, self.max_loss)) / math.log1p(self.max_loss)
        b = torch.where(finite, (u * self.bins).long().clamp(max=self.bins - 1), self.bins)
        self.hist.view(-1).scatter_add_(0, labels * (self.bins + 1) + b, torch.ones_like(loss))
        if probs is not None:
            # Counted against the previous refresh's thresholds (0 before it: plain argmax).
            joint, sums = confident_joint(probs, labels, finite & torch.isfinite(probs).all(1), self.conf_thr)
            self.joint.add_(joint)
            self.conf.add_(sums)

    def refresh(self, thresholds: torch.Tensor, base: torch.Tensor,
                reduce_sum: Callable[[torch.Tensor], object] | None = None) -> None:
        """Write the thresholds read from the statistics into `thresholds` (C,) fp32; reset them.

        base: 0-d fp32, the schedule's absolute threshold (nats; the `threshold` selector copies
        it). reduce_sum: sums a tensor in place across processes (DDP), so all ranks agree.
        Classes with nothing observed keep every sample (inf) under class_quantile and gmm.
        """
        if thresholds.shape != (self.num_classes,) or thresholds.dtype != torch.float32:
            raise ValueError(f"thresholds must be ({self.num_classes},) float32, got "
                             f"{tuple(thresholds.shape)} {thresholds.dtype}")
        if reduce_sum is not None:
            reduce_sum(self.stats)
        h = self.hist[:, :-1]
        n = h.sum(1)
        occupied = h > 0
        lo = torch.where(occupied, self._edges[:-1], math.inf).amin(1)
        hi = torch.where(occupied, self._edges[1:], -math.inf).amax(1)
        # One occupied bin is one value as far as the histogram knows: nothing to separate.
        lo, span = self._set_norm(n, lo, torch.where(occupied.sum(1) > 1, hi - lo, 0.0))
        x = ((self._centers - lo[:, None]) / span[:, None]).reshape(-1)
        self._fit(x, h.reshape(-1), self._bin_class, n, self.joint, self.conf)
        thr = self._hist_quantile(h, n) if self.kind == "class_quantile" else self._thresholds(base, n)
        thresholds.copy_(thr)
        self.last.copy_(thr)
        self.stats.zero_()

    def _hist_quantile(self, h: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The upper edge of the bin holding each class's keep-quantile: never keeps less than asked,
        at most one bin more (ties in one bin stay together rather than all being dropped)."""
        target = self._fractions() * n
        idx = ((h.cumsum(1) < target[:, None]).sum(1)).clamp(max=self.bins - 1)
        upper = torch.cat([self._edges[1:-1], self._edges.new_full((1,), math.inf)])  # last bin: all
        return torch.where(n > 0, upper[idx], math.inf)

    # -- epoch mode -------------------------------------------------------------------------------
    def from_losses(self, losses: torch.Tensor, labels: torch.Tensor, base: torch.Tensor,
                    probs: torch.Tensor | None = None) -> torch.Tensor:
        """Exact thresholds (C,) fp32 from every sample's loss; updates noise_rate() and evidence.

        losses (N,) fp32 nats (non-finite ones are ignored); labels (N,) int64 in [0, C);
        base: 0-d fp32, the schedule's absolute threshold; probs (N, C) the scoring pass's softmax.
        """
        loss, finite = self._check(losses, labels, probs, "from_losses")
        w = finite.float()
        n = torch.zeros(self.num_classes, device=loss.device).scatter_add_(0, labels, w)
        init = torch.full((self.num_classes,), math.inf, device=loss.device)
        lo = init.scatter_reduce(0, labels, torch.where(finite, loss, math.inf), "amin")
        hi = (-init).scatter_reduce(0, labels, torch.where(finite, loss, -math.inf), "amax")
        lo, span = self._set_norm(n, lo, hi - lo)
        x = torch.where(finite, (loss - lo[labels]) / span[labels], 0.0)
        joint = conf = None
        if probs is not None:
            ok = finite & torch.isfinite(probs).all(1)
            _, conf = confident_joint(probs, labels, ok, self.conf_thr)
            self._next_conf_thr(conf)  # count against this pass's own thresholds, as cleanlab does
            joint, conf = confident_joint(probs, labels, ok, self.conf_thr)
        self._fit(x, w, labels, n, joint, conf)
        thr = self._exact_quantile(loss, finite, labels, n) if self.kind == "class_quantile" else \
            self._thresholds(base, n)
        self.last.copy_(thr)
        return thr

    def _exact_quantile(self, loss, finite, labels, n) -> torch.Tensor:
        """Per class, just above the k-th smallest finite loss, k = round(fraction * count) >= 1;
        equal losses are kept or dropped together."""
        key = torch.where(finite, loss, math.inf)  # non-finite last within their class
        order = key.argsort(stable=True)
        order = order[labels[order].argsort(stable=True)]  # grouped by class, ascending within
        total = torch.zeros_like(n).scatter_add_(0, labels, torch.ones_like(key))
        start = total.cumsum(0) - total
        k = (self._fractions().double() * n + 0.5).floor().clamp(min=1)
        pos = (start + k - 1).long().clamp(0, max(len(loss) - 1, 0))
        kth = key[order][pos] if len(loss) else torch.zeros_like(n)
        return torch.where(n > 0, torch.nextafter(kth, torch.full_like(kth, math.inf)), math.inf)

    # -- shared -----------------------------------------------------------------------------------
    def _set_norm(self, n, lo, span):
        """Store and return the min-max normalisation; empty or one-valued classes get (0, 1)."""
        ok = (n > 0) & (span > 0)
        lo, span = torch.where(n > 0, lo, 0.0), torch.where(ok, span, 1.0)
        self.norm.copy_(torch.stack([lo, torch.where(ok, span, 0.0)], 1))
        return lo, span

    def _check(self, losses, labels, probs, where: str):
        """Shape checks (metadata only, no sync); returns (fp32 losses, finite mask)."""
        if losses.shape != labels.shape or losses.dim() != 1:
            raise ValueError(f"{where}: losses {tuple(losses.shape)} and labels "
                             f"{tuple(labels.shape)} must be the same 1-D shape")
        if probs is not None and probs.shape != (len(losses), self.num_classes):
            raise ValueError(f"{where}: probs must be ({len(losses)}, {self.num_classes}), "
                             f"got {tuple(probs.shape)}")
        loss = losses.float()
        return loss, torch.isfinite(loss)

    def _next_conf_thr(self, conf: torch.Tensor) -> None:
        """Confident learning's per-class threshold: mean p(label) over the label's samples."""
        self.conf_thr.copy_(torch.where(conf[1] > 0, conf[0] / conf[1].clamp_min(1), self.conf_thr))

    def _fit(self, x, w, cls, n, joint, conf) -> None:
        """Fit the mixture; estimate the noise rate by confident learning where probabilities were
        counted, else from the mixture (see `_mixture_noise`)."""
        self.mixture.copy_(fit_mixture(x, w, cls, self.num_classes, self.em_iters))
        noise, per_class = self._mixture_noise(n), torch.full_like(self.class_noise, math.nan)
        if joint is not None:
            counted = joint.sum() > 0
            cl_noise, cl_per_class = joint_noise_rate(joint, conf[1])
            noise = torch.where(counted, cl_noise, noise)
            per_class = torch.where(counted & (conf[1] > 0), cl_per_class, per_class)
            self._next_conf_thr(conf)
        self.noise.copy_(noise)
        self.class_noise.copy_(per_class)

    def _mixture_noise(self, n: torch.Tensor) -> torch.Tensor:
        """The high-loss components' weights, averaged over classes by their counts.

        A fallback: it overestimates wherever clean losses are skewed (a 2-component fit splits
        them), by 0.4 on clean data; classes whose losses are all one value count as clean.
        """
        separable = self.norm[:, 1] > 0
        high = torch.where(separable, self.mixture[:, 1, 0], 0.0)
        return (high * n).sum() / n.sum().clamp_min(1.0)

    def _fractions(self) -> torch.Tensor:
        """(C,) kept share per class for class_quantile: configured, or 1 - the estimated noise.

        Per class where the confident joint counted the class: on synthetic losses with per-class
        rates in [0.1, 0.7] that raised detection F1 over one global share (0.98 vs 0.93), and
        with one shared rate it was no worse. Else the global estimate: a class's own mixture
        weight is biased by how skewed its clean losses are.
        """
        if self.keep_fraction > 0:
            return torch.full((self.num_classes,), self.keep_fraction, device=self.device)
        noise = torch.where(torch.isnan(self.class_noise), self.noise, self.class_noise)
        return (1 - noise).clamp(min=self.min_keep, max=1.0)

    def _curve(self) -> torch.Tensor:
        """(C, grid) P(high | x) on the normalised grid, made non-decreasing above the low mean so
        the kept set is one interval from 0 (a wide high component would also win the far left)."""
        post = _posterior_high(self.mixture[:, None], self._grid)
        post = torch.where(self._grid < self.mixture[:, :1, 1], 0.0, post)
        return post.cummax(1).values

    def _thresholds(self, base: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """threshold: base for every class; gmm: where the monotone posterior crosses 0.5 (nats)."""
        if self.kind == "threshold":
            base = torch.as_tensor(base, dtype=torch.float32, device=self.device)
            return base.expand(self.num_classes).clone()
        curve, g = self._curve(), self._grid
        idx = (curve < 0.5).sum(1)
        b = idx.clamp(1, len(g) - 1)
        ca, cb = curve.gather(1, (b - 1)[:, None])[:, 0], curve.gather(1, b[:, None])[:, 0]
        t = g[b - 1] + (0.5 - ca) / (cb - ca).clamp_min(_TINY) * (g[b] - g[b - 1])
        t = torch.where(idx == 0, 0.0, t)
        thr = self.norm[:, 0] + t * self.norm[:, 1]
        keep_all = (idx == len(g)) | (n <= 0) | (self.norm[:, 1] <= 0)
        return torch.where(keep_all, math.inf, thr)

    # -- reading ----------------------------------------------------------------------------------
    def noise_rate(self) -> torch.Tensor:
        """0-d fp32 on the device: the latest estimated noisy share (NaN before the first one)."""
        return self.noise

    def noise_rate_value(self) -> float | None:
        """noise_rate() read to the host (a sync: once per epoch), None before the first estimate."""
        value = float(self.noise)
        return None if math.isnan(value) else value

    def evidence(self, losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) fp32 "how suspicious", > 0 exactly where the latest thresholds drop the sample.

        threshold / class_quantile: nats above the class threshold (-inf where it keeps all);
        gmm: P(high-loss component) - 0.5. A non-finite loss gets +inf. Ranks within one selector.
        """
        loss = losses.float()
        finite = torch.isfinite(loss)
        if self.kind == "gmm":
            curve, lo, span = self._curve(), self.norm[labels, 0], self.norm[labels, 1]
            x = (torch.where(finite, loss, 0.0) - lo) / span.clamp_min(_TINY)  # NaN cannot index
            pos = x.clamp(0, 1) * (len(self._grid) - 1)
            i0 = pos.floor().long().clamp(max=len(self._grid) - 2)
            frac = pos - i0
            p = curve[labels, i0] * (1 - frac) + curve[labels, i0 + 1] * frac
            score = torch.where(span > 0, p, 0.0) - 0.5
        else:
            score = loss - self.last[labels]
        return torch.where(finite, score, math.inf)

    _STATE = ("stats", "conf_thr", "last", "mixture", "norm", "noise", "class_noise")

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (tensors cloned, on the device)."""
        return {"kind": self.kind, "bins": self.bins, "max_loss": self.max_loss,
                **{k: getattr(self, k).clone() for k in self._STATE}}

    def load_state_dict(self, state: dict) -> None:
        """Copy in place (a captured graph keeps pointing at the same tensors)."""
        mine = self.state_dict()
        if set(state) != set(mine):
            raise ValueError(f"selector state has keys {sorted(state)}, expected {sorted(mine)}")
        for key in ("kind", "bins", "max_loss"):
            if state[key] != mine[key]:
                raise ValueError(f"selector state is for {key}={state[key]!r}, this one has {mine[key]!r}")
        for key in self._STATE:
            if tuple(state[key].shape) != tuple(mine[key].shape):
                raise ValueError(f"selector state {key!r} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(mine[key].shape)} (another class count?)")
            getattr(self, key).copy_(state[key])


def describe(cfg: FilterConfig) -> str:
    """What the filter does, in words, for the start-up line."""
    if not cfg.enabled:
        return "filtering off"
    if cfg.selector == "threshold":
        rule = f"threshold {cfg.threshold} x{cfg.decay}/epoch"
    elif cfg.selector == "class_quantile":
        share = f"{100 * cfg.keep_fraction:g}%" if cfg.keep_fraction else "1 - the estimated noise rate"
        rule = f"keep {share} of each label, lowest loss first (class_quantile)"
    else:
        rule = "keep each label's low-loss mixture component (gmm)"
    return f"{rule}, {cfg.mode} filtering"


def build_selector(cfg: FilterConfig, num_classes: int, device, **kwargs) -> Selector:
    """The selector `cfg.selector` names; kwargs go to Selector (bins, max_loss, em_iters, grid)."""
    problems = []
    if cfg.selector not in SELECTORS:
        problems.append(f"filter.selector={cfg.selector!r}; valid: {', '.join(SELECTORS)}")
    if not 0 <= cfg.keep_fraction <= 1:
        problems.append(f"filter.keep_fraction={cfg.keep_fraction!r} must be in (0, 1], or 0 = estimated")
    elif cfg.keep_fraction > 0 and cfg.selector != "class_quantile":
        problems.append(f"filter.keep_fraction is used by selector=class_quantile only, not {cfg.selector!r}")
    if num_classes < 1:
        problems.append(f"num_classes={num_classes} must be >= 1")
    if kwargs.get("bins", 2) < 2 or kwargs.get("grid", 2) < 2 or kwargs.get("max_loss", 1.0) <= 0:
        problems.append(f"bins and grid must be >= 2 and max_loss > 0, got {kwargs}")
    if problems:
        raise ConfigError("invalid selector configuration:\n  " + "\n  ".join(problems))
    return Selector(cfg.selector, num_classes, device, keep_fraction=cfg.keep_fraction,
                    min_keep=cfg.min_kept_fraction, **kwargs)
