"""Fused Triton kernels for aggregated attention (SPEC section 3, steps 3-7).

Forward and backward, flash-style: neither the unfolded w x w neighbourhood
nor the (N, w*w + P) attention matrix is ever written to global memory. The
forward saves only ``out`` and the per-row log-sum-exp; the backward saves one
more per-row value, ``delta = sum(dA * A)`` (computed from ``out`` and the
local window only), and recomputes every logit.

Kernels (one program per (batch*head, tile) unless noted):

* ``_fwd_kernel``  query tile: l2-normalise q, build q_tilde, 9 local logits
  gathered by index from k (online softmax), then the pooled tokens in blocks
  of BLOCK_P (online softmax), learnable-token term, out and lse.
* ``_bwd_q_kernel`` program per (query tile, head, batch group) looping over
  the batches of its group: dq, delta, the pool_bias grad and the per-head
  parameter grads (fp32 atomic adds into (h, N, P) / per-head buffers, contended
  only by the G batch groups, never B-way); it also stores dS_j and the value
  weight m_j of every (query, neighbour j) and 1/|q| (fp32, small).
* ``_bwd_kv_local_kernel`` key tile: dk, dv by *gathering* from the w*w query
  positions that see each key their stored dS_j and m_j (no scatter, no atomics,
  no logits recomputed).
* ``_bwd_kv_pool_kernel`` pooled-token tile looping over all queries: dk_pool,
  dv_pool (for long query loops split over programs with fp32 partials and the
  k_pool l2-norm backward done on their sum).

The kernels are plain functions wrapped lazily: ``triton.jit`` for CUDA
tensors and triton's interpreter for CPU tensors (tests), independent of
``TRITON_INTERPRET``. Public entry: ``torch.ops.transnext.aggregated_attention_fwd``
(a ``torch.library.custom_op`` with autograd and fake registrations) through
:func:`aggregated_attention_triton`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .position_bias import FactoredBias
from .position_bias_triton import expand_factored, reduce_factored_grad
from .triton_launch import device_fn, launch, sm_count

_EPS = 1e-12  # F.normalize's eps


# ----------------------------------------------------------------------------
# kernels (plain functions; triton_launch.kernel() wraps them)
# ----------------------------------------------------------------------------

def _pool_bias_tile(PB, PBI, PBW, hh, spbh, spbn, spbp, offs_n, offs_p, y, x, H, HK, WK, mnp,
                    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, JT: tl.constexpr,
                    HAS_W: tl.constexpr):
    """The (BLOCK_N, BLOCK_P) position-bias tile in fp32: read from the dense (h, N, P) bias
    (JT == 0), or the sum of JT taps gathered from rows of the factored (h, R, W * WK)
    table (ops.position_bias)."""
    if JT == 0:
        pb = tl.load(PB + hh * spbh + offs_n[:, None] * spbn + offs_p[None, :] * spbp,
                     mask=mnp, other=0.0).to(tl.float32)
    else:
        pb_rows, pb_cols = _factored_rows_cols(offs_p, y, x, HK, WK)
        pb = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
        for tap in tl.static_range(JT):
            a = tl.load(PBI + tap * H * HK + pb_rows, mask=mnp, other=0)
            pbt = tl.load(PB + hh * spbh + a * spbn + pb_cols * spbp, mask=mnp,
                          other=0.0).to(tl.float32)
            if HAS_W:
                pbt = pbt * tl.load(PBW + tap * H * HK + pb_rows, mask=mnp, other=0.0)
            pb += pbt
    return pb


def _factored_rows_cols(offs_p, y, x, HK, WK):
    """Index rows of the factored table's taps and its columns, per (query, pooled token)."""
    pb_rows = (y * HK)[:, None] + (offs_p // WK)[None, :]
    pb_cols = (x * WK)[:, None] + (offs_p % WK)[None, :]
    return pb_rows, pb_cols


_pool_bias_tile = device_fn(_pool_bias_tile)
_factored_rows_cols = device_fn(_factored_rows_cols)


def _fwd_kernel(
    Q, K, V, KP, VP, PB, PBI, PBW, QE, TEMP, RBL, LT, LB, OUT, LSE, ORES,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    skpb, skpp, skph, skpd,
    svpb, svpp, svph, svpd,
    spbh, spbn, spbp,
    N, P, H, W, NH, HK, WK,
    HEAD_D: tl.constexpr, D: tl.constexpr, WIN: tl.constexpr, WWP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, IS_F32: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr, SAVE_RES: tl.constexpr, JT: tl.constexpr, HAS_W: tl.constexpr,
):
    # strides are passed divided by ALIGN so that the compiler sees rows aligned for vector loads
    sqb, sqn, sqh = sqb * ALIGN, sqn * ALIGN, sqh * ALIGN
    skb, skn, skh = skb * ALIGN, skn * ALIGN, skh * ALIGN
    svb, svn, svh = svb * ALIGN, svn * ALIGN, svh * ALIGN
    skpb, skpp, skph = skpb * ALIGN, skpp * ALIGN, skph * ALIGN
    svpb, svpp, svph = svpb * ALIGN, svpp * ALIGN, svph * ALIGN
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    R: tl.constexpr = WIN // 2
    WW: tl.constexpr = WIN * WIN

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_n < N
    d_ok = offs_d < HEAD_D
    y = offs_n // W
    x = offs_n % W
    ny = tl.minimum(y + R, H - 1) - tl.maximum(y - R, 0) + 1
    nx = tl.minimum(x + R, W - 1) - tl.maximum(x - R, 0) + 1
    s = tl.log(tl.maximum(ny * nx + P, 1).to(tl.float32))

    t = tl.load(TEMP + hh).to(tl.float32)
    tau = tl.where(t > 20.0, t, tl.log(1.0 + tl.exp(t)))
    qe = tl.load(QE + hh * HEAD_D + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    q = tl.load(Q + b * sqb + offs_n[:, None] * sqn + hh * sqh + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    qn = tl.sqrt(tl.sum(q * q, 1))
    q_hat = q / tl.maximum(qn, 1e-12)[:, None]
    qt = (q_hat + qe[None, :]) * (tau * s)[:, None]

    offs_w = tl.arange(0, WWP)
    w_ok = offs_w < WW
    # pass 1: the w*w local logits, gathered by index (runtime loop: no hoisted loads)
    L_t = tl.full([BLOCK_N, WWP], float("-inf"), tl.float32)
    for j in range(WW):
        yy = y + (j // WIN - R)
        xx = x + (j % WIN - R)
        ok = row_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        nb = yy * W + xx
        kj = tl.load(K + b * skb + nb[:, None] * skn + hh * skh + offs_d[None, :] * skd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        rk = 1.0 / tl.maximum(tl.sqrt(tl.sum(kj * kj, 1)), 1e-12)
        lj = tl.sum(qt * kj, 1) * rk + tl.load(RBL + hh * WW + j).to(tl.float32)
        lj = tl.where(ok, lj, float("-inf"))
        L_t = tl.where(offs_w[None, :] == j, lj[:, None], L_t)
    m_i = tl.maximum(tl.max(L_t, 1), -1.0e30)
    l_i = tl.sum(tl.exp(L_t - m_i[:, None]), 1)
    acc = tl.zeros([BLOCK_N, D], tl.float32)

    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        mp = p_ok[:, None] & d_ok[None, :]
        kp = tl.load(KP + b * skpb + offs_p[:, None] * skpp + hh * skph + offs_d[None, :] * skpd,
                     mask=mp, other=0.0).to(tl.float32)
        vp = tl.load(VP + b * svpb + offs_p[:, None] * svpp + hh * svph + offs_d[None, :] * svpd,
                     mask=mp, other=0.0)
        kph = kp / tl.maximum(tl.sqrt(tl.sum(kp * kp, 1)), 1e-12)[:, None]
        sc = tl.dot(qt, tl.trans(kph), input_precision=PREC)
        mnp = row_ok[:, None] & p_ok[None, :]
        pb = _pool_bias_tile(PB, PBI, PBW, hh, spbh, spbn, spbp, offs_n, offs_p, y, x, H, HK,
                             WK, mnp, BLOCK_N, BLOCK_P, JT, HAS_W)
        sc = tl.where(p_ok[None, :], sc + pb, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp(m_i - m_new)
        pp = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pp, 1)
        if IS_F32:
            pv = tl.dot(pp, vp.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(pp.to(vp.dtype), vp)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # pass 2: local weights m_j = A_local_j + q_hat . lt_j + lb_j times v[p + off_j]
    lt_t = tl.load(LT + hh * HEAD_D * WW + offs_d[:, None] * WW + offs_w[None, :],
                   mask=d_ok[:, None] & w_ok[None, :], other=0.0).to(tl.float32)
    lb = tl.load(LB + hh * WW + offs_w, mask=w_ok, other=0.0).to(tl.float32)
    G_t = tl.dot(q_hat, lt_t, input_precision=PREC) + lb[None, :]
    Wt = tl.exp(L_t - m_i[:, None]) / l_i[:, None] + G_t
    out = acc / l_i[:, None]
    for j in range(WW):
        yy = y + (j // WIN - R)
        xx = x + (j % WIN - R)
        ok = row_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        nb = yy * W + xx
        vj = tl.load(V + b * svb + nb[:, None] * svn + hh * svh + offs_d[None, :] * svd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        wj = tl.sum(tl.where(offs_w[None, :] == j, Wt, 0.0), 1)
        out += wj[:, None] * vj

    o_off = ((b * N + offs_n[:, None]) * NH + hh) * HEAD_D + offs_d[None, :]
    o_lo = out.to(OUT.dtype.element_ty)
    tl.store(OUT + o_off, o_lo, mask=row_ok[:, None] & d_ok[None, :])
    if SAVE_RES:
        # 16-bit out's rounding residual: the backward's delta = dout . out needs ~fp32 out
        tl.store(ORES + o_off, (out - o_lo.to(tl.float32)).to(ORES.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * N + offs_n, m_i + tl.log(l_i), mask=row_ok)


def _bwd_q_kernel(
    Q, K, V, KP, VP, PB, PBI, PBW, QE, TEMP, RBL, LT, LB, OUT, ORES, LSE, DO,
    DQ, DQL, DELTA, PAIRS, RQ, DPB, DQE, DTEMP, DRBL, DLT, DLB,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    skpb, skpp, skph, skpd,
    svpb, svpp, svph, svpd,
    spbh, spbn, spbp,
    sdob, sdon, sdoh, sdod,
    sdqb, sdqn, sdqh, sdqd,
    B, N, P, H, W, NH, B_PER_G, HK, WK,
    HEAD_D: tl.constexpr, D: tl.constexpr, WIN: tl.constexpr, WWP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, IS_F32: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr, ONE_PB: tl.constexpr, SAVE_RES: tl.constexpr, JT: tl.constexpr,
    HAS_W: tl.constexpr, EXCL: tl.constexpr, LOCAL: tl.constexpr, POOL: tl.constexpr,
):
    # LOCAL and POOL: the whole kernel. Split (fewer live registers: the whole one spills),
    # LOCAL only writes delta and its part of dq in fp32 to DQL; POOL only reads delta,
    # adds its part (dq is linear in dq_hat) and writes DQ. Both add their shares of the
    # per-head parameter grads.
    # strides are passed divided by ALIGN so that the compiler sees rows aligned for vector loads
    sqb, sqn, sqh = sqb * ALIGN, sqn * ALIGN, sqh * ALIGN
    skb, skn, skh = skb * ALIGN, skn * ALIGN, skh * ALIGN
    svb, svn, svh = svb * ALIGN, svn * ALIGN, svh * ALIGN
    skpb, skpp, skph = skpb * ALIGN, skpp * ALIGN, skph * ALIGN
    svpb, svpp, svph = svpb * ALIGN, svpp * ALIGN, svph * ALIGN
    sdob, sdon, sdoh = sdob * ALIGN, sdon * ALIGN, sdoh * ALIGN
    sdqb, sdqn, sdqh = sdqb * ALIGN, sdqn * ALIGN, sdqh * ALIGN
    pid_n = tl.program_id(0)
    hh = tl.program_id(1)
    g = tl.program_id(2)
    R: tl.constexpr = WIN // 2
    WW: tl.constexpr = WIN * WIN

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_w = tl.arange(0, WWP)
    row_ok = offs_n < N
    d_ok = offs_d < HEAD_D
    md = row_ok[:, None] & d_ok[None, :]
    y = offs_n // W
    x = offs_n % W
    ny = tl.minimum(y + R, H - 1) - tl.maximum(y - R, 0) + 1
    nx = tl.minimum(x + R, W - 1) - tl.maximum(x - R, 0) + 1
    s = tl.log(tl.maximum(ny * nx + P, 1).to(tl.float32))

    t = tl.load(TEMP + hh).to(tl.float32)
    tau = tl.where(t > 20.0, t, tl.log(1.0 + tl.exp(t)))
    ts = tau * s
    qe = tl.load(QE + hh * HEAD_D + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    w_ok = offs_w < WW
    lt_t = tl.load(LT + hh * HEAD_D * WW + offs_d[:, None] * WW + offs_w[None, :],
                   mask=d_ok[:, None] & w_ok[None, :], other=0.0).to(tl.float32)
    lb = tl.load(LB + hh * WW + offs_w, mask=w_ok, other=0.0).to(tl.float32)

    dqe_acc = tl.zeros([D], tl.float32)
    dtau_acc = tl.zeros([BLOCK_N], tl.float32)
    drbl_acc = tl.zeros([WWP], tl.float32)
    dlb_acc = tl.zeros([WWP], tl.float32)
    dlt_acc = tl.zeros([D, WWP], tl.float32)

    # pool_bias grad (fp32, (h, N, P)): ONE_PB (P <= BLOCK_P) keeps this program's
    # (BLOCK_N, P) slab in registers over its batches and adds it once; otherwise fp32 atomic
    # adds per batch. Either way only the G batch groups contend for an address, never B.
    dpb_acc = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
    dpb_base = DPB + hh * N * P
    b0 = g * B_PER_G
    b1 = tl.minimum(b0 + B_PER_G, B)
    for b in range(b0, b1):
        q = tl.load(Q + b * sqb + offs_n[:, None] * sqn + hh * sqh + offs_d[None, :] * sqd,
                    mask=md, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdob + offs_n[:, None] * sdon + hh * sdoh + offs_d[None, :] * sdod,
                     mask=md, other=0.0)
        dof = do.to(tl.float32)
        lse = tl.load(LSE + (b * NH + hh) * N + offs_n, mask=row_ok, other=0.0)
        qn = tl.sqrt(tl.sum(q * q, 1))
        qnc = tl.maximum(qn, 1e-12)
        q_hat = q / qnc[:, None]
        qt = (q_hat + qe[None, :]) * ts[:, None]

        if LOCAL:
            # local window: A_j, dm_j = do . v_j; X = sum_j A_j dm_j k_hat_j,
            # Y = sum_j A_j k_hat_j
            X = tl.zeros([BLOCK_N, D], tl.float32)
            Y = tl.zeros([BLOCK_N, D], tl.float32)
            A_t = tl.zeros([BLOCK_N, WWP], tl.float32)
            DM_t = tl.zeros([BLOCK_N, WWP], tl.float32)
            for j in range(WW):
                yy = y + (j // WIN - R)
                xx = x + (j % WIN - R)
                ok = row_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                nb = yy * W + xx
                mk = ok[:, None] & d_ok[None, :]
                kj = tl.load(K + b * skb + nb[:, None] * skn + hh * skh
                             + offs_d[None, :] * skd, mask=mk, other=0.0).to(tl.float32)
                vj = tl.load(V + b * svb + nb[:, None] * svn + hh * svh
                             + offs_d[None, :] * svd, mask=mk, other=0.0).to(tl.float32)
                rk = 1.0 / tl.maximum(tl.sqrt(tl.sum(kj * kj, 1)), 1e-12)
                lj = tl.sum(qt * kj, 1) * rk + tl.load(RBL + hh * WW + j).to(tl.float32)
                aj = tl.where(ok, tl.exp(lj - lse), 0.0)
                dmj = tl.sum(dof * vj, 1)
                ar = aj * rk
                X += (ar * dmj)[:, None] * kj
                Y += ar[:, None] * kj
                sel = offs_w[None, :] == j
                A_t = tl.where(sel, aj[:, None], A_t)
                DM_t = tl.where(sel, dmj[:, None], DM_t)
            # learnable tokens: g_j = q_hat . lt_j + lb_j
            G_t = tl.dot(q_hat, lt_t, input_precision=PREC) + lb[None, :]
            o_off = ((b * N + offs_n[:, None]) * NH + hh) * HEAD_D + offs_d[None, :]
            o = tl.load(OUT + o_off, mask=md, other=0.0).to(tl.float32)
            if SAVE_RES:
                o += tl.load(ORES + o_off, mask=md, other=0.0).to(tl.float32)
            delta = tl.where(row_ok, tl.sum(dof * o, 1) - tl.sum(G_t * DM_t, 1), 0.0)
            tl.store(DELTA + (b * NH + hh) * N + offs_n, delta, mask=row_ok)
            # per (query, neighbour): dS_j and the value weight m_j = A_j + g_j, read by
            # _bwd_kv_local_kernel instead of recomputing the logits per key; and 1/|q|
            yy = y[:, None] + (offs_w // WIN - R)[None, :]
            xx = x[:, None] + (offs_w % WIN - R)[None, :]
            ok_t = row_ok[:, None] & w_ok[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            # (B, h, 2, w*w, N): the query index innermost, coalesced here and in the gather
            pair = PAIRS + ((b * NH + hh) * (2 * WW) + offs_w[None, :]) * N + offs_n[:, None]
            mw = row_ok[:, None] & w_ok[None, :]
            tl.store(pair, A_t * (DM_t - delta[:, None]), mask=mw)
            tl.store(pair + WW * N, tl.where(ok_t, A_t + G_t, 0.0), mask=mw)
            tl.store(RQ + (b * NH + hh) * N + offs_n, 1.0 / qnc, mask=row_ok)
            dlb_acc += tl.sum(DM_t, 0)
            drbl_acc += tl.sum(A_t * (DM_t - delta[:, None]), 0)
            dlt_acc += tl.dot(tl.trans(q_hat), DM_t, input_precision=PREC)
            dqh = tl.dot(DM_t, tl.trans(lt_t), input_precision=PREC)
            dqt = X - delta[:, None] * Y
        else:
            delta = tl.load(DELTA + (b * NH + hh) * N + offs_n, mask=row_ok, other=0.0)
            dqh = tl.zeros([BLOCK_N, D], tl.float32)
            dqt = tl.zeros([BLOCK_N, D], tl.float32)

        if POOL:
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                p_ok = offs_p < P
                mp = p_ok[:, None] & d_ok[None, :]
                mnp = row_ok[:, None] & p_ok[None, :]
                kp = tl.load(KP + b * skpb + offs_p[:, None] * skpp + hh * skph
                             + offs_d[None, :] * skpd, mask=mp, other=0.0).to(tl.float32)
                vp = tl.load(VP + b * svpb + offs_p[:, None] * svpp + hh * svph
                             + offs_d[None, :] * svpd, mask=mp, other=0.0)
                kph = kp / tl.maximum(tl.sqrt(tl.sum(kp * kp, 1)), 1e-12)[:, None]
                sc = tl.dot(qt, tl.trans(kph), input_precision=PREC)
                pb = _pool_bias_tile(PB, PBI, PBW, hh, spbh, spbn, spbp, offs_n, offs_p, y,
                                     x, H, HK, WK, mnp, BLOCK_N, BLOCK_P, JT, HAS_W)
                ap = tl.where(mnp, tl.exp(sc + pb - lse[:, None]), 0.0)
                if IS_F32:
                    da = tl.dot(dof, tl.trans(vp.to(tl.float32)), input_precision="ieee")
                else:
                    da = tl.dot(do, tl.trans(vp))
                ds = ap * (da - delta[:, None])
                dqt += tl.dot(ds, kph, input_precision=PREC)
                if JT > 0:  # scatter into the rows of the factored table (same strides as PB)
                    pb_rows, pb_cols = _factored_rows_cols(offs_p, y, x, HK, WK)
                    for tap in tl.static_range(JT):
                        a = tl.load(PBI + tap * H * HK + pb_rows, mask=mnp, other=0)
                        dsj = ds
                        if HAS_W:
                            dsj = ds * tl.load(PBW + tap * H * HK + pb_rows, mask=mnp,
                                               other=0.0)
                        tl.atomic_add(DPB + hh * spbh + a * spbn + pb_cols * spbp, dsj,
                                      mask=mnp, sem="relaxed")
                elif ONE_PB:
                    dpb_acc += ds
                elif EXCL:  # one batch group: this program alone owns its (tile, head) slab
                    dpb_ptr = dpb_base + offs_n[:, None] * P + offs_p[None, :]
                    if b == b0:
                        tl.store(dpb_ptr, ds, mask=mnp)
                    else:
                        tl.store(dpb_ptr, tl.load(dpb_ptr, mask=mnp, other=0.0) + ds,
                                 mask=mnp)
                else:
                    tl.atomic_add(dpb_base + offs_n[:, None] * P + offs_p[None, :], ds,
                                  mask=mnp, sem="relaxed")

        dqe_acc += tl.sum(dqt * ts[:, None], 0)
        dtau_acc += tl.sum(dqt * (q_hat + qe[None, :]), 1) * s
        dqh += dqt * ts[:, None]
        proj = tl.sum(q_hat * dqh, 1)
        dq = tl.where((qn > 1e-12)[:, None], dqh - q_hat * proj[:, None], dqh) / qnc[:, None]
        dql_off = ((b * N + offs_n[:, None]) * NH + hh) * HEAD_D + offs_d[None, :]
        if not POOL:
            tl.store(DQL + dql_off, dq, mask=md)
        else:
            if not LOCAL:
                dq += tl.load(DQL + dql_off, mask=md, other=0.0)
            tl.store(DQ + b * sdqb + offs_n[:, None] * sdqn + hh * sdqh
                     + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty), mask=md)

    if ONE_PB and POOL:
        offs_p = tl.arange(0, BLOCK_P)
        tl.atomic_add(dpb_base + offs_n[:, None] * P + offs_p[None, :], dpb_acc,
                      mask=row_ok[:, None] & (offs_p < P)[None, :], sem="relaxed")
    # per-head parameter grads: one fp32 atomic add per program (few programs per head)
    tl.atomic_add(DQE + hh * HEAD_D + offs_d, dqe_acc, mask=d_ok, sem="relaxed")
    dsp = 1.0 / (1.0 + tl.exp(-t))  # d softplus / dt
    tl.atomic_add(DTEMP + hh, tl.sum(dtau_acc, 0) * dsp, sem="relaxed")
    if LOCAL:
        tl.atomic_add(DRBL + hh * WW + offs_w, drbl_acc, mask=w_ok, sem="relaxed")
        tl.atomic_add(DLB + hh * WW + offs_w, dlb_acc, mask=w_ok, sem="relaxed")
        tl.atomic_add(DLT + hh * HEAD_D * WW + offs_d[:, None] * WW + offs_w[None, :], dlt_acc,
                      mask=d_ok[:, None] & w_ok[None, :], sem="relaxed")


def _bwd_kv_local_kernel(
    Q, K, QE, TEMP, PAIRS, RQ, DO, DK, DV,
    sqb, sqn, sqh, sqd,
    skb, skn, skh, skd,
    sdob, sdon, sdoh, sdod,
    sdkb, sdkn, sdkh, sdkd,
    sdvb, sdvn, sdvh, sdvd,
    N, P, H, W, NH,
    HEAD_D: tl.constexpr, D: tl.constexpr, WIN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # strides are passed divided by ALIGN so that the compiler sees rows aligned for vector loads
    sqb, sqn, sqh = sqb * ALIGN, sqn * ALIGN, sqh * ALIGN
    skb, skn, skh = skb * ALIGN, skn * ALIGN, skh * ALIGN
    sdob, sdon, sdoh = sdob * ALIGN, sdon * ALIGN, sdoh * ALIGN
    sdkb, sdkn, sdkh = sdkb * ALIGN, sdkn * ALIGN, sdkh * ALIGN
    sdvb, sdvn, sdvh = sdvb * ALIGN, sdvn * ALIGN, sdvh * ALIGN
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    R: tl.constexpr = WIN // 2
    WW: tl.constexpr = WIN * WIN

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_n < N
    d_ok = offs_d < HEAD_D
    md = row_ok[:, None] & d_ok[None, :]
    y = offs_n // W
    x = offs_n % W

    t = tl.load(TEMP + hh).to(tl.float32)
    tau = tl.where(t > 20.0, t, tl.log(1.0 + tl.exp(t)))
    qe = tl.load(QE + hh * HEAD_D + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    k = tl.load(K + b * skb + offs_n[:, None] * skn + hh * skh + offs_d[None, :] * skd,
                mask=md, other=0.0).to(tl.float32)
    kn = tl.sqrt(tl.sum(k * k, 1))
    knc = tl.maximum(kn, 1e-12)
    kh = k / knc[:, None]
    dkh = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)

    for j in range(WW):
        # query p = key - offset_j sees this key as its neighbour j
        ys = y - (j // WIN - R)
        xs = x - (j % WIN - R)
        ok = row_ok & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        src = ys * W + xs
        mk = ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + src[:, None] * sqn + hh * sqh + offs_d[None, :] * sqd,
                    mask=mk, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdob + src[:, None] * sdon + hh * sdoh + offs_d[None, :] * sdod,
                     mask=mk, other=0.0).to(tl.float32)
        # that query's dS_j, m_j and 1/|q|, written by _bwd_q_kernel
        pair = PAIRS + (pid_bh * 2 * WW + j) * N + src
        dsj = tl.load(pair, mask=ok, other=0.0)
        mj = tl.load(pair + WW * N, mask=ok, other=0.0)
        rq = tl.load(RQ + pid_bh * N + src, mask=ok, other=0.0)
        ny = tl.minimum(ys + R, H - 1) - tl.maximum(ys - R, 0) + 1
        nx = tl.minimum(xs + R, W - 1) - tl.maximum(xs - R, 0) + 1
        s = tl.log(tl.maximum(ny * nx + P, 1).to(tl.float32))
        qt = (q * rq[:, None] + qe[None, :]) * (tau * s)[:, None]
        dkh += dsj[:, None] * qt
        dv += mj[:, None] * do

    proj = tl.sum(kh * dkh, 1)
    dk = tl.where((kn > 1e-12)[:, None], dkh - kh * proj[:, None], dkh) / knc[:, None]
    tl.store(DK + b * sdkb + offs_n[:, None] * sdkn + hh * sdkh + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=md)
    tl.store(DV + b * sdvb + offs_n[:, None] * sdvn + hh * sdvh + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=md)


def _bwd_kv_pool_kernel(
    Q, KP, VP, PB, PBI, PBW, QE, TEMP, LSE, DELTA, DO, DKP, DVP, DKPH_P, DVP_P,
    sqb, sqn, sqh, sqd,
    skpb, skpp, skph, skpd,
    svpb, svpp, svph, svpd,
    spbh, spbn, spbp,
    sdob, sdon, sdoh, sdod,
    NB, N, P, H, W, NH, HK, WK,
    HEAD_D: tl.constexpr, D: tl.constexpr, WIN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, IS_F32: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr, SPLIT: tl.constexpr, JT: tl.constexpr, HAS_W: tl.constexpr,
):
    # strides are passed divided by ALIGN so that the compiler sees rows aligned for vector loads
    sqb, sqn, sqh = sqb * ALIGN, sqn * ALIGN, sqh * ALIGN
    skpb, skpp, skph = skpb * ALIGN, skpp * ALIGN, skph * ALIGN
    svpb, svpp, svph = svpb * ALIGN, svpp * ALIGN, svph * ALIGN
    sdob, sdon, sdoh = sdob * ALIGN, sdon * ALIGN, sdoh * ALIGN
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    R: tl.constexpr = WIN // 2

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, D)
    p_ok = offs_p < P
    d_ok = offs_d < HEAD_D
    mp = p_ok[:, None] & d_ok[None, :]

    t = tl.load(TEMP + hh).to(tl.float32)
    tau = tl.where(t > 20.0, t, tl.log(1.0 + tl.exp(t)))
    qe = tl.load(QE + hh * HEAD_D + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    kp = tl.load(KP + b * skpb + offs_p[:, None] * skpp + hh * skph + offs_d[None, :] * skpd,
                 mask=mp, other=0.0).to(tl.float32)
    vp = tl.load(VP + b * svpb + offs_p[:, None] * svpp + hh * svph + offs_d[None, :] * svpd,
                 mask=mp, other=0.0)
    kpn = tl.sqrt(tl.sum(kp * kp, 1))
    kpnc = tl.maximum(kpn, 1e-12)
    kph = kp / kpnc[:, None]
    dkph = tl.zeros([BLOCK_P, D], tl.float32)
    dvp = tl.zeros([BLOCK_P, D], tl.float32)

    # SPLIT > 1: this program covers query tiles pid_s, pid_s + SPLIT, ... and writes fp32
    # partials (the l2-norm backward of k_pool then runs on their sum, outside).
    pid_s = tl.program_id(2)
    for n0 in range(pid_s * BLOCK_N, N, SPLIT * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        md = row_ok[:, None] & d_ok[None, :]
        mnp = row_ok[:, None] & p_ok[None, :]
        y = offs_n // W
        x = offs_n % W
        ny = tl.minimum(y + R, H - 1) - tl.maximum(y - R, 0) + 1
        nx = tl.minimum(x + R, W - 1) - tl.maximum(x - R, 0) + 1
        s = tl.log(tl.maximum(ny * nx + P, 1).to(tl.float32))
        q = tl.load(Q + b * sqb + offs_n[:, None] * sqn + hh * sqh + offs_d[None, :] * sqd,
                    mask=md, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdob + offs_n[:, None] * sdon + hh * sdoh + offs_d[None, :] * sdod,
                     mask=md, other=0.0)
        lse = tl.load(LSE + pid_bh * N + offs_n, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * N + offs_n, mask=row_ok, other=0.0)
        q_hat = q / tl.maximum(tl.sqrt(tl.sum(q * q, 1)), 1e-12)[:, None]
        qt = (q_hat + qe[None, :]) * (tau * s)[:, None]
        sc = tl.dot(qt, tl.trans(kph), input_precision=PREC)
        pb = _pool_bias_tile(PB, PBI, PBW, hh, spbh, spbn, spbp, offs_n, offs_p, y, x, H, HK,
                             WK, mnp, BLOCK_N, BLOCK_P, JT, HAS_W)
        ap = tl.where(mnp, tl.exp(sc + pb - lse[:, None]), 0.0)
        if IS_F32:
            dof = do.to(tl.float32)
            dvp += tl.dot(tl.trans(ap), dof, input_precision="ieee")
            da = tl.dot(dof, tl.trans(vp.to(tl.float32)), input_precision="ieee")
        else:
            dvp += tl.dot(tl.trans(ap.to(do.dtype)), do)
            da = tl.dot(do, tl.trans(vp))
        ds = ap * (da - delta[:, None])
        dkph += tl.dot(tl.trans(ds), qt, input_precision=PREC)

    if SPLIT == 1:
        proj = tl.sum(kph * dkph, 1)
        dkp = tl.where((kpn > 1e-12)[:, None], dkph - kph * proj[:, None], dkph) / kpnc[:, None]
        o_off = ((b * P + offs_p[:, None]) * NH + hh) * HEAD_D + offs_d[None, :]
        tl.store(DKP + o_off, dkp.to(DKP.dtype.element_ty), mask=mp)
        tl.store(DVP + o_off, dvp.to(DVP.dtype.element_ty), mask=mp)
    else:
        o_off = (((pid_s * NB + b) * P + offs_p[:, None]) * NH + hh) * D + offs_d[None, :]
        tl.store(DKPH_P + o_off, dkph, mask=p_ok[:, None])
        tl.store(DVP_P + o_off, dvp, mask=p_ok[:, None])


# ----------------------------------------------------------------------------
# launch helpers (triton_launch.kernel wraps: compiled for CUDA, interpreted for CPU)
# ----------------------------------------------------------------------------

def _prec(dtype) -> str:
    # fp32 inputs: exact fp32 dots; 16-bit inputs: tf32 for the fp32 (q_tilde, k_hat) products.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t: Tensor):
    return tuple(t.stride())


def _align(*ts: Tensor) -> int:
    """Largest a in (8, 4, 2, 1) dividing every outer stride and the element offset of
    every (B, n, h, d) tensor in ``ts`` whose d-stride is 1 (else 1)."""
    for a in (8, 4, 2):
        if all(t.stride(3) == 1 and all(st % a == 0 for st in t.stride()[:3])
               and t.data_ptr() % (a * t.element_size()) == 0 for t in ts):
            return a
    return 1


def _sd(t: Tensor, a: int):
    """Strides of a (B, n, h, d) tensor with the outer three divided by ``a``."""
    s0, s1, s2, s3 = t.stride()
    return (s0 // a, s1 // a, s2 // a, s3)


# Launch configuration per kernel (CUDA). Tuned on an H100 at the TransNeXt
# stage shapes (see docs/kernels.md); entries may be overridden for experiments.
TUNE = {
    "fwd": dict(BLOCK_N=64, BLOCK_P=32, num_warps=4, num_stages=1),
    # "<kernel>_small": the entry for maps of up to max_n queries (stage 3 at 224: 196, where
    # 64-row tiles leave a quarter of the last one empty); H200 sweeps, docs/kernels.md
    "fwd_small": dict(max_n=256, BLOCK_N=32, BLOCK_P=32, num_warps=2, num_stages=1),
    # ONE_PB_MAX: P up to which the pool_bias grad stays in registers (else fp32 atomics);
    # 0 measured best on H100 (the register path forces BLOCK_P >= P and spills).
    "bwd_q": dict(BLOCK_N=32, BLOCK_P=32, num_warps=2, num_stages=2, programs_per_sm=32,
                  ONE_PB_MAX=0),
    # _bwd_q_kernel as two launches from P = bwd_q_split_min_p pooled tokens on: the local
    # window's part (delta, its share of dq in fp32) and the pooled part (dS, the pool_bias
    # grad, dq). Split is 6-8% faster at P 256-1025 (the whole kernel spills), 5-7% slower
    # at P 49 (224 input): H100 per-kernel times, docs/dense_speed.md round 11
    "bwd_q_split_min_p": 256,
    "bwd_q_local": dict(BLOCK_N=32, num_warps=2, num_stages=1, programs_per_sm=32),
    "bwd_q_pool": dict(BLOCK_N=32, BLOCK_P=32, num_warps=2, num_stages=2, programs_per_sm=32,
                       ONE_PB_MAX=0),
    "bwd_kv_local": dict(BLOCK_N=32, num_warps=4, num_stages=2),
    "bwd_kv_pool": dict(BLOCK_N=64, BLOCK_P=64, num_warps=4, num_stages=2, programs_per_sm=8),
    # How the kernels take a factored pool bias (ops.position_bias), in training and in
    # inference: "expand" writes it out per call (ops.position_bias_triton) and folds the
    # gradient back; "gather" reads the table inside the kernels (no (h, N, P) tensor at all;
    # slower in training, see that module; in inference no transient (h, N, P) buffer, and
    # at 1024x2048 the faster one: docs/dense_speed.md, round 5).
    "factored": "expand",
    "factored_infer": "gather",
}


def _entry(name: str, N: int) -> dict:
    """TUNE's entry for kernel ``name`` on maps of N queries."""
    small = TUNE.get(name + "_small")
    return small if small is not None and N <= small["max_n"] else TUNE[name]


def _cfg(name: str, N: int, P: int, d: int, is_cuda: bool):
    """(D, BLOCK_N, BLOCK_P, launch kwargs) for one kernel."""
    D = max(16, triton.next_power_of_2(d))
    t = _entry(name, N)
    bp = min(t.get("BLOCK_P", 64), max(16, triton.next_power_of_2(P)))
    bn = t["BLOCK_N"]
    if not is_cuda:  # interpreter: small tiles, no launch options
        return D, min(64, max(16, triton.next_power_of_2(N))), min(32, bp), {}
    return D, bn, bp, dict(num_warps=t["num_warps"], num_stages=t["num_stages"])


def _check(q, k, v, k_pool, v_pool, pool_bias, pb_idx, pool_hw, H, W, window):
    B, N, h, d = q.shape
    if N != H * W:
        raise ValueError(f"q has N={N} tokens but H*W={H * W}")
    if window % 2 != 1:
        raise ValueError("window must be odd")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k, v must have the same shape")
    P = k_pool.shape[1]
    if k_pool.shape != (B, P, h, d) or v_pool.shape != (B, P, h, d):
        raise ValueError("k_pool, v_pool must be (B, P, h, d)")
    if pb_idx.numel():  # factored (ops.position_bias.FactoredBias)
        HK, WK = pool_hw
        if (HK * WK != P or pool_bias.dim() != 3 or pool_bias.shape[0] != h
                or pool_bias.shape[2] != W * WK or pb_idx.shape[1:] != (H * HK,)):
            raise ValueError(f"factored pool_bias: table {tuple(pool_bias.shape)} and index "
                             f"{tuple(pb_idx.shape)} do not fit H, W = {H}, {W} and a "
                             f"{HK}x{WK} pool grid with {h} heads")
    elif pool_bias.shape != (h, N, P):
        raise ValueError(
            f"pool_bias must be (h, N, P)=({h}, {N}, {P}), got {tuple(pool_bias.shape)}")


def _small(t: Tensor) -> Tensor:
    return t.contiguous()


def _expands(pb_idx, training: bool = True) -> bool:
    """A factored bias (non-empty index) that this call writes out (TUNE["factored"] in
    training, TUNE["factored_infer"] in a forward without backward)."""
    return pb_idx.numel() > 0 and TUNE["factored" if training else "factored_infer"] == "expand"


def _fact(pb_idx, pb_w, pool_hw):
    """Kernel arguments of the bias form: JT taps (0: dense), HAS_W, HK, WK."""
    jt = pb_idx.shape[0] if pb_idx.numel() else 0
    return dict(JT=jt, HAS_W=pb_w.numel() > 0), tuple(pool_hw)


def _fwd_impl(q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature,
              rel_bias_local, learnable_tokens, learnable_bias, pb_idx, pb_w, H, W, window,
              pool_h, pool_w, save_residual):
    _check(q, k, v, k_pool, v_pool, pool_bias, pb_idx, (pool_h, pool_w), H, W, window)
    if _expands(pb_idx, training=save_residual):  # save_residual: a backward will follow
        pool_bias = expand_factored(pool_bias, pb_idx, pb_w, (H, W), (pool_h, pool_w))
        pb_idx, pb_w = pb_idx[:0], pb_w[:0]
    fk, (HK, WK) = _fact(pb_idx, pb_w, (pool_h, pool_w))
    B, N, h, d = q.shape
    P = k_pool.shape[1]
    D, BLOCK_N, BLOCK_P, kw = _cfg("fwd", N, P, d, q.is_cuda)
    out = torch.empty((B, N, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, h, N), dtype=torch.float32, device=q.device)
    save_res = save_residual and q.dtype != torch.float32
    ores = torch.empty((B, N, h, d) if save_res else (0,), dtype=q.dtype, device=q.device)
    if B * N * h == 0:
        return out, lse, ores
    qe, temp, rbl, lt, lb = (_small(t) for t in (query_embedding, temperature, rel_bias_local,
                                                   learnable_tokens, learnable_bias))
    grid = (triton.cdiv(N, BLOCK_N), B * h)
    al = _align(q, k, v, k_pool, v_pool)
    launch(_fwd_kernel, q, grid,
        q, k, v, k_pool, v_pool, pool_bias, pb_idx, pb_w, qe, temp, rbl, lt, lb, out, lse,
        ores if save_res else out,
        *_sd(q, al), *_sd(k, al), *_sd(v, al), *_sd(k_pool, al), *_sd(v_pool, al),
        *_strides(pool_bias),
        N, P, H, W, h, HK, WK,
        HEAD_D=d, D=D, WIN=window, WWP=max(16, triton.next_power_of_2(window * window)),
        BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P, IS_F32=(q.dtype == torch.float32),
        PREC=_prec(q.dtype), ALIGN=al, SAVE_RES=save_res, **fk, **kw,
    )
    return out, lse, ores


def _bwd_impl(q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature,
              rel_bias_local, learnable_tokens, learnable_bias, pb_idx, pb_w, out, out_res, lse,
              dout, H, W, window, pool_h, pool_w, eager=False, dqkv=None):
    # eager: called by the eager autograd Function (not the custom op torch.compile records,
    # whose outputs may not alias and whose CUDA graphs must own every buffer they read).
    # dqkv: a (B, N, 3, h, d) buffer that dq, dk and dv are written into (returned as views)
    table = None
    if _expands(pb_idx):  # write the bias out again (not kept from the forward: memory)
        table, idx_f, w_f = pool_bias, pb_idx, pb_w
        pool_bias = expand_factored(table, idx_f, w_f, (H, W), (pool_h, pool_w))
        pb_idx, pb_w = pb_idx[:0], pb_w[:0]
    fk, (HK, WK) = _fact(pb_idx, pb_w, (pool_h, pool_w))
    B, N, h, d = q.shape
    P = k_pool.shape[1]
    WW = window * window
    WWP = max(16, triton.next_power_of_2(WW))  # >= 16: it is a tl.dot dimension
    dev = q.device
    f32 = torch.float32
    interp = not q.is_cuda
    qe, temp, rbl, lt, lb = (_small(t) for t in (query_embedding, temperature, rel_bias_local,
                                                   learnable_tokens, learnable_bias))
    is_f32 = q.dtype == torch.float32
    if dqkv is not None:
        dq, dk, dv = dqkv.unbind(2)
    else:
        dq = torch.empty((B, N, h, d), dtype=q.dtype, device=dev)
        dk = torch.empty((B, N, h, d), dtype=k.dtype, device=dev)
        dv = torch.empty((B, N, h, d), dtype=v.dtype, device=dev)
    al = _align(q, k, v, k_pool, v_pool, dout, dq, dk, dv)
    dkp = torch.empty((B, P, h, d), dtype=k_pool.dtype, device=dev)
    dvp = torch.empty((B, P, h, d), dtype=v_pool.dtype, device=dev)
    delta = torch.empty((B, h, N), dtype=f32, device=dev)
    pairs = torch.empty((B, h, 2, WW, N), dtype=f32, device=dev)  # dS_j and m_j per query
    rq = torch.empty((B, h, N), dtype=f32, device=dev)

    small = (query_embedding, temperature, rel_bias_local, learnable_tokens, learnable_bias)
    zf = dict(dtype=f32, device=dev)
    if eager:  # views of one zeroed buffer: one launch, not five (host time)
        flat = torch.zeros(sum(t.numel() for t in small), **zf)
        dqe_f, dtemp_f, drbl_f, dlt_f, dlb_f = (
            c.view(t.shape) for c, t in zip(flat.split([t.numel() for t in small]), small))
    else:
        dqe_f, dtemp_f, drbl_f, dlt_f, dlb_f = (torch.zeros(t.shape, **zf) for t in small)
    # (TUNE entry, LOCAL, POOL) per launch; split, the local part of dq goes through dql
    parts = ([("bwd_q_local", True, False), ("bwd_q_pool", False, True)]
             if P >= TUNE["bwd_q_split_min_p"] else [("bwd_q", True, True)])
    dql = torch.empty((B, N, h, d), **zf) if len(parts) > 1 else dq
    dpb_f = None
    for name, local, pool in parts:
        D, BLOCK_N, BLOCK_P, kw = _cfg(name, N, P, d, q.is_cuda)
        one_pb = pool and P <= _entry(name, N).get("ONE_PB_MAX", 64) and fk["JT"] == 0
        if one_pb:
            BLOCK_P = max(16, triton.next_power_of_2(P))
        n_tiles = triton.cdiv(N, BLOCK_N)
        # batch groups: enough programs to fill the GPU; the pool_bias / parameter grads are
        # fp32 atomic adds contended only by the G groups (a program loops over its group's
        # batches)
        if interp:  # B = 2: one group (the exclusive dpb path), B >= 3: two (atomics)
            G = 1 if B <= 2 else 2
        else:
            target = _entry(name, N)["programs_per_sm"] * sm_count(dev)
            G = max(1, min(B, triton.cdiv(target, n_tiles * h)))
        b_per_g = triton.cdiv(B, G)
        G = triton.cdiv(B, b_per_g)
        # the bias grad in the bias's own form (and strides: the kernel reuses PB's); with one
        # batch group the dense form is stored, not added, by the one program owning each cell
        excl = pool and G == 1 and B > 0 and not one_pb and fk["JT"] == 0
        if pool:
            dpb_f = (torch.zeros(pool_bias.shape, **zf) if fk["JT"] else
                     torch.empty((h, N, P), **zf) if excl else torch.zeros((h, N, P), **zf))
        launch(_bwd_q_kernel, q, (n_tiles, h, G),
            q, k, v, k_pool, v_pool, pool_bias, pb_idx, pb_w, qe, temp, rbl, lt, lb, out,
            out_res if out_res.numel() else out, lse, dout, dq, dql, delta, pairs, rq,
            dpb_f if pool else dql, dqe_f, dtemp_f, drbl_f, dlt_f, dlb_f,
            *_sd(q, al), *_sd(k, al), *_sd(v, al), *_sd(k_pool, al), *_sd(v_pool, al),
            *_strides(pool_bias), *_sd(dout, al), *_sd(dq, al),
            B, N, P, H, W, h, b_per_g, HK, WK,
            HEAD_D=d, D=D, WIN=window, WWP=WWP, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P,
            IS_F32=is_f32, PREC=_prec(q.dtype), ALIGN=al, ONE_PB=one_pb,
            SAVE_RES=out_res.numel() > 0, EXCL=excl, LOCAL=local, POOL=pool, **fk, **kw,
        )
    D, BLOCK_N, _, kw = _cfg("bwd_kv_local", N, P, d, q.is_cuda)
    launch(_bwd_kv_local_kernel, q, (triton.cdiv(N, BLOCK_N), B * h),
        q, k, qe, temp, pairs, rq, dout, dk, dv,
        *_sd(q, al), *_sd(k, al), *_sd(dout, al), *_sd(dk, al), *_sd(dv, al),
        N, P, H, W, h,
        HEAD_D=d, D=D, WIN=window, BLOCK_N=BLOCK_N, ALIGN=al, **kw,
    )
    D, BLOCK_N, BLOCK_P, kw = _cfg("bwd_kv_pool", N, P, d, q.is_cuda)
    p_tiles = triton.cdiv(P, BLOCK_P)
    if interp:
        split = 2 if N > BLOCK_N else 1
    else:
        target = (TUNE["bwd_kv_pool"]["programs_per_sm"]
                  * sm_count(dev))
        n_it = triton.cdiv(N, BLOCK_N)
        # split the query loop only where it is long (the partials cost ~12 small torch ops)
        split = max(1, min(n_it // 64, target // (p_tiles * B * h))) if n_it >= 128 else 1
    if split > 1:
        dkph_p = torch.empty((split, B, P, h, D), dtype=f32, device=dev)
        dvp_p = torch.empty((split, B, P, h, D), dtype=f32, device=dev)
    else:
        dkph_p = dvp_p = dkp  # unused
    launch(_bwd_kv_pool_kernel, q, (p_tiles, B * h, split),
        q, k_pool, v_pool, pool_bias, pb_idx, pb_w, qe, temp, lse, delta, dout, dkp, dvp,
        dkph_p, dvp_p,
        *_sd(q, al), *_sd(k_pool, al), *_sd(v_pool, al), *_strides(pool_bias), *_sd(dout, al),
        B, N, P, H, W, h, HK, WK,
        HEAD_D=d, D=D, WIN=window, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P, IS_F32=is_f32,
        PREC=_prec(q.dtype), ALIGN=al, SPLIT=split, **fk, **kw,
    )
    if split > 1:
        # l2-normalisation backward of k_pool on the summed partials (small: B*P*h*d)
        g_hat = dkph_p.sum(0)[..., :d]
        kpf = k_pool.float()
        nrm = kpf.norm(dim=-1, keepdim=True)
        nrmc = nrm.clamp_min(_EPS)
        kph = kpf / nrmc
        dkpf = torch.where(nrm > _EPS, g_hat - kph * (kph * g_hat).sum(-1, keepdim=True), g_hat)
        dkp.copy_(dkpf / nrmc)
        dvp.copy_(dvp_p.sum(0)[..., :d])

    def cast(g, like):
        return g if g.dtype == like.dtype else g.to(like.dtype)

    if table is not None:
        dpb_f = reduce_factored_grad(dpb_f, idx_f, w_f, table.shape[1], (H, W), (pool_h, pool_w),
                                     keep_rows=eager)
        pool_bias = table
    dpb = cast(dpb_f, pool_bias)
    dqe, dtemp = cast(dqe_f, query_embedding), cast(dtemp_f, temperature)
    drbl = cast(drbl_f, rel_bias_local)
    dlt, dlb = cast(dlt_f, learnable_tokens), cast(dlb_f, learnable_bias)
    # every gradient is returned contiguous (the fake kernel says so), dqkv's views aside
    rest = tuple(t.contiguous() for t in (dkp, dvp, dpb, dqe, dtemp, drbl, dlt, dlb))
    if dqkv is not None:
        return (dq, dk, dv) + rest
    return (dq.contiguous(), dk.contiguous(), dv.contiguous()) + rest


# ----------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------

@torch.library.custom_op("transnext::aggregated_attention_fwd", mutates_args=())
def aggregated_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, pool_bias: Tensor,
    query_embedding: Tensor, temperature: Tensor, rel_bias_local: Tensor,
    learnable_tokens: Tensor, learnable_bias: Tensor, pb_idx: Tensor, pb_w: Tensor, H: int,
    W: int, window: int, pool_h: int, pool_w: int, save_residual: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, lse, out_res): out (B, N, h, d) in q's dtype, lse (B, h, N) fp32, and,
    for 16-bit q with ``save_residual``, out's rounding residual (B, N, h, d) (else empty).
    ``pb_idx``/``pb_w`` empty: pool_bias is (h, N, P); else the factored form."""
    return _fwd_impl(q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature,
                     rel_bias_local, learnable_tokens, learnable_bias, pb_idx, pb_w, H, W,
                     window, pool_h, pool_w, save_residual)


@aggregated_attention_fwd.register_fake
def _(q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature, rel_bias_local,
      learnable_tokens, learnable_bias, pb_idx, pb_w, H, W, window, pool_h, pool_w,
      save_residual=False):
    B, N, h, d = q.shape
    save = save_residual and q.dtype != torch.float32
    return (q.new_empty((B, N, h, d)), q.new_empty((B, h, N), dtype=torch.float32),
            q.new_empty((B, N, h, d) if save else (0,)))


@torch.library.custom_op("transnext::aggregated_attention_bwd", mutates_args=())
def aggregated_attention_bwd(
    q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, pool_bias: Tensor,
    query_embedding: Tensor, temperature: Tensor, rel_bias_local: Tensor,
    learnable_tokens: Tensor, learnable_bias: Tensor, pb_idx: Tensor, pb_w: Tensor, out: Tensor,
    out_res: Tensor, lse: Tensor, dout: Tensor, H: int, W: int, window: int, pool_h: int,
    pool_w: int,
) -> list[Tensor]:
    return list(_bwd_impl(q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature,
                          rel_bias_local, learnable_tokens, learnable_bias, pb_idx, pb_w, out,
                          out_res, lse, dout, H, W, window, pool_h, pool_w))


@aggregated_attention_bwd.register_fake
def _(q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature, rel_bias_local,
      learnable_tokens, learnable_bias, pb_idx, pb_w, out, out_res, lse, dout, H, W, window,
      pool_h, pool_w):
    ins = (q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature, rel_bias_local,
           learnable_tokens, learnable_bias)
    return [t.new_empty(t.shape) for t in ins]


def _setup_context(ctx, inputs, output):
    (q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature, rel_bias_local,
     learnable_tokens, learnable_bias, pb_idx, pb_w, H, W, window, pool_h, pool_w, *_) = inputs
    out, lse, out_res = output
    ctx.save_for_backward(q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature,
                          rel_bias_local, learnable_tokens, learnable_bias, pb_idx, pb_w, out,
                          out_res, lse)
    ctx.geom = (H, W, window, pool_h, pool_w)


def _backward(ctx, dout, dlse, dres):
    saved = ctx.saved_tensors
    H, W, window, pool_h, pool_w = ctx.geom
    if dout is None:
        dout = torch.zeros_like(saved[13])
    grads = aggregated_attention_bwd(*saved, dout, H, W, window, pool_h, pool_w)
    return (*grads, None, None, None, None, None, None, None, None)


aggregated_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _AggregatedAttentionFn(torch.autograd.Function):
    """Eager path: the same kernels without the custom-op dispatch overhead (which was
    ~1 ms per call on the host in torch 2.11); torch.compile uses the custom op."""

    @staticmethod
    def forward(ctx, q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature,
                rel_bias_local, learnable_tokens, learnable_bias, pb_idx, pb_w, H, W, window,
                pool_h, pool_w, save_residual):
        rest = (k_pool, v_pool, pool_bias, query_embedding, temperature, rel_bias_local,
                learnable_tokens, learnable_bias, pb_idx, pb_w)
        return _forward_saving(ctx, (q, k, v), (q, k, v), rest, (H, W, window, pool_h, pool_w),
                               save_residual)

    @staticmethod
    def backward(ctx, dout):
        grads = _bwd_impl(*ctx.saved_tensors, dout, *ctx.geom, eager=True)
        return (*grads, None, None, None, None, None, None, None, None)


class _PackedAttentionFn(torch.autograd.Function):
    """``_AggregatedAttentionFn`` for q, k, v packed in one (B, N, 3, h, d) tensor (the
    model's q and kv projections as one product): the backward writes dq, dk and dv into one
    (B, N, 3, h, d) gradient. With three inputs autograd stacked k's and v's gradients and
    the projection's backward concatenated them with q's: the same gradient copied twice."""

    @staticmethod
    def forward(ctx, qkv, k_pool, v_pool, pool_bias, query_embedding, temperature,
                rel_bias_local, learnable_tokens, learnable_bias, pb_idx, pb_w, H, W, window,
                pool_h, pool_w):
        rest = (k_pool, v_pool, pool_bias, query_embedding, temperature, rel_bias_local,
                learnable_tokens, learnable_bias, pb_idx, pb_w)
        return _forward_saving(ctx, (qkv,), qkv.unbind(2), rest, (H, W, window, pool_h, pool_w),
                               True)

    @staticmethod
    def backward(ctx, dout):
        qkv, *rest = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        grads = _bwd_impl(*qkv.unbind(2), *rest, dout, *ctx.geom, eager=True, dqkv=dqkv)
        return (dqkv, *grads[3:], None, None, None, None, None, None, None)


def _forward_saving(ctx, keep, qkv, rest, geom, save_residual):
    """The eager Functions' forward: ``_fwd_impl(*qkv, *rest, *geom)``, keeping ``keep`` (q,
    k, v or their packed tensor), ``rest``, out, its residual and lse for the backward."""
    out, lse, out_res = _fwd_impl(*qkv, *rest, *geom, save_residual)
    ctx.save_for_backward(*keep, *rest, out, out_res, lse)
    ctx.geom = geom
    return out


def _bias_args(pool_bias, q: Tensor):
    """(pool_bias, pb_idx, pb_w, pool_hw) for the kernels: a FactoredBias's table, index and
    weights, or a dense (h, N, P) bias with an empty index and weights."""
    if isinstance(pool_bias, FactoredBias):
        pb_idx = pool_bias.idx
        pb_w = pool_bias.w if pool_bias.w is not None else pb_idx.new_empty(0, dtype=torch.float32)
        return pool_bias.table.contiguous(), pb_idx, pb_w, pool_bias.k_hw
    return (pool_bias, q.new_empty(0, dtype=torch.int32), q.new_empty(0, dtype=torch.float32),
            (0, 0))


def aggregated_attention_triton(q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature,
                                rel_bias_local, learnable_tokens, learnable_bias, H, W, window=3):
    """Fused forward (and, through autograd, backward); returns (B, N, h, d) in q's dtype.

    Under torch.compile this is the custom op ``transnext::aggregated_attention_fwd`` (no graph
    break); in eager mode an equivalent ``torch.autograd.Function`` over the same kernels."""
    pool_bias, pb_idx, pb_w, pool_hw = _bias_args(pool_bias, q)
    ins = (q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature, rel_bias_local,
           learnable_tokens, learnable_bias)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in ins)
    geom = (H, W, window, *pool_hw)
    if torch.compiler.is_compiling():
        out, _, _ = aggregated_attention_fwd(*ins, pb_idx, pb_w, *geom, need_grad)
        return out
    if need_grad:
        return _AggregatedAttentionFn.apply(*ins, pb_idx, pb_w, *geom, True)
    return _fwd_impl(*ins, pb_idx, pb_w, *geom, False)[0]


def aggregated_attention_triton_packed(qkv, k_pool, v_pool, pool_bias, query_embedding,
                                       temperature, rel_bias_local, learnable_tokens,
                                       learnable_bias, H, W, window=3):
    """:func:`aggregated_attention_triton` of ``qkv.unbind(2)``, qkv (B, N, 3, h, d); in
    eager training one gradient for qkv, written by the kernels (``_PackedAttentionFn``)."""
    small = (query_embedding, temperature, rel_bias_local, learnable_tokens, learnable_bias)
    table = getattr(pool_bias, "table", pool_bias)  # a FactoredBias's, or the dense bias
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (qkv, k_pool, v_pool, table, *small))):
        return aggregated_attention_triton(*qkv.unbind(2), k_pool, v_pool, pool_bias, *small,
                                           H, W, window)
    pool_bias, pb_idx, pb_w, pool_hw = _bias_args(pool_bias, qkv)
    return _PackedAttentionFn.apply(qkv, k_pool, v_pool, pool_bias, *small, pb_idx, pb_w, H, W,
                                    window, *pool_hw)
