"""The released COCO Mask R-CNN checkpoints (mmdet 2.28) -> ``TransNeXtMaskRCNN``.

One mapping table (:data:`MASKRCNN_KEY_MAP`) renames every released key to the
torchvision model's and names the weight change it needs, where mmdet's layout differs:

* ``fc_cls`` has the background class last (81 rows, background = 80); torchvision's
  ``cls_score`` has it first: the last row moves to the front;
* ``fc_reg`` (80 x 4 class-specific deltas) and ``conv_logits`` (80 masks) have no
  background slot; torchvision's have one (never used): zero rows are inserted in front.

Strict: every model key must come from the file and every file key must be mapped,
else the missing and unexpected keys are named; another head (DINO, UperNet, ...) or
another TransNeXt variant is refused naming both. Files are read with
``weights_only=True`` (a ``meta`` that refuses it is read tensors-only, no code run).

``save_converted`` writes the torchvision layout as safetensors plus a json config;
``load_converted`` builds the model from them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...models.checkpoint import describe, summarise, variant_name
from ..common.released import (ConvertError, KeyTable, check_strict, file_variant, head_kind,
                               read_any, read_released, state_dict_of)
from .maskrcnn import TransNeXtMaskRCNN, build_maskrcnn

HEAD = "Mask R-CNN"
CONFIG_KEY = "transnext_maskrcnn"


def _bg_last_to_first(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[-1:], t[:-1]], dim=0)


def _bg_slot(rows: int):
    def insert(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.new_zeros((rows, *t.shape[1:])), t], dim=0)
    return insert


# (released key, torchvision key, weight change), as templates: {n} a number, {p} weight
# or bias, {rest} anything. Backbone keys keep their names under ``backbone.body.``
# (SPEC section 7). The same table names, in released terms, the keys a file lacks.
MASKRCNN_KEY_MAP = [
    ("backbone.{rest}", "backbone.body.{rest}", None),
    ("neck.lateral_convs.{n}.conv.{p}", "backbone.fpn.inner_blocks.{n}.0.{p}", None),
    ("neck.fpn_convs.{n}.conv.{p}", "backbone.fpn.layer_blocks.{n}.0.{p}", None),
    ("rpn_head.rpn_conv.{p}", "rpn.head.conv.0.0.{p}", None),
    ("rpn_head.rpn_cls.{p}", "rpn.head.cls_logits.{p}", None),
    ("rpn_head.rpn_reg.{p}", "rpn.head.bbox_pred.{p}", None),
    ("roi_head.bbox_head.shared_fcs.0.{p}", "roi_heads.box_head.fc6.{p}", None),
    ("roi_head.bbox_head.shared_fcs.1.{p}", "roi_heads.box_head.fc7.{p}", None),
    ("roi_head.bbox_head.fc_cls.{p}", "roi_heads.box_predictor.cls_score.{p}", _bg_last_to_first),
    ("roi_head.bbox_head.fc_reg.{p}", "roi_heads.box_predictor.bbox_pred.{p}", _bg_slot(4)),
    ("roi_head.mask_head.convs.{n}.conv.{p}", "roi_heads.mask_head.{n}.0.{p}", None),
    ("roi_head.mask_head.upsample.{p}", "roi_heads.mask_predictor.conv5_mask.{p}", None),
    ("roi_head.mask_head.conv_logits.{p}", "roi_heads.mask_predictor.mask_fcn_logits.{p}",
     _bg_slot(1)),
]

_TABLE = KeyTable(MASKRCNN_KEY_MAP)


def released_name(key: str) -> str:
    """The released (mmdet) name of a torchvision model key."""
    return _TABLE.released_name(key)


def map_keys(sd: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released keys -> torchvision keys by the table; returns (mapped, unmapped keys)."""
    return _TABLE.map(sd)


def released_variant(sd: dict, source: str = "the state dict", model_name: str | None = None) -> str:
    """The TransNeXt variant of a released Mask R-CNN state dict; refused (naming both)
    when it holds another head, no TransNeXt, or another variant than ``model_name``."""
    kind = head_kind(sd)
    if kind != HEAD:
        if kind.startswith("no segmentation head"):
            kind = ("a backbone, classification or converted (torchvision-layout) checkpoint"
                    if not any(k.startswith("neck.") for k in sd) else "another detector")
            raise ConvertError(f"{source} is {kind}, not a released {HEAD} "
                               f"(converted files load with load_converted)")
        raise ConvertError(f"{source} is a {kind} checkpoint, not {HEAD}")
    variant = file_variant(sd)
    if not variant.startswith("transnext_") or " " in variant:
        raise ConvertError(f"{source}: its backbone is {variant}, not a TransNeXt variant")
    if model_name is not None and variant != model_name:
        raise ConvertError(f"{source} holds a {HEAD} on {variant}, not {model_name}")
    return variant


def convert_maskrcnn_state_dict(sd: dict, variant: str | None = None,
                                source: str = "the state dict") -> dict[str, torch.Tensor]:
    """A released mmdet Mask R-CNN state dict in torchvision's layout (keys of
    ``build_maskrcnn(variant, num_classes)``). Checks the head kind and variant; the
    key set is checked strictly when loading (:func:`load_maskrcnn_state`)."""
    released_variant(sd, source, variant)
    mapped, unmapped = map_keys(sd)
    if unmapped:
        raise ConvertError(f"{source} has {len(unmapped)} key(s) the {HEAD} mapping does not "
                           f"know: {summarise(unmapped, 6)}")
    return mapped


def _strict_load(net: nn.Module, mapped: dict, unmapped: list, source: str,
                 name_released: bool = True) -> None:
    check_strict(source, HEAD, mapped, unmapped, net.state_dict(),
                 name=released_name if name_released else None)
    net.load_state_dict(mapped, strict=True)


def load_maskrcnn_state(net: TransNeXtMaskRCNN, sd: dict, source: str = "the state dict") -> None:
    """Load a released state dict strictly into ``net`` (its variant must match)."""
    want = net.transnext_config["model"]
    released_variant(sd, source, want)
    mapped, unmapped = map_keys(sd)
    _strict_load(net, mapped, unmapped, source)


def load_released_maskrcnn(path_or_state_dict, model: str | TransNeXtMaskRCNN | None = None,
                           *, source: str | None = None, **build_kw) -> TransNeXtMaskRCNN:
    """The model of a released ``mask_rcnn_transnext_{v}_fpn_1x_coco_in1k.pth`` (a path,
    or its dict / ``state_dict`` already read), in eval mode; ``class_names`` from the
    file's ``meta['CLASSES']`` when it has them (else None).

    ``model``: None builds the file's variant; a variant name must match the file's; a
    built ``TransNeXtMaskRCNN`` is loaded in place. ``source`` names a dict in messages.
    ``build_kw`` go to :func:`build_maskrcnn` (the class count comes from the file)."""
    obj, sd, source = read_released(path_or_state_dict, source)
    names = _meta_classes(obj)
    if isinstance(model, nn.Module):
        load_maskrcnn_state(model, sd, source)
        if names is not None and len(names) == model.transnext_config["num_classes"]:
            model.class_names = names
        return model.eval()
    variant = released_variant(sd, source, model)
    try:
        num_classes = int(sd["roi_head.bbox_head.fc_cls.weight"].shape[0]) - 1
    except KeyError:
        raise ConvertError(f"{source} does not fit the {HEAD}: missing key "
                           f"roi_head.bbox_head.fc_cls.weight") from None
    build_kw.setdefault("mmdet_init", False)
    net = build_maskrcnn(variant, num_classes, **build_kw)
    load_maskrcnn_state(net, sd, source)
    if names is not None and len(names) == num_classes:
        net.class_names = names
    return net.eval()


def _meta_classes(obj: dict) -> list[str] | None:
    """The class names mmdet keeps in ``meta['CLASSES']``, when they are plain strings."""
    meta = obj.get("meta") if isinstance(obj, dict) else None
    names = meta.get("CLASSES") if isinstance(meta, dict) else None
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


# ---- our own converted files --------------------------------------------------------
def _config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_converted(model_or_state_dict, out_path, *, variant: str | None = None,
                   num_classes: int | None = None, img_size=None, pos_bias: str | None = None,
                   class_names: list[str] | None = None) -> tuple[Path, Path]:
    """Write a torchvision-layout state dict as ``out_path`` (safetensors) and its
    config beside it (same name, ``.json``; also in the safetensors metadata): variant,
    num_classes, img_size, pos_bias and class names (when known). For a state dict,
    the variant and class count are read off its shapes unless given."""
    if isinstance(model_or_state_dict, nn.Module):
        cfg = dict(getattr(model_or_state_dict, "transnext_config", {}))
        sd = model_or_state_dict.state_dict()
    else:
        cfg, sd = {}, dict(model_or_state_dict)
    body = {k[len("backbone.body."):]: v for k, v in sd.items() if k.startswith("backbone.body.")}
    found = variant_name(describe(body))
    variant = variant or cfg.get("model") or found
    if variant != found:
        raise ConvertError(f"the weights hold {found}, not {variant}")
    if "roi_heads.box_predictor.cls_score.weight" not in sd:
        raise ConvertError(f"not a {HEAD} state dict in torchvision's layout "
                           f"(no roi_heads.box_predictor.cls_score.weight)")
    found_k = int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1
    num_classes = num_classes or cfg.get("num_classes") or found_k
    if num_classes != found_k:
        raise ConvertError(f"the weights have {found_k} classes, not {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    config = {"model": variant, "num_classes": num_classes,
              "img_size": img_size if img_size is not None else cfg.get("img_size", 800),
              "pos_bias": pos_bias or cfg.get("pos_bias", "interpolate"),
              "class_names": list(class_names) if class_names is not None else None,
              "format": "torchvision MaskRCNN (background class 0)"}
    return write_converted(out_path, sd, config, CONFIG_KEY)


def write_converted(out_path, tensors: dict, config: dict, config_key: str) -> tuple[Path, Path]:
    """``out_path`` (safetensors, the config also in its metadata under ``config_key``)
    and the config as json beside it (same name, ``.json``)."""
    from safetensors.torch import save_file
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(out_path), metadata={config_key: json.dumps(config)})
    cfg_path = _config_path(out_path)
    cfg_path.write_text(json.dumps(config, indent=1) + "\n")
    return out_path, cfg_path


def read_sidecar_config(path, config_key: str = CONFIG_KEY, head: str = HEAD,
                        fmt: str | None = None) -> dict:
    """The json beside a converted file, else the one in its safetensors metadata
    (``config_key``); with ``fmt``, a json of another format is refused."""
    path = Path(path)
    cfg_path = _config_path(path)
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if fmt is not None and cfg.get("format") != fmt:
            raise ConvertError(f"{cfg_path} describes {cfg.get('format', 'another model')}, "
                               f"not a converted {head}")
        return cfg
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - not a safetensors file: say so
        raise ConvertError(f"{path} is not a converted {head} file: {e}") from None
    if config_key not in meta:
        raise ConvertError(f"{path} has no {head} config (no {cfg_path.name}, none in its "
                           f"metadata)")
    return json.loads(meta[config_key])


def read_converted_config(path) -> dict:
    """The config of a converted Mask R-CNN (json beside it, else its metadata)."""
    return read_sidecar_config(path)


def load_converted(path, **build_kw) -> TransNeXtMaskRCNN:
    """The model of a file written by :func:`save_converted`, in eval mode (strict)."""
    from ...models import read_checkpoint
    path = Path(path)
    cfg = read_converted_config(path)
    if str(cfg.get("arch", "")).startswith("dino"):
        raise ConvertError(f"{path} is a converted {cfg['arch']}, not {HEAD} (it loads with "
                           f"convert_dino.load_converted_dino)")
    sd = read_checkpoint(path)
    kw = dict(img_size=cfg.get("img_size", 800), pos_bias=cfg.get("pos_bias", "interpolate"),
              mmdet_init=False)
    kw.update(build_kw)
    net = build_maskrcnn(cfg["model"], int(cfg["num_classes"]), **kw)
    _strict_load(net, sd, [], f"converted file {path}", name_released=False)
    net.class_names = cfg.get("class_names")
    return net.eval()


def convert_file(src, dst, class_names: list[str] | None = None) -> tuple[Path, Path]:
    """Released ``.pth`` (Mask R-CNN or DINO, told by its keys) -> converted safetensors
    + json (after a strict load)."""
    source = f"checkpoint {src}"
    obj = read_any(src)
    if head_kind(state_dict_of(obj, source)) == "DINO":
        from .convert_dino import convert_dino_file
        return convert_dino_file(obj, dst, class_names, source=source)
    net = load_released_maskrcnn(obj, source=source)
    return save_converted(net, dst, class_names=class_names or net.class_names)
