"""Weights in and out: the one place that maps checkpoint layouts to the model.

Understands the released classification checkpoints (a plain state dict or one
under ``model``), the released detection/segmentation checkpoints (under
``state_dict`` with a ``backbone.`` prefix beside the heads' keys), our own
training checkpoints (under ``model``), DDP/compile prefixes, and
``.safetensors``. Files are read with ``weights_only=True``: no code in a data
file is ever executed.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from .archs import ARCHS

# Derived tables some exports carry; they are rebuilt per size here.
_DERIVED_BUFFERS = {"relative_pos_index", "relative_coords_table", "seq_length_scale",
                    "padding_mask"}
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
_STAGE_KEY = re.compile(r"^(?:patch_embed|block|norm)(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the model, with the reason."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file into a dict, safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt or unreadable safetensors file {path}: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {e}") from e
    except Exception as e:  # pickle.UnpicklingError from the weights-only unpickler
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain "
                f"containers, which weights_only=True will not unpickle ({e})") from e
        # Any other unpickling failure: the bytes are not a checkpoint at all.
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a checkpoint "
                              f"({str(e).strip().splitlines()[-1][:200] if str(e) else e!r})"
                              ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict, whichever wrapper key holds them, with
    DDP/compile prefixes removed and only the backbone of a dense-task model."""
    sd = obj
    for key in _WRAPPER_KEYS:
        if isinstance(sd.get(key), dict) and sd[key]:
            sd = sd[key]
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        # Detection/segmentation checkpoint: keep the backbone, leave the heads.
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS}


def describe(sd_or_model) -> dict:
    """Architecture signature: per stage (dim, depth, heads, attention kind)."""
    if isinstance(sd_or_model, nn.Module):
        m = sd_or_model
        return {
            "stages": [
                (m.embed_dims[i], m.depths[i], m.num_heads[i],
                 "aggregated" if m.sr_ratios[i] > 1 else "full")
                for i in range(m.num_stages)
            ]
        }
    sd = sd_or_model
    stages = []
    i = 1
    while f"patch_embed{i}.proj.weight" in sd:
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith(f"block{i}.")}
        temp = sd.get(f"block{i}.0.attn.temperature")
        kind = "aggregated" if f"block{i}.0.attn.q.weight" in sd else "full"
        stages.append((sd[f"patch_embed{i}.proj.weight"].shape[0], len(blocks),
                       int(temp.shape[0]) if temp is not None else None, kind))
        i += 1
    return {"stages": stages}


def variant_name(signature: dict) -> str:
    """Name of the known variant with this signature, else the signature itself."""
    stages = signature["stages"]
    for name, a in ARCHS.items():
        ref = [(a["embed_dims"][i], a["depths"][i], a["num_heads"][i],
                "aggregated" if a["sr_ratios"][i] > 1 else "full") for i in range(4)]
        if stages == ref:
            return name
        if stages and stages == ref[: len(stages)]:
            return f"{name} (first {len(stages)} stages)"
    dims = [s[0] for s in stages]
    depths = [s[1] for s in stages]
    kinds = "".join("A" if s[3] == "aggregated" else "F" for s in stages)
    return f"an unknown variant (dims={dims}, depths={depths}, attention={kinds})"


def _check_variant(sd: dict, model: nn.Module, source: str) -> None:
    want = describe(model)["stages"]
    have = describe(sd)["stages"]
    if have[: len(want)] != want:
        raise CheckpointError(
            f"{source} holds weights of {variant_name({'stages': have})}, but the model is "
            f"{variant_name(describe(model))}; create the model that matches the checkpoint")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module,
                         source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: any supported layout -> this model's keys.

    The head and the input conv are left for timm to adapt (class count and
    ``in_chans`` changes); the variant is checked here.
    """
    sd = unwrap_state_dict(state_dict)
    _check_variant(sd, model, source)
    keep = []
    for k, v in sd.items():
        m = _STAGE_KEY.match(k)
        if m and int(m.group(1)) > model.num_stages:
            continue  # stage pruned away (features_only with fewer out_indices)
        if k.startswith("head.") and not isinstance(model.head, nn.Linear):
            continue  # backbone without a classifier
        keep.append((k, v))
    return dict(keep)


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                    drop_head: bool = False) -> dict:
    """Load a published or own checkpoint into a TransNeXt model (or its
    ``features_only`` wrapper). Strict about the backbone: every backbone key
    must be present and every key must be known. ``drop_head`` skips the
    classifier (fine-tuning into another class count).

    Returns the checkpoint dict (for metadata such as class names).
    """
    obj = read_checkpoint(path)
    apply_checkpoint(model, obj, f"checkpoint {path}", strict=strict, drop_head=drop_head)
    return obj


def apply_checkpoint(model: nn.Module, obj: dict, source: str = "checkpoint",
                     strict: bool = True, drop_head: bool = False) -> None:
    """:func:`load_checkpoint` on a checkpoint dict already read; ``source`` names
    it in error messages."""
    net = getattr(model, "model", model)  # timm's FeatureGetterNet wraps the model
    sd = checkpoint_filter_fn(obj, net, source)
    if drop_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    own = net.state_dict()
    missing = [k for k in own if k not in sd and not (drop_head and k.startswith("head."))]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_summarise(unexpected)}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    bad = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        hint = ""
        if any(b.startswith("head.") for b in bad):
            hint = " (a different class count: pass drop_head=True to fine-tune)"
        elif any(b.startswith("patch_embed1.proj.weight") for b in bad):
            hint = " (a different number of input channels)"
        raise CheckpointError(f"{source} has tensors of the wrong shape{hint}: "
                              f"{_summarise(bad, 4)}")
    net.load_state_dict(sd, strict=strict and not drop_head)
