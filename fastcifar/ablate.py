"""`python -m fastcifar.ablate`: the paper's three ablations (backbone, filtering off, TTA off) in one table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report
from .cli import USER_ERRORS
from .config import PRESETS, build_config, parse_overrides
from .io import atomic_write_text
from .rundir import choose_run_dir
from .train import run_training

COLUMNS = ["variant", "backbone", "filtering", "best_acc", "best_acc_tta", "final_acc", "final_acc_tta",
           "total_seconds"]


def variants(backbone: str) -> list[tuple[str, dict[str, str]]]:
    """(name, overrides) per run; TTA on/off is read from every run's summary, so it needs no run."""
    return [("paper", {}), ("backbone", {"model.name": backbone}), ("no-filter", {"filter.enabled": "false"})]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcifar.ablate", description=__doc__)
    p.add_argument("--config", default="paper", help=f"a preset ({', '.join(PRESETS)}) or a YAML file")
    p.add_argument("--data-dir", help="folder with train.beton, test.beton, meta.json")
    p.add_argument("--out", default="runs/ablations", help="folder for the three runs and the table")
    p.add_argument("--backbone", default="resnext50_32x4d", help="the other backbone (timm name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every variant")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    out, rows = Path(args.out), []
    try:
        base = parse_overrides(args.overrides)
        if args.data_dir:
            base["data.dir"] = args.data_dir
        for name, extra in variants(args.backbone):
            cfg = build_config(args.config, {**base, **extra})
            print(f"== ablation {name}: {extra or 'as configured'}", flush=True)
            # created by run_training once data and model have opened: a failed start leaves nothing
            summary = run_training(cfg, choose_run_dir(cfg, str(out / name), args.config))
            rows.append({"variant": name, "backbone": cfg.model.name, "filtering": cfg.filter.enabled,
                         **{k: summary.get(k) for k in COLUMNS[3:]}})
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = report.format_table(rows, COLUMNS)
    atomic_write_text(out / "ablations.json", json.dumps(rows, indent=2))
    atomic_write_text(out / "ablations.md", "Accuracy is top-1 on the test split; *_tta with flip TTA.\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
