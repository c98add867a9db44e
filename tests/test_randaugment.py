"""RandAugment's ops with fixed per-sample parameters against torchvision.transforms.v2 on the same images.

The reference for an op is what torchvision's RandAugment itself runs for it
(`RandAugment._apply_image_or_video_transform`, private but the only place that pins the
argument mapping: shear pivots, rotate's sign, int() translations); the installed torchvision
is pinned in the environment, so a change there fails here loudly rather than silently.
Every op matches exactly (uint8, bit for bit), the warps included: the nearest-neighbour
coordinates are formed with the same float32 steps, and no output pixel lies within float
error of a rounding tie at these magnitudes.
"""

import pytest
import torch
import torchvision.transforms.v2 as T
from torchvision.transforms.v2 import functional as TF

from fastcifar import augment as A
from fastcifar import randaugment as ra

MAGNITUDES = (0, 5, 9, 17, 30)


def _images(n=24, size=32, seed=0):
    """Random images plus the awkward ones: flat, grey, low-contrast, two-level, tiny range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    x[0] = 77  # flat
    x[1] = x[1, :1]  # grey (r = g = b)
    x[2] = 100 + x[2] // 16  # low contrast
    x[3] = (x[3] > 127).to(torch.uint8) * 255  # two levels
    x[4, 0] = 0  # one channel flat
    x[5] = x[5] // 64 * 64 + 3  # few levels
    smooth = torch.linspace(0, 255, size).round().to(torch.uint8)
    x[6] = smooth.view(1, 1, -1).expand(3, size, size)  # a ramp: large flat neighbourhoods
    return x


def _tv_op(image, op, value):
    """torchvision's RandAugment applying `op` at signed `value` to one image."""
    tv = T.RandAugment()
    return tv._apply_image_or_video_transform(image, op, value, interpolation=tv.interpolation, fill=tv._fill)


def _ours(images, op, magnitude, negative):
    """Our batched op at bin `magnitude`, sign negated where `negative`, for every sample, as
    RandAugment applies it (warps through affine_warp, colour ops through the slot dispatch)."""
    n, _, h, w = images.shape
    value = ra.op_value(op, magnitude, h, w) * (-1 if negative else 1)
    if op in ra.GEOMETRIC:
        mats = torch.tensor(ra.op_matrix(op, value, h, w)).view(1, 2, 3).expand(n, 2, 3)
        return A.affine_warp(images, mats)
    consts = ra.slot_constants(magnitude, h, w, images.device)
    return ra._color_op(ra.OPS.index(op), images, torch.full((n,), negative), consts)


def test_magnitude_tables_match_torchvision():
    for op, (table_fn, signed) in T.RandAugment._AUGMENTATION_SPACE.items():
        for h, w in ((32, 32), (24, 40)):
            table = table_fn(ra.NUM_BINS, h, w)
            for m in range(ra.NUM_BINS):
                expected = float(table[m]) if table is not None else 0.0
                assert ra.op_value(op, m, h, w) == expected, (op, m)
            assert (op in ra._SIGNED) == signed
    assert tuple(T.RandAugment._AUGMENTATION_SPACE) == ra.OPS


@pytest.mark.parametrize("op", [op for op in ra.OPS if op != "Identity"])
def test_each_op_matches_torchvision_exactly(op):
    x = _images()
    for m in MAGNITUDES:
        for negative in (False, True) if op in ra._SIGNED else (False,):
            value = ra.op_value(op, m, 32, 32) * (-1 if negative else 1)
            ours = _ours(x, op, m, negative)
            ref = torch.stack([_tv_op(img, op, value) for img in x])
            assert ours.dtype == torch.uint8 and ours.shape == x.shape
            assert torch.equal(ours, ref), (op, m, value, (ours.int() - ref.int()).abs().max())


def test_warps_match_on_non_square_images():
    x = _images(n=8, size=32)[..., :24, :]  # 24 x 32, a strided view
    h, w = x.shape[-2:]
    for op in ra.GEOMETRIC:
        value = ra.op_value(op, 9, h, w)
        for signed in (value, -value):
            mats = torch.tensor(ra.op_matrix(op, signed, h, w)).view(1, 2, 3).expand(len(x), 2, 3)
            ref = torch.stack([_tv_op(img, op, signed) for img in x])
            assert torch.equal(A.affine_warp(x, mats), ref), (op, signed)


def test_affine_warp_takes_any_matrix_per_sample():
    x = _images(n=8)[3:7]
    params = [(33.0, [2, -3], [10.0, -5.0]), (-120.0, [0, 0], [0.0, 0.0]), (7.5, [-9, 4], [0.0, 20.0]),
              (0.0, [1, 1], [-30.0, 0.0])]  # fmt: skip
    mats = torch.tensor([ra.inverse_affine([0.0, 0.0], a, t, s) for a, t, s in params])
    ref = torch.stack([TF.affine(img, angle=a, translate=t, scale=1.0, shear=s)
                       for img, (a, t, s) in zip(x, params)])  # fmt: skip
    ours = A.affine_warp(x, mats.view(-1, 2, 3))
    # Nearest-neighbour: a pixel may only differ where its source coordinate sits within float
    # error of a rounding tie; none does for these parameters, so the match is exact.
    assert torch.equal(ours, ref)


def test_colour_ops_take_per_sample_parameters():
    x = _images(n=8)
    factors = torch.linspace(0.0, 1.9, 8, dtype=torch.float64)
    pairs = [(ra.brightness, TF.adjust_brightness), (ra.saturation, TF.adjust_saturation),
             (ra.contrast, TF.adjust_contrast), (ra.sharpness, TF.adjust_sharpness)]  # fmt: skip
    for ours, theirs in pairs:
        ref = torch.stack([theirs(img, float(f)) for img, f in zip(x, factors)])
        assert torch.equal(ours(x, factors), ref), ours.__name__
    bits = torch.arange(8) % 9
    ref = torch.stack([TF.posterize(img, int(b)) for img, b in zip(x, bits)])
    assert torch.equal(ra.posterize(x, bits), ref)
    thresholds = torch.tensor([0.0, 0.5, 1.0, 127.5, 128.0, 200.2, 254.9, 255.0], dtype=torch.float64)
    ref = torch.stack([TF.solarize(img, float(t)) for img, t in zip(x, thresholds)])
    assert torch.equal(ra.solarize(x, thresholds), ref)
    assert torch.equal(ra.autocontrast(x), torch.stack([TF.autocontrast(img) for img in x]))
    assert torch.equal(ra.equalize(x), torch.stack([TF.equalize(img) for img in x]))


def test_colour_ops_reject_float_images():
    with pytest.raises(TypeError, match="uint8"):
        ra.brightness(torch.rand(2, 3, 8, 8), torch.ones(2))


@pytest.mark.parametrize("magnitude", [9, 30])
def test_grouped_and_masked_strategies_agree(magnitude):
    x = _images(n=64, seed=1)
    g = torch.Generator().manual_seed(2)
    ops = torch.randint(0, len(ra.OPS), (64,), generator=g)
    neg = torch.rand(64, generator=g) < 0.5
    table = A._ra_index_table(magnitude, 32, 32, 0, x.device)

    def warp(images, op_ids, negative):
        return A._gather(images, table.index_select(0, A._table_row(0, op_ids, negative)), 0)

    for w in (None, warp):
        grouped = ra.apply_slot(x, ops, neg, magnitude, warp=w, strategy="grouped")
        masked = ra.apply_slot(x, ops, neg, magnitude, warp=w, strategy="masked")
        assert torch.equal(grouped, masked)
    # each sample got its own op: compare with the op applied alone
    out = ra.apply_slot(x, ops, neg, magnitude, warp=warp)
    for i in (0, 5, 17, 40):
        op = ra.OPS[int(ops[i])]
        value = ra.op_value(op, magnitude, 32, 32) * (-1 if neg[i] else 1)
        assert torch.equal(out[i], _tv_op(x[i], op, value)), op
    with pytest.raises(ValueError, match="strategy"):
        ra.apply_slot(x, ops, neg, magnitude, strategy="bogus")
