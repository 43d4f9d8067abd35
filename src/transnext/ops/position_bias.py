"""The pooled tokens' position bias in factored form (SPEC section 5).

The bias of a stage is a linear map of the cpb MLP's output on a few hundred distinct
(dh, dw) offsets; written out it is (h, N, P) fp32, hundreds of MB per block at detection
sizes. :class:`FactoredBias` keeps it as ``table`` (h, R, Wq * Wk): the bias already
spread along the width axis, one row per distinct height offset, and per (qh, kh) pair
of the height axis J rows with weights (J = 1, or the bilinear taps of interpolate
mode). ``bias[h, (qh, qw), (kh, kw)] = sum_j w[j, (qh, kh)] * table[h, idx[j, (qh, kh)],
qw * Wk + kw]``. The Triton kernels read it in that form (and scatter its gradient into
``table``); :meth:`FactoredBias.dense` is the plain-PyTorch definition.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class FactoredBias(NamedTuple):
    table: Tensor  # (h, R, Wq * Wk)
    idx: Tensor  # (J, Hq * Hk) int32 rows of ``table``
    w: Tensor | None  # (J, Hq * Hk) fp32 weights, None: J == 1 with weight 1
    q_hw: tuple[int, int]
    k_hw: tuple[int, int]

    def dense(self) -> Tensor:
        """The (h, Nq, Nk) bias, row-major over (qh, qw) and (kh, kw)."""
        h = self.table.shape[0]
        (Hq, Wq), (Hk, Wk) = self.q_hw, self.k_hw
        out = None
        for j in range(self.idx.shape[0]):
            g = self.table.index_select(1, self.idx[j])  # (h, Hq * Hk, Wq * Wk)
            if self.w is not None:
                g = g * self.w[j].view(1, -1, 1)
            out = g if out is None else out + g
        return out.view(h, Hq, Hk, Wq, Wk).permute(0, 1, 3, 2, 4).reshape(h, Hq * Wq, Hk * Wk)
