"""The training command line as a user meets it: overrides anywhere, --help, refusals, failed starts,
resumes (early kills, other data, finished runs) and the time they add up to."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from fastcifar import cli
from fastcifar.config import Config, ConfigError, build_config, valid_keys
from fastcifar.graphs import plan_modes
from fastcifar.engine import Engine
from fastcifar.rundir import RESUMABLE_OVERRIDES, choose_run_dir

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--config", "smoke", "run.device=cpu", "train.epochs=2", "run.max_steps_per_epoch=2", "train.tta=false"]


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: its bytes' hash and modification time (what "changes nothing" means)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def killed_in_epoch(epoch: int):
    """A train_epoch that raises KeyboardInterrupt when it reaches `epoch` (kill -9's effect on a run)."""
    original = Engine.train_epoch

    def crash(self, e, *args, **kwargs):
        if e >= epoch:
            raise KeyboardInterrupt("killed")
        return original(self, e, *args, **kwargs)

    return crash


def start_and_kill(digits: Path, run_dir: Path, epoch: int) -> None:
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(Engine, "train_epoch", killed_in_epoch(epoch))
        cli.main(["--data-dir", str(digits), "--out", str(run_dir), *SHORT])


def test_overrides_are_taken_anywhere_on_the_command_line():
    args = cli.parse_args(["--config", "smoke", "train.epochs=3", "--out", "X", "run.seed=2", "--data-dir", "D",
                           "filter.enabled=false"])
    assert args.overrides == ["train.epochs=3", "run.seed=2", "filter.enabled=false"]
    assert (args.config, args.out, args.data_dir) == ("smoke", "X", "D")


def test_help_lists_every_key_with_its_default_and_unit_and_what_resume_accepts():
    text = cli.build_parser().format_help()
    defaults = Config()
    notes = cli.field_notes()
    for key in valid_keys():
        section, name = key.split(".")
        shown = cli._shown(getattr(getattr(defaults, section), name))
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(f"{key} = ")), None)
        assert line is not None, key
        assert f"{key} = {shown}" in line, (key, line)
        if key in notes:
            assert notes[key] in line
    assert "epochs between last.pt writes" in notes["run.checkpoint_every"]  # the unit comes from config.py
    assert notes["filter.threshold"].startswith("nats")
    resume_line = next(ln for ln in text.splitlines() if ln.startswith("--resume RUN_DIR accepts only"))
    assert all(k in resume_line for k in RESUMABLE_OVERRIDES)


def test_the_sections_this_trainer_owns_document_every_field():
    notes = cli.field_notes()
    for key in valid_keys():
        if key.startswith(("train.", "run.")):
            assert key in notes, f"{key} has no comment (unit, meaning) in config.py"


@pytest.mark.parametrize("preset", ["paper", "hires", "authors"])
def test_convnext_b_presets_are_refused_on_a_cpu_unless_asked(preset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--config", preset, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA GPU" in err and "run.device=cpu" in err
    assert not (tmp_path / "x").exists()
    cli.refuse_cpu_for_big_presets(build_config(preset, {"run.device": "cpu"}), preset)  # insisting is allowed
    cli.refuse_cpu_for_big_presets(build_config("smoke"), "smoke")


def _truncated_copy(digits: Path, tmp: Path) -> Path:
    bad = tmp / "truncated"
    shutil.copytree(digits, bad)
    data = (bad / "train.beton").read_bytes()
    (bad / "train.beton").write_bytes(data[: len(data) // 2])
    return bad


@pytest.mark.parametrize("case", ["missing data", "class count", "truncated beton", "missing weights"])
def test_a_failed_start_leaves_no_run_directory(case, digits, tmp_path, capsys):
    data = {"missing data": tmp_path / "nothing", "truncated beton": None}.get(case, digits)
    data = _truncated_copy(digits, tmp_path) if data is None else data
    extra = {"class count": ["model.num_classes=100"],
             "missing weights": ["model.weights=" + str(tmp_path / "nope.pt")]}.get(case, [])
    out = tmp_path / "run"
    assert cli.main(["--data-dir", str(data), "--out", str(out), *SHORT, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
    choose_run_dir(build_config("smoke"), str(out), "smoke")  # the next attempt is not blocked
    # a folder that existed before keeps exactly its content
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert cli.main(["--data-dir", str(data), "--out", str(out), *SHORT, *extra]) == 2
    assert snapshot(out).keys() == {"notes.txt"} and (out / "notes.txt").read_text() == "mine\n"


def test_a_failed_start_without_out_adds_no_timestamped_directory(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli.main([*SHORT, "--data-dir", str(tmp_path / "nothing"), f"run.out={runs}"]) == 2
    assert not runs.exists()


def test_checkpoints_every_epoch_by_default_and_an_early_kill_is_resumable(digits, tmp_path, capsys):
    assert build_config("paper").run.checkpoint_every == 1
    run_dir = tmp_path / "early"
    start_and_kill(digits, run_dir, epoch=0)  # killed in the first epoch: no checkpoint yet
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "checkpoints" / "last.pt").exists()
    assert cli.main(["--resume", str(run_dir)]) == 0
    assert "no checkpoint yet: starting it again from epoch 0" in capsys.readouterr().out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and (run_dir / "summary.json").is_file()


def test_resume_checks_the_data_sums_the_time_and_leaves_a_finished_run_alone(digits, make_digits, tmp_path, capsys):
    run_dir = tmp_path / "run"
    start_and_kill(digits, run_dir, epoch=1)  # epoch 0 is checkpointed, epoch 1 is lost
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    before = snapshot(run_dir)
    other = make_digits(tmp_path / "digits20", 0.2)
    assert cli.main(["--resume", str(run_dir), "--data-dir", str(other)]) == 2
    assert "holds other data" in capsys.readouterr().err
    assert snapshot(run_dir) == before  # nothing written
    copy = tmp_path / "moved"
    shutil.copytree(digits, copy)  # the same data elsewhere is fine
    assert cli.main(["--resume", str(run_dir), "--data-dir", str(copy)]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["epoch"] for r in records] == [0, 1] and records[0] == first
    # training time of both attempts: epoch 0 (before the kill) and epoch 1 (after the resume)
    assert summary["total_seconds"] >= first["seconds"] + records[1]["seconds"]
    assert summary["total_seconds"] >= records[1]["elapsed_seconds"] > first["elapsed_seconds"]
    capsys.readouterr()
    finished = snapshot(run_dir)
    for extra in ([], ["--data-dir", str(other)]):
        assert cli.main(["--resume", str(run_dir), *extra]) == 0
        assert "is finished" in capsys.readouterr().out
        assert snapshot(run_dir) == finished


def test_the_step_line_shows_the_mode_compile_resolved_to():
    """model.compile=auto is resolved per device: the start-up line names the mode, never "auto"."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    smoke, paper = build_config("smoke").model, build_config("paper").model
    assert [m.name for m in plan_modes(smoke, cpu, distributed=False, scaler=False)[0]] == ["eager"]
    assert [m.name for m in plan_modes(paper, cpu, distributed=False, scaler=False)[0]] == ["eager"]
    assert [m.name for m in plan_modes(paper, cuda, distributed=False, scaler=False)[0]] == ["graphs", "compiled", "eager"]
    modes, notes = plan_modes(paper, cuda, distributed=True, scaler=False)
    assert [m.name for m in modes] == ["compiled", "eager"] and "DDP" in notes[0]
    reduce = build_config("paper", {"model.compile_mode": "reduce-overhead"}).model
    assert plan_modes(reduce, cuda, distributed=False, scaler=False)[0][0].inductor_graphs
    # a compile mode that makes no graphs of its own (autotuned GEMMs) runs inside ours, and says so
    tuned = build_config("paper", {"model.compile_mode": "max-autotune-no-cudagraphs"}).model
    first = plan_modes(tuned, cuda, distributed=False, scaler=False)[0][0]
    assert (first.name, first.compile_mode) == ("graphs", "max-autotune-no-cudagraphs")
    assert "compiled (max-autotune-no-cudagraphs) inside" in first.describe()
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        plan_modes(build_config("smoke", {"model.cuda_graphs": "on"}).model, cpu, distributed=False, scaler=False)


def test_a_corrupt_data_record_is_one_run_error(digits, tmp_path):
    from fastcifar.rundir import RunError, check_same_data

    (tmp_path / "data.json").write_text('{"dir": "x", "finger')  # a torn write
    with pytest.raises(RunError, match="cannot read data.json"):
        check_same_data(tmp_path, str(digits))
