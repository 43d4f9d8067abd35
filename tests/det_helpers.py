"""Plain re-implementations of mmdet 2.28 / mmcv behaviour (loops and numpy, float64),
the references the Mask R-CNN tests check the model against. Written from the
documented semantics, independently of ``transnext.tasks.detection``."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def rescale_size(h, w, short=800, long=1333):
    s = min(long / max(h, w), short / min(h, w))
    return int(h * s + 0.5), int(w * s + 0.5)


def bilinear_matrix(n_in, n_out):
    """(n_out, n_in) weights of a half-pixel bilinear resize without antialiasing."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        if i0 >= n_in - 1:
            m[o, n_in - 1] = 1.0
            continue
        frac = src - i0
        m[o, i0] += 1 - frac
        m[o, i0 + 1] += frac
    return m


def resize_image(img, nh, nw):
    """img (C, H, W) -> (C, nh, nw)."""
    c, h, w = img.shape
    my, mx = bilinear_matrix(h, nh), bilinear_matrix(w, nw)
    return np.stack([my @ img[i] @ mx.T for i in range(c)])


def nearest_resize(mask, nh, nw):
    h, w = mask.shape[-2:]
    ys = [min(int(math.floor(y * h / nh)), h - 1) for y in range(nh)]
    xs = [min(int(math.floor(x * w / nw)), w - 1) for x in range(nw)]
    return mask[..., ys, :][..., :, xs]


def base_anchors(stride, scales=(8,), ratios=(0.5, 1.0, 2.0)):
    out = []
    for r in ratios:  # ratio-major, scales inner (scale_major)
        for s in scales:
            hr = math.sqrt(r)
            wr = 1 / hr
            ws, hs = stride * wr * s, stride * hr * s
            out.append([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs])
    return np.array(out)


def grid_anchors(sizes, strides=(4, 8, 16, 32, 64)):
    levels = []
    for (fh, fw), s in zip(sizes, strides):
        base = base_anchors(s)
        rows = []
        for y in range(fh):
            for x in range(fw):
                for b in base:
                    rows.append([b[0] + x * s, b[1] + y * s, b[2] + x * s, b[3] + y * s])
        levels.append(np.array(rows).reshape(-1, 4))
    return levels


def level_of(box, finest=56.0, levels=4):
    s = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    lv = math.floor(math.log2(s / finest + 1e-6)) if s > 0 else 0
    return min(max(lv, 0), levels - 1)


def _bilinear(f, y, x):
    c, h, w = f.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(c)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * f[:, y0, x0] + hy * lx * f[:, y0, x1] + ly * hx * f[:, y1, x0] + ly * lx * f[:, y1, x1]


def roi_align_aligned(f, box, scale, out):
    """mmcv RoIAlign(aligned=True, sampling_ratio=0, avg) of one box on f (C, H, W)."""
    x1, y1, x2, y2 = [v * scale - 0.5 for v in box]
    rw, rh = x2 - x1, y2 - y1
    bw, bh = rw / out, rh / out
    gw, gh = math.ceil(rw / out), math.ceil(rh / out)
    count = max(gw * gh, 1)
    res = np.zeros((f.shape[0], out, out))
    for ph in range(out):
        for pw in range(out):
            acc = np.zeros(f.shape[0])
            for iy in range(gh):
                yy = y1 + ph * bh + (iy + 0.5) * bh / gh
                for ix in range(gw):
                    xx = x1 + pw * bw + (ix + 0.5) * bw / gw
                    acc += _bilinear(f, yy, xx)
            res[:, ph, pw] = acc / count
    return res


def paste(mask, box, h, w):
    """_do_paste_mask: mask (M, M) sampled at the pixel centres of box in an (h, w)
    image; grid_sample's bilinear with zeros outside, align_corners=False."""
    m = mask.shape[0]
    x0, y0, x1, y1 = box
    gx = ((np.arange(w) + 0.5) - x0) / (x1 - x0) * 2 - 1
    gy = ((np.arange(h) + 0.5) - y0) / (y1 - y0) * 2 - 1
    ix = ((gx + 1) * m - 1) / 2  # unnormalised source coordinates
    iy = ((gy + 1) * m - 1) / 2
    out = np.zeros((h, w))
    for yi in range(h):
        fy = math.floor(iy[yi])
        for xi in range(w):
            fx = math.floor(ix[xi])
            val = 0.0
            for dy in (0, 1):
                for dx in (0, 1):
                    yy, xx = fy + dy, fx + dx
                    wy = (iy[yi] - fy) if dy else (1 - (iy[yi] - fy))
                    wx = (ix[xi] - fx) if dx else (1 - (ix[xi] - fx))
                    if 0 <= yy < m and 0 <= xx < m:
                        val += wy * wx * mask[yy, xx]
            out[yi, xi] = val
    return out


def delta2bbox(rois, deltas, stds, max_shape=None):
    """mmdet DeltaXYWHBBoxCoder.decode (means 0); rois (N, 4), deltas (N, 4k) -> (N, 4k)."""
    rois, deltas = np.asarray(rois, np.float64), np.asarray(deltas, np.float64)
    n, k = deltas.shape[0], deltas.shape[1] // 4
    out = np.zeros_like(deltas)
    clip = abs(math.log(16 / 1000))
    for i in range(n):
        px, py = (rois[i, 0] + rois[i, 2]) / 2, (rois[i, 1] + rois[i, 3]) / 2
        pw, ph = rois[i, 2] - rois[i, 0], rois[i, 3] - rois[i, 1]
        for j in range(k):
            dx, dy, dw, dh = deltas[i, 4 * j:4 * j + 4] * np.asarray(stds)
            dw, dh = min(max(dw, -clip), clip), min(max(dh, -clip), clip)
            gx, gy = px + pw * dx, py + ph * dy
            gw, gh = pw * math.exp(dw), ph * math.exp(dh)
            b = [gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2]
            if max_shape is not None:
                b = [min(max(b[0], 0), max_shape[1]), min(max(b[1], 0), max_shape[0]),
                     min(max(b[2], 0), max_shape[1]), min(max(b[3], 0), max_shape[0])]
            out[i, 4 * j:4 * j + 4] = b
    return out


def nms(boxes, scores, thr):
    """Greedy NMS; indices kept, by decreasing score."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep, dead = [], set()
    for a, i in enumerate(order):
        if i in dead:
            continue
        keep.append(i)
        for j in order[a + 1:]:
            if j in dead:
                continue
            xx1, yy1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            xx2, yy2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(xx2 - xx1, 0) * max(yy2 - yy1, 0)
            ai = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            aj = (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])
            if inter / (ai + aj - inter) > thr:
                dead.add(j)
    return keep


def assign(ious, pos_thr, neg_thr, min_pos_iou):
    """mmdet MaxIoUAssigner (match_low_quality, gt_max_assign_all) on ious (G, N), in
    torchvision's convention: gt index, -1 background, -2 ignored."""
    g, n = len(ious), len(ious[0])
    out = [-2] * n
    for j in range(n):
        col = [ious[i][j] for i in range(g)]
        best = max(col)
        arg = col.index(best)
        if best < neg_thr:
            out[j] = -1
        if best >= pos_thr:
            out[j] = arg
    for i in range(g):
        best = max(ious[i])
        if best >= min_pos_iou:
            for j in range(n):
                if ious[i][j] == best:
                    out[j] = i
    return out


# ---- the original heads' forward on mmdet-named weights --------------------------------
def fpn(feats, sd):
    lat = [F.conv2d(f, sd[f"neck.lateral_convs.{i}.conv.weight"],
                    sd[f"neck.lateral_convs.{i}.conv.bias"]) for i, f in enumerate(feats)]
    for i in range(len(lat) - 1, 0, -1):
        h, w = lat[i - 1].shape[-2:]
        hs, ws = lat[i].shape[-2:]
        ys = [min(int(math.floor(y * hs / h)), hs - 1) for y in range(h)]
        xs = [min(int(math.floor(x * ws / w)), ws - 1) for x in range(w)]
        lat[i - 1] = lat[i - 1] + lat[i][:, :, ys][:, :, :, xs]
    outs = [F.conv2d(x, sd[f"neck.fpn_convs.{i}.conv.weight"], sd[f"neck.fpn_convs.{i}.conv.bias"],
                     padding=1) for i, x in enumerate(lat)]
    outs.append(outs[-1][:, :, ::2, ::2])  # max_pool2d(kernel 1, stride 2)
    return outs


def rpn_head(x, sd):
    t = F.relu(F.conv2d(x, sd["rpn_head.rpn_conv.weight"], sd["rpn_head.rpn_conv.bias"], padding=1))
    return (F.conv2d(t, sd["rpn_head.rpn_cls.weight"], sd["rpn_head.rpn_cls.bias"]),
            F.conv2d(t, sd["rpn_head.rpn_reg.weight"], sd["rpn_head.rpn_reg.bias"]))


def bbox_head(roi_feats, sd):
    """Shared2FCBBoxHead: (softmax scores with background last, class deltas)."""
    x = roi_feats.flatten(1)
    for i in range(2):
        x = F.relu(x @ sd[f"roi_head.bbox_head.shared_fcs.{i}.weight"].T
                   + sd[f"roi_head.bbox_head.shared_fcs.{i}.bias"])
    cls = x @ sd["roi_head.bbox_head.fc_cls.weight"].T + sd["roi_head.bbox_head.fc_cls.bias"]
    reg = x @ sd["roi_head.bbox_head.fc_reg.weight"].T + sd["roi_head.bbox_head.fc_reg.bias"]
    return torch.softmax(cls, dim=-1), reg


def mask_head(roi_feats, sd):
    """FCNMaskHead logits (N, K, 28, 28)."""
    x = roi_feats
    for i in range(4):
        x = F.relu(F.conv2d(x, sd[f"roi_head.mask_head.convs.{i}.conv.weight"],
                            sd[f"roi_head.mask_head.convs.{i}.conv.bias"], padding=1))
    x = F.relu(F.conv_transpose2d(x, sd["roi_head.mask_head.upsample.weight"],
                                  sd["roi_head.mask_head.upsample.bias"], stride=2))
    return F.conv2d(x, sd["roi_head.mask_head.conv_logits.weight"],
                    sd["roi_head.mask_head.conv_logits.bias"])


def to_mmdet_heads(tv: dict) -> dict:
    """torchvision-layout weights -> mmdet names and layout (background last in the
    classifier; no background slot in box and mask outputs), for the keys present."""
    names = {"backbone.fpn.inner_blocks.{i}.0.{p}": "neck.lateral_convs.{i}.conv.{p}",
             "backbone.fpn.layer_blocks.{i}.0.{p}": "neck.fpn_convs.{i}.conv.{p}",
             "roi_heads.mask_head.{i}.0.{p}": "roi_head.mask_head.convs.{i}.conv.{p}",
             "rpn.head.conv.0.0.{p}": "rpn_head.rpn_conv.{p}",
             "rpn.head.cls_logits.{p}": "rpn_head.rpn_cls.{p}",
             "rpn.head.bbox_pred.{p}": "rpn_head.rpn_reg.{p}",
             "roi_heads.box_head.fc6.{p}": "roi_head.bbox_head.shared_fcs.0.{p}",
             "roi_heads.box_head.fc7.{p}": "roi_head.bbox_head.shared_fcs.1.{p}",
             "roi_heads.box_predictor.cls_score.{p}": "roi_head.bbox_head.fc_cls.{p}",
             "roi_heads.box_predictor.bbox_pred.{p}": "roi_head.bbox_head.fc_reg.{p}",
             "roi_heads.mask_predictor.conv5_mask.{p}": "roi_head.mask_head.upsample.{p}",
             "roi_heads.mask_predictor.mask_fcn_logits.{p}": "roi_head.mask_head.conv_logits.{p}"}
    out = {}
    for src, dst in names.items():
        for i in range(4):
            for p in ("weight", "bias"):
                k = src.format(i=i, p=p)
                if k not in tv:
                    continue
                v = tv[k]
                if "cls_score" in k:
                    v = torch.cat([v[1:], v[:1]])  # background first -> last
                elif "bbox_pred" in k and k.startswith("roi_heads"):
                    v = v[4:]
                elif "mask_fcn_logits" in k:
                    v = v[1:]
                out[dst.format(i=i, p=p)] = v
    return out
