"""torch.fx: symbolic tracing, FX feature extraction, timm's factory arguments.

The size-dependent pieces (input check, stage tables, position bias, attention ops)
are FX leaves; everything else (projections, norms, GLU) is traced into the graph.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.fx
from torchvision.models.feature_extraction import create_feature_extractor

from transnext import TransNeXt

LEAVES = {"_checked_image", "stage_geometry", "_position_bias", "aggregated_attention",
          "full_attention"}


def small(**kw) -> TransNeXt:
    """Published layout (sr 8/4/2/1, window 3), tiny widths, weights off their init."""
    args = dict(embed_dims=(8, 16, 16, 24), num_heads=(1, 1, 1, 2), depths=(1, 2, 2, 1),
                mlp_ratios=(2, 2, 2, 2), num_classes=5)
    args.update(kw)
    torch.manual_seed(0)
    m = TransNeXt(**args).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m


def test_symbolic_trace_any_size_and_checks():
    m = small()
    gm = torch.fx.symbolic_trace(m)
    called = {getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"}
    assert LEAVES <= called
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    # the projections stay visible in the graph (quantisation, feature extraction)
    assert {"block1.0.attn.q", "block1.0.attn.kv", "block4.0.attn.qkv", "block2.1.mlp.fc2",
            "head"} <= modules
    with torch.no_grad():
        # one trace, any size: the leaves build their tables for the actual size
        for size in [(64, 64), (40, 72)]:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="built for 3 input channels"):
        gm(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="4-D float image tensor"):
        gm(torch.randn(3, 32, 32))


def test_graph_trains_like_eager():
    """A training graph (traced under no_grad, GLU recompute on) gives eager's gradients:
    nothing of the trace-time state (no grad, checkpointing) is baked in."""
    m = small(drop_path_rate=0.0, glu_recompute=True).train()
    with torch.no_grad():
        gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 3, 48, 48)
    gm(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m(x).square().mean().backward()
    assert set(want) == {n for n, p in m.named_parameters() if p.grad is not None}
    for n, p in m.named_parameters():
        torch.testing.assert_close(want[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_fx_feature_extractors_give_stage_maps():
    m = small()
    x = torch.randn(1, 3, 64, 96)
    nodes = {f"norm{i}": f"stage{i}" for i in range(1, 5)}
    with torch.no_grad():
        want = m.forward_intermediates(x, intermediates_only=True)
        for fe in (create_feature_extractor(m, nodes),  # torchvision, plain fx tracer
                   timm.models.create_feature_extractor(m, nodes)):
            got = list(fe(x).values())
            assert [t.shape for t in got] == [t.shape for t in want]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature_cls", ["fx", "hook"])
def test_features_only_graph_and_hook(feature_cls):
    torch.manual_seed(0)  # the same seed: the same initial weights
    getter = timm.create_model("transnext_femto", features_only=True).eval()
    torch.manual_seed(0)
    other = timm.create_model("transnext_femto", features_only=True,
                              feature_cls=feature_cls).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(other(x), getter(x)):
            assert a.shape == b.shape and a.ndim == 4
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_create_model_device_dtype():
    m = timm.create_model("transnext_micro", device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in m.parameters()} == {("meta", torch.bfloat16)}
    out = m.forward_features(torch.randn(1, 3, 224, 224, device="meta", dtype=torch.bfloat16))
    assert out.shape == (1, 384, *m.pretrained_cfg["pool_size"])
    with pytest.raises(TypeError):
        timm.create_model("transnext_micro", device="meta", not_a_model_arg=1)


@pytest.mark.parametrize("tag", timm.list_models("transnext_*", include_tags=True))
def test_pretrained_cfg_pool_size(tag):
    """pool_size is the unpooled map at input_size (micro_aaaa at 256, fine-tunes at 384)."""
    cfg = timm.get_pretrained_cfg(tag).to_dict()
    m = timm.create_model(tag, device="meta")
    out = m.forward_features(torch.empty(1, *cfg["input_size"], device="meta"))
    assert tuple(out.shape[-2:]) == cfg["pool_size"]
    assert m.in_chans == cfg["input_size"][0]
    assert f"{cfg['first_conv']}.weight" in m.state_dict()
    assert f"{cfg['classifier']}.weight" in m.state_dict()
