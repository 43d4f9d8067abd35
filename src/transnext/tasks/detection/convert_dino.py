"""The released COCO DINO checkpoints (mmdet 3.0, ``dino_{4,5}scale_transnext_{v}_12e_in1k.pth``)
-> ``TransNeXtDINO``.

One mapping table (:data:`DINO_KEY_MAP`) names, for every released key, the model key
it fills. Most names are the same: the model's modules are named as mmdet's. Two
differ: mmcv wraps the decoder's self-attention in a module holding ``attn`` (an
``nn.MultiheadAttention``; ours is that module itself), and mmcv's FFN is
``layers.0.0`` / ``layers.1`` (ours ``fc1`` / ``fc2``). Backbone keys are the TransNeXt
model's own (SPEC section 7), under ``backbone.`` in both.

Strict: every model key must come from the file and every file key must be mapped, else
the missing and unexpected keys are named in released terms; another head (Mask R-CNN,
UperNet, ...), another TransNeXt variant or another number of levels (4-scale vs
5-scale) is refused naming both. Files are read with ``weights_only=True``; a ``meta``
that refuses it is read tensors-only (no code run).

``save_converted_dino`` writes the model's own layout as safetensors plus a json config;
``load_converted_dino`` builds the model from them.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..common.released import (ConvertError, KeyTable, check_strict, file_variant, head_kind,
                               read_released)
from .convert import read_sidecar_config, write_converted
from .dino import TransNeXtDINO, build_dino

HEAD = "DINO"
CONFIG_KEY = "transnext_dino"
FORMAT = "transnext DINO (sigmoid classes, no background)"

_MSDA = "sampling_offsets|attention_weights|value_proj|output_proj"
# (released key template, model key template): {n}/{m} numbers, {p} weight or bias,
# {msda} a deformable-attention projection, {mha} an nn.MultiheadAttention tensor,
# {rest} anything. Read forwards to convert, backwards to name a model key in released
# terms.
DINO_KEY_MAP = [
    ("backbone.{rest}", "backbone.{rest}"),
    ("neck.convs.{n}.conv.weight", "neck.convs.{n}.conv.weight"),
    ("neck.convs.{n}.gn.{p}", "neck.convs.{n}.gn.{p}"),
    ("neck.extra_convs.{n}.conv.weight", "neck.extra_convs.{n}.conv.weight"),
    ("neck.extra_convs.{n}.gn.{p}", "neck.extra_convs.{n}.gn.{p}"),
    ("level_embed", "level_embed"),
    ("encoder.layers.{n}.self_attn.{msda}.{p}", "encoder.layers.{n}.self_attn.{msda}.{p}"),
    ("encoder.layers.{n}.ffn.layers.0.0.{p}", "encoder.layers.{n}.ffn.fc1.{p}"),
    ("encoder.layers.{n}.ffn.layers.1.{p}", "encoder.layers.{n}.ffn.fc2.{p}"),
    ("encoder.layers.{n}.norms.{m}.{p}", "encoder.layers.{n}.norms.{m}.{p}"),
    ("decoder.layers.{n}.self_attn.attn.{mha}", "decoder.layers.{n}.self_attn.{mha}"),
    ("decoder.layers.{n}.cross_attn.{msda}.{p}", "decoder.layers.{n}.cross_attn.{msda}.{p}"),
    ("decoder.layers.{n}.ffn.layers.0.0.{p}", "decoder.layers.{n}.ffn.fc1.{p}"),
    ("decoder.layers.{n}.ffn.layers.1.{p}", "decoder.layers.{n}.ffn.fc2.{p}"),
    ("decoder.layers.{n}.norms.{m}.{p}", "decoder.layers.{n}.norms.{m}.{p}"),
    ("decoder.ref_point_head.layers.{n}.{p}", "decoder.ref_point_head.layers.{n}.{p}"),
    ("decoder.norm.{p}", "decoder.norm.{p}"),
    ("query_embedding.weight", "query_embedding.weight"),
    ("memory_trans_fc.{p}", "memory_trans_fc.{p}"),
    ("memory_trans_norm.{p}", "memory_trans_norm.{p}"),
    ("bbox_head.cls_branches.{n}.{p}", "bbox_head.cls_branches.{n}.{p}"),
    ("bbox_head.reg_branches.{n}.{m}.{p}", "bbox_head.reg_branches.{n}.{m}.{p}"),
    ("dn_query_generator.label_embedding.weight", "dn_query_generator.label_embedding.weight"),
]
_TABLE = KeyTable(DINO_KEY_MAP, {
    "msda": _MSDA, "mha": r"in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias"})
# names only our layout has (the table's renames), to tell a converted state dict
_OWN_NAME = re.compile(r"(en|de)coder\.layers\.\d+\.(ffn\.fc[12]|self_attn\.(in|out)_proj)")


def released_dino_name(key: str) -> str:
    """The released (mmdet) name of a model key."""
    return _TABLE.released_name(key)


def map_dino_keys(sd: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released keys -> model keys by the table; returns (mapped, unmapped file keys)."""
    return _TABLE.map(sd)


def _arch(levels: int) -> str:
    return f"dino-{levels}scale"


def released_dino_kind(sd: dict, source: str = "the state dict") -> tuple[str, int]:
    """(TransNeXt variant, number of levels) of a released DINO state dict; refused,
    naming both, when it holds another head or no TransNeXt backbone."""
    kind = head_kind(sd)
    if kind != HEAD:
        if kind.startswith("no segmentation head"):
            what = ("a backbone, classification or converted (our own layout) checkpoint"
                    if not any(k.startswith("neck.") for k in sd) else "another detector")
            raise ConvertError(f"{source} is {what}, not a released {HEAD} "
                               f"(converted files load with load_converted_dino)")
        raise ConvertError(f"{source} is a {kind} checkpoint, not {HEAD}")
    ours = [k for k in sd if _OWN_NAME.match(k)]
    if ours:
        raise ConvertError(f"{source} is a converted {HEAD} (our own layout: {ours[0]}), not a "
                           f"released one; converted files load with load_converted_dino")
    variant = file_variant(sd)
    if not variant.startswith("transnext_") or " " in variant:
        raise ConvertError(f"{source}: its backbone is {variant}, not a TransNeXt variant")
    le = sd.get("level_embed")
    if not isinstance(le, torch.Tensor) or le.dim() != 2:
        raise ConvertError(f"{source} does not fit the {HEAD}: missing key level_embed")
    return variant, int(le.shape[0])


def _check_kind(sd: dict, source: str, model: str | None, levels: int | None) -> tuple[str, int]:
    variant, have = released_dino_kind(sd, source)
    if model is not None and variant != model:
        raise ConvertError(f"{source} holds a {HEAD} on {variant}, not {model}")
    if levels is not None and have != levels:
        raise ConvertError(f"{source} is {_arch(have)} ({have} levels), not {_arch(levels)} "
                           f"({levels} levels)")
    return variant, have


def _strict_load(net: nn.Module, mapped: dict, unmapped: list, source: str,
                 name_released: bool = True) -> None:
    check_strict(source, HEAD, mapped, unmapped, net.state_dict(),
                 name=released_dino_name if name_released else None,
                 shape_hint="another class count, query count or head width?")
    net.load_state_dict(mapped, strict=True)


def load_dino_state(net: TransNeXtDINO, sd: dict, source: str = "the state dict") -> None:
    """Load a released DINO state dict strictly into ``net`` (same variant, same number
    of levels, every key and shape)."""
    cfg = getattr(net, "transnext_config", {})
    if cfg.get("custom_backbone"):
        raise ConvertError(f"the model has a custom backbone ({cfg.get('model')}); the "
                           f"released {HEAD} files hold TransNeXt")
    _check_kind(sd, source, cfg.get("model"), net.num_levels)
    mapped, unmapped = map_dino_keys(sd)
    _strict_load(net, mapped, unmapped, source)


def _count(sd: dict, prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for m in map(rx.match, sd) if m})


def released_dino_config(sd: dict, source: str = "the state dict", model: str | None = None,
                         num_levels: int | None = None) -> dict:
    """The build_dino arguments a released DINO state dict fixes: variant, levels,
    classes, queries, widths and layer counts (read off its shapes; the released files
    are 256 wide, FFN 2048, 6 + 6 layers, 900 queries, 80 classes). ``model`` and
    ``num_levels``, when given, must match the file's."""
    variant, levels = _check_kind(sd, source, model, num_levels)
    try:
        return {"model": variant, "num_levels": levels,
                "num_classes": int(sd["bbox_head.cls_branches.0.weight"].shape[0]),
                "num_queries": int(sd["query_embedding.weight"].shape[0]),
                "embed_dims": int(sd["level_embed"].shape[1]),
                "ffn_dims": int(sd["encoder.layers.0.ffn.layers.0.0.weight"].shape[0]),
                "enc_layers": _count(sd, "encoder.layers."),
                "dec_layers": _count(sd, "decoder.layers.")}
    except KeyError as e:
        raise ConvertError(f"{source} does not fit the {HEAD}: missing key {e.args[0]}") from None


def _meta_classes(obj: dict) -> list[str] | None:
    """Class names from mmdet 3's ``meta['dataset_meta']['classes']`` (or mmdet 2's
    ``meta['CLASSES']``), when they are plain strings."""
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return None
    dm = meta.get("dataset_meta")
    names = dm.get("classes") if isinstance(dm, dict) else meta.get("CLASSES")
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def load_released_dino(path_or_state_dict, model: str | TransNeXtDINO | None = None, *,
                       source: str | None = None, **build_kw) -> TransNeXtDINO:
    """The model of a released ``dino_{4,5}scale_transnext_{v}_12e_in1k.pth`` (a path, or
    its dict / ``state_dict`` already read), in eval mode; ``class_names`` from the
    file's meta when it has them.

    ``model``: None builds the file's variant with its number of levels, classes,
    queries, widths and layer counts (:func:`released_dino_config`; heads and points are
    build_dino's 8 and 4 unless given); a variant name must match the file's; a built
    ``TransNeXtDINO`` is loaded in place (its variant and levels must match).
    ``source`` names a dict in messages; ``build_kw`` go to :func:`build_dino`."""
    obj, sd, source = read_released(path_or_state_dict, source)
    names = _meta_classes(obj)
    if isinstance(model, nn.Module):
        load_dino_state(model, sd, source)
        net = model
    else:
        cfg = released_dino_config(sd, source, model, build_kw.pop("num_levels", None))
        for k, v in cfg.items():
            if k != "model":
                build_kw.setdefault(k, v)
        build_kw.setdefault("init", False)
        net = build_dino(cfg["model"], build_kw.pop("num_classes"), **build_kw)
        load_dino_state(net, sd, source)
    if names is not None and len(names) == net.num_classes:
        net.class_names = names
    return net.eval()


# ---- our own converted files --------------------------------------------------------
_CONFIG_FIELDS = ("model", "num_classes", "num_levels", "img_size", "pos_bias", "num_queries",
                  "embed_dims", "ffn_dims", "enc_layers", "dec_layers", "num_heads",
                  "num_points")


def save_converted_dino(model: TransNeXtDINO, out_path, *,
                        class_names: list[str] | None = None) -> tuple[Path, Path]:
    """Write the model's state dict as ``out_path`` (safetensors) and its config beside it
    (same name, ``.json``; also in the safetensors metadata): variant, arch
    (dino-4scale / dino-5scale), classes, levels, sizes and class names when known."""
    cfg = dict(getattr(model, "transnext_config", {}))
    if not cfg or cfg.get("custom_backbone"):
        raise ConvertError("save_converted_dino takes a TransNeXt DINO built by build_dino")
    class_names = class_names if class_names is not None else model.class_names
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for {model.num_classes} classes")
    config = {k: cfg[k] for k in _CONFIG_FIELDS}
    config.update(arch=_arch(cfg["num_levels"]),
                  class_names=list(class_names) if class_names is not None else None,
                  format=FORMAT)
    return write_converted(out_path, model.state_dict(), config, CONFIG_KEY)


def read_converted_dino_config(path) -> dict:
    """The json beside a converted file, else the one in its safetensors metadata."""
    return read_sidecar_config(path, CONFIG_KEY, HEAD, FORMAT)


def load_converted_dino(path, **build_kw) -> TransNeXtDINO:
    """The model of a file written by :func:`save_converted_dino`, in eval mode (strict)."""
    from ...models import read_checkpoint
    path = Path(path)
    cfg = read_converted_dino_config(path)
    sd = read_checkpoint(path)
    kw = {k: cfg[k] for k in _CONFIG_FIELDS if k not in ("model", "num_classes") and k in cfg}
    kw["init"] = False
    kw.update(build_kw)
    net = build_dino(cfg["model"], int(cfg["num_classes"]), **kw)
    _strict_load(net, sd, [], f"converted file {path}", name_released=False)
    net.class_names = cfg.get("class_names")
    return net.eval()


def convert_dino_file(src, dst, class_names: list[str] | None = None, *,
                      source: str | None = None) -> tuple[Path, Path]:
    """Released DINO ``.pth`` (a path, or its dict already read) -> converted
    safetensors + json, after a strict load."""
    net = load_released_dino(src, source=source)
    return save_converted_dino(net, dst, class_names=class_names or net.class_names)
