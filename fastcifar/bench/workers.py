"""The GPU report's child processes: what the check, peer, schedule and baseline parts do.

scripts/gpu_report.py starts each as `gpu_report.py ... --part NAME --work DIR` in its own process
group under its own cap; each worker writes what it measured into DIR as soon as it has it (a
part killed at its cap keeps that), and the backend flags it ran under (`backend-NAME.json`).
The parent reads these files with fastcifar.bench.benchreport.fold_part.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..io import atomic_write_text
from .benchreport import baseline_epoch

ROOT = Path(__file__).resolve().parents[2]


def save_json(work: Path, name: str, value) -> None:
    atomic_write_text(work / name, json.dumps(value, default=str))


def save_backend(work: Path, part: str) -> None:
    """The backend flags in force in this worker (fastcifar.backend.setup_backend set them)."""
    from fastcifar.backend import backend_flags

    save_json(work, f"backend-{part}.json", backend_flags())


def report_config(args, truncated: bool):
    """The paper preset, randomly initialised, on args.device; truncated: --phase-epochs epochs of
    each phase (head, full, full+filter) instead of 15 / 10 / 75."""
    from fastcifar.config import build_config, parse_overrides

    k = args.phase_epochs
    overrides = {"model.name": args.model, "model.pretrained": "false", "run.device": args.device,
                 "data.backend": "memory", "data.dir": "(synthetic, in memory)"}
    if truncated:  # checkpoints once, at the end: the epochs time training, not the disk
        overrides.update({"train.epochs": 3 * k, "train.freeze_epochs": k, "filter.start_epoch": 2 * k,
                          "optim.warmup_epochs": min(5, k), "run.checkpoint_every": 3 * k})
    overrides.update(parse_overrides(args.set))
    return build_config("paper", {key: str(v) for key, v in overrides.items()})


def schedule_loaders(args, cfg, work: Path):
    """(cfg, make_loaders, loader note): ffcv over .beton files of the synthetic data, or memory."""
    from fastcifar.bench.synthetic import make_dataset, save_npz, split_loaders
    from fastcifar.data import resolve_backend

    train, test = make_dataset(args.train_size, args.test_size, num_classes=cfg.model.num_classes, noise=args.noise)
    backend = resolve_backend(args.loader)
    if backend == "ffcv":
        cmd = [sys.executable, str(ROOT / "scripts" / "write_beton.py"), "--source",
               f"npz:{save_npz(work / 'synthetic.npz', train, test)}", "--out-dir", str(work / "beton"),
               "--num-classes", str(cfg.model.num_classes), "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            data = dataclasses.replace(cfg.data, dir=str(work / "beton"), backend="ffcv")
            return dataclasses.replace(cfg, data=data), None, "ffcv over .beton files of the synthetic data"
        if args.loader == "ffcv":
            raise SystemExit(f"--loader ffcv: writing the .beton files failed: {done.stderr.strip()[-300:]}")
    note = "memory (asked for)" if args.loader == "memory" else "memory: ffcv does not import here"
    return cfg, (lambda device, dist: split_loaders(train, test, cfg, device, dist)), note


def inductor_cache_entries() -> int:
    """Compiled graphs in inductor's FX-graph cache now (TORCHINDUCTOR_CACHE_DIR): > 0 means a
    compilation of the same graph loads instead of compiling."""
    from fastcifar.graphs import inductor_cache_dir

    fx = Path(inductor_cache_dir()) / "fxgraph"
    return sum(1 for p in fx.rglob("*") if p.is_file()) if fx.is_dir() else 0


def schedule_worker(args, work: Path) -> None:
    import torch

    from fastcifar.rundir import prepare_run_dir
    from fastcifar.schedule import build_schedule
    from fastcifar.train import run_training

    target = report_config(args, truncated=False)
    cfg = target if args.full else report_config(args, truncated=True)
    cfg, make_loaders, note = schedule_loaders(args, cfg, work)
    planned = build_schedule(target)
    entries = inductor_cache_entries()
    save_json(work, "schedule_meta.json", {"target": [planned.phase(e).name for e in range(planned.epochs)],
                                           "loader_note": note, "inductor_cache_entries": entries,
                                           "inductor_cache_warm": entries > 0})
    t0 = time.perf_counter()
    summary = run_training(cfg, prepare_run_dir(cfg, str(work / "run"), "paper"), make_loaders=make_loaders)
    save_json(work, "schedule_end.json", {
        "wall_s": time.perf_counter() - t0, "summary": summary,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None})
    save_backend(work, "schedule")


def baseline_worker(args, work: Path) -> None:
    """The paper's pipeline: the evaluation pass whole (first: the cheapest, and the first H200 run
    lost it to the cap), then each training pass timed at N/4 and N steps (the difference is the
    per-step cost, the rest per-epoch start-up); saved after each."""
    import torch

    from fastcifar.bench.baseline import PaperPipeline
    from fastcifar.bench.synthetic import make_dataset

    cfg = report_config(args, truncated=False)
    train, test = make_dataset(args.train_size, args.test_size, num_classes=cfg.model.num_classes, noise=args.noise)
    pipe = PaperPipeline(train.images, train.labels, test.images, test.labels, cfg, torch.device(args.device))
    save_backend(work, "baseline")
    steps = len(train.labels) // cfg.train.batch_size
    n2 = min(args.baseline_steps, steps)
    n1 = max(1, n2 // 4)
    out = {"note": f"DataLoader with {pipe.num_workers} workers; evaluation timed whole; training passes timed "
                   f"at {n1} and {n2} steps, projected to {steps} steps per epoch", "passes": {}}
    seconds, images = pipe.eval_epoch()
    out["passes"]["eval"] = {"epoch_s": seconds, "images": images, "fixed_s": None,
                             "per_step_s": seconds / -(-images // cfg.train.test_batch_size)}
    save_json(work, "baseline.json", out)
    for name, backbone in (("head", False), ("full", True)):
        first, second = pipe.train_epoch(backbone, n1)[0], pipe.train_epoch(backbone, n2)[0]
        out["passes"][name] = baseline_epoch(first, n1, second, n2, steps)
        save_json(work, "baseline.json", out)


def check_worker(args, work: Path) -> None:
    import torch

    from fastcifar.bench.cudacheck import run_checks

    def save(results: dict) -> None:
        save_json(work, "check.json", results)
        save_backend(work, "check")

    run_checks(torch.device(args.device), args.model, save=save)


def peer_worker(args, work: Path) -> None:
    """The plain timm model (fastcifar.bench.peer) at the paper's batch, reduce-overhead compiled."""
    import torch

    from fastcifar.bench.peer import time_peer

    save_json(work, "peer.json", {"started": True})
    out = time_peer(args.model, torch.device(args.device), batch=100)
    out["inductor_cache"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    save_json(work, "peer.json", out)
    save_backend(work, "peer")


WORKERS = {"check": check_worker, "peer": peer_worker, "schedule": schedule_worker, "baseline": baseline_worker}
