"""Loaders: both backends give back exactly what was written, in the same seeded order, per rank."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from ddp_worker import read_epoch
from fake_cifar import make_fake_cifar

from fastcifar.beton import write_dataset, write_digits_betons
from fastcifar.data import epoch_order, keep_torch_threads, open_split
from fastcifar.sources import DataError, prepare_source

HAS_FFCV = True
try:
    with keep_torch_threads():  # importing ffcv sets torch's thread count to 1 for everyone after
        import ffcv  # noqa: F401
except ImportError:
    HAS_FFCV = False
BACKENDS = ["memory", pytest.param("ffcv", marks=pytest.mark.skipif(not HAS_FFCV, reason="ffcv not installed"))]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A 300 + 100 image CIFAR-100N-format folder, written to .beton files."""
    root = tmp_path_factory.mktemp("data")
    fake = make_fake_cifar(root / "raw", n_train=300, n_test=100)
    prepared = prepare_source("cifar100n", data_dir=fake.root, label_sha256=fake.label_sha256)
    write_dataset(prepared, root / "out", progress=False, print_fn=lambda *_: None)
    return fake, root / "out"


def _collect(batches) -> dict[str, torch.Tensor]:
    batches = list(batches)
    return {k: torch.cat([getattr(b, k) for b in batches]) for k in ("images", "labels", "clean_labels", "indices")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_read_back_byte_for_byte(cifar, backend):
    fake, out = cifar
    for split, images, labels, clean in (("train", fake.train_images, fake.noisy_labels, fake.train_labels),
                                         ("test", fake.test_images, fake.test_labels, fake.test_labels)):
        loader = open_split(out / f"{split}.beton", backend=backend, batch_size=64, shuffle=False,
                            drop_last=False, num_workers=2)
        batches = list(loader.epoch(0))
        assert len(batches) == loader.num_batches() == -(-len(labels) // 64)
        first = batches[0].images
        assert first.dtype == torch.uint8 and first.shape == (64, 3, 32, 32)
        assert first.is_contiguous(memory_format=torch.channels_last)
        got = _collect(batches)
        assert np.array_equal(got["images"].permute(0, 2, 3, 1).numpy(), images)
        assert np.array_equal(got["labels"].numpy(), labels)
        assert np.array_equal(got["clean_labels"].numpy(), clean)
        assert np.array_equal(got["indices"].numpy(), np.arange(len(labels)))
        assert all(t.dtype == torch.int64 for k, t in got.items() if k != "images")


@pytest.mark.skipif(not HAS_FFCV, reason="ffcv not installed")
def test_backends_agree_on_shuffled_epochs_and_subsets(cifar):
    _, out = cifar
    kw = dict(batch_size=32, shuffle=True, drop_last=True, seed=5, num_workers=1)
    mem = open_split(out / "train.beton", backend="memory", **kw)
    ffc = open_split(out / "train.beton", backend="ffcv", **kw)
    subset = torch.arange(0, 300, 3)
    for epoch, indices in ((0, None), (1, None), (1, subset)):
        a, b = _collect(mem.epoch(epoch, indices)), _collect(ffc.epoch(epoch, indices))
        for k in a:
            assert torch.equal(a[k], b[k]), k
    e0, e1 = _collect(mem.epoch(0))["indices"], _collect(mem.epoch(1))["indices"]
    assert len(e0) == 288 and len(set(e0.tolist())) == 288  # drop_last: 9 whole batches, no repeats
    assert not torch.equal(e0, e1) and torch.equal(e0, _collect(mem.epoch(0))["indices"])
    sub = _collect(mem.epoch(3, subset))["indices"]
    assert len(sub) == 96 and set(sub.tolist()) <= set(subset.tolist())


def test_num_batches_matches_what_an_epoch_yields(cifar):
    _, out = cifar
    for shuffle, drop_last, n in ((True, True, None), (False, False, None), (True, False, 70), (True, True, 70)):
        loader = open_split(out / "train.beton", backend="memory", batch_size=32, shuffle=shuffle,
                            drop_last=drop_last)
        subset = None if n is None else np.arange(n)
        assert len(list(loader.epoch(2, subset))) == loader.num_batches(n)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_batches_are_slices_of_the_global_batches(world):
    rows = np.arange(103, dtype=np.int64) * 2
    kw = dict(shuffle=True, seed=7, epoch=4, batch_size=12)
    single = epoch_order(rows, drop_last=True, **kw)
    local = [epoch_order(rows, drop_last=True, rank=r, world_size=world, **kw) for r in range(world)]
    lb = 12 // world
    assert len(single) == 96 and all(len(loc) == 96 // world for loc in local)
    for k in range(len(single) // 12):
        union = np.concatenate([loc[k * lb: (k + 1) * lb] for loc in local])
        assert sorted(union) == sorted(single[k * 12: (k + 1) * 12])
    evals = [epoch_order(rows, shuffle=False, seed=0, epoch=0, batch_size=12, drop_last=False, rank=r,
                         world_size=world) for r in range(world)]
    assert sorted(np.concatenate(evals)) == list(rows)  # every sample once, no padding
    assert all(np.array_equal(e, rows[r::world]) for r, e in enumerate(evals))


def test_distributed_ranks_split_each_global_batch(cifar):
    import socket

    import torch.multiprocessing as mp

    _, out = cifar
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # fork would copy this process's OpenMP pool and can hang
    results = ctx.Queue()
    procs = [ctx.Process(target=read_epoch, args=(r, 2, str(out / "train.beton"), port, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict((r, (b, n)) for r, b, n in (results.get(timeout=120) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    single = list(open_split(out / "train.beton", backend="memory", batch_size=20, shuffle=True,
                             drop_last=True, seed=3).epoch(2))
    assert got[0][1] == got[1][1] == len(single) == len(got[0][0])
    for k, batch in enumerate(single):
        assert len(got[0][0][k]) == 10
        assert sorted(got[0][0][k] + got[1][0][k]) == sorted(batch.indices.tolist())


def test_subsets_and_held_out_splits(tmp_path):
    meta = write_digits_betons(tmp_path, noise=0.2)
    loader = open_split(tmp_path / "train.beton", backend="memory", batch_size=50, shuffle=True, drop_last=False)
    arrays = loader.arrays()
    assert torch.equal(arrays["indices"], torch.arange(loader.num_samples))  # dense, even when held out
    in_order = open_split(tmp_path / "train.beton", backend="memory", batch_size=7, shuffle=False, drop_last=False)
    assert in_order.arrays()["images"].data_ptr() == arrays["images"].data_ptr()  # one copy per device
    rows = meta["splits"]["train"]["source_rows"] + meta["splits"]["test"]["source_rows"]
    assert sorted(rows) == list(range(1797))  # meta.json maps indices back to the source's rows
    subset = torch.arange(1, loader.num_samples, 4)
    got = _collect(loader.epoch(0, subset))
    assert sorted(got["indices"].tolist()) == subset.tolist()
    assert torch.equal(arrays["images"][got["indices"]], got["images"])
    assert torch.equal(arrays["labels"][got["indices"]], got["labels"])
    mask = torch.zeros(loader.num_samples, dtype=torch.bool)
    mask[subset] = True
    assert sorted(_collect(loader.epoch(0, mask))["indices"].tolist()) == subset.tolist()
    with pytest.raises(ValueError, match="sample indices in"):
        next(iter(loader.epoch(0, [loader.num_samples])))
    with pytest.raises(ValueError, match="boolean subset must have shape"):
        next(iter(loader.epoch(0, mask[1:])))


@pytest.mark.skipif(not HAS_FFCV, reason="ffcv not installed")
def test_ffcv_leaves_torch_thread_count_alone(cifar):
    _, out = cifar
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        loader = open_split(out / "test.beton", backend="ffcv", batch_size=50, shuffle=False, drop_last=False,
                            num_workers=1)
        assert torch.get_num_threads() == 3
        for _ in loader.epoch(0):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_clear_errors(cifar, tmp_path, monkeypatch):
    _, out = cifar
    kw = dict(batch_size=10, shuffle=False, drop_last=False)
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        open_split(out / "test.beton", backend="memory", distributed=True, **kw)
    with pytest.raises(ValueError, match="backend must be one of"):
        open_split(out / "test.beton", backend="dali", **kw)
    monkeypatch.setitem(sys.modules, "ffcv.loader", None)  # as on a machine without ffcv
    with pytest.raises(DataError, match="needs ffcv.*backend 'memory'"):
        open_split(out / "test.beton", backend="ffcv", **kw)
    monkeypatch.undo()
    cut = tmp_path / "test.beton"
    cut.write_bytes((out / "test.beton").read_bytes()[:100_000])
    for backend in ("memory", "ffcv"):
        with pytest.raises(DataError, match="truncated"):
            open_split(cut, backend=backend, **kw)
    (tmp_path / "meta.json").write_text('{"num_classes": 10}')
    (tmp_path / "test.beton").write_bytes((out / "test.beton").read_bytes())
    with pytest.raises(DataError, match=r"outside \[0, 10\)"):
        open_split(tmp_path / "test.beton", backend="memory", **kw)
