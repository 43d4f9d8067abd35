"""DETR's multi-scale training augmentation (the DINO recipe of SPEC section 9), on an
image tensor and its boxes together.

mmdet 3.0's pipeline for DINO: a horizontal flip (p 0.5), then one of two branches with
equal chance: (a) a keep-ratio resize to a short side drawn from ``scales`` (long side at
most ``max_size``); (b) a keep-ratio resize to a short side drawn from ``crop_scales``
(long side at most ``crop_max_size``), a random crop of a size drawn in ``crop_range``
for each side ("absolute_range"), then (a). Boxes are shifted and clipped into the crop;
those left without area are dropped, and crops that keep no box are allowed.

Every draw comes from (seed, epoch, index), so a sample's augmentation does not depend
on workers or on resuming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .coco import hflip
from .mmdet_compat import mmdet_rescale_size

DETR_SCALES = tuple(range(480, 801, 32))  # short sides of branch (a): 480, 512, ..., 800


def resize(image: torch.Tensor, target: dict, short: int, long: int):
    """mmdet's keep-ratio resize into (long, short): bilinear, no antialias (cv2's
    INTER_LINEAR), boxes scaled per axis by the rounded sizes."""
    h, w = image.shape[-2:]
    nh, nw = mmdet_rescale_size(h, w, short, long)
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear",
                              align_corners=False)[0]
    target = dict(target)
    s = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
    target["boxes"] = target["boxes"] * s
    return image, target


def crop(image: torch.Tensor, target: dict, top: int, left: int, ch: int, cw: int):
    """The window [top, top+ch) x [left, left+cw); boxes clipped into it, boxes with no
    area left dropped (with their per-box fields)."""
    image = image[:, top:top + ch, left:left + cw]
    b = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    b[:, 0::2] = b[:, 0::2].clamp(0, cw)
    b[:, 1::2] = b[:, 1::2].clamp(0, ch)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    n = len(keep)
    out = {}
    for k, v in target.items():
        if k == "boxes":
            out[k] = b[keep]
        elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
            out[k] = v[keep]
        else:
            out[k] = v
    return image, out


class DetrMultiScaleAug:
    """Flip, then branch (a) or (b) of the module docstring; ``__call__(image, target,
    index)`` as the detection datasets' transforms. Defaults: the DINO recipe."""

    def __init__(self, scales=DETR_SCALES, max_size: int = 1333,
                 crop_scales=(400, 500, 600), crop_max_size: int = 4200,
                 crop_range=(384, 600), flip: float = 0.5, seed: int = 0):
        if not scales or not crop_scales:
            raise ValueError("scales and crop_scales must not be empty")
        lo, hi = crop_range
        if not 0 < lo <= hi:
            raise ValueError(f"crop_range must be 0 < min <= max, got {crop_range}")
        self.scales, self.max_size = tuple(int(s) for s in scales), int(max_size)
        self.crop_scales, self.crop_max_size = tuple(int(s) for s in crop_scales), int(crop_max_size)
        self.crop_range = (int(lo), int(hi))
        self.flip, self.seed, self.epoch = flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: torch.Tensor, target: dict, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7_919_993 + index)

        def randint(lo: int, hi: int) -> int:  # lo <= x <= hi
            return int(torch.randint(lo, hi + 1, (), generator=g))

        if torch.rand((), generator=g).item() < self.flip:
            image, target = hflip(image, target)
        if torch.rand((), generator=g).item() < 0.5:
            short = self.crop_scales[randint(0, len(self.crop_scales) - 1)]
            image, target = resize(image, target, short, self.crop_max_size)
            h, w = image.shape[-2:]
            lo, hi = self.crop_range
            ch, cw = randint(min(h, lo), min(h, hi)), randint(min(w, lo), min(w, hi))
            image, target = crop(image, target, randint(0, h - ch), randint(0, w - cw), ch, cw)
        short = self.scales[randint(0, len(self.scales) - 1)]
        return resize(image, target, short, self.max_size)
