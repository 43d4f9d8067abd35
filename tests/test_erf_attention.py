"""ERF (against a network whose receptive field is known) and attention maps (against the
loop implementation of the SPEC), through the library and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import spec_loops
import transnext
from conftest import write_image
from transnext.cli import main
from transnext.ops.reference import aggregated_attention_reference
from transnext.tools import attention_map as am
from transnext.tools import erf

pytest.importorskip("matplotlib")


def _conv_stack(n: int) -> nn.Module:
    """n 3x3 convolutions, stride 1, 'same' padding, positive weights, no bias: the centre output
    depends on exactly the (2n+1) x (2n+1) input square around it, with no cancellation."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(n)]
    with torch.no_grad():
        for c in layers:
            c.weight.uniform_(0.1, 1.0)
            c.bias.zero_()
    return nn.Sequential(*layers)


@pytest.mark.parametrize("n,size", [(2, 15), (4, 21), (3, 16)])
def test_erf_support_is_the_theoretical_field(n, size):
    # positive inputs: every output channel is positive, so the ReLU passes all of them
    m, count = erf.erf_map(_conv_stack(n), [torch.rand(2, 3, size, size) + 0.1,
                                            torch.rand(1, 3, size, size) + 0.1])
    assert count == 3 and m.shape == (size, size)
    c = size // 2
    expected = np.zeros((size, size), dtype=bool)
    expected[c - n:c + n + 1, c - n:c + n + 1] = True
    np.testing.assert_array_equal(m > 0, expected)
    shares = erf.area_shares(erf.normalise(m))
    assert shares["99%"] <= expected.mean() + 1e-12  # the mass lies inside the field


def test_area_shares_of_known_masses():
    mass = np.zeros((10, 10))
    mass[0, :4] = 0.25  # all mass on 4 pixels of 100
    assert erf.area_shares(mass) == {"20%": 0.01, "50%": 0.02, "80%": 0.04, "99%": 0.04}
    flat = np.full((10, 10), 0.01)
    assert erf.area_shares(flat)["50%"] == pytest.approx(0.5)


def test_erf_cli_transnext_and_timm_side_by_side(tmp_path, capsys):
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.png", i, i, size=40)
    out = tmp_path / "erf.png"
    rc = main(["erf", "--model", "transnext_femto", "convnext_atto", "--images",
               str(tmp_path / "imgs"), "--num", "2", "--input-size", "64", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size[0] > Image.open(out).size[1]  # two panels side by side
    summary = json.loads((tmp_path / "erf.json").read_text())
    assert summary["images"] == 2
    for name in ("transnext_femto", "convnext_atto"):
        m = np.load(tmp_path / f"erf_{name}.npy")
        assert m.shape == (64, 64) and np.isfinite(m).all() and (m >= 0).all()
        assert m.sum() == pytest.approx(1.0, rel=1e-5)
        s = list(summary["models"][name]["area_share"].values())
        assert all(0 < a <= b <= 1 for a, b in zip(s, s[1:]))


def test_erf_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["erf", "--model", "transnext_femto", "--images", str(tmp_path / "empty"),
               "--output", str(tmp_path / "e.png")])
    assert rc == 2 and "no image files" in capsys.readouterr().err
    write_image(tmp_path / "imgs" / "a.png", 0, 0)
    for extra, needle in ((["convnext_atto", "--checkpoint", "none"], "1 paths for 2 models"),
                          (["transnext_femto"], "given twice"),
                          (["--checkpoint", str(tmp_path / "no.pth")], "file not found")):
        rc = main(["erf", "--model", "transnext_femto", *extra, "--images",
                   str(tmp_path / "imgs"), "--output", str(tmp_path / "e.png")])
        assert rc == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "e.png").exists()


def _femto():
    torch.manual_seed(0)
    m = transnext.create_model("transnext_femto", in_chans=3).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m


def test_reference_return_weights():
    torch.manual_seed(0)
    B, H, W, h, d, P, ww = 2, 5, 6, 2, 4, 4, 9
    args = [torch.randn(B, H * W, h, d) for _ in range(3)] + \
        [torch.randn(B, P, h, d) for _ in range(2)] + [torch.randn(h, H * W, P),
         torch.randn(h, 1, d), torch.randn(h, 1, 1), torch.randn(h, ww), torch.randn(h, d, ww),
         torch.randn(h, 1, ww)]
    out = aggregated_attention_reference(*args, H, W)
    out2, wts = aggregated_attention_reference(*args, H, W, return_weights=True)
    assert torch.equal(out, out2) and wts.shape == (B, H * W, h, ww + P)
    torch.testing.assert_close(wts.sum(-1), torch.ones(B, H * W, h))
    assert (wts[:, 0, :, 0] == 0).all()  # the corner's top-left neighbour is outside the map


@pytest.mark.parametrize("stage,block,query", [(1, 0, (13, 30)), (3, 1, (39, 0))])
def test_attention_map_weights_match_the_spec(stage, block, query):
    """The drawn weights are the reference op's softmax for that query: they sum to one over
    window + pooled tokens and equal the SPEC's loop implementation."""
    m = _femto()
    x = torch.randn(1, 3, 40, 48)
    attn = am.block_attention(m, stage, block)
    seen = {}
    hook = attn.register_forward_pre_hook(lambda mod, a: seen.setdefault("a", a))
    res = am.query_weights(m, x, stage, block, query)
    hook.remove()
    tokens, H, W, geo = seen["a"]
    total = res["local"].sum((1, 2)) + res["pooled"].sum((1, 2))
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    loops = {}
    spec_loops.aggregated_attention(attn, tokens, H, W, geo.pool_hw, geo.pretrain_hw,
                                    weights=loops)
    qy, qx = res["cell"]
    assert (qy, qx) == (query[0] * H // 40, query[1] * W // 48)
    for head in range(res["local"].shape[0]):
        want = np.array(loops[(0, head, qy * W + qx)])
        got = np.concatenate([res["local"][head].ravel(), res["pooled"][head].ravel()])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    local, pooled = am.pixel_maps(res, (40, 48))
    # every pooled token's weight over its cell, every window weight on its cell:
    # pixel sums are the weights times the cells' pixel areas
    assert local.shape == pooled.shape == (res["local"].shape[0], 40, 48)
    assert not hasattr(attn, "weights") and not attn.keep_weights


def test_attention_map_cli(tmp_path, capsys):
    img = write_image(tmp_path / "cat.png", 1, 0, size=50)
    out = tmp_path / "am.png"
    rc = main(["attention-map", str(img), "--model", "transnext_femto", "--query", "20", "30",
               "--stage", "2", "--heads", "all", "--input-size", "64", "--output", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert Image.open(out).size[1] > 600  # one row per head (femto stage 2: 2 heads)
    assert "weights sum to 1.000000-1.000000" in text.out
    for argv, needle in ((["--stage", "4"], "full attention"), (["--block", "5"], "blocks 0-0"),
                         (["--query", "50", "0"], "outside"), (["--query", "5"], "takes Y X")):
        base = ["attention-map", str(img), "--model", "transnext_femto", "--output", str(out)]
        rc = main(base + (argv if "--query" in argv else argv + ["--query", "1", "1"]))
        assert rc == 2 and needle in capsys.readouterr().err
