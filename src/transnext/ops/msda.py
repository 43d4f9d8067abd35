"""Multi-scale deformable attention: the public op, its backend dispatch and the module.

:func:`ms_deform_attn` is Deformable-DETR's MSDeformAttn core (used by DINO's encoder and
decoder and by Mask2Former's pixel decoder); shapes and the sampling convention are in
``ops.msda_reference``. Backends:

* ``reference`` - plain PyTorch (``ops.msda_reference``, one ``grid_sample`` per level),
  the ground truth; any device, any float dtype.
* ``triton``    - fused Triton forward and backward (``ops.msda_triton``), CUDA (or
  ``TRITON_INTERPRET=1`` on the CPU, for tests); fp32 / fp16 / bf16, fp32 accumulation.

``backend="auto"`` (the default, or ``TRANSNEXT_MSDA_BACKEND=auto|reference|triton`` for the
whole process when ``backend`` is None) runs Triton on CUDA tensors when triton imports,
the reference elsewhere; fp64 inputs always take the reference.

:class:`MultiScaleDeformableAttention` is the layer around it (value_proj,
sampling_offsets, attention_weights, output_proj: the parameter names and shapes of the
released DINO / Mask2Former checkpoints).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .msda_reference import ms_deform_attn_reference

BACKENDS = ("auto", "reference", "triton")
ENV = "TRANSNEXT_MSDA_BACKEND"

_TRITON_ERR: Exception | None = None
_UNSET = object()
_TRITON_FN = _UNSET


def _triton_op():
    """The Triton entry point, or None (with the import error kept) if triton is unusable."""
    global _TRITON_ERR, _TRITON_FN
    if _TRITON_FN is not _UNSET:
        return _TRITON_FN
    try:
        from .msda_triton import ms_deform_attn_triton
    except Exception as e:  # pragma: no cover - depends on the install
        _TRITON_ERR = e
        _TRITON_FN = None
        return None
    _TRITON_FN = ms_deform_attn_triton
    return ms_deform_attn_triton


def _interpreting() -> bool:
    """True when triton's interpreter is active (TRITON_INTERPRET=1 when triton was imported)."""
    try:
        import triton.language as tl
    except Exception:  # pragma: no cover
        return False
    return type(tl.sum).__name__ == "InterpretedFunction"


def msda_backend_from_env() -> str:
    name = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def resolve_msda_backend(value: Tensor, sampling_locations: Tensor | None = None,
                         attention_weights: Tensor | None = None,
                         backend: str | None = None) -> str:
    """'reference' or 'triton': what :func:`ms_deform_attn` will run for these inputs."""
    name = backend or msda_backend_from_env()
    if name not in BACKENDS:
        raise ValueError(f"deformable-attention backend {name!r} is not one of "
                         f"{', '.join(BACKENDS)}")
    if any(t is not None and t.dtype == torch.float64
           for t in (value, sampling_locations, attention_weights)):
        return "reference"  # the kernels compute in fp32: fp64 stays exact
    if name == "auto":
        return "triton" if value.is_cuda and _triton_op() is not None else "reference"
    return name


_META_CACHE: dict = {}


def _level_meta(spatial_shapes, level_start_index, device) -> tuple[Tensor, Tensor]:
    shapes = torch.as_tensor(spatial_shapes, dtype=torch.int64, device=device).reshape(-1, 2)
    if level_start_index is None:
        n = shapes.prod(1)
        starts = n.cumsum(0) - n
    else:
        starts = torch.as_tensor(level_start_index, dtype=torch.int64, device=device)
    return shapes, starts


def level_meta(spatial_shapes: Tensor | Sequence, level_start_index: Tensor | Sequence | None,
               device) -> tuple[Tensor, Tensor]:
    """(spatial_shapes (L, 2), level_start_index (L,)) as int64 tensors on ``device``;
    ``level_start_index=None``: levels stacked back to back. Python sequences are turned
    into device tensors once and cached (a fresh host-to-device copy would synchronise)."""
    if (isinstance(spatial_shapes, Tensor) or isinstance(level_start_index, Tensor)
            or torch.compiler.is_compiling()):
        return _level_meta(spatial_shapes, level_start_index, device)
    key = (tuple((int(h), int(w)) for h, w in spatial_shapes),
           None if level_start_index is None else tuple(int(s) for s in level_start_index),
           str(torch.device(device)))
    hit = _META_CACHE.get(key)
    if hit is None:
        if len(_META_CACHE) > 256:
            _META_CACHE.clear()
        hit = _META_CACHE[key] = _level_meta(spatial_shapes, level_start_index, device)
    return hit


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence,
    level_start_index: Tensor | Sequence | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention; returns (B, Q, M*D) in value's dtype.

      value               (B, S, M, D)
      spatial_shapes      (L, 2) int (H_l, W_l), or a sequence of (H, W) pairs
      level_start_index   (L,) int, or a sequence, or None (levels back to back)
      sampling_locations  (B, Q, M, L, P, 2) normalised (x, y), may fall outside [0, 1]
      attention_weights   (B, Q, M, L, P)
    Differentiable w.r.t. value, sampling_locations and attention_weights on every backend.
    The Triton path reads the integer metadata on the device (no host sync); the reference
    reads it back to the host (pass Python sequences to avoid that sync).
    """
    name = resolve_msda_backend(value, sampling_locations, attention_weights, backend)
    if name == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights)
    fn = _triton_op()
    if fn is None:
        raise RuntimeError(f"deformable-attention backend 'triton' is not available: "
                           f"{_TRITON_ERR!r}")
    if not value.is_cuda and not _interpreting():
        raise RuntimeError(
            "deformable-attention backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
            "set before triton is imported, for CPU tests)")
    shapes, starts = level_meta(spatial_shapes, level_start_index, value.device)
    return fn(value, shapes, starts, sampling_locations, attention_weights)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable-DETR's multi-scale deformable attention layer (no residual, no dropout:
    the surrounding layer adds those).

    Parameters (names and shapes as in the released DINO / Mask2Former checkpoints):
    ``sampling_offsets`` Linear(C, M*L*P*2), ``attention_weights`` Linear(C, M*L*P),
    ``value_proj`` Linear(C, C), ``output_proj`` Linear(C, C); the offsets' output is
    ordered (M, L, P, xy), the weights' (M, L*P) with a softmax over L*P per head.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int = 4, backend: str | None = None):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR's init: zero offset weights with a bias pointing head m along the
        angle 2*pi*m/M (scaled so the larger of |cos|, |sin| is 1), point i at distance
        i + 1; zero attention weights (uniform after softmax); xavier-uniform projections
        with zero biases."""
        M, L, P = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(M, dtype=torch.float64) * (2.0 * math.pi / M)
        d = torch.stack([theta.cos(), theta.sin()], -1)
        d = d / d.abs().max(-1, keepdim=True).values
        bias = d[:, None, None, :] * torch.arange(1, P + 1, dtype=torch.float64)[None, None, :,
                                                                                   None]
        bias = bias.expand(M, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1).to(self.sampling_offsets.bias))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling(self, query: Tensor, reference_points: Tensor,
                 spatial_shapes: Tensor | Sequence) -> tuple[Tensor, Tensor]:
        """(sampling_locations (B, Q, M, L, P, 2), attention_weights (B, Q, M, L, P))."""
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        off = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        aw = self.attention_weights(query).view(B, Q, M, L * P)
        aw = F.softmax(aw, -1).view(B, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            shapes = (spatial_shapes.to(query.device).reshape(-1, 2)
                      if isinstance(spatial_shapes, Tensor)
                      else level_meta(spatial_shapes, None, query.device)[0])
            ct = torch.promote_types(off.dtype, reference_points.dtype)
            norm = shapes.flip(-1).to(ct)  # (W_l, H_l)
            loc = reference_points[:, :, None, :, None, :] + off / norm[None, None, None, :,
                                                                        None, :]
        elif reference_points.shape[-1] == 4:
            ref = reference_points[:, :, None, :, None]
            loc = ref[..., :2] + off / P * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got "
                             f"{tuple(reference_points.shape)}")
        return loc, aw

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor,
                spatial_shapes: Tensor | Sequence, level_start_index: Tensor | Sequence | None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """query (B, Q, C); reference_points (B, Q, L, 2) normalised (x, y) or (B, Q, L, 4)
        boxes (cx, cy, w, h); value (B, S, C); key_padding_mask (B, S) bool, True where
        value is padding (zeroed). Returns (B, Q, C)."""
        B, S, _ = value.shape
        if reference_points.shape[2] != self.num_levels:
            raise ValueError(f"reference_points {tuple(reference_points.shape)}: expected "
                             f"{self.num_levels} levels")
        v = self.value_proj(value)
        if key_padding_mask is not None:
            v = v.masked_fill(key_padding_mask[..., None], 0.0)
        v = v.view(B, S, self.num_heads, self.embed_dims // self.num_heads)
        loc, aw = self.sampling(query, reference_points, spatial_shapes)
        out = ms_deform_attn(v, spatial_shapes, level_start_index, loc, aw, backend=self.backend)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (f"embed_dims={self.embed_dims}, num_heads={self.num_heads}, "
                f"num_levels={self.num_levels}, num_points={self.num_points}")
