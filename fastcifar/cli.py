"""The training command line: arguments (overrides anywhere), --help with every key, exit codes.

Exit codes: 0 done (or a finished run asked to resume: nothing to do), 2 a bad input or a run
that cannot go on (one line on stderr, printed once under torchrun), 1 a bug (a traceback).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from pathlib import Path

from . import config
from .checkpoint import CheckpointError
from .config import PRESETS, Config, ConfigError, build_config, parse_overrides
from .distributed import SharedError, agree, env_rank, init_distributed, is_shared, on_main, shutdown
from .model import ModelError
from .rundir import RESUMABLE_OVERRIDES, RunError, choose_run_dir, finished_summary, resume_config
from .sources import DataError
from .train import TrainingError, resolve_device, run_training

# Errors that are the user's to fix (or a run that cannot go on): one line, exit 2, no traceback.
USER_ERRORS = (ConfigError, DataError, ModelError, RunError, CheckpointError, TrainingError)
# Shipped presets that train ConvNeXt-Base for 100 epochs: days on a CPU.
GPU_PRESETS = ("paper", "plus", "authors", "hires")


def field_notes() -> dict[str, str]:
    """{"section.field": the comment after its definition in config.py}: the units live there.

    Read back from the source (tokenize finds the comments, ast the fields), so a field someone
    adds with a comment is documented in --help without another list to keep in step.
    """
    try:
        source = inspect.getsource(config)
    except (OSError, TypeError):  # no source shipped (e.g. a zipped install): defaults only
        return {}
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    section_of = {f.default_factory.__name__: f.name for f in dataclasses.fields(Config)}  # type: ignore[union-attr]
    notes = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name in section_of:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.lineno in comments:
                    notes[f"{section_of[node.name]}.{item.target.id}"] = comments[item.lineno]
    return notes


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value) if value != "" else '""'


def _no_note(kind: str) -> str:
    return "true | false" if kind == "bool" else f"({kind}, no unit)"


def keys_help() -> str:
    """Every configuration key with its default and what it means (unit included), by section."""
    notes, defaults = field_notes(), Config()
    lines = ["configuration keys (override with section.field=value; default, then meaning and unit):"]
    for section in dataclasses.fields(Config):
        lines.append(f"  {section.name}:")
        for f in dataclasses.fields(getattr(defaults, section.name)):
            key = f"{section.name}.{f.name}"
            default = _shown(getattr(getattr(defaults, section.name), f.name))
            lines.append(f"    {key + ' = ' + default:<44} {notes.get(key, _no_note(f.type))}")
    lines += ["", "Defaults are the paper's text; a preset (--config) changes some of them.",
              f"--resume RUN_DIR accepts only: {', '.join(RESUMABLE_OVERRIDES)} (and --data-dir, which sets "
              f"data.dir to a copy of the same data); everything else comes from RUN_DIR/config.yaml."]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, exit 2, printed by one process under torchrun (every process parses the same argv)."""
        if env_rank() == 0:
            print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fastcifar.train",
                description="Train on noisy labels with the paper's schedule: checkpoints, resume, reports.",
                epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="paper", help=f"a preset ({', '.join(PRESETS)}) or a YAML file "
                                                      f"(default: paper)")
    p.add_argument("--data-dir", help="folder with train.beton, test.beton, meta.json (sets data.dir)")
    p.add_argument("--out", help="the run directory to create (default: run.out/<preset>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, anywhere on the line")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # intermixed: `--config smoke a=1 --out X b=2` keeps both overrides (plain parse_args rejects b=2)
    return build_parser().parse_intermixed_args(argv)


def refuse_cpu_for_big_presets(cfg: Config, preset: str) -> None:
    """run.device=auto without CUDA would train ConvNeXt-Base on the CPU for days: say so instead."""
    import torch

    if preset in GPU_PRESETS and cfg.run.device == "auto" and not torch.cuda.is_available():
        raise ConfigError(f"--config {preset} trains {cfg.model.name} for {cfg.train.epochs} epochs, which needs a "
                          f"CUDA GPU, and none is visible. Try --config smoke for a CPU-sized run, or pass "
                          f"run.device=cpu to train on the CPU anyway")


def plan(args: argparse.Namespace) -> tuple[Config, bool]:
    """(config, resume) from the arguments; raises a user error. Writes nothing."""
    overrides = parse_overrides(args.overrides)
    if args.data_dir:
        overrides["data.dir"] = args.data_dir
    if args.resume:
        cfg = resume_config(Path(args.resume), overrides)
    else:
        cfg = build_config(args.config, overrides)
        refuse_cpu_for_big_presets(cfg, args.config)
    resolve_device(cfg.run.device)  # run.device=cuda without a GPU: a user error, agreed on like the others
    return cfg, bool(args.resume)


def _device_type(cfg: Config | None) -> str:
    """The device type that picks the process group's backend (gloo also carries a failed plan)."""
    return "cpu" if cfg is None else resolve_device(cfg.run.device).type


def _exit_code(error: Exception) -> int:
    """2 for a user error or a run that cannot go on (wherever it happened), 1 for anything else."""
    names = {c.__name__ for c in USER_ERRORS}
    return 2 if isinstance(error, USER_ERRORS) or (isinstance(error, SharedError) and error.kind in names) else 1


def _report(error: Exception, rank: int) -> None:
    """Print `error` once across processes: by rank 0 when every process knows it, else where it happened.

    A TrainingError comes from statistics summed over processes, so every process raises it alike.
    """
    once = is_shared(error) or isinstance(error, TrainingError)
    if rank == 0 or not once:
        where = f" (on rank {error.rank})" if isinstance(error, SharedError) and error.rank else ""
        print(f"error{where}: {error}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = env_rank()
    try:
        try:
            (cfg, resume), error = plan(args), None
        except Exception as e:  # shared below, so that no process waits for one that has stopped
            cfg, resume, error = None, False, e
        dist = init_distributed(_device_type(cfg))
        agree(dist, error)
        if resume:
            done = on_main(dist, lambda: finished_summary(Path(args.resume)))
            if done is not None:
                if rank == 0:
                    acc = done.get("best_acc")
                    acc = f"{acc:.4f}" if isinstance(acc, (int, float)) else "not recorded"
                    print(f"{args.resume} is finished (best epoch {done.get('best_epoch')}, test accuracy "
                          f"{acc}); nothing to do, nothing changed. Start a new run with "
                          f"--out to train again.")
                return 0
            run_dir = Path(args.resume)
        else:
            # rank 0 names it (the timestamp) and checks it; it is created once data and model have opened
            run_dir = on_main(dist, lambda: choose_run_dir(cfg, args.out, args.config))
        summary = run_training(cfg, run_dir, resume=resume)
    except Exception as e:
        code = _exit_code(e)
        if code == 1 and not isinstance(e, SharedError):
            raise  # a bug: its traceback, where it happened
        _report(e, rank)
        return code
    finally:
        shutdown()
    if rank == 0:
        tta = summary["best_acc_tta"]
        print(f"done: best {summary['best_acc']:.4f} (epoch {summary['best_epoch']}), with flip TTA "
              f"{'n/a' if tta is None else f'{tta:.4f}'}; results in {run_dir}")
    return 0
