"""Loading a detector (Mask R-CNN, DINO) from any of its forms (``det train``
checkpoint, ``det convert`` safetensors, released mmdet ``.pth``) and evaluating it on a
COCO-layout set: box (and mask) AP with the official COCOeval, each image counted once
over ranks."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from ...engine.distributed import broadcast_object
from ...engine.errors import UserError
from ...engine.evaluate import autocast
from ...engine.loaders import ShardSampler
from ...models import CheckpointError
from ..common.released import head_kind, read_any, state_dict_of
from .coco import CocoDetection, collate
from .convert import load_converted, load_released_maskrcnn
from .evaluation import CocoEvaluator
from .maskrcnn import TransNeXtMaskRCNN, build_maskrcnn
from .names import coco_category_ids, coco_classes
from .recipes import ARCHS

log = logging.getLogger("transnext.det")

CONFIG_KEY = "det_config"


def is_training_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "model" in obj and CONFIG_KEY in obj


def build_from_config(cfg: dict, init: bool = False, **overrides) -> TransNeXtMaskRCNN:
    """The model a ``det train`` checkpoint describes (its ``det_config``). ``init``:
    mmdet's initialisation of the heads (a new run; loading weights needs none)."""
    cfg = dict(cfg)
    arch = cfg.pop("arch", "mask-rcnn")
    if arch not in ARCHS:
        raise UserError(f"unknown detection architecture {arch!r}; this version has "
                        f"{', '.join(ARCHS)}")
    cfg.update(overrides)
    if arch.startswith("dino"):
        from .dino import build_dino
        return build_dino(num_levels=5 if arch == "dino-5scale" else 4, init=init, **cfg)
    return build_maskrcnn(mmdet_init=init, **cfg)


def load_converted_any(path, **build_kw):
    """A ``det convert`` file of either architecture (told by its config)."""
    from .convert_dino import load_converted_dino, read_converted_dino_config
    try:
        read_converted_dino_config(path)
    except CheckpointError:  # not a converted DINO: Mask R-CNN's loader says what it is
        return load_converted(path, **build_kw)
    return load_converted_dino(path, **build_kw)


def describe_config(cfg: dict) -> str:
    return (f"{cfg.get('arch', 'mask-rcnn')} on {cfg.get('model')} with "
            f"{cfg.get('num_classes')} classes")


def _released_head(obj: dict, path) -> str | None:
    """The head of a released mmdet file ("Mask R-CNN", "DINO", ...), None if unknown."""
    try:
        return head_kind(state_dict_of(obj, path))
    except CheckpointError:
        return None


def _other_kind(obj) -> str | None:
    """What a checkpoint of another task is, in words (None: not recognised as one)."""
    if not isinstance(obj, dict):
        return None
    if "seg_config" in obj:
        return "a `transnext seg train` (segmentation) checkpoint"
    if "model" in obj and "model_name" in obj:
        return (f"a classification checkpoint of {obj['model_name']} (use it as "
                f"--pretrained for `det train`)")
    return None


def load_model(path, model_name: str | None = None, num_classes: int | None = None,
               **build_kw) -> TransNeXtMaskRCNN:
    """A detector (Mask R-CNN, DINO), in eval mode, from a ``det train`` checkpoint, a ``det convert``
    safetensors file or a released mmdet ``.pth``; ``class_names`` and
    ``label_to_cat_id`` are set on it (COCO's when the file names no classes and has
    80). ``model_name`` / ``num_classes``: what the caller expects (refused otherwise,
    naming both). ``build_kw`` override build options (e.g. ``min_size``)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--checkpoint {p} is a folder; pass a checkpoint file (.pth or "
                        f".safetensors)")
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    cat_ids = None
    try:
        if p.suffix == ".safetensors":
            net = load_converted_any(p, **build_kw)
        else:
            obj = read_any(p)
            if is_training_checkpoint(obj):
                net = build_from_config(obj[CONFIG_KEY], **build_kw)
                try:
                    net.load_state_dict(obj["model"], strict=True)
                except RuntimeError as e:
                    raise UserError(f"checkpoint {p} does not fit its own config: "
                                    f"{' '.join(str(e).split())[:300]}") from None
                net.class_names = obj.get("class_names")
                cat_ids = obj.get("cat_ids")
            else:
                kind = _other_kind(obj)
                if kind is not None:
                    raise UserError(f"checkpoint {p} is {kind}, not a detector")
                obj = obj if isinstance(obj, dict) else {}
                if _released_head(obj, p) == "DINO":
                    from .convert_dino import load_released_dino
                    net = load_released_dino(obj, **build_kw)
                else:
                    net = load_released_maskrcnn(obj, **build_kw)
    except CheckpointError as e:
        msg = str(e).replace("the state dict", f"checkpoint {p}")
        raise UserError(msg) from None
    cfg = net.transnext_config
    if model_name and cfg["model"] != model_name:
        raise UserError(f"checkpoint {p} holds a {cfg.get('arch', 'mask-rcnn')} on {cfg['model']}, not "
                        f"{model_name}: pass --model {cfg['model']}")
    if num_classes is not None and cfg["num_classes"] != num_classes:
        raise UserError(f"checkpoint {p} predicts {cfg['num_classes']} classes but the data "
                        f"has {num_classes}")
    k = cfg["num_classes"]
    if net.class_names is None and k == 80:
        net.class_names = coco_classes()
    if cat_ids is None:
        cat_ids = coco_category_ids() if k == 80 else list(range(1, k + 1))
    net.label_to_cat_id = {i + 1: int(c) for i, c in enumerate(cat_ids)}
    return net.eval()


def check_classes(net: TransNeXtMaskRCNN, dataset: CocoDetection, source: str) -> None:
    """The model's class count must be the data's (names: a warning when they differ)."""
    k = net.transnext_config["num_classes"]
    if k != dataset.num_classes:
        raise UserError(f"{source} predicts {k} classes but {dataset.ann_file} has "
                        f"{dataset.num_classes} categories")
    names = getattr(net, "class_names", None)
    if names and list(names) != list(dataset.class_names):
        log.warning("the model's class names differ from %s's categories (the data's "
                    "are used, in category-id order)", dataset.ann_file.name)


def _to_cpu(out: dict) -> dict:
    o = {k: v.detach().cpu() for k, v in out.items() if k != "masks"}
    if "masks" in out:  # binarise before the copy: the float masks are large
        o["masks"] = (out["masks"][:, 0] >= 0.5).cpu()
    return o


@torch.no_grad()
def evaluate(model, dataset: CocoDetection, device, *, rank: int = 0, world_size: int = 1,
             amp: str = "none", batch_size: int = 1, workers: int = 0,
             progress: bool = False, with_masks: bool = True):
    """(``{"bbox": {metric: %}, "segm": {...}}``, the evaluator) over the whole set.
    Each rank runs images r, r + W, ...; the detections are gathered, rank 0 runs
    COCOeval and every rank returns its numbers."""
    model.eval()
    sampler = ShardSampler(len(dataset), rank, world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=workers, collate_fn=collate,
                                         generator=torch.Generator())  # not the global RNG
    ev = CocoEvaluator(dataset.coco, dataset.label_to_cat_id,
                       iou_types=("bbox", "segm") if with_masks else ("bbox",))
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True,
                  mininterval=0.5 if sys.stderr.isatty() else 30.0)
    for images, targets in it:
        with autocast(device, amp):
            outs = model([im.to(device, non_blocking=True) for im in images])
        ev.update({t["image_id"]: _to_cpu(o) for t, o in zip(targets, outs)})
    ev.gather()
    metrics = ev.summarize() if rank == 0 else None
    return broadcast_object(metrics), ev
