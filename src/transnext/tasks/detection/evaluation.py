"""COCO box and mask AP with the official pycocotools COCOeval, set up as mmdet
2.x evaluates Mask R-CNN (``maxDets`` 100/300/1000).

Flow: ``update({image_id: output})`` on each rank turns the model's outputs into
COCO result entries (xywh boxes; masks thresholded at 0.5 and RLE-encoded),
``gather()`` merges the ranks (an image seen twice, e.g. from a padded
DistributedSampler, counts once), ``summarize()`` runs COCOeval and returns the
numbers, ``write_results(prefix)`` writes ``prefix.bbox.json`` and
``prefix.segm.json`` (the format the COCO server and ``evaluate_json`` read).

Numbers are percentages (49.9 = 0.499 in COCOeval's own printout); a metric
with no ground truth in its range (COCOeval's -1) is NaN. With maxDets
[100, 300, 1000], COCOeval.summarize() computes AP from the top 100 detections
per image (its own default argument) and AP50, AP75, APs/m/l and ARs/m/l from
the top 1000 (``maxDets[2]``); AR@k uses the top k. mmdet 2.x reports the same
``stats`` entries. Mask R-CNN keeps at most 100 detections per image, so every
one of these counts all of them.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from ...engine.distributed import all_gather_object

MAX_DETS = (100, 300, 1000)
# the order of COCOeval.stats for boxes and masks
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100", "AR@300", "AR@1000",
           "ARs@1000", "ARm@1000", "ARl@1000")


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def binary_masks(masks) -> np.ndarray:
    """Float (n, 1, H, W) or (n, H, W) probabilities (>= 0.5 is in, as mmdet), or
    bool/integer (n, H, W) masks (non-zero is in) -> bool (n, H, W)."""
    m = _numpy(masks)
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise ValueError(f"masks of shape {m.shape}: expected (n, 1, H, W) or (n, H, W)")
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"masks of shape {m.shape}: expected (n, 1, H, W) or (n, H, W)")
    return m >= 0.5 if np.issubdtype(m.dtype, np.floating) else m != 0


def encode_masks(masks: np.ndarray) -> list[dict]:
    """bool (n, H, W) -> compressed RLEs with ``counts`` as str (json-ready)."""
    from pycocotools import mask as mask_utils
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def to_coco_results(image_id: int, output: dict, label_to_cat_id: dict[int, int],
                    with_masks: bool, image_size: tuple[int, int] | None = None
                    ) -> tuple[list[dict], list[dict]]:
    """One image's output -> (bbox results, segm results) in COCO's result format."""
    boxes = _numpy(output["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _numpy(output["scores"]).astype(np.float64).reshape(-1)
    labels = _numpy(output["labels"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and "
                         f"{len(labels)} labels")
    try:
        cats = [label_to_cat_id[int(v)] for v in labels]
    except KeyError as e:
        raise ValueError(f"image {image_id}: label {e.args[0]} is not one of the "
                         f"{len(label_to_cat_id)} classes (labels are 1..K)") from None
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    bbox = [{"image_id": image_id, "category_id": c, "bbox": [float(v) for v in b],
             "score": float(s)} for c, b, s in zip(cats, xywh, scores)]
    segm = []
    if with_masks:
        if output.get("masks") is None:
            raise ValueError(f"image {image_id}: the output has no masks, but segm is evaluated")
        masks = binary_masks(output["masks"])
        if len(masks) != len(boxes):
            raise ValueError(f"image {image_id}: {len(masks)} masks for {len(boxes)} boxes")
        if image_size is not None and len(masks) and masks.shape[1:] != tuple(image_size):
            raise ValueError(f"image {image_id}: masks are {masks.shape[2]}x{masks.shape[1]} "
                             f"but the image is {image_size[1]}x{image_size[0]} (masks go at "
                             f"the original image size)")
        segm = [dict(r, segmentation=rle) for r, rle in zip(bbox, encode_masks(masks))]
    return bbox, segm


def _empty_results(coco_gt):
    from pycocotools.coco import COCO
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]),
                   "categories": list(coco_gt.dataset["categories"]), "annotations": []}
    res.createIndex()
    return res


def run_cocoeval(coco_gt, results, iou_type: str, img_ids=None, max_dets=MAX_DETS,
                 verbose: bool = False):
    """Official COCOeval of ``results`` (a list of result entries, or a path to a
    result json) -> (metrics dict in percent, COCOeval's printout, the COCOeval)."""
    from pycocotools.cocoeval import COCOeval
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type {iou_type!r}: bbox or segm")
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        # loadRes adds keys to the entries it is given: hand it copies
        dt = coco_gt.loadRes([dict(r) for r in results]) if results else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in img_ids)
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    text = buf.getvalue()
    if verbose:
        print(text, end="")
    stats = {k: (float("nan") if v < 0 else float(v) * 100) for k, v in zip(METRICS, ev.stats)}
    return stats, text, ev


class CocoEvaluator:
    """Collects detections per image and evaluates them against ``coco_gt`` (a
    pycocotools COCO, e.g. ``CocoDetection.coco``). ``label_to_cat_id`` maps the
    model's labels 1..K to category ids (default: the ground truth's ids in
    increasing order, as ``CocoDetection`` numbers them)."""

    def __init__(self, coco_gt, label_to_cat_id: dict[int, int] | None = None,
                 iou_types=("bbox", "segm"), max_dets=MAX_DETS):
        self.coco_gt = coco_gt
        if label_to_cat_id is None:
            label_to_cat_id = {i + 1: c for i, c in enumerate(sorted(coco_gt.getCatIds()))}
        self.label_to_cat_id = dict(label_to_cat_id)
        self.iou_types = tuple(iou_types)
        for t in self.iou_types:
            if t not in ("bbox", "segm"):
                raise ValueError(f"iou type {t!r}: bbox or segm")
        self.max_dets = tuple(max_dets)
        self.results: dict[int, dict[str, list]] = {}  # image id -> {iou type: entries}
        self.text: dict[str, str] = {}
        self.cocoeval: dict = {}

    @property
    def img_ids(self) -> list[int]:
        return sorted(self.results)

    def update(self, outputs: dict) -> None:
        """``{image_id: {"boxes" xyxy (n, 4) in original pixels, "scores" (n,),
        "labels" (n,) in 1..K, "masks" (n, 1, H, W) probabilities or (n, H, W)
        bool}}``; an image without detections still needs an (empty) entry to
        count. An image already seen is ignored (padded distributed samplers)."""
        for image_id, out in outputs.items():
            image_id = int(image_id)
            if image_id in self.results:
                continue
            info = self.coco_gt.imgs.get(image_id)
            if info is None:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            bbox, segm = to_coco_results(image_id, out, self.label_to_cat_id,
                                         "segm" in self.iou_types,
                                         (info["height"], info["width"]))
            self.results[image_id] = {"bbox": bbox, "segm": segm}

    def merge(self, other: "CocoEvaluator | dict") -> None:
        """Add another evaluator's (or its ``results``') images not seen here."""
        results = other.results if isinstance(other, CocoEvaluator) else other
        for image_id, r in results.items():
            self.results.setdefault(int(image_id), r)

    def gather(self) -> None:
        """Every rank ends with the union of all ranks' images, each once (the
        first rank that saw an image wins; identical for a deterministic model)."""
        parts = all_gather_object(self.results)
        merged: dict = {}
        for part in parts:
            for image_id, r in part.items():
                merged.setdefault(image_id, r)
        self.results = merged

    def entries(self, iou_type: str) -> list[dict]:
        return [r for i in self.img_ids for r in self.results[i][iou_type]]

    def summarize(self, verbose: bool = False) -> dict[str, dict[str, float]]:
        """``{iou type: {metric: percent}}`` over the images updated (after
        ``gather()`` under DDP). COCOeval's printout goes to stdout only with
        ``verbose``; it is kept in ``self.text``."""
        if not self.results:
            raise ValueError("no images were evaluated")
        out = {}
        for t in self.iou_types:
            out[t], self.text[t], self.cocoeval[t] = run_cocoeval(
                self.coco_gt, self.entries(t), t, self.img_ids, self.max_dets, verbose)
        return out

    def per_class_ap(self, iou_type: str) -> dict[str, float]:
        """AP (percent, IoU 0.50:0.95, all areas, maxDets[-1], as mmdet's classwise
        table) per category name, from the last ``summarize()``; NaN without
        ground truth."""
        ev = self.cocoeval[iou_type]
        prec = ev.eval["precision"]  # (iou, recall, category, area, maxDets)
        out = {}
        for k, cid in enumerate(ev.params.catIds):
            p = prec[:, :, k, 0, -1]
            p = p[p > -1]
            out[self.coco_gt.cats[cid]["name"]] = float(p.mean() * 100) if p.size else math.nan
        return out

    def write_results(self, prefix: str | Path) -> dict[str, Path]:
        """Write ``prefix.bbox.json`` (and ``prefix.segm.json``); returns the paths."""
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        paths = {}
        for t in self.iou_types:
            p = prefix.parent / f"{prefix.name}.{t}.json"
            p.write_text(json.dumps(self.entries(t)))
            paths[t] = p
        return paths


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """A small text table: one row per iou type, AP and AR columns."""
    rows = [f"{'':6}" + "".join(f"{k:>9}" for k in METRICS)]
    for t, m in metrics.items():
        rows.append(f"{t:6}" + "".join(f"{m[k]:>9.1f}" for k in METRICS))
    return "\n".join(rows)
