"""Where a training (or inference) step's time goes: top operators by device time.

    python benchmarks/profile_model.py --model transnext_tiny --batch 128 --size 224
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import timm  # noqa: E402

import transnext  # noqa: E402,F401


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="transnext_tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (with --compile)")
    p.add_argument("--sort", default="cuda", choices=["cuda", "cpu"],
                   help="order the printed rows by self device or host time (--out gets both)")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", default=None, help="write the table to this file too")
    args = p.parse_args(argv)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(args.model).to(dev).to(memory_format=torch.channels_last)
    fwd = torch.compile(model, mode=args.compile_mode) if args.compile else model
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(
        memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")  # as bench_model
    dtype = torch.bfloat16

    def step():
        if args.mode == "train":
            with torch.autocast(dev, dtype=dtype):
                loss = torch.nn.functional.cross_entropy(fwd(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), torch.autocast(dev, dtype=dtype):
                fwd(x)

    model.train(args.mode == "train")
    for _ in range(3):
        step()
    # Wall time per step without the profiler, and the host's share of it: a step whose
    # host time is close to its wall time is launch-bound, not GPU-bound.
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    t_host = (time.perf_counter() - t0) / 5
    if dev == "cuda":
        torch.cuda.synchronize()
    t_wall = (time.perf_counter() - t0) / 5
    summary = f"step: {t_wall * 1e3:.1f} ms wall, {t_host * 1e3:.1f} ms to enqueue on the host"
    print(summary)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    keys = ["self_cuda_time_total", "self_cpu_time_total"] if dev == "cuda" else \
        ["self_cpu_time_total"]
    if args.sort == "cpu":
        keys.reverse()
    tables = [prof.key_averages().table(sort_by=k, row_limit=args.rows,
                                        max_name_column_width=70) for k in keys]
    print(tables[0])
    if args.out:  # both orders: device time first (unless --sort cpu), then host time
        Path(args.out).write_text(summary + "\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
