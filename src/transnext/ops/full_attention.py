"""Full attention of the last stage (SPEC section 4) through PyTorch's SDPA."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def full_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, query_embedding: Tensor, temperature: Tensor,
    attn_drop: float = 0.0, training: bool = False,
) -> Tensor:
    """q, k, v (B, N, h, d) raw projections, bias (h, N, N). Returns (B, N, h, d).

    The cosine logits are pre-scaled into q, so SDPA runs with scale=1 and the
    position bias as an additive mask (which lets it pick a fused kernel).
    """
    N = q.shape[1]
    q = q.transpose(1, 2)
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)
    # Export hook: a symbolic N (dynamic export) takes its log in the graph.
    log_n = (math.log(N) if isinstance(N, int)
             else torch.full((), N, dtype=torch.float64, device=q.device).log())
    q_s = (F.normalize(q, dim=-1) + query_embedding) * (F.softplus(temperature) * log_n)
    k_hat = F.normalize(k, dim=-1)
    if torch.compiler.is_compiling():
        # Under inductor, SDPA's memory-efficient kernel rejects the layout it picks
        # for a learnable mask's gradient ("(*bias): last dimension must be
        # contiguous"); the last stage is small, so plain ops that inductor fuses.
        attn = (q_s @ k_hat.transpose(-2, -1) + bias).softmax(dim=-1)
        attn = F.dropout(attn, attn_drop, training=training)
        return (attn.to(v.dtype) @ v).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q_s, k_hat, v, attn_mask=bias.to(q_s.dtype).unsqueeze(0),
        dropout_p=attn_drop if training else 0.0, scale=1.0,
    )
    return out.transpose(1, 2)
