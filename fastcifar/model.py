"""The network: a timm backbone with the paper's head, freezing, channels_last, AMP and compile."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig


class ModelError(RuntimeError):
    """The model cannot be built as configured; the message says what to do."""


class NoisyLabelNet(nn.Module):
    """timm backbone features -> adaptive avg pool -> flatten -> dropout -> linear (the paper's head).

    `state_dict()` keys are `backbone.*` (timm's own names) and `head.*`.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(num_features, num_classes)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float -> (N, F, h, w) backbone feature map."""
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float -> (N, num_classes) logits."""
        return self.head(self.features(x))


def build_model(cfg: ModelConfig) -> NoisyLabelNet:
    """Create the backbone by timm name, with ImageNet weights or a local file, and the paper's head."""
    import timm

    if not timm.is_model(cfg.name):
        raise ModelError(f"unknown timm model {cfg.name!r} (see timm.list_models())")
    want_hub = cfg.pretrained and not cfg.weights
    try:
        backbone = timm.create_model(cfg.name, pretrained=want_hub, num_classes=0, global_pool="")
    except Exception as e:  # timm raises assorted network/hub errors when offline
        raise ModelError(
            f"could not download ImageNet weights for {cfg.name!r} ({type(e).__name__}: {e}).\n"
            f"Either connect to the internet once (timm caches them under ~/.cache/huggingface), or\n"
            f"download the timm checkpoint for {cfg.name} (e.g. from huggingface.co/timm) and pass\n"
            f"model.weights=/path/to/{cfg.name}.safetensors|.pth, or train from scratch with model.pretrained=false."
        ) from None
    # Only forward_features is used: drop timm's classifier (and its head norm, for ConvNeXt) so that
    # no parameter goes without a gradient (DDP requires that) and none is saved for nothing.
    if hasattr(backbone, "head"):
        backbone.head = nn.Identity()
    if cfg.weights:
        _load_backbone_weights(backbone, Path(cfg.weights))
    model = NoisyLabelNet(backbone, backbone.num_features, cfg.num_classes, cfg.dropout)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"model.weights={path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    # Accept timm checkpoints (classifier included) and our own (prefixed with backbone./head.).
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable]
    if missing:
        raise ModelError(
            f"model.weights={path} does not fit {type(backbone).__name__}: "
            f"{len(missing)} backbone tensors missing or of another shape (first: {missing[0]})"
        )
    backbone.load_state_dict(usable, strict=False)


def set_backbone_trainable(model: NoisyLabelNet, trainable: bool) -> None:
    """Freeze or unfreeze the backbone. A frozen backbone also runs in eval mode (fixed norm stats)."""
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)
    model.backbone.train(trainable and model.training)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    use_scaler: bool  # fp16 needs loss scaling (GradScaler, on CUDA and CPU alike); bf16 does not

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(amp: str, device: torch.device) -> Precision:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision(None, False)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16":
        return Precision(torch.float16, True)
    return Precision(torch.bfloat16, False)


def maybe_compile(fn, cfg: ModelConfig, device: torch.device):
    """torch.compile `fn` when asked ("on") or by default on CUDA ("auto"), in cfg.compile_mode."""
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        return torch.compile(fn, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    return fn
