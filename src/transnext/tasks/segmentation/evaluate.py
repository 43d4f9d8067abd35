"""Loading a segmenter from any of its forms, evaluating it on a dataset (mIoU as
mmseg, each image counted once over ranks) and writing predictions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import UperNetConfig

from ...engine.errors import UserError
from ...engine.evaluate import autocast
from ...engine.loaders import ShardSampler
from ...models import CheckpointError
from ..common.released import read_any, state_dict_of
from .convert import model_from_state
from .data import SegDataset, collate, normalize
from .inference import predict
from .metrics import SegMetric
from .model import TransNeXtUperNet
from .names import palette


_EVAL_KEYS = ("mode", "crop_size", "test_scale")


def inference_settings(model=None, *, mode=None, crop=None, stride=None,
                       test_scale=None) -> dict:
    """Inference settings (mode, crop, stride, test_scale): those given here, else the ones
    the ``seg train`` run that wrote the model's checkpoint evaluated with (kept in its
    config, by ``convert`` too), else whole image, window 512, stride 341."""
    run = getattr(getattr(model, "config", None), "eval_settings", None) or {}
    crop = crop or run.get("crop_size") or 512
    # a run's stride is its window's 2/3; files without a run keep mmseg's 341
    stride = stride or (max(1, crop * 2 // 3) if run else 341)
    test_scale = test_scale or run.get("test_scale")
    return dict(mode=mode or run.get("mode") or "whole", crop=crop, stride=stride,
                test_scale=tuple(test_scale) if test_scale else None)


def backbone_of(model):
    """The TransNeXtBackbone inside a UperNet or a Mask2Former."""
    if hasattr(model, "backbone"):
        return model.backbone
    return model.model.pixel_level_module.encoder


def is_training_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "model" in obj and "seg_config" in obj


def model_from_training_checkpoint(obj: dict, source: str):
    if obj["seg_config"].get("model_type") == "mask2former":
        from transformers import Mask2FormerConfig
        from .mask2former import TransNeXtMask2Former
        model = TransNeXtMask2Former(Mask2FormerConfig.from_dict(obj["seg_config"]))
    else:
        model = TransNeXtUperNet(UperNetConfig.from_dict(obj["seg_config"]))
    try:
        model.load_state_dict(obj["model"], strict=True)
    except RuntimeError as e:
        raise UserError(f"{source} does not fit its own config: "
                        f"{str(e).splitlines()[0][:300]}") from None
    run = obj.get("args") or {}
    # how the training run evaluated: `seg eval`, `predict` and `convert` keep it
    model.config.eval_settings = {k: run.get(k) for k in _EVAL_KEYS}
    return model


def load_model(path: str, model_name: str | None = None, *, pos_bias: str | None = None,
               img_size=None) -> TransNeXtUperNet:
    """A segmenter from a ``transnext seg train`` checkpoint, a converted folder
    (``config.json`` + safetensors) or a released UperNet ``.pth``. ``pos_bias`` /
    ``img_size`` switch the backbone's bias mode after loading."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is a folder without config.json (not a converted model)")
        try:
            kind = json.loads((p / "config.json").read_text()).get("model_type")
            if kind == "mask2former":
                from .mask2former import TransNeXtMask2Former
                model = TransNeXtMask2Former.from_pretrained(str(p))
            else:
                model = TransNeXtUperNet.from_pretrained(str(p))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the converted model in {p}: {e}") from None
    else:
        try:
            obj = read_any(p)
            if is_training_checkpoint(obj):
                model = model_from_training_checkpoint(obj, f"checkpoint {p}")
            else:
                model = model_from_state(state_dict_of(obj, p), f"checkpoint {p}", model_name)
        except CheckpointError as e:
            raise UserError(str(e)) from None
    name = model.config.backbone_config.model_name
    if model_name and name != model_name:
        raise UserError(f"checkpoint {path} holds a model on {name}, not {model_name}: "
                        f"pass --model {name}")
    if pos_bias is not None:
        try:
            backbone_of(model).set_pos_bias(pos_bias, img_size if pos_bias == "interpolate" else None)
        except ValueError as e:
            raise UserError(str(e)) from None
    return model.eval()


@torch.no_grad()
def evaluate(model, dataset: SegDataset, device, *, rank: int = 0, world_size: int = 1,
             amp: str = "none", mode: str = "whole", scales=(1.0,), flip: bool = False,
             crop=512, stride=341, test_scale=None, batch_size: int = 1, workers: int = 0,
             progress: bool = False) -> dict:
    """mIoU / mAcc / aAcc over the whole set (areas summed over ranks)."""
    model.eval()
    sampler = ShardSampler(len(dataset), rank, world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=workers, collate_fn=collate)
    metric = SegMetric(dataset.num_classes)
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
    for imgs, masks, _ in it:
        if isinstance(imgs, torch.Tensor):
            groups = [(imgs, masks)]
        else:
            groups = [(i[None], m[None]) for i, m in zip(imgs, masks)]
        for x, y in groups:
            x = x.to(device)
            with autocast(device, amp):
                prob = predict(model, x, tuple(y.shape[1:]), mode=mode, scales=scales,
                               flip=flip, crop=crop, stride=stride, test_scale=test_scale)
            metric.update(prob.argmax(1).cpu(), y)
    metric.reduce()
    return metric.compute(dataset.classes)


def overlay(image: np.ndarray, label: np.ndarray, pal: np.ndarray, alpha: float = 0.5):
    colour = pal[np.clip(label, 0, len(pal) - 1)]
    return (image * (1 - alpha) + colour * alpha).round().astype(np.uint8)


@torch.no_grad()
def predict_files(model, files, out_dir, device, *, class_names=None, amp="none",
                  mode="whole", scales=(1.0,), flip=False, crop=512, stride=341,
                  test_scale=None) -> list[dict]:
    """For each image: ``<stem>_labels.png`` (class index per pixel) and
    ``<stem>_overlay.png`` (palette colours over the image)."""
    from .data import _read_image
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = model.config.num_labels
    pal = palette(n)
    done = []
    model.eval()
    for f in files:
        img = _read_image(Path(f))
        x = normalize(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))[None]
        with autocast(device, amp):
            prob = predict(model, x.to(device), img.shape[:2], mode=mode, scales=scales,
                           flip=flip, crop=crop, stride=stride, test_scale=test_scale)
        label = prob.argmax(1)[0].cpu().numpy().astype(np.uint8 if n <= 256 else np.int32)
        stem = Path(f).stem
        Image.fromarray(label).save(out / f"{stem}_labels.png")
        Image.fromarray(overlay(img, label, pal)).save(out / f"{stem}_overlay.png")
        present = np.unique(label).tolist()
        names = class_names or [str(i) for i in range(n)]
        done.append({"image": str(f), "labels": str(out / f"{stem}_labels.png"),
                     "overlay": str(out / f"{stem}_overlay.png"),
                     "classes": [names[i] if i < len(names) else str(i) for i in present]})
    (out / "predictions.json").write_text(json.dumps(done, indent=1))
    return done
