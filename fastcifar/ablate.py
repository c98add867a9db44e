"""`python -m fastcifar.ablate`: the paper's ablations (backbone, filtering off, TTA off), or any
named variants (other selectors), in one table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report
from .cli import USER_ERRORS
from .config import PRESETS, ConfigError, build_config, parse_overrides
from .io import atomic_write_text
from .rundir import choose_run_dir
from .train import run_training

COLUMNS = ["variant", "backbone", "filtering", "best_acc", "best_acc_tta", "final_acc", "final_acc_tta",
           "kept_fraction", "noisy_f1", "total_seconds"]
PAPER_VARIANTS = "configured,backbone,no-filter"


def variants(backbone: str) -> dict[str, dict[str, str]]:
    """Overrides per variant name. TTA on/off is read from every run's summary, so it needs no run;
    "configured" is the configuration as given (the `paper` preset: the paper's method)."""
    quantile = {"filter.selector": "class_quantile"}
    return {"configured": {}, "backbone": {"model.name": backbone}, "no-filter": {"filter.enabled": "false"},
            "threshold": {"filter.selector": "threshold", "filter.keep_fraction": "0"},
            "class_quantile": {**quantile, "filter.keep_fraction": "0.6"},
            "estimated": {**quantile, "filter.keep_fraction": "0"},
            "gmm": {"filter.selector": "gmm", "filter.keep_fraction": "0"}}


def last_epoch_of(summary: dict, run_dir: Path) -> dict:
    """The summary with the last epoch's kept share and noise detection (metrics.jsonl) beside it."""
    last = report.MetricsLog(run_dir).read()[-1]
    return {**summary, "kept_fraction": last.get("kept_fraction"), "noisy_f1": last.get("noisy_f1")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcifar.ablate", description=__doc__)
    p.add_argument("--config", default="paper", help=f"a preset ({', '.join(PRESETS)}) or a YAML file")
    p.add_argument("--data-dir", help="folder with train.beton, test.beton, meta.json")
    p.add_argument("--out", default="runs/ablations", help="folder for the variants' runs and the table")
    p.add_argument("--backbone", default="resnext50_32x4d", help="the other backbone (timm name)")
    p.add_argument("--variants", default=PAPER_VARIANTS,
                   help=f"comma-separated, of: {', '.join(variants(''))} (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every variant")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    out, rows = Path(args.out), []
    try:
        base = parse_overrides(args.overrides)
        if args.data_dir:
            base["data.dir"] = args.data_dir
        known, names = variants(args.backbone), args.variants.split(",")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown variants {unknown}; known: {', '.join(known)}")
        for name in names:
            cfg = build_config(args.config, {**base, **known[name]})
            print(f"== ablation {name}: {known[name] or 'as configured'}", flush=True)
            # created by run_training once data and model have opened: a failed start leaves nothing
            run_dir = choose_run_dir(cfg, str(out / name), args.config)
            summary = {**last_epoch_of(run_training(cfg, run_dir), run_dir)}
            rows.append({"variant": name, "backbone": cfg.model.name,
                         "filtering": cfg.filter.selector if cfg.filter.enabled else "off",
                         **{k: summary.get(k) for k in COLUMNS[3:]}})
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = report.format_table(rows, COLUMNS)
    atomic_write_text(out / "ablations.json", json.dumps(rows, indent=2))
    atomic_write_text(out / "ablations.md", "Accuracy is top-1 on the test split; *_tta with flip TTA; kept_fraction "
                      "and noisy_f1 (dropped samples as detections of wrong labels) of the last epoch.\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
