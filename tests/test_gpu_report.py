"""scripts/gpu_report.py on the CPU: --help, the report from a fake result set, part time limits,
and a miniature of the whole run (a tiny model, a 3-epoch schedule crossing every phase)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar.benchreport import (GOALS, goals, read_benchmarks, render_markdown, speedups, summarise_schedule,
                                   write_report)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_report.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_works_without_a_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in ("--skip-tests", "--skip-bench", "--epochs", "--out-dir", "--budget"):
        assert flag in done.stdout


def test_refuses_without_a_gpu_unless_asked_for_the_cpu(capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert load_script().main(["--skip-tests"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def paper_phases() -> list[str]:
    return ["head"] * 15 + ["full"] * 10 + ["full+filter"] * 75


def fake_records(seconds: dict[str, float], spikes: dict[int, float]) -> list[dict]:
    """One metrics.jsonl record per epoch of the paper's schedule; `spikes` add compile seconds."""
    return [{"epoch": e, "phase": p, "seconds": seconds[p] + spikes.get(e, 0.0), "val_acc": 0.5}
            for e, p in enumerate(paper_phases())]


def test_schedule_summary_separates_compilation_from_steady_epochs():
    records = fake_records({"head": 0.3, "full": 0.9, "full+filter": 0.9}, spikes={0: 20.0, 15: 40.0})
    s = summarise_schedule(records, paper_phases(), {"best_acc": 0.7})
    assert s["complete"] and s["epochs_done"] == 100
    assert s["schedule_seconds"] == pytest.approx(15 * 0.3 + 85 * 0.9 + 60.0)
    assert s["schedule_seconds_steady"] == pytest.approx(15 * 0.3 + 85 * 0.9)
    assert s["compile_seconds_est"] == pytest.approx(60.0)
    assert s["phase_epoch_seconds"] == pytest.approx({"head": 0.3, "full": 0.9, "full+filter": 0.9})
    assert s["best_acc"] == 0.7


def test_a_phase_of_two_epochs_takes_the_one_without_compilation():
    records = [{"epoch": e, "phase": p, "seconds": s} for e, (p, s) in
               enumerate([("head", 10.0), ("head", 1.0), ("full", 30.0), ("full", 2.0)])]
    s = summarise_schedule(records, ["head", "head", "full", "full"], {})
    assert s["phase_epoch_seconds"] == {"head": 1.0, "full": 2.0}
    assert s["schedule_seconds_steady"] == 6.0 and s["compile_seconds_est"] == 37.0


def test_a_partial_schedule_is_projected_not_measured():
    records = fake_records({"head": 0.3, "full": 0.9, "full+filter": 1.0}, spikes={})[:40]
    s = summarise_schedule(records, paper_phases(), {})
    assert not s["complete"] and s["epochs_done"] == 40
    assert s["schedule_seconds"] is None and s["compile_seconds_est"] is None
    assert s["seconds_so_far"] == pytest.approx(15 * 0.3 + 10 * 0.9 + 15 * 1.0)
    assert s["schedule_seconds_steady"] == pytest.approx(15 * 0.3 + 10 * 0.9 + 75 * 1.0)
    short = summarise_schedule(records[:10], paper_phases(), {})  # no full epoch yet: nothing to project
    assert short["schedule_seconds_steady"] is None


def fake_benchmark_json(path: Path) -> None:
    def row(name, **info):
        return {"name": name, "stats": {"median": 0.01}, "extra_info": info}

    path.write_text(json.dumps({"benchmarks": [
        row("test_step[full-cudagraphs-cl-b100]", phase="full", batch=100, ms_per_step=2.5, images_per_s=40_000.0,
            tflops_per_s=300.0, mfu=0.3, param_floor_ms=0.8, nested={"dropped": True}),
        row("test_step[full-eager-cl-b100]", phase="full", batch=100, ms_per_step=30.0, images_per_s=3_333.0),
        row("test_step[head-cudagraphs-cl-b100]", phase="head", batch=100, ms_per_step=0.5, images_per_s=200_000.0),
        row("test_step[eval-cudagraphs-cl-b500]", phase="eval", batch=500, ms_per_step=4.0, images_per_s=125_000.0),
    ]}))


def fake_result(tmp_path: Path) -> dict:
    fake_benchmark_json(tmp_path / "bench-test_bench_train.json")
    schedule = summarise_schedule(fake_records({"head": 0.3, "full": 0.8, "full+filter": 0.8}, {0: 10.0}),
                                  paper_phases(), {"best_acc": 0.61, "best_acc_tta": 0.62})
    baseline = {"head": 20.0, "full": 40.0, "eval": 2.0, "schedule_s_projected": 15 * 22.0 + 85 * 42.0,
                "note": "DataLoader with 8 workers"}
    result = {"device": "NVIDIA H100 80GB HBM3", "gpu_slug": "nvidia-h100-80gb-hbm3", "date": "2025-01-02",
              "torch": "2.x", "cuda": "12.x", "triton": "3.x", "timm": "1.x", "commit": "abc", "model": "convnext_base",
              "parts": {"tests": {"status": "ok", "seconds": 50.0, "cap_s": 120, "summary": "120 passed in 50s"},
                        "schedule": {"status": "ok", "seconds": 200.0, "cap_s": 300},
                        "baseline": {"status": "ok", "seconds": 40.0, "cap_s": 90},
                        "bench": {"status": "timed out", "seconds": 150.0, "cap_s": 150}},
              "setup": {"loader": "memory", "loader_note": "ffcv is not installed: fell back to the memory loader"},
              "schedule": schedule, "baseline": baseline, "benchmarks": read_benchmarks(tmp_path),
              "ratios": speedups(schedule, baseline), "notes": [], "failed": ["bench"]}
    result["goals"] = goals(result)
    return result


def test_goals_and_speedups_from_a_fake_result_set(tmp_path):
    r = fake_result(tmp_path)
    assert r["ratios"]["head_epoch"] == pytest.approx(22.0 / 0.3)
    assert r["ratios"]["full_epoch"] == pytest.approx(42.0 / 0.8)
    assert r["ratios"]["schedule"] == pytest.approx(r["baseline"]["schedule_s_projected"] / (15 * 0.3 + 85 * 0.8 + 10))
    found = {g["key"]: g for g in r["goals"]}
    assert set(found) == {key for key, *_ in GOALS}
    assert found["schedule_s"]["value"] == pytest.approx(82.5) and found["schedule_s"]["met"] is True
    assert found["finetune_ms"]["value"] == 2.5 and found["finetune_ms"]["met"] is False  # the best of 2.5 and 30
    assert found["frozen_ips"]["met"] is True and found["eval_ips"]["met"] is False
    assert found["speedup"]["value"] == pytest.approx(3900 / 82.5) and found["speedup"]["met"] is True


def test_report_files_hold_valid_json_and_the_tables(tmp_path):
    r = fake_result(tmp_path)
    json_path, md_path = write_report(r, tmp_path / "results")
    assert json_path.name == "nvidia-h100-80gb-hbm3-2025-01-02.json" and md_path.suffix == ".md"
    back = json.loads(json_path.read_text())
    assert back["ratios"] == pytest.approx(r["ratios"]) and len(back["benchmarks"]) == 4
    assert "nested" not in back["benchmarks"][0]  # only scalar facts are kept
    md = md_path.read_text()
    assert "| goal | measured | target | met |" in md
    assert "| 100-epoch schedule, wall seconds (compile included) | 82.5 | 90 | yes |" in md
    assert "| train::test_step[full-cudagraphs-cl-b100] | 40,000 | 2.5 | 300 | 30.0% | 0.8 | – |" in md
    assert "| bench | timed out | 150 | 150 |" in md and "120 passed in 50s" in md
    assert md == render_markdown(back)  # the markdown is a pure function of the JSON


def test_a_shortened_schedule_meets_no_schedule_goal(tmp_path):
    r = fake_result(tmp_path)
    r["schedule"] = dict(r["schedule"], epochs=3)
    found = {g["key"]: g for g in goals(r)}
    assert found["schedule_s"]["met"] is None and found["speedup"]["met"] is None
    assert found["finetune_ms"]["met"] is False  # the benchmarks still count


def test_a_part_past_its_cap_is_killed_and_reported(tmp_path):
    script = load_script()
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    res = script.run_part(cmd, 2.0, tmp_path / "part.log")
    assert res["status"] == "timed out" and res["seconds"] < 30
    assert "started" in res["tail"] and "started" in (tmp_path / "part.log").read_text()


def test_a_test_suite_past_its_cap_reports_how_far_it_got(tmp_path, monkeypatch):
    script = load_script()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(
        "import time, pytest\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_one(i):\n    time.sleep(60 if i == 3 else 0)\n")
    monkeypatch.setattr(script, "ROOT", tmp_path)
    res = script.tests_part(None, tmp_path, 10.0)
    assert res["status"] == "timed out"
    assert res["summary"] == "timed out (3 tests passed before)"


@pytest.mark.slow
def test_miniature_report_on_the_cpu(tmp_path):
    """The whole flow with a tiny model: schedule and baseline processes, JSON and markdown."""
    out = tmp_path / "results"
    argv = ["--device", "cpu", "--skip-tests", "--skip-bench", "--epochs", "3", "--model", "test_convnext",
            "--train-size", "64", "--test-size", "32", "--loader", "memory", "--out-dir", str(out),
            "--set", "train.batch_size=16", "--set", "train.test_batch_size=32", "--set", "train.frozen_chunk=32",
            "--set", "train.freeze_epochs=1", "--set", "filter.start_epoch=2", "--set", "optim.warmup_epochs=1"]
    rc = load_script().main(argv)
    (json_path,) = out.glob("cpu-*.json")  # written even when a part fails
    r = json.loads(json_path.read_text())
    assert rc == 0 and r["failed"] == [], json.dumps(r["parts"], indent=1)
    assert r["parts"]["bench"]["status"].startswith("skipped")
    assert r["schedule"]["complete"] and r["schedule"]["epochs_done"] == 3
    assert set(r["schedule"]["phase_epoch_seconds"]) == {"head", "full", "full+filter"}
    assert r["setup"]["loader"] == "memory"
    assert r["baseline"]["head"] > 0 and r["baseline"]["head_images"] == 64
    assert r["ratios"]["schedule"] > 0
    assert (out / json_path.name.replace(".json", ".md")).is_file()


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
