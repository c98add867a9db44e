#!/usr/bin/env python3
"""The GPU report in one command, from a plain checkout: nothing installed, no internet, no dataset.

    python3 scripts/gpu_report.py --out DIR          # default --budget 540 s: one 10-minute call
    python3 scripts/gpu_report.py --device cpu --out DIR   # the miniature: checks this script

The checkout is put on sys.path (and PYTHONPATH for the child processes), so it runs with the
machine's own Python and packages (torch 2.11-2.14, triton, timm; ffcv optional: without it the
memory loader is used, and the report says so). It trains a randomly initialised model on
synthetic CIFAR-shaped data. The parts run in value order, each in its own process group under
its own cap inside --budget, and the report is rewritten after every part, so a part killed at
its cap, or a run killed from outside, still leaves what it measured:
    check       environment and CUDA correctness (kernel vs reference, augmentation CUDA vs CPU,
                one model step against the same function on the CPU, the graphed steps vs eager)
    steps       benchmarks/test_bench_train.py (not `extended`): graphs, then compiled (the full
                step), then eager (the reference, few calls) per phase; ms/step, images/s, MFU,
                launches/step, peak memory, the mode each function ran in; and the graphed full
                step's GPU time by kernel category (torch.profiler), the augmentation timed alone
    peer        the same model written plainly (timm, fused SGD, torch.compile reduce-overhead):
                ms per step, and our graphed full step's speed over it
    candidates  A/B: the full step and the evaluation batch in graphs mode with
                model.small_map_dw=on, beside the steps part's rows (off); "not available"
                where the configuration has no such key
    schedule    real epochs of each phase with evaluation (--phase-epochs each), projected to the
                100-epoch paper schedule, compiling from the inductor cache the earlier parts
                filled; --full runs and measures the whole schedule instead
    baseline    the paper-equivalent pipeline (fastcifar/bench/baseline.py): its evaluation pass,
                then N/4 and N steps per training phase, projected
    tests       tests/test_masked_ce.py and test_augment.py on the device (every
                failure listed)
--device cpu is the miniature (timm's test_convnext at tiny sizes, a few minutes on 2 cores):
the CUDA-only parts say so and are skipped. Files: DIR/<device>-<date>.json, .md and -log.txt.
JSON keys: device, torch, triton, commit, date, backend_flags {part: flags}, step_ms {phase:
{mode: ms}}, modes_ran, images_per_s, mfu, launches_per_step, peak_memory_gib, compile_seconds,
breakdown, peer, speedup_vs_peer, candidates, schedule_seconds, schedule_projected,
baseline_seconds, speedup_vs_baseline, check, schedule, baseline, tests, goals, parts {name:
{status, seconds, cap_s, why}}, notes. Exit code: 0 clean, 1 a part failed or hit its cap, 2 no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout itself is the package (kernels/ included)

from fastcifar.bench import benchreport as br  # noqa: E402  (no torch here: the parent holds no CUDA context)


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float  # the part's own wall-clock cap
    floor_s: float  # kept free for it while earlier parts run
    expect_s: float  # what it takes on the lent H200 (measured, or estimated from measured compiles)
    cuda_only: str = ""  # why the miniature (--device cpu) skips it; "": it runs there too


# Caps from the lent H200 (16 cores). Measured there: a cold compile of plain ConvNeXt-B's training
# step 53 s, evaluation 25 s, reduce-overhead 49 s (2026-12-04); the check's kernel, augmentation
# and model-step checks 6 + 0.4 + 17 s, its graph check more than the 31 s it had left of 60;
# the trainer's frozen features + head step + evaluation compiled cold in 59 s, its first full
# epoch (compilation included) more than the ~75 s it had left; the paper pipeline 0.11 s per
# step (2026-12-04, a second run, of the lead's checkout at the time). Hence expect_s:
# steps = graphs (~125 s of compilation, timing, the breakdown) + compiled from the cache + eager.
# With the 8-s probe and the 10-s report they add up to ~533 s: the parts run in that (value)
# order, the floors keep the schedule and the baseline their time, candidates and tests run on
# what is left: the tests get the rest, little while candidates has a switch to try
# (--skip candidates gives them ~70 s).
PLAN = (Part("check", 75, 40, 65), Part("steps", 210, 150, 200),
        Part("peer", 70, 55, 60, "the peer's reduce-overhead mode is inductor's CUDA graphs"),
        Part("candidates", 75, 0, 70, "the A/B rows are graphs-mode steps"),
        Part("schedule", 90, 80, 80), Part("baseline", 45, 35, 40),
        Part("tests", 120, 0, 60, "on the CPU these tests run in the test suite itself"))
PROBE_S = 8  # the child process that asks torch about the GPU, before the first part
REPORT_S = 10  # kept for writing the report at the end
MIN_RUN_S = 10  # a part with less than this left is skipped
# The test files with CUDA cases; the step's own graph check runs in the check part (the tiny model,
# graphs vs eager), test_step.py runs its CPU cases in the suite.
TEST_FILES = ("tests/test_masked_ce.py", "tests/test_augment.py")
CANDIDATE = ("small_map_dw", "model.small_map_dw=on")  # (ModelConfig field, the override it is tested with)
# Sizes by device: the paper's on a GPU, the miniature's on the CPU (each an option's default).
SIZES = {"cuda": dict(model="convnext_base", train_size=50_000, test_size=10_000, phase_epochs=2, baseline_steps=60),
         "cpu": dict(model="test_convnext", train_size=64, test_size=32, phase_epochs=1, baseline_steps=2)}
MINIATURE_SET = ["train.batch_size=16", "train.test_batch_size=32", "train.frozen_chunk=32"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--out-dir", dest="out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for the report files (default: benchmarks/results)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default: %(default)s)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the miniature, which checks this script, not the GPU (default: %(default)s)")
    p.add_argument("--full", action="store_true", help="measure the whole 100-epoch schedule (give a --budget)")
    p.add_argument("--skip", default="", metavar="PART,...",
                   help=f"parts to leave out: {', '.join(q.name for q in PLAN)}")
    p.add_argument("--model", help="timm model, randomly initialised (default: convnext_base; cpu: test_convnext)")
    p.add_argument("--train-size", type=int, help="synthetic training images (default: 50000; cpu: 64)")
    p.add_argument("--test-size", type=int, help="synthetic test images (default: 10000; cpu: 32)")
    p.add_argument("--noise", type=float, default=0.4, help="share of flipped training labels (default: %(default)s)")
    p.add_argument("--phase-epochs", type=int, help="epochs of each phase in the truncated schedule "
                   "(the first of a phase compiles; default: 2; cpu: 1)")
    p.add_argument("--baseline-steps", type=int, metavar="N",
                   help="baseline steps per training phase, timed at N/4 and N (default: 60; cpu: 2)")
    p.add_argument("--loader", choices=("auto", "ffcv", "memory"), default="auto",
                   help="auto: ffcv over .beton files of the synthetic data when ffcv imports, else memory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the schedule and the baseline, e.g. model.compile_mode=max-autotune "
                        "(cpu: after the miniature's batch sizes)")
    p.add_argument("--commit", default=None, help="the commit to report where the checkout has no .git")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (logs, run directory, caches)")
    p.add_argument("--part", choices=("check", "peer", "schedule", "baseline"), help=argparse.SUPPRESS)  # children
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(filter(None, args.skip.split(","))) - {q.name for q in PLAN}
    if unknown:
        p.error(f"--skip: unknown parts {sorted(unknown)}")
    for key, value in SIZES[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cpu":
        args.set = MINIATURE_SET + args.set
    return args


# ---- the parent: running parts under caps ----


def run_part(cmd: list[str], timeout: float, log_path: Path, env: dict | None = None) -> dict:
    """Run `cmd` in its own process group, echoing and logging its output; kill the group at `timeout`."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=env)
        fired = threading.Event()

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(max(timeout, 1.0), lambda: (fired.set(), kill()))
        timer.start()
        tail: list[str] = []
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                tail = (tail + [line.rstrip()])[-15:]
            rc = proc.wait()
        finally:  # also on Ctrl-C or SIGTERM: the part runs in its own session, so end it here
            timer.cancel()
            if proc.poll() is None:
                kill()
    status = "timed out" if fired.is_set() else "ok" if rc == 0 else "failed"
    out = {"status": status, "seconds": round(time.monotonic() - t0, 1), "cap_s": round(timeout), "rc": rc}
    if status != "ok":
        out["why"] = next((t for t in reversed(tail) if t.strip()), f"exit {rc}")[-300:] if status == "failed" \
            else f"killed at its cap of {timeout:.0f} s"
    return out


def child_env(args, work: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # A fresh compile cache: the first compilation in the report is cold, later parts share it.
    env.update(TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"), TRITON_CACHE_DIR=str(work / "triton"))
    if args.device == "cpu":  # the miniature: no GPU even where one exists; Triton interpreted
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    env[br.CUDA_ENV] = "1" if args.device == "cuda" else "0"
    return env


def pytest_part(targets: list[str], args, work: Path, cap: float, name: str, bench: bool,
                env: dict | None = None, select: str | None = None) -> dict:
    """pytest on `targets` (`select`: a -k expression) with every outcome (and benchmark row) logged
    as it finishes (fastcifar.bench.rowlog), so a part killed at its cap keeps what it measured."""
    rows = work / f"{name}-rows.jsonl"
    env = dict(child_env(args, work), FASTCIFAR_BENCH_ROWS=str(rows), **(env or {}))
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    cmd += ["-k", select] if select else []
    cmd += ["--benchmark-only", "-m", "not extended", "--benchmark-columns=median,rounds"] if bench \
        else ["-p", "fastcifar.bench.rowlog", "-rfE"]  # benchmarks/conftest.py has the hooks already
    res = run_part(cmd, cap, work / f"{name}.log", env)
    if res["rc"] == 5:  # pytest: nothing selected
        res.update(status="ok", why="nothing selected")
    found, outcomes = br.read_rows(rows)
    failed = [o["nodeid"].split("::")[-1] for o in outcomes if o["outcome"] == "failed"]
    if failed:
        res["why"] = f"failed: {', '.join(failed)}"[:300]
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error|deselected).*?) in [\d.]+s",
                         (work / f"{name}.log").read_text(errors="replace"), re.MULTILINE)
    res["summary"] = summary[-1] if summary else None  # pytest's closing line
    return {"part": res, "rows": found, "outcomes": outcomes, "targets": targets}


def worker_part(name: str, argv: list[str], args, work: Path, cap: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", name, "--work", str(work)]
    return {"part": run_part(cmd, cap, work / f"{name}.log", child_env(args, work))}


def run_one(part: Part, args, argv: list[str], work: Path, cap: float) -> dict:
    if part.name in ("check", "peer", "schedule", "baseline"):
        return worker_part(part.name, argv, args, work, cap)
    if part.name == "steps":  # compiled: the full step's rows only (full, full+filter: one compile; graphs show the rest)
        return pytest_part(["benchmarks/test_bench_train.py"], args, work, cap, "steps", bench=True,
                           env={"FASTCIFAR_BENCH_ORDER": "graphs,compiled,eager"}, select="not compiled or full")
    if part.name == "candidates":
        cases = [f"benchmarks/test_bench_train.py::test_step[graphs-{phase}]" for phase in ("full", "eval")]
        got = pytest_part(cases, args, work, cap, "candidates", bench=True, env={"FASTCIFAR_BENCH_SET": CANDIDATE[1]})
        return dict(got, switch=CANDIDATE[1])
    return pytest_part(list(TEST_FILES), args, work, cap, "tests", bench=False)


def skip_reason(part: Part, args) -> str | None:
    """Why `part` cannot run here at all (before any time is spent on it), or None."""
    if part.cuda_only and args.device == "cpu":
        return f"needs CUDA: {part.cuda_only}"
    if part.name == "candidates":
        from fastcifar.config import ModelConfig  # no torch in the configuration

        if CANDIDATE[0] not in {f.name for f in dataclasses.fields(ModelConfig)}:
            return f"not available: ModelConfig has no {CANDIDATE[0]} in this checkout"
    return None


def environment(args, argv: list[str], work: Path) -> dict:
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    probe = br.probe_cuda(details=True, env=child_env(args, work))
    device = probe.get("device", "unknown CUDA device") if args.device == "cuda" else "cpu"
    commit = args.commit or os.environ.get("FASTCIFAR_COMMIT") or probe.get("commit", "unknown")
    return {"device": device, "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": probe.get("torch"),
            "cuda": probe.get("cuda"), "triton": version("triton"), "timm": version("timm"),
            "numpy": version("numpy"), "ffcv": version("ffcv"), "python": probe.get("python"),
            "driver": br.driver_version(), "gpu": {k: probe.get(k) for k in ("capability", "sms", "memory_gib")},
            "commit": commit, "fastcifar_path": probe.get("fastcifar_path"), "model": args.model,
            "budget_s": args.budget, "argv": argv, "probe_error": probe.get("error"),
            "cuda_available": probe.get("available")}


def part_cap(part: Part, later: list[Part], left_s: float, full: bool) -> float:
    """Seconds `part` may run: its own cap (none for the --full schedule) within what is left
    after the report's time and the floors of the parts after it."""
    room = left_s - REPORT_S - sum(q.floor_s for q in later)
    return room if (full and part.name == "schedule") else min(part.cap_s, room)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the report is written before the exit


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.part:
        from fastcifar.bench.workers import WORKERS

        WORKERS[args.part](args, Path(args.work))
        return 0
    deadline = time.monotonic() + args.budget
    work = Path(tempfile.mkdtemp(prefix="fastcifar-gpu-report-"))
    result = environment(args, argv, work)
    result.update(parts={}, notes=[], compile_seconds={}, schedule_seconds=None, schedule_projected=None,
                  baseline_seconds=None, speedup_vs_baseline=None, speedup_vs_peer=None, step_ms={},
                  launches_per_step={}, peak_memory_gib={}, paper_phases=_paper_phases(args))
    skipped = {q.name: "--skip" for q in PLAN if q.name in set(filter(None, args.skip.split(",")))}
    no_gpu = args.device == "cuda" and not result["cuda_available"]
    if no_gpu:
        why = f"torch sees no CUDA GPU ({result['probe_error'] or 'torch.cuda.is_available() is False'})"
        print(f"error: {why}; --device cpu runs a miniature that only checks this script", file=sys.stderr)
        skipped, result["notes"] = {q.name: "no CUDA GPU" for q in PLAN}, [why]
    for q in PLAN:
        reason = None if q.name in skipped else skip_reason(q, args)
        if reason:
            skipped[q.name] = reason
    previous = signal.signal(signal.SIGTERM, _interrupt)
    chosen = [q for q in PLAN if q.name not in skipped]
    out_dir = Path(args.out)
    try:
        for i, part in enumerate(chosen):
            cap = part_cap(part, chosen[i + 1:], deadline - time.monotonic(), args.full)
            if cap < MIN_RUN_S:
                result["parts"][part.name] = {"status": "skipped", "why": "no time left in --budget"}
                continue
            print(f"\n== {part.name} (cap {cap:.0f} s) ==", flush=True)
            got = run_one(part, args, argv, work, cap)
            result["parts"][part.name] = got["part"]
            try:
                br.fold_part(part.name, got, result, work)
            except Exception as e:  # noqa: BLE001 (one unreadable part must not cost the report)
                result["notes"].append(f"could not read what {part.name} left: {type(e).__name__}: {e}")
            _write(result, out_dir, work)
    except KeyboardInterrupt:
        result["notes"].append("interrupted: the parts marked so did not run")
    finally:
        signal.signal(signal.SIGTERM, previous)
    for q in PLAN:  # every part listed, in plan order
        result["parts"][q.name] = result["parts"].pop(q.name, {"status": "skipped",
                                                                "why": skipped.get(q.name, "interrupted")})
    paths = _write(result, out_dir, work)
    print("\n" + br.render_markdown(result))  # last: a caller that keeps only the output's tail sees it
    if args.keep_work:
        print(f"work files in {work}")
    else:  # the logs' tails are in the -log.txt file
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {', '.join(map(str, paths))}")
    failed = [k for k, v in result["parts"].items() if v["status"] in ("failed", "timed out")]
    if failed:
        print(f"parts that did not finish cleanly: {', '.join(failed)}", file=sys.stderr)
    return 2 if no_gpu else 1 if failed else 0


def _paper_phases(args) -> list[str]:
    """The phase of each epoch of the 100-epoch schedule (the config needs no torch)."""
    from fastcifar.bench.workers import report_config
    from fastcifar.schedule import build_schedule

    s = build_schedule(report_config(args, truncated=False))
    return [s.phase(e).name for e in range(s.epochs)]


def _write(result: dict, out_dir: Path, work: Path) -> list[Path]:
    result["goals"] = br.goals(result)
    logs = {p.stem: p.read_text(errors="replace") for p in sorted(work.glob("*.log"))}
    return br.write_report(result, out_dir, logs)


if __name__ == "__main__":
    sys.exit(main())
