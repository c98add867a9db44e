"""Shared benchmark machinery: the device and its peak rates, round timing, FLOP and launch counting,
peak memory, extra_info, and a JSON-lines log of every case as it finishes.

Every benchmark records facts in `benchmark.extra_info` (device, images/s, ms/step, and for model
steps FLOPs, TFLOP/s, MFU, the parameter-traffic floor, peak memory and CPU-side launches per
step); none asserts a time. Under `--benchmark-disable` (CI) each benchmark body runs once, one
timed round, so the bookkeeping below runs there too.

Environment: FASTCIFAR_BENCH_ROWS=PATH appends each case's facts (and each outcome) to PATH as it
finishes, so a run killed at a time limit keeps what it measured (fastcifar.bench.rowlog's hooks;
scripts/gpu_report.py reads it); FASTCIFAR_BENCH_ORDER=graphs,compiled,eager runs the cases with
a "graphs" parameter first, then "compiled", then "eager", then the rest (the GPU report: the
most telling rows first, the eager reference last, where a time limit may cut it).
"""
# Before torch or triton is imported (as tests/conftest.py): interpret Triton kernels without a GPU.
import os

from fastcifar.bench.benchreport import cuda_available

if not cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import re  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastcifar.backend import backend_flags  # noqa: E402
from fastcifar.bench.breakdown import round_seconds  # noqa: E402
from fastcifar.bench.launches import count_flops, profile_launches  # noqa: E402
from fastcifar.bench.rowlog import pytest_runtest_logreport, pytest_runtest_teardown  # noqa: E402,F401 (hooks)

ON_GPU = torch.cuda.is_available()
GPU_REASON = "needs a CUDA GPU"
COMPILE_REASON = ("torch.compile cases run on a CUDA GPU only: a first CPU compile of even a tiny "
                  "ConvNeXt takes about 2 minutes on 2 cores")
CUDAGRAPH_REASON = "CUDA graphs need a CUDA GPU"
ORDER_ENV = "FASTCIFAR_BENCH_ORDER"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "extended: extra option combinations; scripts/gpu_report.py leaves them out "
                   "(-m 'not extended') to stay within its 10-minute budget")


def pytest_collection_modifyitems(config, items):
    order = [v for v in os.environ.get(ORDER_ENV, "").split(",") if v]
    if order:
        def rank(item) -> int:  # the first listed value among the case's parameters
            values = set(getattr(getattr(item, "callspec", None), "params", {}).values())
            return min((i for i, v in enumerate(order) if v in values), default=len(order))

        items.sort(key=rank)  # stable: file order within each group


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    tflops16: float | None  # dense bf16/fp16 tensor-core peak (fp32 accumulate), TFLOP/s
    tflops32: float | None  # dense fp32 (non-tensor-core) peak, TFLOP/s
    mem_gbps: float | None  # DRAM bandwidth, GB/s (1e9 bytes/s)

    def peak_tflops(self, dtype: torch.dtype | None) -> float | None:
        return self.tflops16 if dtype in (torch.bfloat16, torch.float16) else self.tflops32


# (pattern on torch.cuda.get_device_name, case-insensitive; first match wins) -> peaks.
# Sources: NVIDIA datasheets (dense = half the "with sparsity" figures): H100 SXM/PCIe/NVL and
# H200 datasheets; A100 datasheet (40/80 GB, SXM/PCIe); L4, L40S, A10, T4, V100 datasheets;
# B200 from the HGX B200 datasheet divided by 8. GeForce: Ada/Ampere whitepapers, fp16 tensor
# with fp32 accumulate (what torch uses); RTX 4070 Super = 56 SMs x 512 FLOP/clk x 2.475 GHz.
_GPUS: tuple[tuple[str, float, float, float], ...] = (
    (r"GH200", 989.4, 66.9, 4000.0),
    (r"H200 NVL", 835.5, 60.0, 4800.0),
    (r"H200", 989.4, 66.9, 4800.0),  # same compute as H100 SXM, faster HBM3e
    (r"H100.*NVL", 835.5, 60.0, 3900.0),
    (r"H100.*PCIe", 756.5, 51.2, 2000.0),
    (r"H100", 989.4, 66.9, 3350.0),  # SXM5, "NVIDIA H100 80GB HBM3"
    (r"B200", 2250.0, 75.0, 8000.0),
    (r"A100.*(80GB.*PCIe|PCIe.*80GB)", 312.0, 19.5, 1935.0),
    (r"A100.*PCIe", 312.0, 19.5, 1555.0),
    (r"A100.*80GB", 312.0, 19.5, 2039.0),
    (r"A100", 312.0, 19.5, 1555.0),
    (r"L40S", 362.05, 91.6, 864.0),
    (r"\bL4\b", 121.0, 30.3, 300.0),
    (r"\bA10\b", 125.0, 31.2, 600.0),
    (r"RTX 4090", 165.2, 82.6, 1008.0),
    (r"RTX 4070 SUPER", 70.9, 35.5, 504.0),
    (r"RTX 3090", 71.0, 35.6, 936.0),
    (r"V100.*SXM", 125.0, 15.7, 900.0),
    (r"V100", 112.0, 14.0, 900.0),
    (r"\bT4\b", 65.0, 8.1, 320.0),
)


def spec_for(name: str) -> DeviceSpec:
    """Peak rates for a device name; None where unknown (a CPU, an unlisted GPU)."""
    for pattern, t16, t32, bw in _GPUS:
        if re.search(pattern, name, re.IGNORECASE):
            return DeviceSpec(name, t16, t32, bw)
    return DeviceSpec(name, None, None, None)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(scope="session")
def spec(device) -> DeviceSpec:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return spec_for(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(benchmark, fn: Callable[[], object], *, calls: int, rounds: int, device: torch.device,
                warmup: int = 0) -> list[float]:
    """Seconds of each timed round of `calls` calls of `fn`, run under the benchmark fixture.

    `warmup` untimed calls first (compilation, CUDA graph capture, allocator growth). A round is
    timed with CUDA events on a GPU (bracketing the round's work on the stream, then one
    synchronise) and perf_counter on the CPU. Under --benchmark-disable one round runs.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    seconds: list[float] = []

    def one_round():
        seconds.append(round_seconds(fn, calls, device.type == "cuda"))

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    return seconds


def timed_first_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, synchronised (the compile/capture cost when it is the first call)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def param_traffic_bytes(trainable: int, read_only: int) -> int:
    """The per-step floor of parameter traffic to DRAM, fp32 parameters and SGD with momentum.

    A trainable parameter is read at least once (forward/backward), its gradient written once,
    and the optimiser reads parameter, gradient and momentum and writes parameter and momentum:
    4 + 4 + 12 + 8 = 28 bytes. A frozen or evaluated parameter is read once: 4 bytes.
    Activations are not counted, so real traffic is higher.
    """
    return 28 * trainable + 4 * read_only


class Bench:
    """The benchmark fixture with the device: time rounds, count FLOPs, record facts."""

    def __init__(self, benchmark, device: torch.device, spec: DeviceSpec):
        self.benchmark, self.device, self.spec = benchmark, device, spec

    def rounds(self, fn: Callable[[], object], *, calls: int, rounds: int, warmup: int = 0) -> list[float]:
        """Timed rounds (see time_rounds); the peak GPU memory of the timed calls is recorded too."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        seconds = time_rounds(self.benchmark, fn, calls=calls, rounds=rounds, device=self.device, warmup=warmup)
        if self.device.type == "cuda":
            self.benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return seconds

    def first_call(self, fn: Callable[[], object]) -> float:
        return timed_first_call(fn, self.device)

    count_flops = staticmethod(count_flops)
    param_traffic_bytes = staticmethod(param_traffic_bytes)

    def launches(self, fn: Callable[[], object], steps: int = 1) -> dict:
        """CPU-side launch calls (kernel, graph, copy, fill) and GPU kernels per step of one call of
        `fn`, from torch.profiler; None on the CPU."""
        counts = profile_launches(fn)
        per_step = lambda v: None if v is None else v / steps  # noqa: E731
        return {"launches_per_step": per_step(counts["cpu_launch_calls"]),
                "gpu_kernels_per_step": per_step(counts["gpu_kernels"]),
                "graph_launches_per_step": per_step(counts["graph_launches"]),
                "launches_source": counts.get("error") or "torch.profiler: CUDA runtime/driver launch, copy and "
                                                           "fill calls"}

    def record(self, *, seconds_per_step: float, images_per_step: int, flops_per_step: int | None = None,
               dtype: torch.dtype | None = None, param_bytes_per_step: int | None = None, **facts) -> dict:
        """Put the standard facts in benchmark.extra_info (and return them).

        A "step" is what the caller says (an optimiser step, an evaluation batch); `facts` are
        added as given (phase, impl, batch ...), with the backend flags in force
        (fastcifar.backend.backend_flags). MFU = achieved FLOP/s / the device's dense peak
        for `dtype` (the 16-bit tensor-core peak for bf16/fp16, the fp32 peak otherwise); None
        where the peak is unknown (the CPU). param_floor_ms = parameter bytes / DRAM bandwidth.
        """
        spec = self.spec
        info = {"device": spec.name, "backend": backend_flags(), "images_per_s": images_per_step / seconds_per_step,
                "ms_per_step": seconds_per_step * 1e3, "images_per_step": images_per_step,
                "dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32"}
        if flops_per_step is not None:
            peak = spec.peak_tflops(dtype)
            achieved = flops_per_step / seconds_per_step / 1e12
            info.update(flops_per_step=flops_per_step,
                        flops_source="torch.utils.flop_counter, group-aware convolution backward",
                        tflops_per_s=achieved, peak_tflops=peak, mfu=achieved / peak if peak else None)
        if param_bytes_per_step is not None:
            floor = param_bytes_per_step / (spec.mem_gbps * 1e9) if spec.mem_gbps else None
            info.update(param_bytes_per_step=param_bytes_per_step, mem_gbps=spec.mem_gbps,
                        param_floor_ms=floor * 1e3 if floor is not None else None)
        info.update(facts)
        self.benchmark.extra_info.update(info)
        return info


@pytest.fixture
def bench(benchmark, device, spec) -> Bench:
    return Bench(benchmark, device, spec)
