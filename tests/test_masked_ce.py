"""The Triton masked cross-entropy against the PyTorch reference and F.cross_entropy.

On a CPU the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA they run natively.
"""
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import fastcifar.kernels as K
from fastcifar.kernels import masked_ce as mce
from fastcifar.kernels.masked_ce import triton_masked_cross_entropy
from fastcifar.kernels.reference import reference_masked_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not mce.INTERPRETED,
    reason="the Triton kernel needs a CUDA GPU or TRITON_INTERPRET=1 (see tests/conftest.py)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# per_sample and loss are fp32 maths on the same (rounded) inputs in both implementations.
LOSS_TOL = dict(atol=1e-4, rtol=1e-5)
# The gradient is stored in the logits' dtype; ours rounds once more (after the scaling).
# fp32: torch's own log_softmax backward is off by ~3e-5 relative at C = 32000 (ours by
# ~3e-7 against float64, see test_accuracy_against_float64).
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4),
            torch.float16: dict(atol=1e-6, rtol=2e-3),
            torch.bfloat16: dict(atol=1e-6, rtol=1.6e-2)}
# Against F.cross_entropy evaluated in the logits' own dtype (log_softmax rounded to it).
NATIVE_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
              torch.float16: dict(atol=5e-3, rtol=2e-3),
              torch.bfloat16: dict(atol=5e-2, rtol=1.6e-2)}
UPSTREAM = 2.5  # a non-unit upstream gradient


def _inputs(n, c, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * scale).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels_b = torch.randint(0, c, (n,), generator=g)
    return logits.to(DEVICE), labels.to(DEVICE), labels_b.to(DEVICE)


def _mid_threshold(per_sample):
    """A 0-d threshold halfway between two neighbouring losses: some kept, no tie."""
    s = per_sample.sort().values
    if s.numel() == 1:
        return s[0] + 1.0
    k = (s.numel() - 1) // 2
    return (s[k] + s[k + 1]) / 2


def _run(fn, logits, labels, threshold, upstream=UPSTREAM, **kw):
    """Loss, per-sample loss, keep mask and d(upstream * loss)/d logits."""
    x = logits.clone().requires_grad_(True)
    out = fn(x, labels, threshold, **kw)
    (out.loss * upstream).backward()
    return out, x.grad


def _assert_same(logits, labels, threshold, **kw):
    (a, ga), (b, gb) = (_run(fn, logits, labels, threshold, **kw) for fn in
                        (triton_masked_cross_entropy, reference_masked_cross_entropy))
    assert a.loss.dtype == a.per_sample.dtype == torch.float32 and a.loss.dim() == 0
    assert a.keep.dtype == torch.bool and ga.dtype == logits.dtype
    assert not a.per_sample.requires_grad
    torch.testing.assert_close(a.per_sample, b.per_sample, **LOSS_TOL)
    assert torch.equal(a.keep, b.keep)
    torch.testing.assert_close(a.loss, b.loss, **LOSS_TOL)
    torch.testing.assert_close(ga, gb, **GRAD_TOL[logits.dtype])
    return a, ga


SHAPES = [(1, 100), (37, 10), (130, 100), (600, 100), (5, 1), (4, 2), (9, 1000), (3, 32000)]
# (label_smoothing, lam, reduction); lam None: no partner, "t": a 0-d tensor lam.
VARIANTS = [(0.0, None, "mean"), (0.1, None, "sum"), (0.0, 0.3, "mean"), (0.1, "t", "sum")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_matches_reference(dtype, shape, variant):
    """Odd N (1, not a multiple of the row tile; fused and split reductions) and C (1, 2, 1000,
    32000: the column-looping kernel), every dtype, smoothing, partner labels, both reductions."""
    smoothing, lam, reduction = variant
    logits, labels, labels_b = _inputs(*shape, dtype)
    kw = dict(label_smoothing=smoothing, reduction=reduction)
    if lam is not None:
        kw.update(labels_b=labels_b,
                  lam=torch.tensor(0.3, device=DEVICE) if lam == "t" else lam)
    ref = reference_masked_cross_entropy(logits, labels, math.inf, **kw).per_sample
    _assert_same(logits, labels, _mid_threshold(ref), **kw)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_partner_weight(lam):
    """lam = 1 ignores the partner, lam = 0 uses only the partner, in between mixes."""
    logits, labels, labels_b = _inputs(50, 100, torch.float32)
    out, _ = _assert_same(logits, labels, math.inf, labels_b=labels_b, lam=lam,
                          label_smoothing=0.1)
    ce = [F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")
          for y in (labels, labels_b)]
    torch.testing.assert_close(out.per_sample, lam * ce[0] + (1 - lam) * ce[1], **LOSS_TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_thresholds(reduction):
    """inf keeps all, 0 and -inf keep nothing (loss and grad 0, not NaN), a tie drops."""
    logits, labels, _ = _inputs(50, 100, torch.float32)
    full, _ = _assert_same(logits, labels, math.inf, reduction=reduction)
    assert full.keep.all()
    for thr in (0.0, -math.inf, torch.tensor(0.0, device=DEVICE)):
        none, grad = _assert_same(logits, labels, thr, reduction=reduction)
        assert not none.keep.any() and none.loss.item() == 0.0 and not grad.any()
    tie = full.per_sample[7]  # exactly sample 7's loss: "below" is strict
    for thr in (tie, tie.double(), tie.item()):
        out, grad = _assert_same(logits, labels, thr, reduction=reduction)
        assert not out.keep[7] and not grad[7].any()
        assert torch.equal(out.keep, full.per_sample < tie)
    _assert_same(logits, labels, _mid_threshold(full.per_sample), reduction=reduction)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e4), (torch.bfloat16, 1e4),
                                       (torch.float16, 6e4)], ids=str)
def test_extreme_logits(dtype, big):
    """Huge logits of both signs (up to near fp16's max): finite, stable, no overflow."""
    logits, labels, labels_b = _inputs(16, 100, dtype)
    logits[::2, 3] = big
    logits[1::2, 5] = -big
    logits[0, :] = -big  # an all-equal row: uniform softmax
    labels[2], labels[3] = 3, 5  # losses of 0 and of ~2 * big
    for kw in (dict(), dict(labels_b=labels_b, lam=0.3, label_smoothing=0.1)):
        out, grad = _assert_same(logits, labels, math.inf, **kw)
        assert torch.isfinite(out.per_sample).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_f_cross_entropy(dtype):
    """Against torch's own per-sample CE in the logits' dtype, with a partner and smoothing."""
    logits, labels, labels_b = _inputs(64, 100, dtype)
    lam = 0.3
    x = logits.clone().requires_grad_(True)
    ce = lam * F.cross_entropy(x, labels, reduction="none", label_smoothing=0.1) + \
        (1 - lam) * F.cross_entropy(x, labels_b, reduction="none", label_smoothing=0.1)
    (ce.float().mean() * UPSTREAM).backward()
    out, grad = _run(triton_masked_cross_entropy, logits, labels, math.inf,
                     labels_b=labels_b, lam=lam, label_smoothing=0.1)
    torch.testing.assert_close(out.per_sample, ce.detach().float(), **NATIVE_TOL[dtype])
    torch.testing.assert_close(out.loss, ce.detach().float().mean(), **NATIVE_TOL[dtype])
    torch.testing.assert_close(grad, x.grad, **NATIVE_TOL[dtype])
    thr = _mid_threshold(out.per_sample)
    clear = (ce.detach().float() - thr).abs() > 0.1  # rows whose keep rounding cannot flip
    keep = triton_masked_cross_entropy(logits, labels, thr, labels_b=labels_b, lam=lam,
                                       label_smoothing=0.1).keep
    assert torch.equal(keep[clear], (ce.detach().float() < thr)[clear])


def test_accuracy_against_float64():
    """At C = 32000 the kernel's fp32 loss and gradient are close to float64 truth."""
    logits, labels, labels_b = _inputs(4, 32000, torch.float32)
    x = logits.double().requires_grad_(True)
    ce = 0.3 * F.cross_entropy(x, labels, reduction="none", label_smoothing=0.1) + \
        0.7 * F.cross_entropy(x, labels_b, reduction="none", label_smoothing=0.1)
    (ce.mean() * UPSTREAM).backward()
    out, grad = _run(triton_masked_cross_entropy, logits, labels, math.inf,
                     labels_b=labels_b, lam=0.3, label_smoothing=0.1)
    torch.testing.assert_close(out.per_sample.double(), ce.detach(), atol=0, rtol=1e-6)
    torch.testing.assert_close(grad.double(), x.grad, atol=1e-7, rtol=5e-6)


@pytest.mark.parametrize("c", [300, 1000])
def test_column_loop_many_blocks(monkeypatch, c):
    """The online softmax across several column blocks, with the row max in a late block."""
    monkeypatch.setattr(mce, "MAX_BLOCK_C", 128)
    logits, labels, labels_b = _inputs(6, c, torch.float32)
    logits[:, -1] = 40.0  # the max appears in the last block: earlier sums get rescaled
    labels[0] = c - 1
    kw = dict(labels_b=labels_b, lam=0.3, label_smoothing=0.1)
    ref = reference_masked_cross_entropy(logits, labels, math.inf, **kw).per_sample
    _assert_same(logits, labels, _mid_threshold(ref), **kw)


def test_split_reduction_matches_fused(monkeypatch):
    logits, labels, _ = _inputs(100, 100, torch.float32)
    fused, g1 = _run(triton_masked_cross_entropy, logits, labels, 4.0)
    monkeypatch.setattr(mce, "FUSED_MAX_ELEMENTS", 0)
    split, g2 = _run(triton_masked_cross_entropy, logits, labels, 4.0)
    assert 0 < fused.keep.sum() < 100 and torch.equal(fused.keep, split.keep)
    torch.testing.assert_close(fused.loss, split.loss, atol=0, rtol=1e-6)
    torch.testing.assert_close(g1, g2, atol=0, rtol=1e-6)


def test_strided_logits_and_no_grad():
    base, labels, _ = _inputs(20, 300, torch.float32)
    for logits in (base[:, :100], base[:, :100].t().contiguous().t()):  # row stride, col stride
        _assert_same(logits, labels % 100, 4.0)
    with torch.no_grad():
        out = triton_masked_cross_entropy(base.requires_grad_(True), labels, 6.0)
    ref = reference_masked_cross_entropy(base.detach(), labels, 6.0)
    torch.testing.assert_close(out.loss, ref.loss, **LOSS_TOL)
    assert not out.loss.requires_grad


def test_empty_batch():
    logits, labels, _ = _inputs(0, 10, torch.float32)
    out, grad = _assert_same(logits, labels, 2.0)
    assert out.loss.item() == 0.0 and grad.shape == (0, 10)


def test_invalid_label_is_nan_and_dropped():
    """Label range is the caller's duty; the kernel never reads out of bounds for one."""
    logits, labels, _ = _inputs(8, 10, torch.float32)
    labels[2], labels[5] = 10, -1
    out, grad = _run(triton_masked_cross_entropy, logits, labels, math.inf)
    assert out.per_sample[[2, 5]].isnan().all() and out.per_sample[[0, 1, 3, 4, 6, 7]].isfinite().all()
    assert out.keep.sum() == 6 and out.loss.isfinite() and not grad[[2, 5]].any()


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(K, "triton_masked_cross_entropy", lambda *a, **k: calls.append("t"))
    monkeypatch.setattr(K, "reference_masked_cross_entropy", lambda *a, **k: calls.append("r"))
    logits = torch.zeros(2, 3)
    monkeypatch.setattr(K, "INTERPRETED", True)
    K.masked_cross_entropy(logits, torch.zeros(2, dtype=torch.long), 1.0)
    monkeypatch.setattr(K, "INTERPRETED", False)
    K.masked_cross_entropy(logits, torch.zeros(2, dtype=torch.long), 1.0)
    assert calls == ["t", "r"]  # CPU logits: Triton only when interpreted


def test_reference_works_without_triton():
    """triton is a Linux-only dependency: without it the package imports and falls back."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fastcifar.kernels as K\n"
            "assert K.triton_masked_cross_entropy is None\n"
            "x = torch.randn(4, 3, requires_grad=True)\n"
            "K.masked_cross_entropy(x, torch.zeros(4, dtype=torch.long), 9.0).loss.backward()\n"
            "assert x.grad.abs().sum() > 0\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


BAD_INPUTS = [
    (dict(logits=torch.zeros(4, 3, dtype=torch.int64)), "fp32, fp16 or bf16"),
    (dict(logits=torch.zeros(4)), "shape"),
    (dict(logits=torch.zeros(4, 0)), "C >= 1"),
    (dict(labels=torch.zeros(3, dtype=torch.int64)), "shape"),
    (dict(labels=torch.zeros(4, dtype=torch.int32)), "int64"),
    (dict(labels=torch.zeros(4, dtype=torch.int64, device="meta")), "on meta"),
    (dict(labels_b=torch.zeros(4, 1, dtype=torch.int64)), "labels_b"),
    (dict(threshold=torch.zeros(1)), "0-d"),
    (dict(threshold=math.nan), "threshold"),
    (dict(threshold="2"), "threshold"),
    (dict(lam=1.5), "lam"),
    (dict(lam=torch.tensor(1)), "0-d floating"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(reduction="none"), "reduction"),
]


@pytest.mark.parametrize("fn", [triton_masked_cross_entropy, reference_masked_cross_entropy])
@pytest.mark.parametrize("bad,match", BAD_INPUTS)
def test_input_checks(fn, bad, match):
    args = dict(logits=torch.zeros(4, 3), labels=torch.zeros(4, dtype=torch.int64),
                threshold=2.0, label_smoothing=0.0, labels_b=None, lam=1.0, reduction="mean")
    args.update(bad)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
            for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        fn(args.pop("logits"), args.pop("labels"), args.pop("threshold"), **args)


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration of the compiled path."""
    logits, labels, labels_b = _inputs(6, 10, torch.float32)
    thr, lam = torch.tensor(3.0, device=DEVICE), torch.tensor(0.3, device=DEVICE)
    args = (logits.requires_grad_(True), labels, labels_b, thr, 0.0, lam, 0.0, 0.1, True, True)
    torch.library.opcheck(mce.masked_ce_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_tiny_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of a model using the loss matches eager, and a new
    threshold or lam (0-d tensors) reuses the compiled graph."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 10).to(DEVICE)
    x = torch.randn(32, 16, device=DEVICE)
    _, labels, labels_b = _inputs(32, 10, torch.float32)

    def forward(m, thr, lam):
        out = K.masked_cross_entropy(m(x), labels, thr, label_smoothing=0.1,
                                     labels_b=labels_b, lam=lam)
        return out.loss, out.keep

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(forward, backend=counter, fullgraph=True)
    start = time.perf_counter()
    for thr, lam in ((2.5, 0.3), (2.2, 0.7)):
        thr, lam = torch.tensor(thr, device=DEVICE), torch.tensor(lam, device=DEVICE)
        results = []
        for fn in (forward, compiled):
            model.zero_grad()
            loss, keep = fn(model, thr, lam)
            (loss * UPSTREAM).backward()
            results.append((loss.detach(), keep, model.weight.grad.clone(),
                            model.bias.grad.clone()))
        (l1, k1, w1, b1), (l2, k2, w2, b2) = results
        assert 0 < k1.sum() < 32 and torch.equal(k1, k2)
        torch.testing.assert_close(l2, l1, **LOSS_TOL)
        torch.testing.assert_close(w2, w1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b2, b1, atol=1e-6, rtol=1e-5)
    assert counter.frame_count == 1  # one graph, no break, no recompile for new values
    print(f"compile + 2 steps: {time.perf_counter() - start:.1f} s")
