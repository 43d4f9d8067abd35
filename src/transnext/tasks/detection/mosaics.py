"""Fashion-MNIST instance mosaics in COCO's own layout, so one code path reads
them and COCO:

    OUT/train2017/NNNNN.png   OUT/annotations/instances_train2017.json   (train split items)
    OUT/val2017/NNNNN.png     OUT/annotations/instances_val2017.json     (test split items)

The mosaics are ``tasks/common/mosaic.py``'s (later items occlude earlier ones),
with placements redrawn while an item would hide more than ``max_overlap`` of
an earlier one. Each item is annotated from its *visible* pixels: the mask
(compressed RLE, exact), the tight box around them and ``area`` = their count;
an item whose visible part is under ``min_visible`` of its own pixels or under
``min_pixels`` is not annotated (a fully hidden one never is). Categories are
the 10 Fashion-MNIST classes, ids 1..10; ``iscrowd`` is 0; image ids and
annotation ids start at 1. Everything follows from the seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...data.fashion_mnist import load_fashion_mnist
from ...data.names import fashion_mnist_classes
from ..common.mosaic import Mosaic, make_mosaic
from .evaluation import encode_masks

DEFAULTS = dict(size=128, items=(2, 4), scale=(1.0, 2.5), threshold=25, max_overlap=0.4,
                min_visible=0.3, min_pixels=20)


def categories() -> list[dict]:
    return [{"id": i + 1, "name": n, "supercategory": "clothing"}
            for i, n in enumerate(fashion_mnist_classes())]


def visible_instances(m: Mosaic, min_visible: float = 0.3, min_pixels: int = 20):
    """[(class 0..9, bool (S, S) visible mask, (x0, y0, x1, y1) box, area)] for the
    items kept, and the number of items left out as (nearly) hidden."""
    out, dropped = [], 0
    counts = np.bincount(m.instances.reshape(-1), minlength=len(m.items) + 1)
    for k, ((cls, _), own) in enumerate(zip(m.items, m.item_pixels), start=1):
        area = int(counts[k])
        if area < max(min_pixels, min_visible * own):
            dropped += 1
            continue
        vis = m.instances == k
        ys, xs = np.nonzero(vis)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        out.append((cls, vis, box, area))
    return out, dropped


def make_instance_mosaic(rng: np.random.Generator, images: torch.Tensor, labels: torch.Tensor,
                         size: int = 128, items=(2, 4), scale=(1.0, 2.5), threshold: int = 25,
                         max_overlap: float | None = 0.4, min_visible: float = 0.3,
                         min_pixels: int = 20):
    """(Mosaic, visible instances, number dropped); see :func:`visible_instances`."""
    m = make_mosaic(rng, images, labels, size=size, items=tuple(items), scale=tuple(scale),
                    threshold=threshold, max_overlap=max_overlap)
    inst, dropped = visible_instances(m, min_visible, min_pixels)
    return m, inst, dropped


def write_instance_split(out: str | Path, split: str, n: int, images: torch.Tensor,
                         labels: torch.Tensor, rng: np.random.Generator, **kw) -> dict:
    """Write ``n`` mosaics of the given item images (uint8 (N, 28, 28), labels
    0..9) as ``out/{split}2017/*.png`` and ``out/annotations/instances_{split}2017.json``;
    returns the json's ``info`` (parameters and counts)."""
    opts = {**DEFAULTS, **kw}
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown mosaic option(s): {', '.join(sorted(unknown))}")
    out = Path(out)
    img_dir = out / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    coco_images, anns, dropped = [], [], 0
    for i in range(n):
        m, inst, d = make_instance_mosaic(rng, images, labels, **opts)
        dropped += d
        name = f"{i:05d}.png"
        Image.fromarray(m.image).save(img_dir / name)
        s = m.image.shape[0]
        coco_images.append({"id": i + 1, "file_name": name, "width": s, "height": s})
        rles = encode_masks(np.stack([v for _, v, _, _ in inst])) if inst else []
        for (cls, _, (x0, y0, x1, y1), area), rle in zip(inst, rles):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cls + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "iscrowd": 0,
                         "segmentation": rle})
    info = {"description": f"Fashion-MNIST instance mosaics ({split})",
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()},
            "images": n, "instances": len(anns), "items_hidden": dropped}
    data = {"info": info, "licenses": [], "images": coco_images, "annotations": anns,
            "categories": categories()}
    (out / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return info


def write_instance_mosaics(out: str | Path, n_train: int = 4000, n_val: int = 500,
                           size: int = 128, seed: int = 0, data_dir: str | None = None,
                           **kw) -> Path:
    """The train split's items make ``train2017``, the test split's ``val2017``.
    ``kw``: items=(min, max) per mosaic, scale=(lo, hi) x 28 px, threshold,
    max_overlap, min_visible, min_pixels (defaults in ``DEFAULTS``)."""
    out = Path(out)
    for split, n, source, offset in (("train", n_train, "train", 0), ("val", n_val, "test", 1)):
        images, labels = load_fashion_mnist(data_dir, source)
        write_instance_split(out, split, n, images, labels, np.random.default_rng([seed, offset]),
                             size=size, **kw)
    return out
