"""The convolutional GLU's elementwise part, ``gelu(c + bias) * v``, forward and backward,
each as one Triton kernel; the PyTorch ops beside them.

The GLU (``models.transnext.ConvolutionalGLU``) computes ``out = gelu(c) * v`` with c the
depthwise conv of the gate. In PyTorch that is a GELU and a product forward, and backward
(the GLU recomputes c) a GELU, two products and GELU's backward: six passes over the
GLU's widest tensors. Here one pass each way, everything in fp32 between the 16-bit loads
and stores: each output is rounded once (PyTorch rounds GELU's output, and the product's
gradient, to 16 bits on the way), so in 16 bits the results may differ from PyTorch's by
an ulp. Exact GELU only (``approximate="none"``, the model's).

``bias`` (optional, one value per channel of the last dimension) is the depthwise conv's
bias: added here, in fp32, the conv runs without it and writes no second pass over its
output (docs/dense_speed.md, round 9).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_launch import launch

BLOCK = 2048
_RSQRT2 = tl.constexpr(0.7071067811865476)  # kernels read globals only as constexprs
_RSQRT_2PI = tl.constexpr(0.3989422804014327)


def _glu_fwd_kernel(C, V, BIAS, OUT, n, width, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    c = tl.load(C + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        c += tl.load(BIAS + offs % width, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=ok, other=0.0).to(tl.float32)
    gelu = 0.5 * c * (1.0 + tl.math.erf(c * _RSQRT2))
    tl.store(OUT + offs, (gelu * v).to(OUT.dtype.element_ty), mask=ok)


def _glu_bwd_kernel(G, C, V, BIAS, DC, DV, n, width, HAS_BIAS: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(C + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        c += tl.load(BIAS + offs % width, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=ok, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(c * _RSQRT2))
    pdf = tl.exp(-0.5 * c * c) * _RSQRT_2PI
    tl.store(DV + offs, (g * c * cdf).to(DV.dtype.element_ty), mask=ok)
    tl.store(DC + offs, (g * v * (cdf + c * pdf)).to(DC.dtype.element_ty), mask=ok)


def _flat(*ts: Tensor) -> bool:
    """Same shape, dtype and device, each contiguous: the kernels read them as flat arrays."""
    t0 = ts[0]
    return all(t.shape == t0.shape and t.dtype == t0.dtype and t.device == t0.device
               and t.is_contiguous() for t in ts)


def _bias(c: Tensor, bias: Tensor | None) -> Tensor:
    """``bias`` as the kernels read it (one value per channel of c's last dimension), or c
    itself as an unused pointer."""
    if bias is None:
        return c
    if bias.shape != (c.shape[-1],) or bias.device != c.device:
        raise ValueError(f"gated_gelu: bias {tuple(bias.shape)} on {bias.device} is not one "
                         f"value per channel of {tuple(c.shape)} on {c.device}")
    return bias.contiguous()


def _launch(fn, like: Tensor, bias: Tensor | None, *args):
    n = like.numel()
    if n:
        launch(fn, like, (triton.cdiv(n, BLOCK),), *args, n, like.shape[-1], bias is not None,
               BLOCK)


def gated_gelu(c: Tensor, v: Tensor, bias: Tensor | None = None,
               in_place: bool = False) -> Tensor:
    """``gelu(c + bias) * v`` (exact GELU) in one kernel; c and v contiguous, same shape and
    dtype; ``bias`` one value per channel (c's last dimension) or None. ``in_place``: written
    over c (a tensor nobody else holds). No autograd: the GLU's own backward calls
    :func:`gated_gelu_backward`."""
    if not _flat(c, v):
        raise ValueError("gated_gelu takes two contiguous tensors of one shape and dtype, got "
                         f"{tuple(c.shape)} {c.dtype} and {tuple(v.shape)} {v.dtype}")
    out = c if in_place else torch.empty_like(c)
    _launch(_glu_fwd_kernel, c, bias, c, v, _bias(c, bias), out)
    return out


def gated_gelu_backward(g: Tensor, c: Tensor, v: Tensor,
                        bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dc, dv) of ``gelu(c + bias) * v`` for the output gradient g, in one kernel (dc is
    also the gradient of c + bias: the bias's is its sum over all but the last dimension)."""
    if not _flat(c, v) or g.shape != c.shape:
        raise ValueError("gated_gelu_backward takes contiguous c, v of one shape and dtype "
                         f"and g of that shape, got {tuple(g.shape)}, {tuple(c.shape)} "
                         f"{c.dtype}, {tuple(v.shape)} {v.dtype}")
    g = g.contiguous()
    dc, dv = torch.empty_like(c), torch.empty_like(v)
    _launch(_glu_bwd_kernel, c, bias, g, c, v, _bias(c, bias), dc, dv)
    return dc, dv


def _with_bias(c: Tensor, bias: Tensor | None) -> Tensor:
    return c if bias is None else c + bias.to(c.dtype)


def gated_gelu_reference(c: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """What :func:`gated_gelu` computes, as the GLU ran it in PyTorch (the conv adding its
    bias in c's dtype)."""
    return F.gelu(_with_bias(c, bias)) * v


def gated_gelu_backward_reference(g: Tensor, c: Tensor, v: Tensor,
                                  bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """What :func:`gated_gelu_backward` computes, as the GLU's backward ran it in PyTorch."""
    c = _with_bias(c, bias)
    return torch.ops.aten.gelu_backward(g * v, c), g * F.gelu(c)
