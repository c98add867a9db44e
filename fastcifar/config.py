"""The run configuration: frozen sections, YAML presets, dotted key=value overrides, validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)  # per channel, on [0, 1] pixels
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class ConfigError(ValueError):
    """A bad preset, key or value; the message says what is valid."""


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/cifar100n"  # folder holding train.beton and test.beton
    backend: str = "auto"  # auto (ffcv if it imports, else memory) | ffcv | memory (whole split on the device)
    num_workers: int = 4  # ffcv decoding threads


@dataclass(frozen=True)
class ModelConfig:
    name: str = "convnext_base"  # any timm model name
    pretrained: bool = True  # ImageNet weights through timm (needs internet once)
    weights: str = ""  # local checkpoint path; overrides `pretrained`
    num_classes: int = 100  # must match the data's labels
    dropout: float = 0.5  # in the paper's head, before the linear layer
    channels_last: bool = True  # NHWC memory layout (faster convolutions on tensor cores)
    compile: str = "auto"  # auto (on for CUDA) | on | off
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune (these two: inductor's CUDA graphs) | max-autotune-no-cudagraphs (autotuned GEMMs inside our graphs)
    cuda_graphs: str = "auto"  # auto (on for one CUDA process, bf16/fp32) | on | off: each step as one CUDA graph
    amp: str = "auto"  # auto (bf16 if supported, else fp16 on CUDA; off on CPU) | bf16 | fp16 | off
    small_map_dw: str = "off"  # on | off: 7x7 depthwise convolutions on maps <= 4x4 as exact small linear maps (issue 19; off until a GPU measurement shows it pays)


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 4  # pixels of zero padding before the random crop; 0 disables
    flip: bool = True  # horizontal flip with p = 0.5
    randaugment_ops: int = 2  # RandAugment ops per image; 0 disables
    randaugment_magnitude: int = 9  # of 31 bins, as torchvision
    erasing_p: float = 0.5  # random-erasing probability per image
    erasing_value: str = "zero"  # zero | random
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) for MixUp; 0 disables
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) for CutMix; 0 disables
    image_size: int = 32  # pixels; larger than the data resizes on the device (bilinear)
    mean: tuple = CIFAR100_MEAN  # per channel, on [0, 1] pixels
    std: tuple = CIFAR100_STD  # per channel, on [0, 1] pixels


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak, per batch of train.batch_size images
    momentum: float = 0.9  # SGD momentum, no unit
    nesterov: bool = False  # Nesterov momentum (the authors' code)
    weight_decay: float = 5e-4  # L2, on every parameter
    warmup_epochs: int = 5  # linear warm-up, then cosine to 0 at the last epoch
    label_smoothing: float = 0.0  # share of the target spread over all classes (0.1 in the authors' code)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100  # passes over the training split
    batch_size: int = 100  # images per optimiser step (global, across processes)
    test_batch_size: int = 500  # images per evaluation batch
    freeze_epochs: int = 15  # epochs in which only the head trains
    frozen_chunk: int = 1000  # images per no-grad backbone forward while frozen
    tta: bool = True  # flip test-time augmentation for the final and best models
    select_on: str = "test"  # best epoch by accuracy on: test (as the paper) | noisy_val (held-out noisy labels)
    val_fraction: float = 0.1  # share of the training split held out (stratified) when select_on=noisy_val


@dataclass(frozen=True)
class FilterConfig:
    enabled: bool = True  # drop samples the selector rejects (false: train on every sample)
    mode: str = "batch"  # batch (drop within each batch) | epoch (score all, train on kept)
    start_epoch: int = 25  # first epoch that filters
    threshold: float = 2.0  # nats, at start_epoch
    decay: float = 0.995  # threshold multiplier per epoch after start_epoch
    min_kept_fraction: float = 0.1  # guard: never keep fewer than this share of a batch/epoch
    selector: str = "threshold"  # threshold (absolute, the paper's) | class_quantile | gmm (per class)
    keep_fraction: float = 0.0  # class_quantile's kept share per class, in (0, 1]; 0 = 1 - estimated noise


@dataclass(frozen=True)
class RunConfig:
    device: str = "auto"  # auto (cuda if visible, else cpu) | cpu | cuda
    seed: int = 0  # integer seed of the weights, data order, augmentation and hold-out split
    deterministic: bool = False  # bitwise-repeatable kernels (slower)
    out: str = "runs"  # parent folder of run directories
    name: str = ""  # run directory name; default: preset and a timestamp
    max_steps_per_epoch: int = 0  # steps; 0 = the whole epoch, >0 truncates (smoke tests, benchmarks)
    checkpoint_every: int = 1  # epochs between last.pt writes (also after the last epoch); a kill loses fewer


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    run: RunConfig = field(default_factory=RunConfig)


PRESETS = ("paper", "plus", "authors", "hires", "smoke", "demo")

_CHOICES = {
    ("data", "backend"): ("auto", "ffcv", "memory"),
    ("model", "compile"): ("auto", "on", "off"),
    ("model", "compile_mode"): ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    ("model", "cuda_graphs"): ("auto", "on", "off"),
    ("model", "amp"): ("auto", "bf16", "fp16", "off"),
    ("model", "small_map_dw"): ("on", "off"),
    ("train", "select_on"): ("test", "noisy_val"),
    ("augment", "erasing_value"): ("zero", "random"),
    ("filter", "mode"): ("batch", "epoch"),
    ("filter", "selector"): ("threshold", "class_quantile", "gmm"),
    ("run", "device"): ("auto", "cpu", "cuda"),
}


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in dataclasses.fields(cls)]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    kind = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}[annotation]
    if isinstance(value, str) and kind is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {value!r}: {e}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _apply(cfg: Config, updates: dict[str, Any]) -> Config:
    sections = _sections()
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in updates.items():
        section, _, name = key.partition(".")
        if section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(valid_keys())}")
        annotation = {f.name: f.type for f in dataclasses.fields(sections[section])}[name]
        grouped.setdefault(section, {})[name] = _coerce(key, value, annotation)
    return dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in grouped.items()}
    )


def _flatten(tree: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(tree).__name__}")
    flat = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        flat.update({f"{section}.{k}": v for k, v in values.items()})
    return flat


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Flat {dotted key: value} of a shipped preset name or a YAML file path."""
    if name_or_path in PRESETS:
        text = resources.files("fastcifar.presets").joinpath(f"{name_or_path}.yaml").read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file"
            )
        text = path.read_text()
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {name_or_path!r} is not valid YAML: {e}") from None
    return _flatten(tree, name_or_path)


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        out[key.strip()] = value
    return out


def build_config(preset: str = "paper", overrides: dict[str, Any] | None = None) -> Config:
    """Defaults (the paper's text), then the preset, then overrides; validated."""
    cfg = _apply(Config(), load_preset(preset))
    cfg = _apply(cfg, overrides or {})
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """`cfg` with dotted overrides applied, validated."""
    cfg = _apply(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    problems = []
    for (section, name), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            problems.append(f"{section}.{name}={value!r}; valid: {', '.join(choices)}")
    t, f, o, a = cfg.train, cfg.filter, cfg.optim, cfg.augment
    checks = [
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 1 and t.test_batch_size >= 1, "batch sizes must be >= 1"),
        (t.freeze_epochs >= 0, "train.freeze_epochs must be >= 0"),
        (t.frozen_chunk >= t.batch_size, "train.frozen_chunk must be >= train.batch_size"),
        (0 < t.val_fraction < 1, "train.val_fraction must be in (0, 1)"),
        (f.threshold > 0, "filter.threshold must be > 0"),
        (0 < f.decay <= 1, "filter.decay must be in (0, 1]"),
        (0 <= f.min_kept_fraction <= 1, "filter.min_kept_fraction must be in [0, 1]"),
        (f.start_epoch >= 0, "filter.start_epoch must be >= 0"),
        (0 <= f.keep_fraction <= 1, "filter.keep_fraction must be in (0, 1], or 0 = estimated from the data"),
        (f.keep_fraction == 0 or f.selector == "class_quantile",
         "filter.keep_fraction is used by filter.selector=class_quantile only; leave it 0"),
        (o.lr > 0 and o.weight_decay >= 0, "optim.lr must be > 0 and optim.weight_decay >= 0"),
        (0 <= o.momentum < 1, "optim.momentum must be in [0, 1)"),
        (o.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (0 <= o.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)"),
        (not o.nesterov or o.momentum > 0, "optim.nesterov needs optim.momentum > 0"),
        (cfg.model.num_classes >= 2, "model.num_classes must be >= 2"),
        (0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (a.crop_padding >= 0 and a.randaugment_ops >= 0, "augment counts must be >= 0"),
        (0 <= a.randaugment_magnitude <= 30, "augment.randaugment_magnitude must be in [0, 30]"),
        (0 <= a.erasing_p <= 1, "augment.erasing_p must be in [0, 1]"),
        (a.mixup_alpha >= 0 and a.cutmix_alpha >= 0, "augment alphas must be >= 0"),
        (a.image_size >= 8, "augment.image_size must be >= 8"),
        (len(a.mean) == 3 and len(a.std) == 3 and min(a.std) > 0, "augment.mean/std: 3 values, std > 0"),
        (cfg.run.max_steps_per_epoch >= 0, "run.max_steps_per_epoch must be >= 0"),
        (cfg.run.checkpoint_every >= 1, "run.checkpoint_every must be >= 1"),
    ]
    problems += [msg for ok, msg in checks if not ok]
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    tree = dataclasses.asdict(cfg)
    for section in tree.values():
        for k, v in section.items():
            if isinstance(v, tuple):
                section[k] = list(v)
    return tree


def from_dict(tree: dict[str, Any]) -> Config:
    cfg = _apply(Config(), _flatten(tree, "saved config"))
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# The dataclass field annotations are strings under `from __future__ import annotations`;
# `_coerce` maps them by name, so keep field types to int/float/bool/str/tuple.
_ALLOWED_TYPES = {"int", "float", "bool", "str", "tuple"}
assert all(
    f.type in _ALLOWED_TYPES for cls in _sections().values() for f in dataclasses.fields(cls)
), "config fields must be int, float, bool, str or tuple"
