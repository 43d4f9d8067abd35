"""DETR's multi-scale augmentation (DINO's training pipeline): sizes drawn from the
recipe's scales, boxes following the image through flip, resize and crop, seeded by
(seed, epoch, index)."""
from __future__ import annotations

import torch

from transnext.tasks.detection.mmdet_compat import mmdet_rescale_size
from transnext.tasks.detection.transforms import DetrMultiScaleAug, crop, resize


def _sample(h=60, w=90):
    image = torch.zeros(3, h, w)
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [50.0, 30.0, 88.0, 58.0]])
    for x0, y0, x1, y1 in boxes.long().tolist():  # each box a filled rectangle of its own value
        image[:, y0:y1, x0:x1] = 1.0
    return image, {"boxes": boxes, "labels": torch.tensor([3, 7]), "image_id": 4,
                   "area": torch.tensor([400.0, 1064.0])}


def test_resize_scales_boxes_per_axis_with_mmdets_rounding():
    image, target = _sample()
    out, t = resize(image, target, 45, 1000)
    nh, nw = mmdet_rescale_size(60, 90, 45, 1000)
    assert out.shape[-2:] == (nh, nw) == (45, 68)
    s = torch.tensor([68 / 90, 45 / 60, 68 / 90, 45 / 60])
    assert torch.allclose(t["boxes"], target["boxes"] * s)
    assert t["labels"] is target["labels"] and t["image_id"] == 4


def test_crop_clips_boxes_and_drops_those_left_empty_with_their_fields():
    image, target = _sample()
    out, t = crop(image, target, top=0, left=20, ch=40, cw=25)
    assert out.shape[-2:] == (40, 25)
    # the first box is cut to x 20..30 -> 0..10; the second lies right of the window
    assert t["boxes"].tolist() == [[0.0, 5.0, 10.0, 25.0]]
    assert t["labels"].tolist() == [3] and t["area"].tolist() == [400.0]
    assert t["image_id"] == 4
    _, none = crop(image, target, top=0, left=0, ch=4, cw=4)
    assert none["boxes"].shape == (0, 4) and none["labels"].numel() == 0


def test_sizes_come_from_the_scales_and_boxes_stay_on_their_pixels():
    aug = DetrMultiScaleAug(scales=(40, 48), max_size=80, crop_scales=(50, 60),
                            crop_max_size=300, crop_range=(20, 40), seed=5)
    seen_sizes, flips = set(), 0
    for index in range(40):
        image, target = _sample()
        out, t = aug(image, target, index)
        h, w = out.shape[-2:]
        assert min(h, w) in (40, 48) or max(h, w) == 80
        seen_sizes.add((h, w))
        b = t["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-4).all() and (b[:, 3] <= h + 1e-4).all()
        for x0, y0, x1, y1 in b.tolist():  # the box's centre pixel is still inside its rectangle
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            assert out[0, min(cy, h - 1), min(cx, w - 1)] > 0.5
        flips += int(t["boxes"].shape[0] == 2 and t["boxes"][0, 0] > t["boxes"][1, 0])
    assert len(seen_sizes) > 2 and 0 < flips < 40


def test_the_draws_depend_on_seed_epoch_and_index_only():
    aug = DetrMultiScaleAug(scales=(40, 48, 56), max_size=100, crop_scales=(50, 60),
                            crop_max_size=300, crop_range=(20, 40), seed=1)

    def run(epoch, index):
        aug.set_epoch(epoch)
        image, target = _sample()
        return aug(image, target, index)

    a, b = run(0, 3), run(0, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    others = [run(e, i)[0].shape for e, i in [(0, 4), (1, 3), (2, 3), (0, 5), (3, 9)]]
    assert any(s != a[0].shape for s in others)
