"""Reading and checking the released dense checkpoints (mmseg / mmdet files), shared by
the segmentation and detection converters: read with ``weights_only=True`` (a file whose
``meta`` holds objects that refuses is read by ``safe_pickle``: tensors only, no code run),
which head a file holds, its backbone variant, key tables from released names to ours, and
one strict key/shape check."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from ...models import CheckpointError, read_checkpoint
from ...models.checkpoint import (describe, key_mismatch, summarise, unwrap_state_dict,
                                  variant_name)
from .safe_pickle import load_tensors_only

# What other released heads look like (for refusing them by name).
_HEAD_SIGNS = [
    ("UperNet", "decode_head.psp_modules."),
    ("Mask2Former", "decode_head.pixel_decoder."),
    ("Mask R-CNN", "roi_head."),
    ("DINO", "dn_query_generator."),
]


class ConvertError(CheckpointError):
    """A released checkpoint that does not fit the asked head or variant."""


def read_any(path) -> dict:
    """A checkpoint file as a dict, read with ``weights_only=True``. A torch zip file
    that this refuses because of other objects in it (numpy scalars or mmengine
    history in ``meta``/``message_hub``) is read by ``safe_pickle``: tensors and plain
    containers only, nothing imported or run. Other failures keep the loader's message."""
    path = Path(path)
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        if not zipfile.is_zipfile(path):
            raise
        try:
            obj = load_tensors_only(path)
        except Exception:  # noqa: BLE001 - damaged too: the loader's message says why
            raise e from None
        if not isinstance(obj, dict):
            raise
        return obj


def state_dict_of(obj: dict, path) -> dict[str, torch.Tensor]:
    """The tensors under ``state_dict`` (or the top level) of a released file."""
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds no state dict")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise CheckpointError(f"{path} holds no tensors")
    return sd


def read_state_dict(path) -> dict[str, torch.Tensor]:
    return state_dict_of(read_any(path), path)


def read_released(path_or_state_dict, source: str | None = None) -> tuple[dict, dict, str]:
    """(file dict, its state dict, the name messages use) of a released ``.pth`` given as a
    path (read with ``weights_only=True``) or as its dict already read."""
    if isinstance(path_or_state_dict, dict):
        source, obj = source or "the state dict", path_or_state_dict
    else:
        source = source or f"checkpoint {path_or_state_dict}"
        obj = read_any(path_or_state_dict)
    return obj, state_dict_of(obj, source), source


def head_kind(sd: dict) -> str:
    for name, sign in _HEAD_SIGNS:
        if any(k.startswith(sign) for k in sd):
            return name
    if any(k.startswith("decode_head.") for k in sd):
        return "another segmentation head"
    return "no segmentation head (a backbone or classification checkpoint)"


def released_kind(obj: dict, path) -> str | None:
    """The head of a released (mmdet/mmseg) file as :func:`head_kind` names it; None for a
    file with no top-level tensors (e.g. a ``transnext train`` checkpoint: weights under
    "model"), which the backbone loader reads instead."""
    try:
        return head_kind(state_dict_of(obj, path))
    except CheckpointError:
        return None


def file_variant(sd: dict) -> str:
    """The TransNeXt variant of a dense checkpoint's backbone, e.g. 'transnext_tiny'."""
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return variant_name(describe(bb))


def check_strict(source: str, head_name: str, mapped: dict, unmapped: list, own: dict,
                 name=None, shape_hint: str = "another class count or head width?") -> None:
    """Strict: every key of the model (``own``) in ``mapped`` and nothing else, each of the
    model's shape; else one ConvertError naming the missing, unexpected or mis-shaped keys
    (``unmapped``: file keys no table entry took; ``name``: how to print a model key, e.g.
    its released name). Shared by the segmentation and detection converters."""
    name = name or (lambda k: k)
    missing = [name(k) for k in own if k not in mapped]
    unexpected = list(unmapped) + [name(k) for k in mapped if k not in own]
    if missing or unexpected:
        raise ConvertError(f"{source} does not fit the {head_name}: "
                           + key_mismatch(missing, unexpected, 6))
    bad = [f"{name(k)} {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if mapped[k].shape != own[k].shape]
    if bad:
        raise ConvertError(f"{source} has tensors of other shapes ({shape_hint}): "
                           f"{summarise(bad, 4)}")


class KeyTable:
    """Rows of (released key template, model key template, weight change or None);
    ``{name}`` fields match the regexes in ``fields``. Read forwards to convert a file,
    backwards to name a model key in released terms."""

    FIELDS = {"n": r"\d+", "m": r"\d+", "p": "weight|bias", "rest": ".+"}

    def __init__(self, rows, fields: dict | None = None):
        self.fields = {**self.FIELDS, **(fields or {})}
        self.rows = [(self._re(a), b, self._re(b), a, (r[2] if len(r) > 2 else None))
                     for r in rows for a, b in [r[:2]]]

    def _re(self, t: str) -> re.Pattern:
        pattern = re.escape(t)
        for name, rx in self.fields.items():
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
        return re.compile(pattern)

    def released_name(self, key: str) -> str:
        for _, _, rx, src, _ in self.rows:
            m = rx.fullmatch(key)
            if m:
                return src.format(**m.groupdict())
        return key

    def map(self, sd: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Released keys -> model keys; returns (mapped, unmapped file keys). Derived
        backbone tables that some exports carry are dropped (rebuilt per size)."""
        backbone = unwrap_state_dict({"state_dict": {k: v for k, v in sd.items()
                                                     if k.startswith("backbone.")}})
        kept = {f"backbone.{k}" for k in backbone}
        out, unmapped = {}, []
        for k, v in sd.items():
            if k.startswith("backbone.") and k not in kept:
                continue
            for rx, target, _, _, change in self.rows:
                m = rx.fullmatch(k)
                if m:
                    out[target.format(**m.groupdict())] = change(v) if change is not None else v
                    break
            else:
                unmapped.append(k)
        return out, unmapped
