"""Benchmark the aggregated-attention op alone: Triton kernels against the reference.

Shapes are the aggregated-attention stages of TransNeXt-Tiny (dims 72/144/288,
heads 3/6/12, head size 24, sr 8/4/2, window 3) at 224 (batch 128) and 640
(batch 16). Activations (q, k, v, k_pool, v_pool, pool_bias) are bf16 as under
autocast; q is a (B, N, C) Linear output viewed as heads, k/v the two halves of
one (B, N, 2C) output (non-contiguous views), the small per-head parameters fp32.

Times are medians of ``triton.testing.do_bench`` (CUDA events, after warm-up).
``host_enqueue_fwd_bwd_ms`` (JSON only) is the host time to enqueue one fwd+bwd: where
it is close to ``fwd_bwd_ms`` the op is launch-bound at that shape.
Memory: ``inputs`` is what the inputs themselves occupy; ``peak`` is the peak
allocated during one forward+backward *above* the inputs (outputs, saved
tensors, gradients and workspace included).

    PYTHONPATH=src python3 benchmarks/bench_op.py --out benchmarks/results/op.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from transnext.ops.aggregated_attention import aggregated_attention  # noqa: E402

TINY = dict(dims=(72, 144, 288), heads=(3, 6, 12), sr=(8, 4, 2))
# (label, batch, image size)
SETTINGS = [("224", 128, 224), ("640", 16, 640)]


def stage_shapes(batch: int, img: int):
    out = []
    for i, (C, h, sr) in enumerate(zip(TINY["dims"], TINY["heads"], TINY["sr"])):
        H = W = img // (4 * 2 ** i)
        Ph, Pw = max(1, H // sr), max(1, W // sr)
        out.append(dict(stage=i + 1, B=batch, H=H, W=W, C=C, h=h, d=C // h, P=Ph * Pw))
    return out


def make_inputs(B, H, W, C, h, d, P, dtype=torch.bfloat16, device="cuda", window=3):
    N = H * W
    ww = window * window
    g = torch.Generator(device=device).manual_seed(0)

    def rn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dt)

    qx = rn(B, N, C).requires_grad_()
    kvx = rn(B, N, 2 * C).requires_grad_()
    kvp = rn(B, P, 2 * C).requires_grad_()
    pb = rn(h, N, P, std=0.5).requires_grad_()
    params = [
        rn(h, 1, d, std=0.02, dt=torch.float32).requires_grad_(),  # query_embedding
        torch.full((h, 1, 1), 1.2, device=device).requires_grad_(),  # temperature
        rn(h, ww, std=0.0004, dt=torch.float32).requires_grad_(),
        rn(h, d, ww, std=0.02, dt=torch.float32).requires_grad_(),
        torch.zeros(h, 1, ww, device=device).requires_grad_(),
    ]
    leaves = [qx, kvx, kvp, pb, *params]

    def views():
        q = qx.view(B, N, h, d)
        k, v = kvx.view(B, N, 2, h, d).unbind(2)
        kp, vp = kvp.view(B, P, 2, h, d).unbind(2)
        return (q, k, v, kp, vp, pb, *params)

    return leaves, views


def bench_one(shape, backend, do_bench):
    B, H, W, C, h, d, P = (shape[k] for k in ("B", "H", "W", "C", "h", "d", "P"))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    leaves, views = make_inputs(B, H, W, C, h, d, P)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    gout = torch.randn(B, H * W, h, d, device="cuda", dtype=torch.bfloat16)
    base_with_gout = torch.cuda.memory_allocated()

    def fwd():
        with torch.no_grad():
            return aggregated_attention(*views(), H, W, 3, backend=backend)

    def fwd_bwd():
        out = aggregated_attention(*views(), H, W, 3, backend=backend)
        return torch.autograd.grad(out, leaves, gout)

    res = dict(shape, backend=backend)
    try:
        fwd_bwd()  # warm / compile
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        res["peak_fwd_bwd_MiB"] = (torch.cuda.max_memory_allocated() - base_with_gout) / 2**20
        torch.cuda.reset_peak_memory_stats()
        fwd()
        torch.cuda.synchronize()
        res["peak_fwd_MiB"] = (torch.cuda.max_memory_allocated() - base_with_gout) / 2**20
        res["inputs_MiB"] = base / 2**20
        res["fwd_ms"] = do_bench(fwd, warmup=25, rep=200, return_mode="median")
        res["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=300, return_mode="median")
        # host-side cost: time to enqueue 20 fwd+bwd (no sync inside) vs. until they finish
        import time
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fwd_bwd()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        res["host_enqueue_fwd_bwd_ms"] = (t1 - t0) / 20 * 1e3
        res["wall_fwd_bwd_ms"] = (t2 - t0) / 20 * 1e3
    except torch.cuda.OutOfMemoryError as e:
        res["error"] = f"OOM: {str(e)[:80]}"
    del leaves, views, gout
    torch.cuda.empty_cache()
    return res


def _fwd_bwd_step(shape):
    """A closure running one Triton forward+backward at ``shape`` (bf16)."""
    B, H, W, C, h, d, P = (shape[k] for k in ("B", "H", "W", "C", "h", "d", "P"))
    leaves, views = make_inputs(B, H, W, C, h, d, P)
    gout = torch.randn(B, H * W, h, d, device="cuda", dtype=torch.bfloat16)

    def step():
        out = aggregated_attention(*views(), H, W, 3, backend="triton")
        return torch.autograd.grad(out, leaves, gout)

    return step


def _kernel_times(step, iters: int = 5) -> dict:
    """Device ms per call of each CUDA kernel that ``step`` launches (torch.profiler).
    Kernel time, not wall time: at small shapes the op is host-bound and a wall-clock
    sweep would time the host."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    tot: dict = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            tot[e.name] = tot.get(e.name, 0.0) + e.device_time / iters / 1000
    return tot


def kernel_profile(shape):
    """Per-kernel CUDA time of one triton forward+backward."""
    tot = _kernel_times(_fwd_bwd_step(shape))
    for name, ms in sorted(tot.items(), key=lambda x: -x[1])[:12]:
        print(f"   {ms:8.3f} ms  {name[:90]}")


# Launch configurations swept by --tune, per kernel (merged over tk.TUNE's entry).
TUNE_SPACE = {
    "fwd": [dict(BLOCK_N=bn, BLOCK_P=bp, num_warps=w) for bn, bp, w in
            [(64, 32, 4), (32, 32, 4), (32, 32, 2), (16, 32, 2), (16, 64, 2), (32, 64, 4),
             (64, 64, 4), (128, 32, 8)]],
    "bwd_q": [dict(BLOCK_N=bn, BLOCK_P=bp, num_warps=w, programs_per_sm=g, ONE_PB_MAX=o)
              for bn, bp, w, g, o in
              [(32, 32, 2, 32, 0), (16, 32, 2, 32, 0), (16, 64, 2, 32, 64), (32, 64, 4, 32, 64),
               (32, 32, 2, 8, 0), (32, 32, 2, 64, 0), (32, 32, 4, 32, 0), (64, 32, 4, 32, 0)]],
    "bwd_kv_local": [dict(BLOCK_N=bn, num_warps=w) for bn, w in
                     [(32, 4), (16, 2), (32, 2), (64, 4), (64, 8), (128, 8)]],
    "bwd_kv_pool": [dict(BLOCK_N=bn, BLOCK_P=bp, num_warps=w, programs_per_sm=g)
                    for bn, bp, w, g in
                    [(64, 64, 4, 8), (32, 64, 4, 8), (64, 32, 4, 8), (32, 32, 2, 8),
                     (128, 64, 8, 8), (64, 64, 8, 8)]],
}
KERNEL_NAMES = {"fwd": "_fwd_kernel", "bwd_q": "_bwd_q_kernel",
                "bwd_kv_local": "_bwd_kv_local_kernel", "bwd_kv_pool": "_bwd_kv_pool_kernel"}


def tune(shape) -> dict:
    """Per-kernel sweep of launch configs at one shape, each kernel timed by its own device
    time (the four are independent: each reads only the forward's outputs and delta).
    Returns {kernel: {"best": cfg, "ms": best ms, "base_ms": ms of the current entry}}."""
    from transnext.ops import triton_kernels as tk

    step = _fwd_bwd_step(shape)
    result = {}
    only = os.environ.get("TUNE_KERNELS")
    for name, variants in TUNE_SPACE.items():
        if only and name not in only.split(","):
            continue
        # the entry this shape runs with ("<kernel>_small" on small maps), swept in place of
        # TUNE[name] (a small entry would otherwise override every variant)
        base = dict(tk._entry(name, shape["H"] * shape["W"]))
        saved, small = dict(tk.TUNE[name]), tk.TUNE.pop(name + "_small", None)
        timings = []
        for var in variants:
            tk.TUNE[name] = dict(base, **var)
            try:
                ms = _kernel_times(step).get(KERNEL_NAMES[name], float("nan"))
            except Exception as e:  # noqa: BLE001  (a config that does not compile)
                print(f"   {name} {var}: failed {type(e).__name__}: {str(e)[:100]}")
                continue
            print(f"   {name} {var}: {ms:.4f} ms", flush=True)
            timings.append((ms, var))
        tk.TUNE[name] = saved
        if small is not None:
            tk.TUNE[name + "_small"] = small
        best_ms, best = min(timings, key=lambda t: t[0])
        base_ms = next((ms for ms, var in timings  # the variant that is the current entry
                        if all(base.get(k) == v for k, v in var.items())), float("nan"))
        result[name] = dict(best=best, ms=best_ms, base_ms=base_ms)
        print(f"-> {name}: {best} {best_ms:.4f} ms (current {base_ms:.4f})", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true",
                    help="sweep launch configs per kernel at every stage shape")
    ap.add_argument("--tune-out", default=None, help="with --tune: write the sweep's JSON here")
    ap.add_argument("--profile", action="store_true", help="per-kernel times, every shape")
    ap.add_argument("--out", default="benchmarks/results/op.json")
    ap.add_argument("--backends", default="triton,reference")
    ap.add_argument("--settings", default="224,640")
    args = ap.parse_args()
    from triton.testing import do_bench

    dev = torch.cuda.get_device_name()
    if args.profile:
        for label, batch, img in SETTINGS:
            for shp in stage_shapes(batch, img):
                print(f"== {label} {shp}")
                kernel_profile(shp)
        return
    if args.tune:
        found = {}
        for label, batch, img in SETTINGS:
            if label not in args.settings.split(","):
                continue
            for shp in stage_shapes(batch, img):
                print(f"== {label} stage {shp['stage']} {shp}", flush=True)
                found[f"{label}/stage{shp['stage']}"] = dict(shape=shp, kernels=tune(shp))
        if args.tune_out:
            with open(args.tune_out, "w") as f:
                json.dump(found, f, indent=1)
        return
    rows = []
    for label, batch, img in SETTINGS:
        if label not in args.settings.split(","):
            continue
        for shp in stage_shapes(batch, img):
            shp = dict(shp, img=label)
            for be in args.backends.split(","):
                r = bench_one(shp, be, do_bench)
                rows.append(r)
                print(json.dumps(r), flush=True)

    print(f"\ndevice: {dev}, torch {torch.__version__}, bf16, window 3, d=24")
    hdr = (f"{'img':>4} {'st':>2} {'B':>4} {'HxW':>8} {'h':>3} {'P':>4} | "
           f"{'fwd ms tri/ref':>16} {'x':>6} | {'f+b ms tri/ref':>17} {'x':>6} | "
           f"{'peak f+b MiB tri/ref':>22} {'ratio':>6} | {'inputs MiB':>10}")
    print(hdr)
    print("-" * len(hdr))
    by = {(r["img"], r["stage"], r["backend"]): r for r in rows}
    for label, _, _ in SETTINGS:
        for st in (1, 2, 3):
            t = by.get((label, st, "triton"))
            r = by.get((label, st, "reference"))
            if t is None:
                continue

            def g(x, k):
                return float("nan") if x is None or k not in x else x[k]

            print(f"{label:>4} {st:>2} {t['B']:>4} {str(t['H']) + 'x' + str(t['W']):>8} {t['h']:>3} "
                  f"{t['P']:>4} | {g(t, 'fwd_ms'):7.3f}/{g(r, 'fwd_ms'):8.3f} "
                  f"{g(r, 'fwd_ms') / g(t, 'fwd_ms'):6.1f} | {g(t, 'fwd_bwd_ms'):7.3f}/"
                  f"{g(r, 'fwd_bwd_ms'):9.3f} {g(r, 'fwd_bwd_ms') / g(t, 'fwd_bwd_ms'):6.1f} | "
                  f"{g(t, 'peak_fwd_bwd_MiB'):10.1f}/{g(r, 'peak_fwd_bwd_MiB'):11.1f} "
                  f"{g(t, 'peak_fwd_bwd_MiB') / g(r, 'peak_fwd_bwd_MiB'):6.3f} | "
                  f"{g(t, 'inputs_MiB'):10.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=dev, torch=torch.__version__, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
