"""fastcifar.kernels: the masked cross-entropy, dispatched to Triton or to plain PyTorch."""
from __future__ import annotations

from torch import Tensor

from .reference import MaskedCE, check_inputs, reference_masked_cross_entropy

try:  # triton is a Linux-only dependency: without it the reference still works
    from .masked_ce import INTERPRETED, triton_masked_cross_entropy
except ImportError:
    INTERPRETED = False
    triton_masked_cross_entropy = None

__all__ = [
    "MaskedCE",
    "check_inputs",
    "masked_cross_entropy",
    "reference_masked_cross_entropy",
    "triton_masked_cross_entropy",
]


def masked_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    threshold: float | Tensor,
    *,
    label_smoothing: float = 0.0,
    labels_b: Tensor | None = None,
    lam: float | Tensor = 1.0,
    reduction: str = "mean",
) -> MaskedCE:
    """Masked cross-entropy (DESIGN contract 2): Triton on CUDA or under TRITON_INTERPRET=1,
    the PyTorch reference otherwise. Arguments and result as reference_masked_cross_entropy;
    threshold is a float, a 0-d tensor, or a (C,) tensor of per-class thresholds."""
    use_triton = triton_masked_cross_entropy is not None and (logits.is_cuda or INTERPRETED)
    impl = triton_masked_cross_entropy if use_triton else reference_masked_cross_entropy
    return impl(logits, labels, threshold, label_smoothing=label_smoothing, labels_b=labels_b,
                lam=lam, reduction=reduction)
