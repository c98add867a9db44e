"""The peer: the paper's model written the plain way a user would, without fastcifar, timed per step.

timm's model with a `num_classes` head, randomly initialised, channels_last; a batch already on
the device (no loader, no augmentation); bf16 autocast; per-sample cross-entropy with a
small-loss mask (threshold 2.0, as the paper's filtering starts); `torch.optim.SGD(fused=True)`;
the model through `torch.compile(mode="reduce-overhead")` (inductor's own CUDA graphs, hence
`torch.compiler.cudagraph_mark_step_begin()` every step); the trainer's backend flags
(fastcifar.backend.setup_backend). The GPU report times it beside our graphed full step: every
speed claim is a ratio measured side by side (issue 19).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..backend import backend_flags, setup_backend
from .breakdown import event_ms

THRESHOLD = 2.0  # nats: the paper's small-loss threshold where filtering starts


def peer_step(model_name: str, device: torch.device, *, batch: int = 100, num_classes: int = 100,
              size: int = 32, compile_mode: str | None = "reduce-overhead", seed: int = 0) -> Callable[[], None]:
    """One training step of the plain model per call; compile_mode None: eager (the CPU tests)."""
    import timm

    setup_backend(device)
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=True)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model

    def step() -> None:
        if compile_mode:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = net(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        keep = losses < THRESHOLD
        loss = (losses * keep).sum() / keep.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step.model = model  # the plain (uncompiled) module, for callers that look at its parameters
    return step


def time_peer(model_name: str, device: torch.device, *, batch: int = 100, compile_mode: str | None = "reduce-overhead",
              warmup: int = 5, calls: int = 20, rounds: int = 5) -> dict:
    """ms per training step of the peer (median of `rounds` rounds of `calls` steps, CUDA events),
    after `warmup` steps; the first step's seconds are the compilation (and the graph recording)."""
    step = peer_step(model_name, device, batch=batch, compile_mode=compile_mode)
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    timed = event_ms(step, calls=calls, rounds=rounds, warmup=warmup, device=device)
    return {"model": model_name, "batch": batch, "compile_mode": compile_mode or "eager", "first_step_s": first,
            "ms_per_step": timed["ms"], "rounds_ms": timed["rounds_ms"], "calls_per_round": calls,
            "timer": timed["timer"], "backend": backend_flags(),
            "what": "timm model, 100-class head, data on the device, no augmentation, channels_last, bf16 "
                    "autocast, fused SGD, per-sample CE with a small-loss mask"}
