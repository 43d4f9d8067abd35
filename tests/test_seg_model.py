"""TransNeXt behind transformers' backbone interface; UperNet on it; the released
UperNet checkpoint converter (strict, refusals, weights_only)."""
from __future__ import annotations

import pickle
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import transnext
from transnext.tasks.common.backbone import TransNeXtBackbone, TransNeXtBackboneConfig
from transnext.tasks.segmentation import TransNeXtUperNet, build_upernet
from transnext.tasks.segmentation.convert import ConvertError, upernet_from_released
from seg_helpers import (plain_fcnhead, plain_uperhead, random_state, read_layout,
                         upernet_layout)


def _femto(**kw):
    kw.setdefault("img_size", 64)
    return build_upernet("transnext_femto", 5, channels=32, aux_channels=16, **kw).eval()


def test_autobackbone_maps_and_modes():
    from transformers import AutoBackbone
    cfg = TransNeXtBackboneConfig("transnext_femto", pos_bias="interpolate", img_size=64,
                                  out_indices=[1, 3])
    bb = AutoBackbone.from_config(cfg).eval()
    assert isinstance(bb, TransNeXtBackbone) and bb.channels == [64, 256]
    x = torch.randn(1, 3, 50, 77)
    torch.manual_seed(0)
    ref = transnext.create_model("transnext_femto", num_classes=0, in_chans=3, pos_bias="interpolate",
                                 img_size=64)
    ref.load_state_dict(bb.model.state_dict())
    ref.eval()
    want = ref.forward_intermediates(x, intermediates_only=True)
    got = bb(x).feature_maps
    assert [tuple(f.shape) for f in got] == [(1, 64, 7, 10), (1, 256, 2, 3)]
    assert torch.equal(got[0], want[1]) and torch.equal(got[1], want[3])
    # run-time switch to extrapolate: same as a model built in that mode
    bb.set_pos_bias("extrapolate")
    ext = transnext.create_model("transnext_femto", num_classes=0, in_chans=3)
    ext.load_state_dict(bb.model.state_dict())
    ext.eval()
    got_e = bb(x).feature_maps
    assert torch.allclose(got_e[1], ext.forward_intermediates(x, intermediates_only=True)[3])
    assert not torch.allclose(got_e[1], got[1])
    with pytest.raises(ValueError, match="img_size"):
        bb.set_pos_bias("interpolate")


def test_upernet_save_load_plain_transformers(tmp_path):
    from transformers import UperNetForSemanticSegmentation
    m = _femto()
    x = torch.randn(2, 3, 40, 56)
    m.save_pretrained(tmp_path)
    plain = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    ours = TransNeXtUperNet.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b, c = m(x).logits, plain(x).logits, ours(x).logits
    assert a.shape == (2, 5, 40, 56)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert ours.decode_head.classifier.p == pytest.approx(0.1)


def test_upernet_loss_is_mmseg_mean_over_all_pixels():
    m = _femto()
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 5, (2, 32, 32))
    y[:, :8] = 255
    with torch.no_grad():
        out = m(x, labels=y)
        dec, aux = m.head_logits(x, with_aux=True)
    def ce(lg):
        lg = F.interpolate(lg, size=(32, 32), mode="bilinear", align_corners=False)
        per = F.cross_entropy(lg, y, ignore_index=255, reduction="none")
        return per.sum() / y.numel()
    assert torch.allclose(out.loss, ce(dec) + 0.4 * ce(aux), atol=1e-5)
    m.train()
    m(torch.randn(2, 3, 32, 32), labels=y).loss.backward()
    assert m.backbone.model.patch_embed1.proj.weight.grad is not None


def _save(tmp_path, sd, name="upernet.pth", meta=None):
    path = tmp_path / name
    torch.save({"meta": meta or {"iter": 160000, "CLASSES": ["wall", "building"]},
                "state_dict": sd}, path)
    return path


@pytest.fixture(scope="module")
def tiny_released(tmp_path_factory):
    sd = random_state(read_layout("upernet_transnext_tiny.keys.txt"))
    return sd, _save(tmp_path_factory.mktemp("released"), sd)


def test_tiny_layout_backbone_is_ours():
    layout = read_layout("upernet_transnext_tiny.keys.txt")
    ours = transnext.create_model("transnext_tiny", num_classes=0).state_dict()
    assert {k[len("backbone."):]: v for k, v in layout.items() if k.startswith("backbone.")} == \
        {k: tuple(v.shape) for k, v in ours.items()}
    assert len(layout) == 697


def _check_against_plain(model, sd, x):
    feats = transnext.create_model("transnext_tiny" if model.config.backbone_config.model_name ==
                                   "transnext_tiny" else model.config.backbone_config.model_name,
                                   features_only=True, pos_bias="interpolate", img_size=512)
    transnext.load_checkpoint(feats, _check_against_plain.path)
    feats.eval()
    with torch.no_grad():
        f = feats(x)
        want_dec, want_aux = plain_uperhead(f, sd), plain_fcnhead(f, sd)
        dec, aux = model.head_logits(x, with_aux=True)
        logits = model(x).logits
    assert torch.allclose(dec, want_dec, atol=1e-4, rtol=1e-4)
    assert torch.allclose(aux, want_aux, atol=1e-4, rtol=1e-4)
    up = F.interpolate(want_dec, size=x.shape[2:], mode="bilinear", align_corners=False)
    assert torch.allclose(logits, up, atol=1e-4, rtol=1e-4)


def test_released_tiny_loads_and_matches_plain_uperhead(tiny_released):
    sd, path = tiny_released
    model = upernet_from_released(path)
    assert model.config.num_labels == 150 and model.config.backbone_config.img_size == 512
    _check_against_plain.path = path
    _check_against_plain(model, sd, torch.randn(1, 3, 72, 88))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["transnext_small", "transnext_base"])
def test_released_small_base_load(tmp_path, variant):
    sd = random_state(upernet_layout(variant), seed=1)
    path = _save(tmp_path, sd)
    model = upernet_from_released(path, variant)
    _check_against_plain.path = path
    _check_against_plain(model, sd, torch.randn(1, 3, 64, 64))


def test_refusals(tmp_path, tiny_released):
    sd, _ = tiny_released
    # missing and unexpected keys are named
    bad = dict(sd)
    del bad["decode_head.fpn_convs.1.bn.running_var"]
    bad["decode_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConvertError, match=r"missing 1 key\(s\): decode_head\.fpn_convs\.1\."
                                           r"batch_norm\.running_var.*unexpected 1 key\(s\): "
                                           r"decode_head\.extra\.weight"):
        upernet_from_released(_save(tmp_path, bad, "bad.pth"))
    # another variant asked for: both named
    with pytest.raises(ConvertError, match="transnext_tiny, not transnext_small"):
        upernet_from_released(_save(tmp_path, sd, "t.pth"), "transnext_small")
    # another head: named
    m2f = {k: torch.zeros(1) for k in read_layout("mask2former_transnext_tiny.keys.txt")}
    with pytest.raises(ConvertError, match="is a Mask2Former checkpoint, not UperNet"):
        upernet_from_released(_save(tmp_path, m2f, "m2f.pth"))
    # a backbone tensor of the wrong shape is refused by the backbone loader
    bad = dict(sd)
    bad["backbone.block1.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(transnext.CheckpointError, match="fc1.weight"):
        upernet_from_released(_save(tmp_path, bad, "shape.pth"))
    # a corrupt file
    p = tmp_path / "corrupt.pth"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(transnext.CheckpointError, match="corrupt.pth"):
        upernet_from_released(p)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_meta_objects_are_not_unpickled(tmp_path, tiny_released):
    sd, _ = tiny_released
    _Evil.marker = tmp_path / "pwned"
    path = _save(tmp_path, sd, "meta.pth", meta={"np": np.float64(1.0), "evil": _Evil()})
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    model = upernet_from_released(path)
    assert not _Evil.marker.exists()
    assert torch.equal(model.decode_head.classifier.weight, sd["decode_head.conv_seg.weight"])
