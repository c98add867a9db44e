"""The GPU report's contents: GPU detection in a child process, tables from what the parts left,
the schedule projection, the ratios and goals, and the report files (JSON, markdown, log).

Nothing here imports torch: scripts/gpu_report.py's parent process uses this module and must
hold no CUDA context (the parts run in child processes), and the conftests ask `cuda_available`
before torch or triton is imported. The result set is a plain dict; its keys are listed in
scripts/gpu_report.py's docstring; `render_markdown` (fastcifar.bench.reportmd) is a pure function of it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ..io import atomic_write_text
from .reportmd import render_markdown

CUDA_ENV = "FASTCIFAR_CUDA"  # "1" or "0": one child process's answer, inherited by the rest
# Step-benchmark rows record `impl`; the report's modes read better.
MODE_NAMES = {"eager": "eager", "compile": "compiled", "compiled": "compiled", "cudagraphs": "compiled+cudagraphs",
              "graphs": "graphs"}
PAPER_BATCH = {"head": 100, "full": 100, "full+filter": 100, "eval": 500, "tta": 500}  # images per step
FALLBACK_PHASE = {"full+filter": "full", "full": "full+filter", "head+filter": "head"}  # same step cost
LOG_TAIL_BYTES = 200_000  # per part in the log file

GOALS = (  # (issue, key, what, target, higher is better)
    (18, "full_step_ms", "full step at batch 100, graphs mode, ms", 9.0, False),
    (18, "schedule_s", "100-epoch paper schedule, s, compilation included", 600.0, False),
    (18, "speedup", "speedup over the paper-equivalent pipeline, same GPU", 10.0, True),
    (19, "full_step_ms", "full step at batch 100, graphs mode, ms", 3.0, False),
    (19, "head_step_ms", "head step at batch 100, graphs mode, ms (its share of the chunk's backbone pass)", 1.0,
     False),
    (19, "eval_ms", "evaluation of 500 images, graphs mode, ms", 2.0, False),
    (19, "schedule_s", "100-epoch paper schedule, s, compilation included", 150.0, False),
    (19, "speedup_vs_peer", "speedup over the plain timm peer (reduce-overhead), full step", 3.0, True),
)

_PROBE = r"""
import json, platform, sys
out = {"python": platform.python_version()}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda, available=bool(torch.cuda.is_available()))
    if out["available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), count=torch.cuda.device_count())
    if "--details" in sys.argv:
        import fastcifar
        from fastcifar.checkpoint import git_commit
        out.update(commit=git_commit(), fastcifar_path=fastcifar.__file__)
except Exception as e:
    out.update(available=False, error=f"{type(e).__name__}: {e}")
print("FASTCIFAR_PROBE " + json.dumps(out))
"""


def probe_cuda(details: bool = False, env: dict | None = None, timeout: float = 300.0) -> dict:
    """torch's facts from a child Python: {"available", "torch", "cuda", "device", ...}; with
    `details`, also the commit and where fastcifar was imported from. The child's CUDA context
    ends with it: this process never holds one."""
    cmd = [sys.executable, "-c", _PROBE] + (["--details"] if details else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "error": f"the probe did not finish: {e}"}
    for line in done.stdout.splitlines():
        if line.startswith("FASTCIFAR_PROBE "):
            return json.loads(line[len("FASTCIFAR_PROBE "):])
    return {"available": False, "error": (done.stderr.strip() or f"exit {done.returncode}")[-500:]}


def cuda_available() -> bool:
    """torch.cuda.is_available(), asked once of a child process and kept in FASTCIFAR_CUDA for
    child processes (nvidia-smi on PATH says nothing about what torch can use)."""
    if os.environ.get(CUDA_ENV) not in ("0", "1"):
        os.environ[CUDA_ENV] = "1" if probe_cuda().get("available") else "0"
    return os.environ[CUDA_ENV] == "1"


def driver_version(path: str = "/proc/driver/nvidia/version") -> str | None:
    """The NVIDIA kernel driver's version, read from /proc (no CUDA call), or None."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([\d.]+)", text)
    return found.group(1) if found else text.split("\n")[0][:120]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# ---- the schedule ----


def summarise_schedule(records: list[dict], target: list[str], overhead_s: float | None = None) -> dict:
    """metrics.jsonl records of a run -> its seconds and, unless it ran the whole `target`
    schedule (the phase of each of its epochs), the projection to it.

    A phase's steady epoch is the median of its epochs after the first; its compile estimate is
    its first epoch minus that (a phase run once has no estimate and counts whole). The
    projection: every target epoch at its phase's steady seconds (a phase not run takes the
    one of the same step cost, FALLBACK_PHASE), plus the compile estimates, plus `overhead_s`
    (start-up and the final TTA / scoring, once per run).
    """
    by_phase: dict[str, list[float]] = {}
    for r in records:
        by_phase.setdefault(r["phase"], []).append(float(r["seconds"]))
    steady, compile_s, notes = {}, None, []
    for phase, secs in by_phase.items():
        later = sorted(secs[1:])
        steady[phase] = later[(len(later) - 1) // 2] if later else secs[0]
        if later:
            compile_s = (compile_s or 0.0) + max(secs[0] - steady[phase], 0.0)
        else:
            notes.append(f"{phase}: one epoch only, its compilation counted as steady time")
    per_epoch = []
    for phase in target:
        if phase not in steady and FALLBACK_PHASE.get(phase) in steady:
            notes.append(f"{phase} not run: projected at the cost of {FALLBACK_PHASE[phase]}")
        per_epoch.append(steady.get(phase, steady.get(FALLBACK_PHASE.get(phase, ""))))
    measured = sum(sum(v) for v in by_phase.values())
    complete = [r["phase"] for r in records] == target
    extra = (compile_s or 0.0) + (overhead_s or 0.0)
    projected = None if None in per_epoch or not target else sum(per_epoch) + extra
    total = measured + (overhead_s or 0.0) if complete else projected
    return {"epochs_run": len(records), "target_epochs": len(target), "complete": complete,
            "schedule_seconds": total, "schedule_projected": not complete, "measured_seconds": measured,
            "overhead_seconds": overhead_s, "compile_seconds_est": compile_s,
            "phase_epoch_seconds": steady, "phase_first_epoch_seconds": {k: v[0] for k, v in by_phase.items()},
            "phase_epochs": {k: len(v) for k, v in by_phase.items()}, "notes": sorted(set(notes))}


def baseline_epoch(first_s: float, n1: int, second_s: float, n2: int, steps: int) -> dict:
    """One epoch of `steps` steps from two timed runs of n1 < n2 steps: the difference is the
    per-step cost, the rest a per-epoch fixed cost (worker start-up, the first batch)."""
    per_step = (second_s - first_s) / (n2 - n1) if n2 > n1 else 0.0
    if per_step <= 0:  # noise swamped the difference: scale the longer run instead
        per_step, fixed = second_s / n2, 0.0
    else:
        fixed = max(first_s - n1 * per_step, 0.0)
    return {"per_step_s": per_step, "fixed_s": fixed, "epoch_s": fixed + steps * per_step, "steps": steps}


# ---- the step benchmarks ----


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of `path` (none if it is missing; a line cut short by a kill is left out)."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def read_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """(rows, outcomes) from benchmarks/conftest.py's JSON-lines file (FASTCIFAR_BENCH_ROWS)."""
    rows, outcomes = [], []
    for item in read_jsonl(path):
        (rows if item.pop("kind", None) == "row" else outcomes).append(item)
    return rows, outcomes


def step_tables(rows: list[dict]) -> dict:
    """{phase: {mode: value}} tables from step-benchmark rows (those that record phase, impl and
    ms_per_step): per (phase, mode) the fastest row at the paper's batch for the phase where
    one exists, else the fastest row. "modes_ran": the mode the phase's functions ran in."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r.get("phase") is None or r.get("impl") is None or r.get("ms_per_step") is None:
            continue
        key = (r["phase"], MODE_NAMES.get(r["impl"], r["impl"]))
        rank = (r.get("batch") not in (None, PAPER_BATCH.get(r["phase"])), r["ms_per_step"])
        if key not in best or rank < best[key][0]:
            best[key] = (rank, r)
    tables: dict[str, dict] = {k: {} for k in ("step_ms", "images_per_s", "mfu", "launches_per_step",
                                               "peak_memory_gib", "first_call_s", "step_source", "modes_ran")}
    for (phase, mode), (_, r) in sorted(best.items()):
        for table, field in (("step_ms", "ms_per_step"), ("images_per_s", "images_per_s"), ("mfu", "mfu"),
                             ("launches_per_step", "launches_per_step"), ("peak_memory_gib", "peak_memory_gib"),
                             ("first_call_s", "first_call_s"), ("step_source", "name"), ("modes_ran", "ran")):
            tables[table].setdefault(phase, {})[mode] = r.get(field)
    return tables


def graphs_ms(result: dict, phase: str):
    """ms per step of `phase` in graphs mode (the mode training runs on one GPU), or None."""
    return ((result.get("step_ms") or {}).get(phase) or {}).get("graphs")


def ratios(result: dict) -> None:
    """The side-by-side ratios: the paper-equivalent pipeline's schedule over ours, and the peer's
    full step over our graphed one (how many times faster we are)."""
    if result.get("schedule_seconds") and result.get("baseline_seconds"):
        result["speedup_vs_baseline"] = result["baseline_seconds"] / result["schedule_seconds"]
    peer_ms, ours = (result.get("peer") or {}).get("ms_per_step"), graphs_ms(result, "full")
    result["speedup_vs_peer"] = peer_ms / ours if peer_ms and ours else None


def goals(result: dict) -> list[dict]:
    found = {"full_step_ms": graphs_ms(result, "full"), "head_step_ms": graphs_ms(result, "head"),
             "eval_ms": graphs_ms(result, "eval"), "schedule_s": result.get("schedule_seconds"),
             "speedup": result.get("speedup_vs_baseline"), "speedup_vs_peer": result.get("speedup_vs_peer")}
    out = []
    for issue, key, what, target, higher in GOALS:
        value = found[key]
        met = None if value is None else (value >= target if higher else value <= target)
        out.append({"issue": issue, "key": key, "goal": what, "target": target, "value": value, "met": met})
    return out


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def fold_part(name: str, got: dict, result: dict, work: Path) -> None:
    """Fold what part `name` of scripts/gpu_report.py left in `work` (and `got`: its status, its
    benchmark rows and test outcomes) into the result set."""
    fold = _FOLDS.get(name)
    if fold is not None:
        fold(got, result, work)
    flags = read_json(work / f"backend-{name}.json")
    if flags is None:  # the pytest parts: every benchmark row records the flags it ran under
        flags = next((r["backend"] for r in got.get("rows") or [] if r.get("backend")), None)
    if flags is not None:
        result.setdefault("backend_flags", {})[name] = flags
    ratios(result)


def _fold_check(got: dict, result: dict, work: Path) -> None:
    result["check"] = read_json(work / "check.json") or {}
    bad = [k for k, v in result["check"].items() if v.get("ok") is not True and not v.get("skipped")]
    if bad and got["part"]["status"] == "ok":
        got["part"].update(status="failed", why=f"checks failed: {', '.join(bad)}")


def _fold_steps(got: dict, result: dict, work: Path) -> None:
    result["step_rows"] = got["rows"]
    tables = step_tables(got["rows"])
    result["compile_seconds"]["steps_first_call"] = tables.pop("first_call_s")
    result["peak_memory_gib"]["steps"] = tables.pop("peak_memory_gib")
    result.update(tables)
    profiled = next((r for r in got["rows"] if r.get("breakdown")), None)
    if profiled is not None:
        result["breakdown"] = dict(profiled["breakdown"], mode=profiled.get("profiled_mode"), ran=profiled.get("ran"))


def _fold_peer(got: dict, result: dict, work: Path) -> None:
    peer = read_json(work / "peer.json")
    if peer and "ms_per_step" in peer:
        result["peer"] = peer


def _fold_candidates(got: dict, result: dict, work: Path) -> None:
    """The A/B rows (the switch on) beside the steps part's graphs rows (off), per phase."""
    on = step_tables(got["rows"])
    switch = got.get("switch")
    phases = {}
    for phase in ("full", "eval"):
        off_ms, on_ms = graphs_ms(result, phase), graphs_ms(on, phase)
        phases[phase] = {"off_ms": off_ms, "on_ms": on_ms, "ran_on": (on["modes_ran"].get(phase) or {}).get("graphs"),
                         "ran_off": ((result.get("modes_ran") or {}).get(phase) or {}).get("graphs"),
                         "off_over_on": off_ms / on_ms if off_ms and on_ms else None}
    result["candidates"] = {"switch": switch, "phases": phases, "rows": got["rows"]}


def _fold_tests(got: dict, result: dict, work: Path) -> None:
    outcomes = got.get("outcomes") or []
    failures = [{"id": o["nodeid"], "when": o.get("when"), "last_line": o.get("why"), "message": o.get("message")}
                for o in outcomes if o["outcome"] == "failed"]
    passed = sum(o["outcome"] == "passed" and o.get("when") == "call" for o in outcomes)
    result["tests"] = {"summary": got["part"].get("summary"), "passed": passed, "failures": failures,
                       "files": got.get("targets")}


def _fold_schedule(got: dict, result: dict, work: Path) -> None:
    meta, end = read_json(work / "schedule_meta.json") or {}, read_json(work / "schedule_end.json") or {}
    records = read_jsonl(work / "run" / "metrics.jsonl")
    # Start-up (model, data on the device) and finish (TTA, scoring, files): once per run.
    overhead = end["wall_s"] - sum(float(r["seconds"]) for r in records) if end else None
    sched = summarise_schedule(records, meta.get("target", []), overhead)
    summary = end.get("summary") or {}
    sched.update(peak_memory_gib=end.get("peak_memory_gib"), best_acc=summary.get("best_acc"),
                 inductor_cache_warm=meta.get("inductor_cache_warm"),
                 inductor_cache_entries=meta.get("inductor_cache_entries"), step_mode=summary.get("step_mode"),
                 mode_fallbacks=summary.get("mode_fallbacks"), engine_compile_seconds=summary.get("compile_seconds"))
    result.update(schedule=sched, schedule_seconds=sched["schedule_seconds"],
                  schedule_projected=sched["schedule_projected"], loader_note=meta.get("loader_note"))
    result["compile_seconds"]["schedule_est"] = sched["compile_seconds_est"]
    result.setdefault("peak_memory_gib", {})["schedule"] = sched["peak_memory_gib"]


def _fold_baseline(got: dict, result: dict, work: Path) -> None:
    base = read_json(work / "baseline.json") or {}
    passes = base.get("passes", {})
    if {"head", "full", "eval"} <= set(passes):
        base["schedule_s_projected"] = sum(passes["full" if p.startswith("full") else "head"]["epoch_s"] +
                                           passes["eval"]["epoch_s"] for p in result["paper_phases"])
    result.update(baseline=base, baseline_seconds=base.get("schedule_s_projected"))


_FOLDS = {"check": _fold_check, "steps": _fold_steps, "peer": _fold_peer, "candidates": _fold_candidates,
          "tests": _fold_tests, "schedule": _fold_schedule, "baseline": _fold_baseline}


# ---- the files ----


def write_report(result: dict, out_dir: Path, logs: dict[str, str] | None = None) -> list[Path]:
    """<out_dir>/<device>-<date>.json, .md and -log.txt (each part's log tail), written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(result['device'])}-{result['date']}"
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    atomic_write_text(paths[0], json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(paths[1], render_markdown(result))
    if logs:
        paths.append(out_dir / f"{stem}-log.txt")
        atomic_write_text(paths[2], "".join(f"==== {name} ====\n{text[-LOG_TAIL_BYTES:]}\n"
                                            for name, text in logs.items()))
    return paths
