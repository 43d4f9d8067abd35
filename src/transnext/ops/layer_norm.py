"""LayerNorm over the last dimension as two Triton kernels, ``F.layer_norm`` beside them.

Why: TransNeXt's widths are small (72-576 for -Tiny) and its maps long (400k tokens at
stage 1 of a 224 batch of 128). At these shapes PyTorch's CUDA LayerNorm forward and
backward took 11-15 ms of a 76-94 ms training step on an H200; these kernels take about a
third of its GPU time (``benchmarks/bench_norm.py``; docs/dense_speed.md, round 8). One
program normalises a tile of rows, and the backward's weight and bias gradients are
per-program partial sums, added up once (no atomics: deterministic). The model runs them
where launches are free, inside CUDA graphs (``TRANSNEXT_LAYER_NORM``,
``models.transnext.kernel_mode``).

:func:`layer_norm` also hands the normalised rows to ``n`` linear layers in one dtype
(``out_dtype``, autocast's 16-bit type): under autocast a LayerNorm returns fp32 and each
Linear casts it again; writing the 16-bit rows directly skips the fp32 write, its read
and the cast. The values are those of F.layer_norm in fp32 (up to summation order),
rounded once as the cast would, and the ``n`` gradients are added in fp32, as ``n``
casts' backwards would (``models.transnext._CastShared``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_launch import launch, sm_count

MAX_WIDTH = 8192  # wider rows go to F.layer_norm (one tile row must fit in registers)
# launch shape: elements per program (rows x padded width), warps, backward programs per SM
TUNING = dict(fwd_tile=4096, fwd_warps=4, bwd_tile=4096, bwd_warps=4, bwd_per_sm=4)


def _ln_fwd_kernel(X, Wt, B, Y, MEAN, RSTD, M, C, sx, sy, eps,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    r_ok = rows < M
    c_ok = cols < C
    ok = r_ok[:, None] & c_ok[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(X + r64[:, None] * sx + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / C
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
    w = tl.load(Wt + cols, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + r64[:, None] * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=r_ok)
    tl.store(RSTD + rows, rstd, mask=r_ok)


def _ln_bwd_kernel(X, Wt, DY, DY2, MEAN, RSTD, DX, DW, DB, M, C, sx, sdy, sdy2, sdx, GRID,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TWO: tl.constexpr):
    # each program walks row tiles pid, pid + GRID, ...; its dW, dB partials (summed over
    # its rows once, at the end) go to row pid. TWO: the gradient is DY + DY2 (in fp32)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    w = tl.load(Wt + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for t in range(pid, tl.cdiv(M, BLOCK_M), GRID):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rows < M
        ok = r_ok[:, None] & c_ok[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64[:, None] * sx + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * sdy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if TWO:
            dy += tl.load(DY2 + r64[:, None] * sdy2 + cols[None, :], mask=ok,
                          other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=r_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, 1) / C
        c2 = tl.sum(wdy, 1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + r64[:, None] * sdx + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(DW + pid * 2 * C + cols, tl.sum(dw, 0), mask=c_ok)
    tl.store(DB + pid * 2 * C + cols, tl.sum(db, 0), mask=c_ok)


def _blocks(C: int, tile: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(C)
    return max(1, min(128, tile // block_c)), block_c


def _rows(t: Tensor) -> Tensor:
    """t as (M, C) rows with unit column stride (a view where the layout allows one)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype):
    x2 = _rows(x)
    M, C = x2.shape
    y = torch.empty((M, C), dtype=out_dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if M:
        bm, bc = _blocks(C, TUNING["fwd_tile"])
        launch(_ln_fwd_kernel, x, (triton.cdiv(M, bm),), x2, weight, bias, y, mean, rstd, M,
               C, x2.stride(0), y.stride(0), eps, bm, bc, num_warps=TUNING["fwd_warps"])
    return y.view(x.shape), x2, mean, rstd


def _bwd(x2: Tensor, weight: Tensor, dys: list[Tensor], mean: Tensor, rstd: Tensor, x_dtype):
    """dx, dweight, dbias for the gradient ``sum(dys)`` (one or two tensors, any dtype)."""
    M, C = x2.shape
    dy, dy2 = _rows(dys[0]), _rows(dys[-1])
    dx = torch.empty((M, C), dtype=x_dtype, device=x2.device)
    bm, bc = _blocks(C, TUNING["bwd_tile"])
    tiles = triton.cdiv(M, bm)
    grid = max(1, min(tiles, TUNING["bwd_per_sm"] * sm_count(x2.device) if x2.is_cuda else 4))
    part = torch.empty((grid, 2, C), dtype=torch.float32, device=x2.device)  # dW, dB rows
    if M:
        launch(_ln_bwd_kernel, x2, (grid,), x2, weight, dy, dy2, mean, rstd, dx, part,
               part[0, 1], M, C, x2.stride(0), dy.stride(0), dy2.stride(0), dx.stride(0), grid,
               bm, bc, len(dys) == 2, num_warps=TUNING["bwd_warps"])
    else:
        part.zero_()
    dw, db = part.sum(0).unbind(0)  # one reduction for both
    return dx, dw, db


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, out_dtype, n: int):
        ctx.set_materialize_grads(False)  # views nobody used get None, not zeros to add
        y, x2, mean, rstd = _fwd(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.meta = (x.shape, x.dtype)
        return tuple(y.view_as(y) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        x2, weight, mean, rstd = ctx.saved_tensors
        shape, x_dtype = ctx.meta
        # the n gradients are added in fp32 (as n casts' backwards would add them): two by
        # the kernel, more first here
        dys = [g for g in grads if g is not None]
        if not dys:
            return (None,) * 6
        if len(dys) > 2:
            dys = [sum((g.float() for g in dys[1:]), dys[0].float())]
        dx, dw, db = _bwd(x2, weight, dys, mean, rstd, x_dtype)
        return (dx.view(shape), dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                db.to(weight.dtype) if ctx.needs_input_grad[2] else None, None, None, None)


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                         out_dtype: torch.dtype | None = None, n: int = 1) -> tuple[Tensor, ...]:
    """What :func:`layer_norm` computes, in plain PyTorch: ``F.layer_norm`` in fp32 (as
    autocast runs it), rounded once to ``out_dtype`` (default x's dtype), ``n`` times."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return tuple(y.to(out_dtype or x.dtype) for _ in range(n))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
               out_dtype: torch.dtype | None = None, n: int = 1) -> tuple[Tensor, ...]:
    """LayerNorm of x over its last dimension (affine), computed in fp32 whatever x's dtype;
    returns ``n`` views of the result in ``out_dtype`` (default: x's dtype). Triton on CUDA
    tensors (and on CPU tensors through triton's interpreter, for tests)."""
    if x.shape[-1] > MAX_WIDTH or weight is None or bias is None:
        raise ValueError(f"layer_norm's kernels take affine rows up to {MAX_WIDTH} wide, "
                         f"got width {x.shape[-1]}")
    if weight.shape != (x.shape[-1],) or bias.shape != weight.shape:
        raise ValueError(f"layer_norm: weight {tuple(weight.shape)} and bias "
                         f"{tuple(bias.shape)} do not match rows of width {x.shape[-1]}")
    out_dtype = out_dtype or x.dtype
    weight, bias = weight.contiguous(), bias.contiguous()  # read as flat rows
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or bias.requires_grad):
        return _LayerNormFn.apply(x, weight, bias, float(eps), out_dtype, n)
    y = _fwd(x, weight, bias, float(eps), out_dtype)[0]
    return (y,) * n
