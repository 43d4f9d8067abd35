"""Fused Triton kernels for multi-scale deformable attention (forward and backward).

Layout: one *row* per (batch, query, head), rows in (b, q, m) order, so that row r's
output is ``out.view(B*Q*M, D)[r]`` (contiguous) and its L*P locations / weights are one
contiguous run of ``sampling_locations`` / ``attention_weights``. A program takes
BLOCK_R rows and holds a (BLOCK_R, D) fp32 tile, vector over the head's D channels: every
bilinear corner is one gather of D contiguous values per row (a 16-byte vector load per
thread when value's rows are contiguous), masked off where the corner lies outside the map.

* ``_fwd_kernel``: for each level and point (runtime loops: only the four corner gathers of
  one point are in flight, which keeps registers low), the four corners
  weighted by ``a * w_corner`` accumulated in fp32; one store of the (BLOCK_R, D) tile.
* ``_bwd_kernel``: reloads dout's tile once, then per level/point recomputes the four
  corners: ``dot_c = dout . v_c`` gives the attention-weight gradient
  (``sum_c w_c dot_c``) and the location gradient (``a * W * sum_c dw_c/dx dot_c``, same for
  y with H); the value gradient ``a * w_c * dout`` goes to the four corners as fp32 atomic
  adds (into the output for fp32 value, else into an fp32 buffer cast afterwards).

Locations are clamped to [-2, W+1] x [-2, H+1] pixels before the floor (no integer
overflow for far-away points; every corner is outside the map there anyway, so results
and gradients are unchanged). Integer metadata (spatial_shapes, level_start_index) is read
on the device: nothing is synchronised with the host.

The kernels are plain functions wrapped lazily (``triton.jit`` for CUDA tensors, triton's
interpreter for CPU tensors, the latter needing ``TRITON_INTERPRET=1`` before triton is
imported). Public entry: :func:`ms_deform_attn_triton`; under ``torch.compile`` the custom
op ``torch.ops.transnext.ms_deform_attn_fwd`` (backward ``..._bwd``; autograd and fake
registrations), eagerly an equivalent ``torch.autograd.Function`` over the same kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_launch import launch, sm_count

# ----------------------------------------------------------------------------
# kernels (plain functions; triton_launch.kernel() wraps them)
# ----------------------------------------------------------------------------


def _fwd_kernel(
    V, SHAPES, STARTS, LOC, AW, OUT,
    svb, svs, svm, svd,
    R, QM, M,
    L: tl.constexpr, P: tl.constexpr, HEAD_D: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    b = rows // QM
    m = rows % M
    offs_d = tl.arange(0, D)
    d_ok = offs_d < HEAD_D
    # (BLOCK_R, D) pointers to channel d of head m at token 0 of batch b
    vrow = V + b.to(tl.int64) * svb + m * svm
    vptr = vrow[:, None] + offs_d[None, :] * svd
    dmask = row_ok[:, None] & d_ok[None, :]
    loc_row = LOC + rows * (2 * L * P)
    aw_row = AW + rows * (L * P)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for lvl in range(L):
        Hi = tl.load(SHAPES + 2 * lvl).to(tl.int32)
        Wi = tl.load(SHAPES + 2 * lvl + 1).to(tl.int32)
        s0 = tl.load(STARTS + lvl).to(tl.int32)
        Hf = Hi.to(tl.float32)
        Wf = Wi.to(tl.float32)
        for p in range(P):
            k = lvl * P + p
            lx = tl.load(loc_row + 2 * k, mask=row_ok, other=0.0).to(tl.float32)
            ly = tl.load(loc_row + 2 * k + 1, mask=row_ok, other=0.0).to(tl.float32)
            a = tl.load(aw_row + k, mask=row_ok, other=0.0).to(tl.float32)
            x = tl.minimum(tl.maximum(lx * Wf - 0.5, -2.0), Wf + 1.0)
            y = tl.minimum(tl.maximum(ly * Hf - 0.5, -2.0), Hf + 1.0)
            xf = tl.floor(x)
            yf = tl.floor(y)
            fx = x - xf
            fy = y - yf
            x0 = xf.to(tl.int32)
            y0 = yf.to(tl.int32)
            for c in tl.static_range(4):
                xi = x0 + (c % 2)
                yi = y0 + (c // 2)
                if c % 2 == 1:
                    wx = fx
                else:
                    wx = 1.0 - fx
                if c // 2 == 1:
                    wy = fy
                else:
                    wy = 1.0 - fy
                ok = row_ok & (xi >= 0) & (xi < Wi) & (yi >= 0) & (yi < Hi)
                tok = s0 + yi * Wi + xi
                v = tl.load(vptr + (tok * svs)[:, None], mask=ok[:, None] & d_ok[None, :],
                            other=0.0).to(tl.float32)
                acc += (a * wx * wy)[:, None] * v
    optr = OUT + rows.to(tl.int64)[:, None] * HEAD_D + offs_d[None, :]
    tl.store(optr, acc.to(OUT.dtype.element_ty), mask=dmask)


def _bwd_kernel(
    V, SHAPES, STARTS, LOC, AW, DOUT, DV, DLOC, DAW,
    svb, svs, svm, svd,
    R, QM, M, S,
    L: tl.constexpr, P: tl.constexpr, HEAD_D: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr, NEED_DV: tl.constexpr, NEED_DLA: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    b = rows // QM
    m = rows % M
    offs_d = tl.arange(0, D)
    d_ok = offs_d < HEAD_D
    vrow = V + b.to(tl.int64) * svb + m * svm
    vptr = vrow[:, None] + offs_d[None, :] * svd
    # DV is a contiguous (B, S, M, HEAD_D) buffer
    dvrow = DV + (b.to(tl.int64) * S * M + m) * HEAD_D
    dvptr = dvrow[:, None] + offs_d[None, :]
    dmask = row_ok[:, None] & d_ok[None, :]
    g = tl.load(DOUT + rows.to(tl.int64)[:, None] * HEAD_D + offs_d[None, :], mask=dmask,
                other=0.0).to(tl.float32)
    loc_row = LOC + rows * (2 * L * P)
    aw_row = AW + rows * (L * P)
    dloc_row = DLOC + rows * (2 * L * P)
    daw_row = DAW + rows * (L * P)
    for lvl in range(L):
        Hi = tl.load(SHAPES + 2 * lvl).to(tl.int32)
        Wi = tl.load(SHAPES + 2 * lvl + 1).to(tl.int32)
        s0 = tl.load(STARTS + lvl).to(tl.int32)
        Hf = Hi.to(tl.float32)
        Wf = Wi.to(tl.float32)
        for p in range(P):
            k = lvl * P + p
            lx = tl.load(loc_row + 2 * k, mask=row_ok, other=0.0).to(tl.float32)
            ly = tl.load(loc_row + 2 * k + 1, mask=row_ok, other=0.0).to(tl.float32)
            a = tl.load(aw_row + k, mask=row_ok, other=0.0).to(tl.float32)
            x = tl.minimum(tl.maximum(lx * Wf - 0.5, -2.0), Wf + 1.0)
            y = tl.minimum(tl.maximum(ly * Hf - 0.5, -2.0), Hf + 1.0)
            xf = tl.floor(x)
            yf = tl.floor(y)
            fx = x - xf
            fy = y - yf
            x0 = xf.to(tl.int32)
            y0 = yf.to(tl.int32)
            g_a = tl.zeros([BLOCK_R], tl.float32)
            g_x = tl.zeros([BLOCK_R], tl.float32)
            g_y = tl.zeros([BLOCK_R], tl.float32)
            for c in tl.static_range(4):
                xi = x0 + (c % 2)
                yi = y0 + (c // 2)
                if c % 2 == 1:
                    wx = fx
                    sx = 1.0
                else:
                    wx = 1.0 - fx
                    sx = -1.0
                if c // 2 == 1:
                    wy = fy
                    sy = 1.0
                else:
                    wy = 1.0 - fy
                    sy = -1.0
                ok = row_ok & (xi >= 0) & (xi < Wi) & (yi >= 0) & (yi < Hi)
                cmask = ok[:, None] & d_ok[None, :]
                tok = s0 + yi * Wi + xi
                if NEED_DLA:
                    v = tl.load(vptr + (tok * svs)[:, None], mask=cmask,
                                other=0.0).to(tl.float32)
                    dot = tl.sum(g * v, 1)
                    g_a += wx * wy * dot
                    g_x += sx * wy * dot
                    g_y += sy * wx * dot
                if NEED_DV:
                    tl.atomic_add(dvptr + (tok * (M * HEAD_D))[:, None],
                                  (a * wx * wy)[:, None] * g, mask=cmask, sem="relaxed")
            if NEED_DLA:
                tl.store(daw_row + k, g_a.to(DAW.dtype.element_ty), mask=row_ok)
                tl.store(dloc_row + 2 * k, (a * Wf * g_x).to(DLOC.dtype.element_ty),
                         mask=row_ok)
                tl.store(dloc_row + 2 * k + 1, (a * Hf * g_y).to(DLOC.dtype.element_ty),
                         mask=row_ok)


# ----------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------

# Launch configuration per kernel (CUDA): rows per program for a 32-channel head with 16-bit
# value (BLOCK_R) or fp32 value (BLOCK_R_FP32), scaled by 32/D for other head sizes; warps.
# BLOCK_R is halved (down to MIN_BLOCK_R) while the grid would give fewer than
# MIN_PROGRAMS_PER_SM programs per SM. Chosen from sm_90 register counts (ptxas, no
# spills: fwd 63 regs bf16 / 54 fp32, bwd 80 / 59); `bench_msda.py --tune` sweeps them.
TUNE = {
    "fwd": dict(BLOCK_R=64, BLOCK_R_FP32=32, num_warps=4, num_stages=1, MIN_BLOCK_R=16,
                MIN_PROGRAMS_PER_SM=4),
    "bwd": dict(BLOCK_R=32, BLOCK_R_FP32=16, num_warps=4, num_stages=1, MIN_BLOCK_R=16,
                MIN_PROGRAMS_PER_SM=4),
}


def _cfg(name: str, rows: int, head_d: int, value: Tensor):
    """(D, BLOCK_R, launch kwargs)."""
    D = triton.next_power_of_2(max(head_d, 1))
    if not value.is_cuda:  # interpreter: small tiles, no launch options
        return D, 16, {}
    t = TUNE[name]
    br = t["BLOCK_R_FP32" if value.dtype == torch.float32 else "BLOCK_R"]
    br = triton.next_power_of_2(max(1, br * 32 // D))
    lo = min(br, t["MIN_BLOCK_R"])
    while br > lo and triton.cdiv(rows, br) < t["MIN_PROGRAMS_PER_SM"] * sm_count(value.device):
        br //= 2
    return D, br, dict(num_warps=t["num_warps"], num_stages=t["num_stages"])


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, M, D), got {tuple(value.shape)}")
    B, S, M, D = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape != (L, 2) or level_start_index.shape != (L,):
        raise ValueError(f"spatial_shapes {tuple(spatial_shapes.shape)} / level_start_index "
                         f"{tuple(level_start_index.shape)} must be (L, 2) / (L,)")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (B, Q, M, L, P, 2), got "
                         f"{tuple(sampling_locations.shape)}")
    b, Q, m, lv, P, _ = sampling_locations.shape
    if (b, m, lv) != (B, M, L):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not fit value "
                         f"{tuple(value.shape)} and {L} levels")
    if tuple(attention_weights.shape) != (B, Q, M, L, P):
        raise ValueError(f"attention_weights must be (B, Q, M, L, P)=({B}, {Q}, {M}, {L}, {P}), "
                         f"got {tuple(attention_weights.shape)}")
    for t in (value, sampling_locations, attention_weights):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"the Triton path takes fp32/fp16/bf16 tensors, got {t.dtype}")
    devs = {t.device for t in (value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights)}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")


def _meta(spatial_shapes, level_start_index):
    return spatial_shapes.contiguous(), level_start_index.contiguous()


def _fwd_impl(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    B, S, M, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes, starts = _meta(spatial_shapes, level_start_index)
    loc = sampling_locations.contiguous()
    aw = attention_weights.contiguous()
    out = value.new_empty((B, Q, M * Dh))
    R = B * Q * M
    if R == 0 or Dh == 0:
        return out.zero_()
    D, BR, kw = _cfg("fwd", R, Dh, value)
    grid = (triton.cdiv(R, BR),)
    launch(_fwd_kernel, value, grid,
        value, shapes, starts, loc, aw, out, *value.stride(), R, Q * M, M,
        L=L, P=P, HEAD_D=Dh, D=D, BLOCK_R=BR, **kw)
    return out


def _bwd_impl(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
              dout, need_dv=True, need_dla=True):
    """(d value, d locations, d weights); a gradient not asked for is an empty (0,) tensor."""
    B, S, M, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes, starts = _meta(spatial_shapes, level_start_index)
    loc = sampling_locations.contiguous()
    aw = attention_weights.contiguous()
    dout = dout.contiguous()
    dv = torch.zeros((B, S, M, Dh) if need_dv else (0,), device=value.device,
                     dtype=torch.float32)
    dloc = loc.new_empty(loc.shape if need_dla else (0,))
    daw = aw.new_empty(aw.shape if need_dla else (0,))
    R = B * Q * M
    if R == 0 or Dh == 0 or not (need_dv or need_dla):
        return dv.to(value.dtype), dloc.zero_(), daw.zero_()
    D, BR, kw = _cfg("bwd", R, Dh, value)
    grid = (triton.cdiv(R, BR),)
    # gradients not asked for: the kernel never touches them; one-element stand-ins
    # rather than empty tensors' null pointers
    kdv = dv if need_dv else dv.new_empty(1)
    kdloc, kdaw = (dloc, daw) if need_dla else (loc.new_empty(1), aw.new_empty(1))
    launch(_bwd_kernel, value, grid,
        value, shapes, starts, loc, aw, dout, kdv, kdloc, kdaw, *value.stride(), R, Q * M, M, S,
        L=L, P=P, HEAD_D=Dh, D=D, BLOCK_R=BR, NEED_DV=need_dv, NEED_DLA=need_dla, **kw)
    return dv.to(value.dtype), dloc, daw


# ----------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------

@torch.library.custom_op("transnext::ms_deform_attn_fwd", mutates_args=())
def ms_deform_attn_fwd(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                       sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """(B, Q, M*D) in value's dtype. spatial_shapes (L, 2), level_start_index (L,): integer
    tensors on value's device."""
    return _fwd_impl(value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights)


@ms_deform_attn_fwd.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, _, M, D = value.shape
    Q = sampling_locations.shape[1]
    return value.new_empty((B, Q, M * D))


@torch.library.custom_op("transnext::ms_deform_attn_bwd", mutates_args=())
def ms_deform_attn_bwd(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                       sampling_locations: Tensor,
                       attention_weights: Tensor, dout: Tensor, need_dv: bool = True,
                       need_dla: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(d value, d sampling_locations, d attention_weights), each contiguous in its input's
    dtype; ``need_dv`` / ``need_dla`` False: that gradient (value's / locations' and
    weights') is not computed and an empty (0,) tensor is returned in its place."""
    return _bwd_impl(value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights, dout, need_dv, need_dla)


@ms_deform_attn_bwd.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, dout,
      need_dv=True, need_dla=True):
    loc, aw = sampling_locations, attention_weights
    return (value.new_empty(value.shape if need_dv else (0,)),
            loc.new_empty(loc.shape if need_dla else (0,)),
            aw.new_empty(aw.shape if need_dla else (0,)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _needs(ctx):
    n = ctx.needs_input_grad
    return n[0], n[3] or n[4]


def _grads(ctx, dv, dloc, daw):
    n = ctx.needs_input_grad
    return (dv if n[0] else None, None, None, dloc if n[3] else None, daw if n[4] else None)


def _backward(ctx, dout):
    value, shapes, starts, loc, aw = ctx.saved_tensors
    grads = ms_deform_attn_bwd(value, shapes, starts, loc, aw, dout, *_needs(ctx))
    return _grads(ctx, *grads)


ms_deform_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


class _MSDeformAttnFn(torch.autograd.Function):
    """Eager path: the same kernels without the custom-op dispatch overhead;
    torch.compile uses the custom op."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        out = _fwd_impl(value, spatial_shapes, level_start_index, sampling_locations,
                        attention_weights)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        return out

    @staticmethod
    def backward(ctx, dout):
        value, shapes, starts, loc, aw = ctx.saved_tensors
        grads = _bwd_impl(value, shapes, starts, loc, aw, dout, *_needs(ctx))
        return _grads(ctx, *grads)


def ms_deform_attn_triton(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Fused forward (and, through autograd, backward); (B, Q, M*D) in value's dtype.
    ``spatial_shapes`` / ``level_start_index`` must be integer tensors on value's device."""
    if torch.compiler.is_compiling():
        return ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights)
    ins = (value, sampling_locations, attention_weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in ins):
        return _MSDeformAttnFn.apply(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights)
    return _fwd_impl(value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights)
