"""Fixed padded sizes ("canvases") for detection training under ``--cuda-graphs``.

A CUDA graph replays one input shape, and a detection batch is padded to its largest
image, a new shape almost every step. Padded instead to the smallest of a few fixed
canvases that holds the batch, the backbone sees at most that many shapes and replays one
graph per canvas. The resize bounds every training image: short side at most the largest
short side drawn, long side at most ``max_size``; aspect-grouped batches (landscape apart
from the rest, ``sampler.GroupedBatchSampler``) then fit one of two canvases, landscape
(short, long) and portrait (long, short), rounded up to the stride 32. The padding is
zeros, as the batch's own padding is, and the images' sizes (so the boxes, the clipping of
proposals and DINO's masks) are unchanged. What the extra padding does change: the
TransNeXt's pooled attention sees more of it, and Mask R-CNN's RPN lays anchors over it
(background anchors it may sample), as it does over a batch's own padding.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _up(n: int, d: int) -> int:
    return -(-int(n) // d) * d


def train_canvases(short_sides, max_size: int, divisor: int = 32) -> list[tuple[int, int]]:
    """The (H, W) canvases that hold every image resized keep-ratio to one of
    ``short_sides`` with the long side at most ``max_size``: landscape, then portrait
    (one when they are the same)."""
    sides = [short_sides] if isinstance(short_sides, int) else list(short_sides)
    if not sides or min(sides) < 1 or max_size < 1:
        raise ValueError(f"short sides {short_sides} and max_size {max_size} must be positive")
    long = _up(max_size, divisor)
    short = _up(min(max(sides), max_size), divisor)
    return list(dict.fromkeys([(short, long), (long, short)]))


def pick_canvas(h: int, w: int, canvases) -> tuple[int, int] | None:
    """The smallest canvas that holds an (h, w) batch, or None (the batch is then padded
    as usual and its backbone step runs eagerly)."""
    fits = [c for c in canvases if c[0] >= h and c[1] >= w]
    return min(fits, key=lambda c: (c[0] * c[1], c)) if fits else None


def pad_to(images: list[Tensor], size: tuple[int, int]) -> Tensor:
    """(B, C, *size) zeros with each (C, h, w) image at the top left."""
    batch = images[0].new_zeros((len(images), images[0].shape[0], *size))
    for i, im in enumerate(images):
        batch[i, :, :im.shape[-2], :im.shape[-1]].copy_(im)
    return batch


def graph_holder(model: torch.nn.Module):
    """What holds a detector's TransNeXt graphs (``use_cuda_graphs``, ``graphed``): DINO
    itself, Mask R-CNN's backbone."""
    from ...engine.cuda_graphs import GraphedStages
    return model if isinstance(model, GraphedStages) else model.backbone


def use_canvases(model: torch.nn.Module, canvases: list[tuple[int, int]]) -> None:
    """Pad ``model``'s training batches (a TransNeXtMaskRCNN or TransNeXtDINO) to
    ``canvases``; evaluation keeps the usual padding."""
    holder = model.transform if hasattr(model, "transform") else model
    holder.canvases = [tuple(int(v) for v in c) for c in canvases]
