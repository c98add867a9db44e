"""Masked cross-entropy benchmarks: Triton vs eager PyTorch vs the torch.compile'd reference.

Run with `pytest benchmarks/test_bench_loss.py --benchmark-only` on a CUDA machine. Each timed
round makes LOOPS calls and synchronises once, so the per-call time includes the Python and
launch overhead that dominates at (100, 100); extra_info holds us per call and GB/s.

GB/s is always computed from Triton's traffic model, whatever the implementation, so the
numbers compare like with like: forward reads the logits and writes their gradient
(2 * N * C * itemsize bytes), backward reads and rescales that gradient (2 * N * C * itemsize),
full does both (4 * N * C * itemsize). "eager" is the plain-PyTorch reference (per-sample
F.cross_entropy in fp32, as autocast would run it, then compare, masked mean and autograd).
Each case runs with one 0-d threshold tensor and with a (C,) tensor of per-class thresholds
(same group, so the cost of the per-class gather shows beside the scalar compare).
"""
import functools
import time

import pytest
import torch

from fastcifar.kernels.reference import reference_masked_cross_entropy

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="the loss benchmarks need a CUDA GPU")

SHAPES = [(100, 100), (500, 100), (4096, 1000), (4096, 32000)]
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = ["triton", "eager", "compiled"]
MODES = ["forward", "backward", "full"]
THRESHOLDS = ["0-d", "per-class"]
ROUNDS = 20  # timed rounds; pytest-benchmark reports their statistics


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference_masked_cross_entropy, dynamic=False)


def _loss_fn(impl):
    if impl == "triton":
        from fastcifar.kernels.masked_ce import triton_masked_cross_entropy
        return triton_masked_cross_entropy
    return reference_masked_cross_entropy if impl == "eager" else _compiled_reference()


def make_case(impl, mode, n, c, dtype, device, thr_kind="0-d"):
    """A zero-argument callable doing one `mode` step of `impl` on (n, c) logits of `dtype`,
    with a 0-d threshold or (thr_kind "per-class") a (c,) fp32 tensor of per-class ones."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, c, device=device, dtype=dtype, generator=g).requires_grad_(True)
    labels = torch.randint(0, c, (n,), device=device, generator=g)
    with torch.no_grad():  # keep about half the batch, as the filter does mid-training
        losses = reference_masked_cross_entropy(logits, labels, float("inf")).per_sample
        threshold = losses.median()
        if thr_kind == "per-class":  # +-20% around the median: still about half kept
            jitter = torch.empty(c, device=device).uniform_(0.8, 1.2, generator=g)
            threshold = threshold * jitter
    fn = _loss_fn(impl)

    def forward():
        return fn(logits, labels, threshold, label_smoothing=0.1).loss

    if mode == "forward":
        return forward
    if mode == "full":
        return lambda: torch.autograd.grad(forward(), logits)
    loss = forward()  # backward alone: replay the same graph
    return lambda: torch.autograd.grad(loss, logits, retain_graph=True)


def _bytes_moved(mode, n, c, dtype):
    per_pass = 2 * n * c * torch.empty((), dtype=dtype).element_size()
    return 2 * per_pass if mode == "full" else per_pass


def _peak_gbps():
    """Nominal DRAM bandwidth from the device properties (double data rate), if reported."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("thr_kind", THRESHOLDS)
def test_bench_masked_ce(benchmark, thr_kind, impl, mode, shape, dtype):
    n, c = shape
    step = make_case(impl, mode, n, c, dtype, "cuda", thr_kind)
    loops = 100 if n * c <= 1_000_000 else 10  # calls per round: amortise one sync

    def run():
        for _ in range(loops):
            step()
        torch.cuda.synchronize()

    for _ in range(3):  # compile, autotune caches, allocator warm-up
        run()
    benchmark.group = f"{mode} {n}x{c} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), impl=impl, mode=mode,
                                n=n, c=c, dtype=str(dtype), threshold=thr_kind,
                                loops_per_round=loops)
    start = time.perf_counter()
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    seconds = (benchmark.stats.stats.median if benchmark.stats else
               (time.perf_counter() - start) / (ROUNDS + 1)) / loops
    gbps = _bytes_moved(mode, n, c, dtype) / seconds / 1e9
    peak = _peak_gbps()
    benchmark.extra_info.update(us_per_call=seconds * 1e6, GBps=gbps, peak_GBps=peak,
                                fraction_of_peak=gbps / peak if peak else None)
