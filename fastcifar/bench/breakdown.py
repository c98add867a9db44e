"""Where a step's GPU time goes: its kernels from torch.profiler, by category, and CUDA-event timing.

`classify_kernel` sorts a kernel by its name (cuDNN, CUTLASS, cuBLAS, inductor's Triton kernels,
ATen's, ours) into CATEGORIES; `summarise` turns (name, µs) records of some steps into ms per
step and share per category plus the top kernels; `profile_kernels` reads those records from
torch.profiler's CUDA activity (CUPTI); `step_breakdown` puts it together for a step captured
as a CUDA graph: CUPTI on recent drivers reports the kernels inside graph replays; where it
reports only `cudaGraphLaunch`, the compiled step is profiled uncaptured instead, and the result
says which. inductor fuses the augmentation into the step's own kernels, so it cannot be told
apart by name: it is timed alone (compiled, CUDA events) and reported beside. Only
`profile_kernels`, `event_ms` and `step_breakdown` touch torch; the rest is pure.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Callable, Iterable

CATEGORIES = ("convolutions", "matmuls (GEMM)", "normalisation and pointwise", "optimizer", "augmentation",
              "loss", "copies", "other")
TOP = 15  # kernels listed by time

# (category, pattern on the kernel name, case-insensitive); the first match wins, so the order
# settles names that fit two: a cuDNN layout transform is a copy, an inductor kernel that fuses a
# convolution's backward epilogue is pointwise, a cuDNN implicit GEMM is a convolution.
_RULES = (
    ("loss", r"^_ce_|^_reduce_kernel|cross_entropy|nll_loss|log_?softmax"),  # ours: kernels/masked_ce.py
    ("optimizer", r"multi_tensor_apply|fused_?sgd|foreach|_fused_adam"),
    ("copies", r"^memcpy|^memset|nhwctonchw|nchwtonhwc|copy_kernel|catarraybatchedcopy|transpose_readwrite"),
    ("normalisation and pointwise", r"^triton_(poi|red|per)_"),  # inductor's generated kernels
    ("convolutions", r"^triton_tem_fused_.*conv|conv|fprop|dgrad|wgrad|implicit_gemm|implicit_convolve|cudnn"),
    ("matmuls (GEMM)", r"^triton_tem_|gemm|gemv|cutlass|cublas|nvjet|xmma|s16816|s1688|splitkreduce"),
    ("augmentation", r"grid_sampler|augment|erase"),
    ("normalisation and pointwise", r"elementwise|reduce_kernel|norm|softmax|gelu|vectorized|unrolled|index|"
                                    r"fill|where|scatter|gather"),
)
_COMPILED = tuple((category, re.compile(pattern, re.IGNORECASE)) for category, pattern in _RULES)


def classify_kernel(name: str) -> str:
    """The category (one of CATEGORIES) of a GPU kernel or copy, from its name as the profiler gives it."""
    short = re.sub(r"^void\s+", "", name.strip())
    for category, pattern in _COMPILED:
        if pattern.search(short):
            return category
    return "other"


def summarise(records: Iterable[tuple[str, float]], steps: int, top: int = TOP) -> dict:
    """(kernel name, µs) records of `steps` steps -> GPU ms per step, per category (ms per step,
    share of the kernel time, kernels per step) and the `top` kernels by time (name, category,
    ms and calls per step, share)."""
    by_name: dict[str, list[float]] = {}
    for name, us in records:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    total_us = sum(us for us, _ in by_name.values())
    cats = {c: {"ms_per_step": 0.0, "share": 0.0, "kernels_per_step": 0.0} for c in CATEGORIES}
    for name, (us, n) in by_name.items():
        c = cats[classify_kernel(name)]
        c["ms_per_step"] += us / 1e3 / steps
        c["kernels_per_step"] += n / steps
    for c in cats.values():
        c["share"] = c["ms_per_step"] * 1e3 * steps / total_us if total_us else 0.0
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"steps_profiled": steps, "gpu_ms_per_step": total_us / 1e3 / steps,
            "kernels_per_step": sum(n for _, n in by_name.values()) / steps, "categories": cats,
            "top": [{"name": name[:200], "category": classify_kernel(name), "ms_per_step": us / 1e3 / steps,
                     "calls_per_step": n / steps, "share": us / total_us if total_us else 0.0}
                    for name, (us, n) in ranked]}


def profile_kernels(fn: Callable[[], object], calls: int) -> tuple[list[tuple[str, float]], int]:
    """(kernel name, µs) of every GPU kernel, copy and fill that `calls` calls of `fn` ran, from
    torch.profiler's CUDA activity, and how many cudaGraphLaunch calls the CPU made."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels, graph_launches = [], 0
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels.append((e.name, float(e.time_range.end - e.time_range.start)))
        elif "GraphLaunch" in e.name:
            graph_launches += 1
    return kernels, graph_launches


def round_seconds(fn: Callable[[], object], calls: int, cuda: bool) -> float:
    """Seconds of `calls` calls of `fn`: CUDA events bracketing the round's work on the stream (then
    one synchronise) on a GPU, perf_counter on the CPU."""
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - t0
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def event_ms(fn: Callable[[], object], *, calls: int, rounds: int, warmup: int = 0, device=None) -> dict:
    """Milliseconds per call of `fn`: the median of `rounds` rounds of `calls` calls, each round
    timed with CUDA events on a GPU (perf_counter on the CPU), after `warmup` untimed calls."""
    import torch

    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    per_call = [round_seconds(fn, calls, cuda) * 1e3 / calls for _ in range(rounds)]
    return {"ms": statistics.median(per_call), "rounds_ms": per_call, "calls": calls,
            "timer": "CUDA events" if cuda else "perf_counter"}


def step_breakdown(step: Callable[[], object], *, uncaptured: Callable[[], object] | None = None,
                   augment: Callable[[], object] | None = None, calls: int = 5) -> dict:
    """The kernel-time breakdown of `step` (a captured CUDA graph's replay, already warm), with
    the step and the augmentation alone timed by CUDA events beside it.

    uncaptured: the same step compiled but not captured, profiled instead when the profiler sees
    no kernel inside graph replays; augment: the step's augmentation alone, compiled."""
    kernels, launches = profile_kernels(step, calls)
    source = "graph replays (the profiler sees the kernels inside the CUDA graph)"
    if not kernels and uncaptured is not None:
        uncaptured()  # its own first call (allocations) stays out of the profile
        kernels, _ = profile_kernels(uncaptured, calls)
        source = ("the compiled step, not captured: in graph replays the profiler saw only "
                  f"cudaGraphLaunch ({launches} calls)")
    out = summarise(kernels, calls)
    out.update(source=source, graph_launches_per_step=launches / calls,
               step_ms_cuda_events=event_ms(step, calls=20, rounds=3)["ms"])
    if augment is not None:
        out["augmentation_ms_cuda_events"] = event_ms(augment, calls=20, rounds=3, warmup=3)["ms"]
        out["augmentation_note"] = ("the step's augmentation alone, compiled (fullgraph, static shapes), "
                                    "CUDA events; inside the step inductor fuses it into the model's first kernels")
    return out
