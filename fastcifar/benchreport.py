"""The GPU report's contents: what scripts/gpu_report.py's parts left, the goals, JSON and markdown.

A result set is a plain dict (see `collect` in scripts/gpu_report.py): environment facts,
"parts" (status, seconds, cap per part), "setup", "schedule" (from `summarise_schedule`),
"baseline" (fastcifar.baseline.PhaseTimes.as_dict plus schedule_s_projected), "ratios",
"benchmarks" (rows from `read_benchmarks`), "notes", "failed" and "goals".
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write_text

GOAL_EPOCHS = 100  # the goals are stated for the paper's whole schedule

GOALS = (  # (key, what, target, higher is better)
    ("schedule_s", "100-epoch schedule, wall seconds (compile included)", 90.0, False),
    ("finetune_ms", "fine-tune step at batch 100, ms (best variant)", 2.0, False),
    ("frozen_ips", "frozen phase, images/s (head step at batch 100, best variant)", 150_000.0, True),
    ("eval_ips", "evaluation, images/s (batch 500, best variant)", 150_000.0, True),
    ("speedup", "speedup over the paper-equivalent baseline (projected schedule / ours measured)", 30.0, True),
)


def summarise_schedule(records: list[dict], planned: list[str], summary: dict) -> dict:
    """Epoch records (metrics.jsonl) -> schedule seconds, per-phase median epochs, accuracies.

    `planned`: the phase name of every epoch of the schedule. schedule_seconds_steady sums each
    planned epoch's phase median, so the first epochs of a phase (compilation) do not count;
    it is a projection when the run stopped early.
    """
    by_phase: dict[str, list[float]] = {}
    for r in records:
        by_phase.setdefault(r["phase"], []).append(float(r["seconds"]))
    medians = {k: sorted(v)[(len(v) - 1) // 2] for k, v in by_phase.items()}  # lower: a compile epoch of 2 is out
    measured = sum(float(r["seconds"]) for r in records)
    complete = len(records) == len(planned)
    steady = sum(medians[p] for p in planned) if all(p in medians for p in planned) else None
    return {
        "epochs": len(planned), "epochs_done": len(records), "complete": complete,
        "schedule_seconds": measured if complete else None, "seconds_so_far": measured,
        "schedule_seconds_steady": steady,
        "compile_seconds_est": measured - steady if complete and steady is not None else None,
        "phase_epoch_seconds": medians, "phase_epochs": {k: len(v) for k, v in by_phase.items()},
        "last_val_acc": records[-1].get("val_acc") if records else None,
        **{k: summary.get(k) for k in ("best_acc", "best_acc_tta", "final_acc", "final_acc_tta", "total_seconds")},
    }


def speedups(schedule: dict | None, paper: dict | None) -> dict:
    """Paper-equivalent seconds / ours, per schedule epoch (train + eval) and for the whole schedule."""
    if not schedule or not paper:
        return {}
    ours, out = schedule["phase_epoch_seconds"], {}
    if ours.get("head"):
        out["head_epoch"] = (paper["head"] + paper["eval"]) / ours["head"]
    full = ours.get("full") or ours.get("full+filter")
    if full:
        out["full_epoch"] = (paper["full"] + paper["eval"]) / full
    for key, field in (("schedule", "schedule_seconds"), ("schedule_steady", "schedule_seconds_steady")):
        ours_s = schedule[field]
        if ours_s:
            out[key] = paper["schedule_s_projected"] / ours_s
    return out


def read_benchmarks(work: Path) -> list[dict]:
    """One row per benchmark: its file, name, median round seconds and scalar extra_info."""
    rows = []
    for path in sorted(work.glob("bench-*.json")):
        for b in json.loads(path.read_text()).get("benchmarks", []):
            info = {k: v for k, v in b.get("extra_info", {}).items()
                    if v is None or isinstance(v, (int, float, str, bool))}
            rows.append({"file": path.stem[len("bench-"):], "name": b["name"], "median_s": b["stats"]["median"],
                         **info})
    return rows


def goals(result: dict) -> list[dict]:
    train = [r for r in result["benchmarks"] if r["file"] == "test_bench_train" and r["name"].startswith("test_step")]

    def best(phase: str, batch: int, key: str, pick):
        vals = [(r[key], r["name"]) for r in train if r.get("phase") == phase and r.get("batch") == batch
                and r.get(key) is not None]
        return pick(vals) if vals else (None, None)

    sched = result.get("schedule") or {}
    if sched.get("epochs", GOAL_EPOCHS) != GOAL_EPOCHS:  # a shortened run says nothing about these goals
        sched = {}
    found = {"schedule_s": (sched.get("schedule_seconds"), "timed schedule"),
             "finetune_ms": best("full", 100, "ms_per_step", min), "frozen_ips": best("head", 100, "images_per_s", max),
             "eval_ips": best("eval", 500, "images_per_s", max),
             "speedup": ((result.get("ratios") or {}).get("schedule") if sched else None, "baseline / timed schedule")}
    out = []
    for key, what, target, higher in GOALS:
        value, source = found[key]
        met = None if value is None else (value >= target if higher else value <= target)
        out.append({"key": key, "goal": what, "target": target, "value": value, "met": met, "source": source})
    return out


# ---- the report ----


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return str(v)


def _pct(v) -> str:
    return "–" if v is None else f"{v:.1%}"


def render_markdown(r: dict) -> str:
    sched, paper, ratio = r.get("schedule") or {}, r.get("baseline") or {}, r.get("ratios") or {}
    setup = r.get("setup") or {}
    ours = sched.get("phase_epoch_seconds", {})
    lines = [f"# fastcifar GPU report: {r['device']}, {r['date']}", "",
             f"torch {r.get('torch')} (CUDA {r.get('cuda')}), triton {r.get('triton')}, timm {r.get('timm')}; "
             f"commit `{r.get('commit')}`.",
             f"Schedule: {r.get('model')} randomly initialised, {setup.get('data', 'synthetic data')}; "
             f"loader: {setup.get('loader_note', setup.get('loader', '–'))}.", "",
             "## Goals", "", "| goal | measured | target | met |", "|---|---:|---:|:-:|"]
    for g in r["goals"]:
        mark = {True: "yes", False: "no", None: "–"}[g["met"]]
        lines.append(f"| {g['goal']} | {_fmt(g['value'])} | {_fmt(g['target'])} | {mark} |")
    paper_epoch = {k: paper[k] + paper["eval"] for k in ("head", "full")} if paper else {}
    lines += ["", "## Ours vs the paper-equivalent pipeline (seconds, one epoch = train + evaluation)", "",
              "| | ours | paper pipeline | speedup |", "|---|---:|---:|---:|",
              f"| head-only epoch | {_fmt(ours.get('head'))} | {_fmt(paper_epoch.get('head'))} | "
              f"{_fmt(ratio.get('head_epoch'))} |",
              f"| full fine-tune epoch | {_fmt(ours.get('full') or ours.get('full+filter'))} | "
              f"{_fmt(paper_epoch.get('full'))} | {_fmt(ratio.get('full_epoch'))} |",
              f"| evaluation pass | – | {_fmt(paper.get('eval'))} | |",
              f"| {sched.get('epochs', '–')}-epoch schedule | {_fmt(sched.get('schedule_seconds'))} measured, "
              f"{_fmt(sched.get('schedule_seconds_steady'))} without compilation | "
              f"{_fmt(paper.get('schedule_s_projected'))} projected | {_fmt(ratio.get('schedule'))} |"]
    if paper.get("note"):
        lines.append(f"\nPaper pipeline: {paper['note']}.")
    if sched:
        lines.append(f"\nOurs: {sched['epochs_done']} of {sched['epochs']} epochs run; compilation about "
                     f"{_fmt(sched.get('compile_seconds_est'))} s; synthetic test accuracy best "
                     f"{_pct(sched.get('best_acc'))}, "
                     f"with flip TTA {_pct(sched.get('best_acc_tta'))}.")
    lines += ["", "## Benchmarks", "", "| benchmark | images/s | ms/step | TFLOP/s | MFU | param floor ms | GB/s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for b in r["benchmarks"]:
        ms = b.get("ms_per_step", b["us_per_call"] / 1e3 if b.get("us_per_call") is not None else None)
        lines.append(f"| {b['file'].removeprefix('test_bench_')}::{b['name']} | {_fmt(b.get('images_per_s'))} | "
                     f"{_fmt(ms)} | {_fmt(b.get('tflops_per_s'))} | {_pct(b.get('mfu'))} | "
                     f"{_fmt(b.get('param_floor_ms'))} | {_fmt(b.get('GBps'))} |")
    lines += ["", "## Parts", "", "| part | status | seconds | cap (s) |", "|---|---|---:|---:|"]
    for name, p in r["parts"].items():
        status = p.get("summary") or p["status"]
        lines.append(f"| {name} | {status} | {_fmt(p.get('seconds'))} | {_fmt(p.get('cap_s'))} |")
    lines += [f"\n{n}" for n in r.get("notes", [])]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """<out_dir>/<gpu-slug>-<date>.json and .md, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{result['gpu_slug']}-{result['date']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    atomic_write_text(json_path, json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(md_path, render_markdown(result))
    return json_path, md_path
