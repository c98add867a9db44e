#!/usr/bin/env python
"""The sample-selection study: every selector on the digits with 40% noise, three settings, several seeds.

Settings (presets `demo` and `smoke`, on scikit-learn's digits with 40% symmetric or pair-flip noise):
  frozen   the pretrained EfficientNet-Lite0 of `demo`, its backbone frozen throughout (head only,
           24 epochs at lr 0.05, selection from epoch 8)
  full     `demo` as it is: freeze -> unfreeze -> select -> flip TTA (12 epochs)
  scratch  `smoke`: a tiny ConvNeXt from random initialisation
  frozen12 `demo`'s 12 epochs with the backbone never unfrozen (a head that has not fitted yet)
  frozen_epoch  frozen, with filter.mode=epoch (exact thresholds from a scoring pass every epoch)
Selectors: none (filter.enabled=false), threshold (the paper's), class_quantile (keep 60% per
class), gmm, estimated (class_quantile keeping 1 - the estimated noise rate per class).
Each run is `python -m fastcifar.train` in its own process; a finished run (summary.json) is not
run again, so the study can be stopped and continued. The results (mean and standard deviation
over seeds) go to OUT/selection-study.json and .md, and with --results also to that folder.

  python scripts/selection_study.py --out runs/study --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# frozen: a head trained long enough to fit (24 epochs at a head-sized lr); frozen12: the demo's own
# 12 epochs at its lr with the backbone never unfrozen (an underfit head: what selection costs there).
FROZEN = ["train.epochs=24", "train.freeze_epochs=24", "optim.lr=0.05", "filter.start_epoch=8"]
SETTINGS = {"frozen": ("demo", FROZEN), "full": ("demo", []), "scratch": ("smoke", []),
            "frozen12": ("demo", ["train.freeze_epochs=12"]),
            "frozen_epoch": ("demo", [*FROZEN, "filter.mode=epoch"])}
SELECTORS = {"none": ["filter.enabled=false"], "threshold": ["filter.selector=threshold", "filter.keep_fraction=0"],
             "class_quantile": ["filter.selector=class_quantile", "filter.keep_fraction=0.6"],
             "gmm": ["filter.selector=gmm", "filter.keep_fraction=0"],
             "estimated": ["filter.selector=class_quantile", "filter.keep_fraction=0"]}
METRICS = ("best_acc", "best_acc_tta", "final_acc", "final_acc_tta", "noisy_precision", "noisy_recall", "noisy_f1",
           "kept_fraction", "min_kept_fraction", "noise_rate_est", "ours_p@100", "ours_p@true",
           "cleanlab_p@100", "cleanlab_p@true", "seconds")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the data, the runs and the tables")
    p.add_argument("--results", help="also write the tables here (e.g. benchmarks/results)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: %(default)s")
    p.add_argument("--selectors", default=",".join(SELECTORS), help="comma-separated: %(default)s")
    p.add_argument("--kinds", default="symmetric,pairflip", help="noise kinds: %(default)s")
    p.add_argument("--seeds", default="0,1,2", help="run.seed values: %(default)s")
    p.add_argument("--noise", type=float, default=0.4, help="share of wrong labels (default: %(default)s)")
    return p.parse_args(argv)


def write_data(out: Path, kind: str, noise: float) -> Path:
    from fastcifar.beton import write_digits_betons

    folder = out / f"digits-{kind}-{noise:g}"
    write_digits_betons(folder, noise=noise, kind=kind)
    return folder


def run_one(data: Path, run_dir: Path, setting: str, selector: str, seed: int) -> None:
    preset, extra = SETTINGS[setting]
    cmd = [sys.executable, "-m", "fastcifar.train", "--config", preset, "--data-dir", str(data), "--out",
           str(run_dir), "run.device=cpu", f"run.seed={seed}", *extra, *SELECTORS[selector]]
    if run_dir.exists():  # a run the study was stopped in: ours, unfinished, started again
        shutil.rmtree(run_dir)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (run_dir.parent / f"{run_dir.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{run_dir}: exit {done.returncode}\n{done.stderr[-2000:]}")


def measure(run_dir: Path) -> dict:
    """One run's numbers: its summary, its last epoch, the smallest kept share, label-issue precision."""
    from fastcifar.labelcheck import compare

    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last, filtered = records[-1], [r for r in records if r.get("threshold") is not None]
    out = {k: summary.get(k) for k in ("best_acc", "best_acc_tta", "final_acc", "final_acc_tta")}
    out.update({k: last.get(k) for k in ("noisy_precision", "noisy_recall", "noisy_f1", "kept_fraction",
                                         "noise_rate_est")})
    out["min_kept_fraction"] = min((r["kept_fraction"] for r in filtered), default=None)
    out["seconds"] = summary.get("total_seconds")
    try:
        out.update(compare(run_dir))
    except ImportError:  # cleanlab missing: our ranking alone
        out.update(compare(run_dir, with_cleanlab=False))
    return out


def mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def table(rows: list[dict], kind: str) -> str:
    cols = ("best_acc", "best_acc_tta", "final_acc", "noisy_precision", "noisy_recall", "noisy_f1",
            "min_kept_fraction", "noise_rate_est", "ours_p@true", "cleanlab_p@true")
    pct = lambda m, s: "–" if m is None else f"{100 * m:.1f} ± {100 * s:.1f}"  # noqa: E731
    lines = [f"### {kind} noise", "", "| setting | selector | " + " | ".join(cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for r in (r for r in rows if r["kind"] == kind):
        lines.append(f"| {r['setting']} | {r['selector']} | " + " | ".join(pct(*r[c]) for c in cols) + " |")
    return "\n".join(lines)


LEGEND = """Settings: `full` = the `demo` preset (pretrained EfficientNet-Lite0 at 64 px, freeze -> unfreeze ->
select -> flip TTA, 12 epochs); `scratch` = `smoke` (a tiny ConvNeXt from random initialisation);
`frozen` = `demo` with the backbone frozen throughout (24 epochs, lr 0.05, selection from epoch 8);
`frozen12` = `demo`'s 12 epochs with the backbone never unfrozen; `frozen_epoch` = `frozen` with
`filter.mode=epoch` (thresholds from a scoring pass every epoch instead of the previous epoch's
batch losses). Selectors: `none` = filtering off,
`threshold` = the paper's absolute threshold, `class_quantile` = keep 60% per given label, `gmm` =
per-class 2-component mixture, `estimated` = class_quantile keeping 1 - the estimated noise rate per
label. Accuracy on the clean test split (`_tta`: with flip TTA; `best`: the best epoch, chosen on the
test split as in the paper); detection (precision, recall, F1 of the dropped samples against the
known wrong labels) and the smallest kept share over the filtered epochs are from the last epoch;
`ours_p@true` / `cleanlab_p@true`: precision of the top-k ranked label issues, k = the true number of
wrong labels, ours (suspects.csv) beside cleanlab's self-confidence ranking of the same probabilities."""


def provenance(rows: list[dict]) -> dict:
    """Where and when the study ran: machine, torch, the checkout's commit, total run time."""
    import datetime
    import platform

    import torch

    from fastcifar.checkpoint import git_commit

    return {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "torch": torch.__version__.split("+")[0],
            "commit": git_commit(),
            "date": datetime.date.today().isoformat(),
            "run_seconds": sum(r.get("seconds") or 0 for row in rows for r in row["runs"])}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, t0 = [], time.time()
    for kind in args.kinds.split(","):
        data = write_data(out, kind, args.noise)
        for setting in args.settings.split(","):
            for selector in args.selectors.split(","):
                runs = []
                for seed in seeds:
                    run_dir = out / "runs" / f"{kind}-{setting}-{selector}-s{seed}"
                    if not (run_dir / "summary.json").is_file():
                        print(f"[{time.time() - t0:6.0f} s] {run_dir.name}", flush=True)
                        run_one(data, run_dir, setting, selector, seed)
                    runs.append(measure(run_dir))
                rows.append({"kind": kind, "setting": setting, "selector": selector, "seeds": seeds,
                             **{m: mean_std([r.get(m) for r in runs]) for m in METRICS}, "runs": runs})
    where = provenance(rows)
    result = {"noise": args.noise, **where, "rows": rows,
              "note": "mean, standard deviation over seeds; fractions in [0, 1]"}
    text = (f"# Sample selection on the digits (scikit-learn), {100 * args.noise:g}% label noise\n\n"
            f"Mean ± standard deviation over seeds {seeds}, in percent. Produced by `scripts/selection_study.py` "
            f"on {where['machine']}, torch {where['torch']}, checkout at commit {where['commit']}, {where['date']}; "
            f"{where['run_seconds'] / 60:.0f} min of runs in all.\n\n" + LEGEND + "\n\n"
            + "\n\n".join(table(rows, kind) for kind in args.kinds.split(",")) + "\n")
    from fastcifar.io import atomic_write_text

    for folder in filter(None, (out, args.results and Path(args.results))):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "selection-study.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(folder / "selection-study.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
