"""The attention modules against the plain loop implementation of SPEC 3-5
(tests/spec_loops.py), with every parameter randomised."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spec_loops  # noqa: E402

from transnext import TransNeXt  # noqa: E402
from transnext.models.geometry import stage_geometry  # noqa: E402
from transnext.models.transnext import AggregatedAttention, Attention  # noqa: E402



def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter to a random value of a sensible scale (default init leaves
    learnable_bias at 0 and relative_pos_bias_local ~ 4e-4, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("temperature"):
                val = 0.5 + 0.5 * r
            elif "cpb_fc1" in name:
                val = r * (1.0 if leaf == "weight" else 0.5)
            elif "cpb_fc2" in name:
                val = r * (0.08 if leaf == "weight" else 0.5)
            elif name.endswith(("query_embedding", "learnable_tokens", "learnable_bias")):
                val = 0.3 * r
            elif name.endswith("relative_pos_bias_local"):
                val = 0.7 * r
            elif p.ndim >= 2:
                val = r / math.sqrt(p[0].numel())
            elif "norm" in name and leaf == "weight":
                val = 1.0 + 0.3 * r
            else:
                val = 0.2 * r
            p.copy_(val.to(p.dtype))


# A float64 module computes in float64 except for the log-spaced coordinate
# table of the position bias, which the model keeps in float32 (as the
# authors' code does): with randomised cpb weights that bounds agreement at
# ~1e-8 relative. The case tests use 1e-6 (a semantic error with randomised
# parameters is >= 1e-3); test_float64_* below check the float64 path at
# 1e-10 with the table taken out of play, and the bias tables on their own.
F64_RTOL = 1e-6


def spec_pool(H, W, sr, fixed):
    if fixed is not None:
        return fixed, fixed
    return max(H // sr, 1), max(W // sr, 1)


def spec_ref(stage, sr, fixed, img_size, full=False):
    """Interpolate mode reference grids at img_size, from the SPEC arithmetic."""
    s = spec_loops.stage_sizes(img_size, img_size)[stage][0]
    q0 = (s, s)
    k0 = q0 if full else spec_pool(s, s, sr, fixed)
    return q0, k0


def run_agg(attn, x, H, W, stage, sr, pretrain, fixed=None, mode="extrapolate", img_size=None):
    geo = stage_geometry(H, W, stage, sr, pretrain, fixed, mode, img_size)
    with torch.no_grad():
        got = attn(x, H, W, geo)
    pool = spec_pool(H, W, sr, fixed)
    assert geo.pool_hw == pool
    ref = spec_ref(stage, sr, fixed, img_size) if mode == "interpolate" else None
    stride = 4 * 2**stage
    want = spec_loops.aggregated_attention(attn, x, H, W, pool, (pretrain // stride,) * 2, ref)
    return got, want


def run_full(attn, x, H, W, stage, pretrain, mode="extrapolate", img_size=None):
    geo = stage_geometry(H, W, stage, 1, pretrain, None, mode, img_size)
    with torch.no_grad():
        got = attn(x, H, W, geo)
    ref = spec_ref(stage, 1, None, img_size, full=True) if mode == "interpolate" else None
    stride = 4 * 2**stage
    want = spec_loops.full_attention(attn, x, H, W, (pretrain // stride,) * 2, ref)
    return got, want


def assert_close(got, want, rtol):
    got = got.detach().to(torch.float64)
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale, f"max abs err {err:.3e} vs output scale {scale:.3e} (rtol {rtol})"


# (H, W, stage, sr, pretrain, fixed_pool_size, pos_bias, img_size)
AGG_CASES = [
    pytest.param(8, 8, 0, 4, 224, None, "extrapolate", None, id="8x8-sr4-corners-edges"),
    pytest.param(5, 7, 0, 2, 224, None, "extrapolate", None, id="5x7-odd-nonsquare"),
    pytest.param(7, 4, 1, 2, 256, None, "extrapolate", None, id="7x4-stage2-pretrain256"),
    pytest.param(3, 1, 1, 4, 224, None, "extrapolate", None, id="3x1-smaller-than-sr"),
    pytest.param(1, 1, 2, 2, 224, None, "extrapolate", None, id="1x1"),
    pytest.param(2, 3, 0, 8, 224, None, "extrapolate", None, id="2x3-pool1x1"),
    pytest.param(6, 6, 0, 8, 224, 3, "extrapolate", None, id="linear-pool3"),
    pytest.param(4, 5, 1, 2, 224, 1, "extrapolate", None, id="linear-pool1"),
    pytest.param(2, 2, 0, 4, 224, 3, "extrapolate", None, id="linear-pool-larger-than-map"),
    pytest.param(7, 9, 0, 4, 224, None, "interpolate", 48, id="interp-img-larger"),
    pytest.param(8, 6, 0, 4, 224, None, "interpolate", 16, id="interp-img-smaller"),
    pytest.param(5, 5, 1, 2, 224, None, "interpolate", 64, id="interp-stage2-larger"),
    pytest.param(6, 6, 0, 4, 224, None, "interpolate", 24, id="interp-same-size"),
    pytest.param(6, 7, 0, 4, 224, 2, "interpolate", 40, id="interp-linear"),
]


@pytest.mark.parametrize("H,W,stage,sr,pretrain,fixed,mode,img", AGG_CASES)
def test_aggregated_attention_matches_loops_float64(H, W, stage, sr, pretrain, fixed, mode, img):
    torch.manual_seed(0)
    attn = AggregatedAttention(12, 2, sr, window_size=3).double().eval()
    randomise(attn, seed=H * 100 + W)
    x = torch.randn(2, H * W, 12, dtype=torch.float64)
    got, want = run_agg(attn, x, H, W, stage, sr, pretrain, fixed, mode, img)
    assert got.dtype == torch.float64
    assert_close(got, want, F64_RTOL)


@pytest.mark.parametrize("H,W,stage,sr,pretrain,fixed,mode,img", AGG_CASES[:3] + AGG_CASES[9:11])
def test_aggregated_attention_matches_loops_float32(H, W, stage, sr, pretrain, fixed, mode, img):
    attn = AggregatedAttention(12, 2, sr, window_size=3).eval()
    randomise(attn, seed=7)
    x = torch.randn(2, H * W, 12)
    got, want = run_agg(attn, x, H, W, stage, sr, pretrain, fixed, mode, img)
    assert got.dtype == torch.float32
    assert_close(got, want, 2e-5)


def test_aggregated_attention_window5():
    attn = AggregatedAttention(8, 2, 2, window_size=5).double().eval()
    randomise(attn, seed=3)
    x = torch.randn(1, 6 * 5, 8, dtype=torch.float64)
    got, want = run_agg(attn, x, 6, 5, 0, 2, 224)
    assert_close(got, want, F64_RTOL)


@pytest.mark.parametrize("H,W,stage,pretrain,mode,img", [
    pytest.param(7, 7, 3, 224, "extrapolate", None, id="7x7"),
    pytest.param(3, 5, 3, 224, "extrapolate", None, id="3x5"),
    pytest.param(1, 1, 3, 224, "extrapolate", None, id="1x1"),
    pytest.param(2, 1, 2, 256, "extrapolate", None, id="2x1-pretrain256"),
    pytest.param(4, 3, 3, 224, "interpolate", 224, id="interp-img-larger"),
    pytest.param(8, 5, 3, 224, "interpolate", 96, id="interp-img-smaller"),
])
def test_full_attention_matches_loops(H, W, stage, pretrain, mode, img):
    attn = Attention(12, 2).double().eval()
    randomise(attn, seed=H * 10 + W)
    x = torch.randn(2, H * W, 12, dtype=torch.float64)
    got, want = run_full(attn, x, H, W, stage, pretrain, mode, img)
    assert_close(got, want, F64_RTOL)
    attn32 = attn.float()
    got32, want32 = run_full(attn32, x.float(), H, W, stage, pretrain, mode, img)
    assert_close(got32, want32, 2e-5)


def test_modules_of_a_built_model_match_loops():
    """The attention modules as the model builds them (all stages, sr 8/4/2/1 of
    a published layout, scaled down), called with the model's own geometry."""
    m = TransNeXt(embed_dims=(12, 12, 12, 12), num_heads=(2, 2, 2, 2), depths=(1, 1, 1, 1),
                  mlp_ratios=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1), num_classes=0).double().eval()
    randomise(m, seed=5)
    sizes = {0: (9, 10), 1: (5, 5), 2: (3, 3), 3: (2, 2)}
    for stage, (H, W) in sizes.items():
        attn = getattr(m, f"block{stage + 1}")[0].attn
        x = torch.randn(1, H * W, 12, dtype=torch.float64)
        geo = m._geometry(stage, H, W)
        with torch.no_grad():
            got = attn(x, H, W, geo)
        stride = 4 * 2**stage
        if stage == 3:
            want = spec_loops.full_attention(attn, x, H, W, (224 // stride,) * 2)
        else:
            sr = (8, 4, 2)[stage]
            want = spec_loops.aggregated_attention(attn, x, H, W, spec_pool(H, W, sr, None),
                                                   (224 // stride,) * 2)
        assert_close(got, want, F64_RTOL)


def test_micro_aaaa_stage4_is_aggregated():
    m = TransNeXt(embed_dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                  mlp_ratios=(1, 1, 1, 1), sr_ratios=(16, 8, 4, 2), pretrain_size=256)
    assert all(isinstance(getattr(m, f"block{i}")[0].attn, AggregatedAttention)
               for i in range(1, 5))
    m2 = TransNeXt(embed_dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                   mlp_ratios=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1))
    assert isinstance(m2.block4[0].attn, Attention)


# ---- whole-model stage arithmetic (SPEC section 2) -------------------------

def tiny_model(**kw):
    return TransNeXt(embed_dims=(8, 16, 16, 24), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                     mlp_ratios=(1, 1, 1, 1), num_classes=0, **kw).eval()


@pytest.mark.parametrize("H,W", [(224, 224), (138, 138), (200, 333), (32, 32), (1, 1),
                                 (800, 1333), (33, 65)])
def test_stage_sizes_ceil(H, W):
    m = tiny_model()
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        feats = m.forward_intermediates(x, intermediates_only=True)
    want = spec_loops.stage_sizes(H, W)
    assert [tuple(f.shape[-2:]) for f in feats] == want
    assert [f.shape[1] for f in feats] == [8, 16, 16, 24]
    assert all(torch.isfinite(f).all() for f in feats)


def constant_cpb(module, seed):
    """cpb_fc1/fc2 weights zero, fc2 bias random: the bias is exactly fc2.bias
    for every pair, so float32 coordinates cannot matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.cpb_fc1.weight.zero_()
        module.cpb_fc2.weight.zero_()
        module.cpb_fc2.bias.copy_(torch.randn(module.cpb_fc2.bias.shape, generator=g))


@pytest.mark.parametrize("H,W,sr,fixed", [(6, 5, 4, None), (3, 1, 4, None), (7, 7, 2, 3)])
def test_float64_aggregated_path_is_float64(H, W, sr, fixed):
    """model.double() computes aggregated attention in float64: ~1e-15 agreement
    (a float32 computation agrees only to ~1e-7)."""
    attn = AggregatedAttention(12, 2, sr).double().eval()
    randomise(attn, seed=H + W)
    constant_cpb(attn, 1)
    x = torch.randn(2, H * W, 12, dtype=torch.float64)
    got, want = run_agg(attn, x, H, W, 0, sr, 224, fixed)
    assert got.dtype == torch.float64
    assert_close(got, want, 1e-10)


@pytest.mark.parametrize("H,W", [(3, 4), (1, 1), (5, 2)])
def test_float64_full_path_is_float64(H, W):
    full = Attention(12, 2).double().eval()
    randomise(full, seed=2)
    constant_cpb(full, 2)
    x = torch.randn(1, H * W, 12, dtype=torch.float64)
    got, want = run_full(full, x, H, W, 3, 224)
    assert got.dtype == torch.float64
    assert_close(got, want, 1e-10)


@pytest.mark.parametrize("H,W,stage,sr,fixed,mode,img", [
    (8, 8, 0, 4, None, "extrapolate", None),
    (5, 7, 1, 2, None, "extrapolate", None),
    (9, 4, 0, 8, 3, "extrapolate", None),
    (4, 3, 3, 1, None, "extrapolate", None),
    (7, 9, 0, 4, None, "interpolate", 48),
    (8, 6, 0, 4, None, "interpolate", 16),
    (4, 3, 3, 1, None, "interpolate", 224),
    (8, 5, 3, 1, None, "interpolate", 96),
])
def test_position_bias_tables_match_loops(H, W, stage, sr, fixed, mode, img):
    """The bias (h, N, P) alone, both modes, against SPEC section 5 by loops
    (float32 coordinates in the model: 1e-6)."""
    full = sr == 1
    attn = (Attention(12, 3) if full else AggregatedAttention(12, 3, sr)).double().eval()
    randomise(attn, seed=stage * 7 + H)
    geo = stage_geometry(H, W, stage, sr, 224, fixed, mode, img)
    with torch.no_grad():
        got = attn.position_bias(geo, torch.device("cpu"))
    k_hw = (H, W) if full else spec_pool(H, W, sr, fixed)
    ref = spec_ref(stage, sr, fixed, img, full=full) if mode == "interpolate" else None
    want = spec_loops.position_bias(spec_loops.params_of(attn), (H, W), k_hw,
                                    (224 // (4 * 2**stage),) * 2, ref)
    assert got.shape == want.shape == (3, H * W, k_hw[0] * k_hw[1])
    assert_close(got, want, 1e-6)


# ---- the whole network against the loops (SPEC sections 2-6) --------------------

@pytest.mark.parametrize("H,W,pretrain", [(20, 24, 224), (9, 13, 256), (33, 17, 224)])
def test_whole_model_matches_loops(H, W, pretrain):
    m = TransNeXt(embed_dims=(8, 8, 16, 16), num_heads=(1, 2, 2, 2), depths=(1, 2, 1, 1),
                  mlp_ratios=(2, 3, 2, 2), sr_ratios=(8, 4, 2, 1), num_classes=3,
                  pretrain_size=pretrain).double().eval()
    randomise(m, seed=H * W)
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    with torch.no_grad():
        final, feats = m.forward_intermediates(x)
        logits = m.forward_head(final)
    want_feats, want_logits = spec_loops.model_forward(m, x, (8, 4, 2, 1), pretrain)
    for got, want in zip(feats, want_feats):
        assert got.shape == want.shape
        assert_close(got, want, F64_RTOL)
    assert_close(logits, want_logits, F64_RTOL)


def test_layer_norm_eps_per_spec():
    """SPEC section 2/3: patch-embed and pooled-token norms eps 1e-5; block and
    stage norms eps 1e-6 (too small to see through the outputs at 1e-6)."""
    m = TransNeXt(embed_dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                  mlp_ratios=(1, 1, 1, 1))
    for i in range(1, 5):
        assert getattr(m, f"patch_embed{i}").norm.eps == 1e-5
        assert getattr(m, f"norm{i}").eps == 1e-6
        blk = getattr(m, f"block{i}")[0]
        assert blk.norm1.eps == 1e-6 and blk.norm2.eps == 1e-6
    for i in range(1, 4):
        assert getattr(m, f"block{i}")[0].attn.norm.eps == 1e-5
