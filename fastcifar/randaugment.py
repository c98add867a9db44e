"""RandAugment on a uint8 batch: torchvision's op set and magnitudes, each sample its own ops and signs.

The colour ops take explicit per-sample parameters and reproduce
torchvision.transforms.v2.functional on uint8 images (same float32 formulas, same rounding);
the geometric ops are expressed as inverse affine matrices that `augment` applies as
nearest-neighbour gathers. `apply_slot` applies one RandAugment slot to a batch.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

# torchvision's RandAugment ops, in its order (an op id is an index into this tuple).
OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_SIGNED = GEOMETRIC + ("Brightness", "Color", "Contrast", "Sharpness")
_TOP = {"ShearX": 0.3, "ShearY": 0.3, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9,
        "Contrast": 0.9, "Sharpness": 0.9}  # fmt: skip  # value at the last bin
NUM_BINS = 31  # torchvision's default num_magnitude_bins


@functools.lru_cache(maxsize=None)
def op_value(op: str, magnitude: int, height: int, width: int, num_bins: int = NUM_BINS) -> float:
    """The unsigned magnitude torchvision uses for `op` at bin `magnitude` (float32 tables, as it does)."""
    if op in _TOP:
        return float(torch.linspace(0.0, _TOP[op], num_bins)[magnitude])
    if op in ("TranslateX", "TranslateY"):
        side = width if op == "TranslateX" else height
        return float(torch.linspace(0.0, 150.0 / 331.0 * side, num_bins)[magnitude])
    if op == "Posterize":
        return float((8 - (torch.arange(num_bins) / ((num_bins - 1) / 4))).round().int()[magnitude])
    if op == "Solarize":
        return float(torch.linspace(1.0, 0.0, num_bins)[magnitude])
    return 0.0


def inverse_affine(center, angle, translate, shear) -> list[float]:
    """Output-to-input 2x3 map (row-major, 6 floats) in pixel units centred on the image centre.

    The map of a rotation by `angle` degrees, shears `shear` (degrees, x then y) and a
    translation, about `center`; torchvision's convention (its `_get_inverse_affine_matrix`).
    """
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    m = [d, -b, 0.0, -c, a, 0.0]  # inverse of [[a, b], [c, d]], whose determinant is 1
    cx, cy = center
    tx, ty = cx + translate[0], cy + translate[1]
    m[2] += cx - m[0] * tx - m[1] * ty
    m[5] += cy - m[3] * tx - m[4] * ty
    return m


def op_matrix(op: str, value: float, height: int, width: int) -> list[float]:
    """The inverse affine matrix torchvision's RandAugment uses for geometric `op` at signed `value`."""
    corner = [-0.5 * width, -0.5 * height]  # shears pivot on the top-left corner
    if op == "ShearX":
        return inverse_affine(corner, 0.0, [0.0, 0.0], [math.degrees(math.atan(value)), 0.0])
    if op == "ShearY":
        return inverse_affine(corner, 0.0, [0.0, 0.0], [0.0, math.degrees(math.atan(value))])
    if op == "TranslateX":
        return inverse_affine([0.0, 0.0], 0.0, [float(int(value)), 0.0], [0.0, 0.0])
    if op == "TranslateY":
        return inverse_affine([0.0, 0.0], 0.0, [0.0, float(int(value))], [0.0, 0.0])
    if op == "Rotate":  # rotate() turns the other way from affine(), hence -angle
        return inverse_affine([0.0, 0.0], -(value % 360), [0.0, 0.0], [0.0, 0.0])
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def source_coords(matrices: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest source pixel of every output pixel under inverse affine `matrices` (M, 2, 3) float32.

    Returns (iy, ix, inside), each (M, height*width): int64 rows and columns, bool in-image.
    Same float32 steps as torchvision's grid + grid_sample(nearest, align_corners=False), so the
    rounding (half to even) lands on the same pixels.
    """
    dev = matrices.device
    base = torch.empty(1, height, width, 3, device=dev)
    base[..., 0] = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=dev)
    base[..., 1] = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=dev)[:, None]
    base[..., 2] = 1.0
    theta = matrices.to(torch.float32).transpose(1, 2).contiguous()  # (M, 3, 2)
    theta[..., 0] /= 0.5 * width  # scalars, not a tensor: no host-to-device copy
    theta[..., 1] /= 0.5 * height
    grid = base.view(1, -1, 3).expand(len(matrices), -1, -1).bmm(theta)
    ix = (((grid[..., 0] + 1) * width - 1) / 2).round()
    iy = (((grid[..., 1] + 1) * height - 1) / 2).round()
    inside = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    return iy.long(), ix.long(), inside


@functools.lru_cache(maxsize=16)
def ra_matrices(magnitude: int, height: int, width: int) -> Tensor:
    """(len(OPS), 2, 2, 3) float32 CPU: inverse matrix per (op, negative sign); identity for colour ops."""
    rows = []
    for op in OPS:
        value = op_value(op, magnitude, height, width)
        rows.append([op_matrix(op, value, height, width), op_matrix(op, -value, height, width)])
    return torch.tensor(rows, dtype=torch.float32).view(len(OPS), 2, 2, 3)


# ---- colour ops: uint8 (N, 3, H, W) in and out, one parameter per sample ----


def _check_uint8(images: Tensor) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(f"RandAugment's colour ops take uint8 images, got {images.dtype}")


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _factor_pair(factors: Tensor) -> tuple[Tensor, Tensor]:
    """(f, 1 - f) as float32 (N, 1, 1, 1), each rounded from float64 as torchvision rounds its
    Python-float factor and the `alpha=1.0 - factor` it passes with it."""
    f = _per_sample(factors.to(torch.float64))
    return f.to(torch.float32), (1.0 - f).to(torch.float32)


def _gray(x: Tensor) -> Tensor:
    """Floor of ITU-R 601 luma of float32 (N, 3, H, W) holding uint8 values -> (N, 1, H, W)."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(x: Tensor, other: Tensor, f: Tensor, a: Tensor) -> Tensor:
    """clamp(x*f + other*a) to uint8; addcmul fuses like torchvision's add(alpha=), bit for bit."""
    return torch.addcmul(x * f, other, a).clamp_(0, 255).to(torch.uint8)


# Kernels on uint8 (N, 3, H, W) with ready per-sample float32 (N, 1, 1, 1) factor f and 1 - f.


def _brightness(images: Tensor, f: Tensor, a: Tensor) -> Tensor:
    return images.to(torch.float32).mul_(f).clamp_(0, 255).to(torch.uint8)


def _saturation(images: Tensor, f: Tensor, a: Tensor) -> Tensor:
    x = images.to(torch.float32)
    return _blend(x, _gray(x), f, a)


def _contrast(images: Tensor, f: Tensor, a: Tensor) -> Tensor:
    x = images.to(torch.float32)
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f, a)


def _sharpness(images: Tensor, f: Tensor, a: Tensor) -> Tensor:
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images.clone()
    x = images.to(torch.float32)
    inner = x[..., 1:-1, 1:-1]
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    # An integer over 13 is never within float error of a half, so rounding it equals
    # rounding torchvision's float convolution with weights 1/13 and 5/13.
    smooth = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4).div_(13).round_()
    inner.addcmul_(smooth.sub_(inner), a)  # in place: x is our own copy
    return x.clamp_(0, 255).to(torch.uint8)


def brightness(images: Tensor, factors: Tensor) -> Tensor:
    """Scale by `factors` (N,) float (float64 for torchvision's exact rounding): adjust_brightness."""
    _check_uint8(images)
    return _brightness(images, *_factor_pair(factors))


def saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Blend with the grey image by `factors` (N,): adjust_saturation, RandAugment's "Color"."""
    _check_uint8(images)
    return _saturation(images, *_factor_pair(factors))


def contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Blend with the mean grey level by `factors` (N,): adjust_contrast per sample."""
    _check_uint8(images)
    return _contrast(images, *_factor_pair(factors))


def sharpness(images: Tensor, factors: Tensor) -> Tensor:
    """Blend the interior with a 3x3 smoothing (1s around a 5, over 13) by `factors` (N,)."""
    _check_uint8(images)
    return _sharpness(images, *_factor_pair(factors))


def posterize(images: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` (N,) int of each value (8 keeps all, 0 clears all)."""
    _check_uint8(images)
    mask = (255 << (8 - bits.to(torch.int64))) & 255
    return images & _per_sample(mask.to(torch.uint8))


def _solarize(images: Tensor, t: Tensor) -> Tensor:
    # x ^ 255 = 255 - x; where() is slow on CPU. A cast, not a bit-cast view: inductor 2.11 cannot
    # lower view(dtype) of a bool tensor (the H200's compile failure, 2026-12-04).
    return images ^ (images >= t).to(torch.uint8).mul_(255)


def solarize(images: Tensor, thresholds: Tensor) -> Tensor:
    """Invert values >= `thresholds` (N,) float (on the 0..255 scale)."""
    _check_uint8(images)
    # For integer x, x >= t exactly when x >= ceil(t): a uint8 compare, no float copy of the batch.
    return _solarize(images, _per_sample(thresholds.to(torch.float32).ceil().clamp(0, 255).to(torch.uint8)))


def autocontrast(images: Tensor) -> Tensor:
    """Stretch each channel of each image to span 0..255 (flat channels stay as they are)."""
    _check_uint8(images)
    lo = images.amin(dim=(-2, -1), keepdim=True).to(torch.float32)
    hi = images.amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    flat = hi == lo
    inv_scale = (hi - lo).mul_(1.0 / 255).masked_fill_(flat, 1.0)
    x = images.to(torch.float32).sub_(lo.masked_fill_(flat, 0.0))
    return x.div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def equalize(images: Tensor) -> Tensor:
    """Histogram-equalise each channel of each image with PIL's lookup table (integer, exact)."""
    _check_uint8(images)
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).to(torch.int64)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(1, flat, hist.new_ones(1).expand_as(flat))
    cum = hist.cumsum(1)
    top = hist.gather(1, cum.argmax(1, keepdim=True))  # count of the highest value present
    step = (h * w - top) // 255
    lut = ((cum[:, :-1] + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], dim=1)
    lut = torch.where(step > 0, lut, torch.arange(256, device=images.device))  # step 0: unchanged
    return lut.to(torch.uint8).gather(1, flat).view(n, c, h, w)


# ---- one RandAugment slot over a batch ----

_FACTOR_OPS = {
    "Brightness": _brightness, "Color": _saturation, "Contrast": _contrast, "Sharpness": _sharpness,
}  # fmt: skip


@functools.lru_cache(maxsize=64)
def slot_constants(magnitude: int, height: int, width: int, device: torch.device) -> dict:
    """Per colour op id: its ready parameters on `device`, made once per setting (pass them to
    `apply_slot` from traced code: no cache lookup inside the graph)."""
    consts = {}
    for op in _FACTOR_OPS:
        v = op_value(op, magnitude, height, width)
        f = torch.tensor([1.0 + v, 1.0 - v], dtype=torch.float64)  # [positive, negative] sign
        consts[OPS.index(op)] = torch.stack([f, 1.0 - f]).to(device, torch.float32)  # (2: f, 1-f; 2: sign)
    bits = int(op_value("Posterize", magnitude, height, width))
    consts[OPS.index("Posterize")] = (255 << (8 - bits)) & 255
    threshold = 255.0 * op_value("Solarize", magnitude, height, width)  # as torchvision: bound * magnitude
    threshold = torch.tensor(threshold, dtype=torch.float32).ceil().clamp(0, 255)  # see `solarize`
    consts[OPS.index("Solarize")] = threshold.to(device, torch.uint8)
    return consts


def _color_op(op_id: int, x: Tensor, negative: Tensor, consts: dict) -> Tensor:
    """Colour op `op_id` on x (n, 3, H, W) uint8 with signs `negative` (n,) bool."""
    op = OPS[op_id]
    if op in _FACTOR_OPS:
        f, a = consts[op_id][:, negative.long()].view(2, -1, 1, 1, 1).unbind(0)
        return _FACTOR_OPS[op](x, f, a)
    if op == "Posterize":
        return x & consts[op_id]
    if op == "Solarize":
        return _solarize(x, consts[op_id])
    return autocontrast(x) if op == "AutoContrast" else equalize(x)


_COLOR_OPS = (*_FACTOR_OPS, "Posterize", "Solarize", "AutoContrast", "Equalize")
_COLOR_IDS = tuple(OPS.index(op) for op in _COLOR_OPS)


_FIRST_GEOMETRIC, _LAST_GEOMETRIC = OPS.index(GEOMETRIC[0]), OPS.index(GEOMETRIC[-1])
# Geometric op ids are contiguous, so after sorting by op their samples are one block: one warp.
assert OPS[_FIRST_GEOMETRIC : _LAST_GEOMETRIC + 1] == GEOMETRIC


def apply_slot(
    images: Tensor,
    op_ids: Tensor,
    negative: Tensor,
    magnitude: int,
    warp: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    strategy: str = "auto",
    constants: dict | None = None,
) -> Tensor:
    """Apply each sample's op of one RandAugment slot.

    images: (N, 3, H, W) uint8; op_ids: (N,) int64 indices into OPS; negative: (N,) bool sign.
    warp(images, op_ids, negative) applies the geometric ops (it must leave other ops' samples
    as they are); None leaves them out, for a caller that already applied them.
    strategy "grouped" sorts the batch by op and runs each op on its own samples only (least
    work, but the group sizes go to the host: a device sync on a GPU); "masked" runs every op
    on the whole batch and selects (static shapes: no sync, fusable by torch.compile); "auto"
    is grouped on the CPU and masked elsewhere (and under torch.compile). Both give identical
    results. constants: `slot_constants(magnitude, H, W, device)`, made here when None.
    """
    if strategy == "auto":
        cpu = images.device.type == "cpu" and not torch.compiler.is_compiling()
        strategy = "grouped" if cpu else "masked"
    consts = constants if constants is not None else slot_constants(magnitude, *images.shape[-2:], images.device)
    if strategy == "masked":
        src = images if warp is None else warp(images, op_ids, negative)
        out = src
        for k in _COLOR_IDS:
            out = torch.where(_per_sample(op_ids == k), _color_op(k, src, negative, consts), out)
        return out
    if strategy != "grouped":
        raise ValueError(f"strategy must be auto, grouped or masked, got {strategy!r}")
    order = torch.argsort(op_ids, stable=True)
    counts = torch.bincount(op_ids, minlength=len(OPS)).tolist()
    x = images.index_select(0, order)
    neg, ops = negative.index_select(0, order), op_ids.index_select(0, order)
    starts = [sum(counts[:k]) for k in range(len(OPS) + 1)]
    geo = slice(starts[_FIRST_GEOMETRIC], starts[_LAST_GEOMETRIC + 1])
    if warp is not None and geo.stop > geo.start:
        x[geo] = warp(x[geo], ops[geo], neg[geo])
    for k in _COLOR_IDS:
        if counts[k]:
            part = slice(starts[k], starts[k + 1])
            x[part] = _color_op(k, x[part], neg[part], consts)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return x.index_select(0, inverse)
