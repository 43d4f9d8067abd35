"""Linear-layer bias gradients at TransNeXt-Tiny's shapes: PyTorch's ``grad.sum(0)`` against
``ops.column_sum``, device time per call (profiler sum of the kernels each launches).

Per block and training step the bias gradients summed are the attention's joint q/kv/sr
product (the qkv product at stage 4), its output projection, the GLU's two fc1 halves and
fc2; the per-step totals multiply by the blocks per stage (2, 2, 15, 2).

    python benchmarks/bench_column_sum.py --out benchmarks/results/column_sum_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from bench_op import _kernel_times  # noqa: E402

from transnext.ops.column_sum import column_sum  # noqa: E402

DIMS, RATIOS, DEPTHS = (72, 144, 288, 576), (8, 8, 4, 4), (2, 2, 15, 2)
# (label, batch, stage-1 token grid)
SETTINGS = [("512", 16, (128, 128)), ("224", 128, (56, 56)), ("800x1333", 2, (200, 334))]


def shapes(batch: int, grid: tuple[int, int]):
    """(stage, rows, widths, blocks) of every bias gradient per block."""
    for i, (C, r, nb) in enumerate(zip(DIMS, RATIOS, DEPTHS)):
        M = batch * (grid[0] // 2 ** i) * (grid[1] // 2 ** i)
        hidden = int(2 * int(C * r) / 3)
        yield i + 1, M, [4 * C if i < 3 else 3 * C, C, hidden, hidden, C], nb


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=[s[0] for s in SETTINGS])
    p.add_argument("--out", default="benchmarks/results/column_sum.json")
    args = p.parse_args(argv)
    rows, totals = [], {}
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 gradients")
    print("| size | stage | rows | width | torch.sum us | column_sum us | GB/s | rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for label, batch, grid in SETTINGS:
        if label not in args.settings:
            continue
        tot_t = tot_k = 0.0
        for stage, M, widths, blocks in shapes(batch, grid):
            for N in dict.fromkeys(widths):  # each distinct width once, counted per use
                uses = widths.count(N) * blocks
                g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                t = sum(_kernel_times(lambda: g.sum(0), iters=10).values())
                k = sum(_kernel_times(lambda: column_sum(g), iters=10).values())
                ref = g.double().sum(0)
                err = ((column_sum(g).double() - ref).norm() / ref.norm()).item()
                rows.append(dict(size=label, stage=stage, M=M, N=N, uses_per_step=uses,
                                 torch_ms=t, kernel_ms=k, rel_err=err))
                print(f"| {label} | {stage} | {M} | {N} | {t * 1e3:.1f} | {k * 1e3:.1f} | "
                      f"{g.numel() * 2 / k / 1e6:.0f} | {err:.1e} |", flush=True)
                tot_t += t * uses
                tot_k += k * uses
        totals[label] = dict(torch_ms=tot_t, kernel_ms=tot_k)
    print("\nper training step (every block's Linear bias gradients):")
    for label, t in totals.items():
        print(f"  {label}: torch.sum {t['torch_ms']:.2f} ms, column_sum {t['kernel_ms']:.2f} ms")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
                       per_step=totals), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
