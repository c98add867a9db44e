"""Checkpoints written in the background: what is saved, a crash in the middle of a write, errors."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastcifar.checkpoint import CheckpointError, load_checkpoint
from fastcifar.checkpoint_writer import CheckpointWriter, remove_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]


def test_the_state_at_save_time_is_written_whatever_happens_after(tmp_path):
    writer = CheckpointWriter(torch.device("cpu"))
    weights = torch.arange(12.0).view(3, 4)
    conv = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    writer.save([(tmp_path / "best.pt", {"w": weights}), (tmp_path / "last.pt", {"w": weights, "conv": conv, "step": 7})])
    weights.add_(100)  # training goes on while the thread writes: the copy was taken first
    writer.wait()
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(best["w"], torch.arange(12.0).view(3, 4)) and torch.equal(last["w"], best["w"])
    assert last["step"] == 7 and torch.equal(last["conv"], conv)
    assert last["conv"].is_contiguous(memory_format=torch.channels_last)  # the layout survives
    writer.save([(tmp_path / "last.pt", {"w": weights, "conv": conv, "step": 8})])  # host buffers reused
    writer.wait()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 8 and writer.writes == 2
    assert writer.blocking_seconds >= 0


_SLOW_WRITER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from fastcifar.checkpoint_writer import CheckpointWriter
    out = Path(sys.argv[1])
    writer = CheckpointWriter(torch.device("cpu"))
    writer.save([(out / "last.pt", {"version": 1, "w": torch.ones(1000)})])
    writer.wait()
    real = torch.save
    def slow(obj, f, *a, **k):  # the second write: half the bytes, then a pause, where we are killed
        with open(f, "wb") as fh:
            fh.write(b"\\x00" * 4096)
            fh.flush()
            print("writing", flush=True)
            time.sleep(60)
        real(obj, f, *a, **k)
    torch.save = slow
    writer.save([(out / "last.pt", {"version": 2, "w": torch.zeros(1000)})])
    writer.wait()
""")


def test_a_crash_in_the_middle_of_a_write_leaves_the_previous_checkpoint_whole(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline().strip() == "writing"  # the second write is half done
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["version"] == 1 and torch.equal(state["w"], torch.ones(1000))
    stale = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(stale) == 1  # the torn temporary, never renamed into place
    assert remove_stale_temporaries(tmp_path) == stale and not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(tmp_path / "last.pt")["version"] == 1


def test_a_failed_background_write_is_reported_at_the_next_wait(tmp_path, monkeypatch):
    writer = CheckpointWriter(torch.device("cpu"))
    (tmp_path / "last.pt").write_bytes(b"")

    def full_disk(obj, f, *a, **k):
        time.sleep(0.05)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    writer.save([(tmp_path / "last.pt", {"w": torch.ones(3)})])
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.wait()
    writer.wait()  # reported once
    assert writer.blocking_seconds > 0 and not list(tmp_path.glob("*.tmp"))
