"""DINO (mmdet 3.0) on a TransNeXt backbone, as the released COCO models compute it
(SPEC section 9): 4-scale (backbone stages 2-4 + one extra level) or 5-scale (stages 1-4
+ one), a channel mapper (1x1 conv + GN 32, one 3x3 stride-2 conv + GN on the last
backbone map), 6 deformable-attention encoder layers, two-stage query selection (900
queries), 6 decoder layers with box refinement and "look forward twice", contrastive
denoising in training, 300 detections per image.

Input and output follow torchvision's detectors: ``model(images)`` in eval mode takes a
list of (3, H, W) RGB images (float 0-1 or uint8), resizes each keep-ratio into
(``max_size``, ``min_size``) as mmdet does, and returns one dict per image with
``boxes`` (x1, y1, x2, y2 in that image's pixels), ``labels`` (1..K) and ``scores``.
``model(images, targets)`` in train mode takes images already resized by the data
pipeline (no resize here) and targets with ``boxes`` (float xyxy pixels of these images)
and ``labels`` (int64 1..K), and returns the loss dict (mmdet's names).

Under AMP (bf16/fp16 autocast) the box arithmetic stays in float32: positional
encodings, reference points, ``inverse_sigmoid``, the regression branches and box
refinement, the encoder proposals, and the head's outputs (bf16 keeps about three
significant digits: a box logit near 5 would move in steps of 0.03).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...engine.cuda_graphs import GraphedStages
from ...models import ARCHS, load_checkpoint
from ...ops.msda import MultiScaleDeformableAttention
from .canvas import pad_to, pick_canvas
from .dino_denoising import CdnQueryGenerator, host_to_device
from .dino_layers import (ChannelMapper, Decoder, DINOHead, Encoder, cxcywh_to_xyxy,
                          inverse_sigmoid, mask_sine_encoding)
from .dino_loss import DinoCriterion
from .mmdet_compat import MEAN_255, STD_255, mmdet_rescale_size

# drop_path_rate of the authors' DINO backbones (detection/dino/transnext_native.py)
RELEASED_DROP_PATH = {"transnext_tiny": 0.3, "transnext_small": 0.5, "transnext_base": 0.6}
DEFAULT_DROP_PATH = 0.1
# TransNeXt parameters the released config keeps out of weight decay (custom_keys)
BACKBONE_NO_DECAY_WORDS = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature")


# ---- the detector -------------------------------------------------------------------
class TransNeXtDINO(GraphedStages, nn.Module):
    """DINO detector; build it with :func:`build_dino`.

    ``backbone_indices``: the TransNeXt stage indices handed to the neck (run through
    ``backbone.forward_intermediates``); None: ``backbone(x)`` itself returns the list
    of maps (any backbone, e.g. timm's ``features_only`` models)."""

    def __init__(self, backbone: nn.Module, in_channels: list[int],
                 backbone_indices: list[int] | None, num_classes: int, *, num_levels: int = 4,
                 embed_dims: int = 256, ffn_dims: int = 2048, enc_layers: int = 6,
                 dec_layers: int = 6, num_heads: int = 8, num_points: int = 4,
                 num_queries: int = 900, num_dn_queries: int = 100, label_noise: float = 0.5,
                 box_noise: float = 1.0, detections: int = 300, min_size: int = 800,
                 max_size: int = 1333):
        super().__init__()
        if embed_dims % 32 or embed_dims % num_heads:
            raise ValueError(f"embed_dims must be a multiple of 32 (GroupNorm 32) and of "
                             f"num_heads {num_heads}, got {embed_dims}")
        if min(num_queries, detections, num_levels) < 1:
            raise ValueError(f"num_queries ({num_queries}), detections ({detections}) and "
                             f"num_levels ({num_levels}) must be positive")
        self.backbone = backbone
        self.backbone_indices = None if backbone_indices is None else list(backbone_indices)
        self.canvases = None  # training batches padded to one of these (canvas.use_canvases)
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.detections = detections
        self.min_size, self.max_size = min_size, max_size
        self.neck = ChannelMapper(list(in_channels), embed_dims, num_levels)
        self.level_embed = nn.Parameter(torch.zeros(num_levels, embed_dims))
        self.encoder = Encoder(enc_layers, embed_dims, ffn_dims, num_heads, num_levels,
                               num_points)
        self.decoder = Decoder(dec_layers, embed_dims, ffn_dims, num_heads, num_levels,
                               num_points)
        self.memory_trans_fc = nn.Linear(embed_dims, embed_dims)
        self.memory_trans_norm = nn.LayerNorm(embed_dims)
        self.query_embedding = nn.Embedding(num_queries, embed_dims)
        self.bbox_head = DINOHead(embed_dims, num_classes, dec_layers + 1)
        self.dn_query_generator = CdnQueryGenerator(
            num_classes=num_classes, embed_dims=embed_dims, num_matching_queries=num_queries,
            label_noise_scale=label_noise, box_noise_scale=box_noise,
            num_dn_queries=num_dn_queries)
        self.criterion = DinoCriterion(num_classes)
        self.register_buffer("pixel_mean", torch.tensor(MEAN_255).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(STD_255).view(3, 1, 1), persistent=False)
        self.transnext_config: dict = {}
        self.class_names: list[str] | None = None

    # ---- init (mmdet's DINO.init_weights and DINOHead.init_weights) ----
    @torch.no_grad()
    def init_weights(self) -> None:
        """Neck: Kaiming-normal (fan-out) convs, GN 1/0 (mmcv ConvModule). Encoder and
        decoder: Xavier-uniform on every >1-D parameter, then the deformable attentions'
        own init. memory_trans_fc and query_embedding Xavier-uniform, level_embed
        normal. Head: the branches start as copies of one (mmdet deep-copies them),
        classifier biases at prior 0.01, last box layer zero. The backbone is left
        alone."""
        for m in self.neck.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for coder in (self.encoder, self.decoder):
            for p in coder.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.memory_trans_fc.weight)
        nn.init.xavier_uniform_(self.query_embedding.weight)
        nn.init.normal_(self.level_embed)
        head = self.bbox_head
        prior = -math.log((1 - 0.01) / 0.01)
        for branches in (head.cls_branches, head.reg_branches):
            for b in branches[1:]:
                b.load_state_dict(branches[0].state_dict())
        for c in head.cls_branches:
            nn.init.constant_(c.bias, prior)
        for r in head.reg_branches:
            nn.init.zeros_(r[-1].weight)
            nn.init.zeros_(r[-1].bias)

    # ---- input ----
    def preprocess(self, images, resize: bool) -> tuple[Tensor, list[tuple[int, int]]]:
        """0-255 values (resized keep-ratio and rounded to the uint8 grid as mmdet's
        cv2 resize leaves them, when ``resize``), ImageNet-normalised, zero-padded
        bottom-right to the batch's largest -> (B, 3, H, W), [(h, w) per image]."""
        out = []
        for i, im in enumerate(images):
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3:
                shape = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
                raise ValueError(f"image {i}: expected a (3, H, W) tensor, got {shape}")
            x = im.float() if im.dtype == torch.uint8 else im.float() * 255.0
            if resize:
                h, w = x.shape[-2:]
                nh, nw = mmdet_rescale_size(h, w, self.min_size, self.max_size)
                if (nh, nw) != (h, w):
                    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear",
                                      align_corners=False)[0].round().clamp(0, 255)
            out.append((x - self.pixel_mean) / self.pixel_std)
        if not out:
            raise ValueError("no images")
        shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in out]
        H, W = max(s[0] for s in shapes), max(s[1] for s in shapes)
        if self.training and self.canvases:  # canvas.use_canvases (CUDA graphs)
            H, W = pick_canvas(H, W, self.canvases) or (H, W)
        return pad_to(out, (H, W)), shapes

    def _graph_body(self):
        if self.backbone_indices is None:
            raise ValueError("CUDA graphs of the backbone need a TransNeXt backbone "
                             "(backbone_indices); this DINO was built with another one")
        return self.backbone, self.backbone_indices

    def backbone_maps(self, x: Tensor) -> list[Tensor]:
        if self.backbone_indices is not None:
            return self.stage_maps(x)  # CUDA graphs once use_cuda_graphs is on
        return list(self.backbone(x))

    # ---- transformer ----
    def head_forward(self, feats: list[Tensor], img_shapes: list[tuple[int, int]],
                     batch_shape: tuple[int, int], targets: list[dict] | None = None) -> dict:
        """Neck, encoder, query selection, decoder and head on the backbone maps.

        ``targets`` (0-based labels, xyxy pixel boxes of each image): with them the
        denoising queries go first (training); without, only the matching queries.
        Returns "cls" (L, B, Ndn + Q, K) logits and "boxes" (L, B, Ndn + Q, 4) sigmoid
        (cx, cy, w, h) normalised to each image's img_shape, "enc_cls" (B, Q, K),
        "enc_boxes" (B, Q, 4) (the selected encoder proposals), "dn_meta" (None
        without targets); float32 under autocast too (float64 in a double model)."""
        maps = self.neck(feats)
        if len(maps) != self.num_levels:
            raise ValueError(f"{len(maps)} levels for a {self.num_levels}-level DINO")
        B, dev = maps[0].shape[0], maps[0].device
        if len(img_shapes) != B:
            raise ValueError(f"{len(img_shapes)} image shapes for a batch of {B}")
        H, W = int(batch_shape[0]), int(batch_shape[1])
        full = torch.ones((B, H, W), dtype=torch.float32, device=dev)
        for i, (h, w) in enumerate(img_shapes):
            full[i, :h, :w] = 0
        shapes = [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
        masks = [F.interpolate(full[None], size=s)[0].bool() for s in shapes]
        starts, s0 = [], 0
        for h, w in shapes:
            starts.append(s0)
            s0 += h * w
        if self.num_queries > s0:
            raise ValueError(
                f"num_queries {self.num_queries} exceeds the {s0} encoder tokens of a "
                f"{H}x{W} input ({' + '.join(f'{h}x{w}' for h, w in shapes)}): use larger "
                f"images or fewer queries")
        half = maps[0].shape[1] // 2
        ct = self.level_embed.dtype  # the box arithmetic's: float32 (float64 in a double model)
        feat = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = torch.cat([mask_sine_encoding(mk, half, ct) + self.level_embed[lvl]
                         for lvl, mk in enumerate(masks)], 1)
        mask = torch.cat([mk.flatten(1) for mk in masks], 1)
        valid_ratios = torch.stack([
            torch.stack([(~mk[:, 0, :]).sum(1).to(ct) / mk.shape[2],
                         (~mk[:, :, 0]).sum(1).to(ct) / mk.shape[1]], -1)
            for mk in masks], 1)  # (B, L, 2) as (x, y)
        memory = self.encoder(feat, pos, mask, shapes, starts, valid_ratios)

        query, ref, enc_cls, enc_boxes = self.select_queries(memory, mask, masks)
        self_mask, dn_meta, n_dn = None, None, 0
        if targets is not None:
            labels = [t["labels"] for t in targets]
            boxes = [_normalise_xyxy(t["boxes"].float(), h, w)
                     for t, (h, w) in zip(targets, img_shapes)]
            dn_label, dn_box, self_mask, dn_meta = self.dn_query_generator(labels, boxes)
            n_dn = dn_label.shape[1]
            if n_dn == 0:
                self_mask = None  # nothing to hide: plain attention
            query = torch.cat([dn_label.to(query.dtype), query], 1)
            ref = torch.cat([dn_box.to(ref.dtype), ref], 1)
        states, refs = self.decoder(query, ref.sigmoid(), memory, mask, shapes, starts,
                                    valid_ratios, self_mask, self.bbox_head)
        if targets is not None and n_dn == 0:
            # keeps label_embedding in the graph when no image has a box (DDP)
            states = states + self.dn_query_generator.label_embedding.weight[0, 0] * 0.0
        cls, boxes = [], []
        for lid in range(states.shape[0]):
            cls.append(self.bbox_head.logits(lid, states[lid]))
            delta = self.bbox_head.box_delta(lid, states[lid])
            boxes.append((delta + inverse_sigmoid(refs[lid])).sigmoid())
        return {"cls": torch.stack(cls), "boxes": torch.stack(boxes), "enc_cls": enc_cls,
                "enc_boxes": enc_boxes, "dn_meta": dn_meta}

    def encoder_proposals(self, memory: Tensor, mask: Tensor,
                          masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        """mmdet's gen_encoder_output_proposals: per token a box centred on its pixel
        (normalised by the level's valid size), side 0.05 * 2**level, in inverse-sigmoid
        space (inf where padded or too near the border); the memory zeroed there, then
        memory_trans_fc + memory_trans_norm."""
        B, dev, ct = memory.shape[0], memory.device, self.level_embed.dtype
        props = []
        for lvl, mk in enumerate(masks):
            H, W = mk.shape[-2:]
            valid = torch.stack([(~mk[:, 0, :]).sum(1), (~mk[:, :, 0]).sum(1)], -1).to(ct)
            gy, gx = torch.meshgrid(torch.arange(H, dtype=ct, device=dev),
                                    torch.arange(W, dtype=ct, device=dev), indexing="ij")
            grid = (torch.stack([gx, gy], -1)[None] + 0.5) / valid.view(B, 1, 1, 2)
            wh = torch.full_like(grid, 0.05 * 2.0 ** lvl)
            props.append(torch.cat([grid, wh], -1).view(B, -1, 4))
        p = torch.cat(props, 1)
        ok = ((p > 0.01) & (p < 0.99)).all(-1, keepdim=True)
        p = torch.log(p / (1 - p))
        drop = mask[..., None] | ~ok
        p = p.masked_fill(drop, float("inf"))
        out = memory.masked_fill(drop, 0.0)
        return self.memory_trans_norm(self.memory_trans_fc(out)), p

    def select_queries(self, memory: Tensor, mask: Tensor, masks: list[Tensor]):
        """Two-stage selection: the encoder branch scores every token, the top
        ``num_queries`` by their best class become the initial boxes; the content
        queries are the learned ``query_embedding``. Returns (query (B, Q, C),
        reference (B, Q, 4) inverse-sigmoid, detached, enc_cls, enc_boxes)."""
        B = memory.shape[0]
        out, props = self.encoder_proposals(memory, mask, masks)
        last = len(self.bbox_head.cls_branches) - 1
        enc_cls = self.bbox_head.logits(last, out)
        enc_coord = self.bbox_head.box_delta(last, out) + props
        idx = enc_cls.max(-1).values.topk(self.num_queries, dim=1).indices
        top_cls = enc_cls.gather(1, idx[..., None].expand(-1, -1, enc_cls.shape[-1]))
        top_coord = enc_coord.gather(1, idx[..., None].expand(-1, -1, 4))
        query = self.query_embedding.weight[None].expand(B, -1, -1)
        return query, top_coord.detach(), top_cls, top_coord.sigmoid()

    # ---- output ----
    def postprocess(self, out: dict, img_shapes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Top ``detections`` over the last layer's (query x class) sigmoid scores per
        image; boxes scaled to img_shape, clamped to it, divided by the scale factor
        (resized / original per axis) -> original pixels. Labels 1..K."""
        cls, boxes = out["cls"][-1], out["boxes"][-1]
        B, Q, K = cls.shape
        k = min(self.detections, Q * K)
        scores, idx = cls.sigmoid().flatten(1).topk(k, dim=1)
        labels = idx % K
        q = torch.div(idx, K, rounding_mode="floor")
        b = cxcywh_to_xyxy(boxes.gather(1, q[..., None].expand(-1, -1, 4)))
        size = torch.tensor([[w, h, w, h] for h, w in img_shapes], dtype=torch.float64)
        orig = torch.tensor([[w, h, w, h] for h, w in original_sizes], dtype=torch.float64)
        size, sf = (host_to_device(t.to(b.dtype), b.device) for t in (size, size / orig))
        b = torch.minimum((b * size[:, None]).clamp(min=0), size[:, None]) / sf[:, None]
        return [{"boxes": b[i], "labels": labels[i] + 1, "scores": scores[i]} for i in range(B)]

    def forward(self, images, targets: list[dict] | None = None):
        images = list(images)
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            if len(targets) != len(images):
                raise ValueError(f"{len(targets)} targets for {len(images)} images")
            x, img_shapes = self.preprocess(images, resize=False)
            tg = self.prepare_targets(targets, x.device)
            out = self.head_forward(self.backbone_maps(x), img_shapes, x.shape[-2:], tg)
            return self.criterion(out, tg, img_shapes)
        originals = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        x, img_shapes = self.preprocess(images, resize=True)
        out = self.head_forward(self.backbone_maps(x), img_shapes, x.shape[-2:])
        return self.postprocess(out, img_shapes, originals)

    def prepare_targets(self, targets: list[dict], device) -> list[dict]:
        """torchvision targets (labels 1..K) -> 0-based labels, float32 boxes on
        ``device`` (pinned, non-blocking copies from the host). Label values are checked
        where that costs no device sync (on the host)."""
        out = []
        for i, t in enumerate(targets):
            b, lab = t["boxes"], t["labels"]
            if b.dim() != 2 or b.shape[-1] != 4 or lab.dim() != 1 or len(lab) != len(b):
                raise ValueError(f"target {i}: boxes (n, 4) and labels (n,) expected, got "
                                 f"{tuple(b.shape)} and {tuple(lab.shape)}")
            if lab.device.type == "cpu" and len(lab) and (lab.min() < 1 or
                                                          lab.max() > self.num_classes):
                raise ValueError(f"target {i}: labels must be 1..{self.num_classes} "
                                 f"(torchvision's convention), got {lab.min()}..{lab.max()}")
            out.append({"boxes": host_to_device(b.float(), device),
                        "labels": host_to_device(lab.long(), device) - 1})
        return out


def _normalise_xyxy(b: Tensor, h: int, w: int) -> Tensor:
    """Pixel xyxy boxes / (w, h, w, h) (by Python numbers: no host-to-device copy)."""
    return torch.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h], -1)


def _transnext_backbone(model: str, num_levels: int, pos_bias: str, img_size,
                        pretrain_size: int | None, drop_path_rate: float | None):
    import transnext  # registers the models with timm
    if model not in ARCHS:
        raise ValueError(f"unknown TransNeXt variant {model!r}; one of {sorted(ARCHS)}")
    if num_levels not in (4, 5):
        raise ValueError(f"num_levels must be 4 (stages 2-4 + one) or 5 (stages 1-4 + one) "
                         f"on TransNeXt, got {num_levels}")
    if drop_path_rate is None:
        drop_path_rate = RELEASED_DROP_PATH.get(model, DEFAULT_DROP_PATH)
    body = transnext.create_model(
        model, num_classes=0, in_chans=3, pos_bias=pos_bias,
        img_size=img_size if pos_bias == "interpolate" else None,
        pretrain_size=pretrain_size, drop_path_rate=drop_path_rate)
    indices = [1, 2, 3] if num_levels == 4 else [0, 1, 2, 3]
    return body, [ARCHS[model]["embed_dims"][i] for i in indices], indices


def build_dino(model: str = "transnext_tiny", num_classes: int = 80, *, num_levels: int = 4,
               img_size=800, pos_bias: str = "interpolate", pretrain_size: int | None = None,
               drop_path_rate: float | None = None, min_size: int = 800, max_size: int = 1333,
               num_queries: int = 900, num_dn_queries: int = 100, label_noise: float = 0.5,
               box_noise: float = 1.0, detections: int = 300, embed_dims: int = 256,
               ffn_dims: int = 2048, enc_layers: int = 6, dec_layers: int = 6,
               num_heads: int = 8, num_points: int = 4, backbone: nn.Module | None = None,
               in_channels: list[int] | None = None, pretrained_backbone=None,
               init: bool = True) -> TransNeXtDINO:
    """The released DINO layout (dino-{4,5}scale, 12 epochs) with ``num_classes``
    foreground classes on a TransNeXt ``model``: backbone in ``pos_bias`` mode at
    ``img_size`` (800), stages 2-4 (``num_levels`` 4) or 1-4 (5) plus one extra level;
    ``drop_path_rate`` None: the authors' 0.3 / 0.5 / 0.6 for tiny / small / base,
    else 0.1. ``pretrained_backbone``: an ImageNet checkpoint (any layout the package's
    loader reads).

    Another backbone (e.g. for a comparison under the same detector): ``backbone`` a
    module whose ``forward(x)`` returns the list of maps the neck takes, with their
    ``in_channels`` (read off ``backbone.feature_info.channels()`` when not given, as
    timm's ``features_only`` models have it); ``num_levels`` = those maps + the extra
    levels. ``init``: mmdet's initialisation of everything but the backbone."""
    if num_classes < 1:
        raise ValueError(f"num_classes counts foreground classes, got {num_classes}")
    if backbone is None:
        body, chans, indices = _transnext_backbone(model, num_levels, pos_bias, img_size,
                                                   pretrain_size, drop_path_rate)
        if pretrained_backbone is not None:
            load_checkpoint(body, pretrained_backbone)
        if in_channels is not None and list(in_channels) != chans:
            raise ValueError(f"in_channels {list(in_channels)} do not match {model}'s "
                             f"stage widths {chans}")
    else:
        body, indices = backbone, None
        if in_channels is None:
            info = getattr(backbone, "feature_info", None)
            if info is None or not hasattr(info, "channels"):
                raise ValueError("in_channels is needed with a backbone that has no "
                                 "feature_info.channels()")
            in_channels = info.channels()
        chans = [int(c) for c in in_channels]
        if pretrained_backbone is not None:
            raise ValueError("pretrained_backbone is for the TransNeXt backbone; load a "
                             "custom backbone's weights before passing it")
        model = f"custom:{type(backbone).__name__}"
    net = TransNeXtDINO(
        body, chans, indices, num_classes, num_levels=num_levels, embed_dims=embed_dims,
        ffn_dims=ffn_dims, enc_layers=enc_layers, dec_layers=dec_layers, num_heads=num_heads,
        num_points=num_points, num_queries=num_queries, num_dn_queries=num_dn_queries,
        label_noise=label_noise, box_noise=box_noise, detections=detections,
        min_size=min_size, max_size=max_size)
    if init:
        net.init_weights()
    net.transnext_config = dict(
        arch=f"dino-{num_levels}scale", model=model, num_classes=num_classes,
        num_levels=num_levels, img_size=img_size,
        pos_bias=pos_bias, pretrain_size=getattr(body, "pretrain_size", pretrain_size),
        min_size=min_size, max_size=max_size, num_queries=num_queries,
        num_dn_queries=num_dn_queries, detections=detections, embed_dims=embed_dims,
        ffn_dims=ffn_dims, enc_layers=enc_layers, dec_layers=dec_layers,
        num_heads=num_heads, num_points=num_points, custom_backbone=backbone is not None)
    return net


def param_groups(net: TransNeXtDINO, lr: float = 1e-4, weight_decay: float = 0.05,
                 backbone_lr_mult: float = 0.1, *, released: bool = True) -> list[dict]:
    """AdamW groups of the released DINO configs (mmengine paramwise_cfg with
    custom_keys for the backbone, bias_decay_mult = norm_decay_mult = flat_decay_mult =
    0): no weight decay on 1-D parameters (biases, norms, in_proj_bias) anywhere, nor on
    the TransNeXt query_embedding, relative_pos_bias_local, cpb and temperature; the
    backbone at ``lr * backbone_lr_mult``.

    ``released``: as the authors' configs list the backbone keys: their custom_keys
    name patch_embed1-3 and norm1-3 only (``range(len(depths) - 1)``), so the last
    stage's patch_embed and norm train at the full lr. False: the whole backbone at the
    backbone lr. Groups carry ``initial_lr`` for the schedulers."""
    bb = net.backbone
    last = getattr(bb, "num_stages", None) if net.backbone_indices is not None else None
    full_lr = (f"patch_embed{last}.", f"norm{last}.") if released and last else ()
    transnext_words = BACKBONE_NO_DECAY_WORDS if net.backbone_indices is not None else ()
    in_backbone = {id(p): n for n, p in bb.named_parameters()}
    groups: dict = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        bname = in_backbone.get(id(p))
        decay = p.ndim > 1 and not (bname is not None and any(w in bname for w in transnext_words))
        mult = 1.0 if bname is None or bname.startswith(full_lr) else backbone_lr_mult
        key = (decay, mult)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr": lr * mult, "initial_lr": lr * mult}
        groups[key]["params"].append(p)
    return list(groups.values())
