"""One-off GPU probe (not committed): kernel loop diagnosis, graphs mode on ConvNeXt-B, kernel
breakdown, eager-eval launches with/without cudnn.benchmark, small-map depthwise micro-benchmark."""
import json
import math
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
OUT = os.environ.get("OUT", "/tmp/probe-out")
os.makedirs(OUT, exist_ok=True)
T0 = time.time()
DEADLINE = float(os.environ.get("PROBE_BUDGET", "200"))
RES = {}


def save():
    with open(os.path.join(OUT, "probe.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)


def section(name, fn, need=20):
    left = DEADLINE - (time.time() - T0)
    print(f"\n== {name} (t={time.time() - T0:.0f}s, left {left:.0f}s) ==", flush=True)
    if left < need:
        RES[name] = "skipped: no time"
        return
    t = time.time()
    try:
        RES[name] = fn()
    except Exception as e:  # noqa
        traceback.print_exc()
        RES[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    RES[name + "_s"] = round(time.time() - t, 1)
    print(json.dumps(RES[name], default=str)[:3000], flush=True)
    save()


def kernel_tests():
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_masked_ce.py", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", "-k", "per_class or column_loop or thresholds", "-x", "--tb=line"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    return r.stdout[-2500:]


def kernel_diag():
    import torch
    from fastcifar.kernels import masked_ce as mce
    out = []
    n, c = 24, 6
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, c, generator=g) * 3).cuda()
    labels = torch.randint(0, c, (n,), generator=g).cuda()
    ref_p = torch.softmax(logits, 1) - torch.nn.functional.one_hot(labels, c).float()
    for thr_kind in ("zeros", "inf"):
        thr = torch.zeros(c, device="cuda") if thr_kind == "zeros" else torch.full((c,), math.inf, device="cuda")
        for block in (4, 8):
            for nw in (1, 4, 8):
                per_sample = torch.full((n,), float("nan"), device="cuda")
                keep = torch.ones(n, dtype=torch.bool, device="cuda")
                grad = torch.full((n, c), float("nan"), device="cuda")
                mce._ce_loop_kernel[(n,)](logits, logits.stride(0), labels, labels, thr, 0.0, per_sample, 1.0,
                                          per_sample, keep, grad, c, 0.0, HAS_B=False, THR_FROM_PTR=False,
                                          THR_PER_CLASS=True, LAM_FROM_PTR=False, WRITE_GRAD=True, BLOCK_C=block,
                                          num_warps=nw)
                torch.cuda.synchronize()
                want = ref_p if thr_kind == "inf" else torch.zeros_like(ref_p)
                bad = ~torch.isclose(grad, want, atol=1e-6, rtol=1e-4)
                out.append({"thr": thr_kind, "block": block, "warps": nw, "nan": int(grad.isnan().sum()),
                            "bad": int(bad.sum()), "bad_at": bad.nonzero()[:6].tolist(),
                            "keep": int(keep.sum()), "loss_nan": int(per_sample.isnan().sum())})
    return out


def engine_graphs():
    import torch
    from fastcifar.backend import setup_backend
    import test_bench_train as tb
    from fastcifar.graphs import Mode
    dev = torch.device("cuda")
    flags = setup_backend(dev)
    res = {"flags": flags}
    t = time.time()
    bed = tb.Bed(Mode("graphs"), dev)
    res["bed_s"] = time.time() - t
    for phase in ("full", "eval", "head"):
        if DEADLINE - (time.time() - T0) < 40:
            res[phase] = "no time"
            continue
        call, steps, images = bed.step(phase)
        t = time.time()
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        first = time.time() - t
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(3):
            s.record()
            for _ in range(20):
                call()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 20 / steps)
        res[phase] = {"first3_s": first, "ms_per_step": sorted(times)[1], "mode": bed.engine.mode,
                      "fallbacks": bed.engine.report()["mode_fallbacks"]}
        print(phase, res[phase], flush=True)
        if phase == "full":
            res["profile_graph_replay"] = profile(call, 3)
            comp = bed.engine.full._build(Mode("compiled"))
            comp()
            torch.cuda.synchronize()
            res["profile_compiled"] = profile(comp, 3)
            s.record()
            for _ in range(20):
                comp()
            e.record(); e.synchronize()
            res["compiled_ms"] = s.elapsed_time(e) / 20
        save()
    return res


def profile(fn, n):
    import torch
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    agg = {}
    for ev in p.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = agg.setdefault(ev.name, [0, 0.0])
            a[0] += 1
            a[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])
    total = sum(v[1] for v in agg.values())
    return {"kernels_per_call": sum(v[0] for v in agg.values()) / n, "gpu_ms_per_call": total / n / 1e3,
            "top": [[k[:140], v[0] / n, round(v[1] / n / 1e3, 4)] for k, v in rows[:45]]}


def eval_launches():
    import torch
    from fastcifar.config import build_config
    from fastcifar.model import build_model
    cfg = build_config("paper", {"model.pretrained": "false"})
    m = build_model(cfg.model).cuda().eval()
    x = torch.randn(500, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    res = {}
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            for _ in range(2):
                m(x)
            torch.cuda.synchronize()
            p = profile(lambda: m(x), 1)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10):
                m(x)
            e.record(); e.synchronize()
        p["ms"] = s.elapsed_time(e) / 10
        p["top"] = p["top"][:12]
        res[f"cudnn_benchmark_{bench}"] = p
    return res


def small_dw_micro():
    import torch
    import torch.nn.functional as F
    res = []

    def small(x, w, b):
        n, c, h, wd = x.shape
        r = w.shape[-1] // 2
        i, j = torch.arange(h, device=x.device), torch.arange(wd, device=x.device)
        di = r + i[None, :] - i[:, None]  # [i, a]
        dj = r + j[None, :] - j[:, None]
        weff = w[:, 0][:, di[:, None, :, None], dj[None, :, None, :]]  # (C, i, j, a, b)
        xh = x.permute(0, 2, 3, 1)  # N a b C
        wt = weff.permute(1, 2, 3, 4, 0)  # i j a b C
        out = (xh[:, None, None] * wt[None]).sum((3, 4)) + b
        return out.permute(0, 3, 1, 2)

    small_c = torch.compile(small, dynamic=False)
    for c, h in ((1024, 1), (512, 2), (256, 4)):
        x = torch.randn(100, c, h, h, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.randn(c, 1, 7, 7, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x.requires_grad_(True)
        row = {"c": c, "h": h}
        for name, fn in (("cudnn", lambda: F.conv2d(x, w, b, padding=3, groups=c)), ("small_compiled", lambda: small_c(x, w, b))):
            def step():
                y = fn()
                y.float().sum().backward()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(50):
                step()
            e.record(); e.synchronize()
            row[name + "_ms_fwd_bwd"] = s.elapsed_time(e) / 50
        ref = F.conv2d(x.float(), w.float(), b.float(), padding=3, groups=c)
        row["max_err"] = float((small(x.float(), w.float(), b.float()) - ref).abs().max())
        res.append(row)
    return res


if __name__ == "__main__":
    import torch
    RES["env"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    section("kernel_tests", kernel_tests, 30)
    section("kernel_diag", kernel_diag, 10)
    section("eval_launches", eval_launches, 20)
    section("small_dw_micro", small_dw_micro, 30)
    section("engine_graphs", engine_graphs, 60)
    save()
    print(f"\nprobe done in {time.time() - T0:.0f}s", flush=True)
