"""Tests for fastcifar.report: noise scores, the metrics log, console lines, summary, suspects, pred_probs."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from fastcifar.report import (
    EPOCH_FIELDS, MetricsLog, epoch_header, format_epoch, format_table, noise_detection,
    write_pred_probs, write_summary, write_suspects,
)


def _record(epoch: int, **extra) -> dict:
    phase = "frozen" if epoch < 3 else ("finetune" if epoch < 6 else "filter")
    rec = {"epoch": epoch, "phase": phase, "lr": 1e-3 * (epoch + 1) / 20, "threshold": 2.0 * 0.995**epoch,
           "kept_fraction": 1.0 - 0.01 * epoch, "train_loss": 4.0 / (epoch + 1), "train_acc": 0.03 * epoch,
           "val_loss": 3.5 / (epoch + 1), "val_acc": 0.025 * epoch, "seconds": 1.5 + epoch}
    rec.update(extra)
    return rec


# ---- noise_detection ---------------------------------------------------------------------------

def test_noise_detection_hand_made_case():
    dropped = torch.tensor([True, True, True, False, False, False])
    noisy = torch.tensor([True, True, False, True, False, False])
    got = noise_detection(dropped, noisy)
    assert got["noisy_precision"] == pytest.approx(2 / 3)
    assert got["noisy_recall"] == pytest.approx(2 / 3)
    assert got["noisy_f1"] == pytest.approx(2 / 3)


def test_noise_detection_asymmetric_numpy():
    dropped = np.array([1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    noisy = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    got = noise_detection(dropped, noisy)
    assert got["noisy_precision"] == 1.0
    assert got["noisy_recall"] == 0.25
    assert got["noisy_f1"] == pytest.approx(2 * 1.0 * 0.25 / 1.25)


@pytest.mark.parametrize("dropped, noisy, expected", [
    ([0, 0, 0], [1, 0, 1], (0.0, 0.0, 0.0)),  # nothing dropped: precision defined as 0
    ([1, 1, 0], [0, 0, 0], (0.0, 0.0, 0.0)),  # nothing noisy: recall defined as 0
    ([0, 0, 0], [0, 0, 0], (0.0, 0.0, 0.0)),
    ([1, 0, 1], [1, 0, 1], (1.0, 1.0, 1.0)),  # perfect detection
    ([], [], (0.0, 0.0, 0.0)),  # no samples at all
])
def test_noise_detection_degenerate(dropped, noisy, expected):
    got = noise_detection(torch.tensor(dropped, dtype=torch.bool), torch.tensor(noisy, dtype=torch.bool))
    assert (got["noisy_precision"], got["noisy_recall"], got["noisy_f1"]) == expected
    assert all(isinstance(v, float) and not math.isnan(v) for v in got.values())


def test_noise_detection_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="length"):
        noise_detection(np.zeros(3, bool), np.zeros(4, bool))


# ---- MetricsLog --------------------------------------------------------------------------------

def test_metrics_log_round_trip_and_truncate(tmp_path):
    log = MetricsLog(tmp_path)
    assert log.read() == []
    records = [_record(e, noisy_precision=np.float32(0.5), noisy_recall=torch.tensor(0.25)) for e in range(6)]
    for r in records:
        log.append(r)
    got = log.read()
    assert [r["epoch"] for r in got] == list(range(6))
    assert set(EPOCH_FIELDS) <= set(got[0])
    assert got[3]["noisy_precision"] == 0.5 and got[3]["noisy_recall"] == 0.25  # numpy/tensor -> plain
    assert got[2]["train_loss"] == records[2]["train_loss"]
    log.truncate_after(3)
    assert [r["epoch"] for r in log.read()] == [0, 1, 2, 3]
    log.append(_record(4))
    assert [r["epoch"] for r in MetricsLog(tmp_path).read()] == [0, 1, 2, 3, 4]
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic rewrite left no temp file


def test_metrics_log_ignores_torn_final_line_and_repairs_on_append(tmp_path):
    log = MetricsLog(tmp_path)
    for e in range(3):
        log.append(_record(e))
    full = json.dumps(_record(3)) + "\n"
    with open(log.path, "a") as f:
        f.write(full[: len(full) // 2])  # a crash in the middle of epoch 3's write
    with pytest.warns(UserWarning, match="torn"):
        assert [r["epoch"] for r in log.read()] == [0, 1, 2]
    log.append(_record(3))  # a resumed run re-logs epoch 3; it must not glue onto the torn text
    assert [r["epoch"] for r in log.read()] == [0, 1, 2, 3]
    assert log.path.read_text().count("\n") == 4


def test_metrics_log_record_without_newline_is_not_committed(tmp_path):
    log = MetricsLog(tmp_path)
    log.append(_record(0))
    with open(log.path, "a") as f:
        f.write(json.dumps(_record(1)))  # complete JSON, but the newline never reached the disk
    with pytest.warns(UserWarning):
        assert [r["epoch"] for r in log.read()] == [0]
    log.truncate_after(10)
    assert log.path.read_text().endswith("}\n") and len(log.read()) == 1


def test_metrics_log_corrupt_middle_line_raises(tmp_path):
    log = MetricsLog(tmp_path)
    log.append(_record(0))
    with open(log.path, "a") as f:
        f.write("{not json\n")
    log.append(_record(2))
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        log.read()


def test_metrics_log_needs_epoch(tmp_path):
    with pytest.raises(ValueError, match="epoch"):
        MetricsLog(tmp_path).append({"phase": "frozen"})


# ---- console line ------------------------------------------------------------------------------

def test_format_epoch_width_is_constant():
    extremes = [
        _record(0),
        _record(123456, phase="a-very-long-phase-name", lr=1e-300, threshold=float("inf"),
                kept_fraction=0.0, train_loss=1e30, val_acc=1.0, seconds=1e9,
                noisy_precision=1.0, noisy_recall=0.0),
        _record(7, lr=0.0, threshold=float("nan"), train_loss=-12345.678, seconds=0.0),
        {"epoch": 1},  # everything else missing
        _record(5, noisy_precision=np.float64(0.123456), noisy_recall=torch.tensor(0.9)),
    ]
    lines = [format_epoch(r) for r in extremes]
    assert len({len(line) for line in lines}) == 1, lines
    assert len(epoch_header()) == len(lines[0])
    assert "inf" in lines[1] and "100.0" in lines[1]
    assert "-" in lines[3]


def test_format_epoch_shows_values():
    line = format_epoch(_record(25, phase="filter", kept_fraction=0.873, val_acc=0.7043,
                                noisy_precision=0.81, noisy_recall=0.42, noise_rate_est=0.397, seconds=0.61))
    for text in ("25", "filter", "87.3", "70.4", "81.0", "42.0", "39.7", "0.6"):
        assert text in line


# ---- summary ----------------------------------------------------------------------------

def test_write_summary(tmp_path):
    write_summary(tmp_path, {"best_val_acc": np.float32(0.5), "final": {"tta": torch.tensor(0.75)},
                             "seconds": 61.2})
    got = json.loads((tmp_path / "summary.json").read_text())
    assert got == {"best_val_acc": 0.5, "final": {"tta": 0.75}, "seconds": 61.2}


# ---- suspects.csv, pred_probs.npy --------------------------------------------------------------

def _suspect_inputs(n=50, seed=0):
    g = np.random.default_rng(seed)
    return dict(indices=torch.from_numpy(g.permutation(n)), labels=torch.from_numpy(g.integers(0, 10, n)),
                pred=g.integers(0, 10, n), pred_prob=torch.from_numpy(g.random(n)).to(torch.bfloat16),
                loss=torch.from_numpy(g.random(n) * 5).float(), kept=torch.from_numpy(g.random(n) < 0.7))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_write_suspects_sorted_without_clean_labels(tmp_path):
    inputs = _suspect_inputs()
    inputs["loss"][[3, 9]] = 1.25  # a tie: broken by index
    path = write_suspects(tmp_path, **inputs, clean_labels=np.full(50, -1))
    rows = _read_csv(path)
    assert list(rows[0]) == ["index", "given_label", "predicted_label", "predicted_prob", "loss", "kept"]
    assert len(rows) == 50
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True)
    assert sorted(int(r["index"]) for r in rows) == list(range(50))
    assert {r["kept"] for r in rows} == {"0", "1"}
    tied = [int(r["index"]) for r in rows if float(r["loss"]) == 1.25]
    assert tied == sorted(tied) and len(tied) == 2
    top = int(inputs["loss"].argmax())  # the row with the highest loss carries its own fields
    assert int(rows[0]["index"]) == int(inputs["indices"][top])
    assert int(rows[0]["given_label"]) == int(inputs["labels"][top])
    assert rows[0]["kept"] == str(int(inputs["kept"][top]))


def test_write_suspects_with_clean_labels(tmp_path):
    inputs = _suspect_inputs()
    clean = np.arange(50) % 10
    clean[:5] = -1  # partly unknown is still "known"
    rows = _read_csv(write_suspects(tmp_path, **inputs, clean_labels=clean))
    assert list(rows[0])[-1] == "clean_label"
    by_index = {int(r["index"]): r for r in rows}
    position = {int(i): k for k, i in enumerate(inputs["indices"])}
    for idx, r in by_index.items():
        assert int(r["clean_label"]) == clean[position[idx]]


def test_write_suspects_ranks_by_evidence_with_names_and_paths(tmp_path):
    inputs = _suspect_inputs()
    evidence = torch.from_numpy(np.random.default_rng(1).normal(size=50)).float()
    names = [f"class-{c}" for c in range(10)]
    paths = [f"train/c/{i}.png" for i in range(50)]  # by sample index, like the indices column
    inputs["indices"] = torch.arange(50)
    rows = _read_csv(write_suspects(tmp_path, **inputs, evidence=evidence, class_names=names, paths=paths))
    assert list(rows[0]) == ["index", "given_label", "given_name", "predicted_label", "predicted_name",
                             "predicted_prob", "loss", "evidence", "kept", "path"]
    scores = [float(r["evidence"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # the selector's evidence, not the loss, ranks
    assert [float(r["loss"]) for r in rows] != sorted((float(r["loss"]) for r in rows), reverse=True)
    for r in rows:
        i = int(r["index"])
        assert r["given_name"] == names[int(r["given_label"])] and r["predicted_name"] == names[int(r["predicted_label"])]
        assert r["path"] == paths[i] and float(r["evidence"]) == pytest.approx(float(evidence[i]), rel=1e-5)


def test_write_suspects_validates(tmp_path):
    inputs = _suspect_inputs()
    bad = dict(inputs, loss=inputs["loss"][:-1])
    with pytest.raises(ValueError, match="length"):
        write_suspects(tmp_path, **bad)
    with pytest.raises(ValueError, match="length"):
        write_suspects(tmp_path, **inputs, clean_labels=np.zeros(49, int))
    with pytest.raises(ValueError, match="1-D"):
        write_suspects(tmp_path, **dict(inputs, pred=np.zeros((50, 2), int)))
    with pytest.raises(ValueError, match="unique"):
        write_suspects(tmp_path, **dict(inputs, indices=np.zeros(50, int)))
    assert not (tmp_path / "suspects.csv").exists()


def test_pred_probs_round_trip(tmp_path):
    logits = torch.randn(40, 7, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(dim=1)
    path = write_pred_probs(tmp_path, probs.to(torch.bfloat16))
    assert path == tmp_path / "pred_probs.npy"
    got = np.load(path)
    assert got.dtype == np.float32 and got.shape == (40, 7)
    np.testing.assert_allclose(got, probs.numpy(), atol=1e-2)
    write_pred_probs(tmp_path, probs.numpy().astype(np.float64))
    np.testing.assert_array_equal(np.load(path), probs.numpy())
    assert not list(tmp_path.glob(".*"))  # no stray temp file (np.save would add .npy to it)


def test_pred_probs_rejects_logits_and_bad_shapes(tmp_path):
    logits = torch.randn(10, 5, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="logits"):
        write_pred_probs(tmp_path, logits)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        write_pred_probs(tmp_path, np.full(5, 0.2))
    assert not (tmp_path / "pred_probs.npy").exists()


# ---- format_table ------------------------------------------------------------------------------

def test_format_table():
    rows = [{"backbone": "convnext_base", "filter": "on", "test_acc": 0.7043, "seconds": 61.234},
            {"backbone": "resnext50|32x4d", "filter": "off", "test_acc": 0.63},
            {"backbone": "tiny", "filter": "on", "test_acc": 12345.6, "seconds": 3}]
    text = format_table(rows, ["backbone", "filter", "test_acc", "seconds"])
    lines = text.splitlines()
    assert len(lines) == 5
    assert len({len(line) for line in lines}) == 1  # aligned as plain text too
    assert lines[0].split("|")[1].strip() == "backbone"
    assert lines[1].split("|")[3].strip().endswith(":")  # numeric column right-aligned
    assert not lines[1].split("|")[1].strip().endswith(":")
    assert "0.7043" in lines[2] and "61.23" in lines[2] and "12346" in lines[4]
    assert "resnext50\\|32x4d" in lines[3]  # a pipe in a value does not split the cell
    assert lines[3].split("|")[-2].strip() == ""  # missing key: blank cell
