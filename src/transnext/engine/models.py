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


def compile_model(model: torch.nn.Module, how: str = "model",
                  mode: str | None = None, backend: str = "inductor") -> torch.nn.Module:
    """torch.compile for the jobs, with static shapes.

    With torch's default (automatic dynamic shapes) the second input size is traced with
    symbolic sizes, several times slower, and the per-size tables (pool grids, bias
    coordinates) specialise the graph on the size anyway; static shapes make each new
    size one more compile of the first one's length. ``how='blocks'`` compiles each
    TransNeXt block on its own (regional compilation): the blocks of a stage share one
    compiled graph, so a cold compile takes a fraction of the whole model's (README,
    Performance). ``mode``: torch.compile's mode ('reduce-overhead': CUDA graphs).
    ``backend``: torch.compile's (tests trace with 'eager').
    Returns the module to call (``model`` itself for 'blocks').
    """
    mode = None if mode == "default" else mode
    if how == "blocks":
        from ..models.transnext import Block
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        if not blocks:
            raise UserError(f"--compile blocks: {type(model).__name__} has no TransNeXt "
                            f"blocks; use --compile model")
        # The blocks share one code object, so one cache: each (stage, input size, train or
        # eval) is an entry, and torch's default limit (8) would send the second size of a
        # training run with evaluation back to eager.
        cfg = torch._dynamo.config
        key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        stages = getattr(unwrap(model), "num_stages", 4)
        setattr(cfg, key, max(getattr(cfg, key), 2 * 8 * stages))  # 8 sizes, as one graph
        for b in blocks:
            b.compile(dynamic=False, mode=mode, backend=backend)
        return model
    if how != "model":
        raise UserError(f"--compile {how!r}: choose model or blocks")
    return torch.compile(model, dynamic=False, mode=mode, backend=backend)


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
