"""Benchmarks: the training step of every phase as the trainer runs it, in each step mode, and whole epochs.

Steps: the Engine's own steps on a batch from synthetic CIFAR-shaped data in memory, augmentation
included — head (a frozen chunk: one no-grad backbone pass over train.frozen_chunk images, then the
head's optimizer steps over it), full, full+filter (finite thresholds and the kept-fraction guard
at work), evaluation and flip TTA (batch train.test_batch_size, through the padded eval function)
— each in mode eager, compiled (torch.compile fullgraph, static shapes) and graphs (every step one
CUDA graph). One Engine per mode serves all its phases, so each function compiles once. On a GPU:
the `paper` preset (ConvNeXt-Base, 32x32, batch 100, bf16); on the CPU: timm's tiny test_convnext
at small sizes, eager only (a CPU compile takes minutes). FLOPs: the model's forward (and backward
for training) counted group-aware on a separate eager copy, once per phase. Each row records the
mode each of the phase's functions ran in (a mode that fails to build steps down the ladder).
test_breakdown profiles the graphed full step (fastcifar.bench.breakdown).

FASTCIFAR_BENCH_SET="key=value ..." applies config overrides to every Engine here (the GPU
report's A/B candidates, e.g. model.small_map_dw=on); rows record them as `variant`.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import statistics
from functools import lru_cache

import pytest
import torch

from fastcifar import evaluate as ev
from fastcifar.backend import setup_backend
from fastcifar.bench import breakdown
from fastcifar.bench.modes import phase_facts
from fastcifar.config import build_config, parse_overrides
from fastcifar.distributed import DistInfo
from fastcifar.engine import Engine
from fastcifar.graphs import EAGER, Mode
from fastcifar.model import build_model, count_parameters, resolve_precision
from fastcifar.optim import PhaseSGD
from fastcifar.schedule import build_schedule
from fastcifar.bench.synthetic import random_inputs, synthetic_loaders

ON_GPU = torch.cuda.is_available()
SIZES = dict(model="convnext_base", batch=100, test_batch=500, chunk=1000, train=50_000, test=10_000) if ON_GPU \
    else dict(model="test_convnext", batch=16, test_batch=32, chunk=32, train=256, test=128)
# (timed rounds, untimed calls after the first, calls per round): eager is the slow reference, a few
# calls tell it; the CPU runs each body once (a check of the bookkeeping, not a measurement).
TIMING = {"eager": (3, 1, 5), "graphs": (5, 3, 20), "compiled": (5, 3, 20)} if ON_GPU else {}
PHASES = ("head", "full", "full+filter", "eval", "tta")
MODES = {"graphs": Mode("graphs"), "compiled": Mode("compiled"), "eager": EAGER}  # graphs first: the most
# telling mode, and compiled then compiles from the same functions' inductor cache; eager last
MAX_STEPS = 10_000  # the engines' lr table: more steps than any benchmark takes
VARIANT = os.environ.get("FASTCIFAR_BENCH_SET", "").split()  # key=value overrides (A/B candidates)


def step_config(device: torch.device):
    overrides = {"model.name": SIZES["model"], "model.pretrained": "false", "data.backend": "memory",
                 "run.device": device.type, "train.batch_size": str(SIZES["batch"]),
                 "train.test_batch_size": str(SIZES["test_batch"]), "train.frozen_chunk": str(SIZES["chunk"])}
    return build_config("paper", {**overrides, **parse_overrides(VARIANT)})


class Bed:
    """An Engine in one mode with its data: every phase's step, ready to call."""

    def __init__(self, mode: Mode, device: torch.device):
        cfg = self.cfg = step_config(device)
        torch.manual_seed(cfg.run.seed)  # as fastcifar.train.Run sets up: the same seed, the same backend
        setup_backend(device, deterministic=cfg.run.deterministic)
        single = DistInfo(0, 1, 0)
        self.loaders = synthetic_loaders(cfg, num_train=SIZES["train"], num_test=SIZES["test"])(device, single)
        self.model = build_model(cfg.model).to(device)
        self.precision = resolve_precision(cfg.model.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=self.precision.use_scaler)
        n = self.loaders.num_train
        none = torch.zeros(n, dtype=torch.bool)
        self.engine = Engine(cfg, self.model, PhaseSGD(self.model, cfg.optim, device), scaler, self.precision,
                             device, single, build_schedule(cfg), none, none, num_samples=n,
                             image_shape=self.loaders.train.image_shape, max_steps=MAX_STEPS,
                             modes=[mode, EAGER] if mode.compiles else [EAGER])
        self.schedule = self.engine.schedule

    def step(self, phase: str):
        """(call, optimizer steps or batches per call, images per call) for `phase`."""
        e, cfg = self.engine, self.cfg
        if phase in ("eval", "tta"):
            self.model.eval()
            images = next(iter(self.loaders.test.epoch(0))).images
            return (lambda: ev.mean_probs(e.eval_logits, images, tta=phase == "tta")), 1, len(images)
        epoch = {"head": 0, "full": cfg.train.freeze_epochs, "full+filter": cfg.filter.start_epoch}[phase]
        p = self.schedule.phase(epoch)
        e.enter_phase(p)
        self.model.train()
        self.model.backbone.train(p.train_backbone)
        e._begin_epoch(epoch, MAX_STEPS, self.schedule.threshold(epoch) if p.filtering else math.inf)
        batches = list(itertools.islice(self.loaders.train.epoch(epoch), max(1, cfg.train.frozen_chunk // cfg.train.batch_size)))
        if p.train_backbone:
            return (lambda: e.full(batches[0])), 1, cfg.train.batch_size
        return (lambda: e._frozen_chunk(batches, lambda: None)), len(batches), len(batches) * cfg.train.batch_size

    def close(self) -> None:
        self.engine = self.model = None
        if ON_GPU:
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()


@pytest.fixture(scope="module", params=list(MODES))
def bed(request, device):
    if MODES[request.param].compiles and not ON_GPU:
        pytest.skip("compiled and graphed steps are benchmarked on a CUDA GPU only: a first CPU compile "
                    "of even a tiny ConvNeXt takes minutes on 2 cores")
    bed = Bed(MODES[request.param], device)
    yield request.param, bed
    bed.close()


@lru_cache(maxsize=None)  # the same in every mode: counted once per phase
def _flops(cfg, device, phase: str, images: int) -> int:
    """Matmul and convolution FLOPs of the model for `images` images: forward, plus backward when
    the phase trains the backbone (the head-only phase: backbone forward + head forward/backward)."""
    from fastcifar.bench.launches import count_flops

    model = build_model(cfg.model).to(device)
    x, _ = random_inputs(images, size=cfg.augment.image_size, device=device)
    if phase in ("full", "full+filter"):
        return count_flops(lambda: model(x).sum().backward())
    with torch.no_grad():
        return count_flops(lambda: model(x))  # the head's own FLOPs are negligible beside the backbone's


@pytest.mark.parametrize("phase", PHASES)
def test_step(bench, device, bed, phase):
    """One step of `phase` in the bed's mode: ms per optimizer step (training) or per batch
    (evaluation), images/s, FLOPs and MFU, CPU-side launches per step, peak memory."""
    impl, b = bed
    call, steps, images = b.step(phase)
    first = bench.first_call(call)  # compilation and graph capture happen in the first calls
    rounds, warmup, calls = TIMING.get(impl, (1, 0, 1))
    seconds = statistics.median(bench.rounds(call, calls=calls, rounds=rounds, warmup=warmup)) / calls
    launches = bench.launches(call, steps=steps)  # CPU-side launches from torch.profiler (GPU only)
    flops = _flops(b.cfg, device, phase, images)
    trainable = count_parameters(b.model.head)[0] * steps if phase == "head" else \
        count_parameters(b.model)[0] if phase.startswith("full") else 0
    read_only = count_parameters(b.model)[0] * (2 if phase == "tta" else 1) - (trainable if phase != "head" else 0)
    bench.record(seconds_per_step=seconds / steps, images_per_step=images // steps, flops_per_step=flops // steps,
                 dtype=b.precision.dtype, param_bytes_per_step=bench.param_traffic_bytes(trainable, read_only) // steps,
                 phase=phase, impl=impl, batch=images // steps, model=b.cfg.model.name, variant=" ".join(VARIANT),
                 step="optimiser step" if phase in ("head", "full", "full+filter") else "evaluation batch",
                 first_call_s=first, timing=f"median of {rounds} rounds of {calls} calls, "
                 f"{'CUDA events' if ON_GPU else 'perf_counter'}", **phase_facts(b.engine, phase), **launches)


def test_breakdown(bench, bed):
    """The graphed full step's GPU time by kernel category (torch.profiler) and its augmentation
    alone (compiled, CUDA events): where the milliseconds of a step go."""
    impl, b = bed
    if impl != "graphs":
        pytest.skip("the breakdown profiles the graphs mode's full step")
    call, _, _ = b.step("full")
    for _ in range(4):  # captured by now (test_step ran it); these make sure
        call()
    engine, state = b.engine, b.engine.ctx.state
    full = engine.full
    augment = torch.compile(lambda images, indices, key, noise: engine.ctx.augment(images, indices, key, noise),
                            fullgraph=True, dynamic=False)
    out = breakdown.step_breakdown(call, uncaptured=_uncaptured(full),
                                   augment=lambda: augment(full.images, full.indices, state.aug_key, state.noise))
    bench.rounds(call, calls=20, rounds=1)  # pytest-benchmark's own record of the step
    bench.record(seconds_per_step=out["step_ms_cuda_events"] / 1e3, images_per_step=b.cfg.train.batch_size,
                 dtype=b.precision.dtype, profiled_phase="full", profiled_mode=impl, breakdown=out,
                 model=b.cfg.model.name, variant=" ".join(VARIANT), **phase_facts(engine, "full"))


def _uncaptured(full):
    """The full step compiled but not captured (a call runs the compiled body with no graph), for a
    profiler that sees no kernel inside graph replays."""
    return lambda: full._call(Mode("compiled"))


def test_the_bed_sets_the_backend_up_as_the_trainer(device, tmp_path):
    """The step benchmarks time what `make train` runs: the Bed leaves the backend flags
    (cuDNN autotuning, TF32, determinism) that the trainer's Run set-up leaves."""
    from fastcifar.backend import backend_flags
    from fastcifar.train import Run

    def scrambled() -> None:  # the opposite of every flag setup_backend sets
        torch.backends.cudnn.benchmark = device.type != "cuda"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")

    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        scrambled()
        bed = Bed(EAGER, device)
        after_bed = backend_flags()
        scrambled()
        Run(bed.cfg, tmp_path, DistInfo(0, 1, 0), device, bed.loaders)
        assert after_bed == backend_flags()
        assert after_bed["cudnn_benchmark"] is (device.type == "cuda") and after_bed["tf32_matmul"]
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[:3]
        torch.set_float32_matmul_precision(saved[3])


# ---- whole epochs through the Engine ----

EPOCHS = ("head", "full", "full+filter", "eval", "eval+tta")


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory, device):
    """One Run shared by the epoch benchmarks, so each phase compiles once."""
    from fastcifar.train import Run

    cfg = step_config(device)
    single = DistInfo(0, 1, 0)
    loaders = synthetic_loaders(cfg, num_train=SIZES["train"], num_test=SIZES["test"])(device, single)
    return Run(cfg, tmp_path_factory.mktemp("epoch-run"), single, device, loaders)


@pytest.mark.extended
@pytest.mark.parametrize("phase", EPOCHS)
def test_epoch(bench, engine_run, phase):
    """One whole epoch end to end: loader, augmentation, model, masked loss, optimizer, statistics."""
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
        warm = lambda: engine.train_epoch(epoch, itertools.islice(train.epoch(epoch), 2 * per_chunk), steps)  # noqa: E731
        epoch_fn = lambda: engine.train_epoch(epoch, train.epoch(epoch), steps)  # noqa: E731
    first = bench.first_call(warm)
    seconds = statistics.median(bench.rounds(epoch_fn, calls=1, rounds=2 if ON_GPU else 1))
    bench.record(seconds_per_step=seconds / steps, images_per_step=images // steps, dtype=run.precision.dtype,
                 phase=phase, model=cfg.model.name, step_mode=engine.mode, epoch_s=seconds,
                 images_per_epoch=images, warmup_s=first,
                 step="optimiser step" if not phase.startswith("eval") else "evaluation batch")
