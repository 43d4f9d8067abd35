"""Benchmark multi-scale deformable attention alone: Triton kernels against the reference.

Cases (M=8 heads of D=32, P=4 points):

* ``dino_enc``   DINO encoder at 800x1333: levels 100x167, 50x84, 25x42, 13x21, B=2, Q=S
* ``dino_dec``   DINO decoder cross-attention: the same levels, B=2, Q=900 box queries
* ``m2f_pixdec`` Mask2Former pixel decoder at 512x512: levels 64x64, 32x32, 16x16, B=8, Q=S

Locations are realistic, not uniform (locality matters to both paths' caches): encoder
queries sample a few pixels around a reference point, decoder queries inside a box.
dtypes: ``bf16`` = value, locations and weights all bf16 (the reference then runs
grid_sample in bf16, its fastest); ``fp32``; ``amp`` = bf16 value with fp32 locations and
weights (what autocast produces; the reference then computes in fp32).

Times are medians of ``triton.testing.do_bench`` on CUDA (CUDA events, after warm-up),
of ``--reps`` wall-clock runs on the CPU. The reference gets the level metadata as Python
lists (tensors would be read back to the host each call). ``fwd`` runs under no_grad;
``fwd_bwd`` is one forward plus ``torch.autograd.grad`` for value, locations and weights.
Memory: peak allocated during one forward+backward above the inputs and the upstream
gradient.

    PYTHONPATH=src python3 benchmarks/bench_msda.py --out benchmarks/results/msda_h100.json
    PYTHONPATH=src python3 benchmarks/bench_msda.py --tune   # launch-config sweep (Triton)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from transnext.ops.msda import level_meta, ms_deform_attn  # noqa: E402

DINO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
M2F_LEVELS = [(64, 64), (32, 32), (16, 16)]
# name -> (B, levels, Q (None: S), box queries)
CASES = {
    "dino_enc": (2, DINO_LEVELS, None, False),
    "dino_dec": (2, DINO_LEVELS, 900, True),
    "m2f_pixdec": (8, M2F_LEVELS, None, False),
}
TINY = {  # --tiny: the same structure at toy sizes (CPU smoke runs)
    "dino_enc": (1, [(10, 17), (5, 9), (3, 5), (2, 3)], None, False),
    "dino_dec": (1, [(10, 17), (5, 9), (3, 5), (2, 3)], 30, True),
    "m2f_pixdec": (2, [(8, 8), (4, 4), (2, 2)], None, False),
}
DTYPES = {"bf16": (torch.bfloat16, torch.bfloat16), "fp32": (torch.float32, torch.float32),
          "amp": (torch.bfloat16, torch.float32)}  # (value dtype, locations/weights dtype)


def make_inputs(B, levels, Q, boxes, dtype, device, M=8, D=32, P=4, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    vdt, ldt = DTYPES[dtype]
    L = len(levels)
    S = sum(h * w for h, w in levels)
    Q = S if Q is None else Q
    hw = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)  # (W, H)
    if boxes:
        cxcy = torch.rand(B, Q, 1, 1, 1, 2, generator=g)
        wh = 0.02 + 0.5 * torch.rand(B, Q, 1, 1, 1, 2, generator=g)
        loc = cxcy + torch.randn(B, Q, M, L, P, 2, generator=g) * 2 / P * wh * 0.5
    else:  # each query at a pixel centre of its level, offsets of a few pixels
        ref = torch.cat([torch.stack(torch.meshgrid(
            (torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"), -1)
            .reshape(-1, 2) for h, w in levels])
        ref = ref[:Q].expand(B, Q, 2)[:, :, None, None, None, :]
        loc = ref + torch.randn(B, Q, M, L, P, 2, generator=g) * 3 / hw[:, None, :]
    aw = torch.randn(B, Q, M, L * P, generator=g).softmax(-1).view(B, Q, M, L, P)
    value = torch.randn(B, S, M, D, generator=g)
    leaves = [value.to(device, vdt).requires_grad_(), loc.to(device, ldt).requires_grad_(),
              aw.to(device, ldt).requires_grad_()]
    shapes, starts = level_meta(levels, None, device)
    return leaves, shapes, starts, Q, S


def _timer(device, reps):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")

    def cpu_bench(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return cpu_bench


def bench_one(name, spec, dtype, backend, device, reps):
    B, levels, Q, boxes = spec
    res = dict(case=name, dtype=dtype, backend=backend, B=B, levels=[list(x) for x in levels],
               M=8, D=32, P=4)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    leaves, shapes, starts, Q, S = make_inputs(B, levels, Q, boxes, dtype, device)
    res.update(Q=Q, S=S)
    gout = torch.randn(B, Q, 8 * 32, device=device, dtype=leaves[0].dtype)
    bench = _timer(device, reps)
    if backend == "reference":  # host lists: the reference would read tensors back (a sync)
        shapes, starts = [list(x) for x in levels], starts.tolist()

    def fwd():
        with torch.no_grad():
            return ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2],
                                  backend=backend)

    def fwd_bwd():
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
        return torch.autograd.grad(out, leaves, gout)

    try:
        fwd_bwd()  # warm-up / compile
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd()
            torch.cuda.synchronize()
            res["peak_fwd_bwd_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            res["inputs_MiB"] = sum(t.numel() * t.element_size() for t in leaves) / 2**20
        res["fwd_ms"] = bench(fwd)
        res["fwd_bwd_ms"] = bench(fwd_bwd)
    except torch.cuda.OutOfMemoryError as e:
        res["error"] = f"OOM: {str(e)[:80]}"
    if cuda:
        torch.cuda.empty_cache()
    return res


# --tune: launch configurations swept per kernel (merged over msda_triton.TUNE's entry)
TUNE_SPACE = [dict(BLOCK_R=br, num_warps=w) for br, w in
              [(16, 1), (32, 2), (32, 4), (64, 2), (64, 4), (128, 4), (128, 8), (256, 8)]]


def tune(cases, dtypes):
    """Each kernel's own time (``_fwd_impl`` / ``_bwd_impl`` called directly) over TUNE_SPACE
    at every case and dtype; prints the best per case."""
    from triton.testing import do_bench

    from transnext.ops import msda_triton as mt

    found = {}
    for name in cases:
        B, levels, Q, boxes = CASES[name]
        for dtype in dtypes:
            leaves, shapes, starts, Qn, S = make_inputs(B, levels, Q, boxes, dtype, "cuda")
            gout = torch.randn(B, Qn, 256, device="cuda", dtype=leaves[0].dtype)
            runs = {
                "fwd": lambda: mt._fwd_impl(leaves[0].detach(), shapes, starts,
                                            leaves[1].detach(), leaves[2].detach()),
                "bwd": lambda: mt._bwd_impl(leaves[0].detach(), shapes, starts,
                                            leaves[1].detach(), leaves[2].detach(), gout),
            }
            for kern, fn in runs.items():
                base = dict(mt.TUNE[kern])
                times = []
                key = "BLOCK_R_FP32" if leaves[0].dtype == torch.float32 else "BLOCK_R"
                for var in TUNE_SPACE:
                    var = {key if k == "BLOCK_R" else k: v for k, v in var.items()}
                    mt.TUNE[kern] = dict(base, MIN_PROGRAMS_PER_SM=0, **var)
                    try:
                        ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
                    except Exception as e:  # noqa: BLE001  (a config that does not compile)
                        print(f"   {kern} {var}: failed {type(e).__name__}: {str(e)[:80]}")
                        continue
                    times.append((ms, var))
                    print(f"   {name} {dtype} {kern} {var}: {ms:.4f} ms", flush=True)
                mt.TUNE[kern] = base
                best_ms, best = min(times, key=lambda t: t[0])
                found[f"{name}/{dtype}/{kern}"] = dict(best=best, ms=best_ms)
                print(f"-> {name} {dtype} {kern}: {best} {best_ms:.4f} ms", flush=True)
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/msda.json")
    ap.add_argument("--backends", default=None,
                    help="default: triton,reference (CPU: reference, unless TRITON_INTERPRET=1)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dtypes", default="bf16,fp32", help="bf16,fp32,amp")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (smoke runs)")
    ap.add_argument("--reps", type=int, default=5, help="CPU: timed runs per median")
    ap.add_argument("--tune", action="store_true", help="sweep the kernels' launch configs")
    ap.add_argument("--tune-out", default=None)
    args = ap.parse_args()
    cases = args.cases.split(",")
    dtypes = args.dtypes.split(",")
    if args.tune:
        found = tune(cases, dtypes)
        if args.tune_out:
            with open(args.tune_out, "w") as f:
                json.dump(found, f, indent=1)
        return
    table = TINY if args.tiny else CASES
    if args.backends is None:
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        args.backends = ("triton,reference" if args.device == "cuda" or interp
                         else "reference")
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    rows = []
    for name in cases:
        for dtype in dtypes:
            for be in args.backends.split(","):
                r = bench_one(name, table[name], dtype, be, args.device, args.reps)
                rows.append(r)
                print(json.dumps(r), flush=True)

    import triton

    print(f"\ndevice: {dev}, torch {torch.__version__}, triton {triton.__version__}; "
          "M=8, D=32, P=4; ms are medians")
    hdr = (f"{'case':>10} {'dtype':>5} {'B':>2} {'Q':>6} {'S':>6} | {'fwd ms tri/ref':>17} "
           f"{'x':>6} | {'f+b ms tri/ref':>18} {'x':>6} | {'peak f+b MiB tri/ref':>21}")
    print(hdr)
    print("-" * len(hdr))
    by = {(r["case"], r["dtype"], r["backend"]): r for r in rows}

    def g(x, k):
        return float("nan") if x is None or k not in x else x[k]

    def ratio(a, b):
        return a / b if b == b and b else float("nan")

    for name in cases:
        for dtype in dtypes:
            t, r = by.get((name, dtype, "triton")), by.get((name, dtype, "reference"))
            x = t or r
            if x is None:
                continue
            print(f"{name:>10} {dtype:>5} {x['B']:>2} {x.get('Q', 0):>6} {x.get('S', 0):>6} | "
                  f"{g(t, 'fwd_ms'):7.3f}/{g(r, 'fwd_ms'):9.3f} "
                  f"{ratio(g(r, 'fwd_ms'), g(t, 'fwd_ms')):6.1f} | "
                  f"{g(t, 'fwd_bwd_ms'):7.3f}/{g(r, 'fwd_bwd_ms'):10.3f} "
                  f"{ratio(g(r, 'fwd_bwd_ms'), g(t, 'fwd_bwd_ms')):6.1f} | "
                  f"{g(t, 'peak_fwd_bwd_MiB'):9.1f}/{g(r, 'peak_fwd_bwd_MiB'):11.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=dev, torch=torch.__version__, triton=triton.__version__,
                       tiny=args.tiny, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
