"""The factored pool bias (``ops.position_bias``) written out, and its gradient folded back,
by two Triton kernels.

The attention kernels can read the factored table directly (one index and one table load
per logit and tap, the gradient as an fp32 atomic per logit and tap into a table whose
cells many (query row, key row) pairs share). On an H200 at 800x1333 those gathers and
contended atomics were two thirds of the attention kernels' time; a plain (h, N, P) read
and one owner per gradient cell cost a fraction of that. So in training the op writes the
dense bias for one block's forward (and again in its backward), never keeps it, and folds
the dense gradient into the table here: each table row sums the (query row, key row) pairs
that use it, in a fixed order (deterministic, no atomics).

``bias[h, (qh, qw), (kh, kw)] = sum_j w[j, (qh, kh)] * table[h, idx[j, (qh, kh)], qw * Wk + kw]``

The table itself is the cpb MLP's output spread along the width axis
(``models.geometry.factor_bias``): :func:`spread_width` does that in one kernel per
direction instead of J index_selects, products and sums forward and J index_adds
backward (4 taps in interpolate mode: ~20 launches per block and step, and at 800x1333
about 8 ms of a training step's GPU time on an H200).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..tables import capturing
from .triton_launch import launch

BLOCK_C = 512  # table columns (qw * Wk + kw) per program of the gradient fold
SPREAD_BLOCK = (8, 256)  # (rows, columns) per program of the width spread


def _expand_kernel(TABLE, IDX, WTS, OUT, sth, str_, NPAIR, N, P, WQ, HK, WK,
                   J: tl.constexpr, HAS_W: tl.constexpr, HKP: tl.constexpr, WKP: tl.constexpr):
    # one program: one query n = (qh, qw) of one head, its whole (h, n, :) row of P keys
    # as an (Hk, Wk) tile: contiguous writes, table reads of Wk contiguous values per key row
    n = tl.program_id(0)
    hh = tl.program_id(1).to(tl.int64)
    qh = n // WQ
    qw = n % WQ
    kh = tl.arange(0, HKP)
    kw = tl.arange(0, WKP)
    ok = (kh < HK)[:, None] & (kw < WK)[None, :]
    acc = tl.zeros([HKP, WKP], tl.float32)
    for j in tl.static_range(J):  # the taps in FactoredBias.dense's order
        e = j * NPAIR + qh * HK + kh
        u = tl.load(IDX + e, mask=kh < HK, other=0).to(tl.int64)
        t = tl.load(TABLE + hh * sth + u[:, None] * str_ + (qw * WK + kw)[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        if HAS_W:
            t = t * tl.load(WTS + e, mask=kh < HK, other=0.0)[:, None]
        acc += t
    tl.store(OUT + (hh * N + n) * P + kh[:, None] * WK + kw[None, :], acc, mask=ok)


def _reduce_kernel(DPB, PTR, PAIR, WTS, DT, sth, str_, N, P, WQ, HK, WK, NC,
                   HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    # one program: one table row u, BLOCK columns, one head; sums the entries of row u
    u = tl.program_id(0)
    hh = tl.program_id(2).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NC
    col = (offs // WK).to(tl.int64) * P + offs % WK
    base = DPB + hh * N * P
    acc = tl.zeros([BLOCK], tl.float32)
    for e in range(tl.load(PTR + u), tl.load(PTR + u + 1)):
        pair = tl.load(PAIR + e)
        row = ((pair // HK) * WQ).to(tl.int64) * P + (pair % HK) * WK
        g = tl.load(base + row + col, mask=ok, other=0.0)
        if HAS_W:
            g = g * tl.load(WTS + e)
        acc += g
    tl.store(DT + hh * sth + u * str_ + offs, acc, mask=ok)


def expand_factored(table: Tensor, idx: Tensor, w: Tensor, q_hw, k_hw) -> Tensor:
    """The (h, N, P) fp32 bias of a factored one: ``table`` (h, R, Wq * Wk) contiguous,
    ``idx`` (J, Hq * Hk) int32, ``w`` the same in fp32 or empty (weights of 1)."""
    (Hq, Wq), (Hk, Wk) = q_hw, k_hw
    h = table.shape[0]
    N, P = Hq * Wq, Hk * Wk
    out = torch.empty((h, N, P), dtype=torch.float32, device=table.device)
    if out.numel() == 0:
        return out
    J, npair = idx.shape
    launch(_expand_kernel, table, (N, h),
        table, idx, w if w.numel() else idx, out, table.stride(0), table.stride(1),
        npair, N, P, Wq, Hk, Wk, J=J, HAS_W=w.numel() > 0,
        HKP=triton.next_power_of_2(Hk), WKP=triton.next_power_of_2(Wk))
    return out


_ROWS_OF: dict = {}


def _rows_of(idx: Tensor, w: Tensor, rows: int, keep: bool = False):
    """Which (qh, kh) pairs (and tap weights) each table row sums, as CSR: row u owns entries
    ptr[u]:ptr[u + 1] of (pair, weight). Pure device ops, no host sync. ``keep``: kept per
    (idx, w), a stage's cached plan tables, which every block's backward asks for again (~8
    launches each); eager only: a CUDA graph must not read buffers a cache may free."""
    if not keep or capturing():
        return _csr(idx, w, rows)
    wt = w if w.numel() else None  # empty weights are made afresh per call
    key = (idx.data_ptr(), 0 if wt is None else wt.data_ptr(), rows)
    hit = _ROWS_OF.get(key)
    if hit is not None and hit[0] is idx and hit[1] is wt:  # the references pin the addresses
        return hit[2]
    out = _csr(idx, w, rows)
    if len(_ROWS_OF) >= 64:
        _ROWS_OF.clear()
    _ROWS_OF[key] = (idx, wt, out)
    return out


def _csr(idx: Tensor, w: Tensor, rows: int):
    J, npair = idx.shape
    key = idx.reshape(-1).long()
    order = torch.argsort(key, stable=True)
    ptr = torch.searchsorted(key[order], torch.arange(rows + 1, device=idx.device))
    pair = (order % npair).to(torch.int32)
    wts = w.reshape(-1)[order].contiguous() if w.numel() else w
    return ptr.to(torch.int32), pair, wts


def reduce_factored_grad(dpb: Tensor, idx: Tensor, w: Tensor, rows: int, q_hw, k_hw,
                         keep_rows: bool = False) -> Tensor:
    """The table's gradient (h, rows, Wq * Wk) fp32 from the dense bias's ``dpb`` (h, N, P);
    ``keep_rows``: keep the fold's row index for the next call (eager, see _rows_of)."""
    (Hq, Wq), (Hk, Wk) = q_hw, k_hw
    h = dpb.shape[0]
    N, P = Hq * Wq, Hk * Wk
    dt = torch.empty((h, rows, Wq * Wk), dtype=torch.float32, device=dpb.device)
    if dt.numel() == 0:
        return dt
    ptr, pair, wts = _rows_of(idx, w, rows, keep_rows)
    launch(_reduce_kernel, dpb, (rows, triton.cdiv(Wq * Wk, BLOCK_C), h),
        dpb, ptr, pair, wts if wts.numel() else ptr, dt, dt.stride(0), dt.stride(1),
        N, P, Wq, Hk, Wk, Wq * Wk, HAS_W=wts.numel() > 0, BLOCK=BLOCK_C)
    return dt


def _spread_kernel(SRC, IDX, WTS, DST, ROWS, U, C, J: tl.constexpr, HAS_W: tl.constexpr,
                   GRAD: tl.constexpr, RB: tl.constexpr, CB: tl.constexpr):
    # forward: dst[r, c] = sum_j w[j, c] * src[r, idx[j, c]], the taps added in order (as
    # _spread does); GRAD: dst[r, idx[j, c]] += w[j, c] * src[r, c], one read of src for all
    # taps (fp32 atomics). Rows of src/dst have U and C entries (forward), C and U (GRAD).
    rows = (tl.program_id(1) * RB + tl.arange(0, RB)).to(tl.int64)
    cols = tl.program_id(0) * CB + tl.arange(0, CB)
    c_ok = cols < C
    ok = (rows < ROWS)[:, None] & c_ok[None, :]
    if GRAD:
        g = tl.load(SRC + rows[:, None] * C + cols[None, :], mask=ok, other=0.0)
    else:
        acc = tl.zeros([RB, CB], tl.float32)
    for j in tl.static_range(J):
        u = tl.load(IDX + j * C + cols, mask=c_ok, other=0)
        w = tl.load(WTS + j * C + cols, mask=c_ok, other=0.0)[None, :] if HAS_W else 1.0
        if GRAD:
            tl.atomic_add(DST + rows[:, None] * U + u[None, :], g * w if HAS_W else g,
                          mask=ok, sem="relaxed")
        else:
            v = tl.load(SRC + rows[:, None] * U + u[None, :], mask=ok, other=0.0)
            acc += v * w if HAS_W else v
    if not GRAD:
        tl.store(DST + rows[:, None] * C + cols[None, :], acc, mask=ok)


def _launch_spread(src: Tensor, idx: Tensor, w: Tensor | None, dst: Tensor, grad: bool):
    table = dst if grad else src  # the (h, Uh, Uw) side
    rows, u = table.shape[0] * table.shape[1], table.shape[2]
    J, C = idx.shape
    rb, cb = SPREAD_BLOCK
    launch(_spread_kernel, src, (triton.cdiv(C, cb), triton.cdiv(rows, rb)),
        src, idx, idx if w is None else w, dst, rows, u, C, J=J, HAS_W=w is not None,
        GRAD=grad, RB=rb, CB=cb)


class _SpreadWidth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, idx, w):
        t = t.contiguous()
        out = torch.empty((*t.shape[:2], idx.shape[1]), dtype=t.dtype, device=t.device)
        if out.numel():
            _launch_spread(t, idx, w, out, grad=False)
        ctx.save_for_backward(idx, w)
        ctx.t_shape = t.shape
        return out

    @staticmethod
    def backward(ctx, g):
        idx, w = ctx.saved_tensors
        dt = torch.zeros(ctx.t_shape, dtype=torch.float32, device=g.device)
        if g.numel():
            _launch_spread(g.contiguous().float(), idx, w, dt, grad=True)
        return dt.to(g.dtype), None, None


def spread_width(t: Tensor, idx: Tensor, w: Tensor | None) -> Tensor:
    """``sum_j w[j] * t.index_select(2, idx[j])`` for ``t`` (h, Uh, Uw) fp32, ``idx`` (J, C)
    int32 and ``w`` (J, C) fp32 or None (weights of 1), differentiable in ``t``."""
    if w is not None:
        w = w.contiguous()
    return _SpreadWidth.apply(t, idx.contiguous(), w)
