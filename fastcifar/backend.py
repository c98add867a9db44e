"""One set-up of the compute backend (cuDNN autotuning, TF32, determinism) for every entry point.

The trainer, the step benchmarks, the GPU report and its checks all call `setup_backend`, so a
benchmark times the kernels `make train` runs: cuDNN without `benchmark` picks other (on an H200,
measured 2026-12-04: far slower) convolution algorithms than with it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch


def setup_backend(device: torch.device, *, deterministic: bool = False) -> dict:
    """Set torch's global backend flags for training on `device`; returns them (for reports).

    deterministic: bitwise-repeatable kernels (cuBLAS workspace pinned, no cuDNN autotuning).
    Otherwise on CUDA, shapes are static, so cuDNN times its algorithms once per shape and keeps
    the fastest. fp32 matmuls and convolutions may use TF32 ("high" precision): the presets run
    under bf16 autocast, where this only touches the few fp32 ops, and fp32 runs gain the
    tensor cores. `precise_fp32()` turns TF32 off where a check compares fp32 results.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses otherwise
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    return backend_flags()


def backend_flags() -> dict:
    """The flags in force now (what a report records next to its timings)."""
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


@contextmanager
def precise_fp32() -> Iterator[None]:
    """TF32 off inside (fp32 comparisons between devices or modes); the previous flags after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
