"""Kernel launches per step of every phase, counted on fake CUDA tensors (no GPU needed).

The `paper` preset's own steps (ConvNeXt-Base, batch 100, 32x32, bf16 autocast, fused SGD) as the
Engine runs them in eager mode, counted by fastcifar.bench.launches: what a GPU would be asked to launch
from Python per optimizer step (training) or per evaluation batch. In graphs mode the same work is
one graph launch per step plus the copies of the batch into the step's static buffers (counted
here as `input copies`); in compiled mode inductor fuses the traced part into fewer kernels (only
a GPU run says how many: see the step benchmarks' profiler counts).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastcifar import evaluate as ev
from fastcifar.augment import TrainAugment
from fastcifar.config import build_config
from fastcifar.data import Batch
from fastcifar.distributed import DistInfo
from fastcifar.engine import Engine
from fastcifar.graphs import EAGER
from fastcifar.bench.launches import count_launches, fake_cuda
from fastcifar.model import build_model, resolve_precision
from fastcifar.optim import PhaseSGD
from fastcifar.schedule import build_schedule

PHASES = ("head", "full", "full+filter", "eval", "tta")
INPUT_COPIES = {"head": 3, "full": 3, "full+filter": 3, "eval": 1, "tta": 2}  # per step, into static buffers


@pytest.fixture(scope="module", params=["paper", "authors"])
def paper_model(request):
    """The preset's model: `paper`, and `authors` (MixUp/CutMix, label smoothing: the mixing path)."""
    cfg = build_config(request.param, {"model.pretrained": "false", "run.device": "cuda"})
    # Host constants for real first (RandAugment's tables read values; fake tensors have none).
    TrainAugment(cfg.augment, 32, 32, torch.device("cpu"))
    return cfg, build_model(cfg.model)  # built for real (timm's initialisers read values), faked below


def _batch(n: int, h: int, w: int, classes: int) -> Batch:
    images = torch.zeros(n, h, w, 3, dtype=torch.uint8, device="cuda").permute(0, 3, 1, 2)  # as loaders give
    labels = torch.zeros(n, dtype=torch.int64, device="cuda")
    return Batch(images, labels, labels.clone(), torch.arange(n, device="cuda"))


@pytest.mark.parametrize("phase", PHASES)
def test_launches_per_step(benchmark, paper_model, phase):
    cfg, model = paper_model
    t, n_train = cfg.train, 50_000
    with fake_cuda() as fake:
        fake.module(model)
        device = torch.device("cuda")
        precision = resolve_precision(cfg.model.amp, device)
        none = torch.zeros(n_train, dtype=torch.bool)
        engine = Engine(cfg, model, PhaseSGD(model, cfg.optim, device), torch.amp.GradScaler("cuda", enabled=False),
                        precision, device, DistInfo(0, 1, 0), build_schedule(cfg), none, none,
                        num_samples=n_train, image_shape=(32, 32, 3), max_steps=n_train // t.batch_size,
                        modes=[EAGER])
        steps = 1
        if phase in ("eval", "tta"):
            model.eval()
            batch = _batch(t.test_batch_size, 32, 32, cfg.model.num_classes)
            call = lambda: ev.mean_probs(engine.eval_logits, batch.images, tta=phase == "tta")  # noqa: E731
        else:
            epoch = {"head": 0, "full": t.freeze_epochs, "full+filter": cfg.filter.start_epoch}[phase]
            p = engine.schedule.phase(epoch)
            engine.enter_phase(p)
            model.train()
            model.backbone.train(p.train_backbone)
            engine._begin_epoch(epoch, engine.ctx.state.lr_table.numel(),
                                engine.schedule.threshold(epoch) if p.filtering else math.inf)
            if p.train_backbone:
                batch = _batch(t.batch_size, 32, 32, cfg.model.num_classes)
                call = lambda: engine.full(batch)  # noqa: E731
            else:
                chunk = [_batch(t.batch_size, 32, 32, cfg.model.num_classes)
                         for _ in range(t.frozen_chunk // t.batch_size)]
                steps = len(chunk)
                call = lambda: engine._frozen_chunk(chunk, lambda: None)  # noqa: E731
        counted = count_launches(call, warmup=1).scaled(1 / steps)
    top = ", ".join(f"{k} {v:g}" for k, v in counted.ops.most_common(6))
    benchmark.extra_info.update(phase=phase, mixing=cfg.augment.mixup_alpha > 0, model=cfg.model.name, batch=t.batch_size if steps or phase[0] != "e"
                                else t.test_batch_size, mode="eager (fake CUDA)", launches_per_step=counted.launches,
                                syncs_per_step=counted.syncs, graphs_mode_launches_per_step=1 + INPUT_COPIES[phase],
                                top_ops=top)
    print(f"\n{phase:12s} eager launches/step {counted.launches:7.1f}  syncs {counted.syncs:g}  "
          f"(graphs: {1 + INPUT_COPIES[phase]})  top: {top}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # a count, not a time
    assert counted.syncs == 0  # nothing in a step reads a value back to the host
    assert not counted.host_inputs  # nor copies one over: capture refuses copies from pageable memory
