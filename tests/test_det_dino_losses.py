"""DINO's training pieces against hand-built cases and plain formulas of mmdet 3.0's
behaviour (SPEC section 9, mmdet DINO): the contrastive denoising queries (layout, noise,
attention mask), the Hungarian matcher (against brute force) and the criterion."""
from __future__ import annotations

import pytest
import torch

from transnext.tasks.detection.dino_denoising import (CdnQueryGenerator, collate_dn_queries,
                                                      dn_attention_mask, dn_box_noise,
                                                      dn_noisy_labels, dn_num_groups,
                                                      inverse_sigmoid)


def _gts(counts, seed=0, num_classes=80):
    """Per image: labels (n,) and xyxy boxes normalised to [0, 1] with real extent."""
    g = torch.Generator().manual_seed(seed)
    labels, boxes = [], []
    for n in counts:
        labels.append(torch.randint(0, num_classes, (n,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.6
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        boxes.append(torch.cat([xy, xy + wh], 1))
    return labels, boxes


# ---------------------------------------------------------------- denoising queries

def test_attention_mask_literal():
    # max_gts 2, 2 groups -> 8 dn queries (two groups of 4), then 3 matching queries
    expected = torch.tensor([
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    ], dtype=torch.bool)
    mask = dn_attention_mask(2, 2, 3)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_attention_mask_three_groups_and_empty():
    # max_gts 1, 3 groups, 2 matching: groups of 2 rows each
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(dn_attention_mask(1, 3, 2), expected)
    # no dn part: only the matching queries, nothing blocked
    assert torch.equal(dn_attention_mask(0, 1, 4), torch.zeros(4, 4, dtype=torch.bool))


def test_num_groups():
    assert dn_num_groups(0, 100) == 1
    assert dn_num_groups(3, 100) == 33
    assert dn_num_groups(100, 100) == 1
    assert dn_num_groups(150, 100) == 1


def test_collate_layout():
    # counts [2, 1], 2 groups -> 4 blocks of 3 gts; rows tagged 100*block + gt
    counts, groups = [2, 1], 2
    rows = torch.tensor([[100.0 * k + i] for k in range(4) for i in range(3)])
    out = collate_dn_queries(rows, counts, groups)
    assert out.shape == (2, 8, 1)
    expected0 = [0, 1, 100, 101, 200, 201, 300, 301]          # image 0: gts 0, 1
    expected1 = [2, 0, 102, 0, 202, 0, 302, 0]                # image 1: its gt (global 2), pad 0
    assert out[0, :, 0].tolist() == expected0
    assert out[1, :, 0].tolist() == expected1
    # an image without boxes is all padding; no boxes at all -> (B, 0, D)
    out = collate_dn_queries(torch.arange(6.0)[:, None].repeat(1, 3), [0, 3], 1)
    assert out.shape == (2, 6, 3) and out[0].abs().sum() == 0
    assert out[1, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert collate_dn_queries(torch.zeros(0, 5), [0, 0, 0], 1).shape == (3, 0, 5)
    with pytest.raises(ValueError, match="rows"):
        collate_dn_queries(torch.zeros(5, 2), [2, 1], 1)


def test_label_noise():
    labels = torch.tensor([3, 7, 1])
    torch.manual_seed(0)
    noisy = dn_noisy_labels(labels, 4, 80, 1e-9)               # p < 5e-10: nothing flips
    assert noisy.tolist() == [3, 7, 1] * 8                     # group-major, 2*4 blocks
    # scale 1.0: half the labels are redrawn (uniform over the classes, so 1/C keep theirs)
    torch.manual_seed(1)
    many = torch.randint(0, 10, (2000,))
    noisy = dn_noisy_labels(many, 5, 10, 1.0)
    changed = (noisy != many.repeat(10)).float().mean().item()
    assert abs(changed - 0.5 * 0.9) < 0.02
    assert noisy.min() >= 0 and noisy.max() < 10


def test_box_noise_bounds():
    torch.manual_seed(0)
    _, boxes = _gts([40], seed=3)
    gt = boxes[0]
    groups, n = 3, gt.shape[0]
    noisy = dn_box_noise(gt, groups, 1.0)                     # not clamped
    assert noisy.shape == (2 * groups * n, 4)
    half = torch.stack([gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]] * 2, 1) / 2   # w/2,h/2,w/2,h/2
    for g in range(groups):
        pos = noisy[2 * n * g: 2 * n * g + n] - gt
        neg = noisy[2 * n * g + n: 2 * n * (g + 1)] - gt
        assert (pos.abs() < half).all()                       # within +-w/2, +-h/2
        assert (neg.abs() >= half * (1 - 1e-6)).all() and (neg.abs() < 2 * half).all()
        assert (pos > 0).any() and (pos < 0).any() and (neg > 0).any() and (neg < 0).any()
    # box_noise_scale scales the offsets
    torch.manual_seed(0)
    assert torch.allclose(dn_box_noise(gt, groups, 0.5) - gt.repeat(6, 1), (noisy - gt.repeat(6, 1)) / 2,
                          atol=1e-6)


def test_generator_layout_and_queries():
    gen = CdnQueryGenerator(num_classes=80, embed_dims=16, num_matching_queries=5,
                            label_noise_scale=1e-9, box_noise_scale=1.0, num_dn_queries=10)
    labels, boxes = _gts([3, 1], seed=4)
    torch.manual_seed(0)
    lq, bq, mask, meta = gen(labels, boxes)
    groups = 10 // 3
    ndn = 3 * 2 * groups
    assert meta == {"num_denoising_queries": ndn, "num_denoising_groups": groups}
    assert lq.shape == (2, ndn, 16) and bq.shape == (2, ndn, 4)
    assert torch.equal(mask, dn_attention_mask(3, groups, 5))
    emb = gen.label_embedding.weight
    for b, n in enumerate([3, 1]):
        for k in range(2 * groups):
            for j in range(3):
                slot = k * 3 + j
                if j < n:   # the gt's label (no label noise) and a box around the gt
                    assert torch.equal(lq[b, slot], emb[labels[b][j]])
                    box = bq[b, slot].sigmoid()
                    gt = boxes[b][j]
                    wh = gt[2:] - gt[:2]
                    centre = (gt[:2] + gt[2:]) / 2
                    spread = 1.0 if k % 2 == 0 else 2.0      # corners move < wh/2 (pos), < wh (neg)
                    assert ((box[:2] - centre).abs() <= spread * wh / 2 + 2e-3).all()
                else:       # padding
                    assert lq[b, slot].abs().sum() == 0 and bq[b, slot].abs().sum() == 0
    # positives decode to boxes overlapping their gt more than negatives do, on average
    from torchvision.ops import box_convert, box_iou
    g0 = boxes[0]
    ious_pos, ious_neg = [], []
    for k in range(2 * groups):
        dec = box_convert(bq[0, k * 3:k * 3 + 3].sigmoid(), "cxcywh", "xyxy")
        iou = box_iou(dec, g0).diag()
        (ious_pos if k % 2 == 0 else ious_neg).append(iou)
    assert torch.cat(ious_pos).mean() > torch.cat(ious_neg).mean()


def test_generator_reproducible_and_noisy():
    gen = CdnQueryGenerator(num_classes=5, embed_dims=8, num_matching_queries=4)
    labels, boxes = _gts([6, 2], seed=5, num_classes=5)
    torch.manual_seed(7)
    a = gen(labels, boxes)
    torch.manual_seed(7)
    b = gen(labels, boxes)
    c = gen(labels, boxes)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    assert a[3] == b[3]
    assert not torch.equal(a[1], c[1])
    # bbox queries are inverse sigmoids of boxes clamped to [0, 1] (eps 1e-3)
    assert a[1].abs().max() <= inverse_sigmoid(torch.tensor(1.0), 1e-3) + 1e-5


def test_generator_edge_cases():
    gen = CdnQueryGenerator(num_classes=5, embed_dims=8, num_matching_queries=4, num_dn_queries=4)
    # one image without boxes: its slots are all padding
    labels, boxes = _gts([2, 0], seed=6, num_classes=5)
    lq, bq, mask, meta = gen(labels, boxes)
    assert meta == {"num_denoising_queries": 8, "num_denoising_groups": 2}
    assert lq[1].abs().sum() == 0 and bq[1].abs().sum() == 0
    # no box in the batch: one group of zero queries, only the matching part in the mask
    labels, boxes = _gts([0, 0, 0], seed=6)
    lq, bq, mask, meta = gen(labels, boxes)
    assert lq.shape == (3, 0, 8) and bq.shape == (3, 0, 4)
    assert meta == {"num_denoising_queries": 0, "num_denoising_groups": 1}
    assert torch.equal(mask, torch.zeros(4, 4, dtype=torch.bool))
    # more gts than num_dn_queries: a single group
    labels, boxes = _gts([7], seed=6, num_classes=5)
    lq, bq, mask, meta = gen(labels, boxes)
    assert meta == {"num_denoising_queries": 14, "num_denoising_groups": 1}
    assert lq.shape == (1, 14, 8) and mask.shape == (18, 18)
    with pytest.raises(ValueError, match="image 0"):
        gen([torch.zeros(2, dtype=torch.long)], [torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="one of each per image"):
        gen([torch.zeros(2, dtype=torch.long)], [])


# ---------------------------------------------------------------- matcher and criterion

import itertools  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402

from transnext.tasks.detection.dino_loss import (DinoCriterion, batched_hungarian_match,  # noqa: E402
                                                 hungarian_match, match_cost)


def _giou(a, b):
    """Plain GIoU of two xyxy boxes (python floats)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _cxcywh_to_xyxy(b):
    return [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]


def _ref_cost(logits, boxes, labels, gt_px, img_shape, alpha=0.25, gamma=2.0):
    """mmdet's match cost, one element at a time."""
    h, w = img_shape
    cost = torch.zeros(len(logits), len(labels), dtype=torch.float64)
    for q in range(len(logits)):
        pb = boxes[q].tolist()
        pred_px = [v * s for v, s in zip(_cxcywh_to_xyxy(pb), (w, h, w, h))]
        for j in range(len(labels)):
            p = 1 / (1 + math.exp(-logits[q, labels[j]].item()))
            pos = -math.log(p + 1e-12) * alpha * (1 - p) ** gamma
            neg = -math.log(1 - p + 1e-12) * (1 - alpha) * p ** gamma
            g = gt_px[j].tolist()
            gn = [g[0] / w, g[1] / h, g[2] / w, g[3] / h]
            gc = [(gn[0] + gn[2]) / 2, (gn[1] + gn[3]) / 2, gn[2] - gn[0], gn[3] - gn[1]]
            l1 = sum(abs(a - b) for a, b in zip(pb, gc))
            cost[q, j] = 2.0 * (pos - neg) + 5.0 * l1 - 2.0 * _giou(pred_px, g)
    return cost


def _random_case(num_q, n, num_c, img_shape, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = img_shape
    logits = torch.randn(num_q, num_c, generator=g) * 2
    boxes = torch.cat([torch.rand(num_q, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(num_q, 2, generator=g) * 0.3 + 0.05], 1)
    labels = torch.randint(0, num_c, (n,), generator=g)
    xy = torch.rand(n, 2, generator=g) * 0.6
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    gt = torch.cat([xy, xy + wh], 1) * torch.tensor([w, h, w, h])
    return logits, boxes, labels, gt


@pytest.mark.parametrize("seed", range(4))
def test_match_cost_and_hungarian_against_brute_force(seed):
    img_shape = (60, 90)
    logits, boxes, labels, gt = _random_case(5, 3, 4, img_shape, seed)
    cost = match_cost(logits, boxes, labels, gt, img_shape)
    ref = _ref_cost(logits, boxes, labels, gt, img_shape)
    assert torch.allclose(cost.double(), ref, atol=1e-4)
    best = min(itertools.permutations(range(5), 3),
               key=lambda perm: sum(ref[q, j].item() for j, q in enumerate(perm)))
    rows, cols = hungarian_match(logits, boxes, labels, gt, img_shape)
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    got = {int(c): int(r) for r, c in zip(rows, cols)}
    assert [got[j] for j in range(3)] == list(best)
    # the leading dims of match_cost are layers: each slice is its own cost
    stacked = match_cost(torch.stack([logits, -logits]), torch.stack([boxes, boxes.flip(0)]),
                         labels, gt, img_shape)
    assert torch.allclose(stacked[0], cost, atol=1e-5)
    assert torch.allclose(stacked[1], match_cost(-logits, boxes.flip(0), labels, gt, img_shape),
                          atol=1e-5)


def test_hungarian_no_gt_and_batched():
    logits, boxes, labels, gt = _random_case(5, 0, 4, (50, 50), 0)
    rows, cols = hungarian_match(logits, boxes, labels, gt, (50, 50))
    assert rows.numel() == 0 and cols.numel() == 0
    # batched over 2 layers x 3 images (one without gts) = per-image matches
    shapes = [(50, 70), (64, 40), (30, 30)]
    cases = [_random_case(6, n, 4, s, 10 + i) for i, (n, s) in enumerate(zip([2, 0, 4], shapes))]
    lg = torch.stack([torch.stack([c[0] for c in cases]), torch.stack([c[0] for c in cases]) * -1])
    bx = torch.stack([torch.stack([c[1] for c in cases])] * 2)
    out = batched_hungarian_match(lg, bx, [c[2] for c in cases], [c[3] for c in cases], shapes)
    for k in range(2):
        for b, c in enumerate(cases):
            r, col = hungarian_match(lg[k, b], bx[k, b], c[2], c[3], shapes[b])
            assert np.array_equal(out[k][b][0], r.numpy()) and np.array_equal(out[k][b][1], col.numpy())
    with pytest.raises(FloatingPointError, match="NaN"):
        hungarian_match(logits * float("nan"), boxes, torch.tensor([1]), gt[:0].new_tensor([[1, 1, 9, 9]]),
                        (50, 50))


def test_criterion_hand_case():
    """One image, one gt, one layer, 2 queries, 2 classes, all logits 0: query 0's box is
    the gt (L1 and GIoU 0); the focal sum is 1 positive and 3 negative elements at p=1/2:
    0.25 * 0.25 * ln 2 + 3 * 0.75 * 0.25 * ln 2 = 0.625 ln 2, over 1 positive."""
    h, w = 40, 80
    gt = torch.tensor([[8.0, 4.0, 40.0, 24.0]])
    gt_c = [(8 + 40) / 2 / w, (4 + 24) / 2 / h, 32 / w, 20 / h]
    boxes = torch.tensor([[gt_c, [0.9, 0.9, 0.05, 0.05]]])[None]     # (L=1, B=1, Q=2, 4)
    out = {"cls": torch.zeros(1, 1, 2, 2), "boxes": boxes, "enc_cls": None, "enc_boxes": None,
           "dn_meta": None}
    losses = DinoCriterion(2)(out, [{"boxes": gt, "labels": torch.tensor([1])}], [(h, w)])
    assert list(losses) == ["loss_cls", "loss_bbox", "loss_iou"]
    assert losses["loss_cls"].item() == pytest.approx(0.625 * math.log(2), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_iou"].item() == pytest.approx(0.0, abs=1e-5)
    # a single query far from the gt: L1 = 5 * |diff|, GIoU = 2 * (1 - giou), focal
    # 0.25 * 0.25 * ln 2 (the gt class) + 0.75 * 0.25 * ln 2 (the other)
    out["boxes"], out["cls"] = boxes[:, :, 1:], torch.zeros(1, 1, 1, 2)
    losses = DinoCriterion(2)(out, [{"boxes": gt, "labels": torch.tensor([1])}], [(h, w)])
    assert losses["loss_cls"].item() == pytest.approx(0.25 * math.log(2), rel=1e-5)
    l1 = sum(abs(a - b) for a, b in zip([0.9, 0.9, 0.05, 0.05], gt_c))
    far = [v * s for v, s in zip(_cxcywh_to_xyxy([0.9, 0.9, 0.05, 0.05]), (w, h, w, h))]
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * l1, rel=1e-5)
    assert losses["loss_iou"].item() == pytest.approx(2.0 * (1 - _giou(far, gt[0].tolist())), rel=1e-5)


def _ref_focal(logits, target, alpha=0.25, gamma=2.0):
    p = logits.double().sigmoid()
    t = target.double()
    return (t * alpha * (1 - p) ** gamma * -torch.log(p)
            + (1 - t) * (1 - alpha) * p ** gamma * -torch.log(1 - p)).sum()


def _ref_giou_loss(pred_cxcywh, gt_px, img_shape):
    h, w = img_shape
    px = [v * s for v, s in zip(_cxcywh_to_xyxy(pred_cxcywh.tolist()), (w, h, w, h))]
    return 1 - _giou(px, gt_px.tolist())


def _ref_layer(cls, boxes, targets, shapes, assign, num_c):
    """mmdet's loss_by_feat_single with a given assignment [(rows, cols)] per image."""
    lc = lb = li = 0.0
    npos = 0
    for b, t in enumerate(targets):
        h, w = shapes[b]
        target = torch.zeros(cls.shape[1], num_c)
        rows, cols = assign[b]
        for q, j in zip(rows, cols):
            target[q, t["labels"][j]] = 1
            g = t["boxes"][j]
            gc = torch.tensor([(g[0] + g[2]) / 2 / w, (g[1] + g[3]) / 2 / h,
                               (g[2] - g[0]) / w, (g[3] - g[1]) / h])
            lb += (boxes[b, q] - gc).abs().sum().item()
            li += _ref_giou_loss(boxes[b, q], g, (h, w))
        npos += len(rows)
        lc += _ref_focal(cls[b], target).item()
    d = max(npos, 1)
    return lc / d, 5 * lb / d, 2 * li / d


def _dino_case(counts, num_layers=3, num_q=6, num_c=5, groups=2, seed=0, enc=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(48 + 8 * i, 64 - 4 * i) for i in range(len(counts))]
    targets = []
    for i, n in enumerate(counts):
        h, w = shapes[i]
        xy = torch.rand(n, 2, generator=g) * 0.6
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"boxes": torch.cat([xy, xy + wh], 1) * torch.tensor([w, h, w, h]),
                        "labels": torch.randint(0, num_c, (n,), generator=g)})
    max_gts = max(counts)
    ndn = max_gts * 2 * groups if max_gts else 0
    meta = {"num_denoising_queries": ndn, "num_denoising_groups": groups if max_gts else 1}
    total = ndn + num_q
    b = len(counts)
    out = {"cls": (torch.randn(num_layers, b, total, num_c, generator=g) * 2).requires_grad_(),
           "boxes": torch.cat([torch.rand(num_layers, b, total, 2, generator=g) * 0.6 + 0.2,
                               torch.rand(num_layers, b, total, 2, generator=g) * 0.3 + 0.05],
                              -1).requires_grad_(),
           "enc_cls": None, "enc_boxes": None, "dn_meta": meta}
    if enc:
        out["enc_cls"] = (torch.randn(b, num_q, num_c, generator=g) * 2).requires_grad_()
        out["enc_boxes"] = torch.cat([torch.rand(b, num_q, 2, generator=g) * 0.6 + 0.2,
                                      torch.rand(b, num_q, 2, generator=g) * 0.3 + 0.05],
                                     -1).requires_grad_()
    return out, targets, shapes


def _ref_losses(out, targets, shapes, num_c):
    meta = out["dn_meta"]
    ndn = meta["num_denoising_queries"]
    num_layers = out["cls"].shape[0]
    ref = {}
    layers = [(out["cls"][k, :, ndn:], out["boxes"][k, :, ndn:]) for k in range(num_layers)]
    names = [f"d{k}." for k in range(num_layers - 1)] + [""]
    if out["enc_cls"] is not None:
        layers.append((out["enc_cls"], out["enc_boxes"]))
        names.append("enc_")
    for (cls, boxes), pre in zip(layers, names):
        cls, boxes = cls.detach(), boxes.detach()
        assign = [tuple(x.tolist() for x in hungarian_match(cls[b], boxes[b], t["labels"], t["boxes"],
                                                            shapes[b]))
                  for b, t in enumerate(targets)]
        for name, v in zip(("cls", "bbox", "iou"), _ref_layer(cls, boxes, targets, shapes, assign, num_c)):
            ref[f"{pre}loss_{name}"] = v
    groups = meta["num_denoising_groups"]
    per_group = ndn // groups
    for k, pre in enumerate(names[:num_layers]):
        cls, boxes = out["cls"][k, :, :ndn].detach(), out["boxes"][k, :, :ndn].detach()
        assign = []
        for t in targets:
            n = len(t["labels"])
            assign.append(([g * per_group + j for g in range(groups) for j in range(n)],
                           [j for g in range(groups) for j in range(n)]))
        for name, v in zip(("cls", "bbox", "iou"), _ref_layer(cls, boxes, targets, shapes, assign, num_c)):
            ref[f"{pre}dn_loss_{name}"] = v
    return ref


EXPECTED_NAMES = ["loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", "d0.loss_bbox", "d0.loss_iou",
                  "d1.loss_cls", "d1.loss_bbox", "d1.loss_iou", "enc_loss_cls", "enc_loss_bbox",
                  "enc_loss_iou", "dn_loss_cls", "dn_loss_bbox", "dn_loss_iou", "d0.dn_loss_cls",
                  "d0.dn_loss_bbox", "d0.dn_loss_iou", "d1.dn_loss_cls", "d1.dn_loss_bbox",
                  "d1.dn_loss_iou"]


@pytest.mark.parametrize("counts", [[3, 1], [2, 0, 2]])
def test_criterion_against_reference(counts):
    out, targets, shapes = _dino_case(counts, seed=len(counts))
    losses = DinoCriterion(5)(out, targets, shapes)
    assert list(losses) == EXPECTED_NAMES
    ref = _ref_losses(out, targets, shapes, 5)
    for k, v in losses.items():
        assert v.dim() == 0
        assert v.item() == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    # the dn part really is the fixed slots: 2 groups of 2 * max_gts
    assert out["dn_meta"]["num_denoising_groups"] == 2


def test_criterion_gradients_flow():
    out, targets, shapes = _dino_case([3, 2], seed=5)
    losses = DinoCriterion(5)(out, targets, shapes)
    sum(losses.values()).backward()
    ndn = out["dn_meta"]["num_denoising_queries"]
    for key in ("cls", "boxes"):
        grad = out[key].grad
        assert torch.isfinite(grad).all()
        assert grad[:, :, :ndn].abs().sum() > 0 and grad[:, :, ndn:].abs().sum() > 0
        assert (grad.abs().flatten(2).sum(-1) > 0).all()      # every layer, every image
    assert out["enc_cls"].grad.abs().sum() > 0 and out["enc_boxes"].grad.abs().sum() > 0


def test_criterion_empty_targets_and_no_dn():
    out, targets, shapes = _dino_case([0, 0], seed=6)
    assert out["dn_meta"]["num_denoising_queries"] == 0
    losses = DinoCriterion(5)(out, targets, shapes)
    assert list(losses) == EXPECTED_NAMES
    for k, v in losses.items():
        assert torch.isfinite(v)
        if "dn_" in k or not k.endswith("cls"):
            assert v.item() == 0.0, k
    # all-background focal over the matching queries, avg factor 1
    assert losses["loss_cls"].item() == pytest.approx(_ref_focal(out["cls"][-1].detach(),
                                                                 torch.zeros(1)).item(), rel=1e-5)
    sum(losses.values()).backward()
    assert out["cls"].grad.abs().sum() > 0
    # dn_meta None (no dn part) and no encoder outputs: only the matching names
    out, targets, shapes = _dino_case([2, 1], seed=7, enc=False)
    ndn = out["dn_meta"]["num_denoising_queries"]
    out = {"cls": out["cls"][:, :, ndn:], "boxes": out["boxes"][:, :, ndn:], "dn_meta": None}
    losses = DinoCriterion(5)(out, targets, shapes)
    assert list(losses) == EXPECTED_NAMES[:9]


def test_criterion_bad_input():
    out, targets, shapes = _dino_case([2, 1], seed=8)
    crit = DinoCriterion(5)
    with pytest.raises(ValueError, match="targets"):
        crit(out, targets[:1], shapes)
    with pytest.raises(ValueError, match="class logits"):
        DinoCriterion(7)(out, targets, shapes)
    bad = [dict(targets[0], labels=torch.tensor([0, 5])), targets[1]]
    with pytest.raises(ValueError, match="0-based"):
        crit(out, bad, shapes)
    too_many = [dict(boxes=torch.tensor([[1.0, 1, 5, 5]] * 3), labels=torch.zeros(3, dtype=torch.long)),
                targets[1]]
    with pytest.raises(ValueError, match="room for 2 gts"):
        crit(out, too_many, shapes)


def _dist_worker(rank, world, port, path):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        counts = [[3, 2], [1, 0]][rank]
        out, targets, shapes = _dino_case(counts, seed=20 + rank, enc=True)
        losses = DinoCriterion(5)(out, targets, shapes)
        torch.save({k: v.detach() for k, v in losses.items()}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_criterion_averages_positives_over_ranks(tmp_path):
    """gloo, 2 ranks with 5 and 1 gts: every loss is normalised by the mean positive count
    (3 for the matching part, the mean of groups * gts for dn) instead of the rank's own."""
    from conftest import free_port
    torch.multiprocessing.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    dn_pos = []
    for rank, counts in enumerate([[3, 2], [1, 0]]):
        out, _, _ = _dino_case(counts, seed=20 + rank)
        dn_pos.append(sum(counts) * out["dn_meta"]["num_denoising_groups"])
    for rank, counts in enumerate([[3, 2], [1, 0]]):
        out, targets, shapes = _dino_case(counts, seed=20 + rank)
        local = DinoCriterion(5)(out, targets, shapes)
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in local.items():
            own, mean = (dn_pos[rank], sum(dn_pos) / 2) if "dn_" in k else (sum(counts), 3.0)
            assert got[k].item() == pytest.approx(v.item() * own / mean, rel=1e-5), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_syncs():
    """On the GPU the generator never waits for the device and the criterion waits once
    (the one copy of all layers' matching costs to the host)."""
    import warnings
    dev = torch.device("cuda")
    gen = CdnQueryGenerator(num_classes=5, embed_dims=8, num_matching_queries=6).to(dev)
    labels, boxes = _gts([3, 0, 2], seed=9, num_classes=5)
    labels, boxes = [x.to(dev) for x in labels], [x.to(dev) for x in boxes]
    out, targets, shapes = _dino_case([3, 0, 2], seed=9)
    out = {k: (v.detach().to(dev).requires_grad_() if torch.is_tensor(v) else v) for k, v in out.items()}
    targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
    crit = DinoCriterion(5)
    gen(labels, boxes), crit(out, targets, shapes)      # warm-up (allocator, pinned pool)
    torch.cuda.synchronize()

    def syncs(fn):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return [str(w.message) for w in seen if "synchroniz" in str(w.message)]

    assert syncs(lambda: gen(labels, boxes)) == []
    assert len(syncs(lambda: crit(out, targets, shapes))) == 1
