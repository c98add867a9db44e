"""`python -m fastcifar.train`: the paper's schedule end to end, with checkpoints, resume and reports."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import plots, report
from .console import progress
from .checkpoint import CheckpointError, git_commit, load_checkpoint, rng_state, set_rng_state
from .backend import setup_backend
from .checkpoint_writer import CheckpointWriter, remove_stale_temporaries
from .config import Config, ConfigError, from_dict, to_dict
from .data import open_split, read_meta, resolve_backend
from .distributed import DistInfo, barrier, init_distributed, on_main, run_on_all, shutdown
from .engine import Engine
from .eta import RunClock, seconds_before
from .filtering import judge, median_threshold
from .holdout import split_noisy_val
from .model import build_model, count_parameters, resolve_precision
from .optim import PhaseSGD
from .rundir import check_same_data, create_run_dir, data_identity, same_run
from .schedule import build_schedule
from .select import describe as describe_filter


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says what happened."""


@dataclass
class Loaders:
    train: object  # fastcifar.data.SplitLoader, shuffled, drop_last
    test: object  # in order, every sample
    score: object  # the training split in order, every sample (filter scoring, reports)
    num_classes: int
    num_train: int
    class_names: tuple | None = None  # meta.json's, where the source has them
    paths: tuple | None = None  # the training samples' files (ImageFolder), by index
    val: object | None = None  # train.select_on=noisy_val: held-out training rows, noisy labels
    holdout: torch.Tensor | None = None  # (num_train,) bool CPU: rows held out for `val`


def open_loaders(cfg: Config, device: torch.device, dist: DistInfo) -> Loaders:
    data_dir = Path(cfg.data.dir)
    meta = read_meta(data_dir)
    if meta["num_classes"] != cfg.model.num_classes:
        raise ConfigError(f"the data in {data_dir} has {meta['num_classes']} classes but "
                          f"model.num_classes={cfg.model.num_classes}; set model.num_classes={meta['num_classes']}")
    common = dict(backend=cfg.data.backend, device=device, seed=cfg.run.seed, distributed=dist.enabled,
                  num_workers=cfg.data.num_workers)
    train = open_split(data_dir / "train.beton", batch_size=cfg.train.batch_size, shuffle=True,
                       drop_last=True, **common)
    test = open_split(data_dir / "test.beton", batch_size=cfg.train.test_batch_size, shuffle=False,
                      drop_last=False, **common)
    score = open_split(data_dir / "train.beton", batch_size=cfg.train.test_batch_size, shuffle=False,
                       drop_last=False, **common)
    return Loaders(train, test, score, meta["num_classes"], train.num_samples, meta.get("class_names"),
                   meta.get("train_names"))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA GPU is visible; use run.device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Run:
    """One training run: the state the loop needs, its checkpoints and its reports."""

    def __init__(self, cfg: Config, run_dir: Path, dist: DistInfo, device: torch.device,
                 loaders: Loaders | None = None):
        self.cfg, self.run_dir, self.dist, self.device = cfg, run_dir, dist, device
        torch.manual_seed(cfg.run.seed)
        setup_backend(device, deterministic=cfg.run.deterministic)
        self.loaders = loaders or open_loaders(cfg, device, dist)
        self.model = build_model(cfg.model).to(device)
        self.precision = resolve_precision(cfg.model.amp, device)
        self.optimizer = PhaseSGD(self.model, cfg.optim, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.use_scaler)
        self.schedule = build_schedule(cfg)
        arrays = {k: v.cpu() for k, v in self.loaders.score.arrays().items() if k != "images"}
        self.labels, self.clean_labels = arrays["labels"], arrays["clean_labels"]  # in index order
        # (num_train,) bool CPU: rows that may train; train.select_on=noisy_val holds some out
        self.trainable = torch.ones_like(self.labels, dtype=torch.bool) if self.loaders.holdout is None \
            else ~self.loaders.holdout
        self.known = (self.clean_labels >= 0) & self.trainable  # held-out rows never count as training samples
        self.noisy = self.known & (self.labels != self.clean_labels)
        train = self.loaders.train
        self.engine = Engine(cfg, self.model, self.optimizer, self.scaler, self.precision, device, dist,
                             self.schedule, self.noisy, self.known, num_samples=self.loaders.num_train,
                             image_shape=train.image_shape, max_steps=train.num_batches())
        self.metrics = report.MetricsLog(run_dir)
        self.writer = CheckpointWriter(device)
        remove_stale_temporaries(run_dir / "checkpoints")  # what a write killed mid-way left
        self.start_epoch, self.best_acc, self.best_epoch = 0, -1.0, -1
        self.best_state: dict | None = None
        self._compiled: dict = {}  # the graphs compiled by the last epoch line (to name the new ones)
        self.select_key = "val_acc" if cfg.train.select_on == "test" else "noisy_val_acc"
        self.clock = RunClock(self.schedule)  # replaced once a resume knows the time already spent

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, epoch: int) -> None:
        """Write best.pt (if it changed) then last.pt; only the main process writes."""
        if not self.dist.is_main:
            return
        ckpt_dir = self.run_dir / "checkpoints"
        common = {"config": to_dict(self.cfg), "commit": git_commit()}
        files = []
        if self.best_state is not None:
            files.append((ckpt_dir / "best.pt", {"model": self.best_state, "epoch": self.best_epoch,
                                                 "val_acc": self.best_acc, **common}))
            self.best_state = None  # copied to host memory by the writer; keep no second copy
        files.append((ckpt_dir / "last.pt", {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "selector": self.engine.selector.state_dict(),
            "epoch": epoch, "best_acc": self.best_acc,
            "best_epoch": self.best_epoch, "rng": rng_state(), **common}))
        self.writer.save(files)  # written and fsynced in the background, renamed into place atomically

    def restore(self) -> None:
        state = load_checkpoint(self.run_dir / "checkpoints" / "last.pt")
        if not same_run(from_dict(state["config"]), self.cfg):
            raise CheckpointError("last.pt was written with another configuration than config.yaml")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if "selector" in state:  # the class thresholds the next epoch starts from (older files lack it)
            self.engine.selector.load_state_dict(state["selector"])
        set_rng_state(state["rng"])
        self.start_epoch = state["epoch"] + 1
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]
        if self.dist.is_main:
            self.metrics.truncate_after(state["epoch"])

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        self.clock.start()
        for epoch in range(self.start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            phase = self.schedule.phase(epoch)
            subset, epoch_filter = self._epoch_filter(epoch) if phase.filtering and cfg.filter.mode == "epoch" else (None, {})
            steps = self.loaders.train.num_batches(None if subset is None else len(subset))
            if cfg.run.max_steps_per_epoch:
                steps = min(steps, cfg.run.max_steps_per_epoch)
            with progress(steps, f"epoch {epoch}", enabled=self.dist.is_main) as tick:
                rec = self.engine.train_epoch(epoch, self.loaders.train.epoch(epoch, subset), steps,
                                              batch_filtering=subset is None, progress=tick)
            rec.update(epoch_filter)
            rec.update(self.engine.evaluate(self.loaders.test.epoch(epoch)))
            if self.loaders.val is not None:
                val = self.engine.evaluate(self.loaders.val.epoch(epoch))
                rec.update(noisy_val_loss=val["val_loss"], noisy_val_acc=val["val_acc"])
            rec.update(epoch=epoch, phase=phase.name, seconds=time.perf_counter() - t0)
            if rec.get("non_finite") or not math.isfinite(rec["train_loss"]):
                raise TrainingError(f"the training loss is not finite in epoch {epoch} ({rec.get('non_finite')} "
                                    f"samples); stopping. The last good checkpoint is in "
                                    f"{self.run_dir / 'checkpoints'}")
            if rec[self.select_key] > self.best_acc:  # best_acc: the selection score (see train.select_on)
                self.best_acc, self.best_epoch = rec[self.select_key], epoch
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._log(rec, epoch)
            due = (epoch + 1) % cfg.run.checkpoint_every == 0 or epoch == cfg.train.epochs - 1
            # every process checks in: a failed write on rank 0 stops all of them, none waits forever
            run_on_all(self.dist, lambda: self.save(epoch) if due else None)

    def _epoch_filter(self, epoch: int):
        """Score every training sample in eval mode; train this epoch on those the selector keeps
        (held-out validation rows never train)."""
        v = self._verdict(epoch)
        pool = self.trainable.to(v.keep.device)
        out = {"kept_fraction": float(v.keep[pool].float().mean()), "guard_bound_steps": int(v.guard_bound),
               "threshold": median_threshold(v.thresholds), "noise_rate_est": v.noise_rate_est}
        if bool(self.known.any()):
            out.update(report.noise_detection((~v.keep).cpu()[self.known], self.noisy[self.known]))
        return v.keep.nonzero().flatten().cpu(), out

    def _verdict(self, epoch: int, probs=None, losses=None):
        if probs is None:
            probs, losses = self.engine.score(self.loaders.score.epoch(epoch), self.loaders.num_train,
                                              self.loaders.num_classes)
        labels = self.labels.to(losses.device)
        return judge(self.engine.selector, losses, labels, probs, self.schedule.threshold(epoch),
                     self.cfg.filter.min_kept_fraction, pool=self.trainable.to(losses.device))

    def _log(self, rec: dict, epoch: int) -> None:
        rec["elapsed_seconds"] = self.clock.elapsed()  # training time so far, earlier attempts included
        estimate = self.clock.epoch_done(epoch, rec["seconds"])
        compiled = self.engine.compile_note(self._compiled)
        self._compiled = dict(self.engine.ctx.compile_stats.graphs)
        if not self.dist.is_main:
            return
        self.metrics.append(rec)
        print(report.format_epoch(rec), flush=True)
        if compiled:
            print(compiled, flush=True)
        if rec.get("guard_bound_steps"):
            print(f"  note: the minimum kept fraction ({self.cfg.filter.min_kept_fraction:.0%}) raised the "
                  f"threshold in {rec['guard_bound_steps']} step(s)", flush=True)
        if estimate:
            print(estimate, flush=True)

    # -- the end --------------------------------------------------------------------------------
    def finish(self, seconds: float) -> dict:
        """TTA for the final and best models, then predictions, suspects, plots and, last, the summary.

        summary.json marks a finished run (a resume of it changes nothing), so it is written last.
        """
        tta = self.cfg.train.tta
        last = self.engine.evaluate(self.loaders.test.epoch(0))
        last_tta = self.engine.evaluate(self.loaders.test.epoch(0), tta=True) if tta else {}
        best_path = self.run_dir / "checkpoints" / "best.pt"
        self.writer.wait()
        barrier(self.dist)
        self.model.load_state_dict(load_checkpoint(best_path)["model"])
        best = self.engine.evaluate(self.loaders.test.epoch(0))
        best_tta = self.engine.evaluate(self.loaders.test.epoch(0), tta=True) if tta else {}
        summary = {
            "final_acc": last["val_acc"], "final_acc_tta": last_tta.get("val_acc"),
            "best_acc": best["val_acc"], "best_acc_tta": best_tta.get("val_acc"), "best_epoch": self.best_epoch,
            "best_selected_on": self.cfg.train.select_on,
            "epochs": self.cfg.train.epochs, "total_seconds": seconds, "world_size": self.dist.world_size,
            "device": device_name(self.device),
            "commit": git_commit(), **self.engine.report(),
            "checkpoint_blocking_seconds": round(self.writer.blocking_seconds, 3),
        }
        if self.loaders.val is not None:
            summary["best_noisy_val_acc"] = self.best_acc
        self._write_predictions()
        if self.dist.is_main:
            base = float(self.noisy.sum() / self.known.sum()) if bool(self.known.any()) else None
            plots.write_plots(self.run_dir, self.metrics.read(), noise_rate=base)
            report.write_summary(self.run_dir, summary)
        return summary

    def _write_predictions(self) -> None:
        """pred_probs.npy and suspects.csv from the best model on the (unaugmented) training split."""
        probs, losses = self.engine.score(self.loaders.score.epoch(0), self.loaders.num_train,
                                          self.loaders.num_classes)
        verdict = self._verdict(self.cfg.train.epochs - 1, probs, losses)  # the last epoch's rule
        if not self.dist.is_main:
            return
        probs, losses = probs.cpu(), losses.cpu()  # rows in index order, like self.labels
        report.write_pred_probs(self.run_dir, probs.numpy())
        conf, pred = probs.max(1)
        report.write_suspects(self.run_dir, indices=torch.arange(len(losses)), labels=self.labels, pred=pred,
                              pred_prob=conf, loss=losses, kept=verdict.keep.cpu(),
                              evidence=verdict.evidence.cpu(), clean_labels=self.clean_labels,
                              class_names=self.loaders.class_names, paths=self.loaders.paths)


def startup_lines(run: Run) -> list[str]:
    cfg, total_params = run.cfg, count_parameters(run.model)[0]
    phases = ", ".join(f"{p.name} {p.first_epoch}-{p.last_epoch}" for p in run.schedule.phases)
    amp = str(run.precision.dtype).replace("torch.", "") if run.precision.dtype else "off"
    held = 0 if run.loaders.holdout is None else int(run.loaders.holdout.sum())
    select = ("the test split (as in the paper)" if run.loaders.val is None else
              f"{held} held-out training images with their noisy labels (never trained on)")
    return [
        f"run dir : {run.run_dir}",
        f"device  : {device_name(run.device)} x{run.dist.world_size} | amp {amp} | commit {git_commit()}",
        f"step    : {run.engine.ctx.ladder.best.describe()}"
        + "".join(f"; {note}" for note in run.engine.mode_notes)
        + ("" if len(run.engine.ctx.ladder.planned) == 1 else
           f"; a function that fails to build steps down alone "
           f"(to {', '.join(m.name for m in run.engine.ctx.ladder.planned[1:])})"),
        f"model   : {cfg.model.name} ({total_params / 1e6:.1f}M parameters, "
        f"{'pretrained' if cfg.model.pretrained or cfg.model.weights else 'random init'})",
        f"data    : {run.loaders.num_train - held} train / {run.loaders.test.num_samples} test images, "
        f"{run.loaders.num_classes} classes, backend {resolve_backend(cfg.data.backend)}"
        f"{' (data.backend=auto)' if cfg.data.backend == 'auto' else ''}, from {cfg.data.dir}",
        f"schedule: {cfg.train.epochs} epochs [{phases}], batch {cfg.train.batch_size}, lr {cfg.optim.lr}, "
        + describe_filter(cfg.filter),
        f"best    : the epoch of highest accuracy on {select}",
    ]


def make_loaders_for(cfg: Config, device: torch.device, dist: DistInfo,
                     make_loaders: Callable[[torch.device, DistInfo], Loaders] | None) -> Loaders:
    """The run's loaders (.beton or `make_loaders`), with the noisy validation split held out if asked."""
    loaders = make_loaders(device, dist) if make_loaders else open_loaders(cfg, device, dist)
    if cfg.train.select_on == "noisy_val":
        loaders = split_noisy_val(loaders, cfg.train.val_fraction, cfg.run.seed)
    return loaders


def _restore(run: Run) -> None:
    """Continue from last.pt; a run killed before its first checkpoint starts again from epoch 0."""
    if (run.run_dir / "checkpoints" / "last.pt").is_file():
        run.restore()
    elif run.dist.is_main:
        print(f"note: {run.run_dir} has no checkpoint yet: starting it again from epoch 0", flush=True)
        run.metrics.truncate_after(-1)


def run_training(cfg: Config, run_dir: Path, resume: bool = False,
                 make_loaders: Callable[[torch.device, DistInfo], Loaders] | None = None) -> dict:
    """Train with `cfg` into `run_dir`; returns the summary (the same in every process).

    Data and model open before anything is written: a fresh run creates `run_dir` only then, so
    a failed start leaves nothing behind. Under torchrun every step that can fail is agreed on by
    all processes, so that all stop with the same error. `make_loaders` replaces the .beton
    loaders (synthetic data in benchmarks and the GPU report).
    """
    device = resolve_device(cfg.run.device)
    dist = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    try:
        return _train(cfg, Path(run_dir), resume, make_loaders, dist, device)
    finally:
        shutdown()  # after _train's frame (the Run, its DDP wrappers) is gone: see distributed.shutdown


def _train(cfg: Config, run_dir: Path, resume: bool, make_loaders, dist: DistInfo, device: torch.device) -> dict:
    if resume and not make_loaders:
        run_on_all(dist, lambda: check_same_data(run_dir, cfg.data.dir))
    data = None if make_loaders else run_on_all(dist, lambda: data_identity(cfg.data.dir))
    run = run_on_all(dist, lambda: Run(cfg, run_dir, dist, device, make_loaders_for(cfg, device, dist, make_loaders)))
    if not resume:
        on_main(dist, lambda: create_run_dir(run_dir, cfg, data))
    else:
        run_on_all(dist, lambda: _restore(run))
    run.clock = RunClock(run.schedule, seconds_before(run.metrics.read()) if resume else 0.0)
    if dist.is_main:
        print("\n".join(startup_lines(run)) + "\n" + report.epoch_header(), flush=True)
    try:
        run.train()
    except BaseException:  # an error or Ctrl-C: the checkpoint being written finishes first
        run.writer.drain()
        raise
    return run.finish(run.clock.elapsed())


def main(argv: list[str] | None = None) -> int:
    """`python -m fastcifar.train`: see fastcifar.cli (arguments, --help, exit codes)."""
    from fastcifar.cli import main as cli_main  # absolute: this file also runs as __main__

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
