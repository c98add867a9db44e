"""The GPU report's first part: is CUDA computing the right thing? Kernel, augmentation, one model step.

Each check returns a dict with "ok" and the numbers it judged by (errors as ‖a − b‖ / ‖b‖, or
max |a − b|), and never raises: a failure is recorded with its error and the next check runs.
    kernel      the Triton masked cross-entropy against the PyTorch reference on fresh random
                inputs: fp32/bf16/fp16, one-program and multi-program grids, label smoothing with
                a MixUp partner, a 0-d threshold that keeps about half; loss, per-sample losses,
                keep mask and the gradient (non-unit upstream);
    augment     train_augment on the device against the CPU, same keys (bit-exact up to 1e-5);
    model_step  the paper's model with dropout and drop-path off (one deterministic function in
                training mode): fp32 logits on the device against the CPU (precise_fp32), then one
                mixed-precision training step there (augment -> model -> masked loss -> SGD): its
                loss within bf16 rounding of the CPU's, finite gradients, parameters that moved;
    graph_step  the trainer's own steps captured as CUDA graphs against the same steps eagerly
                (a tiny model, fp32): the same parameters after a head, a full and a filtering
                epoch, and no fall-back from the graphs mode (precise_fp32 both ways).
Every check runs under the trainer's backend flags (`run_checks` calls setup_backend first).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch

from ..backend import precise_fp32, setup_backend
from ..config import AugmentConfig, ModelConfig
from .modes import function_modes, shared_mode

REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # ‖Δ‖/‖ref‖, loss and gradient
LOGIT_TOL = 1e-3  # fp32 model logits, device vs CPU (reduction order differs)
# The training step's loss (autocast dtype, None = fp32) vs the CPU's fp32 loss of the same function,
# relative. bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2% per rounding); through the
# whole ConvNeXt-B the logits then move by ~0.6% (max |dz| ~0.012 at random init, measured under
# CPU autocast), and a mean cross-entropy moves by at most 2 max|dz| (its gradient in z sums to
# 2 in absolute value), i.e. <= 0.5% of the ~4.6 nats at random init: 1% leaves a factor 2 for
# CUDA's own autocast choices. fp16 has 3 more bits (8x less). fp32: the reduction order only.
STEP_LOSS_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, None: 1e-4}
UPSTREAM = 2.5  # a non-unit upstream gradient
MOVED_SHARE = 0.95  # of the parameters, changed by one SGD step (weight decay moves even a zero gradient's)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 on the CPU (0 when both are zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    ref = float(b.norm())
    diff = float((a - b).norm())
    return diff / ref if ref else diff


def _kernel_case(n: int, c: int, dtype: torch.dtype, device: torch.device, g: torch.Generator,
                 mix: bool) -> dict:
    from fastcifar.kernels.masked_ce import triton_masked_cross_entropy
    from fastcifar.kernels.reference import reference_masked_cross_entropy

    logits = (torch.randn(n, c, generator=g) * 3).to(dtype).to(device)
    labels, labels_b = (torch.randint(0, c, (n,), generator=g).to(device) for _ in range(2))
    kw = dict(label_smoothing=0.1, labels_b=labels_b, lam=torch.tensor(0.7, device=device)) if mix else {}
    probe = reference_masked_cross_entropy(logits.float(), labels, math.inf, **kw).per_sample
    threshold = probe.median() + 1e-3  # keeps about half, with no tie at the threshold

    def run(fn):
        x = logits.clone().requires_grad_(True)
        out = fn(x, labels, threshold, **kw)
        (out.loss * UPSTREAM).backward()
        return out, x.grad

    (ours, grad), (ref, ref_grad) = run(triton_masked_cross_entropy), run(reference_masked_cross_entropy)
    errs = {"loss": rel_err(ours.loss, ref.loss), "per_sample": rel_err(ours.per_sample, ref.per_sample),
            "grad": rel_err(grad, ref_grad)}
    # A sample whose loss sits within rounding of the threshold may fall either side.
    near = (ref.per_sample - threshold).abs() < 1e-3 * threshold.abs()
    keep_ok = bool(((ours.keep == ref.keep) | near).all())
    ok = keep_ok and all(math.isfinite(e) and e <= REL_TOL[dtype] for e in errs.values())
    return {"shape": [n, c], "dtype": str(dtype).replace("torch.", ""), "mix": mix, "keep_equal": keep_ok,
            "rel_err": errs, "ok": ok}


def check_kernel(device: torch.device, seed: int = 0) -> dict:
    """The Triton kernel vs the reference on several shapes and dtypes (small ones on the CPU,
    where the kernel runs through Triton's interpreter)."""
    g = torch.Generator().manual_seed(seed)
    big = device.type == "cuda"
    cases = [(100, 100, torch.float32, False), (100, 100, torch.bfloat16, False),
             ((4096 if big else 300), 100, torch.float16, False),  # several programs + the reduction
             ((37 if big else 9), (1000 if big else 130), torch.float32, True)]
    results = [_kernel_case(n, c, dt, device, g, mix) for n, c, dt, mix in cases]
    return {"ok": all(r["ok"] for r in results), "cases": results}


def check_augment(device: torch.device, seed: int = 0) -> dict:
    """train_augment (the paper's pipeline) on `device` against the CPU, same keys."""
    from fastcifar.augment import train_augment

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    indices = torch.randperm(1000, generator=g)[:64]
    cfg = AugmentConfig()
    cpu = train_augment(images, indices, seed=5, epoch=3, cfg=cfg)
    dev = train_augment(images.to(device), indices.to(device), seed=5, epoch=3, cfg=cfg)
    diff = float((dev.cpu() - cpu).abs().max())
    out = {"max_abs_diff": diff, "ok": diff <= 1e-5 and dev.device.type == device.type}
    if device.type == "cpu":
        out["note"] = "the device is the CPU: both sides ran there"
    return out


def _without_randomness(model: torch.nn.Module) -> int:
    """Switch dropout and drop-path (timm's `drop_prob`) off in place; returns how many were on.

    Then a training-mode forward computes the same function on every device (batch-norm layers,
    where a backbone has them, use the batch's statistics on both sides alike)."""
    found = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p:
            m.p, found = 0.0, found + 1
        if getattr(m, "drop_prob", 0.0):
            m.drop_prob, found = 0.0, found + 1
    return found


def check_model_step(device: torch.device, model_name: str, seed: int = 0, amp: str = "auto") -> dict:
    """One training step of the paper's model on the device against the same function on the CPU.

    The model is built as the trainer builds it, then dropout and drop-path are switched off, so
    both sides compute one deterministic function in training mode (the first H200 run compared a
    dropout-0.5 step with an eval-mode loss: 10% apart by design). Judged: the fp32 logits, device
    vs CPU (precise_fp32); the step's loss under `amp` (the trainer's autocast) vs the CPU's fp32
    loss, within STEP_LOSS_TOL for that precision; finite gradients; parameters that moved.
    """
    from fastcifar.augment import train_augment
    from fastcifar.kernels import masked_cross_entropy
    from fastcifar.model import build_model, resolve_precision

    torch.manual_seed(seed)
    cpu_model = build_model(ModelConfig(name=model_name, pretrained=False, compile="off")).train()
    switched_off = _without_randomness(cpu_model)
    model = copy.deepcopy(cpu_model).to(device)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (8,), generator=g)
    x = train_augment(images, torch.arange(8), seed=seed, epoch=0, cfg=AugmentConfig())
    with torch.no_grad(), precise_fp32():
        ref, got = cpu_model(x), model(x.to(device))
    logit_err = rel_err(got, ref)
    ref_loss = float(torch.nn.functional.cross_entropy(ref, labels))

    precision = resolve_precision(amp, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    before = [p.detach().clone() for p in model.parameters()]
    with precision.autocast(device):
        logits = model(x.to(device))
    loss = masked_cross_entropy(logits, labels.to(device), math.inf).loss  # inf keeps all: plain mean CE
    loss.backward()
    grads_finite = all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
    opt.step()
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    step_loss = float(loss.detach())
    loss_err = abs(step_loss - ref_loss) / abs(ref_loss)
    tol = STEP_LOSS_TOL[precision.dtype]
    ok = (logit_err <= LOGIT_TOL and math.isfinite(step_loss) and grads_finite
          and moved >= MOVED_SHARE * len(before) and loss_err <= tol)
    return {"model": model_name, "logits_rel_err": logit_err, "step_loss": step_loss, "cpu_loss": ref_loss,
            "step_loss_rel_diff": loss_err, "step_loss_tol": tol, "grads_finite": grads_finite,
            "params_moved": moved, "params": len(before), "randomness_switched_off": switched_off,
            "amp": str(precision.dtype).replace("torch.", "") if precision.dtype else "off", "ok": ok}


def _engine_run(device: torch.device, modes, steps: int, capture=None) -> tuple[dict, dict, dict]:
    """The smoke preset's tiny test ConvNeXt (fp32, dropout 0) through `steps` steps of a head,
    a full and a filtering epoch on synthetic data: (parameters, {function: the mode it ran in},
    evaluation)."""
    from fastcifar.config import build_config
    from fastcifar.distributed import DistInfo
    from fastcifar.engine import Engine
    from fastcifar.model import build_model, resolve_precision
    from fastcifar.optim import PhaseSGD
    from fastcifar.schedule import build_schedule
    from fastcifar.bench.synthetic import synthetic_loaders

    cfg = build_config("smoke", {"model.name": "test_convnext", "model.dropout": "0", "model.amp": "off",
                                 "run.device": device.type, "train.batch_size": "32", "train.test_batch_size": "64",
                                 "train.frozen_chunk": "64"})
    single = DistInfo(0, 1, 0)
    loaders = synthetic_loaders(cfg, num_train=512, num_test=128, noise=0.4)(device, single)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    none = torch.zeros(loaders.num_train, dtype=torch.bool)
    engine = Engine(cfg, model, PhaseSGD(model, cfg.optim, device), torch.amp.GradScaler(device.type, enabled=False),
                    resolve_precision("off", device), device, single, build_schedule(cfg), none, none,
                    num_samples=loaders.num_train, image_shape=loaders.train.image_shape,
                    max_steps=loaders.train.num_batches(), modes=modes, capture=capture, log=lambda line: None)
    for epoch in (0, cfg.train.freeze_epochs, cfg.filter.start_epoch):  # head, full, full+filter
        engine.train_epoch(epoch, loaders.train.epoch(epoch), steps)
    evaluation = engine.evaluate(loaders.test.epoch(0), tta=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, function_modes(engine), evaluation


def check_graph_step(device: torch.device, steps: int = 6, capture=None) -> dict:
    """fastcifar's own steps captured as CUDA graphs (the frozen chunk, the head, the full step,
    evaluation) against the same steps eagerly, from the same start: the parameters after every
    phase, and the graphs mode must be what ran (no fall-back). precise_fp32: fp32 both ways.
    capture: a stand-in for CUDA-graph capture (the CPU tests'); without one, CUDA only."""
    from fastcifar.graphs import EAGER, Mode

    if capture is None and device.type != "cuda":
        return {"ok": None, "skipped": "CUDA graphs need a CUDA device"}

    with precise_fp32():
        eager, _, eager_eval = _engine_run(device, [EAGER], steps)
        graphed, modes, graphed_eval = _engine_run(device, [Mode("graphs"), EAGER], steps, capture)
    err = max(rel_err(graphed[k], eager[k]) for k in eager)
    mode = shared_mode(modes)  # every function must have run captured: a fall-back is not a pass
    ok = mode == "graphs" and err <= 1e-3 and abs(graphed_eval["val_loss"] - eager_eval["val_loss"]) <= 1e-3
    return {"mode_ran": mode, "function_modes": ", ".join(f"{k}: {v}" for k, v in modes.items()),
            "params_max_rel_err": err, "val_loss_graphs": graphed_eval["val_loss"],
            "val_loss_eager": eager_eval["val_loss"], "ok": ok}


def run_checks(device: torch.device, model_name: str, save: Callable[[dict], None]) -> dict:
    """Every check in turn, `save(results so far)` after each (a killed run keeps what it did), under
    the backend flags the trainer sets (fastcifar.backend.setup_backend)."""
    setup_backend(device)
    checks = {"kernel": lambda: check_kernel(device), "augment": lambda: check_augment(device),
              "model_step": lambda: check_model_step(device, model_name),
              "graph_step": lambda: check_graph_step(device)}
    results: dict = {}
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            results[name] = check()
        except Exception as e:  # noqa: BLE001 (recorded, and the next check still runs)
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        save(results)
    return results
