"""The factorised position bias (geometry.BiasPlan / expand_bias) against the SPEC loops:
the cpb MLP on every (query, key) pair, then interpolate mode's bilinear resize, float64."""
import pytest
import torch

import spec_loops
from transnext.models.geometry import bias_plan, expand_bias, stage_geometry
from transnext.models.transnext import AggregatedAttention

f64 = torch.float64


def _mlp(h: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    prm = {
        "cpb_fc1.weight": torch.randn(16, 2, generator=g, dtype=f64),
        "cpb_fc1.bias": torch.randn(16, generator=g, dtype=f64),
        "cpb_fc2.weight": torch.randn(h, 16, generator=g, dtype=f64) * 0.5,
        "cpb_fc2.bias": torch.randn(h, generator=g, dtype=f64),
    }
    return prm


def _per_pair(prm, table):
    hidden = torch.relu(table @ prm["cpb_fc1.weight"].t() + prm["cpb_fc1.bias"])
    return hidden @ prm["cpb_fc2.weight"].t() + prm["cpb_fc2.bias"]


# (actual query grid, actual key grid, built-at query grid, built-at key grid, pretrain grid)
CASES = [
    pytest.param((7, 9), (2, 3), (7, 9), (2, 3), (14, 14), id="extrapolate"),
    pytest.param((7, 9), (2, 3), (6, 6), (2, 2), (14, 14), id="both-axes-up"),
    pytest.param((5, 12), (1, 4), (8, 8), (2, 2), (28, 28), id="h-down-w-up"),
    pytest.param((10, 17), (3, 5), (10, 10), (3, 3), (56, 56), id="width-only"),
    pytest.param((9, 6), (3, 3), (6, 6), (3, 3), (7, 7), id="queries-only"),
    pytest.param((6, 5), (6, 5), (4, 4), (4, 4), (7, 7), id="full-attention-grids"),
    pytest.param((4, 3), (1, 1), (4, 3), (1, 1), (1, 1), id="pretrain-grid-1"),
]


@pytest.mark.parametrize("q_hw, k_hw, q0_hw, k0_hw, pre", CASES)
def test_expand_bias_matches_spec_loops(q_hw, k_hw, q0_hw, k0_hw, pre):
    h = 3
    prm = _mlp(h, 0)
    plan = bias_plan(q_hw, k_hw, q0_hw, k0_hw, pre, "cpu")
    got = expand_bias(_per_pair(prm, plan.table.to(f64)), plan)
    ref = None if (q_hw, k_hw) == (q0_hw, k0_hw) else (q0_hw, k0_hw)
    want = spec_loops.position_bias(prm, q_hw, k_hw, pre, ref)
    assert got.shape == (h, q_hw[0] * q_hw[1], k_hw[0] * k_hw[1])
    assert got.is_contiguous()
    # the table itself is float32 (as in the model); the rest is float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_hw, k_hw, q0_hw, k0_hw, pre", CASES[:3])
def test_expand_bias_gradient_matches_spec_loops(q_hw, k_hw, q0_hw, k0_hw, pre):
    """d(bias . G)/d(cpb weights) through the factorised path equals the gradient through
    the per-pair loops (every pair evaluated, then resized), for a random G."""
    h = 2
    prm = _mlp(h, 1)
    for p in prm.values():
        p.requires_grad_(True)
    plan = bias_plan(q_hw, k_hw, q0_hw, k0_hw, pre, "cpu")
    G = torch.randn(h, q_hw[0] * q_hw[1], k_hw[0] * k_hw[1], dtype=f64)
    ref = None if (q_hw, k_hw) == (q0_hw, k0_hw) else (q0_hw, k0_hw)
    got = torch.autograd.grad((expand_bias(_per_pair(prm, plan.table.to(f64)), plan) * G).sum(),
                              list(prm.values()))
    want = torch.autograd.grad((spec_loops.position_bias(prm, q_hw, k_hw, pre, ref) * G).sum(),
                               list(prm.values()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_model_bias_in_interpolate_mode_at_detection_like_aspect():
    """A module's bias (interpolate mode, only the width resized) equals the spec's."""
    attn = AggregatedAttention(24, 2, sr_ratio=4).double()
    H, W = 12, 20  # built at 12x12 (img_size 48), run at 12x20
    geo = stage_geometry(H, W, 0, 4, 224, None, "interpolate", 48)
    with torch.no_grad():
        got = attn.position_bias(geo, torch.device("cpu"))
    prm = {k: v for k, v in attn.state_dict().items() if k.startswith("cpb")}
    want = spec_loops.position_bias(prm, (H, W), geo.pool_hw, (56, 56), ((12, 12), (3, 3)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
