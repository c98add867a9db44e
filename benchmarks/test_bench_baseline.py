"""Benchmark: the paper's pipeline as its authors ran it against ours, same model, batch and data.

One epoch of each pass (head-only training, full training, evaluation) of both pipelines in
the same process, on the same synthetic CIFAR-shaped data; extra_info holds images/s of both,
the speedup per pass, and the full schedule's seconds projected from them for both (labelled
projected). The paper-equivalent pipeline is described in fastcifar/bench/baseline.py. On a GPU:
ConvNeXt-Base at the paper's sizes (50,000 / 10,000 images, batch 100 / 500), DataLoader
workers as fastcifar.bench.baseline.default_workers; on the CPU: test_convnext at small sizes, no workers.
"""

from __future__ import annotations

import pytest
import torch

from fastcifar.bench.baseline import compare, time_ours, time_paper
from fastcifar.config import build_config
from fastcifar.distributed import DistInfo
from fastcifar.model import resolve_precision
from fastcifar.schedule import build_schedule
from fastcifar.bench.synthetic import make_dataset, split_loaders

ON_GPU = torch.cuda.is_available()
N_TRAIN, N_TEST = (50_000, 10_000) if ON_GPU else (64, 32)


def baseline_config(device: torch.device):
    overrides = {"model.pretrained": "false", "data.backend": "memory", "run.device": device.type}
    if not ON_GPU:
        overrides.update({"model.name": "test_convnext", "train.batch_size": "16", "train.test_batch_size": "32",
                          "train.frozen_chunk": "32"})
    return build_config("paper", overrides)


# gpu_report.py times the paper pipeline itself, against its measured 100-epoch schedule.
@pytest.mark.extended
def test_paper_vs_ours(bench, device, tmp_path):
    cfg = baseline_config(device)
    train, test = make_dataset(N_TRAIN, N_TEST, num_classes=cfg.model.num_classes)
    result = {}

    def measure():
        paper = time_paper(train.images, train.labels, test.images, test.labels, cfg, device)
        loaders = split_loaders(train, test, cfg, device, DistInfo(0, 1, 0))
        ours = time_ours(cfg, loaders, device, tmp_path)
        result.update(compare(paper, ours, build_schedule(cfg)))

    bench.rounds(measure, calls=1, rounds=1)
    o = result["ours"]
    bench.record(seconds_per_step=o["full"] / (o["full_images"] / cfg.train.batch_size),
                 images_per_step=cfg.train.batch_size, dtype=resolve_precision(cfg.model.amp, device).dtype,
                 paper_dtype="float16 autocast + GradScaler" if ON_GPU else "float32", model=cfg.model.name,
                 step="our full-training optimiser step", **result)
