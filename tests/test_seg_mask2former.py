"""Mask2Former on transformers' head: the released checkpoint converter on every key and
shape of the released layout, and the semantic inference against a plain
implementation of mmseg 1.0's (pad to 32, one resize, softmax x sigmoid, crop)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seg_helpers import random_state, read_layout
from transnext.tasks.segmentation.convert import (ConvertError, mask2former_from_state,
                                                  model_from_released)
from transnext.tasks.segmentation.inference import predict, slide
from transnext.tasks.segmentation.mask2former import build_mask2former

pytest.importorskip("scipy")  # transformers' Mask2FormerLoss needs it at construction


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    sd = random_state(read_layout("mask2former_transnext_tiny.keys.txt"), seed=2)
    path = tmp_path_factory.mktemp("m2f") / "mask2former.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ["wall"]}}, "state_dict": sd}, path)
    return sd, path


def test_released_layout_loads_strictly(released):
    sd, path = released
    assert len(sd) == 907
    model = model_from_released(path)
    assert type(model).__name__ == "TransNeXtMask2Former" and model.config.num_labels == 150
    own = model.state_dict()
    layer = "model.transformer_module.decoder.layers.3.self_attn"
    q, k, v = sd["decode_head.transformer_decoder.layers.3.self_attn.attn.in_proj_weight"].chunk(3)
    assert torch.equal(own[f"{layer}.q_proj.weight"], q)
    assert torch.equal(own[f"{layer}.k_proj.weight"], k)
    assert torch.equal(own[f"{layer}.v_proj.weight"], v)
    assert torch.equal(own["class_predictor.weight"], sd["decode_head.cls_embed.weight"])
    assert torch.equal(own["model.pixel_level_module.decoder.level_embed"],
                       sd["decode_head.pixel_decoder.level_encoding.weight"])
    assert torch.equal(own["model.transformer_module.decoder.layers.8.cross_attn_layer_norm.weight"],
                       sd["decode_head.transformer_decoder.layers.8.norms.0.weight"])
    assert torch.equal(own["model.pixel_level_module.encoder.model.block3.14.mlp.fc2.weight"],
                       sd["backbone.block3.14.mlp.fc2.weight"])
    # every model tensor came from the file: 9 self-attention in_proj weight/bias pairs
    # became q, k, v (+36), and the loss's empty_weight is derived from the config (+1)
    assert len(own) == 907 + 36 + 1


def test_refusals(released, tmp_path):
    sd, _ = released
    bad = dict(sd)
    del bad["decode_head.query_feat.weight"]
    bad["decode_head.pixel_decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConvertError, match=r"missing 1 key\(s\): model\.transformer_module\."
                                           r"queries_features\.weight.*unexpected 1 key\(s\): "
                                           r"decode_head\.pixel_decoder\.extra\.weight"):
        mask2former_from_state(bad, "m2f.pth")
    with pytest.raises(ConvertError, match="transnext_tiny, not transnext_base"):
        mask2former_from_state(sd, "m2f.pth", "transnext_base")
    uper = {k: torch.zeros(1) for k in read_layout("upernet_transnext_tiny.keys.txt")}
    with pytest.raises(ConvertError, match="is a UperNet checkpoint, not Mask2Former"):
        mask2former_from_state(uper, "upernet.pth")


def _plain_mmseg_semantic(model, x):
    """mmseg 1.0 Mask2Former inference: pad bottom/right to 32 (zeros, after
    normalisation), last layer's outputs, masks resized once to the padded size,
    softmax[..., :-1] x sigmoid summed over queries, padding cropped."""
    H, W = x.shape[-2:]
    ph, pw = -(-H // 32) * 32, -(-W // 32) * 32
    out = type(model).__mro__[1].forward(model, pixel_values=F.pad(x, (0, pw - W, 0, ph - H)))
    masks = F.interpolate(out.masks_queries_logits, size=(ph, pw), mode="bilinear",
                          align_corners=False).sigmoid()
    cls = out.class_queries_logits.softmax(-1)[..., :-1]
    seg = (cls[:, :, :, None, None] * masks[:, :, None]).sum(1)
    return seg[:, :, :H, :W]


@torch.no_grad()
def test_semantic_inference_as_mmseg():
    torch.manual_seed(0)
    model = build_mask2former("transnext_femto", 5, pos_bias="extrapolate").eval()
    x = torch.randn(2, 3, 45, 70)
    want = _plain_mmseg_semantic(model, x)
    got = model.semantic_logits(x)
    assert got.shape == (2, 5, 45, 70)
    assert torch.allclose(got, want, atol=1e-5)
    # the inference helpers use these scores as they are (no second softmax)
    assert torch.allclose(predict(model, x), got, atol=1e-6)
    assert torch.allclose(slide(model, x, crop=96, stride=40), got, atol=1e-6)


def test_mask2former_train_and_eval(tmp_path):
    from pathlib import Path
    from transnext.cli import main
    from transnext.tasks.common.mosaic import write_mosaic_set
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    data = write_mosaic_set(tmp_path / "mos", n_train=8, n_val=3, size=32)
    out = tmp_path / "run"
    assert main(["seg", "train", "--head", "mask2former", "--model", "transnext_femto",
                 "--data-dir", str(data), "--output", str(out), "--iters", "2",
                 "--batch-size", "2", "--crop-size", "32", "--pos-bias", "extrapolate",
                 "--pretrain-size", "32", "--workers", "0", "--no-progress",
                 "--no-tensorboard", "--backbone-lr-mult", "0.1", "--lr", "1e-4"]) == 0
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["seg_config"]["model_type"] == "mask2former" and ck["iter"] == 2
    groups = ck["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([1e-5, 1e-4])
    assert main(["seg", "eval", "--checkpoint", str(out / "last.pth"), "--data-dir", str(data),
                 "--workers", "0", "--json", str(tmp_path / "e.json")]) == 0


def test_pixel_decoder_runs_the_package_deformable_attention():
    """The six pixel-decoder attention layers are the package's op (one implementation for
    Mask2Former and DINO), under transformers' parameter names: the same state dict loads
    into transformers' own model, whose outputs (grid_sample per level) agree."""
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import modeling_mask2former as hf

    from transnext.tasks.segmentation.mask2former import PixelDecoderAttention
    torch.manual_seed(0)
    ours = build_mask2former("transnext_micro", 5, img_size=64).eval()
    assert sum(isinstance(m, PixelDecoderAttention) for m in ours.modules()) == 6
    assert not any(isinstance(m, hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention)
                   for m in ours.modules())
    theirs = Mask2FormerForUniversalSegmentation(ours.config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(pixel_values=x), theirs(pixel_values=x)
    torch.testing.assert_close(a.masks_queries_logits, b.masks_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.class_queries_logits, b.class_queries_logits, atol=1e-4, rtol=1e-4)
