"""Where a training (or inference) step's time goes: top operators by device time.

    python benchmarks/profile_model.py --model transnext_tiny --batch 128 --size 224
"""
from __future__ import annotations

import argparse
import sys
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
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", default=None, help="write the table to this file too")
    args = p.parse_args(argv)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(args.model).to(dev).to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(
        memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
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
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
