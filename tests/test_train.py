"""The trainer end to end on the digits demo data: phases, filtering, TTA, reports, resume, bad input."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcifar import augment, train
from fastcifar.checkpoint import load_checkpoint
from fastcifar.config import build_config
from fastcifar.engine import Engine
from fastcifar.step import FrozenFeatures, FullStep
from fastcifar.model import build_model
from fastcifar.rundir import prepare_run_dir

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_FIELDS = {"epoch", "phase", "lr", "threshold", "kept_fraction", "train_loss", "val_acc", "seconds",
                   "noisy_precision", "noisy_recall", "noisy_f1"}


def smoke(data_dir: Path, **overrides):
    flat = {"data.dir": str(data_dir), "run.device": "cpu", **{k: str(v) for k, v in overrides.items()}}
    return build_config("smoke", flat)


def train_into(cfg, run_dir: Path) -> dict:
    return train.run_training(cfg, prepare_run_dir(cfg, str(run_dir), "smoke"))


@pytest.fixture(scope="module")
def smoke_run(digits, tmp_path_factory):
    """The smoke preset once, recording which parameters each epoch changed (backbone, head)."""
    trainable = {}
    original = Engine.train_epoch

    def spy(self, epoch, *args, **kwargs):
        before = {k: v.clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}
        out = original(self, epoch, *args, **kwargs)
        after = self.model.state_dict()
        changed = {k.split(".")[0] for k, v in before.items() if not torch.equal(v, after[k])}
        trainable[epoch] = changed
        return out

    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "train_epoch", spy)
        summary = train_into(smoke(digits), run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, summary, records, trainable


def test_run_directory_holds_what_contract_3_says(smoke_run):
    run_dir, summary, records, _ = smoke_run
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "suspects.csv", "pred_probs.npy",
                 "checkpoints/last.pt", "checkpoints/best.pt", "plots/accuracy.png", "plots/loss.png",
                 "plots/filtering.png"]:
        assert (run_dir / name).is_file(), name
    assert [r["epoch"] for r in records] == list(range(8))
    assert all(CONTRACT_FIELDS <= r.keys() for r in records)
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ["final_acc", "final_acc_tta", "best_acc", "best_acc_tta", "total_seconds"]:
        assert saved[key] == pytest.approx(summary[key])
    assert saved["best_acc"] == pytest.approx(max(r["val_acc"] for r in records))


def test_backbone_trains_only_after_the_frozen_epochs(smoke_run, digits):
    _, _, records, changed = smoke_run
    # Frozen: not a backbone weight or norm statistic moves; from the unfreeze on, both parts do.
    assert changed[0] == {"head"} and all(changed[e] == {"backbone", "head"} for e in range(1, 8))
    assert [r["phase"] for r in records] == ["head"] + ["full"] * 2 + ["full+filter"] * 5


def test_filtering_starts_at_its_epoch_with_the_decaying_threshold(smoke_run):
    _, _, records, _ = smoke_run
    assert all(r["kept_fraction"] == 1.0 and r["threshold"] is None for r in records[:3])
    assert [round(r["threshold"], 6) for r in records[3:]] == [round(2.0 * 0.995 ** k, 6) for k in range(5)]
    assert all(r["kept_fraction"] < 1.0 for r in records[3:])
    lrs = [r["lr"] for r in records]  # the last step's lr of each epoch
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs[1:], lrs[2:]))


def test_smoke_run_learns_and_the_filter_finds_the_wrong_labels(smoke_run):
    _, summary, records, _ = smoke_run
    last = records[-1]
    print(f"\nsmoke: best acc {summary['best_acc']:.3f} (TTA {summary['best_acc_tta']:.3f}); last epoch "
          f"kept {last['kept_fraction']:.3f}, noise precision {last['noisy_precision']:.3f}, "
          f"recall {last['noisy_recall']:.3f}; {np.mean([r['seconds'] for r in records]):.1f} s/epoch")
    assert summary["best_acc"] > 0.5  # 10 classes; chance is 0.1
    # 40% of the labels are wrong: a filter no better than chance would have precision 0.4 and
    # recall equal to the dropped fraction (about 0.6 here).
    assert last["noisy_precision"] > 0.5 and last["noisy_recall"] > 0.75


def test_tta_accuracy_is_the_flip_averaged_prediction_of_the_best_model(smoke_run, digits):
    run_dir, summary, _, _ = smoke_run
    cfg = smoke(digits)
    model = build_model(cfg.model)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
    model.eval()
    test = train.open_split(digits / "test.beton", backend="memory", batch_size=10_000, shuffle=False,
                            drop_last=False)
    batch = next(iter(test.epoch(0)))
    with torch.no_grad():
        x = augment.eval_transform(batch.images, cfg=cfg.augment)
        probs = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
    acc = (probs.argmax(1) == batch.labels).float().mean().item()
    assert summary["best_acc_tta"] == pytest.approx(acc, abs=1e-6)


def test_suspects_and_pred_probs_cover_every_training_sample(smoke_run):
    run_dir, _, _, _ = smoke_run
    probs = np.load(run_dir / "pred_probs.npy")
    with open(run_dir / "suspects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "given_label", "given_name", "predicted_label", "predicted_name",
                             "predicted_prob", "loss", "evidence", "kept", "clean_label"]
    assert probs.shape == (len(rows), 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert sorted(int(r["index"]) for r in rows) == list(range(len(rows)))
    evidence = [float(r["evidence"]) for r in rows]
    assert evidence == sorted(evidence, reverse=True)  # the selector's evidence ranks them
    assert all((float(r["evidence"]) > 0) == (r["kept"] == "0") for r in rows)  # > 0: dropped
    assert all(r["given_name"] == r["given_label"] for r in rows)  # digits: class c is named "c"
    # The most suspicious samples are mostly truly mislabelled (measured: 100 of the top 100).
    assert sum(r["given_label"] != r["clean_label"] for r in rows[:100]) > 80


def run_for_resume(digits, run_dir, stop_after=None, **overrides):
    cfg = smoke(digits, **{"train.epochs": 4, "filter.start_epoch": 2, "run.max_steps_per_epoch": 4,
                           "run.checkpoint_every": 1, "run.deterministic": "true", **overrides})
    if stop_after is None:
        return train_into(cfg, run_dir)
    original = Engine.train_epoch

    def crash(self, epoch, *args, **kwargs):
        if epoch > stop_after:
            raise KeyboardInterrupt("killed")
        return original(self, epoch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(Engine, "train_epoch", crash)
        train_into(cfg, run_dir)
    # A resume may change where and how it runs (here the loader threads), not what it computes.
    assert train.main(["--resume", str(run_dir), "data.num_workers=2"]) == 0


# class_quantile: the resumed epoch filters with the class thresholds the killed run's last epoch
# measured, so they must come back from the checkpoint with everything else.
@pytest.mark.parametrize("selector", [{}, {"filter.selector": "class_quantile", "filter.keep_fraction": 0.6}],
                         ids=["threshold", "class_quantile"])
def test_resume_ends_exactly_like_an_uninterrupted_run(digits, tmp_path, selector):
    run_for_resume(digits, tmp_path / "straight", **selector)
    run_for_resume(digits, tmp_path / "resumed", stop_after=1, **selector)
    timing = {"seconds", "elapsed_seconds"}  # wall time differs; everything computed must not
    straight, resumed = ([{k: v for k, v in json.loads(line).items() if k not in timing}
                          for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                         for d in ("straight", "resumed"))
    assert resumed == straight
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "fastcifar.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_bad_inputs_are_one_clear_error(digits, tmp_path):
    missing = cli("--config", "smoke", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "a"))
    assert missing.returncode == 2 and "write_beton.py" in missing.stderr and "Traceback" not in missing.stderr
    classes = cli("--config", "smoke", "--data-dir", str(digits), "--out", str(tmp_path / "b"),
                  "model.num_classes=100")
    assert classes.returncode == 2 and "model.num_classes=10" in classes.stderr
    bad_key = cli("--config", "smoke", "train.epoch=3")
    assert bad_key.returncode == 2 and "unknown key 'train.epoch'" in bad_key.stderr


def test_resume_refuses_incompatible_changes_and_fresh_runs_never_overwrite(digits, tmp_path):
    run_dir = tmp_path / "run"
    cfg = smoke(digits, **{"train.epochs": 1, "run.max_steps_per_epoch": 2, "train.tta": "false"})
    train_into(cfg, run_dir)
    assert train.main(["--resume", str(run_dir), "filter.threshold=1.0"]) == 2
    assert train.main(["--config", "smoke", "--data-dir", str(digits), "--out", str(run_dir)]) == 2
    assert (run_dir / "summary.json").is_file()


def test_non_finite_loss_stops_with_the_last_good_checkpoint_kept(digits, tmp_path, capsys):
    run_dir = tmp_path / "nan"
    cfg = smoke(digits, **{"train.epochs": 4, "run.max_steps_per_epoch": 3, "run.checkpoint_every": 1,
                           "train.freeze_epochs": 1, "optim.warmup_epochs": 0})
    prepare_run_dir(cfg, str(run_dir), "smoke")
    original = Engine.train_epoch

    def explode(self, epoch, *args, **kwargs):
        if epoch == 2:  # a genuine divergence: weights blown up to inf
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(float("inf"))
        return original(self, epoch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(train.TrainingError, match="not finite"):
        mp.setattr(Engine, "train_epoch", explode)
        train.run_training(cfg, run_dir)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(digits, tmp_path):
    run_dir = tmp_path / "full"
    cfg = smoke(digits, **{"train.epochs": 3, "run.max_steps_per_epoch": 2, "run.checkpoint_every": 1})
    prepare_run_dir(cfg, str(run_dir), "smoke")
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 2:  # epoch 0 wrote best.pt and last.pt; the disk is full from then on
            Path(f).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", save)
        with pytest.raises(train.CheckpointError, match="No space left on device"):
            train.run_training(cfg, run_dir)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 0
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_epoch_level_filtering_trains_on_the_kept_subset(digits, tmp_path):
    # Filtering from epoch 0: the first scoring pass runs before any training step.
    cfg = smoke(digits, **{"filter.mode": "epoch", "train.epochs": 2, "filter.start_epoch": 0,
                           "train.freeze_epochs": 0, "train.tta": "false"})
    train_into(cfg, tmp_path / "epochmode")
    records = [json.loads(line) for line in (tmp_path / "epochmode" / "metrics.jsonl").read_text().splitlines()]
    full_epoch_steps = 1618 // 64
    assert all(0.1 <= r["kept_fraction"] < 1.0 for r in records)
    assert all(r["steps"] == round(r["kept_fraction"] * 1618) // 64 < full_epoch_steps for r in records)


def test_min_kept_fraction_guard_binds_and_is_reported(digits, tmp_path):
    cfg = smoke(digits, **{"train.epochs": 3, "filter.start_epoch": 1, "filter.threshold": 1e-4,
                           "filter.min_kept_fraction": 0.5, "run.max_steps_per_epoch": 6, "train.tta": "false"})
    train_into(cfg, tmp_path / "guard")
    records = [json.loads(line) for line in (tmp_path / "guard" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["guard_bound_steps"] >= 5  # every step after the first of the epoch
    assert records[1]["kept_fraction"] > 0.3  # not collapsed to nothing despite the tiny threshold


@pytest.mark.parametrize("overrides", [
    {"model.amp": "bf16", "data.backend": "ffcv", "augment.image_size": 40},
    {"model.amp": "fp16", "filter.mode": "epoch", "augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0,
     "optim.label_smoothing": 0.1, "optim.nesterov": "true"},
], ids=["bf16-ffcv-resize", "fp16-scaler-epochfilter-mix"])
def test_precision_backend_and_authors_options_run_end_to_end(digits, tmp_path, overrides):
    cfg = smoke(digits, **{"train.epochs": 3, "filter.start_epoch": 2, "run.max_steps_per_epoch": 3,
                           "train.tta": "false", **overrides})
    summary = train_into(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in records) and records[-1]["kept_fraction"] < 1.0
    scaler = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["scaler"]
    assert bool(scaler) == (overrides["model.amp"] == "fp16")  # fp16 trains through a GradScaler
    assert 0 <= summary["best_acc"] <= 1


def test_mixing_in_a_frozen_epoch_whose_last_chunk_is_short(digits, tmp_path):
    # 1,618 digits in batches of 64 do not fill whole chunks of 4 batches: the last chunk's padding
    # slots must not read past the end of the epoch's MixUp/CutMix table.
    cfg = smoke(digits, **{"train.epochs": 1, "train.freeze_epochs": 1, "augment.mixup_alpha": 0.8,
                           "augment.cutmix_alpha": 1.0, "train.tta": "false"})
    assert cfg.train.frozen_chunk // cfg.train.batch_size == 4
    summary = train_into(cfg, tmp_path / "run")
    assert 0 <= summary["best_acc"] <= 1


def test_noisy_val_selection_holds_out_training_rows_never_trained_on(digits, tmp_path):
    """train.select_on=noisy_val (the CIFAR-N challenge's protocol): a stratified share of the training
    split keeps its noisy labels, never trains (batch or epoch filtering), and chooses the best epoch."""
    from fastcifar.sources import stratified_holdout

    cfg = smoke(digits, **{"train.select_on": "noisy_val", "train.val_fraction": 0.2, "train.epochs": 3,
                           "train.freeze_epochs": 1, "filter.mode": "epoch", "filter.start_epoch": 2,
                           "run.max_steps_per_epoch": 2, "train.tta": "false"})
    seen, full, frozen = [], FullStep.__call__, FrozenFeatures.__call__

    def spy_full(self, batch):
        seen.append(batch.indices.clone())
        return full(self, batch)

    def spy_frozen(self, chunk):
        seen.extend(batch.indices.clone() for batch in chunk)
        return frozen(self, chunk)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FullStep, "__call__", spy_full)
        mp.setattr(FrozenFeatures, "__call__", spy_frozen)
        summary = train_into(cfg, tmp_path / "val")
    labels = train.open_split(digits / "train.beton", backend="memory", batch_size=64, shuffle=False,
                              drop_last=False).arrays()["labels"].numpy()
    held = stratified_holdout(labels, 0.2, seed=0)[1]
    trained = torch.cat(seen).numpy()
    assert len(trained) == 3 * 2 * 64 and not np.isin(trained, held).any()
    assert np.bincount(labels[held], minlength=10) == pytest.approx(0.2 * np.bincount(labels, minlength=10), abs=1)
    records = [json.loads(line) for line in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["noisy_val_acc"] for r in records]
    assert summary["best_selected_on"] == "noisy_val" and summary["best_epoch"] == int(np.argmax(scores))
    assert summary["best_noisy_val_acc"] == pytest.approx(max(scores))
    assert summary["best_acc"] == pytest.approx(records[summary["best_epoch"]]["val_acc"])  # test accuracy reported
