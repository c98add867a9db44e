"""The training step's modes on the CPU: the graph path (with a checking stand-in for CUDA-graph
capture), the fall-back from one mode to the next, and the phase optimizer."""

import json
import math
from pathlib import Path

import pytest
import torch

from fastcifar import engine, step, train
from fastcifar.config import OptimConfig, build_config
from fastcifar.graphs import EAGER, Mode, ModeLadder
from fastcifar.model import build_model
from fastcifar.optim import PhaseSGD
from fastcifar.rundir import prepare_run_dir
from graph_check import CheckedCapture, GraphUnsafe

# Every phase boundary in four short epochs: head (0), full (1), full+filter (2, 3).
SHORT = {"train.epochs": 4, "filter.start_epoch": 2, "run.max_steps_per_epoch": 5, "train.frozen_chunk": 64}


def short_cfg(data_dir: Path, **extra):
    flat = {"data.dir": str(data_dir), "run.device": "cpu", **{k: str(v) for k, v in {**SHORT, **extra}.items()}}
    return build_config("smoke", flat)


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(cfg, run_dir: Path) -> dict:
    return train.run_training(cfg, prepare_run_dir(cfg, str(run_dir), "smoke"))


def force_modes(mp, modes, capture=None, compiler=None):
    """Make the engine try `modes` (on the CPU), capture with `capture`, compile with `compiler`."""
    mp.setattr(engine, "plan_modes", lambda *a, **k: (list(modes), []))
    if capture is not None:
        mp.setattr(engine, "CudaGraphCapture", lambda device: capture)
    if compiler is not None:
        mp.setattr(step, "compile_fn", compiler)


def no_compile(fn, name, mode, stats):
    """A stand-in for torch.compile: the function itself (the tests here are about the step, not inductor)."""
    return fn


@pytest.fixture(scope="module")
def eager_run(digits, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eager") / "run"
    summary = run(short_cfg(digits), run_dir)
    return summary, records_of(run_dir)


@pytest.mark.compiled
def test_the_graph_path_replays_static_steps_with_eager_results(digits, eager_run, tmp_path):
    """Captured steps (here: checked replays on the CPU) give the eager run's numbers exactly."""
    capture = CheckedCapture()
    with pytest.MonkeyPatch.context() as mp:
        force_modes(mp, [Mode("graphs"), Mode("compiled"), EAGER], capture, no_compile)
        summary = run(short_cfg(digits), tmp_path / "graphs")
    assert summary["step_mode"].startswith("graphs") and summary["mode_fallbacks"] == []
    # frozen features, head step, full step, evaluation: each captured once, then replayed
    assert len(capture.captured) == 4 and capture.replays > 4 * 3
    for ours, eager in zip(records_of(tmp_path / "graphs"), eager_run[1], strict=True):
        for key in ("train_loss", "val_acc", "kept_fraction", "lr", "threshold", "noisy_precision"):
            assert ours[key] == eager[key], (ours["epoch"], key)
    assert summary["best_acc_tta"] == eager_run[0]["best_acc_tta"]


def test_the_capture_check_catches_host_values_and_host_reads():
    capture, t = CheckedCapture(), torch.zeros(3)
    lr = [0.1]
    replay = capture.capture(lambda: t.add_(1.0, alpha=lr[0]))
    replay()
    replay()  # the same float: fine
    lr[0] = 0.2
    with pytest.raises(GraphUnsafe, match="differs from the capture"):
        replay()  # a graph would still add 0.1
    with pytest.raises(GraphUnsafe, match="reads a device value on the host"):
        capture.capture(lambda: t.sum().item())()


class FailingCapture(CheckedCapture):
    def capture(self, body):
        raise RuntimeError("operation not permitted when stream is capturing")


def failing_compiler(fn, name, mode, stats):
    def compiled(*args):
        raise RuntimeError("inductor: simulated compile failure")
    return compiled


@pytest.mark.parametrize("case", ["capture-fails", "compile-fails", "both-fail"])
def test_a_mode_that_fails_steps_down_with_one_warning(digits, eager_run, tmp_path, capsys, case):
    capture = FailingCapture() if case != "compile-fails" else CheckedCapture()
    compiler = failing_compiler if case != "capture-fails" else no_compile
    modes = [Mode("graphs"), Mode("compiled"), EAGER] if case != "compile-fails" else [Mode("compiled"), EAGER]
    with pytest.MonkeyPatch.context() as mp:
        force_modes(mp, modes, capture, compiler)
        summary = run(short_cfg(digits), tmp_path / case)
    expected = {"capture-fails": [("graphs", "compiled")], "compile-fails": [("compiled", "eager")],
                "both-fail": [("graphs", "compiled"), ("compiled", "eager")]}[case]
    # graphs fail at capture, after warm-up steps that compiled fine; a failing compile fails at once.
    # Every function fails alike here, so each steps down on its own and all end in the same mode.
    functions = ("frozen features", "head step", "evaluation", "full step")
    for name in functions:
        assert [(f["from"], f["to"]) for f in summary["mode_fallbacks"] if f["where"] == name] == expected
    assert summary["function_modes"] == {name: expected[-1][1] for name in functions}
    assert summary["step_mode"].split()[0] == expected[-1][1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(functions) * len(expected) and "falls back to" in warnings[0]
    # nothing was counted twice or lost: the run is the eager run, number for number
    for ours, eager in zip(records_of(tmp_path / case), eager_run[1], strict=True):
        assert ours["train_loss"] == eager["train_loss"] and ours["val_acc"] == eager["val_acc"]


def test_the_mode_ladder_gives_up_only_on_its_last_mode():
    ladder, lines = ModeLadder([Mode("compiled"), EAGER], log=lambda line: None), []

    def call(mode):
        lines.append(mode.name)
        raise ValueError("broken step")

    with pytest.raises(ValueError, match="broken step"):
        ladder.guard("x", call, lambda mode: True)
    assert lines == ["compiled", "eager"] and ladder.mode_of("x") is EAGER


def test_each_function_steps_down_alone():
    """A failure in one function moves that function only; the others keep the best mode."""
    ladder, log = ModeLadder([Mode("graphs"), Mode("compiled"), EAGER], log=[].append), []

    def features(mode):
        if mode.name == "graphs":
            raise RuntimeError("LoweringException: simulated")
        log.append(("features", mode.name))

    for _ in range(2):
        ladder.guard("frozen features", features, lambda mode: True)
        ladder.guard("full step", lambda mode: log.append(("full", mode.name)), lambda mode: True)
    assert log == [("features", "compiled"), ("full", "graphs")] * 2
    assert ladder.function_modes() == {"frozen features": "compiled", "full step": "graphs"}
    assert ladder.common_mode() == "mixed" and ladder.describe().startswith("per function: ")
    assert [(f["where"], f["from"], f["to"]) for f in ladder.fallbacks] == [("frozen features", "graphs", "compiled")]


class FirstCaptureFails(CheckedCapture):
    """Capture fails for the first function captured (the frozen features) and works for the rest."""

    def capture(self, body):
        if not hasattr(self, "failed"):
            self.failed = True
            raise RuntimeError("operation not permitted when stream is capturing")
        return super().capture(body)


@pytest.mark.compiled
def test_one_failing_function_leaves_the_others_graphed(digits, eager_run, tmp_path, capsys):
    """The frozen features' capture fails: they run compiled, the head step, the full step and
    evaluation stay graphs, summary.json says so per function, and the numbers are eager's."""
    capture = FirstCaptureFails()
    with pytest.MonkeyPatch.context() as mp:
        force_modes(mp, [Mode("graphs"), Mode("compiled"), EAGER], capture, no_compile)
        summary = run(short_cfg(digits), tmp_path / "mixed")
    assert summary["function_modes"] == {"frozen features": "compiled", "head step": "graphs",
                                         "evaluation": "graphs", "full step": "graphs"}
    assert [(f["where"], f["to"]) for f in summary["mode_fallbacks"]] == [("frozen features", "compiled")]
    assert summary["step_mode"] == ("per function: frozen features compiled, head step graphs, "
                                    "evaluation graphs, full step graphs")
    out = capsys.readouterr()
    assert "a function that fails to build steps down alone (to compiled, eager)" in out.out
    assert [line for line in out.err.splitlines() if line.startswith("warning:")] == [
        "warning: graphs mode failed in frozen features (RuntimeError: operation not permitted when stream is "
        "capturing); frozen features falls back to compiled (fullgraph, static shapes), other functions keep theirs"]
    assert len(capture.captured) == 3
    for ours, eager in zip(records_of(tmp_path / "mixed"), eager_run[1], strict=True):
        assert ours["train_loss"] == eager["train_loss"] and ours["val_acc"] == eager["val_acc"]


def test_phase_sgd_equals_one_sgd_over_the_model(tmp_path):
    """Head-only steps, then everything, with the momentum carried over: as torch's SGD over all
    parameters with the frozen ones left without gradients (what the trainer did before)."""
    cfg = OptimConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ours, ref = (build_model(build_config("smoke").model) for _ in range(2))
    ref.load_state_dict(ours.state_dict())
    phase = PhaseSGD(ours, cfg, torch.device("cpu"))
    sgd = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(0)
    for step_no in range(6):
        frozen = step_no < 3
        if step_no in (0, 3):
            phase.enter(ours.head.parameters() if frozen else ours.parameters())
        x = torch.randn(4, 3, 32, 32, generator=g)
        for model in (ours, ref):
            model.eval()  # no dropout: the two models must see the same function
            with torch.no_grad() if frozen else torch.enable_grad():
                feats = model.features(x)
            model.head(feats).logsumexp(1).mean().backward()
        phase.lr.fill_(cfg.lr * (1 - step_no / 10))
        for group in sgd.param_groups:
            group["lr"] = cfg.lr * (1 - step_no / 10)
        phase.sgd.step()
        sgd.step()
        phase.zero_grad()
        sgd.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    saved = phase.state_dict()["momentum"]
    assert set(saved) == {n for n, _ in ours.named_parameters()}
    assert all(math.isfinite(float(v.abs().sum())) for v in saved.values())


@pytest.mark.compiled
@pytest.mark.slow
def test_a_compiled_schedule_builds_each_graph_once_and_matches_eager(digits, tmp_path):
    """torch.compile (inductor) on the CPU through train, evaluation, TTA, scoring and every phase
    boundary, with timm's tiny test ConvNeXt. Dropout 0: inductor draws dropout masks from another
    random stream than eager PyTorch, so with dropout the two runs would differ by design."""
    from torch._dynamo.utils import counters

    extra = {"model.name": "test_convnext", "model.dropout": 0, "train.frozen_chunk": 128,
             "run.max_steps_per_epoch": 3}
    eager = run(short_cfg(digits, **extra), tmp_path / "eager")
    before = counters["stats"]["unique_graphs"]
    compiled = run(short_cfg(digits, **extra, **{"model.compile": "on"}), tmp_path / "compiled")
    assert compiled["step_mode"].startswith("compiled") and compiled["mode_fallbacks"] == []
    # one graph per function, built at its first use: a recompile (a shape, a guard) would add one
    assert compiled["compile_graphs"] == {"frozen features": 1, "head step": 1, "full step": 1, "evaluation": 1}
    assert counters["stats"]["unique_graphs"] - before == 4 and compiled["compile_seconds"] > 0
    for ours, ref in zip(records_of(tmp_path / "compiled"), records_of(tmp_path / "eager"), strict=True):
        assert abs(ours["train_loss"] - ref["train_loss"]) < 1e-3, ours["epoch"]
    assert abs(compiled["best_acc_tta"] - eager["best_acc_tta"]) <= 1 / 179  # one test image at most


def test_phase_sgd_resumes_momentum_in_its_parameters_layout():
    """A checkpoint's momentum, whatever its memory layout, goes into buffers laid out as the
    parameters (channels_last convolutions): the fused kernel walks both as flat arrays."""
    cfg, device = OptimConfig(lr=0.1), torch.device("cpu")
    model = build_model(build_config("smoke").model)  # channels_last, like every preset
    live = PhaseSGD(model, cfg, device)
    live.enter(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    live.lr.fill_(0.1)
    live.sgd.step()
    saved = {k: v.contiguous() for k, v in live.state_dict()["momentum"].items()}  # a contiguous file
    assert any(not v.is_contiguous() for v in live.state_dict()["momentum"].values())  # there is a case
    twin = build_model(build_config("smoke").model)
    twin.load_state_dict(model.state_dict())
    resumed = PhaseSGD(twin, cfg, device)
    resumed.load_state_dict({"momentum": saved})
    resumed.enter(twin.parameters())
    g = torch.Generator().manual_seed(1)
    for a, b in zip(model.parameters(), twin.parameters()):
        a.grad = torch.randn(a.shape, generator=g).to(memory_format=torch.preserve_format)
        b.grad = a.grad.clone()
    for opt in (live, resumed):
        opt.lr.fill_(0.1)
        opt.sgd.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.compiled
def test_the_gpu_reports_graph_check_compares_captured_and_eager_steps(monkeypatch):
    """fastcifar.bench.cudacheck.check_graph_step, run here with the CPU capture stand-in: the same
    parameters and evaluation both ways, and it knows when graphs did not run."""
    from fastcifar.bench import cudacheck

    monkeypatch.setattr(step, "compile_fn", no_compile)
    out = cudacheck.check_graph_step(torch.device("cpu"), steps=3, capture=CheckedCapture())
    assert out["ok"] and out["mode_ran"] == "graphs" and out["params_max_rel_err"] == 0.0
    failed = cudacheck.check_graph_step(torch.device("cpu"), steps=3, capture=FailingCapture())
    # it fell back (per function: those captured by then; the rest only warmed up): not a pass
    assert failed["mode_ran"] in ("eager", "mixed") and not failed["ok"]
    assert cudacheck.check_graph_step(torch.device("cpu"))["ok"] is None  # no CUDA: skipped, says why
