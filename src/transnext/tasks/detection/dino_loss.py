"""DINO's training losses as mmdet 3.0's DINOHead computes them (SPEC section 9):
one-to-one Hungarian matching for every decoder layer and for the encoder proposals,
the fixed assignment of the denoising queries, sigmoid focal classification, L1 on
normalised cxcywh boxes and GIoU on pixel boxes, normalised by the (rank-averaged)
number of positives.

Costs of all layers and images are computed on the device and come to the host in one
copy; everything the host then knows (assignments, denoising slots, image sizes) goes
back in one pinned copy, so a step waits on the device once here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .dino_denoising import host_to_device

__all__ = ["match_cost", "hungarian_match", "batched_hungarian_match", "DinoCriterion"]

# mmdet's weight_reduce_loss divides by (avg_factor + float32 eps)
_EPS = float(torch.finfo(torch.float32).eps)


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - GIoU of aligned xyxy boxes as mmdet's GIoULoss (union and enclosing area
    clamped at ``eps``). Written out rather than torchvision's generalized_box_iou_loss,
    whose boolean-mask indexing makes the host wait on the GPU several times a step."""
    lt = torch.maximum(pred[..., :2], target[..., :2])
    rb = torch.minimum(pred[..., 2:], target[..., 2:])
    overlap = (rb - lt).clamp(min=0).prod(-1)
    area_p = (pred[..., 2:] - pred[..., :2]).prod(-1)
    area_t = (target[..., 2:] - target[..., :2]).prod(-1)
    union = (area_p + area_t - overlap).clamp(min=eps)
    enclose = (torch.maximum(pred[..., 2:], target[..., 2:])
               - torch.minimum(pred[..., :2], target[..., :2])).clamp(min=0).prod(-1).clamp(min=eps)
    return 1 - (overlap / union - (enclose - union) / enclose)


def _one_hot_at(shape, index: tuple[Tensor, ...], device) -> Tensor:
    """Zeros of ``shape`` with ones at ``index`` (one index tensor per dim), set by a
    scatter on the flat view: advanced-index assignment syncs with the host on CUDA."""
    flat = torch.zeros(shape, device=device).view(-1)
    lin = torch.zeros_like(index[0])
    for i, size in zip(index, shape):
        lin = lin * size + i
    return flat.scatter_(0, lin, 1.0).view(shape)


def _scale_xyxy(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """boxes * (sx, sy, sx, sy) with Python scalars (no small host tensor to copy over)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1 * sx, y1 * sy, x2 * sx, y2 * sy], -1)


def match_cost(logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
               img_shape: tuple[int, int], *, cost_class: float = 2.0, cost_bbox: float = 5.0,
               cost_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """mmdet's HungarianAssigner cost (..., Q, n) of queries against one image's gts:
    FocalLossCost + L1 on normalised cxcywh + negative GIoU on pixel xyxy, weighted.
    logits (..., Q, C); boxes (..., Q, 4) sigmoid cxcywh normalised to img_shape (h, w);
    gt_labels (n,) 0-based; gt_boxes (n, 4) xyxy pixels."""
    h, w = img_shape
    lead = boxes.shape[:-2]
    num_q = boxes.shape[-2]
    gt_boxes = gt_boxes.float()
    p = logits.float()[..., gt_labels].sigmoid()                      # (..., Q, n)
    neg = -(1 - p + 1e-12).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + 1e-12).log() * alpha * (1 - p).pow(gamma)
    flat = boxes.float().reshape(-1, 4)
    gt_norm = box_convert(_scale_xyxy(gt_boxes, 1.0 / w, 1.0 / h), "xyxy", "cxcywh")
    l1 = torch.cdist(flat, gt_norm, p=1)
    pred_px = _scale_xyxy(box_convert(flat, "cxcywh", "xyxy"), float(w), float(h))
    giou = generalized_box_iou(pred_px, gt_boxes)
    cost = cost_bbox * l1 - cost_giou * giou
    return cost_class * (pos - neg) + cost.reshape(*lead, num_q, -1)


def _solve(cost: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if cost.shape[-1] == 0 or cost.shape[0] == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if not np.isfinite(cost).all():
        raise FloatingPointError(f"dino_loss: the matching cost of {where} holds NaN or inf "
                                 "(the predictions diverged?)")
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def hungarian_match(logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                    img_shape: tuple[int, int], *, cost_class: float = 2.0,
                    cost_bbox: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25,
                    gamma: float = 2.0) -> tuple[Tensor, Tensor]:
    """One image's one-to-one assignment (scipy's linear_sum_assignment on the detached
    cost): (pred_idx, gt_idx) int64 on the logits' device, sorted by query."""
    with torch.no_grad():
        cost = match_cost(logits, boxes, gt_labels, gt_boxes, img_shape, cost_class=cost_class,
                          cost_bbox=cost_bbox, cost_giou=cost_giou, alpha=alpha, gamma=gamma)
    rows, cols = _solve(cost.cpu().numpy(), "the image")
    return (torch.from_numpy(rows).to(logits.device), torch.from_numpy(cols).to(logits.device))


def batched_hungarian_match(logits: Tensor, boxes: Tensor, gt_labels: list[Tensor],
                            gt_boxes: list[Tensor], img_shapes: list[tuple[int, int]],
                            **costs: float) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """hungarian_match for every layer k and image b of logits (K, B, Q, C) and boxes
    (K, B, Q, 4), with one device-to-host copy for all: [k][b] -> (rows, cols) numpy."""
    num_k, num_b, num_q = logits.shape[:3]
    counts = [int(g.shape[0]) for g in gt_labels]
    with torch.no_grad():
        pieces = [match_cost(logits[:, b], boxes[:, b], gt_labels[b], gt_boxes[b], img_shapes[b],
                             **costs).reshape(-1) for b in range(num_b) if counts[b]]
        flat = torch.cat(pieces).cpu().numpy() if pieces else np.zeros(0, np.float32)
    out = [[None] * num_b for _ in range(num_k)]
    offset = 0
    for b in range(num_b):
        block = flat[offset: offset + num_k * num_q * counts[b]].reshape(num_k, num_q, counts[b])
        offset += block.size
        for k in range(num_k):
            out[k][b] = _solve(block[k], f"layer {k}, image {b}")
    return out


class DinoCriterion(nn.Module):
    """mmdet 3.0 DINOHead.loss_by_feat (no parameters). forward(out, targets, img_shapes):
    out "cls" (L, B, Ndn+Q, C) logits, "boxes" (L, B, Ndn+Q, 4) sigmoid cxcywh normalised to
    img_shape, "enc_cls" (B, Q, C), "enc_boxes" (B, Q, 4), "dn_meta" dict or None;
    targets: per image "boxes" (n, 4) xyxy pixels, "labels" (n,) 0-based; img_shapes: (h, w).
    Returns mmdet's loss names, each a weighted scalar."""

    def __init__(self, num_classes: int, *, alpha: float = 0.25, gamma: float = 2.0,
                 cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 match_costs: tuple[float, float, float] = (2.0, 5.0, 2.0)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.alpha, self.gamma = alpha, gamma
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.match_costs = dict(cost_class=match_costs[0], cost_bbox=match_costs[1],
                                cost_giou=match_costs[2], alpha=alpha, gamma=gamma)

    # ------------------------------------------------------------------ input checks
    def _check(self, out: dict, targets: list[dict], img_shapes: list) -> int:
        cls, boxes = out["cls"], out["boxes"]
        where = "DinoCriterion (dino_loss.py)"
        if cls.dim() != 4 or boxes.shape != (*cls.shape[:3], 4):
            raise ValueError(f"{where}: out['cls'] {tuple(cls.shape)} and out['boxes'] "
                             f"{tuple(boxes.shape)}; want (L, B, T, C) and (L, B, T, 4)")
        if cls.shape[-1] != self.num_classes:
            raise ValueError(f"{where}: {cls.shape[-1]} class logits for {self.num_classes} classes")
        num_b = cls.shape[1]
        if len(targets) != num_b or len(img_shapes) != num_b:
            raise ValueError(f"{where}: {num_b} images in the outputs, {len(targets)} targets and "
                             f"{len(img_shapes)} img_shapes")
        meta = out.get("dn_meta")
        ndn = int(meta["num_denoising_queries"]) if meta is not None else 0
        if ndn > cls.shape[2] or (meta is not None and ndn % int(meta["num_denoising_groups"])):
            raise ValueError(f"{where}: dn_meta {meta} does not fit {cls.shape[2]} queries")
        if out.get("enc_cls") is not None:
            want = (num_b, cls.shape[2] - ndn)
            if (out["enc_cls"].shape != (*want, self.num_classes)
                    or out["enc_boxes"].shape != (*want, 4)):
                raise ValueError(f"{where}: enc_cls {tuple(out['enc_cls'].shape)} / enc_boxes "
                                 f"{tuple(out['enc_boxes'].shape)}; want {want} + (C,) / (4,)")
        for b, t in enumerate(targets):
            lab, box = t["labels"], t["boxes"]
            if lab.dim() != 1 or box.dim() != 2 or box.shape[-1] != 4 or len(lab) != len(box):
                raise ValueError(f"{where}: target {b} has labels {tuple(lab.shape)} and boxes "
                                 f"{tuple(box.shape)}; want (n,) and (n, 4)")
            if lab.device.type == "cpu" and len(lab) and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise ValueError(f"{where}: target {b} has labels outside [0, {self.num_classes}) "
                                 "(0-based here)")
        return ndn

    # ------------------------------------------------------------------ normalisers
    @staticmethod
    def _avg_factors(num_pos: list[int], device: torch.device) -> Tensor | list[float]:
        """mmdet's reduce_mean of each positive count over ranks, then at least 1."""
        if dist.is_available() and dist.is_initialized():
            t = host_to_device(torch.tensor(num_pos, dtype=torch.float32), device)
            dist.all_reduce(t)
            return (t / dist.get_world_size()).clamp(min=1.0)
        return [max(float(n), 1.0) for n in num_pos]

    def _focal(self, logits: Tensor, target: Tensor) -> Tensor:
        """Summed focal loss per leading index: (K, ...) -> (K,)."""
        loss = sigmoid_focal_loss(logits.float(), target, self.alpha, self.gamma)
        return loss.flatten(1).sum(1)

    # ------------------------------------------------------------------ forward
    def forward(self, out: dict, targets: list[dict],
                img_shapes: list[tuple[int, int]]) -> dict[str, Tensor]:
        # costs and losses in float32 even when called inside an autocast region
        with torch.autocast(out["cls"].device.type, enabled=False):
            return self._losses(out, targets, img_shapes)

    def _losses(self, out: dict, targets: list[dict],
                img_shapes: list[tuple[int, int]]) -> dict[str, Tensor]:
        ndn = self._check(out, targets, img_shapes)
        cls, boxes = out["cls"], out["boxes"]
        num_layers, num_b = cls.shape[:2]
        dev = cls.device
        meta = out.get("dn_meta")
        counts = [int(t["labels"].shape[0]) for t in targets]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        gt_labels = host_to_device(torch.cat([t["labels"] for t in targets]).long(), dev)
        gt_xyxy = host_to_device(torch.cat([t["boxes"] for t in targets]).float(), dev)
        per_img_labels = [gt_labels[starts[b]:starts[b + 1]] for b in range(num_b)]
        per_img_boxes = [gt_xyxy[starts[b]:starts[b + 1]] for b in range(num_b)]

        # matching part: the decoder layers, then the encoder proposals (real labels)
        m_cls, m_boxes = cls[:, :, ndn:].float(), boxes[:, :, ndn:].float()
        has_enc = out.get("enc_cls") is not None
        if has_enc:
            m_cls = torch.cat([m_cls, out["enc_cls"][None].float()])
            m_boxes = torch.cat([m_boxes, out["enc_boxes"][None].float()])
        num_k = m_cls.shape[0]
        assign = batched_hungarian_match(m_cls, m_boxes, per_img_labels, per_img_boxes,
                                         img_shapes, **self.match_costs)

        # host-side indices -> one pinned copy: [image sizes | gt image ids | matches | dn]
        gt_img = np.repeat(np.arange(num_b), counts)
        num_gt = len(gt_img)
        match = [np.concatenate(x) for x in zip(*[
            (np.full(len(r), k), np.full(len(r), b), r, c + starts[b])
            for k in range(num_k) for b, (r, c) in enumerate(assign[k])])]
        # dn: image b's j-th gt is the positive query g * (Ndn / G) + j of every group g
        groups = int(meta["num_denoising_groups"]) if meta is not None else 0
        per_group = ndn // max(groups, 1)
        if groups and max(counts) > per_group // 2:
            raise ValueError(f"DinoCriterion (dino_loss.py): dn_meta {meta} has room for "
                             f"{per_group // 2} gts per image, a target has {max(counts)}")
        dn_q = (np.arange(groups)[:, None] * per_group + (np.arange(num_gt) - starts[gt_img])[None])
        dn = [np.tile(gt_img, groups), dn_q.reshape(-1), np.tile(np.arange(num_gt), groups)]
        sizes = np.asarray([[h, w] for h, w in img_shapes], dtype=np.int64).reshape(-1)
        host = np.concatenate([sizes, gt_img, *match, *dn]).astype(np.int64)
        dev_idx = host_to_device(torch.from_numpy(host), dev)
        pieces = dev_idx.split([len(sizes), num_gt] + [len(match[0])] * 4 + [len(dn[0])] * 3)
        hw = pieces[0].view(num_b, 2).float()
        scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)   # (B, 4) = w h w h
        gt_norm = box_convert(gt_xyxy / scale[pieces[1]], "xyxy", "cxcywh")

        num_pos_match = sum(len(r) for r, _ in assign[0])
        num_pos_dn = len(dn[0])
        avg = self._avg_factors([num_pos_match, num_pos_dn], dev)

        losses: dict[str, Tensor] = {}
        k_idx, b_idx, q_idx, g_idx = pieces[2:6]
        target = _one_hot_at(m_cls.shape, (k_idx, b_idx, q_idx, gt_labels[g_idx]), dev)
        loss_cls = self._focal(m_cls, target)
        pred = m_boxes[k_idx, b_idx, q_idx]
        l1_rows = (pred - gt_norm[g_idx]).abs().sum(-1)
        giou_rows = giou_loss(box_convert(pred, "cxcywh", "xyxy") * scale[b_idx], gt_xyxy[g_idx])
        loss_l1 = pred.new_zeros(num_k).index_add(0, k_idx, l1_rows)
        loss_giou = pred.new_zeros(num_k).index_add(0, k_idx, giou_rows)
        names = [f"d{k}." for k in range(num_layers - 1)] + [""] + (["enc_"] if has_enc else [])
        self._put(losses, names, loss_cls, loss_l1, loss_giou, avg[0], "")

        if meta is not None:
            d_cls, d_boxes = cls[:, :, :ndn].float(), boxes[:, :, :ndn].float()
            b_idx, q_idx, g_idx = pieces[6:9]
            target = _one_hot_at(d_cls.shape[1:], (b_idx, q_idx, gt_labels[g_idx]), dev)
            loss_cls = self._focal(d_cls, target.expand_as(d_cls))
            pred = d_boxes[:, b_idx, q_idx]                                # (L, P, 4)
            loss_l1 = (pred - gt_norm[g_idx]).abs().sum((1, 2))
            pred_px = box_convert(pred, "cxcywh", "xyxy") * scale[b_idx]
            loss_giou = giou_loss(
                pred_px.reshape(-1, 4), gt_xyxy[g_idx].repeat(num_layers, 1)
            ).view(num_layers, len(dn[0])).sum(1)
            names = [f"d{k}." for k in range(num_layers - 1)] + [""]
            self._put(losses, names, loss_cls, loss_l1, loss_giou, avg[1], "dn_")
        return self._ordered(losses, num_layers, has_enc, meta is not None)

    def _put(self, losses: dict, prefixes: list[str], cls: Tensor, l1: Tensor, giou: Tensor,
             avg: Tensor | float, kind: str) -> None:
        for k, pre in enumerate(prefixes):
            losses[f"{pre}{kind}loss_cls"] = self.cls_weight * cls[k] / (avg + _EPS)
            losses[f"{pre}{kind}loss_bbox"] = self.l1_weight * l1[k] / (avg + _EPS)
            losses[f"{pre}{kind}loss_iou"] = self.giou_weight * giou[k] / (avg + _EPS)

    @staticmethod
    def _ordered(losses: dict, num_layers: int, has_enc: bool, has_dn: bool) -> dict:
        """mmdet's key order: last layer, d0..d{L-2}, encoder, then the same for dn."""
        keys = []
        for kind, on in (("", True), ("enc_", has_enc), ("dn_", has_dn)):
            if not on:
                continue
            pres = [""] if kind == "enc_" else [""] + [f"d{k}." for k in range(num_layers - 1)]
            for pre in pres:
                keys += [f"{pre}{kind}loss_{n}" for n in ("cls", "bbox", "iou")]
        return {k: losses[k] for k in keys}
