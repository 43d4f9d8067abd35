"""DINO's training pieces against hand-built cases and plain formulas of mmdet 3.0's
behaviour (/work/dino_facts.md): the contrastive denoising queries (layout, noise,
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
