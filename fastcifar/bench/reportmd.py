"""The GPU report as markdown: a pure function of the result set (fastcifar.bench.benchreport), no torch.

Sections: summary, goals (issues 18 and 19), correctness on the device, steps (with the mode each
phase's functions ran in), the full step's GPU-time breakdown, the peer, the A/B candidates, the
schedule, the paper-equivalent pipeline, the tests on the device, and the parts. Each number
says where it comes from: CUDA events (the steps, the peer), torch.profiler (the breakdown's
kernel times, launches), perf_counter (epochs, the baseline's passes).
"""

from __future__ import annotations

PAPER_EPOCHS = 100


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return str(v)


def _pct(v) -> str:
    return "–" if v is None else f"{v:.1%}"


def _times(v) -> str:
    return "–" if v is None else f"{v:.3g}x"


def _backend_line(flags: dict) -> str:
    """The backend flags each part ran under (fastcifar.backend.backend_flags), said once where they agree."""
    if not flags:
        return "Backend flags: not recorded."
    shown = {part: ", ".join(f"{k} {_fmt(v)}" for k, v in f.items()) for part, f in flags.items()}
    if len(set(shown.values())) == 1:
        return (f"Backend flags (fastcifar.backend.setup_backend; parts {', '.join(shown)}): "
                f"{next(iter(shown.values()))}.")
    return "Backend flags differ between parts: " + "; ".join(f"{part}: {s}" for part, s in shown.items()) + "."


def _part_why(r: dict, name: str) -> str:
    why = ((r.get("parts") or {}).get(name) or {}).get("why")
    return f": {why}" if why else ""


def _graphs_full_ms(r: dict):
    return ((r.get("step_ms") or {}).get("full") or {}).get("graphs")


def _summary_lines(r: dict) -> list[str]:
    sched = r.get("schedule") or {}
    return ["## Summary", "", "| | value |", "|---|---:|",
            f"| full step, graphs mode, ms (CUDA events) | {_fmt(_graphs_full_ms(r))} |",
            f"| schedule seconds ({sched.get('target_epochs', PAPER_EPOCHS)} epochs"
            f"{', projected' if r.get('schedule_projected') else ', measured'}) | {_fmt(r.get('schedule_seconds'))} |",
            f"| paper-equivalent pipeline, seconds (projected) | {_fmt(r.get('baseline_seconds'))} |",
            f"| speedup vs the paper-equivalent pipeline | {_times(r.get('speedup_vs_baseline'))} |",
            f"| plain timm peer (reduce-overhead), full step ms (CUDA events) | "
            f"{_fmt((r.get('peer') or {}).get('ms_per_step'))} |",
            f"| speedup vs the peer (its full step / ours, graphs mode) | {_times(r.get('speedup_vs_peer'))} |"]


def _goal_lines(r: dict) -> list[str]:
    lines = ["## Goals", "", "| issue | goal | measured | target | met |", "|---|---|---:|---:|:-:|"]
    for g in r.get("goals", []):
        lines.append(f"| {g.get('issue', '–')} | {g['goal']} | {_fmt(g['value'])} | {_fmt(g['target'])} | "
                     f"{_fmt(g['met'])} |")
    return lines


def _check_lines(check: dict) -> list[str]:
    lines = ["## Correctness on the device", "", "| check | ok | details |", "|---|:-:|---|"]
    for name, c in check.items():
        detail = c.get("error") or c.get("skipped") or ", ".join(
            f"{k} {_fmt(v)}" for k, v in c.items() if (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         and k != "seconds") or k in ("mode_ran", "function_modes"))
        if name == "kernel" and "cases" in c:
            worst = max((max(x["rel_err"].values()) for x in c["cases"]), default=None)
            detail = f"{len(c['cases'])} cases, worst relative error {_fmt(worst)}"
        lines.append(f"| {name} | {_fmt(c.get('ok'))} | {detail} |")
    return lines


def _step_lines(r: dict) -> list[str]:
    tables = {"images/s": r.get("images_per_s"), "MFU": r.get("mfu"), "launches": r.get("launches_per_step"),
              "peak": (r.get("peak_memory_gib") or {}).get("steps"), "ran": r.get("modes_ran"),
              "first": (r.get("compile_seconds") or {}).get("steps_first_call")}
    lines = ["## Steps (benchmarks/test_bench_train.py)", "",
             "ms/step: the median of timed rounds of calls, CUDA events on a GPU (perf_counter on the CPU); "
             "launches: torch.profiler; ran: the mode the phase's functions ran in (a mode that fails to "
             "build steps down the ladder).", "",
             "| phase | mode | ran | ms/step | images/s | MFU | launches/step | peak GiB | first call s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for phase, modes in (r.get("step_ms") or {}).items():
        for mode, ms in modes.items():
            cell = {k: (t or {}).get(phase, {}).get(mode) for k, t in tables.items()}
            lines.append(f"| {phase} | {mode} | {_fmt(cell['ran'])} | {_fmt(ms)} | {_fmt(cell['images/s'])} | "
                         f"{_pct(cell['MFU'])} | {_fmt(cell['launches'])} | {_fmt(cell['peak'])} | "
                         f"{_fmt(cell['first'])} |")
    return lines


def _breakdown_lines(b: dict | None) -> list[str]:
    lines = ["## Where the full step's GPU time goes (graphs mode)", ""]
    if not b:
        return lines + ["Not measured (the steps part's test_breakdown profiles the graphs mode, on CUDA only)."]
    lines += [f"Kernel times from torch.profiler (CUDA activity) over {b.get('steps_profiled')} steps of "
              f"{b.get('source')}; the function ran in {_fmt(b.get('ran'))}. Kernel time "
              f"{_fmt(b.get('gpu_ms_per_step'))} ms per step in {_fmt(b.get('kernels_per_step'))} kernels; "
              f"the step by CUDA events {_fmt(b.get('step_ms_cuda_events'))} ms.", "",
              "| category | ms/step | share | kernels/step |", "|---|---:|---:|---:|"]
    for name, c in (b.get("categories") or {}).items():
        lines.append(f"| {name} | {_fmt(c['ms_per_step'])} | {_pct(c['share'])} | {_fmt(c['kernels_per_step'])} |")
    if b.get("augmentation_ms_cuda_events") is not None:
        lines.append(f"\nAugmentation alone: {_fmt(b['augmentation_ms_cuda_events'])} ms per batch "
                     f"({b.get('augmentation_note')}).")
    lines += ["", "| top kernels | category | ms/step | calls/step | share |", "|---|---|---:|---:|---:|"]
    for k in b.get("top") or []:
        name = k["name"].replace("|", "\\|")
        lines.append(f"| `{name[:120]}` | {k['category']} | {_fmt(k['ms_per_step'])} | "
                     f"{_fmt(k['calls_per_step'])} | {_pct(k['share'])} |")
    return lines


def _peer_lines(r: dict) -> list[str]:
    peer = r.get("peer")
    lines = ["## The peer: the same model written plainly (fastcifar/bench/peer.py)", ""]
    if not peer:
        return lines + [f"Not measured{_part_why(r, 'peer')}."]
    return lines + [f"{peer.get('what')}; {peer.get('model')}, batch {peer.get('batch')}, torch.compile "
                    f"{peer.get('compile_mode')}: {_fmt(peer.get('ms_per_step'))} ms per step ({peer.get('timer')}, "
                    f"median of rounds {', '.join(_fmt(x) for x in peer.get('rounds_ms') or [])}); first step "
                    f"(compilation) {_fmt(peer.get('first_step_s'))} s. Our graphed full step: "
                    f"{_fmt(_graphs_full_ms(r))} ms, so "
                    f"{_times(r.get('speedup_vs_peer'))} the peer's speed (ours includes the augmentation)."]


def _candidate_lines(r: dict) -> list[str]:
    cand = r.get("candidates")
    lines = ["## Candidates (A/B in the same call, graphs mode)", ""]
    if not cand:
        return lines + [f"Not measured{_part_why(r, 'candidates')}."]
    lines += [f"Switch: `{cand.get('switch')}`; off = the steps part's rows, on = this part's (CUDA events).", "",
              "| phase | off ms | on ms | off / on | ran (off, on) |", "|---|---:|---:|---:|---|"]
    for phase, c in (cand.get("phases") or {}).items():
        lines.append(f"| {phase} | {_fmt(c['off_ms'])} | {_fmt(c['on_ms'])} | {_times(c['off_over_on'])} | "
                     f"{_fmt(c.get('ran_off'))}, {_fmt(c.get('ran_on'))} |")
    return lines


def _schedule_lines(sched: dict) -> list[str]:
    lines = ["## Schedule (real epochs, perf_counter)", "", "| phase | epochs run | first epoch s | steady epoch s |",
             "|---|---:|---:|---:|"]
    for phase, s in (sched.get("phase_epoch_seconds") or {}).items():
        lines.append(f"| {phase} | {sched['phase_epochs'][phase]} | {_fmt(sched['phase_first_epoch_seconds'][phase])} "
                     f"| {_fmt(s)} |")
    if sched.get("epochs_run") is not None:
        warm = {True: "warm (the earlier parts filled it)", False: "cold"}.get(sched.get("inductor_cache_warm"), "–")
        lines.append(f"\n{sched['epochs_run']} epochs run ({_fmt(sched.get('measured_seconds'))} s), compile estimate "
                     f"{_fmt(sched.get('compile_seconds_est'))} s (the engine counted "
                     f"{_fmt(sched.get('engine_compile_seconds'))} s), start-up and finish "
                     f"{_fmt(sched.get('overhead_seconds'))} s, peak memory {_fmt(sched.get('peak_memory_gib'))} GiB; "
                     f"synthetic-data test accuracy {_pct(sched.get('best_acc'))}; step mode "
                     f"{_fmt(sched.get('step_mode'))}; inductor cache at the start: {warm}.")
    lines += [f"- fall-back: {f.get('where')}: {f.get('from')} -> {f.get('to')} ({f.get('cause')})"
              for f in sched.get("mode_fallbacks") or []]
    return lines + [f"- {n}" for n in sched.get("notes", [])]


def _baseline_lines(base: dict) -> list[str]:
    if not base:
        return []
    lines = ["## Paper-equivalent pipeline (fastcifar/bench/baseline.py, perf_counter)", "",
             "| pass | s/step | fixed s | epoch s |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {_fmt(v.get('per_step_s'))} | {_fmt(v.get('fixed_s'))} | {_fmt(v.get('epoch_s'))} |"
              for k, v in (base.get("passes") or {}).items()]
    return lines + ([f"\n{base['note']}"] if base.get("note") else [])


def _test_lines(r: dict) -> list[str]:
    tests, lines = r.get("tests"), ["## Tests on the device", ""]
    if not tests:
        return lines + [f"Not run{_part_why(r, 'tests')}."]
    lines.append(f"{', '.join(tests.get('files') or [])}: {tests.get('summary') or 'no summary line (cut short?)'}.")
    if tests.get("failures"):
        lines += ["", "| failed test | last line | message |", "|---|---|---|"]
        lines += [f"| `{f['id']}` | {(f.get('last_line') or '').replace('|', '/')} | "
                  f"{(f.get('message') or '').replace('|', '/')} |" for f in tests["failures"]]
    return lines


def render_markdown(r: dict) -> str:
    lines = [f"# fastcifar GPU report: {r['device']}, {r['date']}", "",
             f"torch {r.get('torch')} (CUDA {r.get('cuda')}), triton {r.get('triton')}, timm {r.get('timm')}, "
             f"driver {r.get('driver')}, Python {r.get('python')}; commit `{r.get('commit')}`; "
             f"model {r.get('model')} (random init); loader: {r.get('loader_note', '–')}.", "",
             _backend_line(r.get("backend_flags") or {}), ""]
    for section in (_summary_lines(r), _goal_lines(r), _check_lines(r.get("check") or {}), _step_lines(r),
                    _breakdown_lines(r.get("breakdown")), _peer_lines(r), _candidate_lines(r),
                    _schedule_lines(r.get("schedule") or {}), _baseline_lines(r.get("baseline") or {}),
                    _test_lines(r)):
        if section:
            lines += section + [""]
    lines += ["## Parts", "", "| part | status | seconds | cap s | why |", "|---|---|---:|---:|---|"]
    for name, p in r.get("parts", {}).items():
        status = p["status"] + (f" ({p['summary']})" if p.get("summary") else "")  # pytest's closing line
        lines.append(f"| {name} | {status} | {_fmt(p.get('seconds'))} | {_fmt(p.get('cap_s'))} | "
                     f"{p.get('why', '')} |")
    lines += [f"\n{n}" for n in r.get("notes", [])]
    return "\n".join(lines) + "\n"
