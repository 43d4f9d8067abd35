"""Per-size tables from tensor ops, for export with a symbolic input size.

Eager and compiled runs build the position-bias coordinates in plain Python
(``geometry``), which under ``torch.export`` with dynamic height/width would
pin the graph to one size. When a stage's size is symbolic (a ``torch.SymInt``),
the model switches to :class:`SymbolicGeometry`, whose tables come from
``arange`` arithmetic on the symbolic sizes, so one exported graph (and one
ONNX file) serves every size. Plain ints never reach this module: eager,
training and fixed-size export keep the ``geometry`` path and its numbers.

The coordinate table here is a superset of the eager one: every half-integer
offset in [-(L-1), L-1] per axis rather than only the offsets that occur (that
set's size depends on the size's divisibility, which a graph cannot express).
The gathered bias is the same MLP of the same coordinate for every
(query, key) pair.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import StageGeometry, _log_spaced, pool_size, stage_size


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


def bias_coords(q_hw, k_hw, pretrain_hw, device) -> tuple[Tensor, Tensor]:
    """Log-spaced (dh, dw) pairs (U, 2) and the (Nq, Nk) index into them, as
    ``geometry.bias_coords`` but with a size-independent superset of pairs."""
    axes = []
    for q_len, k_len, pre in zip(q_hw, k_hw, pretrain_hw):
        values, index = axis_table(q_len, k_len, device)
        divisor = float(max(pre - 1, 1))  # same normalisation as geometry
        axes.append((values / divisor * 8, index))
    (uh, inv_h), (uw, inv_w) = axes
    table = _log_spaced(torch.stack(torch.meshgrid(uh, uw, indexing="ij"), dim=-1).reshape(-1, 2))
    index = inv_h[:, None, :, None] * uw.shape[0] + inv_w[None, :, None, :]
    return table, index.reshape(q_hw[0] * q_hw[1], k_hw[0] * k_hw[1])


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
    """StageGeometry whose sizes may be symbolic; in interpolate mode the bias is
    always resized (a same-size bilinear resize is the identity)."""

    def coords(self, device) -> tuple[Tensor, Tensor]:
        if not is_symbolic(*self.bias_q_hw, *self.bias_k_hw):
            return super().coords(device)  # interpolate mode: the reference grid is fixed
        return bias_coords(self.bias_q_hw, self.bias_k_hw, self.pretrain_hw, device)

    def pool(self, x: Tensor) -> Tensor:
        return adaptive_avg_pool(x, self.pool_hw)

    def resize(self, bias: Tensor) -> Tensor:
        """geometry.resize_bias without comparing sizes (a comparison of symbolic
        sizes would pin them)."""
        h = bias.shape[0]
        (hq0, wq0), (hk0, wk0) = self.bias_q_hw, self.bias_k_hw
        hk, wk = self.pool_hw
        b = bias.reshape(1, h * hq0 * wq0, hk0, wk0)
        b = F.interpolate(b, size=(hk, wk), mode="bilinear", align_corners=False)
        b = b.reshape(h, hq0 * wq0, hk * wk).transpose(1, 2).reshape(1, h * hk * wk, hq0, wq0)
        b = F.interpolate(b, size=(self.H, self.W), mode="bilinear", align_corners=False)
        return b.reshape(h, hk * wk, self.H * self.W).transpose(1, 2)


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
        if img_size is None:
            raise ValueError("pos_bias='interpolate' needs img_size")
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        ref_q = (stage_size(img_size[0], stage), stage_size(img_size[1], stage))
        ref_k = ref_q if sr_ratio == 1 else pool_size(*ref_q, sr_ratio, fixed_pool_size)
        return SymbolicGeometry(H, W, pool, ref_q, ref_k, (pretrain, pretrain), True)
    return SymbolicGeometry(H, W, pool, (H, W), pool, (pretrain, pretrain), False)
