"""Depthwise convolutions on maps no wider than the kernel's reach, computed exactly as small linear maps.

At 32x32 input ConvNeXt-B's last three stages run on 4x4, 2x2 and 1x1 maps, where a 7x7 depthwise
convolution with padding 3 reads mostly padding: on an HxW map with H, W <= k//2 + 1 every output
sees every input, so the convolution is, per channel c, the dense (HW x HW) map

    out[n, c, p] = bias[c] + sum_q W_eff[c, p, q] x[n, c, q],   W_eff[c, (i,j), (a,b)] = w[c, k//2+a-i, k//2+b-j].

Written as a broadcast multiply and a sum in plain torch ops, inductor can fuse it with the LayerNorm
beside it, where cuDNN runs a general depthwise kernel (one forward, two backward) per block.
Gradients come from autograd, so they are the convolution's own. Larger maps take the stock conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallMapDepthwiseConv2d(nn.Conv2d):
    """A depthwise nn.Conv2d (odd square kernel k, stride 1, padding k//2, no dilation, zero padding).

    Same parameters (`weight` (C, 1, k, k), `bias` (C,) or None) and results as the stock module;
    maps with H and W both <= k//2 + 1 go through `small_map_depthwise`, all others through
    F.conv2d. The choice is made on the static shape, so a compiled graph holds one branch per shape.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, device=None, dtype=None):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias,
                         device=device, dtype=dtype)
        self.reach = kernel_size // 2 + 1  # pixels: the largest map side on which every output sees every input

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> SmallMapDepthwiseConv2d:
        """The replacement for `conv` (see `is_small_map_candidate`), holding the same Parameter objects."""
        # Built on the meta device so that no second copy of the weights is allocated, then given conv's own.
        new = cls(conv.in_channels, conv.kernel_size[0], bias=conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float -> (N, C, H, W), laid out as the stock conv lays it out."""
        if x.dim() != 4 or x.shape[-2] > self.reach or x.shape[-1] > self.reach:
            return self._conv_forward(x, self.weight, self.bias)
        return small_map_depthwise(x, self.weight, self.bias)


def small_map_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise convolution (stride 1, padding k//2) of a map no wider than the kernel's reach.

    x: (N, C, H, W) float, H and W <= k//2 + 1; weight: (C, 1, k, k), k odd; bias: (C,) or None.
    Returns (N, C, H, W) in the dtype F.conv2d returns (the autocast dtype under autocast), channels_last
    when x is channels_last, else contiguous. Products are summed in at least fp32, as cuDNN and oneDNN
    accumulate, and rounded once at the end.
    """
    n, c, h, w = x.shape
    dtype = _compute_dtype(x)
    acc = torch.promote_types(dtype, torch.float32)
    # Channels-last order (N, P, C): channels are the fast axis, as in the NHWC tensors around it.
    xq = x.to(dtype).permute(0, 2, 3, 1).reshape(n, 1, h * w, c)
    # Gather the taps from the parameter itself and cast after, as autocast casts the whole weight:
    # the values are the same, and the weight gradient is summed over the taps in the parameter's dtype.
    taps = effective_taps(weight, h, w).to(dtype)
    out = (xq.to(acc) * taps.to(acc)).sum(2)
    if bias is not None:
        out = out + bias.to(dtype).to(acc)
    out = out.to(dtype).view(n, h, w, c).permute(0, 3, 1, 2)
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def effective_taps(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """W_eff of an h x w map: weight (C, 1, k, k) -> (P, Q, C) in weight's dtype, P = Q = h*w,
    W_eff[(i,j), (a,b), c] = weight[c, 0, k//2+a-i, k//2+b-j].

    Built from static slices of the kernel's central (2h-1) x (2w-1) window rather than an index gather:
    the backward is then a sum of padded slices, a pointwise kernel, instead of a scatter-add with atomics
    (not deterministic on CUDA).
    """
    c0 = weight.shape[-1] // 2
    window = weight[:, 0, c0 - (h - 1):c0 + h, c0 - (w - 1):c0 + w]  # (C, 2h-1, 2w-1), offsets -(h-1)..h-1
    # Output (i, j) reads window[a - i + h - 1, b - j + w - 1] for input (a, b): one h x w slice per output.
    per_output = [window[:, h - 1 - i:2 * h - 1 - i, w - 1 - j:2 * w - 1 - j] for i in range(h) for j in range(w)]
    return torch.stack(per_output).permute(0, 2, 3, 1).reshape(h * w, h * w, -1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.conv2d computes in for input x: autocast's where it would cast x, else x's own.

    Autocast casts floating tensors of its device type except float64, which it leaves alone.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return x.dtype


def is_small_map_candidate(module: nn.Module) -> bool:
    """Whether `module` is a plain depthwise nn.Conv2d that SmallMapDepthwiseConv2d reproduces exactly."""
    if type(module) is not nn.Conv2d:  # subclasses (timm's Conv2dSame, one already swapped) pad their own way
        return False
    k = module.kernel_size
    return (module.groups == module.in_channels == module.out_channels and k[0] == k[1] and k[0] % 2 == 1
            and module.stride == (1, 1) and module.padding == (k[0] // 2, k[0] // 2)
            and module.dilation == (1, 1) and module.padding_mode == "zeros")


def apply_small_map_depthwise(model: nn.Module) -> int:
    """Swap every qualifying depthwise conv in `model` (ConvNeXt's `stages[*].blocks[*].conv_dw`) in place.

    The replacements share the originals' Parameter objects and names, so state_dict keys, checkpoints
    and an optimiser's per-parameter state are unchanged. Returns how many were swapped.
    """
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if is_small_map_candidate(child)]
    for parent, name, child in targets:
        setattr(parent, name, SmallMapDepthwiseConv2d.from_conv(child))
    return len(targets)
