"""A picture of a segmentation checkpoint on held-out images: one column per image, rows
image / ground truth / prediction, and a colour key. Used for the README's demo figure:

    .venv/bin/python scripts/figure_seg_demo.py --checkpoint runs/seg-demo/last.pth \
        --data-dir data/fmnist-seg --output docs/figures/seg_demo.png

Predictions use the checkpoint's own evaluation settings (mode, test scale), as `seg eval`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from transnext.tasks.segmentation.data import SegDataset, normalize
from transnext.tasks.segmentation.evaluate import inference_settings, load_model, overlay
from transnext.tasks.segmentation.inference import predict
from transnext.tasks.segmentation.names import palette


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True, help="generic folder layout (val split)")
    p.add_argument("--output", required=True, help="PNG file")
    p.add_argument("--num", type=int, default=8, help="images (the first ones of the split)")
    p.add_argument("--zoom", type=int, default=3, help="nearest-neighbour magnification")
    args = p.parse_args()

    model = load_model(args.checkpoint)
    kw = inference_settings(model)
    ds = SegDataset(args.data_dir, "folder", "val")
    names = ds.classes
    pal = palette(len(names))
    cols = []
    with torch.no_grad():
        for i in range(min(args.num, len(ds))):
            img, mask = ds.load(i)
            prob = predict(model, normalize(img)[None], tuple(mask.shape), **kw)
            pred = prob.argmax(1)[0].numpy()
            rgb = img.permute(1, 2, 0).numpy()
            truth = np.where(mask.numpy() == 255, 0, mask.numpy())
            cols.append(np.concatenate([rgb, overlay(rgb, truth, pal, 0.7),
                                        overlay(rgb, pred, pal, 0.7)], axis=0))
    grid = np.concatenate([np.pad(c, ((0, 0), (2, 2), (0, 0)), constant_values=255)
                           for c in cols], axis=1)
    grid = grid.repeat(args.zoom, 0).repeat(args.zoom, 1)
    label_w, key_h = 90, 22
    width = grid.shape[1] + label_w
    key, x, y = [], 6, 0  # colour key: (x, line) per class, wrapped to the figure's width
    for name in names:
        w = 16 + 7 * len(name) + 14
        if x + w > width and x > 6:
            x, y = 6, y + 1
        key.append((x, y))
        x += w
    canvas = Image.new("RGB", (width, grid.shape[0] + (y + 1) * key_h + 4), "white")
    canvas.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    tile = grid.shape[0] // 3
    for r, text in enumerate(("image", "truth", "prediction")):
        draw.text((6, r * tile + tile // 2 - 6), text, fill="black")
    for c, (name, (x, line)) in enumerate(zip(names, key)):
        top = grid.shape[0] + 4 + line * key_h
        draw.rectangle((x, top + 2, x + 12, top + 14), fill=tuple(int(v) for v in pal[c]))
        draw.text((x + 16, top + 2), name, fill="black")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.output, optimize=True)
    print(f"wrote {args.output} ({len(cols)} images)")


if __name__ == "__main__":
    main()
