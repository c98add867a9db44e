"""Run directories: name a fresh one, create it only once a run can start, or reopen one to resume.

A run directory is marked by its config.yaml (written last when it is created) and is finished
once summary.json exists (written last when the run ends). data.json records the data the run
was started with (meta.json's fingerprint), so that a resume cannot silently switch datasets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from .config import Config, apply_overrides, dump_yaml, from_dict
from .data import read_meta
from .io import atomic_write_text

# Keys a resumed run may change: they affect where and how it runs, not what it computes.
RESUMABLE_OVERRIDES = ("run.device", "run.checkpoint_every", "data.dir", "data.backend",
                       "data.num_workers", "model.compile")


class RunError(RuntimeError):
    """The run directory cannot be used as asked."""


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds (part of) a run: results that a fresh start must not overwrite."""
    return any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt"))


def choose_run_dir(cfg: Config, out: str | None, preset: str) -> Path:
    """The run directory a fresh run would use (`out`, or run.out/<preset>-<time>); nothing is created."""
    if out:
        run_dir = Path(out)
    else:
        stem = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
        run_dir = Path(cfg.run.out) / (cfg.run.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if holds_run(run_dir):
        raise RunError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                       f"or choose another --out (earlier results are never overwritten)")
    return run_dir


def data_identity(data_dir: str | Path) -> dict:
    """What identifies a .beton folder's content: its meta.json fingerprint and source description."""
    meta = read_meta(Path(data_dir))
    return {"dir": str(data_dir), "fingerprint": meta.get("fingerprint"), "source": meta.get("source")}


def create_run_dir(run_dir: Path, cfg: Config, data: dict | None) -> None:
    """Create `run_dir` with data.json and config.yaml (the mark of a run, written last).

    A directory already prepared for this very config (by `prepare_run_dir`) is adopted as long as
    it holds no results yet.
    """
    config = run_dir / "config.yaml"
    if config.is_file() and not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists():
        if from_dict(yaml.safe_load(config.read_text()) or {}) != cfg:
            raise RunError(f"{config} was written for another configuration; choose another --out")
    elif holds_run(run_dir):
        raise RunError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                       f"or choose another --out (earlier results are never overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if data is not None:
        atomic_write_text(run_dir / "data.json", json.dumps(data, indent=1) + "\n")
    atomic_write_text(config, dump_yaml(cfg))


def prepare_run_dir(cfg: Config, out: str | None, preset: str) -> Path:
    """Name and create a run directory at once (scripts and tests); the CLI creates it only after
    data and model have opened, so that a failed start leaves nothing behind."""
    run_dir = choose_run_dir(cfg, out, preset)
    create_run_dir(run_dir, cfg, None)
    return run_dir


def resume_config(run_dir: Path, overrides: dict[str, str]) -> Config:
    """The saved config of `run_dir`, with only the overrides that cannot change its results."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunError(f"--resume {run_dir}: no config.yaml there, so it is not a fastcifar run directory")
    saved = from_dict(yaml.safe_load(path.read_text()))
    bad = [k for k in overrides if k not in RESUMABLE_OVERRIDES]
    if bad:
        raise RunError(f"--resume cannot change {', '.join(bad)}: that would make the run incompatible "
                       f"with its checkpoint. Changeable on resume: {', '.join(RESUMABLE_OVERRIDES)}")
    return apply_overrides(saved, overrides)


def finished_summary(run_dir: Path) -> dict | None:
    """summary.json of a run that has ended, else None."""
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable ({e}); the run's other results are untouched") from None


def check_same_data(run_dir: Path, data_dir: str) -> None:
    """Refuse to resume on other data than the run was started with (a copy elsewhere is fine)."""
    record = run_dir / "data.json"
    now = data_identity(data_dir)
    if record.is_file():
        try:
            before = json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"--resume {run_dir}: cannot read {record.name} ({e}); it records the run's data") from e
    else:  # a run from before data.json existed: only its own folder will do
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        before = {"dir": saved["data"]["dir"], "fingerprint": None}
    if before.get("fingerprint") and now["fingerprint"]:
        if before["fingerprint"] == now["fingerprint"]:
            return
        raise RunError(
            f"--resume {run_dir}: data.dir={data_dir} holds other data ({now['source']}, fingerprint "
            f"{now['fingerprint'][:12]}) than the run was started on ({before.get('source')} in {before['dir']}, "
            f"fingerprint {before['fingerprint'][:12]}); resume with that data or a copy of it")
    if Path(before["dir"]).resolve() != Path(data_dir).resolve():
        raise RunError(f"--resume {run_dir}: the run recorded no data fingerprint, so data.dir cannot change "
                       f"from {before['dir']} (asked: {data_dir})")


def same_run(saved: Config, current: Config) -> bool:
    """Whether `current` is `saved` up to the overrides a resume may change."""
    allowed = {k: getattr(getattr(current, k.split(".")[0]), k.split(".")[1]) for k in RESUMABLE_OVERRIDES}
    return apply_overrides(saved, allowed) == current
