"""Benchmark the LayerNorm kernels (``ops.layer_norm``) against PyTorch's, at the shapes of
TransNeXt's block norms (rows = tokens of a batch, width = the stage's dim).

Three ways to get a block norm's input for its Linear layers under bf16 autocast:

* ``torch``        ``F.layer_norm`` (fp32 out, as autocast runs it), then the cast to bf16
                   that the Linear makes (what ``nn.LayerNorm`` + autocast do);
* ``kernel_fp32``  ``ops.layer_norm`` with fp32 out, then the same cast;
* ``kernel_bf16``  ``ops.layer_norm`` writing bf16 directly (what the model runs).

The input x is the fp32 residual stream; the backward gets a bf16 gradient (x, weight and
bias gradients). Per way and shape, forward + backward:

* ``gpu_us``  the GPU's kernel time per call (torch.profiler sum): what a CUDA-graphed
              step pays;
* ``host_us`` the host's time to enqueue one call (no synchronisation): what an eager
              step pays where it is host-bound (TransNeXt's is at these sizes).

    PYTHONPATH=src python3 benchmarks/bench_norm.py --out benchmarks/results/norm.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from transnext.ops.layer_norm import layer_norm  # noqa: E402

from bench_op import _kernel_times  # noqa: E402
from common import table  # noqa: E402

DIMS = (72, 144, 288, 576)  # TransNeXt-Tiny
# (label, batch, image height, image width)
SETTINGS = [("224 b128", 128, 224, 224), ("512 b16", 16, 512, 512), ("800x1333 b2", 2, 800, 1333)]
WAYS = ("torch", "kernel_fp32", "kernel_bf16")


def shapes(settings):
    for label, b, h, w in settings:
        for i, c in enumerate(DIMS):
            s = 4 * 2 ** i
            yield dict(setting=label, stage=i + 1, rows=b * -(-h // s) * -(-w // s), width=c)


def step(way: str, x, w, b, g, backward: bool):
    if way == "torch":
        y = F.layer_norm(x, (x.shape[-1],), w, b, 1e-6).to(torch.bfloat16)
    elif way == "kernel_fp32":
        y = layer_norm(x, w, b, 1e-6, torch.float32)[0].to(torch.bfloat16)
    else:
        y = layer_norm(x, w, b, 1e-6, torch.bfloat16)[0]
    if backward:
        torch.autograd.grad(y, (x, w, b), g)


def gpu_us(fn, iters: int = 10) -> float:
    return 1e3 * sum(_kernel_times(fn, iters).values())


def host_us(fn, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    t = time.perf_counter() - t
    torch.cuda.synchronize()
    return t / iters * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_norm.py times CUDA kernels; no CUDA device here", file=sys.stderr)
        return 2

    rows = []
    for sh in shapes(SETTINGS):
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(sh["rows"], sh["width"], device="cuda", generator=gen).requires_grad_()
        w = (1 + 0.1 * torch.randn(sh["width"], device="cuda", generator=gen)).requires_grad_()
        b = (0.1 * torch.randn(sh["width"], device="cuda", generator=gen)).requires_grad_()
        g = torch.randn(x.shape, device="cuda", generator=gen).to(torch.bfloat16)
        row = dict(sh)
        for way in WAYS:
            row[f"{way}_gpu_us"] = gpu_us(lambda: step(way, x, w, b, g, True))
            row[f"{way}_host_us"] = host_us(lambda: step(way, x, w, b, g, True))
        rows.append(row)
        del x, w, b, g
        torch.cuda.empty_cache()

    totals = {}
    for r in rows:
        t = totals.setdefault(r["setting"], dict(setting=r["setting"], stage="all"))
        for k in r:
            if k.endswith("_us"):
                t[k] = t.get(k, 0.0) + r[k]
    for r in rows + list(totals.values()):
        r["gpu_ratio"] = r["kernel_bf16_gpu_us"] / r["torch_gpu_us"]
    cols = [("setting", "setting", ""), ("stage", "stage", ""), ("rows", "rows", ""),
            ("width", "width", "")]
    cols += [(f"{w}_{p}_us", f"{w} {p} us", ".1f") for p in ("gpu", "host") for w in WAYS]
    cols += [("gpu_ratio", "GPU time kernel_bf16 / torch", ".2f")]
    print(f"LayerNorm forward + backward, one call per stage ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}); 'all' sums one call of each stage")
    print(table(rows + list(totals.values()), cols))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           rows=rows, totals=list(totals.values())), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
