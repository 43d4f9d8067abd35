"""Segmentation data: image+mask folders (generic and ADE20K layouts), up-front
checks with one-line errors, and mmseg's training augmentation on image and mask
together (torchvision.transforms.v2 functionals).

Layouts (``--dataset``):
  folder   DIR/images/{train,val}/<name>.<jpg|png|...> with DIR/masks/{train,val}/<name>.png,
           optional DIR/classes.txt (one class name per line; mask value = line index)
  ade20k   DIR/images/{training,validation}/*.jpg, DIR/annotations/{training,validation}/*.png;
           150 classes, label 0 ignored (labels shift down by one: mmseg's reduce_zero_label)
Mask value 255 is ignored everywhere.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ...data.fashion_mnist import DataError
from ...data.folder import IMG_EXTENSIONS
from .names import ade20k_classes

log = logging.getLogger("transnext.seg")

IGNORE = 255
MEAN = (123.675, 116.28, 103.53)  # mmseg's ADE20K normalisation (ImageNet, 0-255 scale)
STD = (58.395, 57.12, 57.375)
_SPLITS = {"folder": {"train": "train", "val": "val"},
           "ade20k": {"train": "training", "val": "validation"}}
_MASK_DIR = {"folder": "masks", "ade20k": "annotations"}


@dataclass
class SegSample:
    image: Path
    mask: Path


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: corrupt or truncated ({e})") from None


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"mask {path} has mode {im.mode}: expected a single-channel "
                                f"label image (8-bit grey or palette PNG)")
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise DataError(f"mask file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read mask {path}: corrupt or truncated ({e})") from None


def class_names(root: str | Path, layout: str) -> list[str]:
    if layout == "ade20k":
        return ade20k_classes()
    f = Path(root) / "classes.txt"
    if f.is_file():
        names = [x.strip() for x in f.read_text().splitlines() if x.strip()]
        if names:
            return names
    raise DataError(f"{f} not found: the folder layout needs classes.txt (one class name per "
                    f"line, line i = mask value i)")


def list_pairs(root: str | Path, layout: str, split: str) -> list[SegSample]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory does not exist: {root}")
    sub = _SPLITS[layout][split]
    img_dir, mask_dir = root / "images" / sub, root / _MASK_DIR[layout] / sub
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"missing folder {d} (the {layout} layout: images/{sub} and "
                            f"{_MASK_DIR[layout]}/{sub})")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    if not images:
        raise DataError(f"no images in {img_dir}")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    out = []
    for p in images:
        m = masks.pop(p.stem, None)
        if m is None:
            raise DataError(f"image {p} has no mask (expected {mask_dir / (p.stem + '.png')})")
        out.append(SegSample(p, m))
    if masks:
        extra = sorted(masks)[:3]
        raise DataError(f"{len(masks)} mask(s) in {mask_dir} without an image, e.g. "
                        f"{masks[extra[0]]}")
    return out


def check_pair(s: SegSample, num_classes: int, reduce_zero_label: bool) -> None:
    """Decode both files; sizes must agree and mask values lie in the classes or be 255."""
    img = _read_image(s.image)
    mask = _read_mask(s.mask)
    if img.shape[:2] != mask.shape:
        raise DataError(f"image {s.image} is {img.shape[1]}x{img.shape[0]} but its mask "
                        f"{s.mask} is {mask.shape[1]}x{mask.shape[0]}")
    top = num_classes if reduce_zero_label else num_classes - 1  # ADE20K: 1..150 (0 = ignored)
    bad = np.unique(mask[(mask != IGNORE) & ((mask < 0) | (mask > top))])
    if bad.size:
        raise DataError(f"mask {s.mask} has values {bad[:5].tolist()} outside the classes "
                        f"0..{top} (255 = ignore)")


def shift_labels(mask: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 -> 255 (ignored), k -> k - 1."""
    out = mask - 1
    out[mask == 0] = IGNORE
    out[mask == IGNORE] = IGNORE
    return out


class SegDataset(torch.utils.data.Dataset):
    """(image uint8 CHW, label int64 HW, index) pairs; ``transform(img, mask, index)``."""

    def __init__(self, root, layout: str, split: str, transform=None, verify: bool = True,
                 num_classes: int | None = None):
        if layout not in _SPLITS:
            raise DataError(f"unknown dataset layout {layout!r}: folder or ade20k")
        self.root, self.layout, self.split = Path(root), layout, split
        if not self.root.is_dir():
            raise DataError(f"data directory does not exist: {root}")
        self.classes = class_names(root, layout)
        self.num_classes = num_classes or len(self.classes)
        self.reduce_zero_label = layout == "ade20k"
        self.samples = list_pairs(root, layout, split)
        self.transform = transform
        if verify:
            for s in self.samples:
                check_pair(s, self.num_classes, self.reduce_zero_label)

    def __len__(self):
        return len(self.samples)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        img = _read_image(s.image)
        mask = _read_mask(s.mask)
        if img.shape[:2] != mask.shape:
            check_pair(s, self.num_classes, self.reduce_zero_label)  # raises the message
        if self.reduce_zero_label:
            mask = shift_labels(mask)
        bad = (mask != IGNORE) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            raise DataError(f"mask {s.mask} has values outside the {self.num_classes} classes")
        return (torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1),
                torch.from_numpy(mask))

    def __getitem__(self, i: int):
        img, mask = self.load(i)
        if self.transform is not None:
            img, mask = self.transform(img, mask, i)
        return img, mask, i


def normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8/float CHW (0-255) -> normalised float."""
    mean = torch.tensor(MEAN, device=img.device).view(-1, 1, 1)
    std = torch.tensor(STD, device=img.device).view(-1, 1, 1)
    return (img.float() - mean) / std


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size within (long, short) = scale."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


class TrainAug:
    """mmseg's ADE20K training pipeline on image and mask together: random rescale
    (ratio 0.5-2.0 of ``scale``), random crop whose largest class covers at most
    ``cat_max_ratio``, horizontal flip, photometric distortion, normalise, pad to
    the crop (image 0, mask 255). Randomness comes from (seed, epoch, index), so
    a sample's augmentation does not depend on workers or on resuming."""

    def __init__(self, crop: int, scale: tuple[int, int], ratio=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, seed: int = 0):
        self.crop, self.scale, self.ratio = crop, scale, ratio
        self.cat_max_ratio, self.seed, self.epoch = cat_max_ratio, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, img: torch.Tensor, mask: torch.Tensor, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7_919_993 + index)
        u = lambda a=0.0, b=1.0: a + (b - a) * torch.rand((), generator=g).item()  # noqa: E731
        r = u(*self.ratio)
        h, w = rescale_size(img.shape[1], img.shape[2],
                            (int(self.scale[0] * r), int(self.scale[1] * r)))
        img = TF.resize(tv_tensors.Image(img), [h, w], antialias=False)
        mask = TF.resize(tv_tensors.Mask(mask[None]), [h, w])[0]
        # crop: up to 10 tries for one whose largest class is below cat_max_ratio
        ch, cw = min(self.crop, h), min(self.crop, w)
        for _ in range(10):
            y0 = int(torch.randint(0, h - ch + 1, (), generator=g))
            x0 = int(torch.randint(0, w - cw + 1, (), generator=g))
            m = mask[y0:y0 + ch, x0:x0 + cw]
            _, cnt = torch.unique(m[m != IGNORE], return_counts=True)
            if self.cat_max_ratio >= 1 or (len(cnt) > 1 and
                                           cnt.max().item() / cnt.sum().item() < self.cat_max_ratio):
                break
        img, mask = img[:, y0:y0 + ch, x0:x0 + cw], m
        if u() < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
        img = photometric(img, g)
        x = normalize(img)
        pad_h, pad_w = self.crop - ch, self.crop - cw
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE)
        return x.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def photometric(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion, each step with probability 0.5: brightness
    +-32, contrast x0.5-1.5 (before or after the colour steps), saturation
    x0.5-1.5, hue +-18 (of OpenCV's 180). Saturation and hue through torchvision."""
    def u(a=0.0, b=1.0):
        return a + (b - a) * torch.rand((), generator=g).item()
    x = img.float()
    if u() < 0.5:
        x = (x + u(-32, 32)).clamp(0, 255)
    contrast_first = u() < 0.5
    def contrast(x):
        return (x * u(0.5, 1.5)).clamp(0, 255) if u() < 0.5 else x
    if contrast_first:
        x = contrast(x)
    if u() < 0.5:
        x = TF.adjust_saturation(x / 255, u(0.5, 1.5)) * 255
    if u() < 0.5:
        x = TF.adjust_hue(x / 255, u(-18, 18) / 180) * 255
    if not contrast_first:
        x = contrast(x)
    return x


class EvalTransform:
    """Keep-ratio rescale to ``scale`` (None: as is), normalise; the label stays at
    the original size (predictions are resized back to it, as mmseg)."""

    def __init__(self, scale: tuple[int, int] | None = None):
        self.scale = scale

    def __call__(self, img: torch.Tensor, mask: torch.Tensor, index: int):
        if self.scale is not None:
            h, w = rescale_size(img.shape[1], img.shape[2], self.scale)
            img = TF.resize(img, [h, w], antialias=False)
        return normalize(img), mask


def collate(batch):
    """Stack when all sizes agree (training, equal-size sets), else keep lists."""
    imgs, masks, idx = zip(*batch)
    if len({tuple(i.shape) for i in imgs}) == 1 and len({tuple(m.shape) for m in masks}) == 1:
        return torch.stack(imgs), torch.stack(masks), list(idx)
    return list(imgs), list(masks), list(idx)
