"""Mask R-CNN on TransNeXt: each mmdet-matching piece against a plain implementation
of mmdet 2.28's behaviour (tests/det_helpers.py), the RPN and RoI-head inference
pipelines end to end, and the whole model (train step, eval outputs) on
transnext_micro at small sizes."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align

import det_helpers as ref
from transnext.tasks.detection import mmdet_compat as mc
from transnext.tasks.detection.maskrcnn import (TransNeXtMaskRCNN, build_maskrcnn,
                                                no_weight_decay_names, param_groups)

SMALL = dict(img_size=96, min_size=64, max_size=128, rpn_pre_nms_top_n_test=300,
             rpn_post_nms_top_n_test=40, rpn_pre_nms_top_n_train=300,
             rpn_post_nms_top_n_train=48, box_detections_per_img=6)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return build_maskrcnn("transnext_micro", 3, **SMALL)


# ---- resize / normalise / pad -------------------------------------------------------------
@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (640, 427), (333, 1000), (800, 1333),
                                (1000, 200)])
def test_rescale_size_is_mmdets(hw):
    assert mc.mmdet_rescale_size(*hw) == ref.rescale_size(*hw)


def test_torchvision_resize_rounds_otherwise():
    # the reason for the override: 480x640 -> mmdet 800x1067, torchvision 800x1066
    assert ref.rescale_size(480, 640) == (800, 1067)
    tv = GeneralizedRCNNTransform(800, 1333, [0, 0, 0], [1, 1, 1]).eval()
    assert tuple(tv(torch.zeros(1, 3, 480, 640))[0].image_sizes[0]) == (800, 1066)
    ours = mc.MMDetTransform(800, 1333).eval()
    il, _ = ours([torch.zeros(3, 480, 640)])
    assert tuple(il.image_sizes[0]) == (800, 1067)
    assert tuple(il.tensors.shape[-2:]) == (800, 1088)  # padded to 32


def test_transform_pixels_boxes_masks():
    g = torch.Generator().manual_seed(1)
    h, w = 30, 44
    img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    masks = (torch.rand(2, h, w, generator=g) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[2.5, 3.0, 40.0, 29.0], [10.0, 0.0, 44.0, 12.0]])
    t = mc.MMDetTransform(48, 100, quantize=False).eval()
    il, tg = t([img], [dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks)])
    nh, nw = ref.rescale_size(h, w, 48, 100)
    assert tuple(il.image_sizes[0]) == (nh, nw) == (48, 70)
    assert tuple(il.tensors.shape) == (1, 3, 64, 96)
    want = ref.resize_image(img.double().numpy(), nh, nw)
    want = (want - ref.MEAN[:, None, None]) / ref.STD[:, None, None]
    got = il.tensors[0, :, :nh, :nw].double().numpy()
    assert np.abs(got - want).max() < 1e-4
    assert il.tensors[0, :, nh:].abs().max() == 0 and il.tensors[0, :, :, nw:].abs().max() == 0
    sx, sy = np.float32(nw / w), np.float32(nh / h)
    want_boxes = boxes.numpy() * np.array([sx, sy, sx, sy], dtype=np.float32)
    want_boxes[:, 0::2] = want_boxes[:, 0::2].clip(0, nw)
    want_boxes[:, 1::2] = want_boxes[:, 1::2].clip(0, nh)
    assert np.allclose(tg[0]["boxes"].numpy(), want_boxes, atol=1e-5)
    assert torch.equal(tg[0]["masks"], torch.from_numpy(ref.nearest_resize(masks.numpy(), nh, nw)))
    # quantised (mmdet resizes the uint8 image and keeps uint8); float 0-1 input likewise
    tq = mc.MMDetTransform(48, 100).eval()
    q8 = tq([img])[0].tensors[0, :, :nh, :nw].double().numpy()
    q8_255 = q8 * ref.STD[:, None, None] + ref.MEAN[:, None, None]
    assert np.abs(q8_255 - np.round(q8_255)).max() < 1e-3
    diff = np.abs(q8_255 - np.round(ref.resize_image(img.double().numpy(), nh, nw)))
    assert diff.max() < 1 + 1e-3 and np.mean(diff > 1e-3) < 0.02  # ties at .5 may round apart
    qf = tq([img.float() / 255])[0].tensors[0, :, :nh, :nw].double().numpy()
    assert np.mean(np.abs(qf - q8) > 1e-4) < 0.01


# ---- anchors --------------------------------------------------------------------------
def test_anchors_are_mmdets_and_not_torchvisions():
    pad = (224, 352)
    sizes = [(56, 88), (28, 44), (14, 22), (7, 11), (4, 6)]
    feats = [torch.zeros(1, 1, *s) for s in sizes]
    il = ImageList(torch.zeros(1, 3, *pad), [pad])
    ours = mc.MMDetAnchorGenerator()(il, feats)[0]
    want = np.concatenate(ref.grid_anchors(sizes))
    assert ours.shape == want.shape
    assert np.abs(ours.double().numpy() - want).max() < 1e-4
    tv = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)(il, feats)[0]
    assert np.abs(tv.double().numpy() - want).max() > 1.0  # rounded; P6 stride 224 // 4 = 56
    assert mc.MMDetAnchorGenerator().num_anchors_per_location() == [3] * 5


# ---- boxes ----------------------------------------------------------------------------
def test_box_decode_both_side_clamp():
    g = torch.Generator().manual_seed(2)
    rois = torch.rand(6, 2, generator=g) * 50
    rois = torch.cat([rois, rois + 5 + torch.rand(6, 2, generator=g) * 60], 1)
    deltas = torch.randn(6, 8, generator=g)
    deltas[0, 2], deltas[1, 3], deltas[2, 6] = -9.0, -12.0, 9.0
    stds = (0.1, 0.1, 0.2, 0.2)
    want = ref.delta2bbox(rois.numpy(), deltas.numpy() / 5, stds)  # small deltas
    got = mc.MMDetBoxCoder(stds).decode_single(deltas / 5, rois)
    assert np.abs(got.double().numpy() - want).max() < 1e-3
    want = ref.delta2bbox(rois.numpy(), deltas.numpy() * 10, (1, 1, 1, 1))
    got = mc.MMDetBoxCoder().decode_single(deltas * 10, rois)
    assert np.abs(got.double().numpy() - want).max() < 1e-2
    tv = BoxCoder((1, 1, 1, 1)).decode_single(deltas * 10, rois)
    assert np.abs(tv.double().numpy() - want).max() > 0.1  # no lower clamp there
    # encode inverts decode
    coder = mc.MMDetBoxCoder(stds)
    boxes = coder.decode_single(deltas[:, :4] / 5, rois)
    assert torch.allclose(coder.encode_single(boxes, rois), deltas[:, :4] / 5, atol=1e-4)


def test_matcher_is_max_iou_assigner():
    g = torch.Generator().manual_seed(3)
    ious = (torch.rand(4, 30, generator=g) * 0.9).round(decimals=2)
    ious[1] *= 0.2  # a ground truth whose best IoU is below min_pos_iou
    ious[2, 5] = ious[2, 9] = 0.95  # ties
    ious[3, 5] = 0.5  # anchor 5: best gt 2, but also gt 3's best -> gt 3 in mmdet
    ious[3] = ious[3].clamp(max=0.5)
    for pos, neg, mp in [(0.7, 0.3, 0.3), (0.5, 0.5, 0.5)]:
        got = mc.MMDetMatcher(pos, neg, mp)(ious.clone()).tolist()
        assert got == ref.assign(ious.tolist(), pos, neg, mp)


def test_batched_nms_is_per_group():
    g = torch.Generator().manual_seed(15)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 30], 1)
    scores = torch.rand(60, generator=g)
    idxs = torch.randint(0, 3, (60,), generator=g)
    want = []
    for c in range(3):
        members = [i for i in range(60) if idxs[i] == c]
        keep = ref.nms([boxes[i].tolist() for i in members], [float(scores[i]) for i in members], 0.5)
        want += [members[k] for k in keep]
    want = sorted(want, key=lambda i: -float(scores[i]))
    assert mc.batched_nms(boxes, scores, idxs, 0.5).tolist() == want  # offsets
    assert mc.batched_nms(boxes, scores, idxs, 0.5, split_thr=10).tolist() == want  # per group
    assert mc.batched_nms(boxes[:0], scores[:0], idxs[:0], 0.5).numel() == 0


# ---- RoI pooling ----------------------------------------------------------------------
def _pool_inputs():
    g = torch.Generator().manual_seed(4)
    feats = {str(i): torch.randn(2, 3, 32 // 2 ** i, 40 // 2 ** i, generator=g) for i in range(4)}
    boxes = [torch.tensor([[3.3, 4.1, 20.7, 15.2], [0.0, 0.0, 127.9, 100.3], [50.2, 60.9, 110.4, 90.1],
                           [10.0, 10.0, 122.0, 122.0], [70.5, 20.25, 72.0, 30.0]]),
             torch.tensor([[5.0, 5.0, 61.0, 61.0], [1.5, 90.0, 150.0, 127.0], [30.0, 2.0, 255.0, 120.0]])]
    return feats, boxes


def test_level_mapping_is_mmdets():
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(200, 2, generator=g) * 300
    wh = torch.exp(torch.rand(200, 2, generator=g) * 7)
    boxes = torch.cat([xy, xy + wh], 1).double()
    edge = torch.tensor([[0, 0, 112, 112], [0, 0, 111.9, 112], [0, 0, 224, 224], [0, 0, 448, 448],
                         [0, 0, 0, 10], [5, 5, 5, 5]], dtype=torch.float64)
    boxes = torch.cat([boxes, edge])
    got = mc.map_roi_levels(boxes, 4).tolist()
    assert got == [ref.level_of(b) for b in boxes.tolist()]
    assert got[-6:] == [1, 0, 2, 3, 0, 0]


def test_roi_align_is_mmcv_aligned():
    feats, boxes = _pool_inputs()
    pool = mc.MMDetRoIAlign(["0", "1", "2", "3"], 7)
    got = pool(feats, boxes, [(128, 160)] * 2).double().numpy()
    want = []
    for img, bs in enumerate(boxes):
        for b in bs.tolist():
            lv = ref.level_of(b)
            f = feats[str(lv)][img].double().numpy()
            want.append(ref.roi_align_aligned(f, b, 1 / 4 / 2 ** lv, 7))
    assert np.abs(got - np.stack(want)).max() < 1e-5
    tv = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0)(feats, boxes, [(128, 160)] * 2)
    assert np.abs(tv.double().numpy() - np.stack(want)).max() > 0.05  # unaligned


def test_mask_targets_aligned_binarised():
    g = torch.Generator().manual_seed(6)
    gt = (torch.rand(2, 20, 24, generator=g) > 0.5).to(torch.uint8)
    props = torch.tensor([[1.2, 2.5, 17.0, 19.0], [0.0, 0.0, 24.0, 20.0], [5.5, 3.0, 9.0, 8.0]])
    matched = torch.tensor([1, 0, 1])
    got = mc.mask_targets(gt, props, matched, 7)
    padded = np.zeros((2, 32, 32))  # mmdet's Pad(size_divisor=32) pads the masks too
    padded[:, :20, :24] = gt.numpy()
    for i in range(3):
        want = ref.roi_align_aligned(padded[matched[i]][None], props[i].tolist(), 1.0, 7)[0]
        assert torch.equal(got[i], torch.from_numpy(want >= 0.5).float())


def test_paste_masks_is_mmdets():
    g = torch.Generator().manual_seed(7)
    masks = torch.rand(3, 28, 28, generator=g)
    boxes = torch.tensor([[2.3, 3.7, 15.1, 17.9], [-4.0, 6.0, 30.0, 12.5], [10.0, 1.0, 10.5, 30.0]])
    got = mc.paste_masks(masks, boxes, 20, 26)
    want = np.stack([ref.paste(masks[i].double().numpy(), boxes[i].tolist(), 20, 26) for i in range(3)])
    assert got.shape == (3, 20, 26)
    assert np.abs(got.double().numpy() - want).max() < 1e-5
    tv = paste_masks_in_image(masks[:, None], boxes, (20, 26))[:, 0]
    assert np.abs(tv.double().numpy() - want).max() > 0.05
    # chunked grids give the same result
    assert torch.allclose(mc.paste_masks(masks, boxes, 20, 26, max_elements=600), got)


# ---- RPN and RoI heads at inference, end to end ------------------------------------------
def _random_features(seed, sizes, channels=256):
    g = torch.Generator().manual_seed(seed)
    names = ["0", "1", "2", "3", "pool"]
    return {n: torch.randn(2, channels, *s, generator=g) for n, s in zip(names, sizes)}


@torch.no_grad()
def test_rpn_proposals_are_mmdets(micro):
    torch.manual_seed(8)
    rpn = micro.rpn.eval()
    saved = {k: v.clone() for k, v in rpn.state_dict().items()}
    for p in rpn.head.parameters():
        p.normal_(0, 0.05)
    try:
        sizes = [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
        feats = _random_features(9, sizes)
        shapes = [(90, 120), (70, 128)]
        il = ImageList(torch.zeros(2, 3, 96, 128), shapes)
        got, _ = rpn(il, feats)
        sd = {"rpn_head.rpn_conv.weight": rpn.head.conv[0][0].weight,
              "rpn_head.rpn_conv.bias": rpn.head.conv[0][0].bias,
              "rpn_head.rpn_cls.weight": rpn.head.cls_logits.weight,
              "rpn_head.rpn_cls.bias": rpn.head.cls_logits.bias,
              "rpn_head.rpn_reg.weight": rpn.head.bbox_pred.weight,
              "rpn_head.rpn_reg.bias": rpn.head.bbox_pred.bias}
        anchors = ref.grid_anchors(sizes)
        for img, shape in enumerate(shapes):
            boxes, scores, lvls = [], [], []
            for lv, name in enumerate(feats):
                cls, reg = ref.rpn_head(feats[name][img:img + 1], sd)
                s = torch.sigmoid(cls[0]).permute(1, 2, 0).reshape(-1).double().numpy()
                d = reg[0].permute(1, 2, 0).reshape(-1, 4).double().numpy()
                order = np.argsort(-s, kind="stable")[:300]
                b = ref.delta2bbox(anchors[lv][order], d[order], (1, 1, 1, 1), max_shape=shape)
                ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
                b, s_ = b[ok], s[order][ok]
                keep = ref.nms(b.tolist(), s_.tolist(), 0.7)
                boxes += [b[i] for i in keep]
                scores += [s_[i] for i in keep]
                lvls += [lv] * len(keep)
            order = sorted(range(len(scores)), key=lambda i: -scores[i])[:40]
            want = np.stack([boxes[i] for i in order])
            assert got[img].shape == want.shape
            assert np.abs(got[img].double().numpy() - want).max() < 1e-3
    finally:
        rpn.load_state_dict(saved)


def _plain_detect(feats, proposals, shapes, originals, sd, score_thr=0.05, max_det=6):
    """mmdet 2.28's StandardRoIHead.simple_test (rescale=True) on mmdet-named weights."""
    out = []
    for img, (props, shape, orig) in enumerate(zip(proposals, shapes, originals)):
        p = props.tolist()
        lv = [ref.level_of(b) for b in p]
        rf = torch.stack([roi_align(feats[str(lv[i])][img:img + 1],
                                    torch.tensor([[0.0] + p[i]]), 7, 1 / 4 / 2 ** lv[i], 0,
                                    aligned=True)[0] for i in range(len(p))])
        scores, reg = ref.bbox_head(rf, sd)
        k = scores.shape[1] - 1
        boxes = ref.delta2bbox(props.numpy(), reg.double().numpy(), (0.1, 0.1, 0.2, 0.2),
                               max_shape=shape)
        sf = np.array([np.float32(shape[1] / orig[1]), np.float32(shape[0] / orig[0])] * 2)
        boxes = boxes.reshape(len(p), k, 4) / sf
        dets = []
        for c in range(k):
            cand = [i for i in range(len(p)) if scores[i, c] > score_thr]
            keep = ref.nms([boxes[i, c].tolist() for i in cand],
                           [float(scores[i, c]) for i in cand], 0.5)
            dets += [(float(scores[cand[j], c]), c + 1, boxes[cand[j], c]) for j in keep]
        dets = sorted(dets, key=lambda d: -d[0])[:max_det]
        res = {"scores": np.array([d[0] for d in dets]), "labels": [d[1] for d in dets],
               "boxes": np.array([d[2] for d in dets]).reshape(-1, 4)}
        mrois = res["boxes"] * sf
        masks = []
        for b, lab in zip(mrois.tolist(), res["labels"]):
            lvl = ref.level_of(b)
            mf = roi_align(feats[str(lvl)][img:img + 1], torch.tensor([[0.0] + b], dtype=torch.float32),
                           14, 1 / 4 / 2 ** lvl, 0, aligned=True)
            prob = torch.sigmoid(ref.mask_head(mf, sd)[0, lab - 1]).double().numpy()
            masks.append(ref.paste(prob, (np.array(b) / sf).tolist(), *orig))
        res["masks"] = np.array(masks)
        out.append(res)
    return out


@torch.no_grad()
def test_roi_heads_inference_is_mmdets(micro):
    heads = micro.roi_heads.eval()
    saved = {k: v.clone() for k, v in heads.state_dict().items()}
    torch.manual_seed(10)
    for p in heads.parameters():
        p.normal_(0, 0.03)
    try:
        feats = _random_features(11, [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)])
        g = torch.Generator().manual_seed(12)
        proposals = []
        for _ in range(2):
            xy = torch.rand(25, 2, generator=g) * 80
            proposals.append(torch.cat([xy, xy + 4 + torch.rand(25, 2, generator=g) * 60], 1))
        shapes, originals = [(90, 120), (80, 128)], [(60, 80), (41, 66)]
        got = heads(feats, proposals, shapes, None, originals)[0]
        tv = {f"roi_heads.{k}": v for k, v in heads.state_dict().items()}
        sd = ref.to_mmdet_heads(tv)
        want = _plain_detect(feats, proposals, shapes, originals, sd)
        for g_, w_, orig in zip(got, want, originals):
            assert len(w_["labels"]) == 6
            assert g_["labels"].tolist() == w_["labels"]
            assert np.abs(g_["scores"].double().numpy() - w_["scores"]).max() < 1e-5
            assert np.abs(g_["boxes"].double().numpy() - w_["boxes"]).max() < 1e-3
            assert tuple(g_["masks"].shape) == (6, 1, *orig)
            assert np.abs(g_["masks"][:, 0].double().numpy() - w_["masks"]).max() < 1e-4
    finally:
        heads.load_state_dict(saved)


# ---- the whole model ------------------------------------------------------------------
def test_build_settings(micro):
    assert isinstance(micro, TransNeXtMaskRCNN)
    body = micro.backbone.body
    assert body.pos_bias == "interpolate" and body.img_size == 96
    assert micro.rpn._pre_nms_top_n == dict(training=300, testing=300)
    assert micro.rpn.nms_thresh == 0.7 and micro.rpn.proposal_matcher.min_pos_iou == 0.3
    rh = micro.roi_heads
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img) == (0.05, 0.5, 6)
    assert rh.fg_bg_sampler.batch_size_per_image == 512
    assert rh.fg_bg_sampler.positive_fraction == 0.25
    assert rh.box_roi_pool.output_size == (7, 7) and rh.mask_roi_pool.output_size == (14, 14)
    assert rh.box_predictor.cls_score.out_features == 4
    assert rh.mask_predictor.mask_fcn_logits.out_channels == 4
    d = build_maskrcnn("transnext_micro", 80)
    assert d.rpn._pre_nms_top_n == dict(training=2000, testing=1000)
    assert d.rpn._post_nms_top_n == dict(training=1000, testing=1000)
    assert d.roi_heads.detections_per_img == 100
    assert d.transform.min_size == (800,) and d.transform.max_size == 1333
    assert d.backbone.body.img_size == 800 and d.backbone.body.pretrain_size == 224
    assert d.roi_heads.box_predictor.bbox_pred.out_features == 81 * 4
    dp = [m.drop_prob for m in d.backbone.body.modules() if type(m).__name__ == "DropPath"]
    assert max(dp) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        build_maskrcnn("transnext_micro", 0)


def test_train_step_and_eval_outputs(micro):
    torch.manual_seed(13)
    g = torch.Generator().manual_seed(13)
    images = [torch.rand(3, 64, 96, generator=g), (torch.rand(3, 50, 70, generator=g) * 255).to(torch.uint8)]
    m1 = torch.zeros(2, 64, 96, dtype=torch.uint8)
    m1[0, 8:40, 6:50] = 1
    m1[1, 20:30, 60:90] = 1
    m2 = torch.zeros(1, 50, 70, dtype=torch.uint8)
    m2[0, 5:45, 10:30] = 1
    targets = [dict(boxes=torch.tensor([[6.0, 8.0, 50.0, 40.0], [60.0, 20.0, 90.0, 30.0]]),
                    labels=torch.tensor([1, 3]), masks=m1),
               dict(boxes=torch.tensor([[10.0, 5.0, 30.0, 45.0]]), labels=torch.tensor([2]), masks=m2)]
    micro.train()
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                 masks=torch.zeros(0, 40, 60, dtype=torch.uint8))
    losses = micro(images + [torch.rand(3, 40, 60, generator=g)], targets + [empty])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    micro.zero_grad()
    sum(losses.values()).backward()
    for name in ("backbone.body.patch_embed1.proj.weight", "backbone.fpn.inner_blocks.0.0.weight",
                 "rpn.head.cls_logits.weight", "roi_heads.box_head.fc6.weight",
                 "roi_heads.mask_predictor.mask_fcn_logits.weight"):
        grad = dict(micro.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    bg_mask_grad = micro.roi_heads.mask_predictor.mask_fcn_logits.weight.grad[0]
    assert bg_mask_grad.abs().sum() == 0  # the background mask channel is never used
    with pytest.raises(ValueError, match="no width"):
        micro(images[:1], [dict(boxes=torch.tensor([[5.0, 5.0, 5.0, 9.0]]), labels=torch.tensor([1]),
                                masks=m1[:1])])
    with pytest.raises(ValueError, match="targets"):
        micro(images)
    micro.eval()
    with torch.no_grad():
        out = micro(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        h, w = im.shape[-2:]
        assert set(o) == {"boxes", "labels", "scores", "masks"}
        n = len(o["scores"])
        assert 0 < n <= 6
        assert o["boxes"].shape == (n, 4) and o["masks"].shape == (n, 1, h, w)
        assert o["masks"].dtype == torch.float32 and 0 <= o["masks"].min() and o["masks"].max() <= 1
        assert o["labels"].dtype == torch.int64
        assert o["labels"].min() >= 1 and o["labels"].max() <= 3
        assert (o["scores"] > 0.05).all() and (o["scores"].diff() <= 0).all()
        b = o["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()


def test_no_weight_decay_names(micro):
    names = no_weight_decay_names(micro)
    for n in ("backbone.body.block1.0.attn.query_embedding", "backbone.body.block1.0.attn.temperature",
              "backbone.body.block1.0.attn.relative_pos_bias_local",
              "backbone.body.block1.0.attn.cpb_fc1.weight", "backbone.body.block3.0.attn.cpb_fc2.bias",
              "backbone.body.block1.0.norm1.weight", "backbone.body.norm4.bias",
              "backbone.body.patch_embed2.norm.weight", "backbone.body.block2.1.attn.norm.bias"):
        assert n in names, n
    for n in ("backbone.body.block1.0.attn.q.weight", "backbone.fpn.inner_blocks.0.0.bias",
              "roi_heads.box_head.fc6.bias", "backbone.body.block1.0.attn.learnable_tokens"):
        assert n not in names, n
    with_b = no_weight_decay_names(micro, biases=True)
    assert "backbone.fpn.inner_blocks.0.0.bias" in with_b and "roi_heads.box_head.fc6.bias" in with_b
    assert "roi_heads.box_head.fc6.weight" not in with_b
    groups = param_groups(micro, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(micro.parameters()))
    assert len(groups[1]["params"]) == len(names)


def test_pretrained_backbone(tmp_path):
    import transnext
    torch.manual_seed(14)
    cls = transnext.create_model("transnext_micro", num_classes=1000)
    torch.save({"model": cls.state_dict()}, tmp_path / "in1k.pth")
    net = build_maskrcnn("transnext_micro", 2, img_size=96, pretrained_backbone=tmp_path / "in1k.pth")
    body = net.backbone.body.state_dict()
    src = cls.state_dict()
    assert all(torch.equal(body[k], src[k]) for k in body)
    with pytest.raises(transnext.CheckpointError, match="transnext_tiny"):
        build_maskrcnn("transnext_tiny", 2, img_size=96, pretrained_backbone=tmp_path / "in1k.pth")
