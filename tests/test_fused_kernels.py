"""The elementwise Triton kernels against PyTorch's ops: the LayerNorm kernels
(``ops.layer_norm``) against ``F.layer_norm``, the GLU's GELU-product kernels
(``ops.gated_gelu``) against a bias, GELU and a product, the bias-gradient column sums
(``ops.column_sum``) against ``sum``; the model with each against the model without.

On the CPU the kernels run in triton's interpreter, which must be chosen before triton is
imported (as in test_triton_kernels.py); where an earlier module imported triton without
it, the CPU cases run in a subprocess.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import timm  # noqa: E402
import torch.nn as nn  # noqa: E402
import triton.language as tl  # noqa: E402

import transnext  # noqa: E402,F401  (registers the models)
from transnext.models.transnext import kernel_mode  # noqa: E402
from transnext.ops.column_sum import column_sum, column_sum_reference  # noqa: E402
from transnext.ops.gated_gelu import (  # noqa: E402
    gated_gelu, gated_gelu_backward, gated_gelu_backward_reference, gated_gelu_reference)
from transnext.ops.layer_norm import layer_norm, layer_norm_reference  # noqa: E402

if not CUDA:
    from triton_env import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem(), allow_module_level=True)

RUN_HERE = CUDA or type(tl.sum).__name__ == "InterpretedFunction"
_CHILD = "TRANSNEXT_FUSED_KERNELS_TEST_CHILD"
DEV = "cuda" if CUDA else "cpu"
here = pytest.mark.skipif(not RUN_HERE, reason="interpreter not active in this process")


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(shape, x_dtype, out_dtype, n, layout="plain", seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(DEV, x_dtype)
    if layout == "strided_rows":  # rows of a wider tensor: a row stride other than C
        x = torch.randn(*shape[:-1], C + 5, generator=g).to(DEV, x_dtype)[..., :C]
        assert x.stride(-2) == C + 5
    x.requires_grad_()
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(DEV).requires_grad_()
    b = (0.5 * torch.randn(C, generator=g)).to(DEV).requires_grad_()
    gs = [torch.randn(shape, generator=g).to(DEV, out_dtype or x_dtype) for _ in range(n)]

    ys = layer_norm(x, w, b, 1e-6, out_dtype, n)
    assert len(ys) == n and all(y.shape == x.shape for y in ys)
    assert all(y.dtype == (out_dtype or x_dtype) for y in ys)
    got = torch.autograd.grad(ys, (x, w, b), gs)
    refs = layer_norm_reference(x, w, b, 1e-6, out_dtype, n)
    want = torch.autograd.grad(refs, (x, w, b), gs)
    low = (out_dtype or x_dtype) != torch.float32
    # 16-bit outputs: one rounding of the same fp32 values, so at most one ulp apart
    tol = 1e-2 if low else 1e-5
    assert _rel(ys[0], refs[0]) < tol
    for name, a, r in zip(("x", "weight", "bias"), got, want):
        assert a.dtype == r.dtype, name
        # the gradients see the same 16-bit incoming gradient: fp32 agreement but for x's
        # own rounding where x is 16-bit
        assert _rel(a, r) < (1e-2 if x_dtype != torch.float32 else 1e-5), name


CASES = [  # (shape, x dtype, out dtype, n, layout)
    ((37, 24), torch.float32, None, 1, "plain"),
    ((2, 150, 72), torch.float32, torch.bfloat16, 2, "plain"),
    ((2, 150, 72), torch.float32, torch.bfloat16, 3, "strided_rows"),
    ((5, 100), torch.bfloat16, None, 1, "plain"),
    ((3, 7, 576), torch.float32, torch.float32, 1, "plain"),
    ((1, 9, 40), torch.float16, torch.float32, 1, "plain"),
]


@here
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-n{c[3]}-{c[4]}")
def test_kernels_match_layer_norm(case):
    _check(*case)


@here
def test_unused_views_cost_nothing_and_change_nothing():
    # the attention's joint product reads only the first of its three views
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 24, generator=g).to(DEV).requires_grad_()
    w = torch.randn(24, generator=g).to(DEV).requires_grad_()
    b = torch.randn(24, generator=g).to(DEV).requires_grad_()
    gy = torch.randn(2, 30, 24, generator=g).to(DEV, torch.bfloat16)
    ys = layer_norm(x, w, b, 1e-6, torch.bfloat16, 3)
    got = torch.autograd.grad(ys[0], (x, w, b), gy)
    (ref,) = layer_norm_reference(x, w, b, 1e-6, torch.bfloat16)
    want = torch.autograd.grad(ref, (x, w, b), gy)
    for a, r in zip(got, want):
        assert _rel(a, r) < 1e-5


@here
def test_empty_rows_and_errors():
    x = torch.randn(0, 3, 16, device=DEV, requires_grad=True)
    w, b = torch.ones(16, device=DEV, requires_grad=True), torch.zeros(16, device=DEV)
    (y,) = layer_norm(x, w, b, 1e-5)
    assert y.shape == x.shape
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == x.shape and (gw == 0).all()
    with pytest.raises(ValueError, match="width 16"):
        layer_norm(x, torch.ones(8, device=DEV), torch.zeros(8, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="up to 8192"):
        layer_norm(torch.randn(2, 9000, device=DEV), torch.ones(9000, device=DEV),
                   torch.zeros(9000, device=DEV), 1e-5)


def test_mode_from_env(monkeypatch):
    monkeypatch.setenv("TRANSNEXT_LAYER_NORM", "Triton")
    assert kernel_mode("TRANSNEXT_LAYER_NORM") == "triton"
    monkeypatch.setenv("TRANSNEXT_LAYER_NORM", "apex")
    with pytest.raises(ValueError, match="TRANSNEXT_LAYER_NORM='apex' is not one of"):
        kernel_mode("TRANSNEXT_LAYER_NORM")


def _model_step(model, x, mode, monkeypatch, amp, var="TRANSNEXT_LAYER_NORM"):
    monkeypatch.setenv(var, mode)
    model.zero_grad()
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=amp):
        feats = model(x)
    # a random projection: a loss of the maps' squares would be constant (a LayerNorm's
    # output at init has unit mean square), its gradients rounding noise
    gen = torch.Generator().manual_seed(1)
    sum((f.float() * torch.randn(f.shape, generator=gen).to(DEV)).sum() for f in feats).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return [f.detach().float() for f in feats], grads


@here
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_model_with_kernels_matches_nn_layer_norm(amp, monkeypatch):
    # fp32 means fp32: no TF32 convolutions (cuDNN's default) to blur the comparison
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = timm.create_model("transnext_micro", img_size=64, features_only=True).to(DEV)
    x = torch.randn(2, 3, 64, 96, device=DEV)
    ref, g_ref = _model_step(model, x, "torch", monkeypatch, amp)
    got, g_got = _model_step(model, x, "triton", monkeypatch, amp)
    assert g_ref.keys() == g_got.keys()
    # fp32: the same computation up to summation order. bf16: a 16-bit rounding of the
    # normalised rows may land one ulp apart, and that propagates through 4 stages.
    ftol, gtol = (1e-5, 1e-4) if not amp else (3e-2, 1e-1)
    for a, r in zip(got, ref):
        assert _rel(a, r) < ftol
    scale = max(g.norm().item() for g in g_ref.values())
    for k in g_ref:  # against the largest gradient: some are exactly zero up to rounding
        assert (g_got[k] - g_ref[k]).norm().item() < gtol * scale, k


@here
def test_hooked_norm_keeps_its_module(monkeypatch):
    monkeypatch.setenv("TRANSNEXT_LAYER_NORM", "triton")
    model = timm.create_model("transnext_micro", img_size=32).to(DEV)
    seen = []
    model.block1[0].norm1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model.norm1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, device=DEV))
    assert seen == [torch.float32, torch.Size([1, 48, 8, 8])]
    assert isinstance(model.block1[0].norm1, nn.LayerNorm)


@here
def test_hooked_linear_and_conv_keep_their_modules(monkeypatch):
    """With every kernel on, a hooked Linear (training: the bias-gradient path) and a hooked
    depthwise conv (inference: the GLU path that adds the conv's bias) still run their
    modules and hooks."""
    for var in ("TRANSNEXT_LAYER_NORM", "TRANSNEXT_GLU", "TRANSNEXT_BIAS_GRAD"):
        monkeypatch.setenv(var, "triton")
    # no GLU recompute (the CUDA default): its hooked-conv fallback, a checkpoint, would run
    # the conv's hook again in the backward
    model = timm.create_model("transnext_micro", img_size=32, glu_recompute=False).to(DEV)
    blk = model.block1[0]
    seen = []
    blk.attn.proj.register_forward_hook(lambda m, i, o: seen.append("proj"))
    blk.mlp.fc2.register_forward_hook(lambda m, i, o: seen.append("fc2"))
    blk.mlp.dwconv.dwconv.register_forward_hook(lambda m, i, o: seen.append("dwconv"))
    model(torch.randn(1, 3, 32, 32, device=DEV)).sum().backward()
    assert seen == ["proj", "dwconv", "fc2"]
    seen.clear()
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, device=DEV))
    assert seen == ["proj", "dwconv", "fc2"]


@here
def test_linear_functions_take_strided_output_gradients(monkeypatch):
    """_JointLinears (one output: its gradient is used as is) and _SplitLinear with the
    bias-gradient kernel, given a transposed output gradient (rows not contiguous): the
    gradients of F.linear on the same slices."""
    import transnext.models.transnext as T

    monkeypatch.setenv("TRANSNEXT_BIAS_GRAD", "triton")
    g0 = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g0).to(DEV).requires_grad_()
               for s in ((6, 16), (12, 16), (12,)))
    gout = torch.randn(12, 6, generator=g0).to(DEV)  # y.t()'s gradient: y's is transposed
    y_ref = torch.nn.functional.linear(x, w, b)
    want = torch.autograd.grad(y_ref.t(), (x, w, b), gout)
    y = T._JointLinears.apply(x, (12,), False, w, b)[0]
    for a, r in zip(torch.autograd.grad(y.t(), (x, w, b), gout), want):
        assert _rel(a, r) < 1e-6
    ya, yb = T._SplitLinear.apply((5, 7), w, b, x, x)
    got = torch.autograd.grad(torch.cat([ya, yb], 1).t(), (x, w, b), gout)
    for a, r in zip(got, want):
        assert _rel(a, r) < 1e-6


# ---- the GLU's gelu(c) * v --------------------------------------------------------

@here
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gated_gelu_matches_gelu_and_product(dtype, with_bias):
    g0 = torch.Generator().manual_seed(5)
    c, v, g = (torch.randn(3, 77, 40, generator=g0).mul(2).to(DEV, dtype) for _ in range(3))
    bias = torch.randn(40, generator=g0).to(DEV) if with_bias else None  # fp32, as the conv's
    c64, v64, g64 = (t.cpu().double() for t in (c, v, g))  # the same (rounded) inputs
    b64 = None if bias is None else bias.cpu().double()
    out = gated_gelu(c, v, bias)
    dc, dv = gated_gelu_backward(g, c, v, bias)
    ref = gated_gelu_reference(c, v, bias)
    rdc, rdv = gated_gelu_backward_reference(g, c, v, bias)
    assert out.dtype == dc.dtype == dv.dtype == dtype
    c2 = c.clone()
    assert gated_gelu(c2, v, bias, in_place=True).data_ptr() == c2.data_ptr()
    assert torch.equal(c2, out)
    # 16 bits: one rounding apart at most (two with the bias: PyTorch rounds c + bias too)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, r in ((out, ref), (dc, rdc), (dv, rdv)):
        assert _rel(a.float(), r.float()) < tol
    # against float64 the kernels (one rounding) are no worse than PyTorch's ops (several).
    # Not in 16 bits on the CPU: triton's interpreter truncates fp32 -> bf16 (checked with
    # triton 3.8), where the GPU rounds to nearest.
    if dtype != torch.float32 and not CUDA:
        return
    t64 = gated_gelu_reference(c64, v64, b64)
    d64 = gated_gelu_backward_reference(g64, c64, v64, b64)
    for a, r, t in ((out, ref, t64), (dc, rdc, d64[0]), (dv, rdv, d64[1])):
        assert _rel(a.cpu().double(), t) <= _rel(r.cpu().double(), t) * 1.01 + 1e-7


@here
def test_gated_gelu_refuses_what_it_cannot_read():
    c = torch.randn(4, 6, device=DEV)
    with pytest.raises(ValueError, match="contiguous tensors of one shape and dtype"):
        gated_gelu(c, c.t().contiguous().t())
    with pytest.raises(ValueError, match="contiguous tensors of one shape and dtype"):
        gated_gelu(c, c.to(torch.bfloat16))
    with pytest.raises(ValueError, match="g of that shape"):
        gated_gelu_backward(c[:2], c, c)
    with pytest.raises(ValueError, match=r"bias \(4,\) .* is not one value per channel"):
        gated_gelu(c, c, torch.zeros(4, device=DEV))


# ---- the Linear layers' bias gradients -----------------------------------------------

@here
@pytest.mark.parametrize("shape,dtype,layout", [
    ((3, 50, 72), torch.bfloat16, "plain"),
    ((700, 300), torch.float32, "plain"),  # several column blocks and row strips
    ((5, 9), torch.float16, "plain"),
    ((40, 24), torch.float32, "strided_rows"),
    ((2, 0, 8), torch.float32, "plain"),
], ids=lambda p: str(p).replace(" ", ""))
def test_column_sum_matches_sum(shape, dtype, layout):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(shape, generator=gen)
    if layout == "strided_rows":
        g = torch.randn(shape[0], shape[1] + 7, generator=gen)[:, :shape[1]]
    g = g.to(DEV, dtype)
    got = column_sum(g)
    ref = column_sum_reference(g)
    assert got.dtype == torch.float32 and got.shape == (shape[-1],)
    # fp32 accumulation of the same values: summation order only
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1, g.shape[0] ** 0.5))
    assert torch.allclose(got.double(), g.double().reshape(-1, shape[-1]).sum(0), rtol=1e-4,
                          atol=1e-4)


@here
def test_column_sum_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="last dimension is contiguous"):
        column_sum(torch.randn(6, 4, device=DEV).t())


@here
@pytest.mark.parametrize("var", ["TRANSNEXT_GLU", "TRANSNEXT_BIAS_GRAD"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_model_with_glu_and_bias_grad_kernels_matches_torch(amp, var, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for other in ("TRANSNEXT_LAYER_NORM", "TRANSNEXT_GLU", "TRANSNEXT_BIAS_GRAD"):
        monkeypatch.setenv(other, "torch")
    torch.manual_seed(0)
    # recompute: the training path the kernels serve (the default on CUDA only)
    model = timm.create_model("transnext_micro", img_size=64, features_only=True,
                              glu_recompute=True).to(DEV)
    with torch.no_grad():  # conv biases that matter (they start at zero)
        for blk in model.modules():
            if isinstance(blk, nn.Conv2d) and blk.bias is not None:
                blk.bias.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, 96, device=DEV)
    ref, g_ref = _model_step(model, x, "torch", monkeypatch, amp, var)
    got, g_got = _model_step(model, x, "triton", monkeypatch, amp, var)
    ftol, gtol = (1e-5, 1e-4) if not amp else (3e-2, 1e-1)
    for a, r in zip(got, ref):
        assert _rel(a, r) < ftol
    scale = max(g.norm().item() for g in g_ref.values())
    for k in g_ref:
        assert (g_got[k] - g_ref[k]).norm().item() < gtol * scale, k
    if not amp:  # fp32: each bias gradient on its own, summation order apart
        biases = [k for k in g_ref if k.endswith("bias") and g_ref[k].norm() > 1e-3 * scale]
        assert len(biases) > 20
        for k in biases:
            assert _rel(g_got[k], g_ref[k]) < 1e-4, k
    # inference (no autograd: the GLU's plain path)
    model.eval()
    with torch.no_grad():
        outs = []
        for mode in ("torch", "triton"):
            monkeypatch.setenv(var, mode)
            outs.append(model(x))
    for a, r in zip(outs[1], outs[0]):
        assert _rel(a, r) < 1e-5


@pytest.mark.skipif(RUN_HERE or os.environ.get(_CHILD) == "1",
                    reason="the cases run in this process")
def test_cpu_cases_in_subprocess():
    from triton_env import run_in_interpreter

    run_in_interpreter(__file__, _CHILD)
