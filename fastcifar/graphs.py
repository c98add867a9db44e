"""How the hot functions run — as CUDA graphs, compiled, or eager — and the step down when one fails.

Modes, best first:
    graphs     each whole step (augmentation, forward, loss, backward, optimizer, statistics) is
               captured once as a torch.cuda.CUDAGraph and replayed: one launch per step. We capture
               by hand rather than with torch.compile's "reduce-overhead" because that makes separate
               graphs for the forward, the backward and the optimizer with Python in between, and the
               step's small tensors (lr, thresholds, counters) would still be host work between them.
               The functions inside are compiled before capture (model.compile_mode when that mode
               makes no CUDA graphs of its own, e.g. max-autotune-no-cudagraphs; else inductor's default).
    compiled   the same functions through torch.compile(fullgraph=True, dynamic=False); the rest of
               the step runs eagerly. A compile mode that turns on inductor's own CUDA graphs
               (reduce-overhead, max-autotune) runs here, with cudagraph_mark_step_begin per step.
    eager      plain PyTorch.
Nothing of this has to work the first time on a new machine: a failure while a mode is being built
(compilation, capture, a Triton error) steps that function — and only that one — down to its next
mode with one warning line; the full step, the frozen features, the head step and evaluation each
keep the best mode that works for them, and what ran is reported per function (the epoch lines,
summary.json). Once a function has run in a mode, its errors are real errors and propagate.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Mode:
    name: str  # graphs | compiled | eager
    compile_mode: str | None = None  # torch.compile mode (None: inductor's default)
    inductor_graphs: bool = False  # that compile mode makes CUDA graphs of its own

    @property
    def compiles(self) -> bool:
        return self.name != "eager"

    def describe(self) -> str:
        if self.name == "graphs":
            inside = f" ({self.compile_mode})" if self.compile_mode else ""
            return f"graphs (each step one CUDA graph; compiled{inside} inside)"
        if self.name == "compiled":
            extra = f", {self.compile_mode}" if self.compile_mode else ""
            return f"compiled (fullgraph, static shapes{extra}{': inductor CUDA graphs' if self.inductor_graphs else ''})"
        return "eager"


EAGER = Mode("eager")


def _mode_makes_graphs(compile_mode: str) -> bool:
    if compile_mode == "default":
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options(compile_mode).get("triton.cudagraphs"))


def plan_modes(cfg: ModelConfig, device: torch.device, *, distributed: bool, scaler: bool) -> tuple[list[Mode], list[str]]:
    """The modes to try, best first, and why better ones are left out (notes for the start-up lines).

    CUDA graphs need CUDA, one process (a captured step cannot hold DDP's NCCL collectives here)
    and no GradScaler (its step reads an inf check back to the host).
    """
    on_cuda = device.type == "cuda"
    if cfg.cuda_graphs == "on" and not on_cuda:
        raise ConfigError("model.cuda_graphs=on needs a CUDA device (run.device=cuda)")
    if not (cfg.compile == "on" or (cfg.compile == "auto" and on_cuda)):
        if cfg.cuda_graphs == "on":
            raise ConfigError("model.cuda_graphs=on needs model.compile on or auto")
        return [EAGER], []
    default = None if cfg.compile_mode == "default" else cfg.compile_mode
    if _mode_makes_graphs(cfg.compile_mode):  # inductor captures; ours would nest inside it
        return [Mode("compiled", default, inductor_graphs=on_cuda), Mode("compiled"), EAGER], []
    modes, notes = [Mode("compiled", default), EAGER], []
    if cfg.cuda_graphs != "off" and on_cuda:
        blockers = [why for bad, why in ((distributed, "several processes (DDP)"),
                                         (scaler, "fp16 with a GradScaler")) if bad]
        if blockers and cfg.cuda_graphs == "on":
            raise ConfigError(f"model.cuda_graphs=on is not possible with {' and '.join(blockers)}")
        if blockers:
            notes.append(f"CUDA graphs off: {' and '.join(blockers)}")
        else:  # a compile mode without graphs of its own (max-autotune-no-cudagraphs) runs inside ours
            modes.insert(0, Mode("graphs", default))
    return modes, notes


@dataclass
class CompileStats:
    """Graphs torch.compile built, per function, and the seconds of the calls that built them."""

    graphs: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled graphs between runs (TORCHINDUCTOR_CACHE_DIR, else a folder
    in the system's temporary directory): a second run with the same shapes compiles from it."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # older layouts of torch: the documented default
        import getpass
        import os
        import tempfile

        return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                          f"torchinductor_{getpass.getuser()}")
    return cache_dir()


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_fn(fn: Callable, name: str, mode: Mode, stats: CompileStats) -> Callable:
    """torch.compile(fn) for `mode`, counting into `stats` the graphs each call builds."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode.compile_mode)

    def run(*args, **kwargs):
        before, t0 = _unique_graphs(), time.perf_counter()
        out = compiled(*args, **kwargs)
        built = _unique_graphs() - before
        if built:
            stats.graphs[name] = stats.graphs.get(name, 0) + built
            stats.seconds += time.perf_counter() - t0
        return out

    return run


class CudaGraphCapture:
    """Capture a step with torch.cuda.graph (its own memory pool) after warm-up on a side stream."""

    def __init__(self, device: torch.device):
        self.device = device

    def warm(self, body: Callable[[], None]) -> None:
        # Warm-up on a side stream, as capture requires (lazy allocations, cuBLAS workspaces).
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, body: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph.replay


class Graphed:
    """`body()` — a step that reads and writes only tensors that live as long as this object —
    run for real `warmup` times, then captured once, then replayed on every call.

    Capture does not execute the work, so the call that captures replays at once: every call does
    exactly one step. `backend` is CudaGraphCapture on a GPU (tests pass a CPU stand-in).
    """

    def __init__(self, body: Callable[[], None], backend, warmup: int = 2):
        self.body, self.backend, self.warmup = body, backend, warmup
        self.replay: Callable[[], None] | None = None
        self.calls = 0

    @property
    def ready(self) -> bool:
        return self.replay is not None

    def __call__(self) -> None:
        if self.replay is None:
            if self.calls < self.warmup:
                self.calls += 1
                self.backend.warm(self.body)
                return
            self.replay = self.backend.capture(self.body)
        self.replay()


class ModeLadder:
    """Each function's mode and its own step down: `guard(name, call, settled)` runs a function's
    first calls so that a failure while building its mode moves that function (one warning line)
    to its next mode and calls again. The first H200 run (2026-12-04) showed why per function: one
    ladder for all let a compile failure in the frozen features put the full step in eager too."""

    def __init__(self, modes: list[Mode], log: Callable[[str], None] | None = None):
        self.planned = list(modes)
        self._modes: dict[str, list[Mode]] = {}  # function -> its modes left, current first
        self.fallbacks: list[dict] = []  # {"from", "to", "where", "cause"}
        self.proven: set[tuple[str, str]] = set()  # (function, mode) that have run
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    @property
    def best(self) -> Mode:
        """The mode every function starts in."""
        return self.planned[0]

    def mode_of(self, name: str) -> Mode:
        return self._modes.get(name, self.planned)[0]

    def function_modes(self) -> dict[str, str]:
        """{function: its current mode's name} for the functions that have been called."""
        return {name: modes[0].name for name, modes in self._modes.items()}

    def common_mode(self) -> str:
        """The mode every called function is in ("mixed" when they differ; the planned one before any call)."""
        names = set(self.function_modes().values()) or {self.best.name}
        return names.pop() if len(names) == 1 else "mixed"

    def describe(self) -> str:
        """One line: the shared mode's description, or each function with its mode."""
        modes = self.function_modes()
        if len(set(modes.values())) <= 1:
            return (self._modes[next(iter(modes))] if modes else self.planned)[0].describe()
        return "per function: " + ", ".join(f"{name} {mode}" for name, mode in modes.items())

    def guard(self, name: str, call: Callable[[Mode], object], settled: Callable[[Mode], bool]):
        """call(mode) until one works; `settled(mode)` says when this function no longer needs the guard
        (a graph counts as settled once captured and replayed)."""
        modes = self._modes.setdefault(name, list(self.planned))
        while True:
            mode = modes[0]
            if (name, mode.name) in self.proven:
                return call(mode)
            try:
                out = call(mode)
            except Exception as e:  # noqa: BLE001  (any failure to build a mode means: not here)
                if len(modes) == 1:
                    raise
                self.step_down(name, e)
                continue
            if settled(mode):
                self.proven.add((name, mode.name))
            return out

    def step_down(self, where: str, cause: BaseException) -> None:
        modes = self._modes[where]  # guard made it
        failed, nxt = modes[0], modes[1]
        text = f"{type(cause).__name__}: {cause}".strip().splitlines()[0][:300]
        self.fallbacks.append({"from": failed.name, "to": nxt.name, "where": where, "cause": text})
        self.log(f"warning: {failed.name} mode failed in {where} ({text}); {where} falls back to "
                 f"{nxt.describe()}, other functions keep theirs")
        modes.pop(0)
