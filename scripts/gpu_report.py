#!/usr/bin/env python3
"""The GPU report in one command, from a plain checkout: nothing installed, no internet, no dataset.

    python3 scripts/gpu_report.py --out DIR          # default --budget 480 s, fits a 10-minute call

The checkout is put on sys.path (and PYTHONPATH for the child processes), so it runs with the
machine's own Python and packages (torch >= 2.5, triton, timm; ffcv optional: without it the
memory loader is used, and the report says so). It trains a randomly initialised model on
synthetic CIFAR-shaped data. The parts run in value order, each in its own process group under
its own cap inside --budget, and the report is rewritten after every part, so a run killed
from outside still leaves what it measured:
    check       environment and CUDA correctness (kernel vs reference, augmentation CUDA vs CPU,
                one model step)
    steps       benchmarks/test_bench_train.py (not `extended`), eager cases first: ms/step,
                images/s, MFU, CPU-side launches/step, peak memory per phase x mode
    schedule    real epochs of each phase with evaluation (--phase-epochs each), projected to the
                100-epoch paper schedule; --full runs and measures the whole schedule instead
    baseline    the paper-equivalent pipeline (fastcifar/bench/baseline.py), N steps per phase, projected
    components  the loss and augmentation benchmarks           (only on time left over)
    tests       the kernel and augmentation tests on the device (only on time left over)
Files: DIR/<device>-<date>.json, .md and -log.txt. JSON keys: device, torch, triton, commit, date,
step_ms {phase: {mode: ms}}, images_per_s, mfu, launches_per_step, peak_memory_gib,
compile_seconds, schedule_seconds, schedule_projected, baseline_seconds, speedup_vs_baseline,
check, schedule, baseline, goals, parts {name: {status, seconds, cap_s, why}}, notes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
from fastcifar.io import atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float  # the part's own wall-clock cap
    floor_s: float  # kept free for it while earlier parts run; 0: it runs on what is left over


PLAN = (Part("check", 60, 20), Part("steps", 200, 60), Part("schedule", 150, 60), Part("baseline", 60, 30),
        Part("components", 60, 0), Part("tests", 120, 0))
REPORT_S = 10  # kept for writing the report at the end
MIN_RUN_S = 10  # a part with less than this left is skipped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--out-dir", dest="out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for the report files (default: benchmarks/results)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default: %(default)s)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a miniature that checks this script, not the GPU (default: %(default)s)")
    p.add_argument("--full", action="store_true", help="measure the whole 100-epoch schedule (give a --budget)")
    p.add_argument("--skip", default="", metavar="PART,...",
                   help=f"parts to leave out: {', '.join(q.name for q in PLAN)}")
    p.add_argument("--model", default="convnext_base", help="timm model, randomly initialised (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=50_000, help="synthetic training images (default: %(default)s)")
    p.add_argument("--test-size", type=int, default=10_000, help="synthetic test images (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.4, help="share of flipped training labels (default: %(default)s)")
    p.add_argument("--phase-epochs", type=int, default=2, help="epochs of each phase in the truncated schedule "
                   "(the first of a phase compiles; default: %(default)s)")
    p.add_argument("--baseline-steps", type=int, default=100, metavar="N",
                   help="baseline steps per training phase, timed at N/4 and N (default: %(default)s)")
    p.add_argument("--loader", choices=("auto", "ffcv", "memory"), default="auto",
                   help="auto: ffcv over .beton files of the synthetic data when ffcv imports, else memory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the schedule and the baseline, e.g. model.compile_mode=max-autotune")
    p.add_argument("--commit", default=None, help="the commit to report where the checkout has no .git")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (logs, run directory, caches)")
    p.add_argument("--part", choices=("check", "schedule", "baseline"), help=argparse.SUPPRESS)  # child processes
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(filter(None, args.skip.split(","))) - {q.name for q in PLAN}
    if unknown:
        p.error(f"--skip: unknown parts {sorted(unknown)}")
    return args


# ---- child processes: each part's work ----


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
    import dataclasses

    from fastcifar.data import resolve_backend
    from fastcifar.bench.synthetic import make_dataset, save_npz, split_loaders

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


def schedule_worker(args, work: Path) -> None:
    import torch

    from fastcifar.rundir import prepare_run_dir
    from fastcifar.schedule import build_schedule
    from fastcifar.train import run_training

    target = report_config(args, truncated=False)
    cfg = target if args.full else report_config(args, truncated=True)
    cfg, make_loaders, note = schedule_loaders(args, cfg, work)
    planned = build_schedule(target)
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", work / "none"))
    meta = {"target": [planned.phase(e).name for e in range(planned.epochs)], "loader_note": note,
            "inductor_cache_warm": cache.is_dir() and any(cache.iterdir())}
    atomic_write_text(work / "schedule_meta.json", json.dumps(meta))
    t0 = time.perf_counter()
    summary = run_training(cfg, prepare_run_dir(cfg, str(work / "run"), "paper"), make_loaders=make_loaders)
    end = {"wall_s": time.perf_counter() - t0, "summary": summary,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    atomic_write_text(work / "schedule_end.json", json.dumps(end, default=str))
    save_backend(work, "schedule")


def baseline_worker(args, work: Path) -> None:
    """The paper's pipeline: each training pass timed at N/4 and N steps (the difference is the
    per-step cost, the rest per-epoch start-up), the evaluation pass whole; saved after each."""
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
    out = {"note": f"DataLoader with {pipe.num_workers} workers; training passes timed at {n1} and {n2} steps, "
                   f"projected to {steps} steps per epoch; evaluation timed whole", "passes": {}}
    for name, backbone in (("head", False), ("full", True)):
        first, second = pipe.train_epoch(backbone, n1)[0], pipe.train_epoch(backbone, n2)[0]
        out["passes"][name] = br.baseline_epoch(first, n1, second, n2, steps)
        atomic_write_text(work / "baseline.json", json.dumps(out))
    seconds, images = pipe.eval_epoch()
    out["passes"]["eval"] = {"epoch_s": seconds, "images": images, "fixed_s": None,
                             "per_step_s": seconds / -(-images // cfg.train.test_batch_size)}
    atomic_write_text(work / "baseline.json", json.dumps(out))


def check_worker(args, work: Path) -> None:
    import torch

    from fastcifar.bench.cudacheck import run_checks

    def save(results: dict) -> None:
        atomic_write_text(work / "check.json", json.dumps(results, default=str))
        save_backend(work, "check")

    run_checks(torch.device(args.device), args.model, save=save)


def save_backend(work: Path, part: str) -> None:
    """The backend flags in force in this worker (fastcifar.backend.setup_backend set them), for the report."""
    from fastcifar.backend import backend_flags

    atomic_write_text(work / f"backend-{part}.json", json.dumps(backend_flags()))


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


def pytest_part(files: list[str], args, work: Path, cap: float, name: str, bench: bool) -> dict:
    rows = work / f"{name}-rows.jsonl"
    env = dict(child_env(args, work), FASTCIFAR_BENCH_ROWS=str(rows), FASTCIFAR_BENCH_ORDER="eager-first")
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    cmd += ["--benchmark-only", "-m", "not extended", "--benchmark-columns=median,rounds"] if bench else ["-x"]
    res = run_part(cmd, cap, work / f"{name}.log", env)
    if res["rc"] == 5:  # pytest: nothing selected
        res.update(status="ok", why="nothing selected")
    found, outcomes = br.read_rows(rows)
    failed = [o["nodeid"].split("::")[-1] for o in outcomes if o["outcome"] == "failed"]
    if failed:
        res["why"] = f"failed: {', '.join(failed)[:300]}"
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error|deselected).*?) in [\d.]+s",
                         (work / f"{name}.log").read_text(errors="replace"), re.MULTILINE)
    res["summary"] = summary[-1] if summary else None  # pytest's closing line
    return {"part": res, "rows": found}


def worker_part(name: str, argv: list[str], args, work: Path, cap: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", name, "--work", str(work)]
    return {"part": run_part(cmd, cap, work / f"{name}.log", child_env(args, work))}


def run_one(part: Part, args, argv: list[str], work: Path, cap: float) -> dict:
    if part.name in ("check", "schedule", "baseline"):
        return worker_part(part.name, argv, args, work, cap)
    if part.name == "steps":
        return pytest_part(["benchmarks/test_bench_train.py"], args, work, cap, "steps", bench=True)
    if part.name == "components":  # kornia is only a reference point; the GPU machine has none
        extra = [] if importlib.util.find_spec("kornia") else ["-k", "not kornia"]
        return pytest_part(["benchmarks/test_bench_loss.py", "benchmarks/test_bench_augment.py", *extra],
                           args, work, cap, "components", bench=True)
    return pytest_part(["tests/test_masked_ce.py", "tests/test_augment.py"], args, work, cap, "tests", bench=False)


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
        workers = {"check": check_worker, "schedule": schedule_worker, "baseline": baseline_worker}
        workers[args.part](args, Path(args.work))
        return 0
    deadline = time.monotonic() + args.budget
    work = Path(tempfile.mkdtemp(prefix="fastcifar-gpu-report-"))
    result = environment(args, argv, work)
    result.update(parts={}, notes=[], compile_seconds={}, schedule_seconds=None, schedule_projected=None,
                  baseline_seconds=None, speedup_vs_baseline=None, step_ms={}, launches_per_step={},
                  peak_memory_gib={}, paper_phases=_paper_phases(args))
    skipped = set(filter(None, args.skip.split(",")))
    no_gpu = args.device == "cuda" and not result["cuda_available"]
    if no_gpu:
        why = f"torch sees no CUDA GPU ({result['probe_error'] or 'torch.cuda.is_available() is False'})"
        print(f"error: {why}; --device cpu runs a miniature that only checks this script", file=sys.stderr)
        skipped, result["notes"] = {q.name for q in PLAN}, [why]
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
        why = "no CUDA GPU" if no_gpu else "--skip" if q.name in skipped else "interrupted"
        result["parts"][q.name] = result["parts"].pop(q.name, {"status": "skipped", "why": why})
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
    from fastcifar.schedule import build_schedule

    s = build_schedule(report_config(args, truncated=False))
    return [s.phase(e).name for e in range(s.epochs)]


def _write(result: dict, out_dir: Path, work: Path) -> list[Path]:
    result["goals"] = br.goals(result)
    logs = {p.stem: p.read_text(errors="replace") for p in sorted(work.glob("*.log"))}
    return br.write_report(result, out_dir, logs)


if __name__ == "__main__":
    sys.exit(main())
