"""`transnext export`: an ONNX file or a torch.export program, checked when written.

Both formats go through ``torch.export`` (ONNX through PyTorch's current, dynamo-based
exporter). The attention runs on the plain-PyTorch reference path, so the graph holds only
standard operators. With ``dynamic`` the height and width are symbolic: the per-size
tables (position-bias coordinates, pooling bins, masks, length scales) are computed in the
graph (``models/symbolic_tables.py``) and one file serves every size from
:func:`min_dynamic_size` up. Every export is run against eager PyTorch before the command
returns: at the export size and, when dynamic, at two more sizes.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine.errors import UserError
from ..models.geometry import pool_size, stage_size
from ..ops.aggregated_attention import attention_backend
from .parsers import FORMATS
from ..models.transnext import TransNeXt

DEFAULT_OPSET = 20
CHECK_SIZES = ((200, 333), (97, 61))  # checked besides the export size when dynamic
MAX_SIDE = 16384
RTOL = 1e-4  # largest |difference| over largest |reference|, fp32


@dataclass
class ExportResult:
    path: Path
    format: str
    dynamic: bool
    min_size: int | None
    checks: list[dict] = field(default_factory=list)  # size, max_abs, max_ref, rel

    @property
    def worst_rel(self) -> float:
        return max(c["rel"] for c in self.checks)


def find_transnext(model: nn.Module) -> TransNeXt | None:
    """The TransNeXt inside ``model`` (itself, or the one a features_only wrapper holds)."""
    return next((m for m in model.modules() if isinstance(m, TransNeXt)), None)


def min_dynamic_size(model: nn.Module) -> int:
    """Smallest image side a dynamic export serves: every stage map and pooled grid
    has at least 2 cells per side there (one cell would be specialised by the tracer)."""
    net = find_transnext(model)
    if net is None:
        return 64  # other timm models: stride 32, two cells
    for side in range(1, MAX_SIDE):
        maps = [stage_size(side, i) for i in range(net.num_stages)]
        pools = [min(pool_size(s, s, sr, None)) for s, sr in zip(maps, net.sr_ratios)
                 if sr > 1 and net.fixed_pool_size is None]  # a fixed pool grid is a constant
        if min(maps + pools) >= 2:
            return side
    raise UserError("no input size is small enough for a dynamic export of this model")


@contextlib.contextmanager
def _export_mode():
    """Reference attention (the Triton op is not exportable) and size-oblivious tracing
    (sizes >= 2 are not specialised against 0 and 1)."""
    import torch.fx.experimental._config as fx_config
    patch = (fx_config.patch(backed_size_oblivious=True)
             if hasattr(fx_config, "backed_size_oblivious") else contextlib.nullcontext())
    with attention_backend("reference"), patch:
        yield


def _example(model: nn.Module, in_chans: int, hw, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, *hw, generator=g)


def _outputs(y) -> list[np.ndarray]:
    ys = list(y) if isinstance(y, (list, tuple)) else [y]
    return [t.detach().float().numpy() for t in ys]


def _compare(ref: list[np.ndarray], got: list[np.ndarray], hw) -> dict:
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        raise UserError(f"exported model's outputs at {hw[0]}x{hw[1]} have shapes "
                        f"{[b.shape for b in got]}, PyTorch's {[a.shape for a in ref]}")
    max_abs = max(float(np.abs(a - b).max()) for a, b in zip(ref, got))
    max_ref = max(float(np.abs(a).max()) for a in ref)
    return {"size": list(hw), "max_abs": max_abs, "max_ref": max_ref,
            "rel": max_abs / max(max_ref, 1e-12)}


class _Runner:
    """Calls a written export file the way a deployment would."""

    def __init__(self, path: Path, fmt: str, threads: int | None = None):
        self.fmt = fmt
        if fmt == "onnx":
            import onnxruntime as ort
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.name = self.sess.get_inputs()[0].name
        else:
            self.module = torch.export.load(str(path)).module()

    def __call__(self, x: torch.Tensor) -> list[np.ndarray]:
        if self.fmt == "onnx":
            return self.sess.run(None, {self.name: x.numpy()})
        with torch.no_grad():
            return _outputs(self.module(x))


def check_sizes(export_hw, dynamic: bool, min_size: int | None) -> list[tuple[int, int]]:
    sizes = [tuple(export_hw)]
    if dynamic:
        lo = min_size or 1
        for hw in CHECK_SIZES:
            hw = (max(hw[0], lo), max(hw[1], lo))
            if hw not in sizes:
                sizes.append(hw)
    return sizes


def export_model(model: nn.Module, output, fmt: str = "onnx", input_size=(224, 224), *,
                 dynamic: bool = False, in_chans: int = 3, batch: int = 1,
                 opset: int = DEFAULT_OPSET, check: bool = True) -> ExportResult:
    """Export ``model`` (eval mode, CPU) to ``output`` and check it against eager PyTorch."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    output = Path(output)
    model = model.eval().cpu()
    hw = tuple(int(v) for v in input_size)
    lo = None
    dynamic_shapes = None
    if dynamic:
        lo = min_dynamic_size(model)
        if min(hw) < lo:
            raise UserError(f"--input-size {hw[0]} {hw[1]}: a dynamic export of this model "
                            f"needs both sides >= {lo} (below that a stage or pooled grid "
                            f"has one cell); export a fixed size for smaller images")
        dims = {2: torch.export.Dim("height", min=lo, max=MAX_SIDE),
                3: torch.export.Dim("width", min=lo, max=MAX_SIDE)}
        dynamic_shapes = (dims,)
    x = _example(model, in_chans, hw, batch)
    tmp = output.with_name(output.name + ".tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    with _export_mode(), torch.no_grad():
        try:
            ep = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:  # the tracer's messages run to pages
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"torch.export could not trace this model: {first}") from None
        try:
            if fmt == "exported-program":
                torch.export.save(ep, str(tmp))
            else:
                _write_onnx(ep, tmp, opset, n_out=len(_outputs(model(x))))
            os.replace(tmp, output)  # no half-written file under the output name
        finally:
            tmp.unlink(missing_ok=True)
    result = ExportResult(output, fmt, dynamic, lo)
    if check:
        run = _Runner(output, fmt)
        for i, size in enumerate(check_sizes(hw, dynamic, lo)):
            xi = x if i == 0 else _example(model, in_chans, size, batch, seed=i)
            with torch.no_grad():
                ref = _outputs(model(xi))
            result.checks.append(_compare(ref, run(xi), size))
    return result


def _write_onnx(ep, path: Path, opset: int, n_out: int) -> None:
    import onnx  # noqa: F401  (a clear ImportError before a long export)
    names = ["logits"] if n_out == 1 else [f"features_{i}" for i in range(n_out)]
    for name in ("onnx_ir", "onnxscript"):  # one INFO line per folded constant
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        prog = torch.onnx.export(ep, dynamo=True, opset_version=opset, input_names=["image"],
                                 output_names=names, verify=False)
    prog.save(str(path))


def time_latency(model: nn.Module, path, fmt: str, input_size, *, in_chans: int = 3,
                 batch: int = 1, repeats: int = 20, warmup: int = 3) -> dict:
    """Median ms per call of the export (onnxruntime, CPU) and of eager PyTorch, same input,
    same thread count."""
    threads = torch.get_num_threads()
    run = _Runner(Path(path), fmt, threads=threads)
    x = _example(model, in_chans, input_size, batch)

    def median_ms(fn):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    with torch.no_grad():
        eager = median_ms(lambda: model(x))
    exported = median_ms(lambda: run(x))
    return {"threads": threads, "batch": batch, "size": list(input_size),
            "eager_ms": eager, "export_ms": exported}


def _build(args) -> tuple[nn.Module, int]:
    from ..engine.models import unwrap
    from .evaluate import load_for_inference
    kwargs = {}
    if args.fixed_pool_size is not None:
        kwargs["fixed_pool_size"] = args.fixed_pool_size
    if args.pos_bias is not None:
        kwargs["pos_bias"] = args.pos_bias
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    model, meta = load_for_inference(args.model, args.checkpoint, device="cpu",
                                     num_classes=args.num_classes, in_chans=args.in_chans,
                                     **kwargs)
    model = unwrap(model)
    if args.features_only:
        if not hasattr(model, "forward_intermediates"):
            raise UserError(f"model '{args.model}' has no forward_intermediates: "
                            f"--features-only is not available for it")
        from timm.models._features import FeatureGetterNet
        n = len(getattr(model, "feature_info", [])) or 4
        model = FeatureGetterNet(model, out_indices=tuple(range(n)))
    return model.eval(), meta["in_chans"]


def run(args) -> ExportResult:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise UserError(f"--format onnx needs onnx and onnxruntime "
                            f"(pip install 'transnext-pytorch[export]'): {e}") from None
    model, in_chans = _build(args)
    size = list(args.input_size or [224])
    hw = (size[0], size[-1])  # S or H W
    t0 = time.perf_counter()
    res = export_model(model, args.output, args.format, hw, dynamic=args.dynamic,
                       in_chans=in_chans, batch=args.batch, opset=args.opset)
    kind = f"dynamic (height and width >= {res.min_size})" if res.dynamic else \
        f"fixed {hw[0]}x{hw[1]}"
    print(f"wrote {res.path} ({args.format}, {kind}, batch {args.batch}) "
          f"in {time.perf_counter() - t0:.0f} s")
    for c in res.checks:
        print(f"  check {c['size'][0]}x{c['size'][1]}: largest difference {c['max_abs']:.3g} "
              f"({c['rel']:.3g} of the largest output, {c['max_ref']:.3g})")
    if res.worst_rel > RTOL:
        raise UserError(f"{res.path} was written but differs from PyTorch by "
                        f"{res.worst_rel:.3g} relative (limit {RTOL:g})")
    if args.time:
        t = time_latency(model, res.path, args.format, hw, in_chans=in_chans,
                         batch=args.batch, repeats=args.time)
        engine = "onnxruntime" if args.format == "onnx" else "exported program"
        print(f"  latency {hw[0]}x{hw[1]}, batch {t['batch']}, {t['threads']} threads, median "
              f"of {args.time}: {engine} {t['export_ms']:.1f} ms, eager PyTorch "
              f"{t['eager_ms']:.1f} ms")
    return res
