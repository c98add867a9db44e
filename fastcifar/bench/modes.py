"""What mode (graphs, compiled, eager) each of an Engine's functions ran in, for benchmark rows and checks.

The Engine's functions are its steps: "frozen features" and "head step" (the frozen phase),
"full step" (the phases that train the backbone) and "evaluation" (evaluation, TTA, scoring).
Each climbs down the mode ladder on its own when a mode fails to build, so a phase's row says
what its own functions ran in (a function not called yet is in the Engine's planned mode).
"""

from __future__ import annotations

PHASE_FUNCTIONS = {"head": ("frozen features", "head step"), "full": ("full step",),
                   "full+filter": ("full step",), "eval": ("evaluation",), "tta": ("evaluation",)}


def function_modes(engine, names=None) -> dict[str, str]:
    """{function name: mode that ran} for `names` (default: every function that has run)."""
    ran = engine.function_modes()
    if names is None:
        return ran
    return {name: ran.get(name, engine.mode) for name in names}


def shared_mode(modes: dict[str, str]) -> str:
    """The one mode all these functions ran in, or "mixed"."""
    found = set(modes.values())
    return found.pop() if len(found) == 1 else "mixed"


def fallbacks(engine) -> list[dict]:
    """The Engine's steps down the ladder so far: [{"from", "to", "where", "cause"}]."""
    return list(engine.report().get("mode_fallbacks") or [])


def phase_facts(engine, phase: str) -> dict:
    """Row facts for a step benchmark of `phase`: the mode shared by its functions (`ran`), each
    function's mode, and the fall-backs so far (one line each)."""
    modes = function_modes(engine, PHASE_FUNCTIONS[phase])
    steps_down = [f"{f['where']}: {f['from']} -> {f['to']} ({f['cause'][:160]})" for f in fallbacks(engine)]
    return {"ran": shared_mode(modes), "function_modes": modes, "fallbacks": steps_down}
