"""Size-dependent tables of a stage: pool sizes and position-bias coordinates.

Everything here depends only on integers (map size, pool size, pretrain grid)
and a device, so results are cached per key (``transnext.tables``) and shared
by every block of a stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tables import cached

POS_BIAS_MODES = ("extrapolate", "interpolate")


def stage_size(size: int, stage: int) -> int:
    """Feature-map side at stage (0-based) for an input side: ceil(S/4), then ceil-halved."""
    s = -(-size // 4)
    for _ in range(stage):
        s = -(-s // 2)
    return s


def pool_size(H: int, W: int, sr_ratio: int, fixed: int | None) -> tuple[int, int]:
    """Pooled-token grid: H // sr x W // sr (never below 1), or fixed x fixed in linear mode."""
    if fixed is not None:
        return fixed, fixed
    return max(H // sr_ratio, 1), max(W // sr_ratio, 1)


def _log_spaced(t: Tensor) -> Tensor:
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


def _pool_centres(q_len: int, k_len: int) -> list[float]:
    """Centres of adaptive_avg_pool1d's bins over 0..q_len-1 (half-integers, exact)."""
    return [((i * q_len) // k_len + -(-((i + 1) * q_len) // k_len) - 1) / 2
            for i in range(k_len)]


def _axis_table(q_len: int, k_len: int) -> tuple[list[float], list[list[int]]]:
    """Distinct query-key offsets along one axis, sorted, and for each (q, k) the
    index of its offset. Plain Python on exact half-integers: no torch.unique,
    so torch.compile folds it to constants."""
    centres = _pool_centres(q_len, k_len)
    diffs = [[q - c for c in centres] for q in range(q_len)]
    values = sorted({d for row in diffs for d in row})
    where = {v: i for i, v in enumerate(values)}
    return values, [[where[d] for d in row] for row in diffs]


def _build_bias_coords(q_hw, k_hw, pretrain_hw, device) -> tuple[Tensor, Tensor]:
    axes = []
    for q_len, k_len, pre in zip(q_hw, k_hw, pretrain_hw):
        values, inverse = _axis_table(q_len, k_len)
        # A pretrain grid of one cell has no spacing to normalise by: offsets
        # are then taken in cells (divisor 1) instead of dividing by zero.
        divisor = float(max(pre - 1, 1))
        offsets = torch.tensor(values, dtype=torch.float32, device=device) / divisor * 8
        axes.append((offsets, torch.tensor(inverse, dtype=torch.long, device=device)))
    (uh, inv_h), (uw, inv_w) = axes
    table = torch.stack(torch.meshgrid(uh, uw, indexing="ij"), dim=-1).reshape(-1, 2)
    table = _log_spaced(table)
    # index[(qh, qw), (kh, kw)] = inv_h[qh, kh] * Uw + inv_w[qw, kw]
    index = inv_h[:, None, :, None] * uw.numel() + inv_w[None, :, None, :]
    return table, index.reshape(q_hw[0] * q_hw[1], k_hw[0] * k_hw[1])


def bias_coords(q_hw, k_hw, pretrain_hw, device) -> tuple[Tensor, Tensor]:
    """Distinct log-spaced (dh, dw) pairs (U, 2) and the (Nq, Nk) index into them."""
    return cached(_build_bias_coords, tuple(q_hw), tuple(k_hw), tuple(pretrain_hw),
                  torch.device(device))


@dataclass(frozen=True)
class StageGeometry:
    """What every block of a stage needs to know about the current map size."""

    H: int
    W: int
    pool_hw: tuple[int, int]  # key grid; (H, W) itself for full attention
    bias_q_hw: tuple[int, int]  # grid the bias MLP is evaluated on
    bias_k_hw: tuple[int, int]
    pretrain_hw: tuple[int, int]
    interpolate: bool  # resize the bias from bias_*_hw to the actual grids

    @property
    def num_pool(self) -> int:
        return self.pool_hw[0] * self.pool_hw[1]

    def coords(self, device) -> tuple[Tensor, Tensor]:
        return bias_coords(self.bias_q_hw, self.bias_k_hw, self.pretrain_hw, device)


def stage_geometry(
    H: int,
    W: int,
    stage: int,
    sr_ratio: int,
    pretrain_size: int,
    fixed_pool_size: int | None = None,
    pos_bias: str = "extrapolate",
    img_size: tuple[int, int] | None = None,
) -> StageGeometry:
    """Tables for stage ``stage`` (0-based) at a (H, W) map.

    ``sr_ratio == 1`` means full attention: keys are the queries' own grid.
    """
    stride = 4 * 2**stage
    pretrain = max(pretrain_size // stride, 1)
    if sr_ratio == 1:
        pool = (H, W)
    else:
        pool = pool_size(H, W, sr_ratio, fixed_pool_size)
    if pos_bias == "interpolate":
        if img_size is None:
            raise ValueError("pos_bias='interpolate' needs img_size")
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        ref_q = (stage_size(img_size[0], stage), stage_size(img_size[1], stage))
        ref_k = ref_q if sr_ratio == 1 else pool_size(*ref_q, sr_ratio, fixed_pool_size)
        interp = (ref_q, ref_k) != ((H, W), pool)
    else:
        ref_q, ref_k, interp = (H, W), pool, False
    return StageGeometry(H, W, pool, ref_q, ref_k, (pretrain, pretrain), interp)


def resize_bias(bias: Tensor, geo: StageGeometry) -> Tensor:
    """Interpolate mode: (h, Nq0, Nk0) at the reference grids -> (h, Nq, Nk) at the
    actual grids, bilinear (align_corners=False), key grid first, then query grid."""
    h = bias.shape[0]
    (hq0, wq0), (hk0, wk0) = geo.bias_q_hw, geo.bias_k_hw
    hq, wq = geo.H, geo.W
    hk, wk = geo.pool_hw
    b = bias.reshape(1, h * hq0 * wq0, hk0, wk0)
    if (hk0, wk0) != (hk, wk):
        b = F.interpolate(b, size=(hk, wk), mode="bilinear", align_corners=False)
    b = b.reshape(h, hq0 * wq0, hk * wk).transpose(1, 2).reshape(1, h * hk * wk, hq0, wq0)
    if (hq0, wq0) != (hq, wq):
        b = F.interpolate(b, size=(hq, wq), mode="bilinear", align_corners=False)
    return b.reshape(h, hk * wk, hq * wq).transpose(1, 2)
