"""The convolutional GLU's elementwise part, ``gelu(c) * v``, forward and backward, each as
one Triton kernel; the PyTorch ops beside them.

The GLU (``models.transnext.ConvolutionalGLU``) computes ``out = gelu(c) * v`` with c the
depthwise conv of the gate. In PyTorch that is a GELU and a product forward, and backward
(the GLU recomputes c) a GELU, two products and GELU's backward: six passes over the
GLU's widest tensors. Here one pass each way, everything in fp32 between the 16-bit loads
and stores: each output is rounded once (PyTorch rounds GELU's output, and the product's
gradient, to 16 bits on the way), so in 16 bits the results may differ from PyTorch's by
an ulp. Exact GELU only (``approximate="none"``, the model's).
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


def _fwd_kernel(C, V, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    c = tl.load(C + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=ok, other=0.0).to(tl.float32)
    gelu = 0.5 * c * (1.0 + tl.math.erf(c * _RSQRT2))
    tl.store(OUT + offs, (gelu * v).to(OUT.dtype.element_ty), mask=ok)


def _bwd_kernel(G, C, V, DC, DV, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(C + offs, mask=ok, other=0.0).to(tl.float32)
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


def _launch(fn, like: Tensor, *args):
    n = like.numel()
    if n:
        launch(fn, like, (triton.cdiv(n, BLOCK),), *args, n, BLOCK)


def gated_gelu(c: Tensor, v: Tensor, in_place: bool = False) -> Tensor:
    """``gelu(c) * v`` (exact GELU) in one kernel; c and v contiguous, same shape and dtype.
    ``in_place``: written over c (a tensor nobody else holds). No autograd: the GLU's own
    backward calls :func:`gated_gelu_backward`."""
    if not _flat(c, v):
        raise ValueError("gated_gelu takes two contiguous tensors of one shape and dtype, got "
                         f"{tuple(c.shape)} {c.dtype} and {tuple(v.shape)} {v.dtype}")
    out = c if in_place else torch.empty_like(c)
    _launch(_fwd_kernel, c, c, v, out)
    return out


def gated_gelu_backward(g: Tensor, c: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(dc, dv) of ``gelu(c) * v`` for the output gradient g, in one kernel."""
    if not _flat(c, v) or g.shape != c.shape:
        raise ValueError("gated_gelu_backward takes contiguous c, v of one shape and dtype "
                         f"and g of that shape, got {tuple(g.shape)}, {tuple(c.shape)} "
                         f"{c.dtype}, {tuple(v.shape)} {v.dtype}")
    g = g.contiguous()
    dc, dv = torch.empty_like(c), torch.empty_like(v)
    _launch(_bwd_kernel, c, g, c, v, dc, dv)
    return dc, dv


def gated_gelu_reference(c: Tensor, v: Tensor) -> Tensor:
    """What :func:`gated_gelu` computes, as the GLU ran it in PyTorch."""
    return F.gelu(c) * v


def gated_gelu_backward_reference(g: Tensor, c: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """What :func:`gated_gelu_backward` computes, as the GLU's backward ran it in PyTorch."""
    return torch.ops.aten.gelu_backward(g * v, c), g * F.gelu(c)
