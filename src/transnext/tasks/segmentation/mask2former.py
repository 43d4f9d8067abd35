"""Mask2Former on a TransNeXt, built on transformers' ``Mask2FormerForUniversalSegmentation``.

transformers' modules hold the released architecture (SPEC section 9: 100 queries,
6 deformable pixel-decoder layers with FFN 1024, 9 masked-attention decoder layers
with FFN 2048; losses cls 2 / void 0.1, mask 5, dice 5 on 12544 points). Its
semantic post-processing is not the original's, and that changes a released
checkpoint's output, so it is replaced here (``semantic_logits``):

* transformers resizes the mask logits to a fixed 384x384 before the target size;
  mmseg 1.0 resizes them once, to the padded input size;
* mmseg pads the normalised image at the bottom/right to a multiple of 32 (its
  ``size_divisor``) and crops the padding off the scores; transformers' model sees
  whatever size it is given.
The scores are mmseg's: softmax class scores without the void class, times sigmoid
masks, summed over queries (``einsum('bqc,bqhw->bchw')``); they are probabilities-like
already, so the inference helpers do not softmax them again.

The pixel decoder's deformable attention runs on the package's op
(``ops.ms_deform_attn``: fused Triton on CUDA, the plain PyTorch reference elsewhere),
the same one DINO uses; transformers' own is a per-level ``grid_sample`` loop. The
parameters keep transformers' names, so checkpoints load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from transformers.models.mask2former import modeling_mask2former as hf_m2f

from ...ops.msda import MultiScaleDeformableAttention
from ..common.backbone import TransNeXtBackboneConfig

SIZE_DIVISOR = 32


class PixelDecoderAttention(MultiScaleDeformableAttention):
    """transformers' pixel-decoder attention call signature on the package's layer."""

    @classmethod
    def replacing(cls, m: nn.Module) -> "PixelDecoderAttention":
        new = cls(m.d_model, m.n_heads, m.n_levels, m.n_points)
        new.load_state_dict(m.state_dict())
        return new.to(m.value_proj.weight)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, position_embeddings=None, reference_points=None,
                spatial_shapes_list=None, level_start_index=None, output_attentions=False):
        query = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        out = super().forward(query, reference_points, encoder_hidden_states,
                              spatial_shapes_list, level_start_index,
                              key_padding_mask=attention_mask)
        return out, None  # the weights are not kept (output_attentions gets None)


class TransNeXtMask2Former(Mask2FormerForUniversalSegmentation):
    outputs_scores = True  # semantic_logits returns mmseg's mask-classification scores

    def __init__(self, config: Mask2FormerConfig):
        super().__init__(config)
        for parent in list(self.modules()):
            for name, child in parent.named_children():
                if isinstance(child, hf_m2f.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
                    setattr(parent, name, PixelDecoderAttention.replacing(child))

    def semantic_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, num_labels, H, W) scores as mmseg 1.0's Mask2Former (see module doc)."""
        H, W = pixel_values.shape[-2:]
        ph = math.ceil(H / SIZE_DIVISOR) * SIZE_DIVISOR
        pw = math.ceil(W / SIZE_DIVISOR) * SIZE_DIVISOR
        x = F.pad(pixel_values, (0, pw - W, 0, ph - H), value=0.0) if (ph, pw) != (H, W) \
            else pixel_values
        out = super().forward(pixel_values=x)
        return semantic_scores(out.class_queries_logits, out.masks_queries_logits,
                               (ph, pw))[:, :, :H, :W]


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                    size: tuple[int, int]) -> torch.Tensor:
    masks = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False)
    cls = class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", cls, masks.sigmoid())


def mask2former_config(model_name: str, num_labels: int, *, pos_bias: str = "interpolate",
                       img_size=512, pretrain_size: int | None = None,
                       drop_path_rate: float = 0.0, id2label: dict | None = None
                       ) -> Mask2FormerConfig:
    bb = TransNeXtBackboneConfig(model_name, pos_bias=pos_bias,
                                 img_size=img_size if pos_bias == "interpolate" else None,
                                 pretrain_size=pretrain_size, drop_path_rate=drop_path_rate)
    if id2label is None:
        id2label = {i: f"class_{i}" for i in range(num_labels)}
    return Mask2FormerConfig(
        backbone_config=bb, num_queries=100, encoder_layers=6, encoder_feedforward_dim=1024,
        decoder_layers=10, dim_feedforward=2048, hidden_dim=256, feature_size=256,
        mask_feature_size=256, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0,
        dice_weight=5.0, train_num_points=12544, ignore_value=255,
        id2label={int(k): str(v) for k, v in id2label.items()},
        label2id={str(v): int(k) for k, v in id2label.items()})


def build_mask2former(model_name: str, num_labels: int, **kwargs) -> TransNeXtMask2Former:
    return TransNeXtMask2Former(mask2former_config(model_name, num_labels, **kwargs))
