"""Where torchvision's Mask R-CNN computes something other than mmdet 2.28 (the stack
the released TransNeXt Mask R-CNN weights were trained and evaluated with), the
mmdet behaviour, as small subclasses of torchvision's own pieces.

Each piece says what differs and why it matters. Weight-layout differences (the
background class last in mmdet's classifier, no background slot in its box and mask
outputs) are handled by the converter (``convert.py``), not here.

* ``MMDetTransform``: mmdet's ``Resize(img_scale=(1333, 800), keep_ratio=True)`` size
  rule (``int(w * s + 0.5)``, not torchvision's ``floor``), its per-axis scale factors,
  the uint8 result of its resize, box clipping, ``img_norm_cfg`` on 0-255 values.
* ``MMDetAnchorGenerator``: base anchors not rounded; strides fixed (4..64), not
  inferred from the padded image size (torchvision gets 61 instead of 64 for P6 on a
  800-row image).
* ``MMDetBoxCoder``: ``delta2bbox`` clamps log-sizes on both sides; ``bbox2delta``.
* ``MMDetMatcher``: ``MaxIoUAssigner`` low-quality matches only above ``min_pos_iou``.
* ``batched_nms``: mmcv's (offset trick below 10000 boxes, per group above).
* ``MMDetRoIAlign``: aligned RoIAlign (torchvision's pooler uses ``aligned=False``),
  adaptive sampling, fixed strides and ``map_roi_levels`` (finest scale 56).
* ``MMDetRPN``: proposal filtering (drop empty boxes) and the L1 box loss.
* ``MMDetRoIHeads``: test-time boxes rescaled to the original image before the
  class-wise NMS, no small-box removal, mask RoIs and ``_do_paste_mask``-style pasting;
  training with the L1 box loss and aligned, binarised mask targets.

Under AMP (bf16/fp16 autocast) the box arithmetic stays in float32, as mmdet's
``force_fp32`` keeps it: box decoding, RoI extraction (features cast up, results cast
back), proposal and detection scores, mask probabilities and the losses. In half
precision a box coordinate near 800 px would be rounded to 4 px.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, nms, roi_align

from .canvas import pad_to, pick_canvas

# mmdet's img_norm_cfg (RGB order, 0-255 values)
MEAN_255 = (123.675, 116.28, 103.53)
STD_255 = (58.395, 57.12, 57.375)
# abs(log(16 / 1000)): delta2bbox's wh_ratio_clip
_MAX_RATIO = abs(math.log(16 / 1000))


def _f32(t: Tensor) -> Tensor:
    """Half-precision tensors (autocast's outputs) as float32; others unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ---- image geometry ----------------------------------------------------------------
def mmdet_rescale_size(h: int, w: int, short: int = 800, long: int = 1333) -> tuple[int, int]:
    """(new_h, new_w) of mmdet's keep-ratio resize to ``img_scale=(long, short)``:
    the largest scale that fits both edges, each size rounded half up.
    (torchvision's transform floors ``size * scale`` instead.)"""
    scale = min(long / max(h, w), short / min(h, w))
    return int(h * float(scale) + 0.5), int(w * float(scale) + 0.5)


def scale_factor(original: tuple[int, int], resized: tuple[int, int], device=None) -> Tensor:
    """mmdet's ``scale_factor`` (w_scale, h_scale, w_scale, h_scale) as float32:
    resized / original per axis (they differ slightly after rounding)."""
    (h, w), (nh, nw) = original, resized
    ws, hs = nw / w, nh / h
    return torch.tensor([ws, hs, ws, hs], dtype=torch.float32, device=device)


class MMDetTransform(GeneralizedRCNNTransform):
    """mmdet 2.28's pipeline geometry (Resize keep_ratio, Normalize, Pad size_divisor).

    Images come as torchvision expects them (float 0-1, or uint8 0-255, (3, H, W)).
    mmdet resizes the uint8 image (cv2 bilinear, result uint8) and then normalises;
    here the resize is bilinear without antialiasing on 0-255 values and, with
    ``quantize``, rounded to the uint8 grid as cv2 leaves it. Boxes are multiplied by
    the per-axis scale factors and clipped to the resized image; masks are resized
    nearest (mmdet's BitmapMasks.rescale)."""

    def __init__(self, min_size=800, max_size: int = 1333, size_divisible: int = 32,
                 quantize: bool = True):
        super().__init__(min_size, max_size, [m / 255 for m in MEAN_255],
                         [s / 255 for s in STD_255], size_divisible)
        self.quantize = quantize
        self.canvases = None  # training batches padded to one of these (canvas.use_canvases)

    def batch_images(self, images, size_divisible: int = 32):
        if self.training and self.canvases:
            c = pick_canvas(max(im.shape[-2] for im in images),
                            max(im.shape[-1] for im in images), self.canvases)
            if c is not None:
                return pad_to(images, c)
        return super().batch_images(images, size_divisible)

    def normalize(self, image: Tensor) -> Tensor:
        mean = torch.tensor(MEAN_255, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.tensor(STD_255, dtype=image.dtype, device=image.device)[:, None, None]
        return (image - mean) / std

    def resize(self, image: Tensor, target: dict | None = None):
        """``image`` on 0-255 values, float."""
        h, w = image.shape[-2:]
        short = self.torch_choice(list(self.min_size)) if self.training else self.min_size[-1]
        nh, nw = mmdet_rescale_size(h, w, short, self.max_size)
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear",
                                  align_corners=False)[0]
            if self.quantize:
                image = image.round().clamp_(0, 255)
        if target is None:
            return image, target
        target = dict(target)
        sf = scale_factor((h, w), (nh, nw), image.device)
        boxes = target["boxes"].to(torch.float32) * sf
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, nh)
        target["boxes"] = boxes
        if "masks" in target:
            m = target["masks"]
            if m.shape[0]:
                m = F.interpolate(m[:, None].float(), size=(nh, nw), mode="nearest")[:, 0]
            else:
                m = m.new_zeros((0, nh, nw), dtype=torch.float32)
            target["masks"] = m.to(torch.uint8)
        return image, target

    def forward(self, images, targets=None):
        out, new_targets = [], [] if targets is not None else None
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"images must be (3, H, W) tensors, got {tuple(image.shape)}")
            image = image.float() if image.dtype == torch.uint8 else image * 255.0
            image, t = self.resize(image, targets[i] if targets is not None else None)
            out.append(self.normalize(image))
            if new_targets is not None:
                new_targets.append(t)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in out]
        return ImageList(self.batch_images(out, self.size_divisible), sizes), new_targets


# ---- anchors -----------------------------------------------------------------------
class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet's AnchorGenerator(scales=[8], ratios=[0.5, 1, 2], strides=[4..64]).

    Same ordering as torchvision (ratio-major base anchors, row-major positions,
    anchors innermost), which is the layout of the RPN conv outputs. Two differences:
    mmdet keeps the base anchors unrounded (centre offset 0), and its strides are
    fixed, where torchvision infers them as padded_size // feature_size."""

    def __init__(self, strides=(4, 8, 16, 32, 64), scales=(8,), ratios=(0.5, 1.0, 2.0)):
        self.strides = tuple(int(s) for s in strides)
        self.scales = tuple(float(s) for s in scales)
        self.ratios = tuple(float(r) for r in ratios)
        super().__init__(sizes=tuple(tuple(s * sc for sc in self.scales) for s in self.strides),
                         aspect_ratios=(self.ratios,) * len(self.strides))
        self.cell_anchors = [self.base_anchors(s) for s in self.strides]

    def base_anchors(self, stride: int, dtype=torch.float32, device=None) -> Tensor:
        ratios = torch.tensor(self.ratios, dtype=dtype, device=device)
        scales = torch.tensor(self.scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32,
                         device=torch.device("cpu")) -> Tensor:
        # torchvision's version rounds; called by its __init__, replaced right after
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws, hs = (scales[None] / h[:, None]).reshape(-1), (scales[None] * h[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} strides")
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.set_cell_anchors(dtype, device)
        grids = [list(f.shape[-2:]) for f in feature_maps]
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)]
                   for s in self.strides]
        per_level = self.grid_anchors(grids, strides)
        one = torch.cat(per_level)
        return [one for _ in image_list.image_sizes]


# ---- boxes -------------------------------------------------------------------------
class MMDetBoxCoder(BoxCoder):
    """mmdet's DeltaXYWHBBoxCoder (means 0, ``stds``). torchvision's decode clamps the
    log-size deltas only from above; mmdet clamps both sides (wh_ratio_clip 16/1000).
    Centres and sizes are computed as mmdet does ((x1 + x2) / 2; deltas times stds)."""

    def __init__(self, stds=(1.0, 1.0, 1.0, 1.0)):
        self.stds = tuple(float(s) for s in stds)
        super().__init__(tuple(1.0 / s for s in self.stds), _MAX_RATIO)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        p, g = proposals.float(), reference_boxes.float()
        pxy, pwh = (p[:, :2] + p[:, 2:]) * 0.5, p[:, 2:] - p[:, :2]
        gxy, gwh = (g[:, :2] + g[:, 2:]) * 0.5, g[:, 2:] - g[:, :2]
        deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=1)
        return deltas / deltas.new_tensor(self.stds)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        n = boxes.shape[0]
        rel_codes = _f32(rel_codes)  # float32 under AMP too
        boxes = boxes.to(rel_codes.dtype)
        d = rel_codes.reshape(n, -1, 4) * rel_codes.new_tensor(self.stds)
        pxy = ((boxes[:, :2] + boxes[:, 2:]) * 0.5)[:, None]
        pwh = (boxes[:, 2:] - boxes[:, :2])[:, None]
        gxy = pxy + pwh * d[..., :2]
        gwh = pwh * d[..., 2:].clamp(min=-_MAX_RATIO, max=_MAX_RATIO).exp()
        return torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1).reshape(n, -1)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                split_thr: int = 10000) -> Tensor:
    """mmcv 1.x ``batched_nms``: NMS within each ``idxs`` group, kept indices by
    decreasing score. Below ``split_thr`` boxes the groups are separated by offsetting
    each by idx * (max coordinate + 1), one NMS over all (float rounding of the shifted
    boxes included); above, one NMS per group. torchvision switches at another size
    (1000 boxes on CPU, 5000 on GPU), which can change borderline suppressions."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] < split_thr:
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for i in torch.unique(idxs):  # one NMS per class / level
        members = torch.where(idxs == i)[0]
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp x to [0, w] and y to [0, h] (mmdet's ``max_shape`` clip)."""
    h, w = size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


class MMDetMatcher(Matcher):
    """mmdet's MaxIoUAssigner with ``match_low_quality``: a ground truth's best
    predictions (all ties) become positive only when that best IoU is at least
    ``min_pos_iou`` (torchvision: at any IoU), and they go to that ground truth
    (a later one winning), not to the prediction's own best match."""

    def __init__(self, high_threshold: float, low_threshold: float, min_pos_iou: float):
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=True)
        self.min_pos_iou = float(min_pos_iou)

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor,
                                 match_quality_matrix: Tensor) -> None:
        best = match_quality_matrix.max(dim=1).values
        hit = (match_quality_matrix == best[:, None]) & (best >= self.min_pos_iou)[:, None]
        n_gt = hit.shape[0]
        last_gt = n_gt - 1 - hit.flip(0).to(torch.uint8).argmax(dim=0)
        upd = hit.any(dim=0)
        matches[upd] = last_gt[upd]


# ---- RoI pooling -------------------------------------------------------------------
def map_roi_levels(boxes: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """mmdet's SingleRoIExtractor.map_roi_levels: floor(log2(sqrt(w*h)/56 + 1e-6)),
    clamped to the levels. (torchvision's LevelMapper adds the 1e-6 outside the log.)"""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    lvl = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return lvl.clamp(min=0, max=num_levels - 1).long()


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """(K, 5) rows of (image index, x1, y1, x2, y2)."""
    cat = torch.cat(boxes, dim=0)
    idx = torch.cat([torch.full((len(b), 1), i, dtype=cat.dtype, device=cat.device)
                     for i, b in enumerate(boxes)], dim=0)
    return torch.cat([idx, cat], dim=1)


class MMDetRoIAlign(MultiScaleRoIAlign):
    """mmdet's SingleRoIExtractor with mmcv RoIAlign(aligned=True, sampling_ratio=0).

    torchvision's MultiScaleRoIAlign calls roi_align with ``aligned=False`` (no half-
    pixel shift, sizes clamped to 1) and infers the level scales from the padded image;
    mmdet shifts by half a pixel, uses fixed strides and its own level mapping."""

    def __init__(self, featmap_names, output_size: int, strides=(4, 8, 16, 32),
                 finest_scale: float = 56.0):
        super().__init__(featmap_names, output_size, sampling_ratio=0)
        self.strides = tuple(int(s) for s in strides)
        self.finest_scale = float(finest_scale)
        if len(self.strides) != len(self.featmap_names):
            raise ValueError("one stride per feature map")

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes=None) -> Tensor:
        feats = [x[k] for k in self.featmap_names]
        rois = boxes_to_rois([_f32(b) for b in boxes])  # float32 under AMP too
        levels = map_roi_levels(rois[:, 1:], len(feats), self.finest_scale)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == lvl)[0]
            if idx.numel():
                f = _f32(feat)
                out[idx] = roi_align(f, rois[idx].to(f.dtype), self.output_size,
                                     spatial_scale=1.0 / stride,
                                     sampling_ratio=0, aligned=True).to(out.dtype)
        return out


# ---- masks -------------------------------------------------------------------------
def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int,
                max_elements: int = 1 << 25) -> Tensor:
    """mmdet's ``_do_paste_mask``: each (M, M) mask sampled bilinearly
    (grid_sample, align_corners=False, zeros outside) at the pixel centres of its box
    in a (height, width) image. Returns (N, height, width) float.

    torchvision's paste_masks_in_image pads the mask by one pixel, enlarges the box,
    rounds it to integers and resizes per RoI, which moves mask borders."""
    n = masks.shape[0]
    out = masks.new_zeros((n, height, width), dtype=torch.float32)
    if n == 0 or height == 0 or width == 0:
        return out
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    step = max(1, max_elements // (height * width))
    boxes = boxes.to(torch.float32)
    for s in range(0, n, step):  # chunks bound the (n, H, W, 2) sampling grid
        b = boxes[s:s + step]
        x0, y0, x1, y1 = (b[:, i:i + 1] for i in range(4))
        gx = (xs[None] - x0) / (x1 - x0) * 2 - 1
        gy = (ys[None] - y0) / (y1 - y0) * 2 - 1
        gx = torch.where(torch.isinf(gx), torch.zeros_like(gx), gx)
        gy = torch.where(torch.isinf(gy), torch.zeros_like(gy), gy)
        k = b.shape[0]
        grid = torch.stack([gx[:, None, :].expand(k, height, width),
                            gy[:, :, None].expand(k, height, width)], dim=3)
        out[s:s + step] = F.grid_sample(masks[s:s + step, None].to(torch.float32), grid,
                                        mode="bilinear", padding_mode="zeros",
                                        align_corners=False)[:, 0]
    return out


def mask_targets(gt_masks: Tensor, proposals: Tensor, matched_idxs: Tensor, size: int,
                 pad_divisor: int = 32) -> Tensor:
    """mmdet's mask_target: the matched ground-truth mask cropped to each proposal by
    aligned RoIAlign (adaptive sampling) to size x size, binarised at 0.5 (torchvision:
    unaligned, soft targets). The masks are first zero-padded as mmdet's Pad leaves them
    (to a multiple of ``pad_divisor``), which matters for samples in the last pixel."""
    h, w = gt_masks.shape[-2:]
    ph, pw = -(-h // pad_divisor) * pad_divisor, -(-w // pad_divisor) * pad_divisor
    masks = F.pad(gt_masks.to(proposals.dtype), (0, pw - w, 0, ph - h))
    rois = torch.cat([matched_idxs[:, None].to(proposals), proposals], dim=1)
    t = roi_align(masks[:, None], rois, (size, size), spatial_scale=1.0,
                  sampling_ratio=0, aligned=True)[:, 0]
    return (t >= 0.5).to(proposals.dtype)


# ---- RPN ---------------------------------------------------------------------------
class MMDetRPN(RegionProposalNetwork):
    """torchvision's RPN with mmdet 2.28's RPNHead behaviour:

    * proposals: per level the ``nms_pre`` best by sigmoid score, decoded and clipped,
      boxes with zero width or height dropped (torchvision: below 1e-3), NMS per
      level, the first ``max_per_img`` (torchvision does the same but for the size rule);
    * losses: L1 on the positive anchors' deltas over the sampled count
      (torchvision: smooth L1 with beta 1/9); BCE over the sampled anchors;
    * assignment: MaxIoUAssigner's ``min_pos_iou`` (see MMDetMatcher)."""

    def __init__(self, *args, min_pos_iou: float = 0.3, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_coder = MMDetBoxCoder((1.0, 1.0, 1.0, 1.0))
        m = self.proposal_matcher
        self.proposal_matcher = MMDetMatcher(m.high_threshold, m.low_threshold, min_pos_iou)

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        n_img = proposals.shape[0]
        scores_all = _f32(objectness.detach()).reshape(n_img, -1).sigmoid()
        pre = self.pre_nms_top_n()
        boxes_out, scores_out = [], []
        for i in range(n_img):
            sel_boxes, sel_scores, sel_lvl = [], [], []
            start = 0
            for lvl, n in enumerate(num_anchors_per_level):
                s = scores_all[i, start:start + n]
                b = proposals[i, start:start + n]
                if 0 < pre < n:
                    s, order = s.sort(descending=True, stable=True)
                    s, b = s[:pre], b[order[:pre]]
                sel_boxes.append(b)
                sel_scores.append(s)
                sel_lvl.append(torch.full_like(s, lvl, dtype=torch.int64))
                start += n
            b = clip_boxes(torch.cat(sel_boxes), image_shapes[i])
            s, lv = torch.cat(sel_scores), torch.cat(sel_lvl)
            wh = b[:, 2:] - b[:, :2]
            ok = (wh[:, 0] > 0) & (wh[:, 1] > 0)
            b, s, lv = b[ok], s[ok], lv[ok]
            keep = batched_nms(b, s, lv, self.nms_thresh)[: self.post_nms_top_n()]
            boxes_out.append(b[keep])
            scores_out.append(s[keep])
        return boxes_out, scores_out

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        objectness, pred_bbox_deltas = _f32(objectness), _f32(pred_bbox_deltas)
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        neg = torch.where(torch.cat(neg))[0]
        sampled = torch.cat([pos, neg])
        labels = torch.cat(labels)
        targets = torch.cat(regression_targets)
        n = max(sampled.numel(), 1)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / n
        obj_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled],
                                                      labels[sampled], reduction="sum") / n
        return obj_loss, box_loss


# ---- RoI heads ---------------------------------------------------------------------
class MMDetRoIHeads(RoIHeads):
    """torchvision's RoIHeads (same modules, same keys) with mmdet 2.28's
    StandardRoIHead behaviour.

    Test: softmax scores; class-specific boxes decoded (both-side clamp) and clipped to
    the resized image; **divided by the scale factors before** the class-wise NMS
    (score > 0.05, IoU 0.5, 100 per image; no small-box removal), so boxes and NMS are
    in original-image pixels; mask RoIs = those boxes times the scale factors; masks
    (sigmoid of the label's channel) pasted into the original image by
    :func:`paste_masks`. Outputs torchvision's dicts, labels 1..K.

    Train: MaxIoUAssigner with ``min_pos_iou`` (0.5), CE over the sampled RoIs, L1 on
    the positives' class deltas over the sampled count, BCE against aligned,
    binarised mask targets (:func:`mask_targets`)."""

    def __init__(self, *args, min_pos_iou: float = 0.5, mask_threshold: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_coder = MMDetBoxCoder((0.1, 0.1, 0.2, 0.2))
        m = self.proposal_matcher
        self.proposal_matcher = MMDetMatcher(m.high_threshold, m.low_threshold, min_pos_iou)
        self.mask_threshold = mask_threshold  # mmdet binarises with mask >= threshold
        self.mask_pad_divisor = 32  # mmdet's Pad(size_divisor=32) also pads the gt masks

    def forward(self, features, proposals, image_shapes, targets=None, original_sizes=None):
        if self.training:
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes, original_sizes or image_shapes), {}

    # -- inference --
    def box_outputs(self, features, proposals, image_shapes):
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(x)
        return _f32(class_logits), _f32(box_regression)

    def detect(self, features, proposals, image_shapes, original_sizes):
        counts = [len(p) for p in proposals]
        class_logits, box_regression = self.box_outputs(features, proposals, image_shapes)
        scores_all = F.softmax(class_logits, dim=-1).split(counts)
        boxes_all = self.box_coder.decode(box_regression, proposals).split(counts)
        results, factors = [], []
        for boxes, scores, shape, orig in zip(boxes_all, scores_all, image_shapes, original_sizes):
            sf = scale_factor(orig, shape, boxes.device)
            boxes = clip_boxes(boxes, shape) / sf
            boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:]
            labels = torch.arange(1, scores.shape[1] + 1, device=scores.device)
            labels = labels[None].expand_as(scores).reshape(-1)
            scores = scores.reshape(-1)
            ok = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
            factors.append(sf)
        if self.has_mask():
            self.add_masks(features, results, factors, image_shapes, original_sizes)
        return results

    def add_masks(self, features, results, factors, image_shapes, original_sizes):
        mask_boxes = [r["boxes"] * sf for r, sf in zip(results, factors)]
        counts = [len(b) for b in mask_boxes]
        if sum(counts) == 0:
            for r, (h, w) in zip(results, original_sizes):
                r["masks"] = r["boxes"].new_zeros((0, 1, h, w))
            return
        x = self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes))
        logits = self.mask_predictor(x)
        labels = torch.cat([r["labels"] for r in results])
        probs = _f32(logits[torch.arange(len(labels), device=labels.device), labels]).sigmoid()
        for r, p, mb, sf, (h, w) in zip(results, probs.split(counts), mask_boxes, factors,
                                        original_sizes):
            r["masks"] = paste_masks(p, mb / sf, h, w)[:, None]

    # -- training --
    def losses(self, features, proposals, image_shapes, targets):
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
            proposals, targets)
        class_logits, box_regression = self.box_outputs(features, proposals, image_shapes)
        labels_all = torch.cat(labels)
        reg_targets = torch.cat(regression_targets)
        n = max(labels_all.numel(), 1)
        loss_cls = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        box_regression = box_regression.reshape(box_regression.shape[0], -1, 4)
        loss_box = F.l1_loss(box_regression[pos, labels_all[pos]], reg_targets[pos],
                             reduction="sum") / n
        out = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if self.has_mask():
            pos_props, pos_matched, pos_labels = [], [], []
            for p, m, lab in zip(proposals, matched_idxs, labels):
                keep = torch.where(lab > 0)[0]
                pos_props.append(p[keep])
                pos_matched.append(m[keep])
                pos_labels.append(lab[keep])
            logits = self.mask_predictor(self.mask_head(
                self.mask_roi_pool(features, pos_props, image_shapes)))
            lab = torch.cat(pos_labels)
            if lab.numel() == 0:
                out["loss_mask"] = logits.sum() * 0
            else:
                tgt = torch.cat([mask_targets(t["masks"], p, m, logits.shape[-1],
                                              self.mask_pad_divisor)
                                 for t, p, m in zip(targets, pos_props, pos_matched) if len(p)])
                picked = _f32(logits[torch.arange(len(lab), device=lab.device), lab])
                out["loss_mask"] = F.binary_cross_entropy_with_logits(picked, tgt)
        return out
