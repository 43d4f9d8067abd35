"""Multi-scale deformable attention: the reference against a plain loop, the Triton
kernels against the reference, the custom op, the dispatcher and the module.

On CPU the kernels run in triton's interpreter: this module sets ``TRITON_INTERPRET=1``
before triton is imported (as ``test_triton_kernels.py`` does); if some earlier test
module already imported triton without it, the interpreter cases run in one subprocess
(``test_cpu_cases_in_subprocess``). On CUDA the same cases run compiled, plus DINO's
encoder / decoder shapes, torch.compile and opcheck (``-k cuda``).
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

from transnext.ops.msda import (  # noqa: E402
    MultiScaleDeformableAttention,
    level_meta,
    ms_deform_attn,
    resolve_msda_backend,
)
from transnext.ops.msda_reference import ms_deform_attn_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEV = "cuda" if CUDA else "cpu"
_SUBPROCESS_FLAG = "TRANSNEXT_MSDA_TEST_CHILD"


def _interp_problem():
    if not HAVE_TRITON:
        return "triton not importable"
    if CUDA:
        return None
    from triton_env import interpreter_problem
    return interpreter_problem()


def _interp_in_process() -> bool:
    return HAVE_TRITON and type(tl.sum).__name__ == "InterpretedFunction"


RUN_TRITON_HERE = HAVE_TRITON and (CUDA or _interp_in_process())
needs_triton = pytest.mark.skipif(
    not RUN_TRITON_HERE or (not CUDA and _interp_problem() is not None),
    reason="triton not runnable in this process (see test_cpu_cases_in_subprocess)")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")


# ----------------------------------------------------------------------------
# the plain loop: explicit bilinear corners, zero outside, per b / q / m / l / p
# ----------------------------------------------------------------------------

def loop_msda(value, shapes, starts, loc, aw):
    """out[b, q, m*D:(m+1)*D] = sum_{l,p} a * sum_corners w_corner * value[corner]."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    rows = []
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                acc = value.new_zeros(D)
                for lvl, ((H, W), s0) in enumerate(zip(shapes, starts)):
                    for p in range(P):
                        x = loc[b, q, m, lvl, p, 0] * W - 0.5  # pixel coordinates
                        y = loc[b, q, m, lvl, p, 1] * H - 0.5
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        fx, fy = x - x0, y - y0
                        smp = value.new_zeros(D)
                        for xi, yi, w in ((x0, y0, (1 - fx) * (1 - fy)),
                                          (x0 + 1, y0, fx * (1 - fy)),
                                          (x0, y0 + 1, (1 - fx) * fy),
                                          (x0 + 1, y0 + 1, fx * fy)):
                            if 0 <= xi < W and 0 <= yi < H:
                                smp = smp + w * value[b, s0 + yi * W + xi, m]
                        acc = acc + aw[b, q, m, lvl, p] * smp
                rows.append(acc)
    return torch.stack(rows).view(B, Q, M * D)


# ----------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------

def make_locations(B, Q, M, shapes, P, g, outside=0.15, borders=True, centres=False):
    """(B, Q, M, L, P, 2) float64 locations: pixel coordinates with fractional parts in
    [0.05, 0.95] (away from the bilinear kinks at integer pixel coordinates, so gradients
    are well defined), spanning [-2, W + 1] pixels (``outside``: share pushed further out);
    ``borders``: some exactly 0 and 1 (the map's edges) and some far outside;
    ``centres``: some exactly on pixel centres (kinks; forward comparisons only)."""
    L = len(shapes)
    hw = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)  # (L, 2) as (W, H)
    base = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64)
    ipart = torch.floor(base * (hw[:, None, :] + 3) - 2)  # integer pixel in [-2, W]
    frac = 0.05 + 0.9 * torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64)
    loc = (ipart + frac + 0.5) / hw[:, None, :]
    far = torch.rand(B, Q, M, L, P, 2, generator=g) < outside
    loc = torch.where(far, loc * 3.0 - 1.0, loc)
    if borders:
        pick = torch.rand(B, Q, M, L, P, 2, generator=g)
        loc = torch.where(pick < 0.08, torch.zeros_like(loc), loc)
        loc = torch.where((pick >= 0.08) & (pick < 0.16), torch.ones_like(loc), loc)
        loc = torch.where((pick >= 0.16) & (pick < 0.18), torch.full_like(loc, -7.5), loc)
        loc = torch.where((pick >= 0.18) & (pick < 0.20), torch.full_like(loc, 1e12), loc)
    if centres:
        c = (torch.floor(base * hw[:, None, :]) + 0.5) / hw[:, None, :]
        loc = torch.where(torch.rand(B, Q, M, L, P, 2, generator=g) < 0.3, c, loc)
    return loc


def make_inputs(B, Q, M, D, shapes, P, dtype=torch.float32, device=DEV, seed=0,
                noncontig=False, **loc_kw):
    """(value, loc, aw) leaves in ``dtype`` (value a head view of a wider Linear-like
    output when ``noncontig``) and the (shapes, starts) lists."""
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    if noncontig:
        wide = torch.randn(B, S, 2 * M * D, generator=g, dtype=torch.float64)
        value = wide.to(device, dtype)[..., M * D:].view(B, S, M, D)
    else:
        value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64).to(device, dtype)
    loc = make_locations(B, Q, M, shapes, P, g, **loc_kw)
    if dtype == torch.float16:
        loc = loc.clamp(-3e4, 3e4)  # far outside, but finite in fp16
    loc = loc.to(device, dtype)
    aw = torch.rand(B, Q, M, L * P, generator=g, dtype=torch.float64).softmax(-1)
    aw = aw.view(B, Q, M, L, P).to(device, dtype)
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(L)]
    return value, loc, aw, list(shapes), starts


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


NAMES = ("value", "sampling_locations", "attention_weights")


# ----------------------------------------------------------------------------
# reference vs loop
# ----------------------------------------------------------------------------

# (B, Q, M, D, shapes, P): odd sizes, 1x1 / one-row / one-column levels, up to 5 levels
REF_CASES = [
    (2, 3, 2, 3, [(3, 5), (2, 3), (1, 1)], 2),
    (1, 4, 1, 2, [(1, 7), (5, 1)], 3),
    (1, 2, 3, 1, [(4, 3), (3, 2), (2, 2), (1, 3), (1, 1)], 1),
]


@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: f"B{c[0]}Q{c[1]}M{c[2]}D{c[3]}"
                         f"L{len(c[4])}P{c[5]}")
def test_reference_matches_loop(case):
    B, Q, M, D, shapes, P = case
    value, loc, aw, shapes, starts = make_inputs(B, Q, M, D, shapes, P, torch.float64,
                                                 device="cpu", seed=len(shapes))
    lv = _leaves(value, loc, aw)
    lr = _leaves(value, loc, aw)
    out_loop = loop_msda(*lv[:1], shapes, starts, *lv[1:])
    out_ref = ms_deform_attn_reference(lr[0], shapes, starts, lr[1], lr[2])
    assert out_ref.shape == (B, Q, M * D)
    torch.testing.assert_close(out_ref, out_loop, rtol=1e-12, atol=1e-12)
    gout = torch.randn(out_ref.shape, dtype=torch.float64, generator=torch.Generator()
                       .manual_seed(1))
    for name, a, b in zip(NAMES, torch.autograd.grad(out_ref, lr, gout),
                          torch.autograd.grad(out_loop, lv, gout)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    # tensor metadata and None starts give the same
    st = torch.tensor(shapes)
    torch.testing.assert_close(ms_deform_attn_reference(value, st, None, loc, aw), out_ref,
                               rtol=0, atol=0)


def test_reference_matches_loop_on_pixel_centres_and_edges():
    """Forward only: exact pixel centres (the kinks of the bilinear weights), map edges
    (loc 0 and 1), points far outside."""
    value, loc, aw, shapes, starts = make_inputs(2, 5, 2, 3, [(3, 4), (2, 5), (1, 1)], 2,
                                                 torch.float64, device="cpu", seed=3,
                                                 centres=True)
    torch.testing.assert_close(ms_deform_attn_reference(value, shapes, starts, loc, aw),
                               loop_msda(value, shapes, starts, loc, aw), rtol=1e-12,
                               atol=1e-12)


def test_reference_gradcheck():
    value, loc, aw, shapes, starts = make_inputs(1, 2, 2, 2, [(3, 4), (2, 3)], 2,
                                                 torch.float64, device="cpu", seed=5,
                                                 borders=False)
    leaves = _leaves(value, loc, aw)
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn_reference(v, shapes, starts, lo, a), leaves,
        eps=1e-6, atol=1e-6)


def test_reference_matches_transformers():
    """An independent check: transformers' own PyTorch multi-scale deformable attention."""
    pytest.importorskip("transformers")
    from transformers.models.mask2former.modeling_mask2former import (
        multi_scale_deformable_attention,
    )
    value, loc, aw, shapes, starts = make_inputs(2, 6, 2, 4, [(5, 6), (3, 3), (2, 1)], 3,
                                                 torch.float64, device="cpu", seed=7)
    torch.testing.assert_close(ms_deform_attn_reference(value, shapes, starts, loc, aw),
                               multi_scale_deformable_attention(value, shapes, loc, aw),
                               rtol=1e-12, atol=1e-12)


def test_reference_mixed_dtypes_compute_in_promoted_dtype():
    """bf16 value with fp32 locations/weights (autocast) is computed in fp32."""
    value, loc, aw, shapes, starts = make_inputs(1, 4, 2, 4, [(3, 5), (2, 2)], 2,
                                                 torch.float32, device="cpu", seed=9)
    vb = value.bfloat16()
    out = ms_deform_attn_reference(vb, shapes, starts, loc, aw)
    assert out.dtype == torch.bfloat16
    exact = ms_deform_attn_reference(vb.float(), shapes, starts, loc, aw)
    torch.testing.assert_close(out, exact.bfloat16(), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# dispatcher and module
# ----------------------------------------------------------------------------

def test_dispatch():
    value, loc, aw, shapes, starts = make_inputs(1, 3, 2, 4, [(3, 5), (2, 2)], 2,
                                                 device="cpu")
    if not CUDA:
        assert resolve_msda_backend(value, loc, aw, "auto") == "reference"
    assert resolve_msda_backend(value.double(), backend="triton") == "reference"
    assert resolve_msda_backend(value, loc.double(), aw, "triton") == "reference"
    with pytest.raises(ValueError):
        resolve_msda_backend(value, backend="nope")
    ref = ms_deform_attn(value, shapes, starts, loc, aw, backend="reference")
    for sh, st in ((torch.tensor(shapes), torch.tensor(starts)), (shapes, None)):
        torch.testing.assert_close(ms_deform_attn(value, sh, st, loc, aw, backend="auto"), ref,
                                   rtol=0, atol=0)
    s, t = level_meta(shapes, None, "cpu")
    assert s.tolist() == [list(x) for x in shapes] and t.tolist() == starts
    with pytest.raises(ValueError):  # attention_weights that do not fit
        ms_deform_attn(value, shapes, starts, loc, aw[..., :1], backend="reference")


def test_module_parameters_and_init():
    """Names / shapes of the released layouts: DINO (4 levels: sampling_offsets (256, 256),
    attention_weights (128, 256)) and Mask2Former's pixel decoder (3 levels: (192, 256),
    (96, 256)), and Deformable-DETR's init."""
    from seg_helpers import read_layout

    lay = read_layout("mask2former_transnext_tiny.keys.txt")
    pre = "decode_head.pixel_decoder.encoder.layers.0.self_attn."
    m2f = MultiScaleDeformableAttention(256, 8, 3, 4)
    for name, p in m2f.state_dict().items():
        assert tuple(p.shape) == lay[pre + name], name
    dino = MultiScaleDeformableAttention(256, 8, 4, 4)
    shapes = {k: tuple(v.shape) for k, v in dino.state_dict().items()}
    assert shapes == {"sampling_offsets.weight": (256, 256), "sampling_offsets.bias": (256,),
                      "attention_weights.weight": (128, 256), "attention_weights.bias": (128,),
                      "value_proj.weight": (256, 256), "value_proj.bias": (256,),
                      "output_proj.weight": (256, 256), "output_proj.bias": (256,)}
    assert not dino.sampling_offsets.weight.any() and not dino.attention_weights.weight.any()
    assert not dino.attention_weights.bias.any() and not dino.value_proj.bias.any()
    b = dino.sampling_offsets.bias.view(8, 4, 4, 2)
    # head 0 points along +x, head 2 along +y (8 heads: 45 degrees apart); point i at i + 1
    assert torch.allclose(b[0, 0, :, 0], torch.arange(1.0, 5.0)) and not b[0, :, :, 1].any()
    assert torch.allclose(b[2, 3, :, 1], torch.arange(1.0, 5.0))
    assert b[2, :, :, 0].abs().max() < 1e-6
    assert torch.allclose(b[1, 0, 1], torch.tensor([2.0, 2.0]))
    assert torch.equal(b[:, 0], b[:, 3])  # same for every level
    bound = math.sqrt(6 / 512)
    assert dino.value_proj.weight.abs().max() <= bound and dino.value_proj.weight.std() > bound / 3


def _module_inputs(C, L, shapes, B=2, Q=5, coords=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    query = torch.randn(B, Q, C, generator=g, dtype=torch.float64)
    value = torch.randn(B, S, C, generator=g, dtype=torch.float64)
    ref = torch.rand(B, Q, L, coords, generator=g, dtype=torch.float64)
    mask = torch.rand(B, S, generator=g) < 0.2
    return query, value, ref, mask


@pytest.mark.parametrize("coords", [2, 4])
def test_module_matches_transformers_module(coords):
    """Our layer with the weights of transformers' Mask2Former pixel-decoder attention
    (random, not the init) gives that module's output; point refs and box refs, with a
    key padding mask (True = padding)."""
    pytest.importorskip("transformers")
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention as HF,
    )
    C, M, L, P = 16, 2, 3, 2
    shapes = [(4, 5), (2, 3), (1, 1)]
    ours = MultiScaleDeformableAttention(C, M, L, P, backend="reference").double()
    theirs = HF(C, M, L, P).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    theirs.load_state_dict(ours.state_dict())
    query, value, ref, mask = _module_inputs(C, L, shapes, coords=coords)
    st = torch.tensor(shapes)
    out = ours(query, ref, value, st, None, key_padding_mask=mask)
    exp, _ = theirs(query, attention_mask=mask, encoder_hidden_states=value,
                    reference_points=ref, spatial_shapes_list=shapes,
                    level_start_index=level_meta(shapes, None, "cpu")[1])
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)
    # sequence metadata gives the same
    torch.testing.assert_close(ours(query, ref, value, shapes, None, mask), out, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# Triton (interpreter on the CPU) vs reference
# ----------------------------------------------------------------------------

TOL = {  # (forward, gradient) bound on ||a - b|| / ||b|| against the fp32 reference
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1e-2, 2e-2),
}


def check_triton(B, Q, M, D, shapes, P, dtype=torch.float32, seed=0, noncontig=False,
                 loc_dtype=None, aw_dtype=None, device=DEV, tol=None, **loc_kw):
    """Forward and every gradient of the Triton path against the reference run in fp32 on
    the same (rounded) values."""
    value, loc, aw, shapes, starts = make_inputs(B, Q, M, D, shapes, P, dtype, device, seed,
                                                 noncontig, **loc_kw)
    loc = loc.to(loc_dtype or dtype)
    aw = aw.to(aw_dtype or dtype)
    sh, st = level_meta(shapes, starts, device)
    lt = [value.requires_grad_(), *_leaves(loc, aw)]
    lr = _leaves(*(t.float() for t in (value, loc, aw)))
    out = ms_deform_attn(lt[0], sh, st, lt[1], lt[2], backend="triton")
    ref = ms_deform_attn_reference(lr[0], sh, st, lr[1], lr[2])
    assert out.shape == (B, Q, M * D) and out.dtype == value.dtype and out.is_contiguous()
    ftol, gtol = tol or TOL[dtype]
    assert torch.isfinite(out).all()
    e = _rel(out, ref)
    assert e < ftol, f"forward rel err {e:.2e}"
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    g_t = torch.autograd.grad(out, lt, gout.to(device, dtype))
    g_r = torch.autograd.grad(ref, lr, gout.to(device))
    for name, a, b, leaf in zip(NAMES, g_t, g_r, lt):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype, name
        assert torch.isfinite(a).all(), name
        e = _rel(a, b)
        assert e < gtol, f"grad {name}: rel err {e:.2e}"
    return out


# (B, Q, M, D, shapes, P, noncontig): D not a power of two, 1x1 levels, 5 levels, P 1..4,
# a head view of a wider tensor, more rows than one program
TRITON_CASES = [
    (2, 7, 2, 8, [(3, 5), (2, 3), (1, 1)], 4, False),
    (1, 5, 3, 6, [(4, 3), (3, 2), (2, 2), (1, 3), (1, 1)], 2, True),
    (2, 3, 1, 16, [(1, 7), (5, 1)], 3, False),
    (1, 11, 2, 4, [(6, 5)], 1, True),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"B{c[0]}Q{c[1]}M{c[2]}D{c[3]}"
                         f"L{len(c[4])}P{c[5]}{'view' if c[6] else ''}")
def test_triton_fp32_matches_reference(case):
    B, Q, M, D, shapes, P, nc = case
    check_triton(B, Q, M, D, shapes, P, torch.float32, seed=B + Q, noncontig=nc)


@needs_triton
def test_triton_forward_on_pixel_centres():
    """Exact pixel centres (kinks): the forward is continuous there, so it matches."""
    value, loc, aw, shapes, starts = make_inputs(2, 6, 2, 8, [(3, 4), (2, 5), (1, 1)], 2,
                                                 device=DEV, seed=4, centres=True)
    with torch.no_grad():
        out = ms_deform_attn(value, shapes, starts, loc, aw, backend="triton")
    assert _rel(out, ms_deform_attn_reference(value, shapes, starts, loc, aw)) < 1e-6


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_half_matches_reference(dtype):
    check_triton(2, 6, 2, 8, [(3, 5), (2, 3), (1, 1)], 2, dtype, seed=2)


@needs_triton
def test_triton_mixed_dtypes():
    """Autocast's mix: bf16 value, fp32 locations and weights (gradients in each dtype)."""
    check_triton(2, 6, 2, 8, [(3, 5), (2, 3)], 2, torch.bfloat16, seed=3,
                 loc_dtype=torch.float32, aw_dtype=torch.float32)


@needs_triton
def test_triton_module_and_no_grad():
    C, M, L, P = 16, 2, 3, 2
    shapes = [(4, 5), (2, 3), (1, 1)]
    torch.manual_seed(0)
    mod = MultiScaleDeformableAttention(C, M, L, P).to(DEV)
    query, value, ref, mask = (t.to(DEV) for t in _module_inputs(C, L, shapes, coords=4))
    query, value, ref = query.float(), value.float(), ref.float()
    sh, st = level_meta(shapes, None, DEV)
    mod.backend = "triton"
    out_t = mod(query, ref, value, sh, st, mask)
    g_t = torch.autograd.grad(out_t.square().sum(), list(mod.parameters()))
    mod.backend = "reference"
    out_r = mod(query, ref, value, sh, st, mask)
    g_r = torch.autograd.grad(out_r.square().sum(), list(mod.parameters()))
    assert _rel(out_t, out_r) < 1e-5
    for (name, _), a, b in zip(mod.named_parameters(), g_t, g_r):
        assert _rel(a, b) < 1e-4, name
    with torch.no_grad():
        value, loc, aw, shapes, starts = make_inputs(1, 4, 2, 8, shapes, 2, device=DEV)
        out = ms_deform_attn(value, shapes, starts, loc, aw, backend="triton")
        assert not out.requires_grad
        assert _rel(out, ms_deform_attn_reference(value, shapes, starts, loc, aw)) < 1e-5


@needs_triton
@pytest.mark.parametrize("which", [(0,), (1, 2), (2,)], ids=["value", "loc_aw", "aw"])
def test_triton_partial_gradients(which):
    """Only some inputs need a gradient: the kernel skips the others' work (eager and
    custom-op paths)."""
    value, loc, aw, shapes, starts = make_inputs(1, 5, 2, 8, [(3, 4), (2, 3)], 2, device=DEV,
                                                 seed=13)
    sh, st = level_meta(shapes, starts, DEV)
    ins = [value, loc, aw]
    lr = _leaves(*ins)
    ref = ms_deform_attn_reference(lr[0], sh, st, lr[1], lr[2])
    gout = torch.randn_like(ref)
    g_r = torch.autograd.grad(ref, [lr[i] for i in which], gout)
    for fn in (lambda *a: ms_deform_attn(a[0], sh, st, a[1], a[2], backend="triton"),
               lambda *a: torch.ops.transnext.ms_deform_attn_fwd(a[0], sh, st, a[1], a[2])):
        lt = [t.detach().clone().requires_grad_(i in which) for i, t in enumerate(ins)]
        g_t = torch.autograd.grad(fn(*lt), [lt[i] for i in which], gout)
        for i, a, b in zip(which, g_t, g_r):
            assert _rel(a, b) < 1e-5, NAMES[i]


@needs_triton
def test_custom_op_autograd_and_opcheck():
    """The custom-op path (what torch.compile uses): same forward and gradients; opcheck."""
    importlib.import_module("transnext.ops.msda_triton")  # registers the custom ops

    value, loc, aw, shapes, starts = make_inputs(1, 5, 2, 8, [(3, 4), (2, 3)], 2, device=DEV,
                                                 seed=11)
    sh, st = level_meta(shapes, starts, DEV)
    lt, lr = _leaves(value, loc, aw), _leaves(value, loc, aw)
    out = torch.ops.transnext.ms_deform_attn_fwd(lt[0], sh, st, lt[1], lt[2])
    ref = ms_deform_attn_reference(lr[0], sh, st, lr[1], lr[2])
    assert _rel(out, ref) < 1e-5
    gout = torch.randn_like(out)
    for name, a, b in zip(NAMES, torch.autograd.grad(out, lt, gout),
                          torch.autograd.grad(ref, lr, gout)):
        assert _rel(a, b) < 1e-5, name
    torch.library.opcheck(torch.ops.transnext.ms_deform_attn_fwd.default,
                          (*_leaves(value)[:1], sh, st, *_leaves(loc, aw)),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    for need in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.transnext.ms_deform_attn_bwd.default,
                              (value, sh, st, loc, aw, gout, *need),
                              test_utils=("test_schema", "test_faketensor"))


def test_bench_script_runs_on_cpu(tmp_path):
    """benchmarks/bench_msda.py end to end at tiny shapes (the reference on the CPU)."""
    import json

    out = tmp_path / "msda.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "benchmarks/bench_msda.py", "--device", "cpu",
                        "--tiny", "--backends", "reference", "--reps", "1", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["device"] and data["rows"]
    assert {r["case"] for r in data["rows"]} >= {"dino_enc", "dino_dec", "m2f_pixdec"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in data["rows"])
    assert "dino_enc" in r.stdout


@pytest.mark.skipif(CUDA or RUN_TRITON_HERE or os.environ.get(_SUBPROCESS_FLAG) == "1"
                    or _interp_problem() is not None,
                    reason="interpreter cases already run in this process (or cannot run)")
def test_cpu_cases_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", **{_SUBPROCESS_FLAG: "1"})
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-k", "triton or custom_op", __file__], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


# ----------------------------------------------------------------------------
# CUDA only: DINO / Mask2Former shapes, torch.compile
# ----------------------------------------------------------------------------

DINO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]  # 800x1333 input, strides 8..64
M2F_LEVELS = [(64, 64), (32, 32), (16, 16)]  # 512x512, strides 8..32


def realistic_locations(B, Q, M, shapes, P, g, boxes=False, device=DEV):
    """Encoder-like (each query at a pixel centre of some level, offsets of a few pixels)
    or decoder-like (boxes) locations, float64, with fractional pixel parts moved off the
    kinks by at least 0.02 (well-defined location gradients)."""
    L = len(shapes)
    hw = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)
    if boxes:
        cxcy = torch.rand(B, Q, 1, 1, 1, 2, generator=g, dtype=torch.float64)
        wh = 0.02 + 0.5 * torch.rand(B, Q, 1, 1, 1, 2, generator=g, dtype=torch.float64)
        off = torch.randn(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 2
        loc = cxcy + off / P * wh * 0.5
    else:
        ref = torch.rand(B, Q, 1, 1, 1, 2, generator=g, dtype=torch.float64)
        off = torch.randn(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 3
        loc = ref + off / hw[:, None, :]
    x = loc * hw[:, None, :] - 0.5
    f = (x - x.floor()).clamp(0.02, 0.98)
    return ((x.floor() + f + 0.5) / hw[:, None, :]).to(device)


def check_big(B, Q, shapes, dtype, boxes, M=8, D=32, P=4, seed=0, loc_dtype=None):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(B, S, M, D, generator=g).to(DEV, dtype).requires_grad_()
    loc = realistic_locations(B, Q, M, shapes, P, g, boxes).to(loc_dtype or dtype)
    aw = torch.rand(B, Q, M, L * P, generator=g).softmax(-1).view(B, Q, M, L, P)
    lt = [value, *_leaves(loc, aw.to(DEV, dtype))]
    lr = _leaves(*(t.float() for t in lt))
    sh, st = level_meta(shapes, None, DEV)
    out = ms_deform_attn(lt[0], sh, st, lt[1], lt[2], backend="triton")
    ref = ms_deform_attn_reference(lr[0], sh, st, lr[1], lr[2])
    # fp32: grid_sample rounds 2*loc - 1 before scaling by W/2 (~5e-6 px at W = 167); the
    # kernel computes loc*W - 0.5
    ftol, gtol = (2e-5, 5e-5) if dtype == torch.float32 else TOL[dtype]
    e = _rel(out, ref)
    assert e < ftol, f"forward rel err {e:.2e}"
    gout = torch.randn(out.shape, generator=g).to(DEV)
    g_t = torch.autograd.grad(out, lt, gout.to(dtype))
    g_r = torch.autograd.grad(ref, lr, gout)
    for name, a, b in zip(NAMES, g_t, g_r):
        e = _rel(a, b)
        assert e < gtol, f"grad {name}: rel err {e:.2e}"


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_dino_encoder(dtype):
    S = sum(h * w for h, w in DINO_LEVELS)
    check_big(2, S, DINO_LEVELS, dtype, boxes=False)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_dino_decoder(dtype):
    check_big(2, 900, DINO_LEVELS, dtype, boxes=True, seed=1)


@cuda_only
def test_cuda_mask2former_pixel_decoder_autocast_mix():
    S = sum(h * w for h, w in M2F_LEVELS)
    check_big(8, S, M2F_LEVELS, torch.bfloat16, boxes=False, seed=2, loc_dtype=torch.float32)


@cuda_only
@pytest.mark.parametrize("D", [16, 64, 24])
def test_cuda_head_sizes(D):
    check_big(2, 300, DINO_LEVELS[1:], torch.float32, boxes=True, D=D, seed=D)
    check_big(1, 200, [(33, 47), (17, 24), (9, 12), (5, 6), (3, 3)], torch.bfloat16,
              boxes=False, D=D, M=4, seed=D + 1)


@cuda_only
def test_cuda_small_cases():
    for case in TRITON_CASES:
        B, Q, M, D, shapes, P, nc = case
        check_triton(B, Q, M, D, shapes, P, torch.float32, seed=B + Q, noncontig=nc)


def _compile_case(device):
    C, M, L, P = 32, 2, 3, 2
    shapes = [(5, 7), (3, 4), (2, 2)]
    torch.manual_seed(0)
    mod = MultiScaleDeformableAttention(C, M, L, P, backend="triton").to(device)
    with torch.no_grad():
        mod.sampling_offsets.weight.normal_(0, 0.05)
        mod.attention_weights.weight.normal_(0, 0.05)
    S = sum(h * w for h, w in shapes)
    query = torch.randn(2, 9, C, device=device)
    value = torch.randn(2, S, C, device=device)
    ref = torch.rand(2, 9, L, 4, device=device)
    sh, st = level_meta(shapes, None, device)
    return mod, (query, ref, value, sh, st)


def check_compile(device, backend):
    """fullgraph torch.compile of the layer (the custom op and its fake kernel) against the
    eager reference: forward and every parameter gradient."""
    torch._dynamo.reset()
    mod, args = _compile_case(device)
    out_c = torch.compile(mod, fullgraph=True, backend=backend)(*args)
    g_c = torch.autograd.grad(out_c.square().sum(), list(mod.parameters()))
    mod.backend = "reference"
    out_r = mod(*args)
    g_r = torch.autograd.grad(out_r.square().sum(), list(mod.parameters()))
    assert _rel(out_c, out_r) < 1e-5
    for (name, _), a, b in zip(mod.named_parameters(), g_c, g_r):
        assert _rel(a, b) < 1e-4, name


@needs_triton
def test_triton_torch_compile_aot_eager():
    """Dynamo + AOT autograd through the custom op on the CPU (no inductor needed)."""
    check_compile(DEV, "aot_eager")


@cuda_only
def test_cuda_torch_compile():
    check_compile("cuda", "inductor")
    mod, args = _compile_case("cuda")
    cmod = torch.compile(mod, fullgraph=True)
    with torch.autocast("cuda", torch.bfloat16):
        out_c = cmod(*args)
        out_e = mod(*args)
    assert _rel(out_c, out_e) < 2e-2
