"""torchrun DDP on gloo: results do not depend on the number of processes; a dead worker ends the job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastcifar.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Dropout draws from each process's own RNG, so it is off here; everything else is as in the preset.
SMOKE = ["--config", "smoke", "run.device=cpu", "model.dropout=0", "train.epochs=4", "filter.start_epoch=2",
         "run.max_steps_per_epoch=6", "run.checkpoint_every=1", "train.tta=false"]


def torchrun(nproc: int, data_dir: Path, out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastcifar.train", "--data-dir", str(data_dir), "--out", str(out), *SMOKE, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "write_beton.py"), "--source", "digits", "--noise",
                    "0.4", "--out-dir", str(out), "--quiet"], check=True, capture_output=True)
    return out


def test_one_and_two_processes_give_the_same_run(digits, tmp_path):
    one = torchrun(1, digits, tmp_path / "one")
    two = torchrun(2, digits, tmp_path / "two")
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [0, 1, 2, 3]
    worst = {}
    for a, b in zip(one, two):
        for key in ["lr", "threshold", "kept_fraction", "train_loss", "train_acc", "val_loss", "val_acc",
                    "noisy_precision", "noisy_recall"]:
            if a[key] is None:
                assert b[key] is None
                continue
            worst[key] = max(worst.get(key, 0.0), abs(a[key] - b[key]))
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), (a["epoch"], key)
    wa = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"\n1 vs 2 processes: largest metric differences {worst}; largest weight difference {diff:.2e}")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5) for k in wa)


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_a_killed_worker_ends_the_job_with_an_error(digits, tmp_path):
    job = torchrun(2, digits, tmp_path / "killed", "train.epochs=200", "run.max_steps_per_epoch=0", wait=False)
    try:
        deadline = time.time() + 300
        metrics = tmp_path / "killed" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
            assert job.poll() is None, job.stdout.read()
            time.sleep(0.5)
        workers = children(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        started = time.time()
        code = job.wait(timeout=120)
        print(f"\nkilled worker: torchrun exited {code} after {time.time() - started:.1f} s")
        assert code != 0
        assert time.time() - started < 120
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


def launch(nproc: int, *args: str, script: str = "-m fastcifar.train") -> subprocess.CompletedProcess:
    """torchrun with `args` after the entry point; stdout and stderr together in .stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *script.split(), *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def worker_exits(out: str) -> list[int]:
    """The exit codes torchrun reports for its workers (-15: stopped by torchrun once another failed)."""
    return [int(line.split(":")[1].split()[0]) for line in out.splitlines() if line.strip().startswith("exitcode")]


SHORT = ["--config", "smoke", "run.device=cpu", "train.epochs=2", "run.max_steps_per_epoch=1", "train.tta=false"]


def test_repeated_two_process_runs_exit_cleanly_with_no_gloo_thread_left(digits, tmp_path):
    """The rare SIGABRT at exit: gloo's threads outlived destroy_process_group (DDP's import of
    torch.distributed.nn captured the live group in default arguments) and met interpreter exit."""
    for i in range(3):
        done = launch(2, "--data-dir", str(digits), "--out", str(tmp_path / f"r{i}"), *SHORT,
                      script=str(ROOT / "tests" / "ddp_worker.py"))
        out = done.stdout
        assert done.returncode == 0 and "terminate called" not in out, out[-3000:]
        assert out.count("done: best") == 1, out[-3000:]  # once, by rank 0
        threads = [line for line in out.splitlines() if line.startswith("threads after main:")]
        assert len(threads) == 2 and not any("gloo" in line for line in threads), threads


def test_a_run_directory_that_holds_a_run_is_one_message_and_exit_2_on_every_rank(digits, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text("earlier run\n")
    done = launch(2, "--data-dir", str(digits), "--out", str(tmp_path / "taken"), *SHORT)
    out = done.stdout
    assert done.returncode != 0 and out.count("already holds a run") == 1, out[-3000:]
    codes = worker_exits(out)  # torchrun's report: the first to stop exited 2, the other 2 or was stopped
    assert len(codes) == 2 and 2 in codes and set(codes) <= {2, -15}, out[-3000:]
    assert "Connection closed" not in out and "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out
    assert (tmp_path / "taken" / "config.yaml").read_text() == "earlier run\n"


def test_a_failure_on_rank_0_mid_run_stops_every_rank_with_one_message(digits, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoint folder goes\n")  # rank 0 cannot save
    done = launch(2, "--data-dir", str(digits), "--out", str(run_dir), *SHORT)
    out = done.stdout
    assert done.returncode != 0 and out.count("could not write checkpoint") == 1, out[-3000:]
    codes = worker_exits(out)
    assert len(codes) == 2 and 2 in codes and set(codes) <= {2, -15}, out[-3000:]
    assert "Connection closed" not in out and "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out
