"""Per-size tables from tensor ops, for export with a symbolic input size.

Eager and compiled runs build the position-bias coordinates in plain Python
(``geometry``), which under ``torch.export`` with dynamic height/width would
pin the graph to one size. When a stage's size is symbolic (a ``torch.SymInt``),
the model switches to :class:`SymbolicGeometry`, whose tables come from
``arange`` arithmetic on the symbolic sizes, so one exported graph (and one
ONNX file) serves every size. Plain ints never reach this module: eager,
training and fixed-size export keep the ``geometry`` path and its numbers.

In extrapolate mode the coordinate table here is a superset of the eager one:
every half-integer offset in [-(L-1), L-1] per axis rather than only the offsets
that occur (that set's size depends on the size's divisibility, which a graph
cannot express); every (query, key) pair gets the same MLP of the same
coordinate. In interpolate mode the table is the eager one (a fixed reference
grid) and the bilinear taps to the symbolic grid are computed in the graph,
always two per axis (the second of weight 0 where the grids agree).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .geometry import BiasPlan, StageGeometry, _log_spaced, reference_grids
from .geometry import _axis_table as _eager_axis_table


def exporting() -> bool:
    """True while torch.export traces (False on torch versions without the query)."""
    fn = getattr(torch.compiler, "is_exporting", None)
    return bool(fn is not None and fn())


def is_symbolic(*sizes) -> bool:
    """True if any size is a symbolic int (export with dynamic shapes)."""
    return any(isinstance(s, torch.SymInt) for s in sizes)


def _floordiv(a: Tensor, b) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


def pool_bins(in_len, out_len, device) -> tuple[Tensor, Tensor]:
    """adaptive_avg_pool's bins along one axis: start and end (exclusive), (out_len,)."""
    i = torch.arange(out_len, device=device, dtype=torch.int64)
    start = _floordiv(i * in_len, out_len)
    end = -_floordiv(-(i + 1) * in_len, out_len)
    return start, end


def axis_table(q_len, k_len, device) -> tuple[Tensor, Tensor]:
    """Offsets along one axis and the (q_len, k_len) index into them.

    Offsets are every half-integer in [-(q_len-1), q_len-1] (4*q_len - 3 values,
    ascending); index[q, k] picks q - centre(k), centre(k) the centre of key k's
    pooling bin. Integer arithmetic in half units, so exact.
    """
    start, end = pool_bins(q_len, k_len, device)
    centre2 = start + end - 1  # twice the bin centre
    q2 = 2 * torch.arange(q_len, device=device, dtype=torch.int64)
    lo2 = 2 * q_len - 2
    index = q2[:, None] - centre2[None, :] + lo2
    values = (torch.arange(4 * q_len - 3, device=device, dtype=torch.int64) - lo2).float() / 2
    return values, index


def bilinear_taps(out_len, in_len: int, device) -> tuple[Tensor, Tensor]:
    """``geometry._bilinear_taps`` for a symbolic out_len, always two taps per output
    (the second of weight 0 where the lengths agree): index and weight, (out_len, 2),
    the weights in float64 as the Python version computes them."""
    i = torch.arange(out_len, device=device, dtype=torch.float64)
    scale = in_len / torch.full((), out_len, dtype=torch.float64, device=device)
    src = torch.clamp((i + 0.5) * scale - 0.5, min=0.0)
    i0 = torch.clamp(src.floor(), max=in_len - 1)
    lam = src - i0
    i0 = i0.long()
    idx = torch.stack([i0, torch.clamp(i0 + 1, max=in_len - 1)], dim=1)
    return idx, torch.stack([1.0 - lam, lam], dim=1)


def _axis_taps(q_len, k_len, q0_len, k0_len, pre: int, device, interpolate: bool):
    """``geometry._axis_taps`` where q_len (and, in extrapolate mode, q0_len = q_len) may
    be symbolic: scaled offsets (U,), idx (J, q_len * k_len), weights or None."""
    divisor = float(max(pre - 1, 1))  # same normalisation as geometry
    if not interpolate:  # the bias is built on the actual grids
        values, index = axis_table(q_len, k_len, device)
        return values / divisor * 8, index.reshape(1, -1).to(torch.int32), None
    # interpolate: a fixed reference grid, bilinear taps to the actual (symbolic) grids
    values, inverse = _eager_axis_table(q0_len, k0_len)
    inverse = torch.tensor(inverse, dtype=torch.long, device=device)
    offsets = torch.tensor(values, dtype=torch.float32, device=device) / divisor * 8
    qi, qw = bilinear_taps(q_len, q0_len, device)
    ki, kw = bilinear_taps(k_len, k0_len, device)
    idx = inverse[qi[:, None, :, None], ki[None, :, None, :]]  # (q, k, 2, 2)
    w = qw[:, None, :, None] * kw[None, :, None, :]
    return (offsets, idx.reshape(-1, 4).t().to(torch.int32).contiguous(),
            w.reshape(-1, 4).t().to(torch.float32).contiguous())


def bias_plan(q_hw, k_hw, q0_hw, k0_hw, pretrain_hw, device,
              interpolate: bool = False) -> BiasPlan:
    """``geometry.bias_plan`` for symbolic actual grids (not cached: built in the graph).
    ``interpolate``: (q0_hw, k0_hw) is interpolate mode's fixed reference grid."""
    (uh, ih, wh), (uw, iw, ww) = (
        _axis_taps(q, k, q0, k0, pre, device, interpolate)
        for q, k, q0, k0, pre in zip(q_hw, k_hw, q0_hw, k0_hw, pretrain_hw))
    table = _log_spaced(torch.stack(torch.meshgrid(uh, uw, indexing="ij"), dim=-1).reshape(-1, 2))
    return BiasPlan(table, ih, wh, iw, ww, tuple(q_hw), tuple(k_hw), uw.shape[0])


def adaptive_avg_pool(x: Tensor, out_hw) -> Tensor:
    """F.adaptive_avg_pool2d for a symbolic map or output size: two bin matrices."""
    mats = []
    for in_len, out_len in zip(x.shape[-2:], out_hw):
        start, end = pool_bins(in_len, out_len, x.device)
        pos = torch.arange(in_len, device=x.device, dtype=torch.int64)
        inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
        mats.append(inside.to(x.dtype) / (end - start)[:, None].to(x.dtype))
    mh, mw = mats
    return torch.einsum("ph,bchw,qw->bcpq", mh, x, mw)


@dataclass(frozen=True)
class SymbolicGeometry(StageGeometry):
    """StageGeometry whose map size is symbolic: its bias plan and pooling come from
    tensor ops on that size."""

    def bias_plan(self, device) -> BiasPlan:
        return bias_plan((self.H, self.W), self.pool_hw, self.bias_q_hw, self.bias_k_hw,
                         self.pretrain_hw, device, self.interpolate)

    def pool(self, x: Tensor) -> Tensor:
        return adaptive_avg_pool(x, self.pool_hw)


def stage_geometry(H, W, stage: int, sr_ratio: int, pretrain_size: int,
                   fixed_pool_size: int | None = None, pos_bias: str = "extrapolate",
                   img_size=None) -> SymbolicGeometry:
    """``geometry.stage_geometry`` for symbolic H, W (same arguments)."""
    stride = 4 * 2**stage
    pretrain = max(pretrain_size // stride, 1)
    if sr_ratio == 1:
        pool = (H, W)
    elif fixed_pool_size is not None:
        pool = (fixed_pool_size, fixed_pool_size)
    else:
        # No max(., 1): export sizes start where every grid has 2+ cells (min_export_size).
        pool = (H // sr_ratio, W // sr_ratio)
    if pos_bias == "interpolate":
        ref_q, ref_k = reference_grids(stage, sr_ratio, fixed_pool_size, img_size)
        return SymbolicGeometry(H, W, pool, ref_q, ref_k, (pretrain, pretrain), True)
    return SymbolicGeometry(H, W, pool, (H, W), pool, (pretrain, pretrain), False)
