"""Run directories: create a fresh one (never over earlier results) or reopen one to resume."""

from __future__ import annotations

import time
from pathlib import Path

from .config import Config, apply_overrides, dump_yaml, from_dict
from .io import atomic_write_text

import yaml

# Keys a resumed run may change: they affect where and how it runs, not what it computes.
RESUMABLE_OVERRIDES = ("run.device", "run.checkpoint_every", "data.dir", "data.backend",
                       "data.num_workers", "model.compile")


class RunError(RuntimeError):
    """The run directory cannot be used as asked."""


def prepare_run_dir(cfg: Config, out: str | None, preset: str) -> Path:
    """Create the run directory and save the resolved config; refuse a directory that holds a run."""
    if out:
        run_dir = Path(out)
    else:
        stem = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
        run_dir = Path(cfg.run.out) / (cfg.run.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run_dir / "config.yaml").exists() or (run_dir / "metrics.jsonl").exists():
        raise RunError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                       f"or choose another --out (earlier results are never overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    return run_dir


def resume_config(run_dir: Path, overrides: dict[str, str]) -> Config:
    """The saved config of `run_dir`, with only the overrides that cannot change its results."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunError(f"--resume {run_dir}: no config.yaml there, so it is not a fastcifar run directory")
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise RunError(f"--resume {run_dir}: no checkpoints/last.pt yet (the run stopped before its "
                       f"first checkpoint); start it again with --out")
    saved = from_dict(yaml.safe_load(path.read_text()))
    bad = [k for k in overrides if k not in RESUMABLE_OVERRIDES]
    if bad:
        raise RunError(f"--resume cannot change {', '.join(bad)}: that would make the run incompatible "
                       f"with its checkpoint. Changeable on resume: {', '.join(RESUMABLE_OVERRIDES)}")
    return apply_overrides(saved, overrides)


def same_run(saved: Config, current: Config) -> bool:
    """Whether `current` is `saved` up to the overrides a resume may change."""
    allowed = {k: getattr(getattr(current, k.split(".")[0]), k.split(".")[1]) for k in RESUMABLE_OVERRIDES}
    return apply_overrides(saved, allowed) == current
