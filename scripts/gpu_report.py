#!/usr/bin/env python
"""One command for a CUDA machine: the CUDA tests, the benchmarks, a timed 100-epoch paper schedule
and the paper-equivalent baseline, written to benchmarks/results/<gpu>-<date>.json and .md.

No internet and no dataset needed: the schedule trains a randomly initialised ConvNeXt-Base on
synthetic CIFAR-shaped data (50,000 train / 10,000 test 32x32 images, 100 classes, 40% noisy
labels). Each part runs in its own process group under a wall-clock cap inside --budget; the
report holds whatever was measured, and says which part failed or ran out of time.
Order: tests, schedule, baseline, benchmarks (the benchmarks get the time that is left).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "schedule", "baseline", "bench")
CAP_S = {"tests": 120, "schedule": 300, "baseline": 90}  # per part; "bench" gets the rest
MIN_S = {"tests": 30, "schedule": 120, "baseline": 45, "bench": 60}  # kept free for a later part
REPORT_S = 10  # kept free at the end for collecting and writing
TRAIN_RESERVE_S = 150  # for the model-step benchmarks, the last and slowest file (compilation)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-tests", action="store_true", help="do not run the CUDA test suite")
    p.add_argument("--skip-bench", action="store_true", help="do not run the benchmarks")
    p.add_argument("--skip-baseline", action="store_true", help="do not time the paper-equivalent pipeline")
    p.add_argument("--tests-cap", type=float, default=CAP_S["tests"], metavar="SECONDS",
                   help="wall-clock cap for the test suite (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=100, help="epochs of the timed schedule (default: %(default)s)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"),
                   help="where <gpu>-<date>.json and .md go (default: benchmarks/results)")
    p.add_argument("--budget", type=float, default=570.0, help="seconds for everything (default: %(default)s)")
    p.add_argument("--loader", choices=("auto", "ffcv", "memory"), default="auto",
                   help="auto: ffcv over .beton files written from the synthetic data when ffcv imports, "
                        "else the memory loader (default: %(default)s)")
    p.add_argument("--model", default="convnext_base", help="timm model, randomly initialised (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=50_000, help="synthetic training images (default: %(default)s)")
    p.add_argument("--test-size", type=int, default=10_000, help="synthetic test images (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.4, help="share of flipped training labels (default: %(default)s)")
    p.add_argument("--baseline-steps", type=int, default=None, metavar="N",
                   help="time only N batches of each baseline pass and scale up (default: whole passes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the schedule and the baseline, e.g. train.batch_size=128")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu only for a miniature check of this script (default: %(default)s)")
    p.add_argument("--part", choices=("schedule", "baseline"), help=argparse.SUPPRESS)  # worker processes
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- worker processes ----


def report_config(args):
    from fastcifar.config import build_config, parse_overrides

    # Checkpoints once, at the end: the timing is of training, not of the disk.
    overrides = {"model.name": args.model, "model.pretrained": "false", "train.epochs": str(args.epochs),
                 "run.device": args.device, "run.checkpoint_every": str(args.epochs), "data.backend": "memory",
                 "data.dir": "(synthetic, in memory)"}
    overrides.update(parse_overrides(args.set))
    return build_config("paper", overrides)


def prepare_data(args, cfg, work: Path):
    """(cfg, make_loaders or None, setup facts): ffcv over .beton files, or the memory loader."""
    import dataclasses

    from fastcifar.synthetic import make_dataset, save_npz, split_loaders

    train, test = make_dataset(args.train_size, args.test_size, num_classes=cfg.model.num_classes, noise=args.noise)
    setup = {"data": f"synthetic CIFAR-shaped: {args.train_size} train / {args.test_size} test images, "
                     f"{cfg.model.num_classes} classes, {args.noise:.0%} noisy training labels"}
    note = "memory loader (asked for)"
    if args.loader != "memory":
        try:
            from fastcifar.data import keep_torch_threads

            with keep_torch_threads():
                import ffcv  # noqa: F401
        except (ImportError, OSError) as e:  # not installed, or a system library missing
            note = f"ffcv is not usable here ({e}): fell back to the memory loader"
        else:
            out = work / "beton"
            cmd = [sys.executable, str(ROOT / "scripts" / "write_beton.py"), "--source",
                   f"npz:{save_npz(work / 'synthetic.npz', train, test)}", "--out-dir", str(out),
                   "--num-classes", str(cfg.model.num_classes), "--quiet"]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode == 0:
                data = dataclasses.replace(cfg.data, dir=str(out), backend="ffcv")
                setup.update(loader="ffcv", loader_note="ffcv over .beton files written from the synthetic data")
                return dataclasses.replace(cfg, data=data), None, setup
            note = f"writing the .beton files failed ({done.stderr.strip()[-300:]}): fell back to the memory loader"
        if args.loader == "ffcv":
            raise SystemExit(f"--loader ffcv: {note}")
    setup.update(loader="memory", loader_note=note)
    return cfg, (lambda device, dist: split_loaders(train, test, cfg, device, dist)), setup


def schedule_worker(args, work: Path) -> None:
    from fastcifar.rundir import prepare_run_dir
    from fastcifar.train import run_training

    cfg, make_loaders, setup = prepare_data(args, report_config(args), work)
    (work / "schedule_setup.json").write_text(json.dumps(setup))
    run_dir = prepare_run_dir(cfg, str(work / "run"), "paper")
    run_training(cfg, run_dir, make_loaders=make_loaders)


def baseline_worker(args, work: Path) -> None:
    import torch

    from fastcifar.baseline import project_schedule, time_paper
    from fastcifar.schedule import build_schedule
    from fastcifar.synthetic import make_dataset

    cfg = report_config(args)
    train, test = make_dataset(args.train_size, args.test_size, num_classes=cfg.model.num_classes, noise=args.noise)
    times = time_paper(train.images, train.labels, test.images, test.labels, cfg, torch.device(args.device),
                       max_steps=args.baseline_steps)
    out = times.as_dict() | {"schedule_s_projected": project_schedule(times, build_schedule(cfg))}
    (work / "baseline.json").write_text(json.dumps(out))


# ---- running parts ----


def run_part(cmd: list[str], timeout: float, log_path: Path) -> dict:
    """Run `cmd` in its own process group, echoing and logging its output; kill the group at `timeout`."""
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
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
        finally:  # also on Ctrl-C: the part runs in its own session, so end it here
            timer.cancel()
            if proc.poll() is None:
                kill()
    status = "timed out" if fired.is_set() else "ok" if rc == 0 else f"failed (exit {rc})"
    return {"status": status, "seconds": round(time.monotonic() - t0, 1), "cap_s": round(timeout), "tail": tail}


def tests_part(args, work: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "tests", "-x", "-q", "-p", "no:cacheprovider"]
    res = run_part(cmd, timeout, work / "tests.log")
    summary = [line for line in res["tail"] if re.search(r"\d+ (passed|failed|error)", line)]
    res["summary"] = summary[-1].strip("= ") if summary else None
    if res["status"] == "timed out":  # say how far it got: pytest -q's progress lines
        progress = re.findall(r"^([.sxXFE]+)\s*(?:\[\s*\d+%\])?\s*$", (work / "tests.log").read_text(), re.MULTILINE)
        res["summary"] = f"timed out ({sum(marks.count('.') for marks in progress)} tests passed before)"
    return res


def worker_part(name: str, argv: list[str], work: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", name, "--work", str(work)]
    return run_part(cmd, timeout, work / f"{name}.log")


def bench_part(args, work: Path, deadline: float) -> dict:
    """Each benchmark file in its own pytest run (a timeout loses one file's JSON, not all).

    The model-step benchmarks (test_bench_train.py) go last; the files before them leave them
    TRAIN_RESERVE_S where they can.
    """
    files = sorted((ROOT / "benchmarks").glob("test_bench_*.py"),
                   key=lambda p: (p.name == "test_bench_train.py", p.name))
    runs, t0 = {}, time.monotonic()
    for path in files:
        left = deadline - time.monotonic() - REPORT_S
        cap = left if path.name == "test_bench_train.py" else max(30.0, left - TRAIN_RESERVE_S)
        if left < 20:
            runs[path.stem] = {"status": "skipped: no time left in --budget"}
            continue
        cmd = [sys.executable, "-m", "pytest", str(path), "--benchmark-only", "-m", "not extended", "-q",
               "-p", "no:cacheprovider", f"--benchmark-json={work / f'bench-{path.stem}.json'}"]
        res = run_part(cmd, min(cap, left), work / f"bench-{path.stem}.log")
        if res["status"] == "failed (exit 5)":  # pytest: nothing selected (every case is `extended`)
            res["status"] = "ok (nothing selected)"
        if res["status"].startswith("ok"):
            res.pop("tail")
        runs[path.stem] = res
    bad = [k for k, r in runs.items() if not r["status"].startswith("ok")]
    return {"status": "ok" if not bad else f"problems in {', '.join(bad)}", "files": runs,
            "seconds": round(time.monotonic() - t0, 1)}


def cap_for(name: str, deadline: float) -> float:
    later = PARTS[PARTS.index(name) + 1:]
    left = deadline - time.monotonic() - REPORT_S - sum(MIN_S[p] for p in later)
    return min(CAP_S.get(name, left), left)


# ---- reading what the parts left ----


def read_schedule(args, work: Path) -> dict | None:
    from fastcifar.benchreport import summarise_schedule
    from fastcifar.report import MetricsLog
    from fastcifar.schedule import build_schedule

    run = work / "run"
    if not (run / "metrics.jsonl").is_file():
        return None
    schedule = build_schedule(report_config(args))
    planned = [schedule.phase(e).name for e in range(schedule.epochs)]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return summarise_schedule(MetricsLog(run).read(), planned, summary)


def collect(args, work: Path, parts: dict) -> dict:
    """Everything measured, each piece read on its own so that one broken part spoils nothing else."""
    from fastcifar.benchreport import read_benchmarks, speedups

    out: dict = {"parts": {k: {kk: vv for kk, vv in v.items() if kk != "tail" or not str(v["status"]).startswith("ok")}
                           for k, v in parts.items()}, "notes": []}
    readers = {"setup": lambda: json.loads((work / "schedule_setup.json").read_text()),
               "schedule": lambda: read_schedule(args, work),
               "baseline": lambda: json.loads((work / "baseline.json").read_text()),
               "benchmarks": lambda: read_benchmarks(work)}
    for key, read in readers.items():
        try:
            out[key] = read()
        except Exception as e:  # noqa: BLE001 (a report with a note beats no report)
            out[key] = [] if key == "benchmarks" else None
            if not isinstance(e, FileNotFoundError):
                out["notes"].append(f"could not read {key}: {type(e).__name__}: {e}")
    out["ratios"] = speedups(out["schedule"], out["baseline"])
    out["schedule_seconds"] = (out["schedule"] or {}).get("schedule_seconds")
    out["failed"] = [k for k, v in parts.items() if not str(v["status"]).startswith(("ok", "skipped"))]
    return out


def gpu_name() -> str:
    """The GPU's name, asked of a child process: a CUDA context in this long-lived parent would hold
    memory all along and, in exclusive-process compute mode, lock the workers out of the GPU."""
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown CUDA device"


def environment(args, argv: list[str]) -> dict:
    import platform
    from importlib import metadata

    import torch

    from fastcifar.checkpoint import git_commit

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    name = gpu_name() if args.device == "cuda" else "cpu"
    return {"device": name, "gpu_slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": version("triton"), "timm": version("timm"), "ffcv": version("ffcv"),
            "python": platform.python_version(), "commit": git_commit(), "model": args.model,
            "epochs": args.epochs, "budget_s": args.budget, "argv": argv}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.part:
        (schedule_worker if args.part == "schedule" else baseline_worker)(args, Path(args.work))
        return 0
    try:
        import fastcifar.kernels  # noqa: F401  (kernels/ becomes fastcifar.kernels only when installed)
    except ImportError as e:
        print(f"error: fastcifar is not installed ({e}); run `make gpu-report`, or `pip install -e .` first",
              file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; this report measures one (--device cpu runs a miniature, "
              "only to check the script)", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget
    work = Path(tempfile.mkdtemp(prefix="fastcifar-gpu-report-"))
    result = environment(args, argv)
    skip = {"tests": args.skip_tests, "bench": args.skip_bench, "baseline": args.skip_baseline}
    parts: dict = {}
    try:
        for name in PARTS:
            cap = min(cap_for(name, deadline), args.tests_cap) if name == "tests" else cap_for(name, deadline)
            if skip.get(name):
                parts[name] = {"status": f"skipped (--skip-{name})"}
            elif name != "bench" and cap < 5:
                parts[name] = {"status": "skipped: no time left in --budget"}
            else:
                print(f"\n== {name} (cap {cap:.0f} s) ==", flush=True)
                parts[name] = (tests_part(args, work, cap) if name == "tests" else
                               bench_part(args, work, deadline) if name == "bench" else
                               worker_part(name, argv, work, cap))
    except KeyboardInterrupt:
        parts.update({n: {"status": "interrupted"} for n in PARTS if n not in parts})
    from fastcifar.benchreport import goals, write_report

    result.update(collect(args, work, parts))
    result["goals"] = goals(result)
    json_path, md_path = write_report(result, Path(args.out_dir))
    print(f"\nwrote {json_path} and {md_path} (work files in {work})")
    if result["failed"]:
        print(f"parts that did not finish cleanly: {', '.join(result['failed'])}", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
