"""Checkpoints: the plain model, optimiser, scaler, RNG states, schedule position, config, commit."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_path
from .weights import WeightsError, safe_load


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not belong to this run."""


def git_commit() -> str:
    """The source tree's commit (with a -dirty mark), or "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` atomically: on any failure (a full disk included) the old file stays intact."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; "
                              f"the previous checkpoint (if any) is intact") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (tensors and plain types only; no code is run)."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = safe_load(path, what="checkpoint")
    except WeightsError as e:  # a truncated, foreign or code-carrying file
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: not a checkpoint that can be loaded safely: "
                              f"it holds a {type(state).__name__}, not a dict")
    return state
