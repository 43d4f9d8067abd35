"""DINO on TransNeXt: the released mmdet 3.0 layout (every key and shape of the tiny
4-scale file; 5-scale, small and base derived from SPEC) loaded strictly, the
converter's refusals and safetensors format, and the model's eval/train forwards on
small backbones and images (4- and 5-scale, padding, bf16 autocast, another backbone)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import transnext
from seg_helpers import read_layout, random_state
from transnext.cli import main
from transnext.tasks.detection.convert import load_converted, load_released_maskrcnn
from transnext.tasks.detection.convert_dino import (
    ConvertError, load_converted_dino, load_released_dino, map_dino_keys, released_dino_name,
    save_converted_dino)
from transnext.tasks.detection.dino import build_dino, param_groups

LAYOUT = "dino_transnext_tiny.keys.txt"
# a small DINO for forward passes: micro backbone, 64-wide head, few layers and queries
SMALL = dict(img_size=64, min_size=64, max_size=96, num_queries=30, detections=40,
             embed_dims=64, ffn_dims=96, num_heads=8, enc_layers=2, dec_layers=2,
             num_dn_queries=12)


def dino_layout(variant: str = "transnext_tiny", levels: int = 4) -> dict[str, tuple]:
    """Key -> shape of a released DINO file from SPEC alone: the variant's backbone
    (section 7), the neck on its stage widths (stages 2-4 or 1-4, the extra conv on the
    last), level-dependent rows of level_embed and the deformable attentions (8 heads,
    4 points); the rest as the tiny file's head."""
    dims = transnext.ARCHS[variant]["embed_dims"]
    ins = dims[1:] if levels == 4 else dims
    with torch.device("meta"):
        bb = transnext.create_model(variant, num_classes=0).state_dict()
    out = {f"backbone.{k}": tuple(v.shape) for k, v in bb.items()}
    for i, c in enumerate(ins):
        out[f"neck.convs.{i}.conv.weight"] = (256, c, 1, 1)
        out[f"neck.convs.{i}.gn.weight"] = out[f"neck.convs.{i}.gn.bias"] = (256,)
    out["neck.extra_convs.0.conv.weight"] = (256, dims[-1], 3, 3)
    out["neck.extra_convs.0.gn.weight"] = out["neck.extra_convs.0.gn.bias"] = (256,)
    for k, v in read_layout(LAYOUT).items():
        if k.startswith(("backbone.", "neck.")):
            continue
        if k == "level_embed":
            v = (levels, 256)
        elif ".sampling_offsets." in k:
            v = (8 * levels * 4 * 2, *v[1:])
        elif ".attention_weights." in k:
            v = (8 * levels * 4, *v[1:])
        out[k] = v
    return out


def zeros_state(lay: dict) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(()).expand(s) for k, s in lay.items()}


def small_dino(levels: int = 4, num_classes: int = 5, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_dino("transnext_micro", num_classes, num_levels=levels, **{**SMALL, **kw})


def released_state(net) -> dict[str, torch.Tensor]:
    """A model's weights under the released (mmdet) names."""
    return {released_dino_name(k): v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_sd():
    return random_state(read_layout(LAYOUT), seed=1)


def test_layout_from_spec_is_the_released_file():
    lay = read_layout(LAYOUT)
    assert len(lay) == 924 and sum(k.startswith("backbone.") for k in lay) == 615
    assert dino_layout("transnext_tiny", 4) == lay


def test_released_tiny_loads_strictly(tiny_sd):
    net = build_dino("transnext_tiny", 80, num_levels=4, init=False)
    own = net.state_dict()
    mapped, unmapped = map_dino_keys(tiny_sd)
    assert unmapped == [] and set(mapped) == set(own)
    assert {released_dino_name(k) for k in own} == set(tiny_sd)
    assert load_released_dino(tiny_sd, net) is net and not net.training
    own = net.state_dict()
    for k, v in tiny_sd.items():  # every tensor lands where the table says
        assert torch.equal(own[map_name(k)], v), k
    assert torch.equal(own["decoder.layers.3.self_attn.in_proj_weight"],
                       tiny_sd["decoder.layers.3.self_attn.attn.in_proj_weight"])
    assert torch.equal(own["encoder.layers.5.ffn.fc2.bias"],
                       tiny_sd["encoder.layers.5.ffn.layers.1.bias"])
    assert torch.equal(own["backbone.block3.14.mlp.fc2.weight"],
                       tiny_sd["backbone.block3.14.mlp.fc2.weight"])


def map_name(released: str) -> str:
    mapped, _ = map_dino_keys({released: torch.zeros(())})
    return next(iter(mapped))


@pytest.mark.filterwarnings("ignore:.*meta parameter")
@pytest.mark.parametrize("variant,levels", [("transnext_tiny", 5), ("transnext_small", 4),
                                            ("transnext_small", 5), ("transnext_base", 4),
                                            ("transnext_base", 5)])
def test_other_variants_and_levels(variant, levels):
    sd = zeros_state(dino_layout(variant, levels))
    with torch.device("meta"):
        net = build_dino(variant, 80, num_levels=levels, init=False)
        load_released_dino(sd, net)  # strict: every key, every shape
        built = load_released_dino(sd)  # the file's own variant and levels
    assert built.transnext_config["model"] == variant and built.num_levels == levels
    assert built.neck.extra_convs[0].conv.in_channels == transnext.ARCHS[variant]["embed_dims"][-1]
    other = 4 if levels == 5 else 5
    with pytest.raises(ConvertError, match=rf"dino-{levels}scale \({levels} levels\), not "
                                           rf"dino-{other}scale"):
        load_released_dino(sd, num_levels=other)


def test_refusals_name_both_sides(tiny_sd):
    with torch.device("meta"):
        tiny = build_dino("transnext_tiny", 80, num_levels=4, init=False)
        tiny5 = build_dino("transnext_tiny", 80, num_levels=5, init=False)
        sd = dict(tiny_sd)
        del sd["decoder.layers.2.self_attn.attn.out_proj.bias"]
        with pytest.raises(ConvertError, match=r"missing 1 key.*decoder\.layers\.2\.self_attn"
                                               r"\.attn\.out_proj\.bias"):
            load_released_dino(sd, tiny)
        sd = dict(tiny_sd)
        sd["bbox_head.cls_branches.7.weight"] = torch.zeros(80, 256)
        sd["decoder.layers.0.ffn.layers.2.weight"] = torch.zeros(3)
        with pytest.raises(ConvertError, match=r"unexpected 2 key") as e:
            load_released_dino(sd, tiny)
        assert "bbox_head.cls_branches.7.weight" in str(e.value)
        assert "decoder.layers.0.ffn.layers.2.weight" in str(e.value)
        sd = {k: v for k, v in tiny_sd.items() if "cls_branches" not in k}
        for i in range(7):
            sd[f"bbox_head.cls_branches.{i}.weight"] = torch.zeros(91, 256)
            sd[f"bbox_head.cls_branches.{i}.bias"] = torch.zeros(91)
        with pytest.raises(ConvertError, match=r"other shapes.*cls_branches"):
            load_released_dino(sd, tiny)
        # another variant, either way round
        with pytest.raises(ConvertError, match="DINO on transnext_tiny, not transnext_small"):
            load_released_dino(tiny_sd, "transnext_small")
        small = zeros_state(dino_layout("transnext_small", 4))
        with pytest.raises(ConvertError, match="DINO on transnext_small, not transnext_tiny"):
            load_released_dino(small, tiny)
        # 4 vs 5 levels, either way round
        with pytest.raises(ConvertError, match=r"dino-4scale \(4 levels\), not dino-5scale"):
            load_released_dino(tiny_sd, tiny5)
        with pytest.raises(ConvertError, match=r"dino-5scale \(5 levels\), not dino-4scale"):
            load_released_dino(zeros_state(dino_layout("transnext_tiny", 5)), tiny)
    # other heads, both loaders
    maskrcnn = zeros_state(read_layout("maskrcnn_transnext_tiny.keys.txt"))
    with pytest.raises(ConvertError, match="Mask R-CNN checkpoint, not DINO"):
        load_released_dino({"state_dict": maskrcnn})
    with pytest.raises(ConvertError, match="DINO checkpoint, not Mask R-CNN"):
        load_released_maskrcnn({"state_dict": tiny_sd})
    upernet = zeros_state(read_layout("upernet_transnext_tiny.keys.txt"))
    with pytest.raises(ConvertError, match="UperNet checkpoint, not DINO"):
        load_released_dino(upernet)
    cls = transnext.create_model("transnext_micro").state_dict()
    with pytest.raises(ConvertError, match="classification.*not a released DINO"):
        load_released_dino(cls)
    net = small_dino()
    with pytest.raises(ConvertError, match="a converted DINO.*not a released one"):
        load_released_dino(net.state_dict())


class _Touch:
    """Pickles as a call of open(path, "w"): code that a safe reader must not run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_meta_objects_then_cli_round_trip(tmp_path, capsys):
    net = small_dino(num_classes=3).eval()
    sd = released_state(net)
    names = ["cat", "dog", "fish"]
    marker = tmp_path / "code_ran"
    src = tmp_path / "dino_4scale_transnext_micro_12e_in1k.pth"
    torch.save({"state_dict": sd, "meta": {"hook": _Touch(marker), "epoch": 12,
                                           "dataset_meta": {"classes": tuple(names)}}}, src)
    back = load_released_dino(src, **{k: SMALL[k] for k in ("img_size", "min_size", "max_size",
                                                             "detections")})
    assert not marker.exists()  # tensors read, nothing run
    assert back.class_names == names and back.num_queries == SMALL["num_queries"]
    a, b = net.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    dst = tmp_path / "out" / "dino-micro.safetensors"
    assert main(["det", "convert", str(src), str(dst)]) == 0
    assert "dino-4scale on transnext_micro, 3 classes, class names" in capsys.readouterr().out
    assert not marker.exists()
    cfg = json.loads(dst.with_suffix(".json").read_text())
    assert cfg["arch"] == "dino-4scale" and cfg["num_levels"] == 4 and cfg["class_names"] == names
    assert cfg["embed_dims"] == 64 and cfg["num_queries"] == 30
    conv = load_converted_dino(dst, min_size=64, max_size=96, img_size=64, detections=40)
    c = conv.state_dict()
    assert set(c) == set(a) and all(torch.equal(a[k], c[k]) for k in a)
    img = torch.rand(3, 50, 77, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        oa, oc = net([img])[0], conv([img])[0]
    assert all(torch.equal(oa[k], oc[k]) for k in oa)
    with pytest.raises(ConvertError, match="converted dino-4scale, not Mask R-CNN"):
        load_converted(dst)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        save_converted_dino(conv, tmp_path / "x.safetensors", class_names=["a", "b"])
    dst.with_suffix(".json").unlink()  # the config also rides in the safetensors metadata
    assert load_converted_dino(dst, img_size=64).class_names == names
    # our own files are not released ones, and a file of another head is refused in one line
    with pytest.raises(ConvertError, match="converted"):
        load_released_dino(dst)
    torch.save({"state_dict": zeros_state(read_layout("upernet_transnext_tiny.keys.txt"))},
               tmp_path / "upernet.pth")
    assert main(["det", "convert", str(tmp_path / "upernet.pth"), str(tmp_path / "x.st")]) == 2
    assert "UperNet checkpoint, not Mask R-CNN" in capsys.readouterr().err


def _check_detections(outs, images, net):
    K = net.num_classes
    for o, im in zip(outs, images):
        h, w = im.shape[-2:]
        n = o["boxes"].shape[0]
        assert 0 < n <= net.detections and o["labels"].shape == o["scores"].shape == (n,)
        b = o["boxes"]
        assert torch.isfinite(b).all() and (b >= 0).all()
        assert (b[:, 0::2] <= w + 1e-3).all() and (b[:, 1::2] <= h + 1e-3).all()
        assert (b[:, 2:] >= b[:, :2]).all()
        assert o["labels"].min() >= 1 and o["labels"].max() <= K
        assert (o["scores"][:-1] >= o["scores"][1:]).all() and (o["scores"] <= 1).all()


@pytest.mark.parametrize("levels", [4, 5])
def test_eval_two_odd_sizes_in_one_batch(levels):
    net = small_dino(levels).eval()
    images = [torch.rand(3, 50, 77), (torch.rand(3, 97, 61) * 255).to(torch.uint8)]
    with torch.no_grad():
        outs = net(images)
        _check_detections(outs, images, net)
        # the head on its own: the padded batch, per-image shapes, no denoising part
        x, shapes = net.preprocess(images, resize=True)
        assert shapes == [(62, 96), (96, 60)] and tuple(x.shape[-2:]) == (96, 96)
        assert (x[0, :, 62:] == 0).all() and (x[1, :, :, 60:] == 0).all()
        out = net.head_forward(net.backbone_maps(x), shapes, x.shape[-2:])
    assert out["cls"].shape == (2, 2, 30, 5) and out["boxes"].shape == (2, 2, 30, 4)
    assert out["enc_cls"].shape == (2, 30, 5) and out["dn_meta"] is None
    assert out["cls"].dtype == out["boxes"].dtype == torch.float32
    # any float dtype: float64 (as a reference comparison runs it) agrees with float32
    with torch.no_grad():
        out64 = net.double().head_forward([f.double() for f in net.backbone_maps(x.double())],
                                          shapes, x.shape[-2:])
    assert out64["boxes"].dtype == torch.float64
    assert torch.allclose(out64["boxes"].float(), out["boxes"], atol=1e-4)
    net.float()
    # fewer (query, class) pairs than detections: all of them, 30 queries x 5 classes
    net.detections = 300
    with torch.no_grad():
        assert net([images[0]])[0]["boxes"].shape[0] == 30 * 5


def test_more_queries_than_tokens_is_refused():
    net = small_dino(num_queries=300).eval()
    with pytest.raises(ValueError, match=r"num_queries 300 exceeds the 128 encoder tokens"):
        with torch.no_grad():
            net([torch.rand(3, 50, 77)])


def _targets():
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0], [30.0, 2.0, 70.0, 50.0],
                                    [0.0, 0.0, 12.0, 9.0]]), "labels": torch.tensor([1, 5, 3])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
            {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([2])}]


LOSS_NAMES = {f"{p}{n}" for p in ("", "d0.", "enc_", "dn_", "d0.dn_")
              for n in ("loss_cls", "loss_bbox", "loss_iou")}


@pytest.mark.parametrize("levels", [4, 5])
def test_train_losses_and_every_parameter_learns(levels):
    net = small_dino(levels).train()
    with torch.no_grad():  # the zero-initialised layers (last box layers, deformable offsets
        for p in net.parameters():  # and weights) would stop the gradient before them
            p.add_(torch.randn_like(p) * 0.01)
    images = [torch.rand(3, 64, 80), torch.rand(3, 56, 96), torch.rand(3, 60, 70)]
    losses = net(images, _targets())
    assert set(losses) == LOSS_NAMES
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    none = [n for n, p in net.named_parameters() if p.grad is None]
    assert none == []
    zero = [n for n, p in net.named_parameters() if not p.grad.abs().sum() > 0]
    assert zero == []


def test_train_without_any_box_keeps_every_parameter_in_the_graph():
    net = small_dino().train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = net([torch.rand(3, 64, 80), torch.rand(3, 48, 64)], [empty, dict(empty)])
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["dn_loss_cls"].detach()) == 0.0
    sum(losses.values()).backward()
    assert net.dn_query_generator.label_embedding.weight.grad is not None


def test_bad_targets_are_named():
    net = small_dino().train()
    t = _targets()
    t[0]["labels"] = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"target 0: labels must be 1\.\.5"):
        net([torch.rand(3, 64, 80)] * 3, t)
    with pytest.raises(ValueError, match="2 targets for 3 images"):
        net([torch.rand(3, 64, 80)] * 3, _targets()[:2])


def test_bf16_autocast_on_cpu():
    net = small_dino().train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 56, 96), torch.rand(3, 60, 70)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = net(images, _targets())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = net(images[:2])
    assert outs[0]["boxes"].dtype == torch.float32
    _check_detections(outs, images[:2], net)


def test_init_as_mmdet():
    net = small_dino()
    head = net.bbox_head
    prior = -math.log(0.99 / 0.01)
    for c in head.cls_branches:
        assert torch.allclose(c.bias, torch.full_like(c.bias, prior))
        assert torch.equal(c.weight, head.cls_branches[0].weight)  # copies of one branch
    for r in head.reg_branches:
        assert r[-1].weight.abs().sum() == 0 and r[-1].bias.abs().sum() == 0
        assert torch.equal(r[0].weight, head.reg_branches[0][0].weight)
    assert net.level_embed.std() > 0.5  # normal(0, 1)
    att = net.encoder.layers[0].self_attn
    assert att.sampling_offsets.weight.abs().sum() == 0 and att.attention_weights.weight.abs().sum() == 0
    w = net.decoder.layers[1].ffn.fc1.weight  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / sum(w.shape)) and w.abs().max() > 0.8 * math.sqrt(6 / sum(w.shape))


def test_param_groups_as_the_released_config():
    net = small_dino()
    groups = param_groups(net, lr=1e-4, weight_decay=0.05)
    where = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(where) == sum(1 for _ in net.parameters())
    named = dict(net.named_parameters())

    def of(name):
        return where[id(named[name])]
    assert of("backbone.block1.0.mlp.fc1.weight") == (pytest.approx(1e-5), 0.05)
    assert of("backbone.block1.0.mlp.fc1.bias") == (pytest.approx(1e-5), 0.0)
    assert of("backbone.block1.0.attn.relative_pos_bias_local") == (pytest.approx(1e-5), 0.0)
    assert of("backbone.block2.0.attn.cpb_fc1.weight") == (pytest.approx(1e-5), 0.0)
    assert of("backbone.block1.0.attn.learnable_tokens") == (pytest.approx(1e-5), 0.05)
    # the released custom_keys cover patch_embed1-3 / norm1-3 only: stage 4's at full lr
    assert of("backbone.patch_embed4.proj.weight") == (1e-4, 0.05)
    assert of("backbone.norm4.weight") == (1e-4, 0.0)
    assert of("level_embed") == (1e-4, 0.05) and of("query_embedding.weight") == (1e-4, 0.05)
    assert of("decoder.layers.0.self_attn.in_proj_bias") == (1e-4, 0.0)
    assert of("neck.convs.0.gn.weight") == (1e-4, 0.0)
    plain = param_groups(net, lr=1e-4, released=False)
    where = {id(p): g["lr"] for g in plain for p in g["params"]}
    assert where[id(named["backbone.norm4.weight"])] == pytest.approx(1e-5)
    assert all(g["initial_lr"] == g["lr"] for g in plain)


def test_another_backbone_under_the_same_detector():
    import timm
    body = timm.create_model("convnext_atto", pretrained=False, features_only=True,
                             out_indices=(1, 2, 3))
    torch.manual_seed(0)
    net = build_dino(backbone=body, num_classes=4, num_levels=4, **SMALL)
    assert net.neck.convs[0].conv.in_channels == body.feature_info.channels()[0]
    assert net.transnext_config["custom_backbone"]
    images = [torch.rand(3, 64, 80), torch.rand(3, 56, 96), torch.rand(3, 60, 70)]
    t = [{**d, "labels": d["labels"].clamp(max=4)} for d in _targets()]
    losses = net.train()(images, t)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in net.parameters())
    groups = param_groups(net, lr=1e-4)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert all(lr[id(p)] == pytest.approx(1e-5) for p in body.parameters())
    with torch.no_grad():
        _check_detections(net.eval()(images[:2]), images[:2], net)
    with pytest.raises(ConvertError, match="custom backbone"):
        load_released_dino(zeros_state(read_layout(LAYOUT)), net)
    with pytest.raises(ConvertError, match="TransNeXt DINO built by build_dino"):
        save_converted_dino(net, "unused.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_fused_deformable_attention_matches_the_reference_in_a_train_step(amp):
    """The whole DINO training step on the GPU with the fused Triton deformable attention
    against the same step with the PyTorch reference (same weights, same denoising draws):
    losses and gradients agree (fp32 tight; bf16 autocast within bf16 error)."""
    import copy
    from transnext.ops.msda import MultiScaleDeformableAttention
    torch.manual_seed(0)
    base = build_dino("transnext_micro", 10, num_levels=4, img_size=None,
                      pos_bias="extrapolate", pretrain_size=224, num_queries=200,
                      num_dn_queries=20, embed_dims=128, ffn_dims=256, enc_layers=2,
                      dec_layers=2).cuda().train()
    with torch.no_grad():  # move the zero-initialised offsets and box layers off zero
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 200, 264, generator=gen).cuda(),
              torch.rand(3, 176, 240, generator=gen).cuda()]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0], [100.0, 30.0, 250.0, 190.0]]).cuda(),
                "labels": torch.tensor([3, 7]).cuda()},
               {"boxes": torch.tensor([[40.0, 40.0, 200.0, 150.0]]).cuda(),
                "labels": torch.tensor([1]).cuda()}]

    def step(backend, autocast):
        net = copy.deepcopy(base)
        for m in net.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.backend = backend
        torch.manual_seed(5)  # the same denoising noise for every run
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            losses = net(images, targets)
        sum(losses.values()).backward()
        return ({k: v.item() for k, v in losses.items()},
                {n: p.grad.float() for n, p in net.named_parameters()
                 if p.grad is not None and not n.startswith("backbone.")})

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()

    lr, gr = step("reference", False)
    if not amp:  # fp32: the fused op equals the reference up to summation order
        lt, gt = step("triton", False)
        for k in lr:
            assert lt[k] == pytest.approx(lr[k], rel=1e-4, abs=1e-4), k
        for n in gr:
            assert rel(gt[n], gr[n]) < 1e-3, n
        return
    # bf16: the fused op is no further from the fp32 step than the reference op in bf16
    # (some gradients, e.g. level_embed's sum over every token, cancel heavily in bf16)
    lt, gt = step("triton", True)
    lb, gb = step("reference", True)
    for k in lr:
        assert abs(lt[k] - lr[k]) <= 2 * abs(lb[k] - lr[k]) + 2e-2 * abs(lr[k]) + 1e-3, k
    for n in gr:
        assert rel(gt[n], gr[n]) <= 2 * rel(gb[n], gr[n]) + 2e-2, n
