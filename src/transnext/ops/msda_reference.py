"""Plain-PyTorch multi-scale deformable attention (Deformable-DETR's MSDeformAttn core).

The definition the Triton kernels (``ops.msda_triton``) are tested against, and the
path CPU users run. Shapes (M heads of D channels, L levels, P points per level):

  value               (B, S, M, D)      S = sum_l H_l * W_l, levels stacked in order
  spatial_shapes      (L, 2) int64      (H_l, W_l); or a sequence of (H, W) pairs
  level_start_index   (L,) int64        first token of each level in S
  sampling_locations  (B, Q, M, L, P, 2) normalised (x, y); 0 and 1 are the map's outer
                                        edges (not pixel centres); outside reads zeros
  attention_weights   (B, Q, M, L, P)   (already normalised over L*P by the caller)
  out                 (B, Q, M*D)

Sampling is ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``
at ``grid = 2 * loc - 1``: pixel coordinates ``x * W_l - 0.5``, ``y * H_l - 0.5``, the four
neighbouring pixels weighted bilinearly, those outside the map contributing zero.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def shapes_list(spatial_shapes: Tensor | Sequence) -> list[tuple[int, int]]:
    """[(H_l, W_l), ...] as Python ints (a tensor is read back to the host)."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def starts_list(level_start_index: Tensor | Sequence | None,
                shapes: list[tuple[int, int]]) -> list[int]:
    """First token of each level; ``None``: the levels stacked back to back."""
    if level_start_index is None:
        out, s = [], 0
        for h, w in shapes:
            out.append(s)
            s += h * w
        return out
    if isinstance(level_start_index, Tensor):
        level_start_index = level_start_index.tolist()
    return [int(s) for s in level_start_index]


def check_shapes(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor,
                 num_levels: int) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, M, D), got {tuple(value.shape)}")
    B, _, M, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (B, Q, M, L, P, 2), got "
                         f"{tuple(sampling_locations.shape)}")
    b, Q, m, L, P, _ = sampling_locations.shape
    if (b, m, L) != (B, M, num_levels):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not fit value "
                         f"{tuple(value.shape)} and {num_levels} levels")
    if tuple(attention_weights.shape) != (B, Q, M, L, P):
        raise ValueError(f"attention_weights must be (B, Q, M, L, P)=({B}, {Q}, {M}, {L}, {P}), "
                         f"got {tuple(attention_weights.shape)}")


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor | Sequence,
    level_start_index: Tensor | Sequence | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """(B, Q, M*D) in value's dtype; differentiable w.r.t. value, sampling_locations and
    attention_weights. Computes in the promoted dtype of the three (fp32 when value is
    bf16 and the locations fp32, as under autocast), one ``grid_sample`` per level."""
    shapes = shapes_list(spatial_shapes)
    starts = starts_list(level_start_index, shapes)
    check_shapes(value, sampling_locations, attention_weights, len(shapes))
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    ct = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                             attention_weights.dtype)
    v = value.to(ct)
    grid = (2 * sampling_locations.to(ct) - 1).transpose(1, 2)  # (B, M, Q, L, P, 2)
    grid = grid.reshape(B * M, Q, L, P, 2)
    aw = attention_weights.to(ct).transpose(1, 2).reshape(B * M, 1, Q, L, P)
    out = None
    for lvl, ((H, W), s0) in enumerate(zip(shapes, starts)):
        # (B, HW, M, D) -> (B*M, D, H, W)
        v_l = v[:, s0:s0 + H * W].permute(0, 2, 3, 1).reshape(B * M, D, H, W)
        smp = F.grid_sample(v_l, grid[:, :, lvl], mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (B*M, D, Q, P)
        term = (smp * aw[:, :, :, lvl]).sum(-1)  # (B*M, D, Q)
        out = term if out is None else out + term
    if out is None:  # no levels
        out = v.new_zeros(B * M, D, Q)
    return out.view(B, M * D, Q).transpose(1, 2).contiguous().to(value.dtype)
