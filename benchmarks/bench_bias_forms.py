"""The aggregated-attention forward (inference) with each form of the pooled position bias.

At dense sizes the (h, N, P) bias is hundreds of MB per block. In inference it can be
* ``dense``   written once per size and cached (what ``TRANSNEXT_POOL_BIAS=dense`` does),
* ``expand``  kept factored and written out per call into a temporary buffer,
* ``gather``  kept factored and read by the forward kernel itself (no (h, N, P) tensor).
This times the op alone per TransNeXt-T stage (random inputs, 16-bit activations, the
bias of the model's own geometry) and prints the size of the dense bias against the
factored table: what ``models.transnext.DENSE_CACHE_MAX_BYTES`` trades.

    PYTHONPATH=src python3 benchmarks/bench_bias_forms.py --out bias_forms.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import table, timed  # noqa: E402

from transnext.models.geometry import factor_bias, stage_geometry, stage_size  # noqa: E402
from transnext.ops import triton_kernels as tk  # noqa: E402
from transnext.ops.aggregated_attention import aggregated_attention  # noqa: E402

TINY = [(72, 3, 8), (144, 6, 4), (288, 12, 2)]  # (dim, heads, sr) of the aggregated stages
FORMS = ("dense", "expand", "gather")


def stage_inputs(img, batch, stage, mode, device, dtype):
    C, h, sr = TINY[stage]
    H, W = stage_size(img[0], stage), stage_size(img[1], stage)
    geo = stage_geometry(H, W, stage, sr, 224, None, mode, img[0])
    plan = geo.bias_plan(device)
    g = torch.Generator(device=device).manual_seed(stage)

    def rn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, device=device, generator=g) * std).to(dt)

    d, N, P = C // h, H * W, geo.num_pool
    fb = factor_bias(rn(plan.table.shape[0], h, std=0.5, dt=torch.float32), plan)
    kv, kvp = rn(batch, N, 2, h, d), rn(batch, P, 2, h, d)
    args = [rn(batch, N, h, d), *kv.unbind(2), *kvp.unbind(2)]
    params = [rn(h, 1, d, std=0.3, dt=torch.float32), torch.ones(h, 1, 1, device=device),
              rn(h, 9, std=0.3, dt=torch.float32), rn(h, d, 9, std=0.2, dt=torch.float32),
              rn(h, 1, 9, std=0.2, dt=torch.float32)]
    return args, fb, params, (H, W, N, P, h)


def measure(img, batch, mode, device, dtype, iters, repeats):
    rows = []
    for stage in range(3):
        args, fb, params, (H, W, N, P, h) = stage_inputs(img, batch, stage, mode, device, dtype)
        dense = fb.dense().contiguous()
        row = dict(size=f"{img[0]}x{img[1]}", batch=batch, mode=mode, stage=stage + 1, N=N,
                   P=P, heads=h, dense_mib=dense.numel() * 4 / 2**20,
                   table_mib=fb.table.numel() * 4 / 2**20)
        old = tk.TUNE["factored_infer"]
        try:
            with torch.no_grad():
                ref = aggregated_attention(*args, dense, *params, H, W, 3, backend="triton")
                for form in FORMS:
                    tk.TUNE["factored_infer"] = "expand" if form == "dense" else form
                    bias = dense if form == "dense" else fb

                    def step():
                        return aggregated_attention(*args, bias, *params, H, W, 3,
                                                    backend="triton")
                    out = step()
                    row[f"{form}_diff"] = ((out.float() - ref.float()).norm()
                                           / ref.float().norm()).item()
                    row[f"{form}_ms"] = timed(step, iters, repeats, device.type) * 1000
        finally:
            tk.TUNE["factored_infer"] = old
        rows.append(row)
        print(table([row], COLS).splitlines()[-1], flush=True)
    return rows


COLS = [("size", "size", ""), ("batch", "batch", "d"), ("mode", "mode", ""),
        ("stage", "stage", "d"), ("dense_mib", "dense bias MiB", ".0f"),
        ("table_mib", "table MiB", ".1f"), ("dense_ms", "dense (cached) ms", ".3f"),
        ("expand_ms", "expand ms", ".3f"), ("gather_ms", "gather ms", ".3f")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+",
                   default=["800x1333:2:interpolate", "1024x2048:1:extrapolate",
                            "512x512:16:extrapolate"],
                   help="HxW:BATCH:MODE (interpolate mode's img_size: the short side)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    # 16-bit activations as under autocast; fp16 on the CPU (triton's interpreter, tests)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__)
    print(env)
    print("\n".join(table([], COLS).splitlines()[:2]))
    rows = []
    for spec in args.shapes:
        size, batch, mode = spec.split(":")
        img = tuple(int(v) for v in size.split("x"))
        rows += measure(img, int(batch), mode, device, dtype, args.iters, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
