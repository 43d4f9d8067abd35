"""Whole-model throughput and memory, TransNeXt against timm baselines, one run.

GPU (default): training img/s (forward, backward, AdamW step; bf16 autocast),
inference img/s, peak memory, at 224 (train batch 128, infer batch 256) and
640 (batch 16), eager and/or torch.compile.
CPU (--device cpu): inference img/s at batch 1 and 8 on the reference path; each
TransNeXt row twice by default, with PyTorch's Linear products and with oneDNN's on
packed weights (``ops.cpu_linear``, what ``transnext predict`` and ``eval`` use on the CPU;
``--cpu-linears``).

    python benchmarks/bench_model.py --out benchmarks/results/model.json
    python benchmarks/bench_model.py --device cpu --models transnext_tiny convnext_tiny

Timings: warm-up, then the median of --repeats timed windows of --iters steps
(CUDA events on the GPU, a monotonic clock on the CPU). On the CPU the rows of one
setting are timed in turns, a window each per round, so that drift hits them alike.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm  # noqa: E402
from common import timed  # noqa: E402

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


def _prepare(name: str, size: int, batch: int, mode: str, compiled: bool, device: str,
             compile_mode: str | None, linears: str):
    """(model, compiled-or-not callable, one step) for a row."""
    torch.manual_seed(0)
    model = _make(name, size, device)
    if linears == "packed":
        from transnext.ops import cpu_linear
        cpu_linear.pack_linears(model)
    x = torch.randn(batch, 3, size, size, device=device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast(
        "cpu", enabled=False)
    fwd = torch.compile(model, mode=compile_mode) if compiled else model
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
    return model, fwd, step


def _row(name, size, batch, mode, compiled, compile_mode, linears, sec, peak=None,
         reserved=None) -> dict:
    return dict(model=name, size=size, batch=batch, mode=mode, compiled=compiled,
                compile_mode=compile_mode if compiled else None, linears=linears,
                img_per_s=batch / sec, ms_per_step=sec * 1000, peak_gib=peak,
                reserved_gib=reserved)


def _error_row(e: Exception, name, size, batch, mode, compiled, linears) -> dict:
    msg = "out of memory" if isinstance(e, torch.OutOfMemoryError) \
        else f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return dict(model=name, size=size, batch=batch, mode=mode, compiled=compiled,
                linears=linears, error=msg)


def bench_one(name: str, size: int, batch: int, mode: str, compiled: bool, device: str,
              warmup: int, iters: int, repeats: int, compile_mode: str | None = None,
              linears: str = "torch") -> dict:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # reserved peak: this row's own
    model, fwd, step = _prepare(name, size, batch, mode, compiled, device, compile_mode,
                                linears)
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, iters, repeats, device)
    peak = reserved = None
    if device == "cuda":
        # Allocated peak of the timed steps; under CUDA graphs (reduce-overhead) the graphs'
        # memory pool is not counted as allocated, so the reserved peak (the whole run,
        # warm-up and capture included: what the process holds) is the comparable number.
        peak = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
    del model, fwd
    if compiled:
        torch._dynamo.reset()  # frees compiled graphs and CUDA-graph pools before the next row
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return _row(name, size, batch, mode, compiled, compile_mode, linears, sec, peak, reserved)


def bench_interleaved(variants, size: int, batch: int, mode: str, compiled: bool,
                      warmup: int, iters: int, repeats: int,
                      compile_mode: str | None = None) -> list[dict]:
    """CPU rows of one setting, timed in turns (one window of ``iters`` steps per row per
    round, ``repeats`` rounds, medians): a shared machine's drift then hits every row
    alike, where rows timed one after another differed by up to 30% between runs."""
    rows, steps = {}, {}
    for name, linears in variants:
        try:
            steps[(name, linears)] = _prepare(name, size, batch, mode, compiled, "cpu",
                                              compile_mode, linears)[2]
            for _ in range(warmup):
                steps[(name, linears)]()
        except Exception as e:  # a baseline that rejects the size, a model that fails
            steps.pop((name, linears), None)
            rows[(name, linears)] = _error_row(e, name, size, batch, mode, compiled, linears)
    samples = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            samples[k].append(timed(step, iters, 1, "cpu"))
    for (name, linears), sec in samples.items():
        rows[(name, linears)] = _row(name, size, batch, mode, compiled, compile_mode, linears,
                                     statistics.median(sec))
    steps.clear()
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    return [rows[k] for k in variants]


def check_backends(name: str, size: int, device: str) -> dict:
    """Whole-model check before timing: the Triton attention backend against the reference
    (logits and every parameter gradient; bf16 autocast on the GPU, fp32 on the CPU, where
    the kernels run only under TRITON_INTERPRET=1)."""
    from transnext.tools.backend_check import compare_backends

    torch.manual_seed(0)
    model = _make(name, size, device)
    x = torch.randn(4 if device == "cuda" else 1, 3, size, size, device=device)
    amp = torch.bfloat16 if device == "cuda" else None
    err = compare_backends(model, x, "triton", amp)
    tol = 3e-2 if amp is not None else 5e-3
    ok = err["logits"] < tol and err["grad"] < tol
    if not ok and amp is not None:
        # bf16 error compounds over depth (19-24 blocks): then the backend passes when its
        # error against fp32 is at most twice the reference's own bf16 error.
        mine, ref = err["vs_fp32"]["backend"], err["vs_fp32"]["reference"]
        ok = all(mine[k] <= 2 * ref[k] for k in ("logits", "grad"))
    del model
    return dict(model=name, size=size, batch=x.shape[0], dtype=str(amp or torch.float32),
                tol=tol, ok=ok, **err)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--sizes", nargs="+", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=None, choices=["train", "infer"])
    p.add_argument("--compile", choices=["eager", "compiled", "both"], default="eager")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compiled rows (e.g. reduce-overhead: CUDA "
                        "graphs); default: torch's default")
    p.add_argument("--batch", type=int, default=None, help="override every batch size")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--check", action="store_true",
                   help="first compare each TransNeXt model's Triton backend with the reference "
                        "(logits and gradients); exit 1 if one is off")
    p.add_argument("--cpu-linears", choices=["torch", "packed", "both"], default="both",
                   help="CPU inference: TransNeXt's Linear products by PyTorch, by oneDNN on "
                        "packed weights (ops.cpu_linear), or a row of each (default)")
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

    checks = []
    if args.check:
        for name in models:
            if name.startswith("transnext"):
                c = check_backends(name, sizes[0], dev)
                checks.append(c)
                print(f"  check {name} {c['size']}px {c['dtype']}: logits {c['logits']:.2e}, "
                      f"worst grad {c['grad']:.2e} ({c['worst_param']}), tol {c['tol']:.0e}: "
                      f"{'ok' if c['ok'] else 'FAILED'}", flush=True)
                if "vs_fp32" in c:
                    f = c["vs_fp32"]
                    print(f"    against fp32: triton logits {f['backend']['logits']:.2e} grad "
                          f"{f['backend']['grad']:.2e}; reference logits "
                          f"{f['reference']['logits']:.2e} grad {f['reference']['grad']:.2e}",
                          flush=True)
    rows = []
    for size in sizes:
        for mode in modes:
            for batch in batches(size, mode):
                for comp in compiled:
                    variants = _variants(models, dev, mode, args.cpu_linears)
                    if dev == "cpu":
                        for r in bench_interleaved(variants, size, batch, mode, comp, warmup,
                                                   iters, args.repeats, args.compile_mode):
                            rows.append(r)
                            _print_row(r)
                        continue
                    for name, linears in variants:
                        try:
                            r = bench_one(name, size, batch, mode, comp, dev, warmup, iters,
                                          args.repeats, args.compile_mode, linears)
                        except Exception as e:  # OOM, or a baseline that rejects the size
                            r = _error_row(e, name, size, batch, mode, comp, linears)
                            if dev == "cuda":
                                torch.cuda.empty_cache()
                        rows.append(r)
                        _print_row(r)
    env = dict(device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor()
               or platform.machine(), torch=torch.__version__, threads=torch.get_num_threads(),
               python=platform.python_version())
    _print_table(rows, env)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows, checks=checks), indent=2))
    if not all(c["ok"] for c in checks):
        sys.exit("a backend check failed: the Triton backend disagrees with the reference")
    return rows


def _variants(models, device: str, mode: str, cpu_linears: str) -> list[tuple[str, str]]:
    """(model, linears) rows: packed products only for TransNeXt's CPU inference."""
    out = []
    for name in models:
        kinds = ["torch", "packed"] if cpu_linears == "both" else [cpu_linears]
        if device != "cpu" or mode != "infer" or not name.startswith("transnext"):
            kinds = ["torch"]
        out += [(name, k) for k in kinds]
    return out


def _label(r: dict) -> str:
    return r["model"] + (" (packed linears)" if r.get("linears") == "packed" else "")


def _mode(r: dict) -> str:
    if not r["compiled"]:
        return "eager"
    return f"compiled ({r['compile_mode']})" if r.get("compile_mode") else "compiled"


def _cuda_graphs(r: dict) -> bool:
    return r.get("compile_mode") == "reduce-overhead"


def _mem(r: dict) -> float | None:
    """The row's memory figure: allocated peak, or reserved peak under CUDA graphs."""
    return r.get("reserved_gib") if _cuda_graphs(r) else r.get("peak_gib")


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"  {_label(r):<30} {r['size']:>4} b{r['batch']:<4} {r['mode']:<5} "
              f"{_mode(r):<8} {r['error']}", flush=True)
        return
    mem = f"{r['peak_gib']:.1f} GiB (reserved {r['reserved_gib']:.1f})" \
        if r["peak_gib"] is not None else ""
    print(f"  {_label(r):<30} {r['size']:>4} b{r['batch']:<4} {r['mode']:<5} "
          f"{_mode(r):<8} {r['img_per_s']:>9.1f} img/s "
          f"{r['ms_per_step']:>8.1f} ms {mem}", flush=True)


def _print_table(rows: list[dict], env: dict) -> None:
    """Rows plus each TransNeXt row's ratio to convnext_tiny in the same setting. Memory:
    allocated peak, except under CUDA graphs (reduce-overhead): reserved peak, marked 'r'."""
    print(f"\n{env}")
    print("| model | size | batch | mode | compile | img/s | peak GiB | vs convnext_tiny |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            continue
        base = [b for b in rows if b["model"] == "convnext_tiny" and "error" not in b
                and all(b[k] == r[k] for k in ("size", "batch", "mode", "compiled"))
                and b.get("compile_mode") == r.get("compile_mode")]
        ratio = ""
        if base and r["model"] != "convnext_tiny":
            ratio = f"{r['img_per_s'] / base[0]['img_per_s']:.2f}x"
            if _mem(r) and _mem(base[0]):
                ratio += f", mem {_mem(r) / _mem(base[0]):.2f}x"
        mem = "-" if _mem(r) is None else f"{_mem(r):.1f}"
        if _cuda_graphs(r) and _mem(r) is not None:
            mem += " r"
        print(f"| {_label(r)} | {r['size']} | {r['batch']} | {r['mode']} | "
              f"{_mode(r)} | {r['img_per_s']:.1f} | {mem} | {ratio} |")


if __name__ == "__main__":
    main()
