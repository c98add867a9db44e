"""scripts/gpu_report.py on the CPU: the time plan, GPU detection, the tables and projections, the
report files, and the miniature run from an uninstalled copy of the checkout with ffcv unimportable."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar.bench import benchreport as br

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_report.py"
REQUIRED_KEYS = {"device", "torch", "triton", "commit", "date", "step_ms", "launches_per_step", "compile_seconds",
                 "peak_memory_gib", "schedule_seconds", "schedule_projected", "baseline_seconds",
                 "speedup_vs_baseline", "speedup_vs_peer", "parts"}
MD_SECTIONS = ("## Summary", "## Goals", "## Correctness on the device", "## Steps",
               "## Where the full step's GPU time", "## The peer", "## Candidates", "## Schedule",
               "## Tests on the device", "## Parts")
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def load_script():
    if "gpu_report" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
        sys.modules["gpu_report"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_report"])
    return sys.modules["gpu_report"]


def test_help_lists_the_options():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--out", "--budget", "--full", "--skip", "--device", "--baseline-steps", "--phase-epochs"):
        assert flag in done.stdout


def simulate(script, budget: float, skip: set[str]) -> dict[str, float]:
    """The cap each part gets when every earlier part takes its expected (H200) seconds."""
    chosen = [p for p in script.PLAN if p.name not in skip]
    left, caps = budget - script.PROBE_S, {}
    for i, part in enumerate(chosen):
        caps[part.name] = script.part_cap(part, chosen[i + 1:], left, full=False)
        left -= min(part.expect_s, caps[part.name])
    return caps


def test_the_plan_fits_one_call_of_the_lent_gpu_in_value_order():
    """At the seconds each part takes on the H200, every part gets a cap above them inside the
    default budget (the lent H200 gives one call of at most ~570 s); the tests get the rest: about
    a minute without a candidate switch to try, and the floors always fit."""
    script = load_script()
    budget = script.parse_args([]).budget
    assert budget <= 540
    assert [p.name for p in script.PLAN] == ["check", "steps", "peer", "candidates", "schedule", "baseline", "tests"]
    assert all(p.cap_s >= p.expect_s for p in script.PLAN)
    assert script.PROBE_S + sum(p.floor_s for p in script.PLAN) + script.REPORT_S <= budget
    with_candidates = simulate(script, budget, set())
    assert all(with_candidates[p.name] >= p.expect_s for p in script.PLAN if p.name != "tests")
    without = simulate(script, budget, {"candidates"})
    assert all(without[p.name] >= p.expect_s for p in script.PLAN if p.name != "candidates")


def test_a_part_gets_its_cap_less_what_later_parts_need():
    script = load_script()
    part = {p.name: p for p in script.PLAN}
    check, steps, schedule, baseline, tests = (part[n] for n in ("check", "steps", "schedule", "baseline", "tests"))
    assert script.part_cap(check, list(script.PLAN[1:]), 540, full=False) == check.cap_s
    # 200 s left before the steps: the schedule's, the baseline's and the tests' floors and the report come first
    later = [schedule, baseline, tests]
    assert script.part_cap(steps, later, 200, full=False) == 200 - script.REPORT_S - sum(q.floor_s for q in later)
    assert script.part_cap(schedule, [baseline], 1000, full=True) == 1000 - script.REPORT_S - baseline.floor_s
    assert script.part_cap(schedule, [baseline], 1000, full=False) == schedule.cap_s


def test_the_miniature_takes_tiny_sizes_unless_told_otherwise():
    script = load_script()
    gpu, cpu = script.parse_args([]), script.parse_args(["--device", "cpu", "--set", "train.batch_size=8"])
    assert (gpu.model, gpu.train_size, gpu.baseline_steps, gpu.set) == ("convnext_base", 50_000, 60, [])
    assert (cpu.model, cpu.train_size, cpu.test_size, cpu.phase_epochs) == ("test_convnext", 64, 32, 1)
    assert cpu.set[-1] == "train.batch_size=8" and "train.batch_size=16" in cpu.set  # the user's override last
    assert script.parse_args(["--device", "cpu", "--model", "resnet18"]).model == "resnet18"


def test_cuda_only_and_unavailable_parts_say_why_before_they_run(monkeypatch):
    script = load_script()
    part = {p.name: p for p in script.PLAN}
    cpu, gpu = script.parse_args(["--device", "cpu"]), script.parse_args([])
    assert all(script.skip_reason(part[n], cpu).startswith("needs CUDA") for n in ("peer", "candidates", "tests"))
    assert script.skip_reason(part["steps"], cpu) is None and script.skip_reason(part["peer"], gpu) is None
    monkeypatch.setattr(script, "CANDIDATE", ("no_such_switch", "model.no_such_switch=on"))
    assert script.skip_reason(part["candidates"], gpu).startswith("not available")


def test_skip_names_are_checked():
    with pytest.raises(SystemExit):
        load_script().parse_args(["--skip", "check,nonsense"])


def test_cuda_answer_is_asked_once_and_inherited(monkeypatch):
    import torch

    monkeypatch.setenv(br.CUDA_ENV, "1")
    assert br.cuda_available() is True  # the cached answer, no child asked
    monkeypatch.delenv(br.CUDA_ENV)
    assert br.cuda_available() is torch.cuda.is_available()
    assert os.environ[br.CUDA_ENV] == ("1" if torch.cuda.is_available() else "0")


def test_probe_reports_torch_from_a_child():
    probe = br.probe_cuda(details=True)
    import torch

    assert probe["torch"] == torch.__version__ and probe["available"] is torch.cuda.is_available()
    assert Path(probe["fastcifar_path"]).resolve().parent == (ROOT / "fastcifar").resolve()


def test_driver_version_is_read_from_proc_text(tmp_path):
    text = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder)\n"
    (tmp_path / "version").write_text(text)
    assert br.driver_version(str(tmp_path / "version")) == "580.159.04"
    assert br.driver_version(str(tmp_path / "missing")) is None


def test_auto_backend_is_memory_where_ffcv_does_not_import(monkeypatch):
    from fastcifar.config import build_config
    from fastcifar.data import resolve_backend

    assert build_config("paper").data.backend == "auto"
    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` raises ImportError
    assert resolve_backend("auto") == "memory"
    assert resolve_backend("ffcv") == "ffcv" and resolve_backend("memory") == "memory"


# ---- the schedule projection and the baseline ----


def paper_phases() -> list[str]:
    return ["head"] * 15 + ["full"] * 10 + ["full+filter"] * 75


def records(phases_seconds: list[tuple[str, float]]) -> list[dict]:
    return [{"epoch": e, "phase": p, "seconds": s} for e, (p, s) in enumerate(phases_seconds)]


def test_a_truncated_schedule_projects_steady_epochs_plus_compile_and_overhead():
    run = records([("head", 20.0), ("head", 0.5), ("full", 40.0), ("full", 1.0), ("full", 1.2),
                   ("full+filter", 1.1), ("full+filter", 1.3), ("full+filter", 1.5)])
    s = br.summarise_schedule(run, paper_phases(), overhead_s=7.0)
    assert s["schedule_projected"] and not s["complete"] and s["epochs_run"] == 8
    assert s["phase_epoch_seconds"] == {"head": 0.5, "full": 1.0, "full+filter": 1.3}  # medians after the first
    assert s["compile_seconds_est"] == pytest.approx(19.5 + 39.0 + 0.0)  # a first epoch below steady adds nothing
    assert s["schedule_seconds"] == pytest.approx(15 * 0.5 + 10 * 1.0 + 75 * 1.3 + 58.5 + 7.0)
    assert s["measured_seconds"] == pytest.approx(sum(r["seconds"] for r in run))


def test_a_phase_not_reached_is_projected_at_the_same_step_cost():
    s = br.summarise_schedule(records([("head", 3.0), ("head", 1.0), ("full", 9.0), ("full", 2.0)]), paper_phases())
    assert s["schedule_seconds"] == pytest.approx(15 * 1.0 + 85 * 2.0 + 2.0 + 7.0)
    assert any("full+filter not run" in n for n in s["notes"])
    head_only = br.summarise_schedule(records([("head", 3.0)]), paper_phases())
    assert head_only["schedule_seconds"] is None  # nothing says what a full epoch costs
    assert any("one epoch only" in n for n in head_only["notes"])


def test_a_whole_schedule_is_measured_not_projected():
    run = records([(p, 2.0 if p == "head" else 3.0) for p in paper_phases()])
    s = br.summarise_schedule(run, paper_phases(), overhead_s=4.0)
    assert s["complete"] and not s["schedule_projected"]
    assert s["schedule_seconds"] == pytest.approx(15 * 2.0 + 85 * 3.0 + 4.0)


def test_baseline_epochs_split_per_step_from_fixed_cost():
    e = br.baseline_epoch(first_s=1.5, n1=25, second_s=3.0, n2=100, steps=500)
    assert e["per_step_s"] == pytest.approx(0.02) and e["fixed_s"] == pytest.approx(1.0)
    assert e["epoch_s"] == pytest.approx(1.0 + 500 * 0.02)
    noisy = br.baseline_epoch(first_s=3.0, n1=25, second_s=2.0, n2=100, steps=500)  # the longer run was faster
    assert noisy["fixed_s"] == 0.0 and noisy["epoch_s"] == pytest.approx(500 * 0.02)


def test_the_baseline_is_projected_over_the_paper_schedule_and_gives_the_ratio(tmp_path):
    passes = {"head": {"epoch_s": 10.0}, "full": {"epoch_s": 20.0}, "eval": {"epoch_s": 2.0}}
    (tmp_path / "baseline.json").write_text(json.dumps({"passes": passes}))
    result = {"paper_phases": paper_phases(), "schedule_seconds": 100.0}
    br.fold_part("baseline", {"part": {"status": "ok"}}, result, tmp_path)
    assert result["baseline_seconds"] == pytest.approx(15 * 12.0 + 85 * 22.0)
    assert result["speedup_vs_baseline"] == pytest.approx(result["baseline_seconds"] / 100.0)


def test_a_failed_correctness_check_fails_its_part(tmp_path):
    (tmp_path / "check.json").write_text(json.dumps({"kernel": {"ok": False, "error": "x"}, "augment": {"ok": True}}))
    got = {"part": {"status": "ok"}}
    br.fold_part("check", got, {}, tmp_path)
    assert got["part"]["status"] == "failed" and "kernel" in got["part"]["why"]


# ---- the correctness checks, on the CPU ----


@pytest.mark.parametrize("amp,within", [("off", 1e-5), ("bf16", None)])
def test_the_model_step_check_compares_one_function_on_both_sides(amp, within):
    """The step's loss against the CPU's loss of the same function: the paper's head dropout (0.5)
    is switched off on both sides (the first H200 run compared a dropout step with an eval-mode
    loss, 10% apart). In fp32 both sides agree to rounding; in bf16 within the argued tolerance."""
    import torch

    from fastcifar.bench.cudacheck import STEP_LOSS_TOL, check_model_step

    out = check_model_step(torch.device("cpu"), "test_convnext", amp=amp)
    assert out["ok"], out
    assert out["randomness_switched_off"] >= 1  # the paper's head dropout
    assert out["amp"] == ("off" if amp == "off" else "bfloat16")
    assert out["step_loss_rel_diff"] <= (within or STEP_LOSS_TOL[torch.bfloat16])
    assert out["grads_finite"] and out["params_moved"] == out["params"]


# ---- the step tables, goals and files ----


def row(name, phase, impl, ms, batch=100, **facts):
    return {"file": "test_bench_train", "name": name, "phase": phase, "impl": impl, "ms_per_step": ms,
            "batch": batch, **facts}


STEP_ROWS = [
    row("full-eager-cl", "full", "eager", 9.0, launches_per_step=1800.0, peak_memory_gib=5.0, first_call_s=1.0,
        ran="eager"),
    row("full-eager-nchw", "full", "eager", 11.0),
    row("full-eager-b500", "full", "eager", 4.0, batch=500),  # faster per step, but not the paper's batch
    row("full-graphs", "full", "graphs", 2.5, launches_per_step=1.0, mfu=0.3, first_call_s=60.0, ran="graphs"),
    row("full-cudagraphs", "full", "cudagraphs", 2.8),
    row("head-graphs", "head", "graphs", 0.4, ran="mixed"),
    row("eval-graphs", "eval", "graphs", 2.5, batch=500, ran="graphs"),
    row("eval-eager", "eval", "eager", 6.0, batch=500),
    {"file": "test_bench_loss", "name": "test_bench_masked_ce[x]", "impl": "triton", "us_per_call": 9.0},
]


def test_step_tables_take_the_fastest_row_at_the_paper_batch_per_phase_and_mode():
    t = br.step_tables(STEP_ROWS)
    assert t["step_ms"] == {"eval": {"eager": 6.0, "graphs": 2.5},
                            "full": {"compiled+cudagraphs": 2.8, "eager": 9.0, "graphs": 2.5}, "head": {"graphs": 0.4}}
    assert t["launches_per_step"]["full"] == {"compiled+cudagraphs": None, "eager": 1800.0, "graphs": 1.0}
    assert t["step_source"]["full"]["eager"] == "full-eager-cl" and t["mfu"]["full"]["eager"] is None
    assert t["modes_ran"]["head"] == {"graphs": "mixed"}


def test_rows_file_survives_a_line_cut_short(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"kind": "row", **STEP_ROWS[0]}) + "\n" +
                    json.dumps({"kind": "outcome", "nodeid": "x", "outcome": "passed"}) + "\n{\"kind\": \"ro")
    rows, outcomes = br.read_rows(path)
    assert rows == [STEP_ROWS[0]] and outcomes == [{"nodeid": "x", "outcome": "passed"}]


BREAKDOWN = {"steps_profiled": 5, "gpu_ms_per_step": 2.0, "kernels_per_step": 300.0, "source": "graph replays",
             "step_ms_cuda_events": 2.4, "augmentation_ms_cuda_events": 0.1, "augmentation_note": "alone",
             "categories": {"convolutions": {"ms_per_step": 1.2, "share": 0.6, "kernels_per_step": 80.0}},
             "top": [{"name": "sm90_xmma_fprop_implicit_gemm_bf16", "category": "convolutions", "ms_per_step": 0.3,
                      "calls_per_step": 4.0, "share": 0.15}]}


def fake_result(tmp_path) -> dict:
    t = br.step_tables(STEP_ROWS)
    result = {"device": "NVIDIA H200", "date": "2026-12-01", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc",
              "parts": {"check": {"status": "ok", "seconds": 20.0, "cap_s": 45},
                        "steps": {"status": "timed out", "seconds": 170.0, "cap_s": 170, "why": "killed"}},
              "peak_memory_gib": {"steps": t.pop("peak_memory_gib"), "schedule": 30.0},
              "compile_seconds": {"steps_first_call": t.pop("first_call_s"), "schedule_est": 45.0},
              "schedule": {"compile_seconds_est": 45.0}, "schedule_seconds": 200.0, "schedule_projected": True,
              "baseline_seconds": 4800.0, "check": {"augment": {"ok": True}}, **t}
    (tmp_path / "peer.json").write_text(json.dumps({"ms_per_step": 10.0, "model": "convnext_base", "batch": 100,
                                                    "compile_mode": "reduce-overhead", "rounds_ms": [10.0]}))
    br.fold_part("peer", {"part": {"status": "ok"}}, result, tmp_path)
    result["goals"] = br.goals(result)
    return result


def test_goals_read_the_graphs_mode_and_the_ratios(tmp_path):
    r = fake_result(tmp_path)
    assert r["speedup_vs_baseline"] == pytest.approx(24.0) and r["speedup_vs_peer"] == pytest.approx(4.0)
    found = {(g["issue"], g["key"]): g for g in r["goals"]}
    assert found[(18, "full_step_ms")]["value"] == 2.5 and found[(18, "full_step_ms")]["met"] is True
    assert found[(19, "full_step_ms")]["met"] is True and found[(19, "head_step_ms")]["value"] == 0.4
    assert found[(19, "eval_ms")]["value"] == 2.5 and found[(19, "eval_ms")]["met"] is False  # target 2 ms
    assert found[(18, "schedule_s")]["met"] is True and found[(19, "schedule_s")]["met"] is False  # 600 / 150 s
    assert found[(18, "speedup")]["met"] is True and found[(19, "speedup_vs_peer")]["met"] is True


def test_the_steps_part_yields_the_breakdown_and_the_candidates_their_ratio(tmp_path):
    result = {"compile_seconds": {}, "peak_memory_gib": {}}
    steps = STEP_ROWS + [{"name": "test_breakdown[graphs]", "breakdown": BREAKDOWN, "profiled_mode": "graphs",
                          "ran": "graphs", "backend": {"cudnn_benchmark": True}}]
    br.fold_part("steps", {"part": {"status": "ok"}, "rows": steps}, result, tmp_path)
    assert result["breakdown"]["gpu_ms_per_step"] == 2.0 and result["breakdown"]["ran"] == "graphs"
    assert result["backend_flags"] == {"steps": {"cudnn_benchmark": True}}
    on = [row("on-full", "full", "graphs", 2.0, ran="graphs"), row("on-eval", "eval", "graphs", 2.0, batch=500)]
    br.fold_part("candidates", {"part": {"status": "ok"}, "rows": on, "switch": "model.x=on"}, result, tmp_path)
    phases = result["candidates"]["phases"]
    assert phases["full"]["off_over_on"] == pytest.approx(2.5 / 2.0) and phases["full"]["ran_on"] == "graphs"
    assert phases["eval"] == {"off_ms": 2.5, "on_ms": 2.0, "ran_on": None, "ran_off": "graphs",
                              "off_over_on": pytest.approx(1.25)}


def test_the_tests_part_lists_every_failure(tmp_path):
    outcomes = [{"nodeid": "tests/test_a.py::test_ok", "when": "call", "outcome": "passed"},
                {"nodeid": "tests/test_a.py::test_bad[x]", "when": "call", "outcome": "failed",
                 "why": "tests/test_a.py:90: AssertionError", "message": "AssertionError: not close"},
                {"nodeid": "tests/test_b.py::test_setup", "when": "setup", "outcome": "failed", "why": "E",
                 "message": None}]
    got = {"part": {"status": "failed", "summary": "2 failed, 1 passed"}, "outcomes": outcomes, "targets": ["t"]}
    result = {}
    br.fold_part("tests", got, result, tmp_path)
    failed = [f["id"] for f in result["tests"]["failures"]]
    assert failed == ["tests/test_a.py::test_bad[x]", "tests/test_b.py::test_setup"]
    assert result["tests"]["passed"] == 1
    md = br.render_markdown({"device": "x", "date": "d", **result})
    assert "| `tests/test_a.py::test_bad[x]` | tests/test_a.py:90: AssertionError | AssertionError: not close |" in md
    assert "2 failed, 1 passed" in md


def test_report_files_hold_the_keys_and_the_tables(tmp_path):
    r = fake_result(tmp_path)
    flags = {"cudnn_benchmark": True}
    r.update(breakdown=BREAKDOWN, backend_flags={"check": flags, "steps": flags})
    paths = br.write_report(r, tmp_path / "out", logs={"steps": "x" * (br.LOG_TAIL_BYTES + 10) + "END"})
    assert [p.name for p in paths] == ["nvidia-h200-2026-12-01.json", "nvidia-h200-2026-12-01.md",
                                       "nvidia-h200-2026-12-01-log.txt"]
    back = json.loads(paths[0].read_text())
    assert REQUIRED_KEYS <= set(back)
    md = paths[1].read_text()
    assert md == br.render_markdown(back)  # the markdown is a pure function of the JSON
    assert "| full | graphs | graphs | 2.5 | – | 30.0% | 1 | – | 60 |" in md
    assert "| steps | timed out | 170 | 170 | killed |" in md
    assert "| convolutions | 1.2 | 60.0% | 80 |" in md and "torch.profiler" in md and "CUDA events" in md
    assert "speedup vs the peer (its full step / ours, graphs mode) | 4x |" in md
    assert "parts check, steps): cudnn_benchmark yes." in md
    for section in MD_SECTIONS:
        assert section in md
    log = paths[2].read_text()
    assert log.startswith("==== steps ====") and log.rstrip().endswith("END") and len(log) < br.LOG_TAIL_BYTES + 100


def test_a_part_past_its_cap_is_killed_and_reported(tmp_path):
    script = load_script()
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    res = script.run_part(cmd, 2.0, tmp_path / "part.log")
    assert res["status"] == "timed out" and res["seconds"] < 30 and "cap" in res["why"]
    assert "started" in (tmp_path / "part.log").read_text()


def test_without_a_gpu_the_report_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = load_script().main(["--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("*.json")
    r = json.loads(json_path.read_text())
    assert rc == 2 and all(p["status"] == "skipped" and p["why"] == "no CUDA GPU" for p in r["parts"].values())


# ---- the miniature, as on a bare machine ----

SITECUSTOMIZE = '''"""Make this Python look like the GPU machine: fastcifar not installed, ffcv absent."""
import sys


class _NoFfcv:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "ffcv" or name.startswith("ffcv."):
            raise ModuleNotFoundError("No module named 'ffcv' (blocked: the GPU machine has none)")
        return None


def _editable(obj) -> bool:
    return "__editable__" in (getattr(obj, "__module__", None) or "") or "__editable__" in str(obj)


sys.meta_path[:] = [_NoFfcv()] + [f for f in sys.meta_path if not _editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
'''


@pytest.mark.slow
def test_miniature_from_an_uninstalled_copy_without_ffcv(tmp_path):
    """The whole flow on the CPU from a copy of the checkout that site-packages cannot supply:
    `--device cpu` alone is the miniature, it exits 0, and every part is ok or skipped for CUDA."""
    copy, site, out = tmp_path / "checkout", tmp_path / "site", tmp_path / "out"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "data", "runs", "__pycache__",
                                                              "*.egg-info", "results", ".pytest_cache"))
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", br.CUDA_ENV, "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(site)
    blocked = subprocess.run([sys.executable, "-c", "import ffcv"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr
    script = copy / "scripts" / "gpu_report.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    files = sorted(out.iterdir())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert 2 <= len(files) <= 8 and all(SAFE_NAME.match(f.name) and f.is_file() for f in files)
    assert all(f.stat().st_size <= 16 * 2**20 for f in files)
    (json_path,) = out.glob("cpu-*.json")
    r = json.loads(json_path.read_text())
    assert REQUIRED_KEYS <= set(r)
    assert Path(r["fastcifar_path"]).resolve().is_relative_to(copy.resolve())  # the copy, not the editable install
    status = {k: p["status"] for k, p in r["parts"].items()}
    assert status == {"check": "ok", "steps": "ok", "peer": "skipped", "candidates": "skipped", "schedule": "ok",
                      "baseline": "ok", "tests": "skipped"}, r["parts"]
    assert all(p["why"].startswith("needs CUDA") for p in r["parts"].values() if p["status"] == "skipped")
    assert r["model"] == "test_convnext" and "ffcv does not import" in r["loader_note"]
    # every check passed, or was skipped with its reason (the CUDA-graph check needs a CUDA device)
    assert all(c["ok"] is True or (c["ok"] is None and c["skipped"]) for c in r["check"].values()), r["check"]
    assert r["check"]["kernel"]["ok"] and r["check"]["model_step"]["ok"]
    assert "eager" in r["step_ms"]["full"] and r["step_ms"]["full"]["eager"] > 0
    assert r["modes_ran"]["head"]["eager"] == "eager"
    assert r["schedule_projected"] is True and r["schedule"]["epochs_run"] == 3 and r["schedule_seconds"] > 0
    assert set(r["baseline"]["passes"]) == {"eval", "head", "full"}  # the evaluation pass included
    assert r["baseline_seconds"] > 0 and r["speedup_vs_baseline"] == pytest.approx(
        r["baseline_seconds"] / r["schedule_seconds"])
    assert set(r["backend_flags"]) == {"check", "steps", "schedule", "baseline"}
    assert len({json.dumps(f, sort_keys=True) for f in r["backend_flags"].values()}) == 1  # one set-up everywhere
    md = (out / json_path.name.replace(".json", ".md")).read_text()
    assert md == br.render_markdown(r)
    for section in MD_SECTIONS:
        assert section in md


def load_bench_conftest():
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "benchmarks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,tflops16,gbps", [
    ("NVIDIA H100 80GB HBM3", 989.4, 3350.0), ("NVIDIA H100 PCIe", 756.5, 2000.0), ("NVIDIA H100 NVL", 835.5, 3900.0),
    ("NVIDIA H200", 989.4, 4800.0), ("NVIDIA A100-SXM4-80GB", 312.0, 2039.0), ("NVIDIA A100 80GB PCIe", 312.0, 1935.0),
    ("NVIDIA A100-PCIE-40GB", 312.0, 1555.0), ("NVIDIA GeForce RTX 4070 SUPER", 70.9, 504.0),
    ("NVIDIA L4", 121.0, 300.0), ("NVIDIA L40S", 362.05, 864.0), ("NVIDIA A10G", None, None),
    ("cpu (2 threads)", None, None)])
def test_benchmark_device_table_tells_similar_names_apart(name, tflops16, gbps):
    import torch

    spec = load_bench_conftest().spec_for(name)
    assert (spec.tflops16, spec.mem_gbps) == (tflops16, gbps)
    assert spec.peak_tflops(torch.bfloat16) == tflops16
    assert spec.peak_tflops(None) == spec.tflops32
