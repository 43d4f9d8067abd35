"""The released ADE20K UperNet checkpoints (mmseg 0.30) -> ``TransNeXtUperNet``.

One key-mapping table for the head; the backbone part goes through the package's
one checkpoint loader (variant check, strict keys). Strict: every model key must
be filled and every file key must be mapped, else the missing and unexpected keys
are named. Files are read with ``weights_only=True``; a file whose ``meta`` holds
objects that refuses is read by ``safe_pickle`` (tensors only, no code run).
"""
from __future__ import annotations

import re

from ...models import apply_checkpoint
from ..common.released import (ConvertError, check_strict, file_variant, head_kind,
                               read_state_dict)
from .model import TransNeXtUperNet, build_upernet

# mmseg UPerHead / FCNHead module names -> transformers' UperNet names.
_CONV_MODULES = (r"decode_head\.psp_modules\.\d+\.1|decode_head\.bottleneck|"
                 r"decode_head\.lateral_convs\.\d+|decode_head\.fpn_convs\.\d+|"
                 r"decode_head\.fpn_bottleneck|auxiliary_head\.convs\.\d+")
UPERNET_HEAD_MAP = [
    (rf"^({_CONV_MODULES})\.conv\.weight$", r"\1.conv.weight"),
    (rf"^({_CONV_MODULES})\.bn\.(weight|bias|running_mean|running_var|num_batches_tracked)$",
     r"\1.batch_norm.\2"),
    (r"^(decode_head|auxiliary_head)\.conv_seg\.(weight|bias)$", r"\1.classifier.\2"),
]
_HEAD_MAP = [(re.compile(a), b) for a, b in UPERNET_HEAD_MAP]

def map_head_keys(sd: dict) -> tuple[dict, list[str]]:
    """Head keys renamed by the table; returns (mapped, unmapped file keys)."""
    out, unmapped = {}, []
    for k, v in sd.items():
        if k.startswith("backbone."):
            continue
        for pat, rep in _HEAD_MAP:
            if pat.match(k):
                out[pat.sub(rep, k)] = v
                break
        else:
            unmapped.append(k)
    return out, unmapped


def load_upernet_state(model: TransNeXtUperNet, sd: dict, source: str) -> None:
    """Load a released UperNet state dict strictly into ``model``."""
    kind = head_kind(sd)
    if kind != "UperNet":
        raise ConvertError(f"{source} is a {kind} checkpoint, not UperNet")
    want = model.config.backbone_config.model_name
    have = file_variant(sd)
    if have != want:
        raise ConvertError(f"{source} holds a UperNet on {have}, but the model is {want}")
    head, unmapped = map_head_keys(sd)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    check_strict(source, "UperNet", head, unmapped, own)
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    apply_checkpoint(model.backbone.model, {"state_dict": backbone}, source, strict=True)
    missing_h, unexpected_h = model.load_state_dict(head, strict=False)
    assert not unexpected_h and all(k.startswith("backbone.") for k in missing_h)


def upernet_from_released(path, model_name: str | None = None, *, pos_bias: str = "interpolate",
                          img_size=512, id2label: dict | None = None) -> TransNeXtUperNet:
    """Build the UperNet a released file describes (variant, class count, widths) and
    load it. ``model_name``, when given, must match the file's variant."""
    return upernet_from_state(read_state_dict(path), f"checkpoint {path}", model_name,
                              pos_bias=pos_bias, img_size=img_size, id2label=id2label)


def _released_variant(sd: dict, source, head: str, model_name: str | None) -> str:
    """The TransNeXt variant of a released ``head`` file, refused (naming both) when the
    file holds another head, another variant than ``model_name``, or no TransNeXt."""
    kind = head_kind(sd)
    if kind != head:
        raise ConvertError(f"{source} is a {kind} checkpoint, not {head}")
    variant = file_variant(sd)
    if model_name is not None and variant != model_name:
        raise ConvertError(f"{source} holds a {head} on {variant}, not {model_name}")
    if not variant.startswith("transnext_") or " " in variant:
        raise ConvertError(f"{source}: its backbone is {variant}")
    return variant


def upernet_from_state(sd: dict, source: str, model_name: str | None = None, *,
                       pos_bias: str = "interpolate", img_size=512,
                       id2label: dict | None = None) -> TransNeXtUperNet:
    """:func:`upernet_from_released` on a state dict already read."""
    variant = _released_variant(sd, source, "UperNet", model_name)
    try:
        num_labels = int(sd["decode_head.conv_seg.weight"].shape[0])
        channels = int(sd["decode_head.bottleneck.conv.weight"].shape[0])
        aux = "auxiliary_head.conv_seg.weight" in sd
        aux_channels = int(sd["auxiliary_head.convs.0.conv.weight"].shape[0]) if aux else 256
    except KeyError as e:
        raise ConvertError(f"{source} does not fit the UperNet: missing key {e}") from None
    model = build_upernet(variant, num_labels, pos_bias=pos_bias, img_size=img_size,
                          channels=channels, aux_channels=aux_channels, aux=aux,
                          id2label=id2label)
    load_upernet_state(model, sd, source)
    return model.eval()


# ---- Mask2Former (mmseg 1.0 / mmdet 3.0 names -> transformers' names) ----------------
_PD, _TD = "decode_head.pixel_decoder", "decode_head.transformer_decoder"
_HF_PD, _HF_TM = "model.pixel_level_module.decoder", "model.transformer_module"
MASK2FORMER_HEAD_MAP = [
    (rf"^{_PD}\.input_convs\.(\d+)\.conv\.(weight|bias)$", rf"{_HF_PD}.input_projections.\1.0.\2"),
    (rf"^{_PD}\.input_convs\.(\d+)\.gn\.(weight|bias)$", rf"{_HF_PD}.input_projections.\1.1.\2"),
    (rf"^{_PD}\.encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|"
     rf"value_proj|output_proj)\.(weight|bias)$", rf"{_HF_PD}.encoder.layers.\1.self_attn.\2.\3"),
    (rf"^{_PD}\.encoder\.layers\.(\d+)\.norms\.0\.(weight|bias)$",
     rf"{_HF_PD}.encoder.layers.\1.self_attn_layer_norm.\2"),
    (rf"^{_PD}\.encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)$",
     rf"{_HF_PD}.encoder.layers.\1.fc1.\2"),
    (rf"^{_PD}\.encoder\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)$",
     rf"{_HF_PD}.encoder.layers.\1.fc2.\2"),
    (rf"^{_PD}\.encoder\.layers\.(\d+)\.norms\.1\.(weight|bias)$",
     rf"{_HF_PD}.encoder.layers.\1.final_layer_norm.\2"),
    (rf"^{_PD}\.level_encoding\.weight$", rf"{_HF_PD}.level_embed"),
    (rf"^{_PD}\.lateral_convs\.0\.conv\.weight$", rf"{_HF_PD}.adapter_1.0.weight"),
    (rf"^{_PD}\.lateral_convs\.0\.gn\.(weight|bias)$", rf"{_HF_PD}.adapter_1.1.\1"),
    (rf"^{_PD}\.output_convs\.0\.conv\.weight$", rf"{_HF_PD}.layer_1.0.weight"),
    (rf"^{_PD}\.output_convs\.0\.gn\.(weight|bias)$", rf"{_HF_PD}.layer_1.1.\1"),
    (rf"^{_PD}\.mask_feature\.(weight|bias)$", rf"{_HF_PD}.mask_projection.\1"),
    (r"^decode_head\.query_embed\.weight$", rf"{_HF_TM}.queries_embedder.weight"),
    (r"^decode_head\.query_feat\.weight$", rf"{_HF_TM}.queries_features.weight"),
    (r"^decode_head\.level_embed\.weight$", rf"{_HF_TM}.level_embed.weight"),
    (rf"^{_TD}\.layers\.(\d+)\.cross_attn\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|"
     rf"out_proj\.bias)$", rf"{_HF_TM}.decoder.layers.\1.cross_attn.\2"),
    # mmcv's self-attention keeps q, k, v in one in_proj; transformers' has three Linears
    (rf"^{_TD}\.layers\.(\d+)\.self_attn\.attn\.in_proj_(weight|bias)$",
     rf"{_HF_TM}.decoder.layers.\1.self_attn.{{q,k,v}}_proj.\2"),
    (rf"^{_TD}\.layers\.(\d+)\.self_attn\.attn\.out_proj\.(weight|bias)$",
     rf"{_HF_TM}.decoder.layers.\1.self_attn.out_proj.\2"),
    # mmdet's layer order is cross-attention, self-attention, FFN: norms 0, 1, 2
    (rf"^{_TD}\.layers\.(\d+)\.norms\.0\.(weight|bias)$",
     rf"{_HF_TM}.decoder.layers.\1.cross_attn_layer_norm.\2"),
    (rf"^{_TD}\.layers\.(\d+)\.norms\.1\.(weight|bias)$",
     rf"{_HF_TM}.decoder.layers.\1.self_attn_layer_norm.\2"),
    (rf"^{_TD}\.layers\.(\d+)\.norms\.2\.(weight|bias)$",
     rf"{_HF_TM}.decoder.layers.\1.final_layer_norm.\2"),
    (rf"^{_TD}\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)$",
     rf"{_HF_TM}.decoder.layers.\1.fc1.\2"),
    (rf"^{_TD}\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)$",
     rf"{_HF_TM}.decoder.layers.\1.fc2.\2"),
    (rf"^{_TD}\.post_norm\.(weight|bias)$", rf"{_HF_TM}.decoder.layernorm.\1"),
    (r"^decode_head\.mask_embed\.0\.(weight|bias)$",
     rf"{_HF_TM}.decoder.mask_predictor.mask_embedder.0.0.\1"),
    (r"^decode_head\.mask_embed\.2\.(weight|bias)$",
     rf"{_HF_TM}.decoder.mask_predictor.mask_embedder.1.0.\1"),
    (r"^decode_head\.mask_embed\.4\.(weight|bias)$",
     rf"{_HF_TM}.decoder.mask_predictor.mask_embedder.2.0.\1"),
    (r"^decode_head\.cls_embed\.(weight|bias)$", r"class_predictor.\1"),
]
_M2F_MAP = [(re.compile(a), b) for a, b in MASK2FORMER_HEAD_MAP]
_M2F_BACKBONE = "model.pixel_level_module.encoder.model."
# buffers the model derives from its config, not stored in the released files
_M2F_DERIVED = ("criterion.empty_weight",)


def map_mask2former_keys(sd: dict) -> tuple[dict, list[str]]:
    out, unmapped = {}, []
    for k, v in sd.items():
        if k.startswith("backbone."):
            continue
        for pat, rep in _M2F_MAP:
            if pat.match(k):
                target = pat.sub(rep, k)
                if "{q,k,v}" in target:
                    for name, part in zip("qkv", v.chunk(3, dim=0)):
                        out[target.replace("{q,k,v}", name)] = part.clone()
                else:
                    out[target] = v
                break
        else:
            unmapped.append(k)
    return out, unmapped


def load_mask2former_state(model, sd: dict, source: str) -> None:
    """Load a released Mask2Former state dict strictly into ``model``."""
    kind = head_kind(sd)
    if kind != "Mask2Former":
        raise ConvertError(f"{source} is a {kind} checkpoint, not Mask2Former")
    want = model.config.backbone_config.model_name
    have = file_variant(sd)
    if have != want:
        raise ConvertError(f"{source} holds a Mask2Former on {have}, but the model is {want}")
    head, unmapped = map_mask2former_keys(sd)
    own = {k: v for k, v in model.state_dict().items()
           if not k.startswith(_M2F_BACKBONE) and k not in _M2F_DERIVED}
    check_strict(source, "Mask2Former", head, unmapped, own)
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    apply_checkpoint(model.model.pixel_level_module.encoder.model, {"state_dict": backbone},
                     source, strict=True)
    missing_h, unexpected_h = model.load_state_dict(head, strict=False)
    assert not unexpected_h


def mask2former_from_state(sd: dict, source: str, model_name: str | None = None, *,
                           pos_bias: str = "interpolate", img_size=512,
                           id2label: dict | None = None):
    from .mask2former import build_mask2former
    variant = _released_variant(sd, source, "Mask2Former", model_name)
    try:
        num_labels = int(sd["decode_head.cls_embed.weight"].shape[0]) - 1
    except KeyError as e:
        raise ConvertError(f"{source} does not fit the Mask2Former: missing key {e}") from None
    model = build_mask2former(variant, num_labels, pos_bias=pos_bias, img_size=img_size,
                              id2label=id2label)
    load_mask2former_state(model, sd, source)
    return model.eval()


def model_from_state(sd: dict, source: str, model_name: str | None = None, **kw):
    """The released segmenter a state dict describes: UperNet or Mask2Former."""
    kind = head_kind(sd)
    if kind == "Mask2Former":
        return mask2former_from_state(sd, source, model_name, **kw)
    return upernet_from_state(sd, source, model_name, **kw)


def model_from_released(path, model_name: str | None = None, **kw):
    return model_from_state(read_state_dict(path), f"checkpoint {path}", model_name, **kw)
