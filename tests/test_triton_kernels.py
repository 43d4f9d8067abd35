"""Triton aggregated-attention kernels against the plain-PyTorch reference.

On CPU the kernels run in triton's interpreter. Triton decides between compiled
and interpreted kernels when functions are *decorated* (at ``import triton``),
so this module sets ``TRITON_INTERPRET=1`` before triton is imported. If some
earlier test module already imported triton without it, the CPU cases run in
one subprocess (``test_cpu_cases_in_subprocess``) instead.

On CUDA the same cases run compiled, plus real stage shapes, fp16/bf16, d=64,
torch.compile and opcheck.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not importable")
if HAVE_TRITON and not CUDA:
    from triton_env import interpreter_problem

    if interpreter_problem():  # the CPU cases need the interpreter
        pytestmark = pytest.mark.skip(reason=interpreter_problem())


def _interp_in_process() -> bool:
    return HAVE_TRITON and type(tl.sum).__name__ == "InterpretedFunction"


# CPU needs the interpreter in this process; otherwise a subprocess runs the CPU cases.
RUN_HERE = CUDA or _interp_in_process()
_SUBPROCESS_FLAG = "TRANSNEXT_TRITON_TEST_CHILD"

from transnext.ops.aggregated_attention import aggregated_attention  # noqa: E402
from transnext.ops.position_bias import FactoredBias  # noqa: E402
from transnext.ops.reference import aggregated_attention_reference  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
NAMES = ["q", "k", "v", "k_pool", "v_pool", "pool_bias", "query_embedding", "temperature",
         "rel_bias_local", "learnable_tokens", "learnable_bias"]


def make_inputs(B, H, W, h, d, P, dtype=torch.float32, window=3, noncontig=True, seed=0,
                device=DEV):
    """Random inputs; q a (B,N,C) Linear-like output viewed as heads, k/v halves of one
    (B,N,2C) tensor (non-contiguous views) when ``noncontig``. Returns (leaves, views)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    N, C, ww = H * W, h * d, window * window

    def rn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_()

    # larger-than-init parameters so every term matters numerically
    params = [rn(h, 1, d, std=0.5, dt=torch.float32), rn(h, 1, 1, std=1.0, dt=torch.float32),
              rn(h, ww, std=0.5, dt=torch.float32), rn(h, d, ww, std=0.3, dt=torch.float32),
              rn(h, 1, ww, std=0.3, dt=torch.float32)]
    pb = rn(h, N, P, std=0.5)
    if noncontig:
        qx, kvx, kvp = rn(B, N, C), rn(B, N, 2 * C), rn(B, P, 2 * C)
        leaves = [qx, kvx, kvp, pb, *params]

        def views():
            k, v = kvx.view(B, N, 2, h, d).unbind(2)
            kp, vp = kvp.view(B, P, 2, h, d).unbind(2)
            return [qx.view(B, N, h, d), k, v, kp, vp, pb, *params]
    else:
        t = [rn(B, N, h, d), rn(B, N, h, d), rn(B, N, h, d), rn(B, P, h, d), rn(B, P, h, d)]
        leaves = [*t, pb, *params]

        def views():
            return [*t, pb, *params]
    return leaves, views


TOL = {  # (forward, gradient) bound on ||a - b|| / ||b||
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_case(B, H, W, h, d, P, dtype=torch.float32, window=3, noncontig=True, seed=0):
    leaves, views = make_inputs(B, H, W, h, d, P, dtype, window, noncontig, seed)
    N = H * W
    # reference on fp32 copies of the same values (the fp32 computation is the truth)
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    vt = views()
    ref_views = make_views_like(vt, leaves, ref_leaves)
    ref = aggregated_attention_reference(*ref_views, H, W, window)
    out = aggregated_attention(*vt, H, W, window, backend="triton")
    assert out.shape == (B, N, h, d) and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    ftol, gtol = TOL[dtype]
    err = _rel(out, ref)
    assert err < ftol, f"forward rel err {err:.2e}"

    gout = torch.randn(B, N, h, d, generator=torch.Generator().manual_seed(seed + 1))
    g_tri = torch.autograd.grad(out, vt, gout.to(DEV, dtype))
    g_ref = torch.autograd.grad(ref, ref_views, gout.to(DEV))
    for name, a, b in zip(NAMES, g_tri, g_ref):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        e = _rel(a, b)
        assert e < gtol, f"grad {name}: rel err {e:.2e}"


def dense_form(device=DEV):
    """The custom op's (pb_idx, pb_w) for a dense (h, N, P) pool_bias: both empty."""
    return (torch.empty(0, dtype=torch.int32, device=device),
            torch.empty(0, dtype=torch.float32, device=device))


def make_factored(H, W, h, pool_hw, taps, weighted, seed=0, device=DEV):
    """A random FactoredBias (table a leaf) for an H x W query grid and a pool grid."""
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    HK, WK = pool_hw
    rows = 2 * H + HK  # any number of rows; each (qh, kh) pair picks `taps` of them
    table = (torch.randn(h, rows, W * WK, generator=g) * 0.5).to(device).requires_grad_()
    idx = torch.randint(0, rows, (taps, H * HK), generator=g, dtype=torch.int32).to(device)
    w = torch.rand(taps, H * HK, generator=g).to(device) if weighted else None
    return FactoredBias(table, idx, w, (H, W), pool_hw)


def check_factored_case(B, H, W, h, d, pool_hw, taps, weighted, dtype=torch.float32, seed=0):
    """The kernels reading (and scattering the gradient into) a factored bias against the
    reference on its dense form: forward, every input gradient and the table's."""
    P = pool_hw[0] * pool_hw[1]
    _, views = make_inputs(B, H, W, h, d, P, dtype, seed=seed)
    fb = make_factored(H, W, h, pool_hw, taps, weighted, seed)
    vt = views()
    vt[5] = fb
    out = aggregated_attention(*vt, H, W, 3, backend="triton")
    ref_in = [x.detach().float().requires_grad_() if isinstance(x, torch.Tensor) else x
              for x in vt]
    ref_in[5] = fb._replace(table=fb.table.detach().requires_grad_())
    ref = aggregated_attention_reference(*ref_in[:5], ref_in[5].dense(), *ref_in[6:], H, W, 3)
    ftol, gtol = TOL[dtype]
    assert _rel(out, ref) < ftol
    gout = torch.randn(B, H * W, h, d, generator=torch.Generator().manual_seed(seed + 1))
    grads_of = [x for i, x in enumerate(vt) if i != 5] + [fb.table]
    ref_of = [x for i, x in enumerate(ref_in) if i != 5] + [ref_in[5].table]
    g_tri = torch.autograd.grad(out, grads_of, gout.to(DEV, dtype))
    g_ref = torch.autograd.grad(ref, ref_of, gout.to(DEV))
    names = [n for n in NAMES if n != "pool_bias"] + ["factored table"]
    for name, a, b in zip(names, g_tri, g_ref):
        assert a.shape == b.shape, name
        e = _rel(a, b)
        assert e < gtol, f"grad {name}: rel err {e:.2e}"


def make_views_like(views, leaves, new_leaves):
    """Rebuild the same views over ``new_leaves`` (same strides / offsets)."""
    out = []
    for v in views:
        for old, new in zip(leaves, new_leaves):
            if v.untyped_storage().data_ptr() == old.untyped_storage().data_ptr():
                es_old, es_new = old.element_size(), new.element_size()
                off = (v.data_ptr() - old.data_ptr()) // es_old
                out.append(new.as_strided(v.shape, v.stride(), new.storage_offset() + off)
                           if es_new else None)
                break
        else:  # pragma: no cover
            raise AssertionError("view of an unknown leaf")
    return out


# (B, H, W, h, d, P, window, noncontig): odd, non-square, smaller than a tile, 1x1,
# H or W = 1, several pool sizes / head counts, multiple query and pool tiles.
CPU_CASES = [
    (2, 5, 7, 2, 24, 6, 3, True),
    (1, 1, 1, 1, 32, 1, 3, True),
    (2, 1, 9, 3, 24, 4, 3, False),
    (1, 8, 1, 2, 32, 3, 3, True),
    (3, 4, 4, 1, 24, 1, 3, True),
    (1, 9, 20, 3, 24, 70, 3, True),
    (1, 6, 5, 2, 24, 9, 5, True),
    (2, 3, 4, 1, 32, 2, 1, False),
    (1, 2, 2, 2, 24, 5, 3, True),
]
CPU_DTYPE_CASES = [(2, 5, 7, 2, 24, 6, 3, True)]


def _case_id(c):
    return "B{}_{}x{}_h{}_d{}_P{}_w{}_{}".format(*c[:7], "view" if c[7] else "contig")


needs_here = pytest.mark.skipif(not RUN_HERE, reason="interpreter not active in-process; "
                                "see test_cpu_cases_in_subprocess")


@needs_here
@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_fp32_matches_reference(case):
    B, H, W, h, d, P, win, nc = case
    check_case(B, H, W, h, d, P, torch.float32, win, nc)


@needs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CPU_DTYPE_CASES, ids=_case_id)
def test_half_matches_reference(case, dtype):
    if not CUDA and dtype == torch.bfloat16:
        pytest.skip("triton's interpreter computes bf16 dots on the raw bits (wrong); GPU only")
    B, H, W, h, d, P, win, nc = case
    check_case(B, H, W, h, d, P, dtype, win, nc)


@needs_here
@pytest.mark.parametrize("split", [True, False], ids=["split", "whole"])
def test_pool_bias_grad_register_path(split, monkeypatch):
    """The dq kernel whole and split in two launches (TUNE["bwd_q_split_min_p"]), each with its
    pool_bias-grad paths: registers when P <= ONE_PB_MAX, atomics (B = 3: two batch groups
    in the interpreter) or stores (B = 2: one group) else."""
    from transnext.ops import triton_kernels as tk

    monkeypatch.setitem(tk.TUNE, "bwd_q_split_min_p", 0 if split else 10**9)
    name = "bwd_q_pool" if split else "bwd_q"
    monkeypatch.setitem(tk.TUNE, name, dict(tk.TUNE[name], ONE_PB_MAX=64))
    check_case(3, 5, 6, 2, 24, 7, torch.float32)
    monkeypatch.setitem(tk.TUNE, name, dict(tk.TUNE[name], ONE_PB_MAX=0))
    check_case(3, 5, 6, 2, 24, 7, torch.float32)
    check_case(2, 4, 5, 2, 8, 6, torch.float32)


def check_packed(B, H, W, h, d, P, dtype=torch.float32, factored=False, seed=0):
    """``aggregated_attention_packed`` (q, k, v in one (B, N, 3, h, d) tensor, the layout of
    the model's joint q/kv product) against the reference on the three views: forward and
    gradients, the qkv gradient one contiguous tensor the kernels wrote (no stack or cat)."""
    from transnext.ops.aggregated_attention import aggregated_attention_packed

    N = H * W
    _, views = make_inputs(B, H, W, h, d, P, dtype, seed=seed)
    rest = views()[3:]
    if factored:
        rest[2] = make_factored(H, W, h, (P, 1), 2, True, seed)
    g = torch.Generator().manual_seed(seed + 3)
    # a (B, N, 3C) product viewed as (B, N, 3, h, d)
    qkv = torch.randn(B, N, 3 * h * d, generator=g).to(DEV, dtype).requires_grad_()
    out = aggregated_attention_packed(qkv.view(B, N, 3, h, d), *rest, H, W, 3,
                                      backend="triton")
    ref_qkv = qkv.detach().float().requires_grad_()
    ref_rest = [x.detach().float().requires_grad_() if isinstance(x, torch.Tensor) else x
                for x in rest]
    if factored:
        ref_rest[2] = ref_rest[2]._replace(table=rest[2].table.detach().requires_grad_())
    bias = ref_rest[2].dense() if factored else ref_rest[2]
    ref = aggregated_attention_reference(*ref_qkv.view(B, N, 3, h, d).unbind(2), *ref_rest[:2],
                                         bias, *ref_rest[3:], H, W, 3)
    ftol, gtol = TOL[dtype]
    assert _rel(out, ref) < ftol
    gout = torch.randn(B, N, h, d, generator=torch.Generator().manual_seed(seed + 1))
    of = [qkv] + [t.table if i == 2 and factored else t for i, t in enumerate(rest)]
    ref_of = [ref_qkv] + [t.table if i == 2 and factored else t
                          for i, t in enumerate(ref_rest)]
    assert out.grad_fn.name().endswith("_PackedAttentionFnBackward")
    g_tri = torch.autograd.grad(out, of, gout.to(DEV, dtype), retain_graph=True)
    g_ref = torch.autograd.grad(ref, ref_of, gout.to(DEV))
    for name, a, b in zip(["qkv"] + NAMES[3:], g_tri, g_ref):
        assert a.shape == b.shape, name
        e = _rel(a, b)
        assert e < gtol, f"grad {name}: rel err {e:.2e}"
    # the view's backward only reshapes: the kernels wrote the one (B, N, 3, h, d) gradient
    (dqkv,) = torch.autograd.grad(out, qkv, gout.to(DEV, dtype))
    assert dqkv.is_contiguous() and dqkv.shape == (B, N, 3 * h * d)


@needs_here
@pytest.mark.parametrize("factored", [False, True], ids=["dense", "factored"])
def test_packed_qkv_matches_reference(factored):
    check_packed(2, 5, 7, 2, 24, 6, factored=factored)
    check_packed(1, 3, 1, 3, 32, 2)  # d = 32: no padded lanes


@needs_here
def test_packed_qkv_without_autograd_is_the_plain_op():
    """Inference (no gradient needed) runs the plain op on the three views."""
    from transnext.ops.aggregated_attention import aggregated_attention_packed

    B, H, W, h, d, P = 2, 4, 5, 2, 24, 3
    leaves, views = make_inputs(B, H, W, h, d, P)
    vt = views()
    qkv = torch.stack(vt[:3], 2).detach()
    with torch.no_grad():
        got = aggregated_attention_packed(qkv, *vt[3:], H, W, 3, backend="triton")
        want = aggregated_attention(*qkv.unbind(2), *vt[3:], H, W, 3, backend="triton")
        ref = aggregated_attention_packed(qkv, *vt[3:], H, W, 3, backend="reference")
    assert torch.equal(got, want)
    assert _rel(got, ref) < 1e-4


@needs_here
def test_custom_op_autograd_matches_reference():
    """The custom-op path (what torch.compile uses) has the same forward and gradients."""
    from transnext.ops import triton_kernels  # noqa: F401

    B, H, W, h, d, P = 2, 4, 5, 2, 24, 3
    leaves, views = make_inputs(B, H, W, h, d, P)
    vt = views()
    out = torch.ops.transnext.aggregated_attention_fwd(*vt, *dense_form(), H, W, 3, 0, 0,
                                                       True)[0]
    ref = aggregated_attention_reference(*vt, H, W, 3)
    assert _rel(out, ref) < 1e-4
    gout = torch.randn_like(out)
    for name, a, b in zip(NAMES, torch.autograd.grad(out, vt, gout),
                          torch.autograd.grad(ref, vt, gout)):
        assert _rel(a, b) < 1e-4, name


@needs_here
def test_opcheck():
    from transnext.ops import triton_kernels  # noqa: F401

    leaves, views = make_inputs(1, 3, 4, 1, 24, 2)
    args = (*views(), *dense_form(), 3, 4, 3, 0, 0)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.transnext.aggregated_attention_fwd.default, args,
                          test_utils=utils)
    with torch.no_grad():
        out, lse, res = torch.ops.transnext.aggregated_attention_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.transnext.aggregated_attention_bwd.default,
                          (*[t.detach() for t in views()], *dense_form(), out, res, lse, dout,
                           3, 4, 3, 0, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_dispatch_fallbacks():
    leaves, views = make_inputs(1, 3, 3, 1, 24, 2, noncontig=False)
    ref = aggregated_attention(*views(), 3, 3, backend="reference")
    # dropout in training falls back to the reference (no error even on CPU)
    torch.manual_seed(0)
    a = aggregated_attention(*views(), 3, 3, attn_drop=0.5, training=True, backend="triton")
    torch.manual_seed(0)
    b = aggregated_attention(*views(), 3, 3, attn_drop=0.5, training=True, backend="reference")
    assert torch.equal(a, b)
    if not CUDA:  # auto on CPU is the reference
        assert torch.equal(aggregated_attention(*views(), 3, 3, backend="auto"), ref)
    with pytest.raises(ValueError):
        aggregated_attention(*views(), 3, 3, backend="nope")


# (B, H, W, h, d, pool grid, taps, weighted): one tap (extrapolate mode), interpolate
# mode's 2 and 4 bilinear taps, pools of one row / one cell, several query and pool tiles.
FACTORED_CASES = [
    (2, 5, 7, 2, 24, (2, 3), 1, False),
    (1, 6, 9, 3, 24, (3, 2), 2, True),
    (2, 4, 5, 1, 32, (1, 1), 4, True),
    (1, 9, 20, 2, 24, (3, 25), 4, True),
    (1, 1, 7, 2, 24, (1, 3), 1, False),
]


@needs_here
@pytest.mark.parametrize("read", ["expand", "gather"])
@pytest.mark.parametrize("case", FACTORED_CASES, ids=lambda c: "B{}_{}x{}_h{}_d{}_pool{}_J{}_w{}"
                         .format(*c[:5], "x".join(map(str, c[5])), c[6], int(c[7])))
def test_factored_bias_matches_dense_reference(case, read, monkeypatch):
    from transnext.ops import triton_kernels as tk
    monkeypatch.setitem(tk.TUNE, "factored", read)
    check_factored_case(*case)


@needs_here
@pytest.mark.parametrize("read", ["gather", "expand"])
@pytest.mark.parametrize("case", FACTORED_CASES[:4], ids=lambda c: "B{}_{}x{}_h{}_J{}".format(
    *c[:4], c[6]))
def test_factored_bias_inference_forward(case, read, monkeypatch):
    """A forward without autograd reads the factored bias as TUNE["factored_infer"] says
    (default "gather": no (h, N, P) buffer), equal to the reference on its dense form."""
    from transnext.ops import triton_kernels as tk
    monkeypatch.setitem(tk.TUNE, "factored_infer", read)
    expanded = []
    real = tk.expand_factored
    monkeypatch.setattr(tk, "expand_factored", lambda *a: expanded.append(1) or real(*a))
    B, H, W, h, d, pool_hw, taps, weighted = case
    _, views = make_inputs(B, H, W, h, d, pool_hw[0] * pool_hw[1])
    fb = make_factored(H, W, h, pool_hw, taps, weighted)
    vt = views()
    with torch.no_grad():
        out = aggregated_attention(*vt[:5], fb, *vt[6:], H, W, 3, backend="triton")
        ref = aggregated_attention_reference(*vt[:5], fb.dense(), *vt[6:], H, W, 3)
    assert _rel(out, ref) < TOL[torch.float32][0]
    assert bool(expanded) == (read == "expand")


@needs_here
@pytest.mark.parametrize("taps,weighted", [(1, False), (2, True), (4, True)])
def test_factored_expand_and_grad_fold(taps, weighted):
    """The two bias kernels alone: the written-out bias equals FactoredBias.dense() bit for
    bit (same taps, same order), and the folded gradient equals autograd through dense()."""
    from transnext.ops.position_bias_triton import expand_factored, reduce_factored_grad
    H, W, pool = 7, 5, (3, 4)
    fb = make_factored(H, W, 3, pool, taps, weighted, seed=taps)
    w = fb.w if fb.w is not None else torch.empty(0, device=DEV)
    dense = expand_factored(fb.table.detach(), fb.idx, w, (H, W), pool)
    if taps == 1 or not CUDA:  # compiled, w * t + acc may become one fused multiply-add
        assert torch.equal(dense, fb.dense().detach())
    torch.testing.assert_close(dense, fb.dense().detach(), rtol=1e-6, atol=1e-6)
    g = torch.randn(dense.shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    want, = torch.autograd.grad(fb.dense(), fb.table, g)
    got = reduce_factored_grad(g, fb.idx, w, fb.table.shape[1], (H, W), pool)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # rows no pair uses (with one tap there are some) get exactly zero
    unused = torch.ones(fb.table.shape[1], dtype=torch.bool)
    unused[fb.idx.long().reshape(-1).cpu()] = False
    assert (got[:, unused.to(DEV)] == 0).all() and (taps > 1 or unused.any())


@needs_here
@pytest.mark.parametrize("q_hw,k_hw,q0_hw,k0_hw", [
    ((9, 13), (2, 3), (9, 13), (2, 3)),  # one width tap (extrapolate, or no resize)
    ((9, 13), (2, 3), (8, 8), (2, 2)),  # interpolate: 4 weighted width taps
    ((5, 21), (1, 5), (5, 12), (1, 3)),
], ids=["J1", "J4", "J4-wide"])
def test_spread_width_matches_index_select(q_hw, k_hw, q0_hw, k0_hw, monkeypatch):
    """The width spread of the factored bias (geometry.factor_bias(fused=True)) as one Triton
    kernel each way: the table equals the index_select form bit for bit (same taps, same
    order) and the cpb MLP output's gradient matches autograd through it."""
    from transnext.models import geometry
    from transnext.ops import position_bias_triton as pbt

    plan = geometry.bias_plan(q_hw, k_hw, q0_hw, k0_hw, (7, 7), DEV)
    assert plan.w_idx.shape[0] == (1 if q_hw == q0_hw else 4)
    g = torch.Generator().manual_seed(5)
    per_pair = torch.randn(plan.table.shape[0], 3, generator=g).to(DEV).requires_grad_()
    calls = []
    real = pbt._SpreadWidth.apply
    monkeypatch.setattr(pbt._SpreadWidth, "apply", lambda *a: calls.append(1) or real(*a))
    fused = geometry.factor_bias(per_pair, plan, fused=True)
    plain = geometry.factor_bias(per_pair, plan)
    assert len(calls) == 1
    if plan.w_w is None or not CUDA:  # compiled, w * t + acc may become one fused multiply-add
        assert torch.equal(fused.table, plain.table)
    torch.testing.assert_close(fused.table, plain.table, rtol=1e-6, atol=1e-6)
    up = torch.randn(plain.table.shape, generator=g).to(DEV)
    want, = torch.autograd.grad(plain.table, per_pair, up)
    got, = torch.autograd.grad(fused.table, per_pair, up)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # deterministic algorithms: the atomics' order is not fixed, so the index_select form
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        geometry.factor_bias(per_pair, plan, fused=True)
    finally:
        torch.use_deterministic_algorithms(was)
    assert len(calls) == 1


@needs_here
def test_grad_fold_rows_are_kept_per_plan_table():
    """The fold's CSR of table rows is built once per (idx, w) pair of tensors, and again
    for another tensor even at the same contents."""
    from transnext.ops import position_bias_triton as pbt

    fb = make_factored(7, 5, 2, (3, 4), 2, True)
    rows = fb.table.shape[1]
    first = pbt._rows_of(fb.idx, fb.w, rows, keep=True)
    assert pbt._rows_of(fb.idx, fb.w, rows, keep=True) is first
    assert pbt._rows_of(fb.idx, fb.w, rows) is not first  # not kept: built afresh
    again = pbt._rows_of(fb.idx.clone(), fb.w, rows, keep=True)
    assert again is not first and all(torch.equal(a, b) for a, b in zip(again, first))
    one = pbt._rows_of(fb.idx[:1], torch.empty(0, device=DEV), rows, keep=True)
    idx1 = fb.idx[:1]
    assert pbt._rows_of(idx1, torch.empty(0, device=DEV), rows, keep=True) is not one
    assert (pbt._rows_of(idx1, torch.empty(0, device=DEV), 9, keep=True)
            is pbt._rows_of(idx1, torch.empty(0, device=DEV), 9, keep=True))


@needs_here
def test_opcheck_factored():
    from transnext.ops import triton_kernels  # noqa: F401

    _, views = make_inputs(1, 3, 4, 2, 24, 4)
    fb = make_factored(3, 4, 2, (2, 2), 2, True)
    vt = views()
    args = (*vt[:5], fb.table, *vt[6:], fb.idx, fb.w, 3, 4, 3, 2, 2)
    torch.library.opcheck(torch.ops.transnext.aggregated_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@pytest.mark.skipif(CUDA or RUN_HERE or os.environ.get(_SUBPROCESS_FLAG) == "1",
                    reason="CPU cases already run in this process")
def test_cpu_cases_in_subprocess():
    from triton_env import run_in_interpreter

    run_in_interpreter(__file__, _SUBPROCESS_FLAG)


# ------------------------------- CUDA only ---------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")

GPU_CASES = [  # real-ish stage shapes
    (2, 56, 56, 3, 24, 49, 3, True),     # Tiny stage 1 @224
    (2, 28, 28, 6, 24, 49, 3, True),
    (2, 14, 14, 12, 24, 49, 3, True),
    (1, 50, 82, 2, 24, 1025, 3, True),  # P ~ 1100 (800x1333 stage 1 pool 25x41)
    (2, 30, 30, 2, 64, 100, 3, True),   # d = 64
    (2, 17, 23, 4, 32, 12, 3, False),
    (3, 1, 1, 32, 24, 1, 3, True),      # 1x1, 32 heads
    (2, 7, 1, 3, 24, 1, 3, True),
]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_cuda_real_shapes(case, dtype):
    B, H, W, h, d, P, win, nc = case
    check_case(B, H, W, h, d, P, dtype, win, nc)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_packed_real_shapes(dtype):
    check_packed(2, 56, 56, 3, 24, 49, dtype)  # Tiny stage 1 @224
    check_packed(2, 32, 32, 12, 24, 256, dtype, factored=True)  # stage 3 @512


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_factored_real_shapes(dtype):
    # 800x1333 stage 1 (pool 25x42, interpolate mode's 4 taps) and stage 3 (one tap)
    check_factored_case(1, 50, 84, 3, 24, (25, 42), 4, True, dtype)
    check_factored_case(2, 50, 84, 12, 24, (25, 42), 1, False, dtype)


@cuda_only
def test_cuda_torch_compile():
    B, H, W, h, d, P = 2, 14, 14, 3, 24, 49
    leaves, views = make_inputs(B, H, W, h, d, P, torch.bfloat16)

    def f(*a):
        return aggregated_attention(*a, H, W, 3, backend="triton") * 2.0

    cf = torch.compile(f, fullgraph=True)
    out_c = cf(*views())
    out_e = f(*views())
    out_r = aggregated_attention(*views(), H, W, 3, backend="reference") * 2.0
    assert _rel(out_c, out_e) < 1e-3 and _rel(out_c, out_r) < 2e-2
    gout = torch.randn_like(out_c)
    g_c = torch.autograd.grad(out_c, leaves, gout)
    g_r = torch.autograd.grad(out_r, leaves, gout)
    for name, a, b in zip(["q", "kv", "kv_pool", "pool_bias", *NAMES[6:]], g_c, g_r):
        assert _rel(a, b) < 4e-2, name


@cuda_only
def test_cuda_opcheck_full():
    from transnext.ops import triton_kernels  # noqa: F401

    leaves, views = make_inputs(2, 9, 11, 2, 24, 7)
    torch.library.opcheck(torch.ops.transnext.aggregated_attention_fwd.default,
                          (*views(), *dense_form(), 9, 11, 3, 0, 0))
