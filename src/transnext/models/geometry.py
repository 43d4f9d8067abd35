"""Size-dependent tables of a stage: pool sizes and position-bias coordinates.

Everything here depends only on integers (map size, pool size, pretrain grid)
and a device, so results are cached per key (``transnext.tables``) and shared
by every block of a stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.position_bias import FactoredBias
from ..ops.position_bias_triton import spread_width
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


def _bilinear_taps(out_len: int, in_len: int) -> list[list[tuple[int, float]]]:
    """1-D bilinear resize as F.interpolate does it (align_corners=False): for each output
    index, its (input index, weight) pairs; the identity when the lengths agree."""
    if out_len == in_len:
        return [[(i, 1.0)] for i in range(out_len)]
    scale = in_len / out_len
    taps = []
    for i in range(out_len):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(src), in_len - 1)
        lam = src - i0
        taps.append([(i0, 1.0 - lam), (min(i0 + 1, in_len - 1), lam)])
    return taps


def _axis_taps(q_len: int, k_len: int, q0_len: int, k0_len: int, pre: int, device):
    """One axis of the position bias as a linear map of its distinct offsets.

    The bias at the actual (q, k) pair of this axis is sum_j w[j] * f(offset[idx[j]]),
    the offsets being those of the grids it is built on (q0_len, k0_len); with
    interpolation the pairs are the bilinear taps of q (along the query grid) times those
    of k (along the key grid), 4 in all, else one pair of weight 1. Returns the scaled
    offsets (U,), idx (J, q_len * k_len) and w (J, q_len * k_len) or None when J == 1.
    """
    values, inverse = _axis_table(q0_len, k0_len)
    tq, tk = _bilinear_taps(q_len, q0_len), _bilinear_taps(k_len, k0_len)
    idx, wts = [], []
    for q in range(q_len):
        for k in range(k_len):
            idx.append([inverse[a][b] for a, _ in tq[q] for b, _ in tk[k]])
            wts.append([wa * wb for _, wa in tq[q] for _, wb in tk[k]])
    # A pretrain grid of one cell has no spacing to normalise by: offsets are then
    # taken in cells (divisor 1) instead of dividing by zero.
    divisor = float(max(pre - 1, 1))
    offsets = torch.tensor(values, dtype=torch.float32, device=device) / divisor * 8
    idx_t = torch.tensor(idx, dtype=torch.int32, device=device).t().contiguous()
    w_t = None
    if idx_t.shape[0] > 1:
        w_t = torch.tensor(wts, dtype=torch.float32, device=device).t().contiguous()
    return offsets, idx_t, w_t


@dataclass(frozen=True)
class BiasPlan:
    """The position bias of one stage as T (h, Uh, Uw), the cpb MLP on the distinct
    (dh, dw) offset pairs, spread to (h, Nq, Nk) one axis at a time:
    bias[h, (qh, qw), (kh, kw)] = sum_{i, j} wh[i] ww[j] T[h, ih[i], iw[j]] with
    (ih, wh) indexed by (qh, kh) and (iw, ww) by (qw, kw). Interpolate mode's bilinear
    resize is folded into the taps (it is linear and separable), so no (h, Nq0, Nk0)
    bias is built and resized, and the backward is index_add over small tables instead
    of a scatter of the whole bias into a few hundred cells."""

    table: Tensor  # (Uh * Uw, 2) log-spaced (dh, dw), row-major over (Uh, Uw)
    h_idx: Tensor  # (Jh, Hq * Hk) int32
    h_w: Tensor | None  # (Jh, Hq * Hk), None when Jh == 1 (weights of 1)
    w_idx: Tensor  # (Jw, Wq * Wk) int32
    w_w: Tensor | None
    q_hw: tuple[int, int]
    k_hw: tuple[int, int]
    num_w: int  # Uw


def _build_bias_plan(q_hw, k_hw, q0_hw, k0_hw, pretrain_hw, device) -> BiasPlan:
    (uh, ih, wh), (uw, iw, ww) = (
        _axis_taps(q, k, q0, k0, pre, device)
        for q, k, q0, k0, pre in zip(q_hw, k_hw, q0_hw, k0_hw, pretrain_hw))
    table = _log_spaced(torch.stack(torch.meshgrid(uh, uw, indexing="ij"), dim=-1).reshape(-1, 2))
    return BiasPlan(table, ih, wh, iw, ww, tuple(q_hw), tuple(k_hw), uw.numel())


def bias_plan(q_hw, k_hw, q0_hw, k0_hw, pretrain_hw, device) -> BiasPlan:
    """The cached :class:`BiasPlan` for actual grids (q_hw, k_hw), built at (q0_hw, k0_hw)."""
    return cached(_build_bias_plan, tuple(q_hw), tuple(k_hw), tuple(q0_hw), tuple(k0_hw),
                  tuple(pretrain_hw), torch.device(device))


def _spread(x: Tensor, dim: int, idx: Tensor, w: Tensor | None) -> Tensor:
    """sum_j w[j] * x.index_select(dim, idx[j]), the weights broadcast along ``dim``."""
    shape = [1] * x.ndim
    shape[dim] = -1
    out = None
    for j in range(idx.shape[0]):
        g = x.index_select(dim, idx[j])
        if w is not None:
            g = g * w[j].view(shape)
        out = g if out is None else out + g
    return out


def factor_bias(per_pair: Tensor, plan: BiasPlan, fused: bool = False) -> FactoredBias:
    """(U, h) cpb-MLP outputs on ``plan.table`` -> the bias in factored form: spread along
    the width axis here (small: (h, Uh, Wq * Wk)), along the height axis by whoever reads
    it (the Triton kernels, or :meth:`FactoredBias.dense`). ``fused``: the width spread as
    one Triton kernel each way (``ops.position_bias_triton.spread_width``; fp32 only, its
    backward adds with atomics, so not under deterministic algorithms)."""
    h = per_pair.shape[1]
    t = per_pair.t().reshape(h, -1, plan.num_w)  # (h, Uh, Uw)
    if (fused and t.dtype == torch.float32 and not torch.are_deterministic_algorithms_enabled()
            and not torch.compiler.is_compiling()):  # compiled: Inductor fuses _spread
        table = spread_width(t, plan.w_idx, plan.w_w)
    else:
        table = _spread(t, 2, plan.w_idx, plan.w_w)
    return FactoredBias(table, plan.h_idx, plan.h_w, plan.q_hw, plan.k_hw)


def expand_bias(per_pair: Tensor, plan: BiasPlan) -> Tensor:
    """(U, h) cpb-MLP outputs on ``plan.table`` -> the (h, Nq, Nk) bias, row-major."""
    return factor_bias(per_pair, plan).dense()


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

    def bias_plan(self, device) -> BiasPlan:
        return bias_plan((self.H, self.W), self.pool_hw, self.bias_q_hw, self.bias_k_hw,
                         self.pretrain_hw, device)


def reference_grids(stage: int, sr_ratio: int, fixed_pool_size: int | None, img_size):
    """Interpolate mode: the query and key grids of stage ``stage`` at ``img_size`` (an int
    or (height, width)), where the bias is built before it is resized."""
    if img_size is None:
        raise ValueError("pos_bias='interpolate' needs img_size")
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    ref_q = (stage_size(img_size[0], stage), stage_size(img_size[1], stage))
    ref_k = ref_q if sr_ratio == 1 else pool_size(*ref_q, sr_ratio, fixed_pool_size)
    return ref_q, ref_k


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
        ref_q, ref_k = reference_grids(stage, sr_ratio, fixed_pool_size, img_size)
        interp = (ref_q, ref_k) != ((H, W), pool)
    else:
        ref_q, ref_k, interp = (H, W), pool, False
    return StageGeometry(H, W, pool, ref_q, ref_k, (pretrain, pretrain), interp)
