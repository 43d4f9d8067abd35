"""Whole-model throughput and memory, TransNeXt against timm baselines, one run.

GPU (default): training img/s (forward, backward, AdamW step; bf16 autocast),
inference img/s, peak memory, at 224 (train batch 128, infer batch 256) and
640 (batch 16), eager and/or torch.compile.
CPU (--device cpu): inference img/s at batch 1 and 8 on the reference path.

    python benchmarks/bench_model.py --out benchmarks/results/model.json
    python benchmarks/bench_model.py --device cpu --models transnext_tiny convnext_tiny

Timings: warm-up, then the median of --repeats timed windows of --iters steps
(CUDA events on the GPU, a monotonic clock on the CPU).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import timm  # noqa: E402

import transnext  # noqa: E402,F401  (registers the models)

DEFAULT_MODELS = ["transnext_tiny", "transnext_small", "convnext_tiny",
                  "swin_tiny_patch4_window7_224"]


def _make(name: str, size: int, device: str) -> torch.nn.Module:
    kwargs = {}
    if name.startswith("swin"):
        # swin needs the size at construction; it is the only one here that does.
        kwargs = dict(img_size=size)
    model = timm.create_model(name, **kwargs).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _timed(step, device: str, iters: int, repeats: int) -> float:
    """Median seconds per step."""
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1000 / iters)
        else:
            t = time.perf_counter()
            for _ in range(iters):
                step()
            samples.append((time.perf_counter() - t) / iters)
    return statistics.median(samples)


def bench_one(name: str, size: int, batch: int, mode: str, compiled: bool, device: str,
              warmup: int, iters: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = _make(name, size, device)
    x = torch.randn(batch, 3, size, size, device=device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast(
        "cpu", enabled=False)
    fwd = torch.compile(model) if compiled else model
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        target = torch.randint(0, 1000, (batch,), device=device)

        def step():
            with amp:
                loss = torch.nn.functional.cross_entropy(fwd(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), amp:
                fwd(x)
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sec = _timed(step, device, iters, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del model, fwd
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(model=name, size=size, batch=batch, mode=mode, compiled=compiled,
                img_per_s=batch / sec, ms_per_step=sec * 1000, peak_gib=peak)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--sizes", nargs="+", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=None, choices=["train", "infer"])
    p.add_argument("--compile", choices=["eager", "compiled", "both"], default="eager")
    p.add_argument("--batch", type=int, default=None, help="override every batch size")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results/model.json")
    args = p.parse_args(argv)

    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = args.models or (DEFAULT_MODELS if dev == "cuda" else
                             ["transnext_tiny", "convnext_tiny"])
    sizes = args.sizes or ([224, 640] if dev == "cuda" else [224])
    modes = args.modes or (["train", "infer"] if dev == "cuda" else ["infer"])
    compiled = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
    warmup = args.warmup or (5 if dev == "cuda" else 2)
    iters = args.iters or (10 if dev == "cuda" else 3)

    def batches(size, mode):
        if args.batch:
            return [args.batch]
        if dev == "cpu":
            return [1, 8]
        if size >= 512:
            return [16]
        return [128] if mode == "train" else [256]

    rows = []
    for size in sizes:
        for mode in modes:
            for batch in batches(size, mode):
                for comp in compiled:
                    for name in models:
                        try:
                            r = bench_one(name, size, batch, mode, comp, dev, warmup, iters,
                                          args.repeats)
                        except Exception as e:  # OOM, or a baseline that rejects the size
                            msg = "out of memory" if isinstance(e, torch.OutOfMemoryError) \
                                else f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                            r = dict(model=name, size=size, batch=batch, mode=mode,
                                     compiled=comp, error=msg)
                            if dev == "cuda":
                                torch.cuda.empty_cache()
                        rows.append(r)
                        _print_row(r)
    env = dict(device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor()
               or platform.machine(), torch=torch.__version__, threads=torch.get_num_threads(),
               python=platform.python_version())
    _print_table(rows, env)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    return rows


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"  {r['model']:<30} {r['size']:>4} b{r['batch']:<4} {r['mode']:<5} "
              f"{'compiled' if r['compiled'] else 'eager':<8} {r['error']}", flush=True)
        return
    mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
    print(f"  {r['model']:<30} {r['size']:>4} b{r['batch']:<4} {r['mode']:<5} "
          f"{'compiled' if r['compiled'] else 'eager':<8} {r['img_per_s']:>9.1f} img/s "
          f"{r['ms_per_step']:>8.1f} ms {mem}", flush=True)


def _print_table(rows: list[dict], env: dict) -> None:
    """Rows plus each TransNeXt row's ratio to convnext_tiny in the same setting."""
    print(f"\n{env}")
    print(f"| model | size | batch | mode | compile | img/s | peak GiB | vs convnext_tiny |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            continue
        base = [b for b in rows if b["model"] == "convnext_tiny" and "error" not in b
                and all(b[k] == r[k] for k in ("size", "batch", "mode", "compiled"))]
        ratio = ""
        if base and r["model"] != "convnext_tiny":
            ratio = f"{r['img_per_s'] / base[0]['img_per_s']:.2f}x"
            if r["peak_gib"] and base[0]["peak_gib"]:
                ratio += f", mem {r['peak_gib'] / base[0]['peak_gib']:.2f}x"
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['mode']} | "
              f"{'yes' if r['compiled'] else 'no'} | {r['img_per_s']:.1f} | {mem} | {ratio} |")


if __name__ == "__main__":
    main()
