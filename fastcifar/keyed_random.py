"""Counter-based keyed randomness: (seed, epoch, sample index, stream) -> uniform floats, no RNG state.

A sample's random numbers are a pure function of its key, so it gets the same augmentation in
a given epoch whatever the batch size, order, device or number of processes, and nothing here
reads or advances torch's (or anyone's) global generator.

The hash works on 32-bit lanes held in int64 tensors (or Python ints: the same code runs on
both). Both multipliers are below 2**31, so a lane times a multiplier stays below 2**63 and no
intermediate ever relies on signed overflow; integer ops are exact on CPU and CUDA, so the
bits, and the floats made from their top 24 of them, are identical on every device.
"""

from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
_MUL1 = 0x21F0AAAD  # multipliers of a low-bias 32-bit finaliser (Wellons' hash-prospector)
_MUL2 = 0x735A2D97
_WEYL = 0x9E3779B9  # golden-ratio increment: successive counters land far apart before mixing

# Streams: one per kind of decision, so adding a draw to one never shifts another.
TRAIN, ERASE_NOISE, MIX_PERM, MIX_BATCH = range(1, 5)


def mix32(h):
    """Bijective avalanche mix of 32-bit values; `h` is a Python int or an int64 tensor in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * _MUL1) & MASK32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & MASK32
    return h ^ (h >> 15)


def _absorb(h, value):
    """Fold one more 32-bit word into a running hash (Python int or tensor)."""
    return mix32(((h ^ (value & MASK32)) + _WEYL) & MASK32)


def stream_key(*words: int) -> int:
    """A 32-bit host-side key from Python ints >= 0: (seed, epoch, stream) or (seed, epoch, stream, step)."""
    h = 0x5EED5EED
    for word in words:
        if word < 0:
            raise ValueError(f"keys are built from ints >= 0, got {words}")
        while True:  # absorb every 32-bit limb, so large seeds stay distinct
            h = _absorb(h, word & MASK32)
            word >>= 32
            if not word:
                break
    return h


def weyl_counters(count: int, device: torch.device) -> torch.Tensor:
    """(count,) int64: the per-word counter offsets of `keyed_bits`. Traced code gets them made
    beforehand: `arange(...) * _WEYL` inside a compiled function becomes an index expression
    (2654435769 * x0) that inductor's Triton code evaluates in int32, which fails to compile (the
    H200, torch 2.11, 2026-12-04), where a tensor made outside is loaded as int64."""
    return torch.arange(1, count + 1, dtype=torch.int64, device=device) * _WEYL


def keyed_bits(key: int | torch.Tensor, indices: torch.Tensor, count: int,
               counters: torch.Tensor | None = None) -> torch.Tensor:
    """Random 32-bit words, int64 (N, count), for the samples `indices` (N,) int64 in [0, 2**32).

    key: an int, or a 0-d int64 tensor (what a compiled or captured step passes, so the key can
    change between epochs without a recompile). counters: `weyl_counters(count, device)`, made
    outside traced code (see there); None makes them here, which eager callers may do."""
    h = _absorb(key, indices.to(torch.int64)).unsqueeze(-1)
    if counters is not None and counters.shape != (count,):
        raise ValueError(f"counters must have shape ({count},), got {tuple(counters.shape)}")
    if counters is None:
        # One word needs no tensor (a Python int is a typed constant to inductor).
        counters = _WEYL if count == 1 else weyl_counters(count, indices.device)
    return mix32((h + counters) & MASK32)


def choice(bits: torch.Tensor, n) -> torch.Tensor:
    """Map 32-bit words to integers uniform in [0, n) (n an int or an int64 tensor <= 2**31)."""
    return (bits * n) >> 32


def keyed_uniform(key: int, indices: torch.Tensor, count: int) -> torch.Tensor:
    """Uniform float32 in [0, 1), shape (N, count), one row per sample of `indices` (N,) int64."""
    return (keyed_bits(key, indices, count) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def keyed_normal(key: int, indices: torch.Tensor, count: int) -> torch.Tensor:
    """Standard normal float32 (N, count) by the inverse CDF of a keyed uniform in (-1, 1).

    The integer bits are identical on every device; erfinv may differ in the last ulp.
    """
    bits = keyed_bits(key, indices, count)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (2.0 / (1 << 24)) - 1.0  # never -1 or 1
    return torch.special.erfinv(u) * 2.0**0.5


def batch_generator(*words: int) -> np.random.Generator:
    """A fresh numpy generator for per-batch scalars (a Beta draw, a box), keyed by Python ints >= 0."""
    return np.random.default_rng(list(words))
