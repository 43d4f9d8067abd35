"""Every Triton op on tensors of the second GPU while the first is the current device.

Triton launches on the current device; the ops launch on their tensors' own device
(``ops.triton_launch.launch``). Each op runs forward and backward on cuda:1 with cuda:0
current and must give what it gives on cuda:0. Skipped with fewer than two GPUs.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _both(fn, *inputs, grad_of=None, seed=0):
    """fn's outputs and the gradients of ``grad_of`` (input indices) for a random output
    gradient, on cuda:0 and on cuda:1 with cuda:0 current."""
    torch.cuda.set_device(0)
    results = []
    for dev in ("cuda:0", "cuda:1"):
        ins = [t.detach().to(dev).requires_grad_(i in (grad_of or ()))
               if isinstance(t, torch.Tensor) else t for i, t in enumerate(inputs)]
        outs = fn(*ins)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        got = [o.detach() for o in outs]
        if grad_of:
            gen = torch.Generator().manual_seed(seed)
            gouts = [torch.randn(o.shape, generator=gen).to(dev, o.dtype) for o in outs]
            got += torch.autograd.grad(outs, [ins[i] for i in grad_of], gouts)
        assert torch.cuda.current_device() == 0
        assert all(t.device == torch.device(dev) for t in got)
        results.append(got)
        torch.cuda.synchronize(dev)
    return results


def _same(first, second, rtol=1e-5, atol=1e-6):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.allclose(a.cpu().double(), b.cpu().double(), rtol=rtol, atol=atol)


def _attention_inputs(B=2, H=8, W=9, h=2, d=24, P=9):
    g = torch.Generator().manual_seed(0)
    N = H * W
    t = [torch.randn(B, N, h, d, generator=g) for _ in range(3)]
    t += [torch.randn(B, P, h, d, generator=g) for _ in range(2)]
    t += [torch.randn(h, N, P, generator=g) * 0.5]
    t += [torch.randn(h, 1, d, generator=g) * 0.5, torch.randn(h, 1, 1, generator=g),
          torch.randn(h, 9, generator=g) * 0.5, torch.randn(h, d, 9, generator=g) * 0.3,
          torch.randn(h, 1, 9, generator=g) * 0.3]
    return t, H, W


def test_aggregated_attention_on_the_second_gpu():
    from transnext.ops.aggregated_attention import aggregated_attention

    t, H, W = _attention_inputs()
    a, b = _both(lambda *x: aggregated_attention(*x, H, W, 3, backend="triton"), *t,
                 grad_of=range(11))
    _same(a, b)


def test_factored_bias_on_the_second_gpu():
    """The written-out bias and the folded gradient (ops.position_bias_triton)."""
    from transnext.ops.aggregated_attention import aggregated_attention
    from transnext.ops.position_bias import FactoredBias

    t, H, W = _attention_inputs(P=12)
    HK, WK = 3, 4
    g = torch.Generator().manual_seed(1)
    table = torch.randn(2, 2 * H + HK, W * WK, generator=g)
    idx = torch.randint(0, table.shape[1], (2, H * HK), generator=g, dtype=torch.int32)
    wts = torch.rand(2, H * HK, generator=g)

    def fn(*x):
        *rest, tab, ix, w = x
        bias = FactoredBias(tab, ix, w, (H, W), (HK, WK))
        return aggregated_attention(*rest[:5], bias, *rest[6:], H, W, 3, backend="triton")

    a, b = _both(fn, *t, table, idx, wts, grad_of=(0, 1, 2, 11))
    _same(a, b)


def test_layer_norm_glu_and_column_sum_on_the_second_gpu():
    from transnext.ops.column_sum import column_sum
    from transnext.ops.gated_gelu import gated_gelu, gated_gelu_backward
    from transnext.ops.layer_norm import layer_norm

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, 72, generator=g)
    w, bias = 1 + 0.5 * torch.randn(72, generator=g), 0.5 * torch.randn(72, generator=g)
    a, b = _both(lambda *i: layer_norm(*i, 1e-6, torch.bfloat16, 2), x, w, bias,
                 grad_of=(0, 1, 2))
    _same(a, b)
    c, v, go = (torch.randn(2, 40, 96, generator=g).bfloat16() for _ in range(3))
    cb = torch.randn(96, generator=g)
    a, b = _both(lambda *i: (gated_gelu(*i[1:]), *gated_gelu_backward(*i)), go, c, v, cb)
    _same(a, b)
    a, b = _both(column_sum, torch.randn(700, 300, generator=g).bfloat16())
    _same(a, b)


def test_deformable_attention_on_the_second_gpu():
    from test_msda import make_inputs

    from transnext.ops.msda import ms_deform_attn

    value, loc, aw, shapes, starts = make_inputs(2, 30, 4, 32, [(8, 10), (4, 5)], 4,
                                                 device="cpu")
    a, b = _both(lambda v, lo, w: ms_deform_attn(v, shapes, starts, lo, w, backend="triton"),
                 value, loc, aw, grad_of=(0, 1, 2))
    _same(a, b)
