"""`transnext erf`: effective receptive field of the last stage's centre unit.

For each image: the gradient of the centre position of the last stage's output map
(ReLU, then summed over channels) with respect to the input pixels, absolute, summed over the input
channels; averaged over the images. The map is normalised to sum 1 (a distribution of
the centre unit's sensitivity over the image), saved as ``.npy``, drawn log-scaled, and
summarised by the share of the image area that holds 20/50/80/99% of the mass (the
fewest pixels that do: a number to compare across backbones).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine.errors import UserError

MASS_LEVELS = (0.2, 0.5, 0.8, 0.99)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def last_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last stage's (B, C, h, w) output map of a timm backbone, or the output of a
    module that returns a map."""
    if hasattr(model, "forward_intermediates"):
        feats = model.forward_intermediates(x, intermediates_only=True)
        y = feats[-1]
    else:
        y = model(x)
    if not isinstance(y, torch.Tensor) or y.ndim != 4:
        raise UserError(f"{type(model).__name__} gives no (B, C, H, W) map to take the "
                        f"centre unit of")
    return y


def erf_map(model: nn.Module, batches) -> tuple[np.ndarray, int]:
    """Sum over ``batches`` (iterable of (B, C, H, W) tensors on the model's device) of
    |d centre / d input|, summed over input channels; returns (mean map (H, W), count)."""
    total, count = None, 0
    model.eval()
    for x in batches:
        x = x.clone().requires_grad_(True)
        y = last_map(model, x)
        h, w = y.shape[-2:]
        # ReLU before the channel sum (as in RepLKNet's ERF code): a final LayerNorm makes
        # the plain channel sum of a map constant (zero gradient). Images in a batch are
        # independent in eval mode: one backward gives each its own gradient.
        centre = torch.relu(y[:, :, h // 2, w // 2]).sum()
        (grad,) = torch.autograd.grad(centre, x)
        g = grad.abs().sum(dim=1).sum(dim=0).double().cpu()
        total = g if total is None else total + g
        count += x.shape[0]
    if not count:
        raise UserError("no images to compute the effective receptive field on")
    return (total / count).numpy(), count


def normalise(m: np.ndarray) -> np.ndarray:
    s = float(m.sum())
    if not np.isfinite(s) or s <= 0:
        raise UserError("the gradient map is zero or not finite (a dead or broken model?)")
    return m / s


def area_shares(mass: np.ndarray, levels=MASS_LEVELS) -> dict[str, float]:
    """For each level t: the fewest pixels holding a share t of the mass, as a share of
    the image area."""
    flat = np.sort(mass.ravel())[::-1]
    cum = np.cumsum(flat) / flat.sum()
    out = {}
    for t in levels:
        k = int(np.searchsorted(cum, t - 1e-12)) + 1
        out[f"{round(t * 100)}%"] = min(k, flat.size) / flat.size
    return out


def image_batches(paths, transform, batch: int, device, in_chans: int = 3):
    from ..data import DataError, load_image
    buf = []
    for p in paths:
        try:
            img = load_image(p, "L" if in_chans == 1 else "RGB")
        except DataError as e:
            raise UserError(str(e)) from None
        buf.append(transform(img))
        if len(buf) == batch:
            yield torch.stack(buf).to(device)
            buf = []
    if buf:
        yield torch.stack(buf).to(device)


def list_images(folder, num: int) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files[:num]


def plot(maps: dict[str, np.ndarray], shares: dict[str, dict], output, floor: float = 1e-4):
    """One panel per model: log10 of the map relative to its peak, shared colour scale."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("drawing needs matplotlib (pip install 'transnext-pytorch[viz]')") from None
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 0.8, 4.2), squeeze=False)
    im = None
    for ax, (name, m) in zip(axes[0], maps.items()):
        rel = np.log10(np.maximum(m / m.max(), floor))
        im = ax.imshow(rel, cmap="viridis", vmin=np.log10(floor), vmax=0.0)
        s = shares[name]
        ax.set_title(f"{name}\narea for 50% / 99% of mass: {s['50%']:.1%} / {s['99%']:.1%}",
                     fontsize=9)
        ax.set_xlabel("x (input pixels)")
        ax.set_ylabel("y (input pixels)")
    cbar = fig.colorbar(im, ax=axes[0].tolist(), fraction=0.04)
    cbar.set_label("log10 contribution (relative to the peak)")
    fig.suptitle("Effective receptive field of the last stage's centre unit")
    fig.savefig(output, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    from ..data import eval_transform
    from ..engine.distributed import resolve_device
    from ..engine.models import data_config
    from .evaluate import load_for_inference

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    names = list(args.model)  # counts and files checked by tools/parsers.py
    ckpts = [None if c == "none" else c for c in args.checkpoint or []] or [None] * len(names)
    device = resolve_device(args.device)
    paths = list_images(args.images, args.num)
    if len(paths) < args.num:
        print(f"note: {len(paths)} images in {args.images} (--num {args.num})")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    maps, shares = {}, {}
    for name, ckpt in zip(names, ckpts):
        model, meta = load_for_inference(name, ckpt, device=device)
        dcfg = data_config(model)
        c = meta["in_chans"]
        tf = eval_transform(args.input_size, meta.get("mean") or dcfg["mean"][:c],
                            meta.get("std") or dcfg["std"][:c], crop_pct=1.0,
                            interpolation=dcfg["interpolation"])
        m, count = erf_map(model, image_batches(paths, tf, 8, device, c))
        maps[name] = normalise(m)
        shares[name] = area_shares(maps[name])
        npy = out.with_suffix(".npy") if len(names) == 1 else \
            out.with_name(f"{out.stem}_{name}.npy")
        np.save(npy, maps[name].astype(np.float32))
        print(f"{name}: {count} images at {args.input_size} px; area holding "
              + ", ".join(f"{k} of the mass: {v:.2%}" for k, v in shares[name].items())
              + f"; map {npy}")
    plot(maps, shares, out)
    summary = {"input_size": args.input_size, "images": len(paths),
               "models": {n: {"checkpoint": c, "area_share": shares[n]}
                          for n, c in zip(names, ckpts)}}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return summary
