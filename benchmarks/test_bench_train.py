"""Benchmarks: the model step of every phase, and whole epochs of the real Engine.

Steps (the model alone, on already-augmented inputs, with the masked loss and SGD): head-only
training (a no-grad backbone pass over a chunk of train.frozen_chunk images, then the head's
optimiser steps over it, as the Engine does), full fine-tuning, evaluation and flip TTA; each
eager, torch.compile'd (default mode) and compiled with CUDA graphs (mode="reduce-overhead"),
channels_last on and off, at the paper's batch and a larger one. Epochs: fastcifar's Engine over
synthetic CIFAR-shaped data in memory, augmentation included, as `python -m fastcifar.train`
runs them. On a GPU: ConvNeXt-Base at 32x32 with the paper's sizes; on the CPU: timm's tiny
test_convnext at small sizes, eager only.
"""

from __future__ import annotations

import gc
import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from fastcifar import augment
from fastcifar.config import ModelConfig, build_config
from fastcifar.distributed import DistInfo
from fastcifar.kernels import masked_cross_entropy
from fastcifar.model import build_model, count_parameters, resolve_precision, set_backbone_trainable
from fastcifar.synthetic import random_inputs, synthetic_loaders

ON_GPU = torch.cuda.is_available()
MODEL = "convnext_base" if ON_GPU else "test_convnext"
SMALL, LARGE = (100, 500) if ON_GPU else (8, 16)  # images per step: the paper's train batch, a larger one
CHUNK = 1000 if ON_GPU else 32  # images per no-grad backbone pass while frozen (train.frozen_chunk)
ROUNDS, WARMUP = (10, 3) if ON_GPU else (1, 0)  # timed rounds; untimed calls after the first
EPOCH_ROUNDS = 2 if ON_GPU else 1
N_TRAIN, N_TEST = (50_000, 10_000) if ON_GPU else (256, 128)
PHASES = ("head", "full", "eval", "tta")
IMPLS = ("eager", "compile", "cudagraphs")
# What scripts/gpu_report.py runs (-m "not extended"): each phase at the size the schedule uses
# with its most telling implementations; the rest of the grid is marked `extended`.
CORE = {("full", "eager", True, SMALL), ("full", "compile", True, SMALL), ("full", "cudagraphs", True, SMALL),
        ("full", "eager", False, SMALL), ("head", "eager", True, SMALL), ("head", "cudagraphs", True, SMALL),
        ("eval", "eager", True, LARGE), ("eval", "cudagraphs", True, LARGE), ("tta", "eager", True, LARGE)}


def _step_cases():
    for phase, impl, channels_last, batch in itertools.product(PHASES, IMPLS, (True, False), (SMALL, LARGE)):
        marks = []
        if impl == "compile":
            marks.append(pytest.mark.skipif(not ON_GPU, reason="torch.compile cases run on a CUDA GPU only: "
                                            "a first CPU compile of a ConvNeXt takes minutes on 2 cores"))
        if impl == "cudagraphs":
            marks.append(pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU"))
        if (phase, impl, channels_last, batch) not in CORE:
            marks.append(pytest.mark.extended)
        name = f"{phase}-{impl}-{'cl' if channels_last else 'nchw'}-b{batch}"
        yield pytest.param(phase, impl, channels_last, batch, marks=marks, id=name)


@pytest.fixture
def fresh_compiler():
    """The case compiles (and captures) afresh and gives its memory back afterwards."""
    yield
    if ON_GPU:
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


@dataclass
class StepCase:
    run: Callable[[], object]  # the benchmarked call, compiled as asked
    eager: Callable[[], object]  # the same work eagerly (FLOPs are counted on it)
    images: int  # images per call
    steps: int  # per call: optimiser steps (training) or batches (evaluation)
    trainable: int  # parameters updated per call (counted once per optimiser step)
    read_only: int  # parameters only read per call (frozen, evaluated; counted once per pass)


def _wrap(fn, impl: str):
    if impl == "eager":
        return fn
    return torch.compile(fn, mode="reduce-overhead" if impl == "cudagraphs" else None, dynamic=False)


def _begin(impl: str) -> None:
    if impl == "cudagraphs":  # a new iteration: earlier graph outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()


def _trainer(model, precision, device):
    """update(logits, labels): masked loss (every sample kept), backward, SGD step as the Engine's."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    keep_all = torch.full((), math.inf, device=device)  # the mask's cost is the same at any threshold

    def update(logits, labels):
        loss = masked_cross_entropy(logits, labels, keep_all).loss
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return update


def full_case(model, precision, device, impl, channels_last, batch) -> StepCase:
    x, y = random_inputs(batch, device=device, channels_last=channels_last)
    model.train()
    set_backbone_trainable(model, True)
    update = _trainer(model, precision, device)

    def make(forward, mark):
        def step():
            mark()
            with precision.autocast(device):
                logits = forward(x)
            update(logits, y)
        return step

    n = count_parameters(model)[0]
    return StepCase(make(_wrap(model, impl), lambda: _begin(impl)), make(model, lambda: None), batch, 1, n, 0)


def head_case(model, precision, device, impl, channels_last, batch) -> StepCase:
    per_chunk = max(CHUNK // batch, 1)
    x, y = random_inputs(per_chunk * batch, device=device, channels_last=channels_last)
    model.train()
    set_backbone_trainable(model, False)  # backbone frozen and in eval mode, as the Engine's frozen phase
    update = _trainer(model, precision, device)

    def make(features, head, mark):
        def chunk():
            mark()
            with torch.no_grad(), precision.autocast(device):
                feats = features(x)
            if impl == "cudagraphs":  # the head's graphs run next: keep the features out of the graph pool
                feats = feats.clone()
            for i in range(per_chunk):
                rows = slice(i * batch, (i + 1) * batch)
                with precision.autocast(device):
                    logits = head(feats[rows])
                update(logits, y[rows])
        return chunk

    head_n = sum(p.numel() for p in model.head.parameters())
    backbone_n = sum(p.numel() for p in model.backbone.parameters())
    run = make(_wrap(model.features, impl), _wrap(model.head, impl), lambda: _begin(impl))
    return StepCase(run, make(model.features, model.head, lambda: None), per_chunk * batch, per_chunk,
                    per_chunk * head_n, backbone_n)


def eval_case(model, precision, device, impl, channels_last, batch, tta: bool) -> StepCase:
    x, _ = random_inputs(batch, device=device, channels_last=channels_last)
    model.eval()

    def make(forward, mark):
        @torch.no_grad()
        def step():
            mark()
            with precision.autocast(device):
                if tta:
                    probs = augment.tta_probs(lambda v: forward(v).float(), x)
                else:
                    probs = forward(x).float()
            return probs.argmax(1)
        return step

    views = 2 if tta else 1  # tta_probs runs the model once per view
    return StepCase(make(_wrap(model, impl), lambda: _begin(impl)), make(model, lambda: None), batch, 1,
                    0, views * count_parameters(model)[0])


def build_step(phase, impl, channels_last, batch, device):
    model = build_model(ModelConfig(name=MODEL, pretrained=False, num_classes=100, channels_last=channels_last,
                                    compile="off")).to(device)
    precision = resolve_precision("auto", device)
    if phase == "full":
        return full_case(model, precision, device, impl, channels_last, batch), precision
    if phase == "head":
        return head_case(model, precision, device, impl, channels_last, batch), precision
    return eval_case(model, precision, device, impl, channels_last, batch, tta=phase == "tta"), precision


@pytest.mark.parametrize("phase,impl,channels_last,batch", list(_step_cases()))
def test_step(bench, device, fresh_compiler, phase, impl, channels_last, batch):
    """One step of `phase`: ms per optimiser step (training) or per batch (evaluation), FLOPs, MFU,
    CPU-side launches per step and peak memory."""
    case, precision = build_step(phase, impl, channels_last, batch, device)
    flops = bench.count_flops(case.eager)
    first = bench.first_call(case.run)  # compilation and graph capture happen here
    calls = max(1, (20 if ON_GPU else 1) // case.steps)
    seconds = statistics.median(bench.rounds(case.run, calls=calls, rounds=ROUNDS, warmup=WARMUP)) / calls
    launches = bench.launches(case.run, steps=case.steps)  # CPU-side launches from torch.profiler (GPU only)
    bench.record(seconds_per_step=seconds / case.steps, images_per_step=case.images // case.steps,
                 flops_per_step=flops // case.steps, dtype=precision.dtype,
                 param_bytes_per_step=bench.param_traffic_bytes(case.trainable, case.read_only) // case.steps,
                 phase=phase, impl=impl, channels_last=channels_last, batch=batch, model=MODEL,
                 step="optimiser step" if phase in ("head", "full") else "evaluation batch",
                 first_call_s=first, **launches)


# ---- whole epochs through the Engine ----

EPOCHS = ("head", "full", "full+filter", "eval", "eval+tta")


def epoch_config(device: torch.device):
    """The paper preset, randomly initialised, memory loaders; shrunk to test_convnext on the CPU."""
    overrides = {"model.pretrained": "false", "data.backend": "memory", "run.device": device.type}
    if not ON_GPU:
        overrides.update({"model.name": MODEL, "train.batch_size": "16", "train.test_batch_size": "32",
                          "train.frozen_chunk": "32"})
    return build_config("paper", overrides)


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory, device):
    """One Run shared by the epoch benchmarks, so each phase compiles once."""
    from fastcifar.train import Run

    cfg = epoch_config(device)
    single = DistInfo(0, 1, 0)
    loaders = synthetic_loaders(cfg, num_train=N_TRAIN, num_test=N_TEST)(device, single)
    return Run(cfg, tmp_path_factory.mktemp("epoch-run"), single, device, loaders)


@pytest.mark.extended
@pytest.mark.parametrize("phase", EPOCHS)
def test_epoch(bench, engine_run, phase):
    """One whole epoch end to end: loader, augmentation, model, masked loss, optimiser, statistics."""
    run, cfg = engine_run, engine_run.cfg
    engine, train, test = run.engine, run.loaders.train, run.loaders.test
    if phase.startswith("eval"):
        tta = phase == "eval+tta"
        steps, images = test.num_batches(), test.num_samples
        warm = lambda: engine.evaluate(itertools.islice(test.epoch(0), 2), tta=tta)  # noqa: E731
        epoch_fn = lambda: engine.evaluate(test.epoch(0), tta=tta)  # noqa: E731
    else:
        epoch = {"head": 0, "full": cfg.train.freeze_epochs, "full+filter": cfg.filter.start_epoch}[phase]
        steps, images = train.num_batches(), train.num_batches() * cfg.train.batch_size
        per_chunk = max(cfg.train.frozen_chunk // cfg.train.batch_size, 1)
        warm = lambda: engine.train_epoch(epoch, itertools.islice(train.epoch(epoch), 2 * per_chunk),  # noqa: E731
                                          steps, run.loaders.num_train)
        epoch_fn = lambda: engine.train_epoch(epoch, train.epoch(epoch), steps, run.loaders.num_train)  # noqa: E731
    first = bench.first_call(warm)
    seconds = statistics.median(bench.rounds(epoch_fn, calls=1, rounds=EPOCH_ROUNDS))
    bench.record(seconds_per_step=seconds / steps, images_per_step=images // steps, dtype=run.precision.dtype,
                 phase=phase, model=cfg.model.name, compile=cfg.model.compile, epoch_s=seconds,
                 images_per_epoch=images, warmup_s=first,
                 step="optimiser step" if not phase.startswith("eval") else "evaluation batch")
