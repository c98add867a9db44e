"""Batched augmentation on the device: crop, flip, RandAugment, erasing, normalisation, TTA views.

Every function is pure and vectorised over the batch (no loop over samples). Per-sample
randomness comes from `keyed_random`, keyed by (seed, epoch, sample index), so a sample is
augmented the same way in an epoch whatever batch it lands in. MixUp/CutMix: `mixing`. The training pipeline follows
the paper's torchvision one: RandomCrop(pad 4) -> HorizontalFlip -> RandAugment(2, 9) ->
ToDtype + Normalize -> RandomErasing (on the normalised image, so "zero" is the mean colour).

Crop, flip and the first RandAugment op's warp are one nearest-neighbour gather: each is an
integer map from output to source pixel, so their composition is exact.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcifar import keyed_random as kr
from fastcifar import randaugment as ra
from fastcifar.config import AugmentConfig

ERASE_SCALE = (0.02, 0.33)  # erased area as a fraction of the image (torchvision's defaults)
ERASE_RATIO = (0.3, 3.3)  # erased box aspect ratio, height / width
ERASE_TRIES = 10  # boxes tried per image before giving up, as torchvision
NOISE_TABLE = 1 << 18  # standard normals per (seed, epoch) for erasing_value "random", at least


class AugmentParams(NamedTuple):
    """Per-sample decisions of `train_augment`; every tensor has the batch size N first."""

    offsets: Tensor  # (N, 2) int64 crop (top, left) in the zero-padded image, in [0, 2*padding]
    flip: Tensor  # (N,) bool
    ops: Tensor  # (N, K) int64 RandAugment op ids (indices into randaugment.OPS)
    negative: Tensor  # (N, K) bool: the op's magnitude is negated
    boxes: Tensor  # (N, 4) int64 erased (top, left, height, width); height 0 = not erased
    noise_start: Tensor  # (N,) int64 start of the sample's erasing noise in the epoch's table


# ---- nearest-neighbour resampling: crop, flip, affine warp ----


def _gather(images: Tensor, index: Tensor, padding: int) -> Tensor:
    """out[n, c, k] = buf[n, c, index[n, k]]: buf is `images` zero-padded by `padding` on each side
    plus 2*padding+1 more zero rows on top, flattened per channel; index (N, H*W) int64."""
    n, c, h, w = images.shape
    top = 2 * padding + 1
    buf = images.new_zeros(n, c, top + h + 2 * padding, w + 2 * padding)
    # contiguous() first: a plain transposing copy of channels_last into the buffer is slower
    buf[:, :, top + padding : top + padding + h, padding : padding + w] = images.contiguous()
    flat = buf.view(n, c, buf.shape[-2] * buf.shape[-1])
    return flat.gather(2, index.unsqueeze(1).expand(n, c, h * w)).view(n, c, h, w)


def _buffer_index(iy: Tensor, ix: Tensor, inside: Tensor, width: int, padding: int, flip) -> Tensor:
    """Flat `_gather` buffer index of source pixels (iy, ix) of the crop window at offset (0, 0),
    mirrored where `flip`; outside pixels point at the zero row block, which any crop shift keeps."""
    fx = torch.where(flip, width - 1 - ix, ix) if flip is not None else ix
    return torch.where(inside, (2 * padding + 1 + iy) * (width + 2 * padding) + fx, 0)


def crop_flip_warp(
    images: Tensor, offsets: Tensor, flip: Tensor | None, matrices: Tensor | None, padding: int
) -> Tensor:
    """Zero-pad by `padding`, crop back to H x W at `offsets`, mirror where `flip`, then warp.

    images: (N, C, H, W) any dtype; offsets: (N, 2) int64 (top, left) in [0, 2*padding];
    flip: (N,) bool or None; matrices: (N, 2, 3) float output-to-input maps in pixels about the
    image centre (torchvision's convention: `randaugment.inverse_affine`), applied as its nearest
    warp with fill 0, or None for no warp. Returns (N, C, H, W) contiguous.
    """
    n, _, h, w = images.shape
    if matrices is None:
        matrices = torch.eye(2, 3, device=images.device).expand(n, 2, 3)
    iy, ix, inside = ra.source_coords(matrices, h, w)
    fl = None if flip is None else flip.view(-1, 1)
    index = _buffer_index(iy, ix, inside, w, padding, fl)
    index = index + (offsets[:, :1] * (w + 2 * padding) + offsets[:, 1:]).to(index.device)
    return _gather(images, index, padding)


def crop(images: Tensor, offsets: Tensor, padding: int) -> Tensor:
    """torchvision's crop(pad(images, padding), top, left, H, W) per sample; offsets (N, 2) int64."""
    return crop_flip_warp(images, offsets, None, None, padding)


def hflip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the samples where `mask` (N,) bool is set."""
    return crop_flip_warp(images, _no_offsets(images), mask, None, 0)


def affine_warp(images: Tensor, matrices: Tensor) -> Tensor:
    """Nearest-neighbour warp by inverse affine `matrices` (N, 2, 3), fill 0, as torchvision's affine."""
    return crop_flip_warp(images, _no_offsets(images), None, matrices, 0)


def _no_offsets(images: Tensor) -> Tensor:
    return torch.zeros(len(images), 2, dtype=torch.int64, device=images.device)


@functools.lru_cache(maxsize=32)
def _ra_index_table(magnitude: int, height: int, width: int, padding: int, device: torch.device) -> Tensor:
    """(2 * len(OPS) * 2, H*W) int64 `_gather` index per (flip, op, negative), crop offset (0, 0).

    Computed once on the CPU, so every device warps identically."""
    mats = ra.ra_matrices(magnitude, height, width).view(-1, 2, 3)
    iy, ix, inside = ra.source_coords(mats, height, width)
    table = [_buffer_index(iy, ix, inside, width, padding, torch.tensor(f)) for f in (False, True)]
    return torch.cat(table).to(device)


def _table_row(flip: Tensor | int, op_ids: Tensor, negative: Tensor) -> Tensor:
    return (flip * len(ra.OPS) + op_ids) * 2 + negative.long()


# ---- random erasing ----


def _box_mask(boxes: Tensor, height: int, width: int, channels: int = 1) -> Tensor:
    """(N, H, W*channels) bool: inside box (top, left, height, width) of `boxes` (N, 4) int64,
    on a channels-last row layout (channels = 1 gives the plain (N, H, W) mask)."""
    dev = boxes.device
    top, left, bh, bw = (b.view(-1, 1, 1) for b in boxes.unbind(1))
    rows = torch.arange(height, device=dev).view(1, -1, 1)
    cols = torch.arange(width * channels, device=dev).view(1, 1, -1)
    in_rows = (rows >= top) & (rows < top + bh)
    in_cols = (cols >= left * channels) & (cols < (left + bw) * channels)
    return in_rows & in_cols  # no bool bit-casts in traced code: not every inductor version lowers them


def erase(images: Tensor, boxes: Tensor, values: Tensor | float = 0.0) -> Tensor:
    """Set the box (top, left, height, width) of each sample, `boxes` (N, 4) int64, to `values`.

    images: (N, C, H, W) any dtype; values: a number, or a tensor broadcastable to images
    (e.g. per-pixel noise). Height or width 0 leaves a sample unchanged.
    """
    mask = _box_mask(boxes, *images.shape[-2:]).unsqueeze(1)
    if isinstance(values, Tensor):
        return torch.where(mask, values.to(images.dtype), images)
    return images.masked_fill(mask, values)


def erase_boxes(bits: Tensor, p: float, height: int, width: int) -> Tensor:
    """torchvision RandomErasing's box choice, vectorised: (N, 4) int64 (top, left, height, width).

    bits: (N, 2*ERASE_TRIES + 3) keyed 32-bit words. A sample is erased with probability `p`,
    with the first of ERASE_TRIES (area, aspect) draws that fits; none fitting means no erasing.
    """
    u = (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
    t = ERASE_TRIES
    area = height * width * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[:, 1 : 1 + t])
    lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, 1 + t : 1 + 2 * t])
    bh = torch.sqrt(area * aspect).round().long()
    bw = torch.sqrt(area / aspect).round().long()
    fits = (bh < height) & (bw < width)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    bh, bw = bh.gather(1, first)[:, 0], bw.gather(1, first)[:, 0]
    on = (u[:, 0] < p) & fits.any(1)
    top = kr.choice(bits[:, -2], height - bh + 1)
    left = kr.choice(bits[:, -1], width - bw + 1)
    return torch.stack([top, left, bh, bw], 1) * on.view(-1, 1)


# ---- normalisation (fused with erasing and resizing) ----


@functools.lru_cache(maxsize=16)
def _affine_constants(mean: tuple, std: tuple, width: int, from_uint8: bool, device: torch.device):
    """(scale, shift) float32 (width * C,): x * scale + shift = (x / 255 - mean) / std, tiled along W."""
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / 255 if from_uint8 else 1.0) / std_t
    shift = -torch.tensor(mean, dtype=torch.float64) / std_t
    return scale.repeat(width).to(device, torch.float32), shift.repeat(width).to(device, torch.float32)


def normalize(
    images: Tensor,
    mean,
    std,
    *,
    boxes: Tensor | None = None,
    values: Tensor | float = 0.0,
    size: int | None = None,
    out_dtype: torch.dtype = torch.float32,
    constants: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """(images / 255 - mean) / std for uint8 (float in [0, 1] skips the / 255), then erase `boxes`
    with `values` (see `erase`), then resize bilinearly to size x size. Returns channels_last.

    images: (N, C, H, W) any strides. The work runs on an (N, H, W*C) channels-last view with
    the per-channel constants tiled along W*C, so every loop is long and vectorised.
    constants: `_affine_constants` made beforehand (a traced caller passes them: no cache lookup
    inside the graph).
    """
    n, c, h, w = images.shape
    out = torch.empty(n, h, w, c, device=images.device)
    for ch in range(c):  # per-channel strided copies beat one transposing copy with 3-long loops
        out[..., ch] = images[:, ch]
    rows = out.view(n, h, w * c)
    if constants is None:
        constants = _affine_constants(tuple(mean), tuple(std), w, images.dtype == torch.uint8, images.device)
    scale, shift = constants
    torch.addcmul(shift, rows, scale, out=rows)
    if boxes is not None:
        inside = _box_mask(boxes, h, w, c)
        if isinstance(values, Tensor):  # (N, C, H, W) -> the same channels-last rows
            rows.copy_(torch.where(inside, values.permute(0, 2, 3, 1).reshape(n, h, w * c), rows))
        else:
            rows.masked_fill_(inside, values)
    out = out.permute(0, 3, 1, 2)  # (N, C, H, W) view of channels_last memory
    if size is not None and (size, size) != (h, w):
        shrink = size < min(h, w)  # antialias only matters when shrinking
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.to(dtype=out_dtype, memory_format=torch.channels_last)


# ---- the pipelines the trainer calls ----

# Column layout of a sample's keyed words: fixed, so a setting that draws more leaves the rest alone.
_CROP, _FLIP, _ERASE = slice(0, 2), 2, slice(3, 3 + 2 * ERASE_TRIES + 3)
_NOISE = _ERASE.stop  # where the sample's erasing noise starts in the epoch's noise table
_RA = _NOISE + 1  # then (op, sign) per RandAugment slot


def train_key(seed: int, epoch: int) -> int:
    """The 32-bit key of an epoch's training augmentation (pass it as a 0-d int64 tensor to a graph)."""
    return kr.stream_key(seed, epoch, kr.TRAIN)


def sample_params(indices: Tensor, *, seed: int, epoch: int, cfg: AugmentConfig, height: int, width: int):
    """Every per-sample decision of `train_augment` for samples `indices` (N,) int64 -> AugmentParams."""
    return _params(indices, train_key(seed, epoch), cfg, height, width)


def _words(cfg: AugmentConfig) -> int:
    """Keyed 32-bit words per sample: crop, flip, erasing, noise start, and two per RandAugment op."""
    return _RA + 2 * cfg.randaugment_ops


def _params(indices: Tensor, key, cfg: AugmentConfig, height: int, width: int,
            counters: Tensor | None = None) -> AugmentParams:
    """`sample_params` from the epoch's key (an int, or a 0-d int64 tensor on the indices' device);
    counters: `kr.weyl_counters(_words(cfg), device)` made beforehand, for a traced caller."""
    bits = kr.keyed_bits(key, indices, _words(cfg), counters)
    offsets = kr.choice(bits[:, _CROP], 2 * cfg.crop_padding + 1)
    flip = bits[:, _FLIP] < (1 << 31) if cfg.flip else torch.zeros_like(indices, dtype=torch.bool)
    ops = kr.choice(bits[:, _RA::2], len(ra.OPS))
    negative = bits[:, _RA + 1 :: 2] <= (1 << 31)  # torchvision negates when rand() <= 0.5
    boxes = erase_boxes(bits[:, _ERASE], cfg.erasing_p, height, width)
    noise_start = kr.choice(bits[:, _NOISE], _noise_len(height, width) - 3 * height * width + 1)
    return AugmentParams(offsets, flip, ops, negative, boxes, noise_start)


def _noise_len(height: int, width: int) -> int:
    return max(NOISE_TABLE, 8 * 3 * height * width // 1024 * 1024)


def noise_table(seed: int, epoch: int, length: int, device: torch.device) -> Tensor:
    """`length` keyed standard normals, float32 on `device`, for one (seed, epoch).

    Hashing a fresh normal for every pixel of every image would cost several times the whole
    pipeline; each sample instead reads a window at its own keyed start, so its noise is still
    a function of (seed, epoch, index) alone."""
    rows = torch.arange(length // 1024, device=device)
    return kr.keyed_normal(kr.stream_key(seed, epoch, kr.ERASE_NOISE), rows, 1024).view(-1)


_noise_table = functools.lru_cache(maxsize=4)(noise_table)  # the functional API's per-epoch tables


def _as_uint8(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)  # float in [0, 1]


class TrainAugment:
    """The training augmentation for one setting, image size and device, its constants made once.

    A call runs tensor ops only, on its arguments and these constants: it traces as one graph
    under torch.compile(fullgraph=True, dynamic=False) and can be captured in a CUDA graph.
    graph_safe=True picks the RandAugment strategy that reads nothing back to the host ("masked");
    otherwise "auto" (grouped on the CPU, where it is faster).
    """

    def __init__(self, cfg: AugmentConfig, height: int, width: int, device: torch.device,
                 graph_safe: bool = False):
        self.cfg, self.height, self.width = cfg, height, width
        pad, mag = cfg.crop_padding, cfg.randaugment_magnitude
        self.first_table = _ra_index_table(mag, height, width, pad, device)  # crop + flip + first op
        self.later_table = _ra_index_table(mag, height, width, 0, device)
        self.slot_constants = ra.slot_constants(mag, height, width, device)
        self.normalize_constants = _affine_constants(tuple(cfg.mean), tuple(cfg.std), width, True, device)
        self.strategy = "masked" if graph_safe else "auto"
        self.noise_length = _noise_len(height, width)
        self.counters = kr.weyl_counters(_words(cfg), device)
        self.uses_noise = cfg.erasing_p > 0 and cfg.erasing_value == "random"

    def noise(self, seed: int, epoch: int, device: torch.device) -> Tensor | None:
        """The epoch's erasing noise table (None when erasing draws no noise); pass it to `__call__`."""
        return noise_table(seed, epoch, self.noise_length, device) if self.uses_noise else None

    def __call__(self, images: Tensor, indices: Tensor, key, noise: Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32) -> Tensor:
        """images: (N, 3, H, W) uint8 (float in [0, 1] is quantised first), any strides; indices: (N,)
        int64 sample ids; key: `train_key(seed, epoch)` as an int or a 0-d int64 tensor; noise: this
        epoch's `noise(...)`. Returns (N, 3, S, S) normalised `out_dtype`, channels_last, S = cfg.image_size.
        """
        cfg, h, w = self.cfg, self.height, self.width
        n, k, pad, mag = len(images), cfg.randaugment_ops, cfg.crop_padding, cfg.randaugment_magnitude
        p = _params(indices, key, cfg, h, w, self.counters)
        # Crop, flip and the first op's warp are one gather (op 0, Identity, when there is no op).
        none = torch.zeros_like(p.flip)
        first_op, first_neg = (p.ops[:, 0], p.negative[:, 0]) if k else (none.long(), none)
        index = self.first_table.index_select(0, _table_row(p.flip.long(), first_op, first_neg))
        index = index + (p.offsets[:, :1] * (w + 2 * pad) + p.offsets[:, 1:])  # the crop: a shift per sample
        x = _gather(_as_uint8(images), index, pad)
        later = self.later_table

        def warp(x: Tensor, op_ids: Tensor, negative: Tensor) -> Tensor:
            return _gather(x, later.index_select(0, _table_row(0, op_ids, negative)), 0)

        for slot in range(k):
            x = ra.apply_slot(x, p.ops[:, slot], p.negative[:, slot], mag, warp=warp if slot else None,
                              strategy=self.strategy, constants=self.slot_constants)
        boxes, values = (p.boxes if cfg.erasing_p > 0 else None), 0.0
        if boxes is not None and self.uses_noise:  # laid out in channels-last order
            windows = noise.unfold(0, 3 * h * w, 1)
            values = windows[p.noise_start].view(n, h, w, 3).permute(0, 3, 1, 2)
        return normalize(x, cfg.mean, cfg.std, boxes=boxes, values=values, size=cfg.image_size,
                         out_dtype=out_dtype, constants=self.normalize_constants)


@functools.lru_cache(maxsize=16)
def _plan(cfg: AugmentConfig, height: int, width: int, device: torch.device) -> TrainAugment:
    return TrainAugment(cfg, height, width, device)


def train_augment(images, indices, *, seed: int, epoch: int, cfg: AugmentConfig, out_dtype=torch.float32):
    """The training augmentation of a batch, keyed by (seed, epoch, sample index): `TrainAugment`
    made (and cached) for this setting, called with the epoch's key and noise.

    images: (N, 3, H, W) uint8 (float in [0, 1] is quantised first), any device and strides;
    indices: (N,) int64 sample ids on the same device. Returns (N, 3, S, S) normalised
    `out_dtype` in channels_last memory, S = cfg.image_size.
    """
    plan = _plan(cfg, images.shape[-2], images.shape[-1], images.device)
    noise = _noise_table(seed, epoch, plan.noise_length, images.device) if plan.uses_noise else None
    return plan(images, indices, train_key(seed, epoch), noise, out_dtype)


def eval_transform(images: Tensor, *, cfg: AugmentConfig, out_dtype=torch.float32,
                   constants: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Normalise (and resize to cfg.image_size) a uint8 (N, 3, H, W) batch -> channels_last.
    constants: `eval_constants(...)` made beforehand, for a traced caller."""
    return normalize(images, cfg.mean, cfg.std, size=cfg.image_size, out_dtype=out_dtype, constants=constants)


def eval_constants(cfg: AugmentConfig, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The normalisation constants `eval_transform` uses on uint8 images `width` pixels wide."""
    return _affine_constants(tuple(cfg.mean), tuple(cfg.std), width, True, device)


# ---- test-time augmentation ----


def tta_views(images: Tensor) -> tuple[Tensor, ...]:
    """The test-time views of a normalised batch (N, C, H, W): itself and its left-right mirror."""
    return images, images.flip(-1)


def tta_probs(model_fn: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Mean softmax, float32 (N, classes), of `model_fn`'s logits over `tta_views(images)`."""
    views = tta_views(images)
    probs = sum(torch.softmax(model_fn(v).float(), dim=-1) for v in views)
    return probs / len(views)
