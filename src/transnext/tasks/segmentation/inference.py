"""Inference as the paper's mmseg configs: whole image, sliding window (crop 512,
stride 341), multi-scale (0.5 ... 1.75) with flip averaging softmax
probabilities; any image size. Everything returns class probabilities (or
logits) at the original image size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import rescale_size

PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "semantic_logits"):  # Mask2Former: mmseg's scores, not logits
        return model.semantic_logits(x)
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def whole(model, x: torch.Tensor) -> torch.Tensor:
    """Logits at the input size for a batch (B, 3, H, W)."""
    return _logits(model, x)


def slide(model, x: torch.Tensor, crop: int | tuple[int, int] = 512,
          stride: int | tuple[int, int] = 341, batch: int = 8) -> torch.Tensor:
    """mmseg's sliding window: windows of ``crop`` every ``stride`` (the last one
    flush with the border), logits of overlapping windows averaged. An image
    smaller than the window is one window of its own size."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    B, _, H, W = x.shape
    ny = max(H - ch + sh - 1, 0) // sh + 1
    nx = max(W - cw + sw - 1, 0) // sw + 1
    boxes = []
    for iy in range(ny):
        for ix in range(nx):
            y1, x1 = min(iy * sh + ch, H), min(ix * sw + cw, W)
            boxes.append((max(y1 - ch, 0), y1, max(x1 - cw, 0), x1))
    out = None
    count = x.new_zeros((1, 1, H, W))
    for i in range(0, len(boxes), batch):
        group = boxes[i:i + batch]
        sizes = {(y1 - y0, x1 - x0) for y0, y1, x0, x1 in group}
        if len(sizes) == 1:
            crops = torch.cat([x[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in group])
            logits = _logits(model, crops).split(B)
        else:
            logits = [_logits(model, x[:, :, y0:y1, x0:x1]) for y0, y1, x0, x1 in group]
        for (y0, y1, x0, x1), lg in zip(group, logits):
            if out is None:
                out = x.new_zeros((B, lg.shape[1], H, W), dtype=torch.float32)
            out[:, :, y0:y1, x0:x1] += lg.float()
            count[:, :, y0:y1, x0:x1] += 1
    return out / count


def predict(model, x: torch.Tensor, out_size: tuple[int, int] | None = None, *,
            mode: str = "whole", scales=(1.0,), flip: bool = False,
            test_scale: tuple[int, int] | None = None, crop=512, stride=341,
            softmax: bool = True) -> torch.Tensor:
    """Class probabilities (B, C, *out_size) for a normalised batch ``x``.

    For each scale r the image is resized to ``rescale(test_scale * r)``
    (keep-ratio, mmseg's MultiScaleFlipAug) or, without ``test_scale``, by r;
    logits from ``mode`` are resized to ``out_size`` (default: x's size),
    softmaxed, flipped back, and averaged over scales and flips. A single scale 1
    without flip and without ``test_scale`` is the plain whole/slide result.
    """
    H, W = x.shape[2:]
    out_size = tuple(out_size or (H, W))
    if getattr(model, "outputs_scores", False):
        softmax = False  # Mask2Former's scores are averaged as they are
    total, n = None, 0
    for r in scales:
        if test_scale is not None:
            size = rescale_size(H, W, (int(test_scale[0] * r), int(test_scale[1] * r)))
        else:
            size = (int(H * r + 0.5), int(W * r + 0.5))
        xr = x if size == (H, W) else F.interpolate(x, size=size, mode="bilinear",
                                                    align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = xr.flip(-1) if flipped else xr
            lg = slide(model, xi, crop, stride) if mode == "slide" else whole(model, xi).float()
            if tuple(lg.shape[2:]) != out_size:
                lg = F.interpolate(lg, size=out_size, mode="bilinear", align_corners=False)
            p = lg.softmax(1) if softmax else lg
            p = p.flip(-1) if flipped else p
            total = p if total is None else total + p
            n += 1
    return total / n
