"""Dense-task backbones side by side: TransNeXt ``features_only`` against timm's
convnext_tiny and swin_tiny at detection and segmentation sizes, one run.

Training step = forward of the 4 feature maps, a loss on them, backward, fused AdamW
step (bf16 autocast, channels_last on the GPU); inference = forward under
inference_mode. TransNeXt runs in the bias modes the released dense models use:
``interp`` (interpolate mode, img_size = the short side unless --img-size), ``extrap``
and ``linear`` (fixed_pool_size 7). Swin gets its input padded to a multiple of 32.

    python benchmarks/bench_dense.py --out benchmarks/results/dense.json
    python benchmarks/bench_dense.py --shapes 800x1333:2 --variants interp \\
        --compile compiled --compile-mode reduce-overhead
    python benchmarks/bench_dense.py --shapes 800x1333:2 --profile prof.txt   # op table
    python benchmarks/bench_dense.py --shapes 800x1333:2 --variants interp --floor
    python benchmarks/bench_dense.py --shapes 512x512:16 --compile eager graphs

``--compile graphs`` records each model's eager step in CUDA graphs
(``engine.cuda_graphs.GraphedForward``, what ``--cuda-graphs`` does in the jobs): the
eager kernels without the host's time per launch, and without torch.compile.

``--costs`` adds per row where an eager step's time goes: the host's time to enqueue one
step (median), the GPU's kernel time of one step (profiler sum) and the kernels launched;
when the host time exceeds the GPU time, the step waits on Python and the dispatcher.

``--floor`` adds, for each TransNeXt row, one whose aggregated-attention op is replaced by
``q + k + v`` (plus zero times the sums of the pooled keys, values and bias table, so that
every other layer still runs forward and backward): what the rest of the backbone costs,
hence the best ratio any attention kernel could reach. A bound, not a model.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

# TRANSNEXT_SRC: another checkout's src/, to time an older version in the same session.
sys.path.insert(0, os.environ.get("TRANSNEXT_SRC") or str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm  # noqa: E402

import transnext  # noqa: E402,F401  (registers the models)
from common import timed  # noqa: E402
from transnext.engine.cuda_graphs import GraphedForward  # noqa: E402
from transnext.engine.models import compile_model  # noqa: E402

VARIANTS = ("interp", "extrap", "linear")
DEFAULT_SHAPES = ["800x1333:2", "512x512:16", "1024x2048:1"]


def _shape(text: str) -> tuple[int, int, int]:
    try:
        hw, batch = text.split(":")
        h, w = hw.lower().split("x")
        return int(h), int(w), int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not HxW:BATCH, e.g. 800x1333:2")


def _pad32(n: int) -> int:
    return -(-n // 32) * 32


def make_backbone(name: str, variant: str | None, H: int, W: int, img_size: int | None):
    """(label, model, input size) for one row."""
    if name.startswith("transnext"):
        kw = {}
        if variant == "interp":
            kw = dict(pos_bias="interpolate", img_size=img_size or min(H, W))
        elif variant == "linear":
            kw = dict(fixed_pool_size=7)
        label = f"{name}[{variant}" + (f"@{kw['img_size']}]" if variant == "interp" else "]")
        return label, timm.create_model(name, features_only=True, **kw), (H, W)
    if name.startswith("swin"):
        hw = (_pad32(H), _pad32(W))
        return name, timm.create_model(name, features_only=True, img_size=hw), hw
    return name, timm.create_model(name, features_only=True), (H, W)


def _no_attention(q, k, v, k_pool, v_pool, pool_bias, *args, **kwargs):
    """--floor's stand-in for the aggregated-attention op (same output shape and dtype)."""
    table = getattr(pool_bias, "table", pool_bias)  # FactoredBias or a dense (h, N, P) bias
    rest = k_pool.float().sum() + v_pool.float().sum() + table.float().sum()
    return q + k + v + (rest * 0).to(q.dtype)


def _no_attention_packed(qkv, *args, **kwargs):
    """The same for the op's packed form (q, k, v in one tensor: Triton training)."""
    return _no_attention(*qkv.unbind(2), *args, **kwargs)


@contextlib.contextmanager
def _attention_skipped(on: bool):
    import transnext.models.transnext as tm
    # (getattr: an older checkout under TRANSNEXT_SRC may not have the packed op)
    real = tm.aggregated_attention, getattr(tm, "aggregated_attention_packed", None)
    if on:
        tm.aggregated_attention, tm.aggregated_attention_packed = (_no_attention,
                                                                   _no_attention_packed)
    try:
        yield
    finally:
        tm.aggregated_attention = real[0]
        if real[1] is not None:
            tm.aggregated_attention_packed = real[1]


def bench_row(name, variant, H, W, batch, mode, compiled, compile_mode, device, img_size,
              warmup, iters, repeats, compile_how="model", floor=False, costs=False) -> dict:
    with _attention_skipped(floor):
        r = _bench_row(name, variant, H, W, batch, mode, compiled, compile_mode, device,
                       img_size, warmup, iters, repeats, compile_how, costs)
    if floor:
        r["model"] = r["model"][:-1] + ", attention op skipped]"
        r["floor"] = True
    return r


def _bench_row(name, variant, H, W, batch, mode, compiled, compile_mode, device, img_size,
               warmup, iters, repeats, compile_how, costs=False) -> dict:
    torch.manual_seed(0)
    label, model, (h, w) = make_backbone(name, variant, H, W, img_size)
    model = model.to(device)
    x = torch.randn(batch, 3, h, w, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    # the jobs' compile (static shapes); 'blocks' (regional) applies to TransNeXt only
    how = compile_how if name.startswith("transnext") else "model"
    fwd = (GraphedForward(model) if compiled == "graphs" else
           compile_model(model, how, compile_mode) if compiled else model)
    # torch.compile's CUDA graphs (not --compile graphs): each step must be marked
    mark_steps = compiled is True and compile_mode == "reduce-overhead"
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

        def step():
            if mark_steps:  # the last step's graph outputs are free to be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with amp:
                feats = fwd(x)
            loss = sum(f.float().square().mean() for f in feats)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            if mark_steps:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.inference_mode(), amp:
                fwd(x)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    if device == "cuda" and compiled != "graphs":  # a graph's memory is taken when recorded
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, iters, repeats, device)
    extra = _step_costs(step, device, iters) if costs else {}
    peak = reserved = None
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
    del model, fwd
    if compiled is True:
        torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(model=label, base=name, variant=variant, H=H, W=W, batch=batch, mode=mode,
                **_how(compiled, compile_mode, how), warmup_s=warmup_s,
                ms_per_step=sec * 1000, img_per_s=batch / sec, peak_gib=peak,
                reserved_gib=reserved, **extra)


def _how(compiled, compile_mode, compile_how) -> dict:
    """A row's execution mode: eager, compiled (torch.compile) or graphs (CUDA graphs of
    the eager step, no compile)."""
    if compiled == "graphs":
        return dict(how="graphs", compiled=False, compile_mode=None, compile_how=None)
    return dict(how="compiled" if compiled else "eager", compiled=bool(compiled),
                compile_mode=compile_mode if compiled else None,
                compile_how=compile_how if compiled else None)


def _step_costs(step, device: str, iters: int) -> dict:
    """Host ms to enqueue a step (median of ``iters``), and for CUDA one profiled step's
    kernel time (sum of kernel durations) and kernel count."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    host = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        step()
        host.append((time.perf_counter() - t) * 1000)
        sync()
    out = dict(host_ms=sorted(host)[len(host) // 2], gpu_ms=None, kernels=None)
    if device == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        ks = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out.update(gpu_ms=sum(e.device_time for e in ks) / 1000, kernels=len(ks))
    return out


def profile_step(name, variant, H, W, batch, device, img_size, out: str, rows: int,
                 by_shape: bool = False, mode: str = "train") -> str:
    """Top operators of two training (or inference) steps by device (or CPU) time, written
    to ``out``; ``by_shape``: one row per operator and input shapes (e.g. which reductions
    are slow)."""
    from torch.profiler import ProfilerActivity, profile

    label, model, (h, w) = make_backbone(name, variant, H, W, img_size)
    model = model.to(device).train(mode == "train")
    x = torch.randn(batch, 3, h, w, device=device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        if mode != "train":
            with torch.inference_mode(), amp:
                model(x)
            return
        with amp:
            loss = sum(f.float().square().mean() for f in model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts, record_shapes=by_shape) as prof:
        for _ in range(2):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=by_shape)
    wide = dict(max_name_column_width=40, max_shapes_column_width=70) if by_shape else {}
    what = "training" if mode == "train" else "inference"
    text = (f"{label} {H}x{W} batch {batch}, two {what} steps, {device}\n"
            + table.table(sort_by=key, row_limit=rows, **wide)
            + "\nThe same, by number of calls (host work per step: launches)\n"
            + table.table(sort_by="count", row_limit=rows))
    Path(out).write_text(text)
    return text


def _set_tune(item: str) -> tuple[str, object]:
    """Apply one ``--kernel-tune ENTRY=JSON``; returns (entry, what it now is)."""
    from transnext.ops import triton_kernels as tk

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--kernel-tune {item!r} is not ENTRY=JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--kernel-tune {item!r}: the value is not JSON ({e.msg})") from None
    if value is None:
        tk.TUNE.pop(key, None)
    elif isinstance(value, dict) and isinstance(tk.TUNE.get(key), dict):
        tk.TUNE[key] = {**tk.TUNE[key], **value}
    else:
        tk.TUNE[key] = value
    return key, tk.TUNE.get(key)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["transnext_tiny"])
    p.add_argument("--baselines", nargs="*",
                   default=["convnext_tiny", "swin_tiny_patch4_window7_224"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--shapes", nargs="+", type=_shape, default=None, metavar="HxW:BATCH",
                   help=f"default: {' '.join(DEFAULT_SHAPES)}")
    p.add_argument("--img-size", type=int, default=None,
                   help="interpolate mode's img_size (default: each shape's short side)")
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--compile", nargs="+", choices=["eager", "compiled", "graphs", "both"],
                   default=["eager"], help="execution modes to time (both: eager compiled; "
                   "graphs: the eager step recorded in CUDA graphs, no torch.compile)")
    p.add_argument("--compile-mode", default=None, help="e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--compile-how", choices=["model", "blocks"], default="model",
                   help="compile TransNeXt whole or block by block (regional; the baselines "
                        "are always compiled whole)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="instead of timing: profile the first model/variant/shape's step "
                        "(the first of --modes) and write the op table here")
    p.add_argument("--profile-rows", type=int, default=40)
    p.add_argument("--profile-by-shape", action="store_true",
                   help="with --profile: one row per operator and input shapes")
    p.add_argument("--costs", action="store_true",
                   help="also measure host enqueue ms, GPU kernel ms and kernels per step")
    p.add_argument("--floor", action="store_true",
                   help="also time each TransNeXt row with its attention op skipped (a bound)")
    p.add_argument("--kernel-tune", action="append", default=[], metavar="ENTRY=JSON",
                   help="change an entry of transnext.ops.triton_kernels.TUNE for this run "
                        "(repeatable): a dict is merged into the entry, null removes it; e.g. "
                        "fwd_small=null or 'fwd={\"num_stages\": 2}'")
    p.add_argument("--out", default="benchmarks/results/dense.json")
    args = p.parse_args(argv)
    try:
        tuned = [_set_tune(item) for item in args.kernel_tune]
    except ValueError as e:
        p.error(str(e))

    dev = args.device
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shapes = args.shapes or [_shape(s) for s in DEFAULT_SHAPES]
    if args.profile:
        H, W, batch = shapes[0]
        print(profile_step(args.models[0], args.variants[0], H, W, batch, dev, args.img_size,
                           args.profile, args.profile_rows, args.profile_by_shape,
                           args.modes[0]))
        return []
    modes = {"eager": [False], "compiled": [True], "graphs": ["graphs"], "both": [False, True]}
    compiled = [c for m in args.compile for c in modes[m]]
    warmup = args.warmup or (3 if dev == "cuda" else 1)
    iters = args.iters or (10 if dev == "cuda" else 1)
    env = dict(device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor()
               or platform.machine(), torch=torch.__version__, python=platform.python_version(),
               compile_mode=args.compile_mode, compile_how=args.compile_how,
               settings={k: v for k, v in os.environ.items() if k.startswith("TRANSNEXT_")},
               kernel_tune=dict(tuned))
    rows = []
    for H, W, batch in shapes:
        for mode in args.modes:
            for comp in compiled:
                runs = [(m, v, False) for m in args.models for v in args.variants]
                if args.floor:
                    runs += [(m, v, True) for m in args.models for v in args.variants]
                runs += [(b, None, False) for b in args.baselines]
                for name, variant, floor in runs:
                    try:
                        r = bench_row(name, variant, H, W, batch, mode, comp, args.compile_mode,
                                      dev, args.img_size, warmup, iters, args.repeats,
                                      args.compile_how, floor, args.costs)
                    except Exception as e:  # OOM or a rejected size: a row that says so
                        msg = ("out of memory" if isinstance(e, torch.OutOfMemoryError)
                               else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                        skip = ", attention op skipped" if floor else ""
                        r = dict(model=name if variant is None else f"{name}[{variant}{skip}]",
                                 base=name, variant=variant, H=H, W=W, batch=batch, mode=mode,
                                 **_how(comp, args.compile_mode, args.compile_how), error=msg)
                        gc.collect()
                        if dev == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(r)
                    print("  " + _row_text(r, rows), flush=True)
                    _write(args.out, env, rows)  # a run cut short keeps its rows
    print(f"\n{env}")
    print("| backbone | size | batch | mode | compile | ms/step | peak GiB | vs convnext_tiny |"
          + (" host ms | GPU ms | kernels |" if args.costs else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.costs else ""))
    for r in rows:
        print(_row_text(r, rows, markdown=True, costs=args.costs))
    return rows


def _write(out: str, env: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(env=env, rows=rows), indent=2))


def _row_text(r: dict, rows: list[dict], markdown: bool = False, costs: bool = False) -> str:
    comp = ("graphs" if r.get("how") == "graphs" else "eager" if not r["compiled"] else
            f"{r.get('compile_how') or 'model'} ({r.get('compile_mode') or 'default'})")
    cells = [r["model"], f"{r['H']}x{r['W']}", str(r["batch"]), r["mode"], comp]
    if "error" in r:
        cells += [r["error"], "", ""]
    else:
        mem_key = "reserved_gib" if r.get("compile_mode") == "reduce-overhead" else "peak_gib"
        mem = r.get(mem_key)
        base = [b for b in rows if b["model"] == "convnext_tiny" and "error" not in b
                and all(b.get(k) == r.get(k) for k in ("H", "W", "batch", "mode", "how"))]
        ratio = ""
        if base and r["model"] != "convnext_tiny":
            ratio = f"{base[0]['ms_per_step'] / r['ms_per_step']:.2f}x"
            if mem and base[0].get(mem_key):
                ratio += f", mem {mem / base[0][mem_key]:.2f}x"
        cells += [f"{r['ms_per_step']:.1f}", "-" if mem is None else f"{mem:.2f}", ratio]
    if costs:
        cells += ["-" if r.get(k) is None else f"{r[k]:.1f}" if k != "kernels" else str(r[k])
                  for k in ("host_ms", "gpu_ms", "kernels")]
    if markdown:
        return "| " + " | ".join(cells) + " |"
    return " ".join(f"{c:<{w}}" for c, w in zip(cells, (34, 10, 3, 5, 10, 10, 6, 16)))


if __name__ == "__main__":
    main()
