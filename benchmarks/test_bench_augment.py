"""The full training augmentation of one batch per call: fastcifar vs torchvision v2 per image vs kornia.

All three run the paper's pipeline on a uint8 (N, 3, 32, 32) channels_last batch and return a
normalised float batch: random crop (pad 4), horizontal flip, RandAugment(2, 9), normalisation
with CIFAR-100's mean and std, random erasing (p 0.5).
- fastcifar: `train_augment`, batched on the benchmark device, every sample its own ops.
- torchvision: the transforms.v2 pipeline applied image by image and stacked, as the paper's
  DataLoader runs it: a dataset item is Image.fromarray of an (H, W, 3) array, then the
  transforms on the PIL image (on the CPU, where a DataLoader worker runs it, whatever the
  device; single-process, as one worker).
- kornia: its batched AugmentationSequential with kornia.augmentation.auto.RandAugment, on the
  device. Note that kornia draws RandAugment's two ops once per batch, not per sample: less work.
Each timed round is one call (one batch), so the table's times compare directly across cases;
extra_info: images/s and ms per batch (median round), the device the case ran on.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torchvision.transforms.v2 as T

from fastcifar.augment import train_augment
from fastcifar.config import AugmentConfig

CFG = AugmentConfig()  # the paper's: pad 4, flip, RandAugment(2, 9), erasing p 0.5, 32 x 32
SECONDS = 1.0  # timed rounds (one call each) fill about this much, between 5 and 200 rounds


def _torchvision(cfg: AugmentConfig, images):
    from PIL import Image

    per_image = T.Compose([
        T.RandomCrop(32, padding=cfg.crop_padding), T.RandomHorizontalFlip(),
        T.RandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude),
        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(cfg.mean), list(cfg.std)),
        T.RandomErasing(p=cfg.erasing_p),
    ])  # fmt: skip
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()  # what the paper's dataset holds

    def run(images, indices, epoch):
        return torch.stack([per_image(Image.fromarray(a)) for a in arrays])

    return run


def _kornia(cfg: AugmentConfig, device):
    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment

    pipeline = K.AugmentationSequential(
        K.RandomCrop((32, 32), padding=cfg.crop_padding), K.RandomHorizontalFlip(),
        RandAugment(n=cfg.randaugment_ops, m=cfg.randaugment_magnitude),
        K.Normalize(torch.tensor(cfg.mean), torch.tensor(cfg.std)), K.RandomErasing(p=cfg.erasing_p),
    ).to(device)  # fmt: skip

    def run(images, indices, epoch):
        return pipeline(images.float().div_(255))

    return run


def _fastcifar(cfg: AugmentConfig):
    def run(images, indices, epoch):
        return train_augment(images, indices, seed=0, epoch=epoch, cfg=cfg)

    return run


@pytest.mark.benchmark(group="augment")
@pytest.mark.parametrize("batch", [100, 1024], ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("impl", ["fastcifar", "torchvision", "kornia"])
def test_augment(bench, device, impl, batch):
    run_on = torch.device("cpu") if impl == "torchvision" else device
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    images = images.to(run_on).to(memory_format=torch.channels_last)
    indices = torch.arange(batch, device=run_on)
    fn = {"fastcifar": lambda: _fastcifar(CFG), "torchvision": lambda: _torchvision(CFG, images),
          "kornia": lambda: _kornia(CFG, run_on)}[impl]()  # fmt: skip
    epoch = iter(range(10**9))

    def call():
        return fn(images, indices, next(epoch))

    out = call()  # warm-up; also checks the contract
    assert out.shape == (batch, 3, 32, 32) and out.dtype == torch.float32
    if bench.benchmark.disabled:  # CI: one round, no calibration
        rounds = 1
    else:
        rounds = max(5, min(200, int(SECONDS / max(_one_call_seconds(call, run_on), 1e-6))))
    seconds = statistics.median(bench.rounds(call, calls=1, rounds=rounds, warmup=1))
    threads = f"cpu ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(run_on) if run_on.type == "cuda" else threads
    bench.record(seconds_per_step=seconds, images_per_step=batch, impl=impl, batch=batch, ran_on=name,
                 ops_drawn="per batch" if impl == "kornia" else "per sample")


def _one_call_seconds(call, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
