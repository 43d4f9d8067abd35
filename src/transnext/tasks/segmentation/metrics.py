"""mIoU, mAcc, aAcc as mmseg computes them: intersection, union, predicted and
labelled areas per class summed over the whole set (not averaged per image),
255 ignored; classes absent from both labels and predictions are NaN and left
out of the means. Under torchrun the areas are summed over ranks."""
from __future__ import annotations

import math

import torch

from ...engine.distributed import all_reduce_sum

IGNORE = 255


class SegMetric:
    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.areas = torch.zeros(4, num_classes, dtype=torch.float64)  # inter, union, pred, label

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: (H, W) or (B, H, W) integer maps of the same size."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} "
                             f"differ in size")
        pred, label = pred.reshape(-1).long().cpu(), label.reshape(-1).long().cpu()
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        n = self.num_classes
        inter = torch.bincount(label[pred == label], minlength=n)[:n]
        area_pred = torch.bincount(pred, minlength=n)[:n]
        area_label = torch.bincount(label, minlength=n)[:n]
        union = area_pred + area_label - inter
        self.areas += torch.stack([inter, union, area_pred, area_label]).double()

    def reduce(self) -> None:
        """Sum the areas over distributed ranks (each rank saw its own images)."""
        self.areas = all_reduce_sum(self.areas.clone())

    def compute(self, class_names=None) -> dict:
        inter, union, _, label = self.areas
        iou = inter / union  # NaN where the class is absent from labels and predictions
        acc = inter / label
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        def mean(t):
            v = t[~torch.isnan(t)]
            return float(v.mean() * 100) if len(v) else float("nan")
        return {
            "mIoU": mean(iou), "mAcc": mean(acc),
            "aAcc": float(inter.sum() / label.sum() * 100) if label.sum() > 0 else float("nan"),
            "pixels": int(label.sum()),  # labelled pixels counted (each image once)
            "per_class": [{"class": names[i], "IoU": _pct(iou[i]), "Acc": _pct(acc[i])}
                          for i in range(self.num_classes)],
        }


def _pct(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v * 100


def format_table(result: dict) -> str:
    rows = [f"{'class':<24} {'IoU':>7} {'Acc':>7}"]
    for r in result["per_class"]:
        iou = "nan" if r["IoU"] is None else f"{r['IoU']:.2f}"
        acc = "nan" if r["Acc"] is None else f"{r['Acc']:.2f}"
        rows.append(f"{r['class'][:24]:<24} {iou:>7} {acc:>7}")
    rows.append(f"aAcc {result['aAcc']:.2f}  mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}")
    return "\n".join(rows)
