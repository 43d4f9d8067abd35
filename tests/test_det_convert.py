"""The released mmdet Mask R-CNN layout -> torchvision model: every key and shape of the
released tiny file (tests/data/released_layouts), small/base layouts derived from it,
the converted heads against a plain forward of the original heads on the original
weights, the refusals, and our safetensors format."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

import det_helpers as ref
import transnext
from seg_helpers import TINY_DIMS, random_state, read_layout
from transnext.tasks.detection.convert import (ConvertError, convert_maskrcnn_state_dict,
                                               load_converted, load_released_maskrcnn,
                                               map_keys, released_name, save_converted)
from transnext.tasks.detection.maskrcnn import build_maskrcnn

LAYOUT = "maskrcnn_transnext_tiny.keys.txt"


def layout(variant: str = "transnext_tiny") -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released Mask R-CNN file: the tiny file's, or for another variant
    its backbone (SPEC sections 1, 7) with the FPN laterals taking that variant's widths."""
    tiny = read_layout(LAYOUT)
    if variant == "transnext_tiny":
        return tiny
    dims = transnext.ARCHS[variant]["embed_dims"]
    swap = dict(zip(TINY_DIMS, dims))
    head = {k: (v[0], swap[v[1]], *v[2:]) if k.startswith("neck.lateral_convs") and k.endswith("weight")
            else v for k, v in tiny.items() if not k.startswith("backbone.")}
    with torch.device("meta"):
        bb = transnext.create_model(variant, num_classes=0).state_dict()
    return {**{f"backbone.{k}": tuple(v.shape) for k, v in bb.items()}, **head}


def zeros_state(lay: dict) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(()).expand(s) for k, s in lay.items()}


@pytest.fixture(scope="module")
def tiny_sd():
    return random_state(read_layout(LAYOUT), seed=1)


@pytest.fixture(scope="module")
def tiny_model(tiny_sd):
    return load_released_maskrcnn(tiny_sd)


def test_layout_is_complete():
    lay = read_layout(LAYOUT)
    assert len(lay) == 657
    assert sum(k.startswith("backbone.") for k in lay) == 615
    with torch.device("meta"):
        net = build_maskrcnn("transnext_tiny", 80, mmdet_init=False)
    own = net.state_dict()
    mapped, unmapped = map_keys(zeros_state(lay))
    assert unmapped == []
    assert set(mapped) == set(own)
    assert all(tuple(mapped[k].shape) == tuple(own[k].shape) for k in own)
    # the table read backwards names every model key by its released name
    assert {released_name(k) for k in own} == set(lay)


def test_converted_heads_equal_the_original_heads(tiny_sd, tiny_model):
    net = tiny_model
    sd = tiny_sd
    assert not net.training and net.transnext_config["num_classes"] == 80
    own = net.state_dict()
    for k, v in sd.items():
        if k.startswith("backbone."):
            assert torch.equal(own["backbone.body." + k[len("backbone."):]], v), k
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        feats = [torch.randn(1, c, 16 // 2 ** i, 20 // 2 ** i + 1, generator=g)
                 for i, c in enumerate(TINY_DIMS)]
        got = list(net.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        want = ref.fpn(feats, sd)
        assert len(got) == 5
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)

        x = torch.randn(1, 256, 10, 12, generator=g)
        cls, reg = net.rpn.head([x])
        wcls, wreg = ref.rpn_head(x, sd)
        assert torch.allclose(cls[0], wcls, atol=1e-5) and torch.allclose(reg[0], wreg, atol=1e-5)

        rois = torch.randn(5, 256, 7, 7, generator=g)
        logits, deltas = net.roi_heads.box_predictor(net.roi_heads.box_head(rois))
        scores = torch.softmax(logits, -1)
        wscores, wdeltas = ref.bbox_head(rois, sd)
        assert scores.shape == (5, 81) and deltas.shape == (5, 324)
        assert torch.allclose(scores[:, 1:], wscores[:, :80], atol=1e-6)  # classes 1..80
        assert torch.allclose(scores[:, 0], wscores[:, 80], atol=1e-6)  # background
        assert torch.allclose(deltas[:, 4:], wdeltas, atol=1e-5)
        assert deltas[:, :4].abs().max() == 0  # the unused background slot

        mrois = torch.randn(3, 256, 14, 14, generator=g)
        mlog = net.roi_heads.mask_predictor(net.roi_heads.mask_head(mrois))
        wmlog = ref.mask_head(mrois, sd)
        assert mlog.shape == (3, 81, 28, 28)
        assert torch.allclose(mlog[:, 1:], wmlog, atol=1e-4)
        assert mlog[:, 0].abs().max() == 0


@pytest.mark.filterwarnings("ignore:.*meta parameter")
@pytest.mark.parametrize("variant", ["transnext_small", "transnext_base"])
def test_small_and_base_layouts(variant):
    lay = layout(variant)
    sd = zeros_state(lay)
    conv = convert_maskrcnn_state_dict(sd, variant)
    with torch.device("meta"):
        net = build_maskrcnn(variant, 80, mmdet_init=False)
        load_released_maskrcnn(sd, net)  # strict: every key, every shape
    assert set(conv) == set(net.state_dict())
    with pytest.raises(ConvertError, match=rf"{variant}.*not transnext_tiny"):
        load_released_maskrcnn(sd, "transnext_tiny")


def test_refusals_name_what_is_wrong(tmp_path, tiny_sd, tiny_model):
    sd = dict(tiny_sd)
    del sd["roi_head.mask_head.conv_logits.bias"]
    with pytest.raises(ConvertError, match=r"missing 1 key.*roi_head\.mask_head\.conv_logits\.bias"):
        load_released_maskrcnn(sd, tiny_model)
    sd = dict(tiny_sd)
    sd["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(3)
    sd["neck.lateral_convs.4.conv.weight"] = torch.zeros(3)
    with pytest.raises(ConvertError, match=r"unexpected 2 key.*fc_extra.*lateral_convs\.4"):
        load_released_maskrcnn(sd, tiny_model)
    with pytest.raises(ConvertError, match="does not know.*fc_extra"):
        convert_maskrcnn_state_dict(sd)
    sd = dict(tiny_sd)
    sd["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(91, 1024)
    sd["roi_head.bbox_head.fc_cls.bias"] = torch.zeros(91)
    with pytest.raises(ConvertError, match=r"other shapes.*fc_cls"):
        load_released_maskrcnn(sd, tiny_model)
    with pytest.raises(ConvertError, match="transnext_tiny, not transnext_small"):
        load_released_maskrcnn(tiny_sd, "transnext_small")
    with pytest.raises(ConvertError, match="transnext_tiny, not transnext_base"):
        convert_maskrcnn_state_dict(tiny_sd, "transnext_base")
    small = zeros_state(layout("transnext_small"))
    with pytest.raises(ConvertError, match="transnext_small, not transnext_tiny"):
        load_released_maskrcnn(small, tiny_model)
    dino = zeros_state(read_layout("dino_transnext_tiny.keys.txt"))
    torch.save({"state_dict": dino, "meta": {}}, tmp_path / "dino_4scale_transnext_tiny_12e_in1k.pth")
    with pytest.raises(ConvertError, match="DINO checkpoint, not Mask R-CNN"):
        load_released_maskrcnn(tmp_path / "dino_4scale_transnext_tiny_12e_in1k.pth")
    upernet = zeros_state(read_layout("upernet_transnext_tiny.keys.txt"))
    with pytest.raises(ConvertError, match="UperNet checkpoint, not Mask R-CNN"):
        load_released_maskrcnn({"state_dict": upernet})
    cls = transnext.create_model("transnext_micro").state_dict()
    with pytest.raises(ConvertError, match="classification.*not a released Mask R-CNN"):
        load_released_maskrcnn(cls)


class _Touch:
    """Pickles as a call of open(path, "w"): code that a safe reader must not run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_files_read_safely(tmp_path, tiny_sd):
    marker = tmp_path / "code_ran"
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(transnext.CheckpointError, match="list"):
        load_released_maskrcnn(tmp_path / "list.pth")
    torch.save(_Touch(marker), tmp_path / "code.pth")
    with pytest.raises(transnext.CheckpointError, match="refusing.*asks for"):
        load_released_maskrcnn(tmp_path / "code.pth")
    assert not marker.exists()
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(transnext.CheckpointError, match="not a checkpoint"):
        load_released_maskrcnn(tmp_path / "text.pth")
    # a released file whose meta holds objects weights_only refuses: tensors read, no code run
    path = tmp_path / "mask_rcnn_transnext_tiny_fpn_1x_coco_in1k.pth"
    names = tuple(f"class{i}" for i in range(80))
    torch.save({"state_dict": tiny_sd, "meta": {"hook": _Touch(marker), "epoch": 12,
                                                "CLASSES": names}}, path)
    net = load_released_maskrcnn(path)
    assert not marker.exists()
    assert net.class_names == list(names)
    own = net.state_dict()
    w = tiny_sd["roi_head.bbox_head.fc_cls.weight"]
    assert torch.equal(own["roi_heads.box_predictor.cls_score.weight"], torch.cat([w[80:], w[:80]]))
    assert torch.equal(own["backbone.body.block3.14.mlp.fc2.weight"],
                       tiny_sd["backbone.block3.14.mlp.fc2.weight"])


def test_save_and_load_converted(tmp_path):
    torch.manual_seed(3)
    kw = dict(img_size=96, min_size=64, max_size=96, rpn_post_nms_top_n_test=20,
              box_detections_per_img=4)
    net = build_maskrcnn("transnext_micro", 3, **kw).eval()
    names = ["cat", "dog", "fish"]
    wpath, cpath = save_converted(net, tmp_path / "det.safetensors", class_names=names)
    cfg = json.loads(cpath.read_text())
    assert cfg["model"] == "transnext_micro" and cfg["num_classes"] == 3
    assert cfg["img_size"] == 96 and cfg["pos_bias"] == "interpolate" and cfg["class_names"] == names
    back = load_converted(wpath, **{k: v for k, v in kw.items() if k != "img_size"})
    assert back.class_names == names and back.backbone.body.img_size == 96
    a, b = net.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    img = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        oa, ob = net([img])[0], back([img])[0]
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    cpath.unlink()  # the config also rides in the safetensors metadata
    assert load_converted(wpath, **kw).class_names == names
    # a state dict: variant and class count read off the shapes; a mismatch refused
    save_converted(net.state_dict(), tmp_path / "sd.safetensors")
    assert json.loads((tmp_path / "sd.json").read_text())["num_classes"] == 3
    with pytest.raises(ConvertError, match="transnext_micro, not transnext_tiny"):
        save_converted(net.state_dict(), tmp_path / "x.safetensors", variant="transnext_tiny")
    with pytest.raises(ConvertError, match="3 classes, not 80"):
        save_converted(net.state_dict(), tmp_path / "x.safetensors", num_classes=80)
    with pytest.raises(ConvertError, match="converted"):
        load_released_maskrcnn(wpath)
    sd = dict(net.state_dict())
    del sd["rpn.head.bbox_pred.bias"]
    save_converted(sd, tmp_path / "broken.safetensors")
    with pytest.raises(ConvertError, match=r"missing 1 key.*rpn\.head\.bbox_pred\.bias"):
        load_converted(tmp_path / "broken.safetensors")
