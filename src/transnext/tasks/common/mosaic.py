"""Fashion-MNIST mosaics: a real-pixel segmentation (and later detection) set that
builds on any machine from Debian's ``dataset-fashion-mnist``.

Each mosaic is a canvas with a few clothing items at random scales and places
(later items occlude earlier ones) on a noisy background. Every item pixel
(intensity above ``threshold``) is labelled with the item's class + 1, the
background 0. Training mosaics draw items from the train split, held-out ones
from the test split; everything follows from the seed. Each mosaic also keeps
its items' classes and boxes, the map of which item owns each pixel
(``instances``) and each item's own pixel count, for the detection task to
build on. ``max_overlap`` (off by default, which keeps the segmentation set as
it was) redraws an item's place, up to ``tries`` times, while it would hide more
than that fraction of an earlier item's pixels (the last draw stays when none fits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...data.fashion_mnist import load_fashion_mnist
from ...data.names import fashion_mnist_classes

CLASS_NAMES = ["background"] + list(fashion_mnist_classes())


@dataclass
class Mosaic:
    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) uint8, 0 = background, 1..10 = class + 1
    items: list = field(default_factory=list)  # (class 0..9, (x0, y0, x1, y1)) per item
    # (S, S) uint8: k where item k (1-based, in ``items`` order) is on top, 0 = background
    instances: np.ndarray | None = None
    item_pixels: list = field(default_factory=list)  # each item's own pixel count


def _hides_too_much(instances: np.ndarray, own: list[int], on: np.ndarray, y0: int, x0: int,
                    side: int, max_overlap: float) -> bool:
    """Would an item at (y0, x0) hide more than ``max_overlap`` of an earlier item?"""
    covered = np.bincount(instances[y0:y0 + side, x0:x0 + side][on], minlength=len(own) + 1)
    visible = np.bincount(instances.reshape(-1), minlength=len(own) + 1)
    for k in np.nonzero(covered[1:])[0] + 1:
        if (own[k - 1] - visible[k] + covered[k]) > max_overlap * own[k - 1]:
            return True
    return False


def make_mosaic(rng: np.random.Generator, images: torch.Tensor, labels: torch.Tensor,
                size: int = 64, items: tuple[int, int] = (2, 4),
                scale: tuple[float, float] = (1.0, 1.75), threshold: int = 25,
                max_overlap: float | None = None, tries: int = 20) -> Mosaic:
    bg = rng.uniform(0, 40)
    img = np.clip(bg + rng.normal(0, 6, (size, size, 3)), 0, 255)
    mask = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.uint8)
    placed, own = [], []
    for _ in range(int(rng.integers(items[0], items[1] + 1))):
        idx = int(rng.integers(len(images)))
        side = min(size, int(round(28 * rng.uniform(*scale))))
        item = images[idx].float()[None, None]
        if side != 28:
            item = F.interpolate(item, size=(side, side), mode="bilinear", align_corners=False)
        item = item[0, 0].numpy()
        y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        on = item > threshold
        if max_overlap is not None and placed:
            for _ in range(tries):
                if not _hides_too_much(instances, own, on, y0, x0, side, max_overlap):
                    break
                y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        tint = rng.uniform(0.6, 1.0, 3)
        region = img[y0:y0 + side, x0:x0 + side]
        region[on] = item[on, None] * tint
        mask[y0:y0 + side, x0:x0 + side][on] = int(labels[idx]) + 1
        ys, xs = np.nonzero(on)
        if len(ys):
            instances[y0:y0 + side, x0:x0 + side][on] = len(placed) + 1
            own.append(int(on.sum()))
            placed.append((int(labels[idx]), (x0 + int(xs.min()), y0 + int(ys.min()),
                                              x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)))
    return Mosaic(img.round().astype(np.uint8), mask, placed, instances, own)


def write_mosaic_set(out: str | Path, n_train: int = 16000, n_val: int = 500, size: int = 64,
                     seed: int = 0, data_dir: str | None = None, **kw) -> Path:
    """Write ``out/images/{train,val}/NNNNN.png``, ``out/masks/{train,val}/NNNNN.png``
    and ``out/classes.txt`` (the generic folder layout)."""
    out = Path(out)
    for split, n, source, offset in (("train", n_train, "train", 0), ("val", n_val, "test", 1)):
        images, labels = load_fashion_mnist(data_dir, source)
        rng = np.random.default_rng([seed, offset])
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            m = make_mosaic(rng, images, labels, size=size, **kw)
            Image.fromarray(m.image).save(out / "images" / split / f"{i:05d}.png")
            Image.fromarray(m.mask).save(out / "masks" / split / f"{i:05d}.png")
    (out / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return out
