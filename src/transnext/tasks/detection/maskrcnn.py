"""Mask R-CNN (torchvision) on a TransNeXt backbone, as the released COCO models
(SPEC section 9): FPN 256 channels on the four stage maps, P2-P6 (P6 by max-pool),
the backbone in interpolate mode at ``img_size`` 800, and mmdet 2.28's behaviour
where torchvision's differs (``mmdet_compat``).

Input and output are torchvision's: ``model(images)`` in eval mode takes a list of
(3, H, W) images (float 0-1 or uint8) and returns one dict per image with ``boxes``
(x1, y1, x2, y2 in that image's pixels), ``labels`` (1..K), ``scores`` and ``masks``
((n, 1, H, W) probabilities; mmdet binarises with ``>= model.roi_heads.mask_threshold``).
``model(images, targets)`` in train mode returns the loss dict (targets: ``boxes``
float xyxy, ``labels`` int64 1..K, ``masks`` uint8 (n, H, W), in input pixels).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ...engine.cuda_graphs import GraphedStages
from ...models import ARCHS, load_checkpoint
from .mmdet_compat import (MMDetAnchorGenerator, MMDetRoIAlign, MMDetRoIHeads, MMDetRPN,
                           MMDetTransform)

# The authors' Mask R-CNN backbones (drop_path_rate of their detection configs).
RELEASED_DROP_PATH = {"transnext_tiny": 0.4, "transnext_small": 0.6, "transnext_base": 0.7}
DEFAULT_DROP_PATH = 0.1
# mmcv's paramwise custom_keys of the released config: decay_mult 0 for names holding these.
NO_DECAY_WORDS = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature", "norm")


class TransNeXtFPN(GraphedStages, nn.Module):
    """The TransNeXt stage maps (strides 4-32) through mmdet's FPN: 1x1 laterals,
    nearest top-down sums, 3x3 outputs, P6 = max_pool(P5, 1, stride 2). Returns the
    OrderedDict torchvision's detection heads take ('0'..'3', 'pool')."""

    def __init__(self, model_name: str = "transnext_tiny", *, pos_bias: str = "interpolate",
                 img_size=800, pretrain_size: int | None = None, drop_path_rate: float = 0.0,
                 out_channels: int = 256):
        super().__init__()
        import transnext  # registers the models with timm
        if model_name not in ARCHS:
            raise ValueError(f"unknown TransNeXt variant {model_name!r}; one of {sorted(ARCHS)}")
        self.body = transnext.create_model(
            model_name, num_classes=0, in_chans=3, pos_bias=pos_bias,
            img_size=img_size if pos_bias == "interpolate" else None,
            pretrain_size=pretrain_size, drop_path_rate=drop_path_rate)
        self.fpn = FeaturePyramidNetwork(list(ARCHS[model_name]["embed_dims"]), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def _graph_body(self):
        return self.body, [0, 1, 2, 3]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.stage_maps(x)  # CUDA graphs of the TransNeXt once use_cuda_graphs is on
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class TransNeXtMaskRCNN(MaskRCNN):
    """torchvision's MaskRCNN whose forward also hands the original image sizes to the
    RoI heads: mmdet rescales boxes to the original image *before* its NMS and pastes
    masks there, so that step lives in ``MMDetRoIHeads`` rather than in
    ``transform.postprocess``."""

    def forward(self, images, targets=None):
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        images = list(images)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = self.transform(images, targets)
        if targets is not None:
            for i, t in enumerate(targets):
                b = t["boxes"]
                if b.dim() != 2 or b.shape[-1] != 4:
                    raise ValueError(f"target {i}: boxes must be (n, 4), got {tuple(b.shape)}")
                bad = (b[:, 2:] <= b[:, :2]).any(dim=1)
                if bad.any():
                    raise ValueError(f"target {i}: box {b[bad][0].tolist()} has no width or "
                                     f"height after resizing (drop boxes under 1 pixel, as "
                                     f"mmdet's COCO loader does)")
        features = self.backbone(image_list.tensors)
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, image_list.image_sizes,
                                                     targets, original_sizes)
        if self.training:
            return {**detector_losses, **proposal_losses}
        return detections


def build_maskrcnn(model: str = "transnext_tiny", num_classes: int = 80, *, img_size=800,
                   pos_bias: str = "interpolate", min_size=800, max_size: int = 1333,
                   pretrained_backbone=None, drop_path_rate: float | None = None,
                   pretrain_size: int | None = None, rpn_pre_nms_top_n_train: int = 2000,
                   rpn_post_nms_top_n_train: int = 1000, rpn_pre_nms_top_n_test: int = 1000,
                   rpn_post_nms_top_n_test: int = 1000, box_detections_per_img: int = 100,
                   box_score_thresh: float = 0.05, quantize: bool = True,
                   mmdet_init: bool = True, fpn_channels: int = 256, box_fc: int = 1024,
                   mask_channels: int = 256, anchor_scale: float = 8.0,
                   rpn_batch_size_per_image: int = 256,
                   box_batch_size_per_image: int = 512) -> TransNeXtMaskRCNN:
    """The released Mask R-CNN 1x layout on a TransNeXt ``model`` with ``num_classes``
    foreground classes (torchvision's heads get one more: background at index 0).

    mmdet 2.28 settings (mask_rcnn_r50_fpn, as the authors' config): images resized to
    short side ``min_size`` / long side at most ``max_size`` (a tuple of short sides:
    one drawn per image in training), padded to 32; RPN anchors scale 8, ratios
    0.5/1/2, strides 4-64, NMS 0.7, pre/post-NMS per level 2000/1000 (train) and
    1000/1000 (test); RoIAlign 7/14 aligned, adaptive sampling; 2 shared FC 1024;
    sampler 512 RoIs, 25 % positive; 4-conv mask head, 28 x 28 masks; test score 0.05,
    NMS 0.5, 100 per image. ``drop_path_rate`` None: the authors' value for tiny/small/
    base (0.4/0.6/0.7), else 0.1. ``pretrained_backbone``: an ImageNet checkpoint file
    (any layout the package's loader reads). ``mmdet_init``: mmdet's initialisation of
    the neck and box head (Xavier FPN and shared FCs, normal 0.01 / 0.001 classifier and
    box regressor); torchvision's otherwise.

    Smaller heads for small data (the released layout is the default): ``fpn_channels``
    (256), ``box_fc`` (the shared FCs' width, 1024), ``mask_channels`` (the mask convs',
    256), ``anchor_scale`` (anchor side = scale x stride: 8 gives 32-512 px over P2-P6),
    ``rpn_batch_size_per_image`` (256 sampled anchors) and ``box_batch_size_per_image``
    (512 sampled RoIs). They keep every parameter name, so the converter is unaffected."""
    if num_classes < 1:
        raise ValueError(f"num_classes counts foreground classes, got {num_classes}")
    if drop_path_rate is None:
        drop_path_rate = RELEASED_DROP_PATH.get(model, DEFAULT_DROP_PATH)
    backbone = TransNeXtFPN(model, pos_bias=pos_bias, img_size=img_size,
                            pretrain_size=pretrain_size, drop_path_rate=drop_path_rate,
                            out_channels=fpn_channels)
    if pretrained_backbone is not None:
        load_checkpoint(backbone.body, pretrained_backbone)
    levels = ["0", "1", "2", "3"]
    net = TransNeXtMaskRCNN(
        backbone, num_classes=None, min_size=min_size, max_size=max_size,
        rpn_anchor_generator=MMDetAnchorGenerator(scales=(anchor_scale,)),
        box_roi_pool=MMDetRoIAlign(levels, 7), mask_roi_pool=MMDetRoIAlign(levels, 14),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_fc),
        box_predictor=FastRCNNPredictor(box_fc, num_classes + 1),
        mask_head=MaskRCNNHeads(fpn_channels, (mask_channels,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1))
    old = net.rpn
    net.rpn = MMDetRPN(
        old.anchor_generator, old.head, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=rpn_batch_size_per_image, positive_fraction=0.5,
        pre_nms_top_n=dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
        post_nms_top_n=dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
        nms_thresh=0.7, min_pos_iou=0.3)
    old = net.roi_heads
    net.roi_heads = MMDetRoIHeads(
        old.box_roi_pool, old.box_head, old.box_predictor, fg_iou_thresh=0.5,
        bg_iou_thresh=0.5, batch_size_per_image=box_batch_size_per_image, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=box_score_thresh, nms_thresh=0.5,
        detections_per_img=box_detections_per_img, mask_roi_pool=old.mask_roi_pool,
        mask_head=old.mask_head, mask_predictor=old.mask_predictor, min_pos_iou=0.5,
        mask_threshold=0.5)
    net.transform = MMDetTransform(min_size, max_size, 32, quantize=quantize)
    if mmdet_init:
        mmdet_init_(net)
    net.transnext_config = dict(
        arch="mask-rcnn", model=model, num_classes=num_classes, img_size=img_size,
        pos_bias=pos_bias,
        pretrain_size=backbone.body.pretrain_size, min_size=min_size, max_size=max_size,
        fpn_channels=fpn_channels, box_fc=box_fc, mask_channels=mask_channels,
        anchor_scale=anchor_scale, rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_batch_size_per_image=box_batch_size_per_image)
    net.class_names = None  # filled by the loaders when a file names its classes
    return net


@torch.no_grad()
def mmdet_init_(net: TransNeXtMaskRCNN) -> None:
    """mmdet 2.28's initialisation of the parts where torchvision's differs: FPN convs
    Xavier-uniform (torchvision: Kaiming-uniform a=1); shared FCs Xavier-uniform, the
    classifier normal(0, 0.01), the box regressor normal(0, 0.001) (torchvision: torch's
    Linear default); biases 0. RPN and mask head already match (normal 0.01; Kaiming
    fan-out)."""
    for m in net.backbone.fpn.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for fc in (net.roi_heads.box_head.fc6, net.roi_heads.box_head.fc7):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
    pred = net.roi_heads.box_predictor
    nn.init.normal_(pred.cls_score.weight, 0.0, 0.01)
    nn.init.normal_(pred.bbox_pred.weight, 0.0, 0.001)
    nn.init.zeros_(pred.cls_score.bias)
    nn.init.zeros_(pred.bbox_pred.bias)


def no_weight_decay_names(net: nn.Module, *, biases: bool = False) -> set[str]:
    """Parameter names that get no weight decay. The released config (mmcv custom_keys)
    exempts every name holding query_embedding, relative_pos_bias_local, cpb,
    temperature or norm; the other biases are decayed there. ``biases=True`` also exempts
    every 1-D parameter (biases, norms), the classification recipe's rule (timm)."""
    out = set()
    for name, p in net.named_parameters():
        if any(w in name for w in NO_DECAY_WORDS) or (biases and p.ndim <= 1):
            out.add(name)
    return out


def param_groups(net: nn.Module, weight_decay: float = 0.05, *, biases: bool = False) -> list[dict]:
    """Two AdamW groups: decayed, and :func:`no_weight_decay_names` with decay 0."""
    skip = no_weight_decay_names(net, biases=biases)
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
