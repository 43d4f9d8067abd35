"""Plain-PyTorch aggregated attention (SPEC section 3, steps 3-7).

This is the definition every fast backend is tested against, and the path
CPU users run. It never unfolds the neighbourhood: each of the w*w window
offsets is a shifted view of a zero-padded key/value map, so memory stays
O(N * (w*w + P)) per head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tables import cached
from .position_bias import FactoredBias


def window_offsets(window: int) -> list[tuple[int, int]]:
    """Row-major (dy, dx) offsets of a w x w window, dy and dx in [-(w//2), w//2]."""
    r = window // 2
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]


def neighbour_counts(H: int, W: int, window: int, device=None) -> Tensor:
    """n(p): how many of the w x w neighbours of each position lie inside the map, (H*W,)."""
    r = window // 2
    ys = torch.arange(H, device=device)
    xs = torch.arange(W, device=device)
    ny = (torch.clamp(ys + r, max=H - 1) - torch.clamp(ys - r, min=0) + 1)
    nx = (torch.clamp(xs + r, max=W - 1) - torch.clamp(xs - r, min=0) + 1)
    return (ny[:, None] * nx[None, :]).reshape(-1)


def length_scale(H: int, W: int, window: int, num_pool: int, device=None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """s(p) = log(n(p) + P), (H*W,)."""
    n = neighbour_counts(H, W, window, device).to(torch.float64)
    return torch.log(n + num_pool).to(dtype)


def local_valid_mask(H: int, W: int, window: int, device=None) -> Tensor:
    """(H*W, w*w) bool: True where neighbour j of position p lies inside the map."""
    ys = torch.arange(H, device=device)[:, None]
    xs = torch.arange(W, device=device)[None, :]
    cols = []
    for dy, dx in window_offsets(window):
        ok = (ys + dy >= 0) & (ys + dy < H) & (xs + dx >= 0) & (xs + dx < W)
        cols.append(ok.reshape(-1))
    return torch.stack(cols, dim=1)


def _window(x_pad: Tensor, H: int, W: int, r: int, dy: int, dx: int) -> Tensor:
    # x_pad: (B, H + 2r, W + 2r, h, d); returns x[y + dy, x + dx] (zeros outside the map).
    return x_pad[:, r + dy:r + dy + H, r + dx:r + dx + W]


def aggregated_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    pool_bias: Tensor,
    query_embedding: Tensor,
    temperature: Tensor,
    rel_bias_local: Tensor,
    learnable_tokens: Tensor,
    learnable_bias: Tensor,
    H: int,
    W: int,
    window: int = 3,
    attn_drop: float = 0.0,
    training: bool = False,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Aggregated attention after the projections. See ``ops.aggregated_attention``
    for the shapes; returns (B, N, h, d) in q's dtype. With ``return_weights`` also the
    softmax weights (B, N, h, w*w + P) in the compute dtype (fp32, or fp64): the w*w
    window positions (row-major offsets, zero outside the map) then the P pooled tokens;
    before attention dropout.

    Everything stays in the projections' own (B, N, h, d) layout, so there are
    no head transposes; the w*w neighbours are shifted views of one padded copy.
    """
    if isinstance(pool_bias, FactoredBias):
        pool_bias = pool_bias.dense()
    B, N, h, d = q.shape
    P = k_pool.shape[1]
    r = window // 2
    ww = window * window
    f32 = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
    pad = (0, 0, 0, 0, r, r, r, r)  # zero-pad the H and W axes of (B, H, W, h, d)

    q_hat = F.normalize(q.to(f32), dim=-1)
    k_hat = F.normalize(k.to(f32), dim=-1)
    kp_hat = F.normalize(k_pool.to(f32), dim=-1)
    # softplus(temperature) * s(p), as (N, h, 1)
    scale = F.softplus(temperature.to(f32)).view(1, h, 1) * cached(
        length_scale, H, W, window, P, q.device, f32).view(N, 1, 1)
    q_tilde = (q_hat + query_embedding.to(f32).view(h, d)) * scale

    # Local logits (B, N, h, w*w): one dot product per window offset.
    offsets = window_offsets(window)
    k_pad = F.pad(k_hat.view(B, H, W, h, d), pad)
    q_grid = q_tilde.view(B, H, W, h, d)
    a_local = torch.stack(
        [torch.linalg.vecdot(q_grid, _window(k_pad, H, W, r, dy, dx)) for dy, dx in offsets],
        dim=-1,
    ).view(B, N, h, ww)
    valid = cached(local_valid_mask, H, W, window, q.device).view(N, 1, ww)
    local_bias = rel_bias_local.to(f32).view(1, h, ww).masked_fill(~valid, float("-inf"))
    a_local = a_local + local_bias

    # Pooled logits (B, N, h, P).
    a_pool = torch.einsum("bnhd,bphd->bnhp", q_tilde, kp_hat)
    a_pool = a_pool.add_(pool_bias.to(f32).transpose(0, 1))  # in place: bmm keeps no output

    attn = torch.cat([a_local, a_pool], dim=-1).softmax(dim=-1)
    weights = attn
    if attn_drop > 0.0 and training:
        attn = F.dropout(attn, attn_drop, training=True)
    A_local, A_pool = attn.split([ww, P], dim=-1)

    # Learnable tokens use q_hat, not q_tilde.
    m = (A_local + torch.einsum("bnhd,hdj->bnhj", q_hat, learnable_tokens.to(f32))
         + learnable_bias.to(f32).view(h, ww))
    m = m.view(B, H, W, h, ww)
    v_pad = F.pad(v.to(f32).view(B, H, W, h, d), pad)
    out = m[..., 0:1] * _window(v_pad, H, W, r, *offsets[0])
    for j, (dy, dx) in enumerate(offsets[1:], start=1):
        out = out.addcmul_(m[..., j:j + 1], _window(v_pad, H, W, r, dy, dx))
    out = out.view(B, N, h, d) + torch.einsum("bnhp,bphd->bnhd", A_pool, v_pool.to(f32))
    if return_weights:
        return out.to(q.dtype), weights
    return out.to(q.dtype)


def full_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, query_embedding: Tensor, temperature: Tensor
) -> Tensor:
    """SPEC section 4 after the projection: q, k, v (B, N, h, d), bias (h, N, N).
    Returns (B, N, h, d)."""
    N = q.shape[1]
    f32 = torch.promote_types(q.dtype, torch.float32)
    q_hat = F.normalize(q.to(f32), dim=-1).transpose(1, 2)
    k_hat = F.normalize(k.to(f32), dim=-1).transpose(1, 2)
    q_s = (q_hat + query_embedding.to(f32)) * F.softplus(temperature.to(f32)) * math.log(N)
    attn = (q_s @ k_hat.transpose(-2, -1) + bias.to(f32)[None]).softmax(-1)
    return (attn @ v.to(f32).transpose(1, 2)).transpose(1, 2).to(q.dtype)
