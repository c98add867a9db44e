"""The batched augmentation pipeline: torchvision equivalence, keyed randomness, distributions, MixUp, TTA."""

import dataclasses
import functools

import pytest
import torch
from scipy import stats
import torchvision.transforms.v2 as T
from torchvision.transforms.v2 import functional as TF

from fastcifar import augment as A
from fastcifar import keyed_random as kr
from fastcifar import mixing as M
from fastcifar import randaugment as ra
from fastcifar.config import AugmentConfig

CFG = AugmentConfig()  # the paper's setting: pad 4, flip, RandAugment(2, 9), erasing p 0.5
PLAIN = AugmentConfig(crop_padding=0, flip=False, randaugment_ops=0, erasing_p=0.0)
MIX = AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0)  # the authors' setting
CUDA = torch.cuda.is_available()


def _images(n, size=32, seed=0, channels_last=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _reference(images, p: A.AugmentParams, cfg: AugmentConfig):
    """torchvision v2 per image, with our sampled decisions: the paper's DataLoader pipeline."""
    tv = T.RandAugment()
    out = []
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        img = TF.crop(TF.pad(img, [cfg.crop_padding]), int(p.offsets[i, 0]), int(p.offsets[i, 1]), h, w)
        if p.flip[i]:
            img = TF.horizontal_flip(img)
        for slot in range(cfg.randaugment_ops):
            op = ra.OPS[int(p.ops[i, slot])]
            value = ra.op_value(op, cfg.randaugment_magnitude, h, w)
            value = -value if (p.negative[i, slot] and op in ra._SIGNED) else value
            img = tv._apply_image_or_video_transform(img, op, value, interpolation=tv.interpolation,
                                                     fill=tv._fill)
        img = TF.normalize(TF.to_dtype(img, torch.float32, scale=True), list(cfg.mean), list(cfg.std))
        top, left, bh, bw = (int(v) for v in p.boxes[i])
        if bh:
            img = TF.erase(img, top, left, bh, bw, torch.tensor(0.0))
        if cfg.image_size != h:
            img = TF.resize(img, [cfg.image_size] * 2, antialias=False)
        out.append(img)
    return torch.stack(out)


# ---- the whole pipeline ----


STRONG = dataclasses.replace(CFG, randaugment_magnitude=30, erasing_p=1.0, crop_padding=2)
THREE_RESIZED = dataclasses.replace(CFG, randaugment_ops=3, image_size=48, crop_padding=0, flip=False)


@pytest.mark.parametrize("cfg", [CFG, STRONG, THREE_RESIZED], ids=["paper", "strong", "three-ops-resized"])
def test_train_augment_equals_torchvision_per_image(cfg):
    x, idx = _images(48), torch.arange(1000, 1048)
    ours = A.train_augment(x, idx, seed=3, epoch=7, cfg=cfg)
    p = A.sample_params(idx, seed=3, epoch=7, cfg=cfg, height=32, width=32)
    assert set(p.ops.flatten().tolist()) == set(range(len(ra.OPS)))  # every op is exercised
    assert bool(p.flip.any()) == cfg.flip and not p.flip.all() and (p.boxes[:, 2] > 0).any()
    ref = _reference(x, p, cfg)
    # fused x*(1/(255 std)) - mean/std vs torchvision's (x/255 - mean)/std: float rounding only
    torch.testing.assert_close(ours, ref, atol=2e-6 if cfg.image_size == 32 else 1e-5, rtol=1e-6)


def test_same_sample_same_augmentation_whatever_the_batch():
    x, idx = _images(64), torch.arange(500, 564)
    whole = A.train_augment(x, idx, seed=1, epoch=2, cfg=CFG)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    halves = [A.train_augment(x[part], idx[part], seed=1, epoch=2, cfg=CFG) for part in perm.split(32)]
    assert torch.equal(torch.cat(halves)[torch.argsort(perm)], whole)
    assert torch.equal(A.train_augment(x.contiguous(), idx, seed=1, epoch=2, cfg=CFG), whole)  # strides
    assert torch.equal(A.train_augment(x.float() / 255, idx, seed=1, epoch=2, cfg=CFG), whole)  # floats
    assert not torch.equal(A.train_augment(x, idx, seed=1, epoch=3, cfg=CFG), whole)  # a new epoch
    assert not torch.equal(A.train_augment(x, idx, seed=2, epoch=2, cfg=CFG), whole)  # a new seed


def test_masked_strategy_gives_the_same_pipeline(monkeypatch):
    """The GPU's sync-free path (every op on the whole batch, then select), run here on the CPU."""
    x, idx = _images(40), torch.arange(40)
    grouped = A.train_augment(x, idx, seed=4, epoch=1, cfg=CFG)
    monkeypatch.setattr(ra, "apply_slot", functools.partial(ra.apply_slot, strategy="masked"))
    assert torch.equal(A.train_augment(x, idx, seed=4, epoch=1, cfg=CFG), grouped)


@pytest.mark.compiled
@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, erasing_value="random", mixup_alpha=0.0)],
                         ids=["paper", "random-erasing"])
def test_train_augment_traces_as_one_graph_without_recompiles(cfg):
    """fullgraph=True, dynamic=False: every constant is made before tracing, the epoch's key and noise
    are tensors (a new epoch recompiles nothing), and the traced pipeline computes what eager does.
    aot_eager traces exactly what inductor compiles, without its minutes of C++ codegen on 2 cores."""
    from torch._dynamo.utils import counters

    plan = A.TrainAugment(cfg, 32, 32, torch.device("cpu"), graph_safe=True)
    traced = torch.compile(plan.__call__, fullgraph=True, dynamic=False, backend="aot_eager")
    x, idx = _images(48), torch.arange(100, 148)
    before = counters["stats"]["unique_graphs"]
    for epoch in (3, 4):
        key, noise = torch.tensor(A.train_key(1, epoch)), plan.noise(1, epoch, torch.device("cpu"))
        torch.testing.assert_close(traced(x, idx, key, noise), plan(x, idx, key, noise), atol=1e-6, rtol=0)
        assert torch.equal(plan(x, idx, key, noise), A.train_augment(x, idx, seed=1, epoch=epoch, cfg=cfg))
    assert counters["stats"]["unique_graphs"] - before == 1


def test_shapes_dtypes_and_memory_format():
    x, idx = _images(10), torch.arange(10)
    resized = dataclasses.replace(CFG, image_size=64)
    for cfg, dtype in ((CFG, torch.float32), (CFG, torch.bfloat16), (resized, torch.float32)):
        out = A.train_augment(x, idx, seed=0, epoch=0, cfg=cfg, out_dtype=dtype)
        assert out.shape == (10, 3, cfg.image_size, cfg.image_size) and out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last) and out.device == x.device
        ev = A.eval_transform(x, cfg=cfg, out_dtype=dtype)
        assert ev.shape == out.shape and ev.dtype == dtype
        assert ev.is_contiguous(memory_format=torch.channels_last)
    # everything off: the training transform is the evaluation transform
    assert torch.equal(A.train_augment(x, idx, seed=0, epoch=0, cfg=PLAIN), A.eval_transform(x, cfg=PLAIN))
    for n, (h, w) in ((0, (32, 32)), (1, (32, 32)), (3, (24, 40))):  # empty, single, non-square
        out = A.train_augment(_images(n)[..., :h, :w], torch.arange(n), seed=0, epoch=0, cfg=CFG)
        assert out.shape == (n, 3, 32, 32) and bool(torch.isfinite(out).all())


def test_random_erasing_values_fill_only_the_boxes():
    cfg = dataclasses.replace(CFG, erasing_p=1.0, erasing_value="random")
    x, idx = _images(32), torch.arange(32)
    noisy = A.train_augment(x, idx, seed=0, epoch=0, cfg=cfg)
    zero = A.train_augment(x, idx, seed=0, epoch=0, cfg=dataclasses.replace(cfg, erasing_value="zero"))
    boxes = A.sample_params(idx, seed=0, epoch=0, cfg=cfg, height=32, width=32).boxes
    inside = A._box_mask(boxes, 32, 32).unsqueeze(1).expand_as(zero)
    assert inside.any() and torch.equal(noisy[~inside], zero[~inside]) and (zero[inside] == 0).all()
    vals = noisy[inside]
    assert abs(float(vals.mean())) < 0.05 and abs(float(vals.std()) - 1) < 0.05  # standard normal


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    x, idx = _images(64), torch.arange(64)
    cpu = A.train_augment(x, idx, seed=5, epoch=1, cfg=CFG)
    gpu = A.train_augment(x.cuda(), idx.cuda(), seed=5, epoch=1, cfg=CFG)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


# ---- single ops against torchvision ----


def test_crop_and_flip_match_torchvision_exactly():
    g = torch.Generator().manual_seed(0)
    for x in (_images(16), _images(16).float() / 7):  # uint8 channels_last, float contiguous
        offsets = torch.randint(0, 9, (16, 2), generator=g)
        pairs = zip(x, offsets.tolist())
        ref = torch.stack([TF.crop(TF.pad(img, [4]), top, left, 32, 32) for img, (top, left) in pairs])
        assert torch.equal(A.crop(x, offsets, 4), ref)
        mask = torch.rand(16, generator=g) < 0.5
        ref = torch.stack([TF.horizontal_flip(img) if m else img for img, m in zip(x, mask)])
        assert torch.equal(A.hflip(x, mask), ref)


def test_erase_matches_torchvision_exactly():
    x = torch.randn(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, 5, 7], [3, 4, 0, 0], [19, 23, 1, 1], [10, 2, 10, 22], [0, 0, 20, 24],
                          [5, 5, 3, 0]])  # fmt: skip
    noise = torch.randn_like(x)
    for values in (0.0, 1.5, noise):
        ref = []
        for i, (t, l, h, w) in enumerate(boxes.tolist()):
            is_tensor = isinstance(values, torch.Tensor)
            v = values[i, :, t : t + h, l : l + w] if is_tensor else torch.tensor(values)
            ref.append(TF.erase(x[i], t, l, h, w, v) if h and w else x[i])
        assert torch.equal(A.erase(x, boxes, values), torch.stack(ref))


def test_normalize_and_resize_match_torchvision():
    x = _images(8, size=16)
    ref = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(CFG.mean), list(CFG.std))
    out = A.normalize(x, CFG.mean, CFG.std)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-6)
    big = A.normalize(x, CFG.mean, CFG.std, size=40)
    # bilinear upsampling; torchvision's antialias changes nothing when enlarging
    torch.testing.assert_close(big, TF.resize(ref, [40, 40], antialias=True), atol=1e-5, rtol=1e-5)
    small = A.normalize(x, CFG.mean, CFG.std, size=8)
    torch.testing.assert_close(small, TF.resize(ref, [8, 8], antialias=True), atol=1e-5, rtol=1e-5)


# ---- keyed randomness ----


def test_keyed_hash_is_exact_and_touches_no_global_state():
    assert max(kr._MUL1, kr._MUL2) < 2**31  # so a 32-bit lane times one stays below 2**63
    words = [0, 1, 2**31, 2**32 - 1, 0xDEADBEEF, 12345]
    hashed = kr.mix32(torch.tensor(words, dtype=torch.int64))
    assert hashed.tolist() == [kr.mix32(w) for w in words]
    assert int(hashed.min()) >= 0 and int(hashed.max()) < 2**32
    x, y = _images(8), torch.arange(8)
    state = torch.random.get_rng_state()
    A.train_augment(x, y, seed=0, epoch=0, cfg=dataclasses.replace(CFG, erasing_value="random"))
    for step in range(4):
        M.mix_batch(x.float(), y, seed=0, epoch=0, step=step, cfg=MIX)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError):
        kr.stream_key(-1)


def test_keyed_uniform_depends_only_on_the_key_and_the_sample():
    key = kr.stream_key(7, 3, kr.TRAIN)
    idx = torch.arange(1000)
    u = kr.keyed_uniform(key, idx, 5)
    assert u.dtype == torch.float32 and 0 <= float(u.min()) and float(u.max()) < 1
    sub = torch.tensor([999, 3, 500])
    assert torch.equal(kr.keyed_uniform(key, sub, 5), u[sub])
    assert torch.equal(kr.keyed_uniform(key, idx, 5), u)
    keys = ((8, 3, kr.TRAIN), (7, 4, kr.TRAIN), (7, 3, kr.MIX_PERM))  # another seed, epoch, stream
    others = [kr.keyed_uniform(kr.stream_key(*k), idx, 5) for k in keys]
    assert all((o != u).float().mean() > 0.99 for o in others)
    assert abs(float(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1])) < 0.1
    assert stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3


# ---- distributions of the per-sample decisions ----

N_DRAWS = 81 * 200


@pytest.fixture(scope="module")
def params():
    return A.sample_params(torch.arange(N_DRAWS), seed=11, epoch=4, cfg=CFG, height=32, width=32)


def _uniform_counts_ok(values, k):
    counts = torch.bincount(values.flatten(), minlength=k)
    assert len(counts) == k
    return stats.chisquare(counts.numpy()).pvalue > 1e-3


def _rate_ok(flags, p):
    sd = (p * (1 - p) / flags.numel()) ** 0.5
    return abs(float(flags.float().mean()) - p) < 4 * sd


def test_crop_offsets_uniform_over_81_positions(params):
    assert int(params.offsets.min()) == 0 and int(params.offsets.max()) == 8
    assert _uniform_counts_ok(params.offsets[:, 0] * 9 + params.offsets[:, 1], 81)


def test_flip_and_sign_rates(params):
    assert _rate_ok(params.flip, 0.5)
    assert _rate_ok(params.negative, 0.5)
    assert not A.sample_params(torch.arange(100), seed=0, epoch=0, cfg=PLAIN, height=32, width=32).flip.any()


def test_op_choice_frequencies(params):
    assert params.ops.shape == (N_DRAWS, 2)
    for slot in range(2):
        assert _uniform_counts_ok(params.ops[:, slot], len(ra.OPS))
    assert (params.ops[:, 0] != params.ops[:, 1]).float().mean() > 0.9  # slots drawn independently


def test_erasing_rate_and_boxes(params):
    top, left, h, w = params.boxes.unbind(1)
    on = h > 0
    assert _rate_ok(on, 0.5)  # a fitting box is all but certain within 10 tries at 32 x 32
    assert ((top + h <= 32) & (left + w <= 32) & (top >= 0) & (left >= 0)).all()
    area = (h * w)[on].float() / 1024
    assert 0.02 * 0.7 < float(area.min()) and float(area.max()) < 0.33 * 1.3  # rounded sides
    assert 0.02 < float(area.mean()) < 0.33
    aspect = (h.float() / w.float())[on]
    assert 0.3 * 0.6 < float(aspect.min()) and float(aspect.max()) < 3.3 / 0.6
    assert float(top[on].float().std()) > 3  # placed all over, not pinned to a corner


# ---- MixUp / CutMix ----

def test_mixing_off_returns_the_batch():
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    out, yb, lam = M.mix_batch(x, y, seed=0, epoch=0, step=0, cfg=AugmentConfig())
    assert out is x and yb is y and lam.dtype == torch.float32 and lam.ndim == 0 and float(lam) == 1.0


def _row(use_cutmix, lam, box, key):
    return torch.tensor([float(use_cutmix), lam, *map(float, box), float(key)], dtype=torch.float64)


def test_mixup_and_cutmix_rows_by_hand():
    x, y = torch.randn(6, 3, 10, 12), torch.arange(6) * 10
    key = kr.stream_key(4, 5, kr.MIX_PERM, 6)
    perm = torch.argsort(kr.keyed_bits(key, torch.arange(6), 1)[:, 0], stable=True)
    out, yb, lam = M.mix_rows(x, y, _row(False, 0.3, (0, 0, 0, 0), key))
    torch.testing.assert_close(out, 0.3 * x + 0.7 * x[perm])
    assert torch.equal(yb, y[perm]) and float(lam) == pytest.approx(0.3)
    out, yb, lam = M.mix_rows(x, y, _row(True, 0.75, (2, 3, 7, 11), key))
    expected = x.clone()
    expected[:, :, 2:7, 3:11] = x[perm][:, :, 2:7, 3:11]
    assert torch.equal(out, expected) and torch.equal(yb, y[perm]) and float(lam) == 0.75


def test_a_mix_table_holds_each_steps_draw():
    table = M.mix_table(MIX, seed=1, epoch=2, steps=5, height=16, width=16)
    assert table.shape == (5, M.ROW_WIDTH) and table.dtype == torch.float64
    for step in range(5):
        assert table[step].tolist() == M.mix_row(MIX, seed=1, epoch=2, step=step, height=16, width=16)


@pytest.mark.parametrize("cfg", [MIX, AugmentConfig(mixup_alpha=1.0), AugmentConfig(cutmix_alpha=1.0)],
                         ids=["both", "mixup", "cutmix"])  # fmt: skip
def test_mix_batch(cfg):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 100, (32,), generator=g)
    kinds = []
    for step in range(200):
        out, yb, lam = M.mix_batch(x, y, seed=1, epoch=2, step=step, cfg=cfg)
        assert lam.shape == () and lam.dtype == torch.float32 and 0 <= float(lam) <= 1
        bits = kr.keyed_bits(kr.stream_key(1, 2, kr.MIX_PERM, step), torch.arange(32), 1)[:, 0]
        perm = torch.argsort(bits, stable=True)
        assert torch.equal(yb, y[perm]) and sorted(perm.tolist()) == list(range(32))
        is_cut = not torch.allclose(out, lam * x + (1 - lam) * x[perm], atol=1e-5)
        if is_cut:  # every image took the same box from its partner; lam is the rest
            taken = (out != x).any(1)[perm != torch.arange(32)]  # (N', H, W), fixed points left out
            assert torch.equal(taken, taken[:1].expand_as(taken))
            assert torch.equal(out, torch.where(taken[:1, None], x[perm], x))
            assert abs(float(lam) - (1 - float(taken[0].float().mean()))) < 1e-6
        kinds.append(is_cut)
    again = M.mix_batch(x, y, seed=1, epoch=2, step=7, cfg=cfg)
    first = M.mix_batch(x, y, seed=1, epoch=2, step=7, cfg=cfg)
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    rate = sum(kinds) / len(kinds)
    expected = {"both": 0.5, "mixup": 0.0, "cutmix": 1.0}[
        "both" if cfg.mixup_alpha and cfg.cutmix_alpha else "mixup" if cfg.mixup_alpha else "cutmix"]
    assert abs(rate - expected) < 0.15


# ---- test-time augmentation ----


def test_tta_views_and_probs():
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    views = A.tta_views(x)
    assert len(views) == 2 and views[0] is x and torch.equal(views[1], x.flip(-1))
    weight = torch.randn(3 * 8 * 8, 5)

    def model(v):
        return (v.reshape(len(v), -1) @ weight).to(torch.bfloat16)

    probs = A.tta_probs(model, x)
    expected = (torch.softmax(model(x).float(), -1) + torch.softmax(model(x.flip(-1)).float(), -1)) / 2
    assert probs.dtype == torch.float32 and probs.shape == (4, 5)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
