"""UperNet (with the auxiliary FCN head) on a TransNeXt, built on transformers'
``UperNetForSemanticSegmentation``.

transformers' UperNet has the same modules and forward as mmseg's UPerHead +
FCNHead (conv-bn-relu without conv bias, PPM 1/2/3/6, bilinear with
align_corners=False), so the released weights give the released outputs. It
differs from the original stack only in training, and those pieces are
overridden here:

* dropout (p=0.1) before each classifier (mmseg's ``dropout_ratio``); HF has none;
* the loss: mmseg 0.30's cross-entropy averages over *all* pixels, ignored ones
  counting zero (``avg_non_ignore=False``); torch's averages over non-ignored
  pixels only, which weights images with much void label more;
* initialisation: mmseg's ConvModule uses Kaiming (fan_out) convs and a
  normal(0.01) classifier; HF uses normal(0.02) everywhere.

The extra settings ride in the config (``classifier_dropout``,
``loss_avg_non_ignore``) as plain extra keys, so a converted model also loads
in a plain ``UperNetForSemanticSegmentation`` (same inference outputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import UperNetConfig, UperNetForSemanticSegmentation
from transformers.modeling_outputs import SemanticSegmenterOutput

from ..common.backbone import TransNeXtBackboneConfig

IGNORE_INDEX = 255


class DropoutConv2d(nn.Conv2d):
    """A classifier conv with dropout on its input (mmseg's ``cls_seg``); the same
    parameter names as a plain ``nn.Conv2d``, so checkpoints are unchanged."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.dropout2d(x, self.p, self.training) if self.p else x)


def _dropout_conv(conv: nn.Conv2d, p: float) -> DropoutConv2d:
    new = DropoutConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                        bias=conv.bias is not None, device=conv.weight.device,
                        dtype=conv.weight.dtype)
    new.load_state_dict(conv.state_dict())
    new.p = p
    return new


class TransNeXtUperNet(UperNetForSemanticSegmentation):
    """UperNetForSemanticSegmentation with mmseg's training behaviour (see module doc).

    ``forward(pixel_values, labels=None)`` returns logits at the input size and,
    with labels, the mmseg loss (decode + ``auxiliary_loss_weight`` x auxiliary).
    """

    def __init__(self, config: UperNetConfig):
        super().__init__(config)
        p = float(getattr(config, "classifier_dropout", 0.1))
        self.decode_head.classifier = _dropout_conv(self.decode_head.classifier, p)
        if self.auxiliary_head is not None:
            self.auxiliary_head.classifier = _dropout_conv(self.auxiliary_head.classifier, p)

    def _init_weights(self, module):
        # mmseg's initialisation of ConvModule (Kaiming fan_out, ReLU) and conv_seg (normal 0.01)
        if isinstance(module, DropoutConv2d) or (
                isinstance(module, nn.Conv2d) and module.out_channels == self.config.num_labels
                and module.kernel_size == (1, 1)):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if module.running_mean is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()

    def head_logits(self, pixel_values: torch.Tensor, with_aux: bool = False):
        """Decode (and auxiliary) logits at 1/4 and 1/16 resolution, not resized."""
        feats = self.backbone(pixel_values).feature_maps
        logits = self.decode_head(feats)
        aux = self.auxiliary_head(feats) if with_aux and self.auxiliary_head is not None else None
        return logits, aux

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs):
        want_aux = labels is not None
        logits, aux = self.head_logits(pixel_values, with_aux=want_aux)
        size = pixel_values.shape[2:]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        loss = None
        if labels is not None:
            loss = seg_loss(logits, labels, self.config)
            if aux is not None:
                aux = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
                loss = loss + self.config.auxiliary_loss_weight * seg_loss(aux, labels, self.config)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return SemanticSegmenterOutput(loss=loss, logits=logits)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """Pixel cross-entropy, ``ignore_index`` ignored; averaged over all pixels
    (mmseg 0.30 default) or over the non-ignored ones (``loss_avg_non_ignore``)."""
    ignore = getattr(config, "loss_ignore_index", IGNORE_INDEX)
    per_pixel = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore,
                                reduction="none")
    if getattr(config, "loss_avg_non_ignore", False):
        return per_pixel.sum() / (labels != ignore).sum().clamp_min(1)
    return per_pixel.mean()


def upernet_config(model_name: str, num_labels: int, *, pos_bias: str = "interpolate",
                   img_size=512, pretrain_size: int | None = None, drop_path_rate: float = 0.0,
                   channels: int = 512, aux_channels: int = 256, aux: bool = True,
                   classifier_dropout: float = 0.1, id2label: dict | None = None,
                   loss_avg_non_ignore: bool = False) -> UperNetConfig:
    """The released UperNet layout (SPEC section 9) on any TransNeXt variant: UPerHead
    ``channels`` wide, auxiliary FCN head (one 3x3 conv, ``aux_channels``) on stage 3,
    loss weight 0.4, 255 ignored."""
    bb = TransNeXtBackboneConfig(model_name, pos_bias=pos_bias,
                                 img_size=img_size if pos_bias == "interpolate" else None,
                                 pretrain_size=pretrain_size, drop_path_rate=drop_path_rate)
    if id2label is None:
        id2label = {i: f"class_{i}" for i in range(num_labels)}
    return UperNetConfig(
        backbone_config=bb, hidden_size=channels, pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=aux, auxiliary_loss_weight=0.4, auxiliary_channels=aux_channels,
        auxiliary_num_convs=1, auxiliary_concat_input=False, loss_ignore_index=IGNORE_INDEX,
        id2label={int(k): str(v) for k, v in id2label.items()},
        label2id={str(v): int(k) for k, v in id2label.items()},
        classifier_dropout=classifier_dropout, loss_avg_non_ignore=loss_avg_non_ignore)


def build_upernet(model_name: str, num_labels: int, **kwargs) -> TransNeXtUperNet:
    """A freshly initialised TransNeXt UperNet (see :func:`upernet_config`)."""
    return TransNeXtUperNet(upernet_config(model_name, num_labels, **kwargs))
