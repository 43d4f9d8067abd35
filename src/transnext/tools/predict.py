"""`transnext predict IMAGE...`: top-k class names per image."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import DataError, eval_transform, load_image
from ..engine.distributed import resolve_device
from ..engine.errors import UserError
from ..engine.models import data_config
from ..ops import cpu_linear
from .evaluate import load_for_inference


def predict(model, meta, images, *, input_size=None, topk=5, device="cpu") -> list[dict]:
    dcfg = data_config(model)
    size = input_size or meta["input_size"] or dcfg["input_size"][-1]
    c = meta["in_chans"]
    mean = meta.get("mean") or dcfg["mean"][:c]
    std = meta.get("std") or dcfg["std"][:c]
    # Fashion-MNIST trains on whole 28x28 images: no centre crop
    crop = 1.0 if meta.get("dataset") == "fashion-mnist" else dcfg["crop_pct"]
    tf = eval_transform(size, mean, std, crop_pct=crop, interpolation=dcfg["interpolation"])
    out = []
    for path in images:
        if not Path(path).is_file():
            raise UserError(f"image file not found: {path}")
        try:
            img = load_image(path, "L" if c == 1 else "RGB")
        except DataError as e:
            raise UserError(str(e)) from None
        x = tf(img).unsqueeze(0).to(device)
        with torch.no_grad():
            prob = model(x).float().softmax(-1)[0]
        k = min(topk, prob.numel())
        p, i = prob.topk(k)
        out.append({"image": str(path), "top": [
            {"index": int(j), "label": meta["class_names"][int(j)], "prob": float(q)}
            for q, j in zip(p.tolist(), i.tolist())]})
    return out


def _threads(args):
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def run(args) -> list[dict]:
    _threads(args)
    device = resolve_device(args.device)
    model, meta = load_for_inference(args.model, args.checkpoint, device=device)
    cpu_linear.pack_on_cpu(model, device)  # fp32 products from packed weights (oneDNN)
    res = predict(model, meta, args.images, input_size=args.input_size, topk=args.topk,
                  device=device)
    for r in res:
        print(r["image"])
        for t in r["top"]:
            print(f"  {t['prob'] * 100:6.2f}%  {t['label']} ({t['index']})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res
