"""Model construction shared by the jobs (any timm model name works)."""
from __future__ import annotations

import timm
import torch

from .. import models as _registry  # noqa: F401  (registers the TransNeXt models with timm)
from .errors import UserError


def create(name: str, num_classes: int, in_chans: int = 3, drop_path: float | None = None,
           **extra):
    """timm.create_model with the package's models registered; unknown names and bad
    arguments become one clear message."""
    kwargs = {k: v for k, v in extra.items() if v is not None}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise UserError(f"unknown model '{name}'" + (f"; similar: {', '.join(close)}" if close else ""))
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                 in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise UserError(f"model '{name}' does not accept these options: {e}") from None


def data_config(model) -> dict:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return {
        "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "interpolation": cfg.get("interpolation", "bicubic") or "bicubic",
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
    }


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
