"""A plain, functional re-implementation of mmdet 3.0 DINO's inference forward, run
directly on a released-layout state dict (mmdet key names, no ``backbone.*`` keys needed)
and given backbone feature maps. It is the reference the converter test compares our
model against, written from /work/dino_facts.md only (not from our model's code).

Everything is computed in the dtype of the feature maps (the tests use float64), with
explicit loops where they make the formula easier to check; speed is not a goal.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

EMBED = 256
HEADS = 8
GN_GROUPS = 32
LN_EPS = 1e-5
GN_EPS = 1e-5


# ----------------------------------------------------------------------------
# small building blocks on the state dict
# ----------------------------------------------------------------------------

def _linear(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _layer_norm(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], LN_EPS)


def _ffn(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    """mmcv FFN: Linear -> ReLU -> Linear, plus the identity (dropouts are 0)."""
    h = F.relu(_linear(x, sd, f"{name}.layers.0.0"))
    return x + _linear(h, sd, f"{name}.layers.1")


def _reg_branch(x: Tensor, sd: dict[str, Tensor], i: int) -> Tensor:
    """bbox_head.reg_branches[i]: Linear ReLU Linear ReLU Linear (keys .0 .2 .4)."""
    p = f"bbox_head.reg_branches.{i}"
    x = F.relu(_linear(x, sd, f"{p}.0"))
    x = F.relu(_linear(x, sd, f"{p}.2"))
    return _linear(x, sd, f"{p}.4")


def _cls_branch(x: Tensor, sd: dict[str, Tensor], i: int) -> Tensor:
    return _linear(x, sd, f"bbox_head.cls_branches.{i}")


def inverse_sigmoid(x: Tensor, eps: float) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _layer_count(sd: dict[str, Tensor], prefix: str) -> int:
    n = 0
    while f"{prefix}.{n}.norms.0.weight" in sd:
        n += 1
    return n


# ----------------------------------------------------------------------------
# neck, masks, positional encodings
# ----------------------------------------------------------------------------

def plain_neck(sd: dict[str, Tensor], feats: list[Tensor]) -> list[Tensor]:
    """ChannelMapper: 1x1 conv (no bias) + GN(32) per map, and one extra 3x3 stride-2
    conv + GN on the LAST backbone map (not on its 256-channel mapped version)."""
    outs = []
    for i, f in enumerate(feats):
        x = F.conv2d(f, sd[f"neck.convs.{i}.conv.weight"])
        outs.append(F.group_norm(x, GN_GROUPS, sd[f"neck.convs.{i}.gn.weight"],
                                 sd[f"neck.convs.{i}.gn.bias"], GN_EPS))
    x = F.conv2d(feats[-1], sd["neck.extra_convs.0.conv.weight"], stride=2, padding=1)
    outs.append(F.group_norm(x, GN_GROUPS, sd["neck.extra_convs.0.gn.weight"],
                             sd["neck.extra_convs.0.gn.bias"], GN_EPS))
    return outs


def padding_masks(img_shapes: list[tuple[int, int]], batch_shape: tuple[int, int],
                  sizes: list[tuple[int, int]]) -> list[Tensor]:
    """Per level (B, H, W) bool, True on padding: the input-resolution mask resized nearest."""
    mask = torch.ones(len(img_shapes), *batch_shape, dtype=torch.bool)
    for b, (h, w) in enumerate(img_shapes):
        mask[b, :h, :w] = False
    return [F.interpolate(mask[None].float(), size=s)[0].bool() for s in sizes]


def sine_encoding(mask: Tensor, dtype: torch.dtype, num_feats: int = 128,
                  temperature: float = 20.0, eps: float = 1e-6) -> Tensor:
    """SinePositionalEncoding(normalize=True, offset=0, scale=2*pi): (B, 2*num_feats, H, W),
    the y half first; sin on even, cos on odd channels, interleaved."""
    scale = 2 * math.pi
    not_mask = (~mask).to(dtype)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    k = torch.arange(num_feats, dtype=dtype)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)
    halves = []
    for coord in (y, x):
        p = coord[..., None] / dim_t                                   # (B, H, W, F)
        p = torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=4).flatten(3)
        halves.append(p)
    return torch.cat(halves, dim=3).permute(0, 3, 1, 2)


def coordinate_encoding(coord: Tensor, num_feats: int = 128,
                        temperature: float = 10000.0) -> Tensor:
    """mmdet's coordinate_to_encoding for 4-d boxes: (..., 4) -> (..., 4*num_feats),
    blocks in the order y, x, w, h."""
    scale = 2 * math.pi
    k = torch.arange(num_feats, dtype=coord.dtype)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)
    enc = []
    for i in range(4):  # x, y, w, h
        p = (coord[..., i] * scale)[..., None] / dim_t
        enc.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2))
    x, y, w, h = enc
    return torch.cat((y, x, w, h), dim=-1)


def valid_ratios_of(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 2) as (x, y): the unpadded share of a level's width and height."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(dtype)
    valid_w = (~mask[:, 0, :]).sum(1).to(dtype)
    return torch.stack([valid_w / W, valid_h / H], -1)


# ----------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------

def deformable_attention(sd: dict[str, Tensor], name: str, query: Tensor, query_pos: Tensor,
                         value: Tensor, key_padding_mask: Tensor, reference: Tensor,
                         shapes: list[tuple[int, int]], num_heads: int = HEADS) -> Tensor:
    """mmcv MultiScaleDeformableAttention, returning identity (= query without pos) + out.

    query (B, Q, C), value (B, S, C), key_padding_mask (B, S) True on padding,
    reference (B, Q, L, 2) points or (B, Q, L, 4) boxes, normalised to [0, 1]."""
    B, Q, C = query.shape
    L = len(shapes)
    D = C // num_heads
    P = sd[f"{name}.sampling_offsets.weight"].shape[0] // (num_heads * L * 2)
    q = query + query_pos
    v = _linear(value, sd, f"{name}.value_proj")
    v = v.masked_fill(key_padding_mask[..., None], 0.0)
    off = _linear(q, sd, f"{name}.sampling_offsets").view(B, Q, num_heads, L, P, 2)
    aw = _linear(q, sd, f"{name}.attention_weights").view(B, Q, num_heads, L * P)
    aw = aw.softmax(-1).view(B, Q, num_heads, L, P)

    out = query.new_zeros(B * num_heads, D, Q)
    start = 0
    for lvl, (H, W) in enumerate(shapes):
        if reference.shape[-1] == 2:
            ref = reference[:, :, lvl][:, :, None, None, :]             # (B, Q, 1, 1, 2)
            norm = torch.tensor([W, H], dtype=query.dtype)
            loc = ref + off[:, :, :, lvl] / norm                      # (B, Q, M, P, 2)
        else:
            ref = reference[:, :, lvl][:, :, None, None, :]             # (B, Q, 1, 1, 4)
            loc = ref[..., :2] + off[:, :, :, lvl] / P * ref[..., 2:] * 0.5
        # this level's value as one (D, H, W) image per (batch, head)
        v_l = v[:, start:start + H * W].reshape(B, H * W, num_heads, D)
        v_l = v_l.permute(0, 2, 3, 1).reshape(B * num_heads, D, H, W)
        grid = (2 * loc - 1).permute(0, 2, 1, 3, 4).reshape(B * num_heads, Q, P, 2)
        sampled = F.grid_sample(v_l, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)                  # (B*M, D, Q, P)
        w_l = aw[:, :, :, lvl].permute(0, 2, 1, 3).reshape(B * num_heads, 1, Q, P)
        out = out + (sampled * w_l).sum(-1)
        start += H * W
    out = out.reshape(B, num_heads * D, Q).transpose(1, 2)            # heads major
    return query + _linear(out, sd, f"{name}.output_proj")


def self_attention(sd: dict[str, Tensor], name: str, query: Tensor, query_pos: Tensor,
                   attn_mask: Tensor | None = None, num_heads: int = HEADS) -> Tensor:
    """nn.MultiheadAttention (mmcv's `.attn`) with q = k = query + pos, v = query;
    attn_mask bool, True = may not attend. Returns identity + out."""
    B, Q, C = query.shape
    D = C // num_heads
    wq, wk, wv = sd[f"{name}.attn.in_proj_weight"].chunk(3, dim=0)
    bq, bk, bv = sd[f"{name}.attn.in_proj_bias"].chunk(3, dim=0)
    qk_in = query + query_pos
    q = F.linear(qk_in, wq, bq).view(B, Q, num_heads, D).transpose(1, 2)   # (B, M, Q, D)
    k = F.linear(qk_in, wk, bk).view(B, Q, num_heads, D).transpose(1, 2)
    v = F.linear(query, wv, bv).view(B, Q, num_heads, D).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Q, C)
    return query + _linear(out, sd, f"{name}.attn.out_proj")


# ----------------------------------------------------------------------------
# encoder, query selection, decoder
# ----------------------------------------------------------------------------

def encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """(B, S, L, 2): each token's pixel centre, normalised by its level's valid size, then
    seen from every level (times that level's valid ratio)."""
    dtype = valid_ratios.dtype
    refs = []
    for lvl, (H, W) in enumerate(shapes):
        ry, rx = torch.meshgrid(torch.linspace(0.5, H - 0.5, H, dtype=dtype),
                                torch.linspace(0.5, W - 0.5, W, dtype=dtype), indexing="ij")
        ry = ry.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
        rx = rx.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
        refs.append(torch.stack((rx, ry), -1))
    ref = torch.cat(refs, 1)
    return ref[:, :, None] * valid_ratios[:, None]


def encoder_proposals(memory: Tensor, memory_mask: Tensor, shapes: list[tuple[int, int]]
                      ) -> tuple[Tensor, Tensor]:
    """gen_encoder_output_proposals: (output memory (B, S, C) with padded / invalid tokens
    zeroed, proposals (B, S, 4) in inverse-sigmoid space, inf where padded / invalid)."""
    B = memory.shape[0]
    props = []
    start = 0
    for lvl, (H, W) in enumerate(shapes):
        m = memory_mask[:, start:start + H * W].view(B, H, W)
        valid_h = (~m[:, :, 0]).sum(1).to(memory.dtype)
        valid_w = (~m[:, 0, :]).sum(1).to(memory.dtype)
        gy, gx = torch.meshgrid(torch.linspace(0, H - 1, H, dtype=memory.dtype),
                                torch.linspace(0, W - 1, W, dtype=memory.dtype), indexing="ij")
        grid = torch.stack([gx, gy], -1)                                     # (H, W, 2)
        grid = (grid[None] + 0.5) / torch.stack([valid_w, valid_h], -1).view(B, 1, 1, 2)
        wh = torch.ones_like(grid) * 0.05 * 2.0 ** lvl
        props.append(torch.cat((grid, wh), -1).view(B, -1, 4))
        start += H * W
    p = torch.cat(props, 1)
    valid = ((p > 0.01) & (p < 0.99)).all(-1, keepdim=True)
    p = torch.log(p / (1 - p))
    p = p.masked_fill(memory_mask[..., None], float("inf")).masked_fill(~valid, float("inf"))
    out = memory.masked_fill(memory_mask[..., None], 0.0).masked_fill(~valid, 0.0)
    return out, p


def plain_dino_head(sd: dict[str, Tensor], feats: list[Tensor],
                    img_shapes: list[tuple[int, int]], batch_shape: tuple[int, int], *,
                    num_levels: int, num_queries: int = 900,
                    trace: dict | None = None) -> dict[str, Tensor]:
    """DINO's eval forward from the backbone maps the neck takes (3 for 4-scale, 4 for
    5-scale) to the head's outputs: cls (6, B, Q, K) logits, boxes (6, B, Q, 4) sigmoid
    cxcywh normalised to each img_shape, enc_cls (B, Q, K) and enc_boxes (B, Q, 4) of the
    selected encoder proposals. ``trace``, if given, receives the intermediate tensors."""
    if len(feats) + 1 != num_levels:
        raise ValueError(f"{len(feats)} backbone maps give {len(feats) + 1} levels, "
                         f"not num_levels={num_levels}")
    t = trace if trace is not None else {}
    dtype = feats[0].dtype
    B = feats[0].shape[0]
    n_enc = _layer_count(sd, "encoder.layers")
    n_dec = _layer_count(sd, "decoder.layers")

    # ---- neck, masks, positions, flattening
    mlvl = plain_neck(sd, feats)
    t["neck"] = mlvl
    shapes = [tuple(f.shape[-2:]) for f in mlvl]
    masks = padding_masks(img_shapes, batch_shape, shapes)
    tokens, pos, flat_masks = [], [], []
    for lvl, (f, m) in enumerate(zip(mlvl, masks)):
        tokens.append(f.flatten(2).transpose(1, 2))                                # (B, HW, C)
        pe = sine_encoding(m, dtype).flatten(2).transpose(1, 2)
        pos.append(pe + sd["level_embed"][lvl].view(1, 1, -1))
        flat_masks.append(m.flatten(1))
    x = torch.cat(tokens, 1)
    pos = torch.cat(pos, 1)
    mask = torch.cat(flat_masks, 1)
    valid_ratios = torch.stack([valid_ratios_of(m, dtype) for m in masks], 1)  # (B, L, 2)
    t["valid_ratios"] = valid_ratios
    t["pos"] = pos

    # ---- encoder (post-norm)
    ref = encoder_reference_points(shapes, valid_ratios)
    for i in range(n_enc):
        p = f"encoder.layers.{i}"
        x = deformable_attention(sd, f"{p}.self_attn", x, pos, x, mask, ref, shapes)
        x = _layer_norm(x, sd, f"{p}.norms.0")
        x = _layer_norm(_ffn(x, sd, f"{p}.ffn"), sd, f"{p}.norms.1")
    memory = x
    t["memory"] = memory

    # ---- two-stage query selection
    out_mem, proposals = encoder_proposals(memory, mask, shapes)
    out_mem = _layer_norm(_linear(out_mem, sd, "memory_trans_fc"), sd, "memory_trans_norm")
    enc_cls_all = _cls_branch(out_mem, sd, n_dec)
    enc_coord_all = _reg_branch(out_mem, sd, n_dec) + proposals
    topk = torch.topk(enc_cls_all.max(-1).values, k=num_queries, dim=1).indices     # (B, Q)
    enc_cls = torch.gather(enc_cls_all, 1, topk[..., None].expand(-1, -1, enc_cls_all.shape[-1]))
    coords_unact = torch.gather(enc_coord_all, 1, topk[..., None].expand(-1, -1, 4))
    t["proposals"] = proposals
    t["topk"] = topk
    query = sd["query_embedding.weight"][None].expand(B, -1, -1)
    reference = coords_unact.sigmoid()

    # ---- decoder: post-norm layers, refinement with look forward twice
    refs = [reference]
    hidden = []
    vr4 = torch.cat([valid_ratios, valid_ratios], -1)[:, None]                # (B, 1, L, 4)
    for i in range(n_dec):
        p = f"decoder.layers.{i}"
        ref_in = reference[:, :, None] * vr4                                    # (B, Q, L, 4)
        sine = coordinate_encoding(ref_in[:, :, 0, :])
        query_pos = _linear(F.relu(_linear(sine, sd, "decoder.ref_point_head.layers.0")),
                            sd, "decoder.ref_point_head.layers.1")
        query = _layer_norm(self_attention(sd, f"{p}.self_attn", query, query_pos),
                            sd, f"{p}.norms.0")
        query = _layer_norm(deformable_attention(sd, f"{p}.cross_attn", query, query_pos,
                                                 memory, mask, ref_in, shapes),
                            sd, f"{p}.norms.1")
        query = _layer_norm(_ffn(query, sd, f"{p}.ffn"), sd, f"{p}.norms.2")
        new_ref = (_reg_branch(query, sd, i) + inverse_sigmoid(reference, 1e-3)).sigmoid()
        reference = new_ref  # (detached in training; same values)
        hidden.append(_layer_norm(query, sd, "decoder.norm"))
        refs.append(new_ref)
    t["hidden"] = hidden
    t["refs"] = refs

    # ---- head: layer l predicts relative to refs[l]
    cls, boxes = [], []
    for i in range(n_dec):
        cls.append(_cls_branch(hidden[i], sd, i))
        boxes.append((_reg_branch(hidden[i], sd, i) + inverse_sigmoid(refs[i], 1e-5)).sigmoid())
    return {"cls": torch.stack(cls), "boxes": torch.stack(boxes),
            "enc_cls": enc_cls, "enc_boxes": coords_unact.sigmoid()}


def plain_dino_predict(out: dict[str, Tensor], img_shapes: list[tuple[int, int]],
                       scale_factors: list[tuple[float, float]], max_per_img: int = 300
                       ) -> list[dict[str, Tensor]]:
    """mmdet's DINO post-processing of the last layer: top ``max_per_img`` (query, class)
    pairs by sigmoid score; boxes to img_shape pixels, clamped, divided by the scale
    factor (w_scale, h_scale). Labels 0-based."""
    cls, boxes = out["cls"][-1], out["boxes"][-1]
    K = cls.shape[-1]
    results = []
    for b, ((h, w), (sx, sy)) in enumerate(zip(img_shapes, scale_factors)):
        scores, idx = cls[b].sigmoid().flatten().topk(max_per_img)
        labels = idx % K
        q = torch.div(idx, K, rounding_mode="floor")
        cx, cy, bw, bh = boxes[b][q].unbind(-1)
        x1 = ((cx - 0.5 * bw) * w).clamp(0, w) / sx
        y1 = ((cy - 0.5 * bh) * h).clamp(0, h) / sy
        x2 = ((cx + 0.5 * bw) * w).clamp(0, w) / sx
        y2 = ((cy + 0.5 * bh) * h).clamp(0, h) / sy
        results.append({"boxes": torch.stack([x1, y1, x2, y2], -1), "scores": scores,
                        "labels": labels})
    return results
