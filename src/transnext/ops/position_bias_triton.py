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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_launch import kernel

BLOCK_C = 512  # table columns (qw * Wk + kw) per program of the gradient fold


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
    kernel(_expand_kernel, not table.is_cuda)[(N, h)](
        table, idx, w if w.numel() else idx, out, table.stride(0), table.stride(1),
        npair, N, P, Wq, Hk, Wk, J=J, HAS_W=w.numel() > 0,
        HKP=triton.next_power_of_2(Hk), WKP=triton.next_power_of_2(Wk))
    return out


def _rows_of(idx: Tensor, w: Tensor, rows: int):
    """Which (qh, kh) pairs (and tap weights) each table row sums, as CSR: row u owns entries
    ptr[u]:ptr[u + 1] of (pair, weight). Pure device ops, no host sync."""
    J, npair = idx.shape
    key = idx.reshape(-1).long()
    order = torch.argsort(key, stable=True)
    ptr = torch.searchsorted(key[order], torch.arange(rows + 1, device=idx.device))
    pair = (order % npair).to(torch.int32)
    wts = w.reshape(-1)[order].contiguous() if w.numel() else w
    return ptr.to(torch.int32), pair, wts


def reduce_factored_grad(dpb: Tensor, idx: Tensor, w: Tensor, rows: int, q_hw, k_hw) -> Tensor:
    """The table's gradient (h, rows, Wq * Wk) fp32 from the dense bias's ``dpb`` (h, N, P)."""
    (Hq, Wq), (Hk, Wk) = q_hw, k_hw
    h = dpb.shape[0]
    N, P = Hq * Wq, Hk * Wk
    dt = torch.empty((h, rows, Wq * Wk), dtype=torch.float32, device=dpb.device)
    if dt.numel() == 0:
        return dt
    ptr, pair, wts = _rows_of(idx, w, rows)
    kernel(_reduce_kernel, not dpb.is_cuda)[(rows, triton.cdiv(Wq * Wk, BLOCK_C), h)](
        dpb, ptr, pair, wts if wts.numel() else ptr, dt, dt.stride(0), dt.stride(1),
        N, P, Wq, Hk, Wk, Wq * Wk, HAS_W=wts.numel() > 0, BLOCK=BLOCK_C)
    return dt
