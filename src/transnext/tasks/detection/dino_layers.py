"""The pieces of DINO (mmdet 3.0) as the released checkpoints compute them: the sine
encodings, the channel mapper, the deformable encoder and decoder layers, the box head.
``dino.py`` puts them together. Module names follow mmdet's where they can (the
converter's table, ``convert_dino.DINO_KEY_MAP``, names the two that differ).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops.msda import MultiScaleDeformableAttention


# ---- small math ---------------------------------------------------------------------
def f32(t: Tensor) -> Tensor:
    """At least float32: half-precision tensors (autocast's outputs) cast up, float32 and
    float64 kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with both parts clamped at ``eps`` (mmdet's), at least float32."""
    x = f32(x).clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cxcy, half = b[..., :2], b[..., 2:] * 0.5
    return torch.cat([cxcy - half, cxcy + half], -1)


def _sin_cos(p: Tensor) -> Tensor:
    """(..., F) angles -> (..., F) as [sin p0, cos p1, sin p2, cos p3, ...] (mmdet's order)."""
    return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), -1).flatten(-2)


def mask_sine_encoding(mask: Tensor, num_feats: int, dtype: torch.dtype = torch.float32,
                       temperature: float = 20.0, scale: float = 2 * math.pi,
                       eps: float = 1e-6) -> Tensor:
    """mmdet's SinePositionalEncoding(normalize=True, offset=0) of a padding mask
    (B, H, W) bool, True on padding -> (B, H*W, 2 * num_feats) in ``dtype`` (y first, then x)."""
    not_mask = (~mask).to(dtype)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=dtype, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = torch.cat([_sin_cos(y[..., None] / dim_t), _sin_cos(x[..., None] / dim_t)], -1)
    return pos.flatten(1, 2)


def box_sine_encoding(coord: Tensor, num_feats: int, temperature: float = 10000.0,
                      scale: float = 2 * math.pi) -> Tensor:
    """mmdet's coordinate_to_encoding of (..., 4) boxes (cx, cy, w, h) ->
    (..., 4 * num_feats), blocks in the order y, x, w, h; at least float32."""
    c = f32(coord)[..., [1, 0, 2, 3]] * scale
    dim_t = torch.arange(num_feats, dtype=c.dtype, device=coord.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    return _sin_cos(c[..., None] / dim_t).flatten(-2)


# ---- neck ---------------------------------------------------------------------------
class ConvGN(nn.Module):
    """mmcv ConvModule(norm=GN 32, no activation): conv without bias, GroupNorm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.gn = nn.GroupNorm(groups, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(self.conv(x))


class ChannelMapper(nn.Module):
    """One 1x1 ConvGN per backbone map; the extra levels by 3x3 stride-2 ConvGNs, the
    first on the last *backbone* map, the next ones on the previous extra level."""

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int):
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"{num_outs} levels for {len(in_channels)} backbone maps")
        self.convs = nn.ModuleList(ConvGN(c, out_channels, 1) for c in in_channels)
        self.extra_convs = nn.ModuleList(
            ConvGN(in_channels[-1] if i == 0 else out_channels, out_channels, 3, 2)
            for i in range(num_outs - len(in_channels)))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.convs):
            raise ValueError(f"the neck takes {len(self.convs)} backbone maps, got {len(feats)}")
        outs = [conv(f) for conv, f in zip(self.convs, feats)]
        for i, conv in enumerate(self.extra_convs):
            outs.append(conv(feats[-1] if i == 0 else outs[-1]))
        return outs


# ---- transformer --------------------------------------------------------------------
class FFN(nn.Module):
    """Linear, ReLU, Linear (mmcv's FFN without its residual; dropout is 0 in DINO)."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Post-norm: deformable self-attention (query + pos for offsets and weights, the
    query itself as value), then the FFN."""

    def __init__(self, dims: int, ffn_dims: int, heads: int, levels: int, points: int):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dims, heads, levels, points)
        self.ffn = FFN(dims, ffn_dims)
        self.norms = nn.ModuleList(nn.LayerNorm(dims) for _ in range(2))

    def forward(self, q: Tensor, pos: Tensor, ref: Tensor, shapes, starts,
                mask: Tensor) -> Tensor:
        q = self.norms[0](q + self.self_attn(q + pos, ref, q, shapes, starts, mask))
        return self.norms[1](q + self.ffn(q))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention (q = k = query + pos, v = query; the denoising mask),
    deformable cross-attention into the encoder memory, FFN."""

    def __init__(self, dims: int, ffn_dims: int, heads: int, levels: int, points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dims, heads, batch_first=True)
        self.cross_attn = MultiScaleDeformableAttention(dims, heads, levels, points)
        self.ffn = FFN(dims, ffn_dims)
        self.norms = nn.ModuleList(nn.LayerNorm(dims) for _ in range(3))

    def forward(self, q: Tensor, pos: Tensor, memory: Tensor, memory_mask: Tensor,
                ref: Tensor, shapes, starts, self_mask: Tensor | None) -> Tensor:
        qk = q + pos
        sa = self.self_attn(qk, qk, q, attn_mask=self_mask, need_weights=False)[0]
        q = self.norms[0](q + sa)
        ca = self.cross_attn(q + pos, ref, memory, shapes, starts, memory_mask)
        q = self.norms[1](q + ca)
        return self.norms[2](q + self.ffn(q))


class Encoder(nn.Module):
    def __init__(self, num_layers: int, dims: int, ffn_dims: int, heads: int, levels: int,
                 points: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dims, ffn_dims, heads, levels, points)
                                    for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalised by the valid part of the map, then
        scaled back per level by its valid ratios -> (B, S, L, 2) (x, y), in their dtype."""
        dev = valid_ratios.device
        refs = []
        for lvl, (H, W) in enumerate(shapes):
            ys = torch.arange(H, dtype=valid_ratios.dtype, device=dev) + 0.5
            xs = torch.arange(W, dtype=valid_ratios.dtype, device=dev) + 0.5
            ry = ys[:, None].expand(H, W).reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * H)
            rx = xs[None, :].expand(H, W).reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * W)
            refs.append(torch.stack((rx, ry), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, q: Tensor, pos: Tensor, mask: Tensor, shapes, starts,
                valid_ratios: Tensor) -> Tensor:
        ref = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            q = layer(q, pos, ref, shapes, starts, mask)
        return q


class MLP(nn.Module):
    """Linears with ReLU between (mmdet's MLP; keys layers.0, layers.1, ...)."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Decoder(nn.Module):
    def __init__(self, num_layers: int, dims: int, ffn_dims: int, heads: int, levels: int,
                 points: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dims, ffn_dims, heads, levels, points)
                                    for _ in range(num_layers))
        self.ref_point_head = MLP([2 * dims, dims, dims])
        self.norm = nn.LayerNorm(dims)

    def forward(self, query: Tensor, ref: Tensor, memory: Tensor, memory_mask: Tensor,
                shapes, starts, valid_ratios: Tensor, self_mask: Tensor | None,
                head: "DINOHead") -> tuple[Tensor, Tensor]:
        """ref (B, Q, 4) sigmoid boxes normalised to each image's valid area. Returns the
        normed states of every layer (L, B, Q, C) and the references (L + 1, B, Q, 4):
        the input one, then each layer's refined boxes *with* their gradient (look
        forward twice); the next layer gets them detached."""
        vr = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        half = query.shape[-1] // 2
        states, refs = [], [ref]
        for lid, layer in enumerate(self.layers):
            ref_in = ref[:, :, None] * vr  # boxes in the padded batch's coordinates
            pos = self.ref_point_head(box_sine_encoding(ref_in[:, :, 0], half))
            query = layer(query, pos, memory, memory_mask, ref_in, shapes, starts, self_mask)
            new_ref = (head.box_delta(lid, query) + inverse_sigmoid(ref, 1e-3)).sigmoid()
            ref = new_ref.detach()
            states.append(self.norm(query))
            refs.append(new_ref)
        return torch.stack(states), torch.stack(refs)


class DINOHead(nn.Module):
    """One classifier and one box branch per decoder layer, plus one for the encoder
    proposals (the last). Sigmoid classes, no background."""

    def __init__(self, dims: int, num_classes: int, num_branches: int):
        super().__init__()
        self.num_classes = num_classes
        self.cls_branches = nn.ModuleList(nn.Linear(dims, num_classes)
                                          for _ in range(num_branches))
        self.reg_branches = nn.ModuleList(
            nn.Sequential(nn.Linear(dims, dims), nn.ReLU(), nn.Linear(dims, dims), nn.ReLU(),
                          nn.Linear(dims, 4)) for _ in range(num_branches))

    def box_delta(self, i: int, x: Tensor) -> Tensor:
        """reg_branches[i] in its weights' dtype (float32 under autocast, which is off
        here): its output is added to a box in inverse-sigmoid space."""
        branch = self.reg_branches[i]
        with torch.autocast(x.device.type, enabled=False):
            return branch(x.to(branch[0].weight.dtype))

    def logits(self, i: int, x: Tensor) -> Tensor:
        return f32(self.cls_branches[i](x))
