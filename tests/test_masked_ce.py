"""The Triton masked cross-entropy against the PyTorch reference and F.cross_entropy.

On a CPU the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA they run natively.
"""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

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


def _class_thresholds(per_sample, n_classes, seed=0):
    """A (C,) fp32 threshold per class drawn from inf, 0, above every loss and the midpoints
    of the widest gap in each quarter of the sorted losses: classes that keep all, none or
    some, and no loss within rounding of its threshold (the implementations differ by ulps)."""
    s = per_sample.sort().values
    values = [math.inf, 0.0] + ([s[-1].item() + 1.0] if s.numel() else [])
    for part in s.tensor_split(4):
        if part.numel() >= 2:
            i = part.diff().argmax()
            values.append(((part[i] + part[i + 1]) / 2).item())
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(values), (n_classes,), generator=g)
    return torch.tensor(values)[pick].to(per_sample.device)


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
    if isinstance(threshold, torch.Tensor) and threshold.dim() == 1:  # the contract itself
        assert torch.equal(a.keep, b.per_sample < threshold.float()[labels])
    return a, ga


SHAPES = [(1, 100), (37, 10), (130, 100), (600, 100), (5, 1), (4, 2), (9, 1000), (3, 32000)]
# (label_smoothing, lam, reduction, threshold); lam None: no partner, "t": a 0-d tensor lam;
# threshold "mid": one 0-d tensor for all rows, "class": a (C,) tensor of per-class thresholds.
VARIANTS = [(0.0, None, "mean", "mid"), (0.1, None, "sum", "mid"), (0.0, 0.3, "mean", "mid"),
            (0.1, "t", "sum", "mid"), (0.1, 0.3, "sum", "class"), (0.0, "t", "mean", "class")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_matches_reference(dtype, shape, variant):
    """Odd N (1, not a multiple of the row tile; fused and split reductions) and C (1, 2, 1000,
    32000: the column-looping kernel), every dtype, smoothing, partner labels, both reductions,
    one threshold or per-class thresholds (indexed by the first label, also with a partner)."""
    smoothing, lam, reduction, thr_kind = variant
    logits, labels, labels_b = _inputs(*shape, dtype)
    kw = dict(label_smoothing=smoothing, reduction=reduction)
    if lam is not None:
        kw.update(labels_b=labels_b,
                  lam=torch.tensor(0.3, device=DEVICE) if lam == "t" else lam)
    ref = reference_masked_cross_entropy(logits, labels, math.inf, **kw).per_sample
    thr = _mid_threshold(ref) if thr_kind == "mid" else _class_thresholds(ref, shape[1])
    _assert_same(logits, labels, thr, **kw)


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


def _tie_and_split(per_sample, ref_per_sample, labels, n_classes):
    """(C,) fp32 thresholds: class 0 inf, 1 zero, 2 -inf, 3 exactly one of its losses (a row
    where both implementations agree bitwise, so the tie is the same tie), every other class
    the midpoint of two neighbouring losses in its middle. Returns (thresholds, tied row)."""
    thr = torch.empty(n_classes, device=per_sample.device)
    thr[:3] = torch.tensor([math.inf, 0.0, -math.inf])
    same = ((per_sample == ref_per_sample) & (labels == 3)).nonzero()
    assert same.numel(), "no class-3 row with bitwise-equal losses to tie on"
    tied = same[0, 0]
    thr[3] = per_sample[tied]
    for k in range(4, n_classes):
        s = per_sample[labels == k].sort().values
        assert s.numel() >= 2, f"class {k} needs two rows to be split"
        mid = (s.numel() - 1) // 2
        thr[k] = (s[mid] + s[mid + 1]) / 2
    return thr, tied


@pytest.mark.parametrize("kernel,reduction", [("tile", "mean"), ("tile", "sum"), ("loop", "mean")])
def test_per_class_thresholds(monkeypatch, kernel, reduction):
    """(C,) thresholds, each row against its own (first) label's class: inf keeps a class, 0
    and -inf drop it, a tie drops its row, a midpoint splits its class; the partner's class is
    not used; fp64 / fp16 thresholds compare in fp32, a strided one reads the right entries;
    nothing kept gives loss and grad 0, not NaN. "loop": the wide-row kernel, forced by
    4-column blocks over C = 6 (fewer, smaller cases: the interpreter runs one-row programs
    slowly)."""
    n, c = (60, 10) if kernel == "tile" else (24, 6)
    if kernel == "loop":
        monkeypatch.setattr(mce, "MAX_BLOCK_C", 4)
    logits, labels, labels_b = _inputs(n, c, torch.float32)
    for kw in (dict(reduction=reduction),
               dict(reduction=reduction, labels_b=labels_b, lam=0.3, label_smoothing=0.1)):
        full, _ = _assert_same(logits, labels, math.inf, **kw)
        ref = reference_masked_cross_entropy(logits, labels, math.inf, **kw).per_sample
        thr, tied = _tie_and_split(full.per_sample, ref, labels, c)
        strided = torch.stack([thr, -thr], 1)[:, 0]  # a (C,) view with stride 2
        for t in (thr, thr.double(), thr.half(), strided)[:1 if kernel == "loop" else 4]:
            out, grad = _assert_same(logits, labels, t, **kw)
            assert torch.equal(out.keep, full.per_sample < t.float()[labels])
            assert t.dtype == torch.float16 or not out.keep[tied]  # fp16 rounds the tie away
            assert out.keep[labels == 0].all() and not out.keep[(labels == 1) | (labels == 2)].any()
            split = labels >= 4
            assert 0 < out.keep[split].sum() < split.sum()
            assert not grad[~out.keep].any() and grad[out.keep].abs().sum(1).gt(0).all()
        if "labels_b" in kw:  # the test tells the first label's class from the partner's
            assert not torch.equal(out.keep, full.per_sample < thr[labels_b])
        nothing = [torch.zeros(c, device=DEVICE), torch.full((c,), -math.inf, device=DEVICE)]
        for t in nothing[:1 if kernel == "loop" else 2]:
            none, grad = _assert_same(logits, labels, t, **kw)
            assert not none.keep.any() and none.loss.item() == 0.0 and not grad.any()


# kernel: (N, C), module settings. One program for the batch; several 4-row tile programs
# (the last one partial); one-row programs over 4-column blocks (13 = 3 x 4 + 1 columns).
LAUNCHES = {"tile-fused": ((3, 10), {}),
            "tile-split": ((37, 10), dict(TILE_ELEMENTS=64, FUSED_MAX_ELEMENTS=0)),
            "loop": ((7, 13), dict(MAX_BLOCK_C=4))}


def _launch_setup(monkeypatch, kernel, seed=3):
    """Force `kernel`'s launches; fresh inputs (a seed no other test uses) with a partner."""
    shape, settings = LAUNCHES[kernel]
    for name, value in settings.items():
        monkeypatch.setattr(mce, name, value)
    logits, labels, labels_b = _inputs(*shape, torch.float32, seed=seed)
    return logits, labels, dict(labels_b=labels_b, lam=0.3, label_smoothing=0.1)


def _poison(shape, dtype, device):
    """What a reused allocation might hold: NaN, or True for a bool buffer."""
    return torch.full(shape, True if dtype == torch.bool else math.nan, dtype=dtype,
                      device=device)


@pytest.mark.parametrize("kernel", LAUNCHES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_output_element_written(monkeypatch, kernel, reduction):
    """Every output buffer starts as NaN (keep as True): each element of per_sample, keep,
    the saved gradient, loss, scale and the backward's output is written, whether every row,
    some or none is kept, and for an empty batch."""
    logits, labels, kw = _launch_setup(monkeypatch, kernel)
    monkeypatch.setattr(mce, "_empty", _poison)
    kw["reduction"] = reduction
    ref = reference_masked_cross_entropy(logits, labels, math.inf, **kw).per_sample
    for thr in (math.inf, -math.inf, _mid_threshold(ref)):  # every row kept, none, some
        out, grad = _assert_same(logits, labels, thr, **kw)
        thr_t, thr_v = (thr, 0.0) if isinstance(thr, torch.Tensor) else (None, thr)
        *_, raw, scale = mce._forward(logits, labels, kw["labels_b"], thr_t, thr_v, None, 0.3,
                                      0.1, reduction == "mean", True)
        kept = out.keep.sum().item()
        assert scale.item() == pytest.approx(1 / max(kept, 1) if reduction == "mean" else 1.0,
                                             rel=1e-7)
        torch.testing.assert_close(raw * (UPSTREAM * scale), grad, atol=0, rtol=1e-6)
    out, grad = _assert_same(logits[:0], labels[:0], 1.0, **{**kw, "labels_b": labels[:0]})
    assert out.loss.item() == 0.0


# Compiles for sm_90 without a GPU (Triton's own LLVM and ptxas) and reads the PTX; run
# without TRITON_INTERPRET, which would make every @triton.jit an interpreted function.
_PTX_CHECK = r"""
import inspect, re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fastcifar.kernels import masked_ce as mce

@triton.jit
def probe(a_ptr, b_ptr, out_ptr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    tl.store(out_ptr, tl.sum(tl.load(a_ptr + cols) * tl.load(b_ptr + cols), axis=0))

POINTERS = dict(labels_ptr="*i64", labels_b_ptr="*i64", keep_ptr="*i1")
FLOATS = ("thr_value", "lam_value", "label_smoothing")

def ptx(kernel, num_warps, **constexprs):
    sig = {name: "constexpr" if name in constexprs else POINTERS.get(name, "*fp32")
           if name.endswith("_ptr") else "fp32" if name in FLOATS else "i32"
           for name in inspect.signature(kernel.fn).parameters}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    target = GPUTarget("cuda", 90, 32)
    return triton.compile(src, target=target, options=dict(num_warps=num_warps)).asm["ptx"]

def uneven(code):
    # A cross-thread add of a partner's shuffled value and this thread's own product, fused
    # (fma) or not yet (mul: ptxas fuses it), which the partner adds rounded.
    shuffled = set(re.findall(r"shfl\.sync\.\w+\.b32\s+(%r\d+)", code))
    products = set(re.findall(r"\bmul(?:\.rn)?(?:\.ftz)?\.f32\s+(%r\d+)", code))
    fmas = re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\s+%r\d+, %r\d+, %r\d+, (%r\d+);", code)
    adds = re.findall(r"\badd(?:\.rn)?(?:\.ftz)?\.f32\s+%r\d+, (%r\d+), (%r\d+);", code)
    return sum(c in shuffled for c in fmas) + sum(
        bool({a, b} & shuffled and {a, b} & products) for a, b in adds)

assert uneven(ptx(probe, 4, BLOCK=128)), "the check no longer sees tl.sum(a * b)'s hazard"
flags = dict(HAS_B=True, THR_FROM_PTR=False, THR_PER_CLASS=True, LAM_FROM_PTR=False,
             WRITE_GRAD=True)
cases = [(mce._ce_loop_kernel, dict(BLOCK_C=4)), (mce._ce_loop_kernel, dict(BLOCK_C=16384))]
cases += [(mce._ce_tile_kernel, dict(FUSED_REDUCE=True, MEAN=True, ROWS=r, BLOCK_C=c))
          for r, c in ((4, 2), (64, 16), (256, 16), (1, 128), (32, 128))]
for kernel, consts in cases:
    warps = mce._num_warps(consts.get("ROWS", 1) * consts["BLOCK_C"])
    assert not uneven(ptx(kernel, warps, **flags, **consts)), (kernel.__name__, consts)
"""


def test_threads_sharing_a_row_sum_it_alike(tmp_path):
    """Compiled for an H200 (sm_90; no GPU needed), no reduction of the row kernels adds a
    thread's own unrounded product to the partner's rounded one. tl.sum(t * z) did, so threads
    holding one column each disagreed in the last bit of a loss; at a tie with the threshold
    an H200 then wrote a kept gradient into two columns of a row stored as dropped
    (test_per_class_thresholds[loop-mean]), which the interpreter, computing each sum once,
    cannot show."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])  # this checkout's kernels, not an install's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    script = tmp_path / "ptx_check.py"  # @triton.jit needs its source in a file
    script.write_text(_PTX_CHECK)
    run = subprocess.run([sys.executable, str(script)], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("kernel", ["tile-split", "loop"])
@pytest.mark.parametrize("seed", [1, 2])
def test_tied_rows_dropped_with_their_gradient(monkeypatch, kernel, seed):
    """Thresholds equal to losses (per class: the upper median of each class; 0-d: the
    median loss) drop the tied rows ("below" is strict), and keep, the gradient and the loss
    agree with one another row by row: keep is exactly per_sample < threshold, the gradient is
    zero exactly on dropped rows, the loss is the kept mean. Self-consistency, not a reference:
    the reference's losses may differ from ours in the last bit, which moves a tie. This broke
    on an H200 (see test_threads_sharing_a_row_sum_it_alike)."""
    logits, labels, kw = _launch_setup(monkeypatch, kernel, seed)
    full = triton_masked_cross_entropy(logits, labels, math.inf, **kw).per_sample
    per_class = torch.full((logits.shape[1],), math.inf, device=DEVICE)
    for k in labels.unique():
        losses = full[labels == k].sort().values
        per_class[k] = losses[losses.numel() // 2]
    for thr in (per_class, full.median()):
        out, grad = _run(triton_masked_cross_entropy, logits, labels, thr, **kw)
        row_thr = thr[labels] if thr.dim() else thr
        assert torch.equal(out.per_sample, full)  # deterministic, so a tie stays a tie
        assert torch.equal(out.keep, full < row_thr) and (full == row_thr).any()
        assert 0 < out.keep.sum() < out.keep.numel()
        assert not grad[~out.keep].any() and grad[out.keep].ne(0).any(1).all()
        torch.testing.assert_close(out.loss, full[out.keep].mean(), **LOSS_TOL)


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
    """Against torch's own per-sample CE in the logits' dtype, with a partner and smoothing;
    with one threshold and with per-class thresholds (masked mean and its gradient)."""
    logits, labels, labels_b = _inputs(64, 100, dtype)
    lam = 0.3
    kw = dict(labels_b=labels_b, lam=lam, label_smoothing=0.1)

    def native_ce(x):
        return lam * F.cross_entropy(x, labels, reduction="none", label_smoothing=0.1) + \
            (1 - lam) * F.cross_entropy(x, labels_b, reduction="none", label_smoothing=0.1)

    x = logits.clone().requires_grad_(True)
    ce = native_ce(x)
    (ce.float().mean() * UPSTREAM).backward()
    out, grad = _run(triton_masked_cross_entropy, logits, labels, math.inf, **kw)
    torch.testing.assert_close(out.per_sample, ce.detach().float(), **NATIVE_TOL[dtype])
    torch.testing.assert_close(out.loss, ce.detach().float().mean(), **NATIVE_TOL[dtype])
    torch.testing.assert_close(grad, x.grad, **NATIVE_TOL[dtype])
    ce = ce.detach().float()
    thr = _mid_threshold(out.per_sample)
    clear = (ce - thr).abs() > 0.1  # rows whose keep rounding cannot flip
    keep = triton_masked_cross_entropy(logits, labels, thr, **kw).keep
    assert torch.equal(keep[clear], (ce < thr)[clear])
    per_class = _class_thresholds(out.per_sample, 100, seed=1)
    out, grad = _run(triton_masked_cross_entropy, logits, labels, per_class, **kw)
    thr = per_class[labels]
    clear = (ce - thr).abs() > 0.1
    assert torch.equal(out.keep[clear], (ce < thr)[clear]) and 0 < out.keep.sum() < 64
    x = logits.clone().requires_grad_(True)
    kept_mean = torch.where(out.keep, native_ce(x).float(), 0.0).sum() / out.keep.sum()
    (kept_mean * UPSTREAM).backward()
    torch.testing.assert_close(out.loss, kept_mean.detach(), **NATIVE_TOL[dtype])
    torch.testing.assert_close(grad, x.grad, **NATIVE_TOL[dtype])


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


@pytest.mark.parametrize("kernel", ["tile", "loop"])
@pytest.mark.parametrize("thr_kind", ["scalar", "class"])
def test_invalid_label_is_nan_and_dropped(monkeypatch, kernel, thr_kind):
    """Label range is the caller's duty; the kernel never reads out of bounds for one. Per-class:
    labels +-2**31 would address the threshold 8 GiB away (a crash) if its load were unmasked."""
    if kernel == "loop":
        monkeypatch.setattr(mce, "MAX_BLOCK_C", 8)
    logits, labels, labels_b = _inputs(8, 10, torch.float32)
    labels[2], labels[5] = 10, -1
    if thr_kind == "class":
        labels[6], labels[7] = 2**31 - 1, -2**31
    thr = torch.full((10,), math.inf, device=DEVICE) if thr_kind == "class" else math.inf
    bad = labels.lt(0) | labels.ge(10)
    out, grad = _run(triton_masked_cross_entropy, logits, labels, thr)
    assert out.per_sample[bad].isnan().all() and out.per_sample[~bad].isfinite().all()
    assert torch.equal(out.keep, ~bad) and out.loss.isfinite() and not grad[bad].any()
    labels_b[0] = 12  # an invalid partner drops its row too
    out, grad = _run(triton_masked_cross_entropy, logits, labels, thr, labels_b=labels_b, lam=0.3)
    bad[0] = True
    assert out.per_sample[bad].isnan().all() and torch.equal(out.keep, ~bad)
    assert out.loss.isfinite() and not grad[bad].any()


def test_reference_invalid_labels_per_class():
    """The reference's per-class gather never fails first: an invalid label raises what
    F.cross_entropy raises, and its ignore_index (-100, loss 0) is dropped, as in Triton."""
    logits, labels, _ = _inputs(8, 10, torch.float32)
    thr = torch.full((10,), math.inf, device=DEVICE)
    cpu_logits, cpu_labels = logits.cpu(), labels.cpu()  # CUDA would assert, not raise
    for bad in (10, -1, -5):
        cpu_labels[2] = bad
        with pytest.raises(Exception) as want:
            F.cross_entropy(cpu_logits, cpu_labels, reduction="none")
        with pytest.raises(want.type):
            reference_masked_cross_entropy(cpu_logits, cpu_labels, thr.cpu())
    labels[2] = -100
    ref = reference_masked_cross_entropy(logits, labels, thr)
    tri = triton_masked_cross_entropy(logits, labels, thr)
    assert ref.per_sample[2] == 0 and not ref.keep[2] and torch.equal(ref.keep, tri.keep)


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
    (dict(threshold=torch.zeros(2)), r"one entry per class: shape \(3,\), got \(2,\)"),
    (dict(threshold=torch.zeros(1)), "one entry per class"),
    (dict(threshold=torch.zeros(3, 1)), r"0-d or \(3,\) floating tensor"),
    (dict(threshold=torch.zeros(3, dtype=torch.int64)), "floating tensor, got shape"),
    (dict(threshold=torch.tensor(2)), "floating tensor"),
    (dict(threshold=torch.zeros(3, device="meta")), "threshold is on meta"),
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


@pytest.mark.parametrize("thr_kind", ["0-d", "class"])
def test_custom_op_registration(thr_kind):
    """Schema, fake (meta) implementation and autograd registration of the compiled path,
    with a 0-d and a (C,) threshold tensor."""
    logits, labels, labels_b = _inputs(6, 10, torch.float32)
    thr = torch.tensor(3.0) if thr_kind == "0-d" else torch.linspace(1.0, 5.0, 10)
    thr, lam = thr.to(DEVICE), torch.tensor(0.3, device=DEVICE)
    args = (logits.requires_grad_(True), labels, labels_b, thr, 0.0, lam, 0.0, 0.1, True, True)
    torch.library.opcheck(mce.masked_ce_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("thr_kind", ["0-d", "class"])
def test_tiny_model_compiles_without_graph_breaks(thr_kind):
    """torch.compile(fullgraph=True) of a model using the loss matches eager, and a new
    threshold (a 0-d or a (C,) tensor) or lam (0-d) reuses the compiled graph."""
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
        # (C,): different values per class around thr, all changed between the two steps.
        thr = torch.tensor(thr) if thr_kind == "0-d" else thr + torch.linspace(-0.6, 0.6, 10)
        thr, lam = thr.to(DEVICE), torch.tensor(lam, device=DEVICE)
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
