"""``det predict``: detections drawn on the images (boxes, class names, scores and
semi-transparent instance masks) as PNGs, and the detections in COCO's result format."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from ...data.fashion_mnist import DataError
from ...engine.evaluate import autocast
from .evaluation import to_coco_results


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; DataError naming the file when it is missing or unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: corrupt or truncated ({e})") from None


def colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct bright colours (golden-ratio hues)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def draw(image: np.ndarray, output: dict, class_names, alpha: float = 0.45) -> Image.Image:
    """Masks (``alpha`` blend), boxes and "name score" labels of one image's detections
    (already filtered), highest score drawn last (on top)."""
    canvas = image.astype(np.float32)
    n = len(output["scores"])
    cols = colours(n)
    masks = output.get("masks")
    for i in reversed(range(n)):
        if masks is not None:
            m = masks[i]
            canvas[m] = canvas[m] * (1 - alpha) + np.array(cols[i], np.float32) * alpha
    im = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    width = max(1, round(min(im.size) / 200))
    for i in reversed(range(n)):
        x0, y0, x1, y1 = (float(v) for v in output["boxes"][i])
        d.rectangle([x0, y0, x1, y1], outline=cols[i], width=width)
        label = int(output["labels"][i])
        name = class_names[label - 1] if class_names and label - 1 < len(class_names) else str(label)
        text = f"{name} {float(output['scores'][i]):.2f}"
        tx0, ty0, tx1, ty1 = d.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0, ty1 - ty0
        ty = y0 - th - 2 if y0 - th - 2 >= 0 else y0
        d.rectangle([x0, ty, x0 + tw + 2, ty + th + 2], fill=cols[i])
        d.text((x0 + 1 - tx0, ty + 1 - ty0), text, fill=(0, 0, 0), font=font)
    return im


def image_id(path: Path, index: int) -> int:
    """The file stem when it is a number (COCO's ``000000139.jpg``), else the position."""
    return int(path.stem) if path.stem.isdigit() else index


@torch.no_grad()
def predict_files(model, files, out_dir, device, *, score_thr: float = 0.3,
                  amp: str = "none") -> list[dict]:
    """For each image ``<stem>.png`` in ``out_dir`` with the detections scoring at least
    ``score_thr`` drawn, and ``out_dir/predictions.json``: those detections as COCO
    results (``image_id``, ``category_id`` from the model's classes, ``bbox`` xywh,
    ``score``, and ``segmentation`` RLE for models with masks). Returns one summary per
    image."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    names = getattr(model, "class_names", None)
    cat_ids = model.label_to_cat_id
    results, done, seen = [], [], {}
    for index, f in enumerate(files):
        f = Path(f)
        img = read_image(f)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).to(device)
        with autocast(device, amp):
            o = model([x])[0]
        keep = o["scores"] >= score_thr
        o = {k: v[keep].float().cpu() if k != "labels" else v[keep].cpu() for k, v in o.items()}
        has_masks = "masks" in o  # Mask R-CNN; DINO predicts boxes only
        if has_masks:
            o["masks"] = (o["masks"][:, 0] >= 0.5).numpy()
        iid = image_id(f, index)
        bbox, segm = to_coco_results(iid, o, cat_ids, has_masks, img.shape[:2])
        results += segm if has_masks else bbox
        stem = f.stem if f.stem not in seen else f"{f.stem}_{index}"
        seen[stem] = True
        png = out / f"{stem}.png"
        draw(img, o, names).save(png)
        done.append({"image": str(f), "image_id": iid, "output": str(png),
                     "detections": [(names[int(lab) - 1] if names else str(int(lab)),
                                     round(float(s), 3))
                                    for lab, s in zip(o["labels"], o["scores"])]})
    (out / "predictions.json").write_text(json.dumps(results))
    return done
