"""DINO's contrastive denoising queries, as mmdet 3.0's ``CdnQueryGenerator`` makes them
(dynamic groups, label and box noise, the padded per-image layout, the attention mask).

Layout of the ``Ndn = max_gts * 2 * G`` denoising queries of each image: G groups of
``2 * max_gts`` slots; in group g, slots ``[0, max_gts)`` are the positive (slightly
noised) queries and ``[max_gts, 2 * max_gts)`` the negative (strongly noised) ones;
image b's j-th gt sits at slot j of each half, the slots past its gt count are zeros.
The pieces are plain functions so they can be checked alone; the random numbers come
from torch's global RNG on the gt tensors' device, drawn in mmdet's order.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

__all__ = ["CdnQueryGenerator", "inverse_sigmoid", "host_to_device", "dn_num_groups",
           "dn_noisy_labels", "dn_box_noise", "collate_dn_queries", "dn_attention_mask"]


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor onto ``device`` without stalling the host: a plain copy from
    pageable memory waits for the whole CUDA stream; a pinned one is queued behind it."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """mmdet's inverse_sigmoid: logit of x clamped to [0, 1], both sides kept >= eps."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def dn_num_groups(max_gts: int, num_dn_queries: int) -> int:
    """Dynamic groups: as many groups of max_gts as num_dn_queries holds, at least one."""
    if max_gts <= 0:
        return 1
    return max(int(num_dn_queries // max_gts), 1)


def dn_noisy_labels(gt_labels: Tensor, num_groups: int, num_classes: int,
                    label_noise_scale: float) -> Tensor:
    """(2G*N,) labels group-major ([pos g0, neg g0, pos g1, ...], each block all N gts),
    each replaced by a random class with probability label_noise_scale / 2 (mmdet draws
    the new classes for the chosen ones only; drawing one for every label and picking
    with ``where`` is the same distribution without the host sync of ``nonzero``)."""
    labels = gt_labels.repeat(2 * num_groups, 1).view(-1)
    p = torch.rand_like(labels.float())
    new = torch.randint_like(labels, 0, num_classes)
    return torch.where(p < label_noise_scale * 0.5, new, labels)


def dn_box_noise(gt_boxes: Tensor, num_groups: int, box_noise_scale: float) -> Tensor:
    """(2G*N, 4) noisy xyxy boxes, not yet clamped. Every corner moves by
    ``r * (w or h) * box_noise_scale / 2`` with a random sign: positives |r| in [0, 1),
    negatives |r| in [1, 2) (so they lie further out and are trained as background)."""
    n = gt_boxes.shape[0]
    boxes = gt_boxes.repeat(2 * num_groups, 1)
    rows = torch.arange(boxes.shape[0], device=boxes.device)
    negative = ((rows // max(n, 1)) % 2 == 1)[:, None]     # odd blocks of n rows
    sign = torch.randint_like(boxes, 0, 2, dtype=torch.float32) * 2.0 - 1.0
    part = (torch.rand_like(boxes) + negative) * sign
    whwh = box_convert(boxes, "xyxy", "cxcywh")[:, 2:].repeat(1, 2)
    return boxes + part * whwh * box_noise_scale / 2


def collate_dn_queries(values: Tensor, counts: list[int], num_groups: int) -> Tensor:
    """Scatter group-major per-gt rows (2G*N, D) (N = sum(counts), images' gts in order
    within each block) into the zero-padded per-image layout (B, max(counts)*2G, D):
    block k's row for image b's j-th gt goes to slot ``k * max(counts) + j`` of image b."""
    batch = len(counts)
    max_gts = max(counts, default=0)
    n = sum(counts)
    if values.shape[0] != 2 * num_groups * n:
        raise ValueError(f"dino_denoising.collate_dn_queries: {values.shape[0]} rows for "
                         f"{2 * num_groups} blocks of {n} gts")
    out = values.new_zeros(batch, max_gts * 2 * num_groups, *values.shape[1:])
    if n == 0:
        return out
    # the indices come from the host-side counts: built there, sent in one copy
    counts_t = torch.tensor(counts)
    img = torch.repeat_interleave(torch.arange(batch), counts_t)
    starts = torch.cumsum(counts_t, 0) - counts_t
    j = torch.arange(n) - starts[img]                      # index of each gt within its image
    slot = (torch.arange(2 * num_groups)[:, None] * max_gts + j[None]).flatten()
    idx = host_to_device(torch.stack([img.repeat(2 * num_groups), slot]), values.device)
    out[idx[0], idx[1]] = values
    return out


def dn_attention_mask(max_gts: int, num_groups: int, num_matching: int,
                      device: torch.device | str | None = None) -> Tensor:
    """(Ndn+Q, Ndn+Q) bool, True = may not attend: the matching queries never see a
    denoising query (their answers would leak), and each denoising group sees only
    itself and the matching queries."""
    ndn = max_gts * 2 * num_groups
    total = ndn + num_matching
    idx = torch.arange(total, device=device)
    is_dn = idx < ndn
    group = torch.where(is_dn, idx // max(2 * max_gts, 1), -1)
    # a dn column is blocked for every row outside its group (matching rows have group -1)
    return is_dn[None, :] & (group[:, None] != group[None, :])


class CdnQueryGenerator(nn.Module):
    """Denoising queries for DINO training (key ``dn_query_generator.label_embedding.weight``)."""

    def __init__(self, num_classes: int = 80, embed_dims: int = 256,
                 num_matching_queries: int = 900, label_noise_scale: float = 0.5,
                 box_noise_scale: float = 1.0, num_dn_queries: int = 100) -> None:
        super().__init__()
        if label_noise_scale <= 0 or box_noise_scale <= 0:
            raise ValueError("CdnQueryGenerator: label_noise_scale and box_noise_scale must be "
                             f"> 0 (got {label_noise_scale}, {box_noise_scale})")
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_matching_queries = num_matching_queries
        self.label_noise_scale = label_noise_scale
        self.box_noise_scale = box_noise_scale
        self.num_dn_queries = num_dn_queries
        self.label_embedding = nn.Embedding(num_classes, embed_dims)

    def forward(self, gt_labels: list[Tensor], gt_boxes: list[Tensor]
                ) -> tuple[Tensor, Tensor, Tensor, dict]:
        """gt_labels: per image (n,) int64 in [0, num_classes); gt_boxes: per image (n, 4)
        xyxy normalised to the image's img_shape. Returns (label_query (B, Ndn, C),
        bbox_query (B, Ndn, 4) cxcywh in inverse-sigmoid space, attn_mask (Ndn+Q, Ndn+Q)
        bool True = blocked, meta {num_denoising_queries, num_denoising_groups})."""
        if len(gt_labels) != len(gt_boxes) or not gt_labels:
            raise ValueError(f"CdnQueryGenerator (dino_denoising.py): {len(gt_labels)} label "
                             f"lists and {len(gt_boxes)} box lists; need one of each per image")
        for b, (lab, box) in enumerate(zip(gt_labels, gt_boxes)):
            if lab.dim() != 1 or box.dim() != 2 or box.shape[-1] != 4 or len(lab) != len(box):
                raise ValueError(f"CdnQueryGenerator (dino_denoising.py): image {b} has labels "
                                 f"{tuple(lab.shape)} and boxes {tuple(box.shape)}; want (n,) "
                                 "and (n, 4)")
        counts = [len(lab) for lab in gt_labels]
        max_gts = max(counts)
        groups = dn_num_groups(max_gts, self.num_dn_queries)
        labels = torch.cat(gt_labels).long()
        boxes = torch.cat(gt_boxes).float()

        noisy_labels = dn_noisy_labels(labels, groups, self.num_classes, self.label_noise_scale)
        label_query = self.label_embedding(host_to_device(noisy_labels,
                                                          self.label_embedding.weight.device))
        noisy = dn_box_noise(boxes, groups, self.box_noise_scale).clamp(0.0, 1.0)
        bbox_query = inverse_sigmoid(box_convert(noisy, "xyxy", "cxcywh"), eps=1e-3)

        label_query = collate_dn_queries(label_query, counts, groups)
        bbox_query = collate_dn_queries(bbox_query.to(label_query.device), counts, groups)
        mask = dn_attention_mask(max_gts, groups, self.num_matching_queries,
                                 device=label_query.device)
        meta = {"num_denoising_queries": int(max_gts * 2 * groups),
                "num_denoising_groups": int(groups)}
        return label_query, bbox_query, mask, meta
