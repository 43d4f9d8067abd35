"""TransNeXt: aggregated attention + convolutional GLU (Dai Shi, CVPR 2024).

One implementation for classification and dense tasks, at any input size.
Module and parameter names follow the published checkpoints exactly
(``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``, ``head``), so released
weights load without renaming. Behaviour: ``shared/SPEC.md``.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..ops import aggregated_attention, cpu_linear, full_attention
from ..ops.aggregated_attention import _interpreting as _triton_interpreting
from ..ops.aggregated_attention import aggregated_attention_packed, resolve_backend
from ..tables import capturing
from .archs import ARCHS, PRETRAIN_SIZE
from . import symbolic_tables
from .checkpoint import checkpoint_filter_fn, read_pretrained_file
from .geometry import POS_BIAS_MODES, StageGeometry, factor_bias, stage_geometry, stage_size

try:  # torch.fx symbolic tracing only (newer torch's is_fx_tracing also covers export)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing

__all__ = ["TransNeXt", "ARCHS"]



def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _may_overwrite() -> bool:
    """True when no autograd graph is recorded (and no graph is being traced): a fresh
    intermediate may then be overwritten. On the CPU a fresh large buffer (page faults)
    costs several times an elementwise op on it. Never in an FX trace, which would keep
    the no-grad state of trace time."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not is_fx_tracing())


def _gelu_fresh(act: nn.Module, x: Tensor) -> Tensor:
    """GELU of a tensor nobody else holds, in place where allowed."""
    return torch.ops.aten.gelu_(x) if _may_overwrite() else act(x)


class _CastShared(torch.autograd.Function):
    """One 16-bit copy of x, handed out ``n`` times; the n gradients are summed in x's
    dtype (as n separate casts would), not in 16 bits."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype, n: int):
        ctx.in_dtype = x.dtype
        y = x.to(dtype)
        return tuple(y.view_as(y) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for g in grads:
            if g is not None:
                g = g.to(ctx.in_dtype)
                total = g if total is None else total + g
        return total, None, None


# Device types with autocast, looked up once: torch 2.11's Dynamo cannot trace
# torch.amp.is_autocast_available and broke the graph at every call (twice per block).
_AUTOCAST_TYPES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu")
                            if torch.amp.is_autocast_available(d))


def _autocast_available(device_type: str) -> bool:
    return device_type in _AUTOCAST_TYPES or (
        not torch.compiler.is_compiling() and torch.amp.is_autocast_available(device_type))


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` now, or None where it is off."""
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_off(device):
    """Autocast disabled on ``device`` (a no-op where autocast does not exist, e.g. 'meta')."""
    if _autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _cast_for_linears(x: Tensor, n: int) -> tuple[Tensor, ...]:
    """x for ``n`` Linear layers. Under autocast a LayerNorm returns fp32 and every Linear
    makes, and keeps for its backward, its own 16-bit copy of it (three per attention
    block); this makes one, with the same numbers forward and backward."""
    if is_fx_tracing():  # a graph must not bake in the autocast state of trace time
        return (x,) * n
    dtype = _autocast_dtype(x.device.type)
    if x.dtype == torch.float32 and n > 1 and dtype is not None:
        if torch.is_grad_enabled() and x.requires_grad:
            return _CastShared.apply(x, dtype, n)
        return (x.to(dtype),) * n
    return (x,) * n


KERNEL_MODES = ("auto", "torch", "triton")


def kernel_mode(var: str) -> str:
    """What ``var`` says: ``TRANSNEXT_LAYER_NORM`` for the LayerNorm kernels
    (``ops.layer_norm``), ``TRANSNEXT_GLU`` for the GLU's GELU-product kernels
    (``ops.gated_gelu``, which also add the depthwise conv's bias),
    ``TRANSNEXT_BIAS_GRAD`` for the Linear layers' bias gradients (``ops.column_sum``).
    ``auto`` (default): the Triton kernels while a CUDA graph is
    recorded, PyTorch's ops otherwise; ``torch``: PyTorch's ops always; ``triton``: the
    kernels on every eager call (CPU tensors through triton's interpreter: tests). Why auto
    waits for a graph: the kernels save GPU time (the LayerNorm ones take a third of
    PyTorch's; the GLU ones make two passes where PyTorch made six), but a Triton launch
    costs the host more than an ATen call, and eager TransNeXt steps are host-bound
    (docs/dense_speed.md, round 8)."""
    mode = os.environ.get(var, "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{var}={mode!r} is not one of {', '.join(KERNEL_MODES)}")
    return mode


def _kernels_run(var: str, x: Tensor) -> bool:
    """Whether the Triton kernels ``var`` governs run on x now. Never in FX traces,
    torch.compile or exports, which keep PyTorch's ops; never on fp64."""
    if is_fx_tracing() or torch.compiler.is_compiling() or symbolic_tables.exporting():
        return False
    mode = kernel_mode(var)
    if mode == "torch" or (mode == "auto" and not (x.is_cuda and capturing())):
        return False
    if not x.is_cuda and not _triton_interpreting():
        raise RuntimeError(f"{var}=triton needs CUDA tensors (or TRITON_INTERPRET=1 set "
                           "before triton is imported, for CPU tests)")
    return x.dtype != torch.float64


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _norm_kernel_ok(norm: nn.LayerNorm, x: Tensor, own_call: bool = False) -> bool:
    """Whether ``ops.layer_norm`` normalises x for ``norm``. ``own_call``: called from
    norm's own forward, so its hooks run anyway (else a hooked norm keeps its module)."""
    if not _kernels_run("TRANSNEXT_LAYER_NORM", x):
        return False
    if (norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1
            or x.shape[-1] != norm.normalized_shape[0]
            or (not own_call and _hooked(norm))):
        return False
    from ..ops import layer_norm as ln  # triton is imported on first use only
    return x.shape[-1] <= ln.MAX_WIDTH


def _norm(norm: nn.LayerNorm, x: Tensor, own_call: bool = False) -> Tensor:
    """``norm(x)``, through the Triton kernels where they run (same dtype as the module
    would return: fp32 under autocast, else x's)."""
    if not _norm_kernel_ok(norm, x, own_call):
        return nn.LayerNorm.forward(norm, x) if own_call else norm(x)
    from ..ops.layer_norm import layer_norm
    out = torch.float32 if _autocast_dtype(x.device.type) is not None else x.dtype
    return layer_norm(x, norm.weight, norm.bias, norm.eps, out)[0]


def _norm_for_linears(norm: nn.LayerNorm, x: Tensor, n: int) -> Tensor | tuple[Tensor, ...]:
    """``norm(x)`` as the input of ``n`` Linear layers. Under autocast, where the kernels
    run: a tuple of n views of one 16-bit result (``ops.layer_norm``: what norm(x) and
    ``_cast_for_linears`` give, up to fp32 summation order, in one pass); else ``norm(x)``
    itself."""
    if not _norm_kernel_ok(norm, x):
        return norm(x)
    from ..ops.layer_norm import layer_norm
    dtype = _autocast_dtype(x.device.type)
    if dtype is None:
        return layer_norm(x, norm.weight, norm.bias, norm.eps)[0]
    return layer_norm(x, norm.weight, norm.bias, norm.eps, dtype, n)


class _JointLinears(torch.autograd.Function):
    """Several Linear layers of one input as one matrix product (weights concatenated);
    returns one output per layer, views of the product. The backward concatenates their
    gradients for two products and one sum, where separate layers each ran two products, a
    sum and casts and the input's gradients were added up (the attention's q, kv and sr under
    autocast: 9 fewer ops per block and step, 330 -> 230 us of host time on the project's
    CPU; docs/dense_speed.md, round 6)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], whole: bool, *params: Tensor):
        # whole: the product as one output (the attention op takes q and kv packed)
        dtype = _autocast_dtype(x.device.type) or x.dtype
        ws, bs = params[0::2], params[1::2]
        if len(ws) == 1:
            w, b = ws[0].reshape(sizes[0], -1).to(dtype), bs[0].to(dtype)
        else:
            w = torch.cat([t.reshape(n, -1) for t, n in zip(ws, sizes)]).to(dtype)
            b = torch.cat(bs).to(dtype)
        xc = x.to(dtype)
        ctx.save_for_backward(xc, w)
        ctx.meta = (x.dtype, sizes, [t.shape for t in ws], [t.dtype for t in ws])
        ctx.column_sum = _kernels_run("TRANSNEXT_BIAS_GRAD", x)
        with _autocast_off(x.device):
            y = F.linear(xc, w, b)
        return (y,) if whole else tuple(y.split(sizes, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        xc, w = ctx.saved_tensors
        x_dtype, sizes, shapes, dtypes = ctx.meta
        if len(grads) == 1 and grads[0] is not None:  # one output: a cat would copy it
            g = grads[0].to(xc.dtype)
            if g.stride(-1) != 1:  # e.g. a transpose's gradient; the column sum reads rows
                g = g.contiguous()
        else:
            g = torch.cat([gi if gi is not None else xc.new_zeros((*xc.shape[:-1], n))
                           for gi, n in zip(grads, sizes)], dim=-1).to(xc.dtype)
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g @ w).to(x_dtype) if ctx.needs_input_grad[0] else None
        dw = (g2.t() @ xc.reshape(-1, xc.shape[-1])).split(sizes)
        if ctx.column_sum:
            from ..ops.column_sum import column_sum
            db = column_sum(g2).split(sizes)
        else:
            db = g2.sum(0).split(sizes)
        out = []
        for i, (n, shape, dt) in enumerate(zip(sizes, shapes, dtypes)):
            out += [dw[i].reshape(shape).to(dt), db[i].to(dt)]
        return (dx, None, None, *out)


def _joint_ok(layers) -> bool:
    """Whether :func:`_joint_linears` runs ``layers`` as one product: eager training, every
    layer with a bias, no hooks."""
    params = [t for lyr in layers for t in (lyr.weight, lyr.bias)]
    return (torch.is_grad_enabled() and not is_fx_tracing() and not torch.compiler.is_compiling()
            and all(t is not None for t in params) and any(t.requires_grad for t in params)
            and not _hooked(*layers))


def _joint_linears(x: Tensor, layers) -> tuple[Tensor, ...] | None:
    """``F.linear(x, l.weight, l.bias)`` for each layer (1x1 convs as linears) as one product
    in eager training, else None: the caller runs the layers (inference, graphs and FX keep
    their modules and their numbers)."""
    if _joint_ok(layers):
        params = [t for lyr in layers for t in (lyr.weight, lyr.bias)]
        return _JointLinears.apply(x, tuple(lyr.weight.shape[0] for lyr in layers), False,
                                   *params)
    return None


class _SplitLinear(torch.autograd.Function):
    """One Linear layer as one product per row block of its weight, each on its own view
    of the input (the GLU's fc1: gate and value come out contiguous). The backward writes
    the weight's and bias's gradients whole; through autograd each block of a parameter was
    a slice whose gradient was scattered into zeros, and the blocks were then added (per
    parameter and step a fill, a copy and an add). Same products and numbers otherwise: the
    inputs' gradients stay one per view, for the caller to add as before."""

    @staticmethod
    def forward(ctx, sizes: tuple[int, ...], weight: Tensor, bias: Tensor, *xs: Tensor):
        dtype = _autocast_dtype(xs[0].device.type) or xs[0].dtype
        xcs = [x.to(dtype) for x in xs]
        w, b = weight.to(dtype), bias.to(dtype)
        ctx.save_for_backward(w, *xcs)
        ctx.meta = (sizes, [x.dtype for x in xs], weight.dtype, bias.dtype)
        ctx.column_sum = _kernels_run("TRANSNEXT_BIAS_GRAD", xs[0])
        with _autocast_off(xs[0].device):
            return tuple(F.linear(x, wi, bi) for x, wi, bi in zip(xcs, w.split(sizes),
                                                                     b.split(sizes)))

    @staticmethod
    def backward(ctx, *grads):
        w, *xcs = ctx.saved_tensors
        sizes, x_dtypes, w_dtype, b_dtype = ctx.meta
        dw = torch.empty_like(w)
        # the bias gradient as F.linear's backward gives it (w's dtype), or the kernel's fp32
        db = torch.empty(w.shape[0], device=w.device,
                         dtype=torch.float32 if ctx.column_sum else w.dtype)
        dxs = []
        for i, (g, x, wi, dwi, dbi) in enumerate(zip(grads, xcs, w.split(sizes),
                                                     dw.split(sizes), db.split(sizes))):
            if g is None:
                dwi.zero_()
                dbi.zero_()
                dxs.append(None)
                continue
            g2 = g.reshape(-1, g.shape[-1])
            if g2.stride(-1) != 1:  # the column sum reads rows
                g2 = g2.contiguous()
            torch.mm(g2.t(), x.reshape(-1, x.shape[-1]), out=dwi)
            if ctx.column_sum:
                from ..ops.column_sum import column_sum
                column_sum(g2, out=dbi)
            else:
                torch.sum(g2, 0, out=dbi)
            dxs.append((g @ wi).to(x_dtypes[i]) if ctx.needs_input_grad[3 + i] else None)
        return None, dw.to(w_dtype), db.to(b_dtype), *dxs


def _split_linear(xs: tuple[Tensor, ...], weight: Tensor, bias: Tensor | None,
                  sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """``F.linear(xs[i], block i of weight and bias)`` for each row block of ``sizes``; as
    one ``_SplitLinear`` in eager training (autograd on, not FX or torch.compile, a bias)."""
    if (torch.is_grad_enabled() and not is_fx_tracing() and not torch.compiler.is_compiling()
            and bias is not None and (weight.requires_grad or bias.requires_grad)):
        return _SplitLinear.apply(sizes, weight, bias, *xs)
    out, start = [], 0
    for x, n in zip(xs, sizes):  # slices, not split(): FX proxies cannot be iterated
        end = start + n
        y = cpu_linear.linear(x, weight, bias, (start, end))
        if y is None:
            y = _linear(x, weight[start:end], None if bias is None else bias[start:end])
        out.append(y)
        start = end
    return tuple(out)


def _bias_grad_kernel(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether a Linear layer's bias gradient is summed by ``ops.column_sum``
    (``TRANSNEXT_BIAS_GRAD``): in training, where the kernels run."""
    # _kernels_run first: it says no under FX, whose parameters are proxies here
    return (_kernels_run("TRANSNEXT_BIAS_GRAD", x) and bias is not None
            and torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad))


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)``; as a one-layer ``_JointLinears`` (same products, the
    bias gradient by ``ops.column_sum``) where :func:`_bias_grad_kernel` says so."""
    if _bias_grad_kernel(x, weight, bias):
        return _JointLinears.apply(x, (weight.shape[0],), False, weight, bias)[0]
    return F.linear(x, weight, bias)


def _run_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)``, through :func:`_linear` where that is the same call (a plain Linear,
    no hooks) and the bias-gradient kernel runs, or from oneDNN's packed weight where the
    model opted in (``ops.cpu_linear``); else the module (FX traces keep it)."""
    if (type(layer) is nn.Linear and not _hooked(layer)
            and _bias_grad_kernel(x, layer.weight, layer.bias)):
        return _JointLinears.apply(x, (layer.weight.shape[0],), False, layer.weight,
                                   layer.bias)[0]
    return _module_linear(layer, x)


def _module_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)``, or from oneDNN's packed weight where the model opted in
    (``ops.cpu_linear``; a plain Linear, no hooks)."""
    if type(layer) is nn.Linear and not _hooked(layer):
        y = cpu_linear.linear(x, layer.weight, layer.bias)
        if y is not None:
            return y
    return layer(x)


def _tokens_to_map(x: Tensor, H: int, W: int) -> Tensor:
    """(B, N, C) -> (B, C, H, W) as a channels_last view (no copy)."""
    return x.reshape(x.shape[0], H, W, x.shape[-1]).permute(0, 3, 1, 2)


def _map_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, N, C); free when x is channels_last."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


# ---- FX leaves -------------------------------------------------------------------
# Input checks, stage tables, the position bias and the attention ops depend on concrete
# sizes and values; an FX trace records each as one call (see the end of the module),
# which then runs on the real tensors.

def _checked_image(x: Tensor, in_chans: int) -> Tensor:
    """x itself, after checking it is a non-empty (B, in_chans, H, W) float batch."""
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        desc = f"a {x.ndim}-D {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"TransNeXt expects a 4-D float image tensor (B, C, H, W), got {desc}")
    if x.shape[1] != in_chans:
        raise ValueError(f"TransNeXt was built for {in_chans} input channels, "
                         f"got an image with {x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[2] < 1 or x.shape[3] < 1 or x.shape[0] < 1:
        raise ValueError(f"empty image batch of shape {tuple(x.shape)}")
    return x


def _position_bias(attn: _PositionBias, geo: StageGeometry, device, factored: bool = False):
    return attn.position_bias(geo, device, factored)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        w = self.proj.weight
        if not is_fx_tracing() and not symbolic_tables.exporting() and (  # layouts are
                # unknown while tracing; export hook: no size test on a symbolic map
                w.is_contiguous() and not x.is_contiguous() and w.numel() > x.numel()
                and x.is_contiguous(memory_format=torch.channels_last)):
            # A channels_last map meeting a plain weight makes the conv convert the weight
            # on every call (6 MB for patch_embed4); converting the smaller map is cheaper.
            x = x.contiguous()
        x = self.proj(x)
        H, W = x.shape[-2:]
        return _norm(self.norm, _map_to_tokens(x)), H, W


class DWConv(nn.Module):
    """Depthwise 3x3 conv over the token map (checkpoints name it ``dwconv.dwconv``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        return _map_to_tokens(self.dwconv(_tokens_to_map(x, H, W)))


def _glu_kernels(x: Tensor, approximate: str) -> bool:
    """Whether the GLU kernels (``TRANSNEXT_GLU``) run on x now: then the depthwise conv runs
    without its bias, which ``ops.gated_gelu`` adds (one pass less over the conv's output)."""
    return approximate == "none" and _kernels_run("TRANSNEXT_GLU", x)


def _fused_glu(c: Tensor, value: Tensor) -> bool:
    """Whether ``ops.gated_gelu`` can read c and value: contiguous, one shape and dtype."""
    return (c.dtype == value.dtype and c.shape == value.shape and c.is_contiguous()
            and value.is_contiguous())


class _GatedRecompute(torch.autograd.Function):
    """``gelu(dwconv(gate)) * value`` keeping only ``gate`` and ``value`` for the backward,
    which recomputes the conv and GELU and applies their gradients directly (the ops
    autograd would run, in the same order: same numbers). What ``checkpoint`` did here,
    without its per-call hooks, RNG-state capture and recorded recomputation (on the
    project's CPU, host-bound: 800 -> 550 us per GLU forward and backward; 420 without
    recompute; docs/dense_speed.md, round 6)."""

    @staticmethod
    def forward(ctx, gate, value, weight, bias, geom: tuple):
        # geom: (H, W, GELU's approximate, the conv's stride, padding, dilation, groups)
        ctx.amp_dtype = _autocast_dtype(gate.device.type)
        ctx.geom = geom
        ctx.save_for_backward(gate, value, weight, bias)
        # the kernels add the conv's bias themselves (where they cannot read c, it is added
        # here instead, and the backward is PyTorch's)
        ctx.fold = _glu_kernels(gate, geom[2])
        c, _, _ = _GatedRecompute._conv(gate, weight, None if ctx.fold else bias, geom)
        c = _map_to_tokens(c)
        if ctx.fold and _fused_glu(c, value):
            from ..ops.gated_gelu import gated_gelu
            return gated_gelu(c, value, bias)
        if ctx.fold:
            c = c + bias.to(c.dtype)
        # GELU on the token view, as _gated does (the map layout rounds differently on CPUs)
        return F.gelu(c, approximate=geom[2]) * value

    @staticmethod
    def _conv(gate, weight, bias, geom):
        # autocast's choice for conv2d, made explicit: the backward runs outside autocast
        H, W, _, stride, padding, dilation, groups = geom
        m = _tokens_to_map(gate, H, W)
        w = weight.to(gate.dtype) if weight.dtype != gate.dtype else weight
        b = bias.to(gate.dtype) if bias is not None and bias.dtype != gate.dtype else bias
        return F.conv2d(m, w, b, stride, padding, dilation, groups), m, w

    @staticmethod
    def backward(ctx, g):
        gate, value, weight, bias = ctx.saved_tensors
        H, W, approximate, stride, padding, dilation, groups = ctx.geom
        need_gate, need_value, need_w, need_b = ctx.needs_input_grad[:4]
        with torch.no_grad():
            if ctx.amp_dtype is not None:  # the forward's operands were cast by autocast
                gate = gate.to(ctx.amp_dtype)
            c, m, w = _GatedRecompute._conv(gate, weight, None if ctx.fold else bias, ctx.geom)
            c = _map_to_tokens(c)
            fused = ctx.fold and _fused_glu(c, value)
            if fused:  # the bias's gradient: the column sums of d_c (not the conv's)
                from ..ops.column_sum import column_sum
                from ..ops.gated_gelu import gated_gelu_backward
                d_c, d_value = gated_gelu_backward(g, c, value, bias)
                d_b = column_sum(d_c) if need_b else None
            else:
                if ctx.fold:
                    c = c + bias.to(c.dtype)
                d_value = g * F.gelu(c, approximate=approximate) if need_value else None
                d_c = torch.ops.aten.gelu_backward(g * value, c, approximate=approximate)
            d_map, d_w, d_conv_b = torch.ops.aten.convolution_backward(
                _tokens_to_map(d_c, H, W), m, w, [w.shape[0]], list(stride), list(padding),
                list(dilation), False, [0, 0], groups,
                [need_gate, need_w, need_b and not fused])
            if not fused:
                d_b = d_conv_b
        d_gate = None if d_map is None else _map_to_tokens(d_map)
        return (d_gate, d_value, None if d_w is None else d_w.to(weight.dtype),
                None if d_b is None else d_b.to(bias.dtype), None)


class ConvolutionalGLU(nn.Module):
    """SPEC section 6: fc1 -> (gate, value); fc2(gelu(dwconv(gate)) * value).

    ``recompute`` (training only): keep just the gate and the value for the backward and
    recompute the depthwise conv, GELU and product there. Their outputs are the GLU's
    widest tensors (2/3 * mlp_ratio * dim channels at every token), so this drops two of
    the five activations the GLU would keep, for one more depthwise conv per backward.
    None (default): on CUDA tensors only (on the H100 it made training faster as well as
    leaner; on the CPU the recomputation costs ~10% of a training step).
    """

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0,
                 recompute: bool | None = None):
        super().__init__()
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.recompute = recompute

    def _plain_conv(self) -> bool:
        """An exact GELU and a plain depthwise conv (bias, zero padding, no hooks): what
        ``_GatedRecompute`` and the GLU kernels compute themselves."""
        conv = self.dwconv.dwconv
        return (type(self.act) is nn.GELU and conv.bias is not None
                and conv.padding_mode == "zeros" and not _hooked(conv))

    def _geom(self, H: int, W: int) -> tuple:
        """``_GatedRecompute``'s geom: the map size, GELU's approximation, the conv's."""
        conv = self.dwconv.dwconv
        return (H, W, self.act.approximate, conv.stride, conv.padding, conv.dilation,
                conv.groups)

    def _gated(self, gate: Tensor, value: Tensor, H: int, W: int) -> Tensor:
        conv = self.dwconv.dwconv
        if (_may_overwrite() and self._plain_conv()  # no autograd needed
                and type(self.dwconv) is DWConv and not _hooked(self.dwconv)
                and _glu_kernels(gate, self.act.approximate)):
            # the conv without its bias, which the kernel adds
            c = _map_to_tokens(_GatedRecompute._conv(gate, conv.weight, None,
                                                     self._geom(H, W))[0])
            if _fused_glu(c, value):
                from ..ops.gated_gelu import gated_gelu
                return gated_gelu(c, value, conv.bias, in_place=True)  # c: fresh, ours
            c = c + conv.bias.to(c.dtype)
        else:
            c = self.dwconv(gate, H, W)
        gate = _gelu_fresh(self.act, c)
        return gate.mul_(value) if _may_overwrite() else gate * value

    def forward(self, x: Tensor | tuple[Tensor, Tensor], H: int, W: int) -> Tensor:
        # x: the tokens, or (Block) two views of their 16-bit copy (_norm_for_linears).
        # fc1 as two products on halves of its weight: the gate comes out contiguous, so the
        # depthwise conv reads it as a channels_last map with no copy (a chunk of one
        # product would be strided and copied first).
        hidden = self.fc2.in_features
        xs = x if isinstance(x, tuple) else _cast_for_linears(x, 2)
        gate, value = _split_linear(xs, self.fc1.weight, self.fc1.bias, (hidden, hidden))
        recompute = (not is_fx_tracing()  # checkpointing has no place in an FX graph
                     and (gate.is_cuda if self.recompute is None else self.recompute)
                     and self.training and torch.is_grad_enabled()
                     and (gate.requires_grad or value.requires_grad))
        conv = self.dwconv.dwconv
        # graphs keep checkpoint (what torch.compile has run on the GPU); so does a hooked or
        # replaced module
        if recompute and not torch.compiler.is_compiling() and self._plain_conv():
            x = _GatedRecompute.apply(gate, value, conv.weight, conv.bias, self._geom(H, W))
        elif recompute:
            x = checkpoint(self._gated, gate, value, H, W, use_reentrant=False)
        else:
            x = self._gated(gate, value, H, W)
        return self.drop(_run_linear(self.fc2, self.drop(x)))


class _PositionBias(nn.Module):
    """Shared by both attention kinds: cpb MLP (SPEC section 5), evaluated on the
    distinct coordinate pairs and gathered; cached when no gradient is needed."""

    def _init_position_bias(self, num_heads: int) -> None:
        self.cpb_fc1 = nn.Linear(2, 512, bias=True)
        self.cpb_act = nn.ReLU(inplace=True)
        self.cpb_fc2 = nn.Linear(512, num_heads, bias=True)
        self._bias_cache: OrderedDict = OrderedDict()  # least recently used first

    def _compute_bias(self, geo: StageGeometry, device, factored: bool):
        plan = geo.bias_plan(device)
        # fp32 regardless of autocast: the bias is small, shared and cacheable.
        with _autocast_off(device):
            acc = torch.promote_types(self.cpb_fc1.weight.dtype, torch.float32)
            w1, w2 = self.cpb_fc1.weight.to(acc), self.cpb_fc2.weight.to(acc)
            b1, b2 = self.cpb_fc1.bias.to(acc), self.cpb_fc2.bias.to(acc)
            per_pair = F.linear(F.relu(F.linear(plan.table.to(acc), w1, b1)), w2, b2)  # (U, h)
            bias = factor_bias(per_pair, plan, fused=factored)
            # the Triton kernels read the factored form; SDPA and the reference a dense one
            return bias if factored else bias.dense()

    def position_bias(self, geo: StageGeometry, device, factored: bool = False):
        """The (h, Nq, Nk) bias, or with ``factored`` an ``ops.position_bias.FactoredBias``."""
        params = (self.cpb_fc1.weight, self.cpb_fc1.bias, self.cpb_fc2.weight, self.cpb_fc2.bias)
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        # Not cached under torch.compile, nor into a CUDA graph: the graph would replay a
        # read of this call's bias after the weights change.
        if needs_grad or torch.compiler.is_compiling() or capturing():
            return self._compute_bias(geo, device, factored)
        key = (geo, str(device), factored, tuple((p.data_ptr(), p._version) for p in params))
        cache = self._bias_cache
        bias = cache.get(key)
        if bias is None:
            # least recently used out: a val set's most common size stays while the others
            # pass through (emptying the cache when full rebuilt it after every 4 others)
            while len(cache) >= BIAS_CACHE_SIZE:
                cache.popitem(last=False)
            bias = cache[key] = self._compute_bias(geo, device, factored)
        else:
            cache.move_to_end(key)
        return bias


BIAS_CACHE_SIZE = 4  # position biases each attention block keeps (sizes x weight versions)


POOL_BIAS_FORMS = ("auto", "dense", "factored")
# Largest (h, N, P) fp32 bias a block caches in inference under ``auto``: 48 MiB at 512x512
# (stage 1), 202-784 MiB per block at 800x1333 and 3 GiB at 1024x2048, where the caches of
# all blocks took 6 and 21.6 GiB (docs/dense_speed.md, round 5).
DENSE_CACHE_MAX_BYTES = 128 * 2**20


def _factored(backend: str, dense_bytes: int = 0) -> bool:
    """Hand the Triton kernels the factored pool bias (``ops.position_bias``)? ``auto``:
    when a graph is recorded (training): the (h, N, P) bias is then never written nor kept
    for the backward (at 800x1333 the step's peak memory halves); in inference too when the
    dense bias (``dense_bytes``) would be larger than DENSE_CACHE_MAX_BYTES, or under
    torch.compile (which has no bias cache: the dense bias would be rebuilt at every call),
    else the dense bias is cached per size and read faster.
    ``TRANSNEXT_POOL_BIAS=dense|factored`` forces one form (benchmarks)."""
    form = os.environ.get("TRANSNEXT_POOL_BIAS", "auto").strip().lower() or "auto"
    if form not in POOL_BIAS_FORMS:
        raise ValueError(f"TRANSNEXT_POOL_BIAS={form!r} is not one of {', '.join(POOL_BIAS_FORMS)}")
    if backend != "triton" or form == "dense":
        return False
    return (form == "factored" or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or dense_bytes > DENSE_CACHE_MAX_BYTES)


def _query_params(num_heads: int, head_dim: int) -> tuple[nn.Parameter, nn.Parameter]:
    # softplus(temperature) = 1 / 0.24 at initialisation.
    temperature = nn.Parameter(torch.full((num_heads, 1, 1), math.log(math.expm1(1 / 0.24))))
    query_embedding = nn.Parameter(trunc_normal_(torch.empty(num_heads, 1, head_dim), std=0.02))
    return temperature, query_embedding


class AggregatedAttention(_PositionBias):
    """SPEC section 3: a w x w neighbourhood plus pooled tokens, one softmax."""

    linear_inputs = 3  # q, kv, sr read the normalised tokens

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, window_size: int = 3,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if window_size % 2 != 1:
            raise ValueError(f"window_size must be odd, got {window_size}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.window_size = window_size
        self.attn_drop = attn_drop
        ww = window_size * window_size

        self.temperature, self.query_embedding = _query_params(num_heads, self.head_dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.act = nn.GELU()
        self._init_position_bias(num_heads)
        self.relative_pos_bias_local = nn.Parameter(
            trunc_normal_(torch.empty(num_heads, ww), std=0.0004))
        self.learnable_tokens = nn.Parameter(
            trunc_normal_(torch.empty(num_heads, self.head_dim, ww), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, ww))

    def forward(self, x: Tensor | tuple[Tensor, ...], H: int, W: int,
                geo: StageGeometry) -> Tensor:
        # x: the tokens, or (Block) three views of their 16-bit copy (_norm_for_linears)
        xs = x if isinstance(x, tuple) else None
        x = xs[0] if xs else x
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        # (an FX trace leaves the choice to the op, a leaf there)
        backend = None if is_fx_tracing() else resolve_backend(x, self.attn_drop, self.training)
        # Attention-map hook (tools/attention_map.py): keep the reference's softmax weights.
        keep = getattr(self, "keep_weights", False)
        # The 1x1 `sr` conv is a per-token linear map: run it as one (faster everywhere).
        w_sr = self.sr.weight.view(C, C)
        if backend == "triton" and not keep and _joint_ok((self.q, self.kv, self.sr)):
            # Triton training: q and kv as one product, whose gradient the kernels write whole
            xq, xsr = (xs[0], xs[2]) if xs else _cast_for_linears(x, 2)
            qkv = _JointLinears.apply(xq, (C, 2 * C), True, self.q.weight, self.q.bias,
                                      self.kv.weight, self.kv.bias)[0].view(B, N, 3, h, d)
            y = _linear(xsr, w_sr, self.sr.bias)
        else:
            qkv = None
            joint = _joint_linears(x, (self.q, self.kv, self.sr))
            if joint is None:
                xq, xkv, xsr = xs or _cast_for_linears(x, 3)
                y = cpu_linear.linear(xsr, self.sr.weight, self.sr.bias)
                joint = (_module_linear(self.q, xq), _module_linear(self.kv, xkv),
                         F.linear(xsr, w_sr, self.sr.bias) if y is None else y)
            q, kv, y = joint
            q = q.reshape(B, N, h, d)
            k, v = kv.reshape(B, N, 2, h, d).unbind(2)
        y = _gelu_fresh(self.act, y)
        if isinstance(geo, symbolic_tables.SymbolicGeometry):  # export hook: symbolic size
            pooled = geo.pool(_tokens_to_map(y, H, W))
        elif torch.are_deterministic_algorithms_enabled() and not is_fx_tracing() and y.is_cuda:
            # adaptive_avg_pool2d's CUDA backward uses atomics; the bin matrices do not.
            pooled = symbolic_tables.adaptive_avg_pool(_tokens_to_map(y, H, W), geo.pool_hw)
        else:
            pooled = F.adaptive_avg_pool2d(_tokens_to_map(y, H, W), geo.pool_hw)
        pooled = _norm_for_linears(self.norm, _map_to_tokens(pooled), 1)
        pooled = pooled[0] if isinstance(pooled, tuple) else pooled
        k_pool, v_pool = _module_linear(self.kv, pooled).reshape(B, geo.num_pool, 2, h,
                                                                 d).unbind(2)

        factored = _factored(backend, 4 * h * N * geo.num_pool)
        rest = (k_pool, v_pool, _position_bias(self, geo, x.device, factored),
                self.query_embedding, self.temperature, self.relative_pos_bias_local,
                self.learnable_tokens, self.learnable_bias, H, W, self.window_size)
        if qkv is not None:
            out = aggregated_attention_packed(qkv, *rest, attn_drop=self.attn_drop,
                                              training=self.training, backend=backend)
        else:
            out = aggregated_attention(q, k, v, *rest, attn_drop=self.attn_drop,
                                       training=self.training, backend=backend,
                                       return_weights=keep)
        if keep:
            out, self.weights = out
            self.weights_geometry = geo
        return self.proj_drop(_run_linear(self.proj, out.reshape(B, N, C)))


class Attention(_PositionBias):
    """SPEC section 4: full length-scaled cosine attention (the last stage)."""

    linear_inputs = 1  # qkv

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.temperature, self.query_embedding = _query_params(num_heads, self.head_dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_position_bias(num_heads)

    def forward(self, x: Tensor | tuple[Tensor], H: int, W: int,
                geo: StageGeometry) -> Tensor:
        x = x[0] if isinstance(x, tuple) else x
        B, N, C = x.shape
        qkv = _run_linear(self.qkv, x)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        out = full_attention(
            q, k, v, _position_bias(self, geo, x.device), self.query_embedding,
            self.temperature, attn_drop=self.attn_drop, training=self.training,
        )
        return self.proj_drop(_run_linear(self.proj, out.reshape(B, N, C)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 window_size: int = 3, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0,
                 glu_recompute: bool | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if sr_ratio == 1:
            self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        else:
            self.attn = AggregatedAttention(
                dim, num_heads, sr_ratio, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvolutionalGLU(dim, mlp_ratio, proj_drop, glu_recompute)

    def forward(self, x: Tensor, H: int, W: int, geo: StageGeometry) -> Tensor:
        n = getattr(self.attn, "linear_inputs", None)  # None: a replaced attention module
        a = self.norm1(x) if n is None else _norm_for_linears(self.norm1, x, n)
        x = x + self.drop_path(self.attn(a, H, W, geo))
        return x + self.drop_path(self.mlp(_norm_for_linears(self.norm2, x, 2), H, W))


class StageNorm(nn.LayerNorm):
    """A stage's closing LayerNorm (``norm{i}``); returns the NCHW stage map, so what
    forward hooks and FX feature extraction take at ``norm{i}`` is the stage map."""

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        return _tokens_to_map(_norm(self, x, own_call=True), H, W)


class TransNeXt(nn.Module):
    """The TransNeXt family. Any input size works with one instance.

    Args:
        pretrain_size: image size the weights were trained at; fixes the
            position-bias coordinate normalisation (SPEC section 5).
        pos_bias: 'extrapolate' (bias built for the actual size) or
            'interpolate' (built at ``img_size``, resized bilinearly).
        img_size: size the bias is built at in interpolate mode: an int, or
            (height, width).
        fixed_pool_size: None, or an int for linear inference mode (every
            aggregated stage pools to fixed x fixed tokens).
        glu_recompute: in training, recompute each convolutional GLU's depthwise
            conv, GELU and gate product in the backward instead of keeping them
            (less activation memory, same numbers; see ``ConvolutionalGLU``).
            None (default): on CUDA only.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims=(72, 144, 288, 576),
        num_heads=(3, 6, 12, 24),
        depths=(2, 2, 15, 2),
        mlp_ratios=(8, 8, 4, 4),
        sr_ratios=(8, 4, 2, 1),
        window_size: int = 3,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pretrain_size: int = 224,
        pos_bias: str = "extrapolate",
        img_size: int | tuple[int, int] | None = None,
        fixed_pool_size: int | None = None,
        global_pool: str = "avg",
        glu_recompute: bool | None = None,
    ):
        super().__init__()
        if pos_bias not in POS_BIAS_MODES:
            raise ValueError(f"pos_bias must be one of {POS_BIAS_MODES}, got {pos_bias!r}")
        if pos_bias == "interpolate" and img_size is None:
            raise ValueError("pos_bias='interpolate' needs img_size (800 for the released "
                             "detection and segmentation models)")
        img_size = _check_img_size(img_size)
        if not isinstance(pretrain_size, int) or pretrain_size < 1:
            raise ValueError(f"pretrain_size must be a positive int, got {pretrain_size!r}")
        _check_int("in_chans", in_chans, 1)
        _check_int("num_classes", num_classes, 0)
        _check_arch(embed_dims, num_heads, depths, mlp_ratios, sr_ratios, window_size)
        for name, rate in (("drop_rate", drop_rate), ("proj_drop_rate", proj_drop_rate),
                           ("attn_drop_rate", attn_drop_rate),
                           ("drop_path_rate", drop_path_rate)):
            _check_rate(name, rate)
        if glu_recompute not in (None, True, False):
            raise ValueError(f"glu_recompute must be None, True or False, got {glu_recompute!r}")
        _check_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_stages = len(depths)
        self.embed_dims = tuple(embed_dims)
        self.num_heads = tuple(num_heads)
        self.depths = tuple(depths)
        self.sr_ratios = tuple(sr_ratios)
        self.window_size = window_size
        self.pretrain_size = pretrain_size
        self.pos_bias = pos_bias
        self.img_size = img_size
        self.fixed_pool_size = _check_pool_size(fixed_pool_size)
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        cur = 0
        self.feature_info = []
        for i in range(self.num_stages):
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(
                7 if i == 0 else 3, 4 if i == 0 else 2,
                in_chans if i == 0 else embed_dims[i - 1], embed_dims[i]))
            setattr(self, f"block{i + 1}", nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], window_size,
                      qkv_bias, proj_drop_rate, attn_drop_rate, dpr[cur + j], glu_recompute)
                for j in range(depths[i])]))
            setattr(self, f"norm{i + 1}", StageNorm(embed_dims[i], eps=1e-6))
            cur += depths[i]
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"norm{i + 1}"))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    # ---- timm surface -------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        keys = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed1\.",
            blocks=[(r"^(?:patch_embed|block|norm)(\d+)", None)] if coarse else [
                (r"^patch_embed(\d+)", (-1,)),  # a stage's downsampling, before its blocks
                (r"^block(\d+)\.(\d+)", None),
                (r"^norm(\d+)", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        pool = self.global_pool if global_pool is None else global_pool
        _check_pool(pool)
        self.num_classes = num_classes
        self.global_pool = pool
        ref = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        if num_classes > 0:
            _init_weights(self.head)
        self.head.train(self.training)

    def set_fixed_pool_size(self, size: int | None) -> None:
        """Linear inference mode: pool every aggregated stage to size x size (None: off)."""
        self.fixed_pool_size = _check_pool_size(size)

    # ---- forward --------------------------------------------------------
    def _geometry(self, stage: int, H: int, W: int) -> StageGeometry:
        # Export hook: dynamic height/width under torch.export (torch.compile keeps its own
        # size guards and the cached Python tables).
        if symbolic_tables.exporting() and symbolic_tables.is_symbolic(H, W):
            return symbolic_tables.stage_geometry(
                H, W, stage, self.sr_ratios[stage], self.pretrain_size,
                self.fixed_pool_size, self.pos_bias, self.img_size)
        return stage_geometry(H, W, stage, self.sr_ratios[stage], self.pretrain_size,
                              self.fixed_pool_size, self.pos_bias, self.img_size)

    def _run_stage(self, i: int, x: Tensor) -> Tensor:
        """Stage i (0-based) on an NCHW map; returns its normalised NCHW map."""
        x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
        geo = self._geometry(i, H, W)
        for blk in getattr(self, f"block{i + 1}"):
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, H, W, geo, use_reentrant=False)
            else:
                x = blk(x, H, W, geo)
        return getattr(self, f"norm{i + 1}")(x, H, W)

    def forward_features(self, x: Tensor) -> Tensor:
        x = _checked_image(x, self.in_chans)
        for i in range(self.num_stages):
            x = self._run_stage(i, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        if pre_logits:
            return x
        if self.global_pool == "" and self.num_classes > 0:
            # No pooling: the classifier at every location, logits (B, classes, H, W).
            return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage maps (each after its stage LayerNorm) for dense tasks.

        ``norm`` is accepted for timm compatibility: every stage map is
        normalised already.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        x = _checked_image(x, self.in_chans)
        take, max_index = feature_take_indices(self.num_stages, indices)
        intermediates = []
        last = max_index if (stop_early or intermediates_only) else self.num_stages - 1
        for i in range(last + 1):
            x = self._run_stage(i, x)
            if i in take:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last wanted one (and the head)."""
        take, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for prefix in ("patch_embed", "block", "norm"):
                delattr(self, f"{prefix}{i + 1}")
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take


def _check_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int of {low} or more, got {value!r}")


def _check_rate(name: str, value) -> None:
    # 1 would drop everything (DropPath divides by 1 - rate)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _check_arch(embed_dims, num_heads, depths, mlp_ratios, sr_ratios, window_size) -> None:
    per_stage = dict(embed_dims=embed_dims, num_heads=num_heads, depths=depths,
                     mlp_ratios=mlp_ratios, sr_ratios=sr_ratios)
    lengths = {}
    for name, seq in per_stage.items():
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__len__"):
            raise ValueError(f"{name} must be a sequence with one value per stage, got {seq!r}")
        lengths[name] = len(seq)
    if len(set(lengths.values())) != 1 or not lengths["depths"]:
        raise ValueError(f"embed_dims, num_heads, depths, mlp_ratios and sr_ratios need one "
                         f"value per stage, got lengths {lengths}")
    for i in range(lengths["depths"]):
        _check_int(f"embed_dims[{i}]", embed_dims[i], 1)
        _check_int(f"num_heads[{i}]", num_heads[i], 1)
        _check_int(f"depths[{i}]", depths[i], 0)
        _check_int(f"sr_ratios[{i}]", sr_ratios[i], 1)
        if embed_dims[i] % num_heads[i]:
            raise ValueError(f"embed_dims[{i}]={embed_dims[i]} is not divisible by "
                             f"num_heads[{i}]={num_heads[i]}")
        r = mlp_ratios[i]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or int(
                2 * int(embed_dims[i] * r) / 3) < 1:
            raise ValueError(f"mlp_ratios[{i}]={r!r} leaves the GLU of a {embed_dims[i]}-wide "
                             f"stage no hidden channel")
    _check_int("window_size", window_size, 1)
    if window_size % 2 != 1:
        raise ValueError(f"window_size must be odd, got {window_size}")


def _check_img_size(size) -> int | tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
        return size
    if (isinstance(size, (tuple, list)) and len(size) == 3):
        size = tuple(size[1:])  # timm style (C, H, W)
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise ValueError(f"img_size must be a positive int or (height, width), got {size!r}")
    return tuple(size)


def _check_pool_size(size) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"fixed_pool_size must be None or a positive int, got {size!r}")
    return size


# ---- FX: the leaves above, for torch.fx's own tracer and for timm's tracer lists ----
for _name in ("_checked_image", "stage_geometry", "_position_bias", "aggregated_attention",
              "full_attention"):
    torch.fx.wrap(_name)
    register_notrace_function(globals()[_name])
del _name


# ---- timm registration -------------------------------------------------------

def _cfg(input_size=(3, 224, 224), **kwargs) -> dict:
    # pool_size: the unpooled feature map (stride 32) at input_size.
    return {
        "num_classes": 1000, "input_size": input_size,
        "pool_size": tuple(stage_size(s, 3) for s in input_size[1:]),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2311.17132",
        **kwargs,
    }


def _hub(repo: str, filename: str, **kwargs) -> dict:
    return _cfg(hf_hub_id=f"DaiShiResearch/{repo}", hf_hub_filename=filename, **kwargs)


default_cfgs = generate_default_cfgs({
    "transnext_micro.in1k": _hub("transnext-micro-224-1k", "transnext_micro_224_1k.pth"),
    "transnext_tiny.in1k": _hub("transnext-tiny-224-1k", "transnext_tiny_224_1k.pth"),
    "transnext_small.in1k": _hub("transnext-small-224-1k", "transnext_small_224_1k.pth"),
    "transnext_small.in1k_384": _hub(
        "transnext-small-384-1k-ft-1k", "transnext_small_384_1k_ft_1k.pth",
        input_size=(3, 384, 384), crop_pct=1.0),
    "transnext_base.in1k": _hub("transnext-base-224-1k", "transnext_base_224_1k.pth"),
    "transnext_base.in1k_384": _hub(
        "transnext-base-384-1k-ft-1k", "transnext_base_384_1k_ft_1k.pth",
        input_size=(3, 384, 384), crop_pct=1.0),
    "transnext_micro_aaaa.in1k": _hub(
        "transnext-micro-AAAA-256-1k", "transnext_micro_AAAA_256_1k.pth",
        input_size=(3, 256, 256)),
    # Not published: the architecture of the Fashion-MNIST main job.
    "transnext_femto.untrained": _cfg(
        num_classes=10, input_size=(1, 28, 28), crop_pct=1.0, interpolation="bilinear",
        mean=(0.2860,), std=(0.3530,), first_conv="patch_embed1.proj"),
})


def _create(variant: str, pretrained: bool = False, device=None, dtype=None,
            **kwargs) -> TransNeXt:
    model_args = dict(ARCHS[variant], pretrain_size=PRETRAIN_SIZE.get(variant, 224))
    if kwargs.get("pretrain_size") is None:
        kwargs.pop("pretrain_size", None)
    if pretrained:  # a local file: read (and refused) by the package's loader
        for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = read_pretrained_file(kwargs[key])
    model_args.update(kwargs)
    # timm's factory passes device and dtype (create_model(..., device="meta")): the
    # parameters are created on that device, then cast.
    with torch.device(device) if device is not None else nullcontext():
        model = build_model_with_cfg(
            TransNeXt, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
            **model_args,
        )
    for m in (model, getattr(model, "model", None)):  # features_only wraps the model
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("state_dict") is not None:
            cfg["state_dict"] = None  # loaded; don't keep a second copy of the weights
    return model if dtype is None else model.to(dtype)


def _register(name: str):
    def entry(pretrained: bool = False, **kwargs) -> TransNeXt:
        return _create(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__qualname__ = name
    entry.__doc__ = f"{name}: {ARCHS[name]}"
    return register_model(entry)


transnext_micro = _register("transnext_micro")
transnext_tiny = _register("transnext_tiny")
transnext_small = _register("transnext_small")
transnext_base = _register("transnext_base")
transnext_micro_aaaa = _register("transnext_micro_aaaa")
transnext_femto = _register("transnext_femto")
