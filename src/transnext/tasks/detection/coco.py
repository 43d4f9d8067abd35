"""COCO instances data: an annotation json plus an image folder, read into
``(image, target)`` items for torchvision-style detectors (Mask R-CNN).

Layout (``resolve_coco``): COCO's own ``DATA_DIR/{train2017,val2017}/`` with
``DATA_DIR/annotations/instances_{train,val}2017.json`` (the Fashion-MNIST
instance mosaics use the same names), or an explicit (annotation file, image
folder) pair.

Item: ``image`` float32 (3, H, W) RGB in [0, 1] at the original size (the
model's transform resizes and normalises); ``target`` a dict with ``boxes``
float32 (n, 4) xyxy in pixels, ``labels`` int64 (n,) in 1..K (0 = background,
torchvision's convention; label i is the i-th category by increasing id),
``masks`` uint8 (n, H, W) (with ``with_masks``), ``image_id`` (the COCO id, an
int), ``area`` float32 (n,) (the annotation's ``area``), ``iscrowd`` int64 (n,)
(all 0: crowd regions are not targets) and ``ann_ids`` int64 (n,).

Bad input, decided per case (every skip is counted in ``report``, logged once
as a one-line summary naming the json and the annotation ids):
  * json missing, not json, not an object, or lacking ``images``,
    ``annotations`` or ``categories``; an image entry without an int ``id``, a
    ``file_name`` or positive ``width``/``height``; an annotation without
    ``id``/``image_id``/``category_id``/``bbox``, with a bbox that is not four
    finite numbers, an unknown ``category_id`` or an ``image_id`` not among the
    images; duplicate image, annotation or category ids: ``DataError`` naming
    the json (and the annotation or image id). The file is broken; nothing
    sensible can be trained or evaluated from it.
  * box partly outside the image: clipped to it (torchvision's reference
    clamps; mmdet 2.x keeps those whose overlap with the image is non-empty),
    counted in ``report.clipped``.
  * box under 1 px wide or high (zero or negative size included), box entirely
    outside the image, ``area`` <= 0 (mmdet's rules): skipped, counted.
  * with ``with_masks``: no ``segmentation``; a polygon list in which no part
    has an even number >= 6 of finite coordinates (empty list included); an RLE
    whose ``size`` is not the image's or whose counts do not sum to H*W (or,
    compressed, cannot be decoded): skipped, counted (detectron2 also drops
    instances without a valid segmentation). A polygon with some invalid parts
    keeps its valid parts (counted in ``report.parts_dropped``).
  * ``iscrowd`` annotations: kept out of the training targets (mmdet ignores
    them), counted; they stay in the evaluation ground truth, where COCOeval
    uses them as ignore regions.
  * missing ``area``: filled with the box's w*h (counted); missing ``iscrowd``: 0.
  * missing or corrupt image file, or one whose decoded size differs from the
    json's: ``DataError`` naming the file and the image id, raised when the
    item is loaded; ``check_images()`` opens every file header up front and
    reports all problems in one message.

Evaluation ground truth (``coco``, a pycocotools ``COCO``): the json as it is
(the official metric counts every annotation, as mmdet and the COCO server do),
with missing areas filled, invalid polygon parts removed and, with
``with_masks``, the annotations whose segmentation is unusable left out
(pycocotools would crash on them or read them wrongly); those are listed in
``report.eval_dropped``.

Training mode (``train=True``) also leaves out images without a usable
annotation or with a side under ``min_size`` (mmdet's ``filter_empty_gt`` and
``min_size=32``; mmdet 2.x keeps an image whose annotations are all crowd,
here it goes too), counted in ``report.images_filtered``; evaluation keeps
every image.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ...data.fashion_mnist import DataError

log = logging.getLogger("transnext.det")

SPLIT_DIRS = {"train": "train2017", "val": "val2017"}

# skip reasons (the keys of AnnotationReport.skipped)
OUTSIDE = "box outside the image"
ZERO_SIZE = "zero-size box (under 1 px)"
ZERO_AREA = "area <= 0"
NO_SEGM = "no segmentation"
BAD_POLY = "empty or invalid polygon"
BAD_RLE = "invalid RLE"
_SEGM_REASONS = (NO_SEGM, BAD_POLY, BAD_RLE)


def resolve_coco(data_dir: str | Path | None = None, split: str = "val",
                 ann_file: str | Path | None = None,
                 img_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(annotation json, image folder) for ``split`` ('train' or 'val') of COCO's
    layout under ``data_dir``, or the explicit ``ann_file`` and ``img_dir``."""
    if ann_file is not None or img_dir is not None:
        if ann_file is None or img_dir is None:
            raise DataError("an explicit COCO set needs both the annotation json and the "
                            "image folder")
        ann, imgs = Path(ann_file), Path(img_dir)
    else:
        if data_dir is None:
            raise DataError("no COCO data: give a data directory or an annotation json and "
                            "image folder")
        if split not in SPLIT_DIRS:
            raise DataError(f"unknown split {split!r}: train or val")
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"data directory does not exist: {root}")
        sub = SPLIT_DIRS[split]
        ann, imgs = root / "annotations" / f"instances_{sub}.json", root / sub
    if not ann.is_file():
        raise DataError(f"annotation file not found: {ann} (COCO layout: "
                        f"annotations/instances_{{train,val}}2017.json next to "
                        f"{{train,val}}2017/)")
    if not imgs.is_dir():
        raise DataError(f"image folder not found: {imgs} (COCO layout: {{train,val}}2017/ "
                        f"next to annotations/)")
    return ann, imgs


def load_coco_json(path: str | Path) -> dict:
    """Read a COCO instances json; DataError naming the file when it is missing,
    not json, or lacks ``images``/``annotations``/``categories`` lists."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file {path} is not valid json: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read annotation file {path}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file {path} is not a COCO instances file: the top "
                        f"level is a {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "missing" if key not in data else f"not a list ({type(data[key]).__name__})"
            raise DataError(f"annotation file {path} is not a COCO instances file: "
                            f"'{key}' is {what}")
    if not data["categories"]:
        raise DataError(f"annotation file {path} lists no categories")
    return data


def rle_string_counts(s: str | bytes) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (COCO's own 6-bit
    variable-length code, runs after the second stored as differences), or
    None when the string is not such a code."""
    if isinstance(s, bytes):
        try:
            s = s.decode("ascii")
        except UnicodeDecodeError:
            return None
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                return None
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _finite_numbers(values) -> bool:
    """All real numbers and finite (one C-level pass: fsum rejects anything else)."""
    try:
        return math.isfinite(math.fsum(values))
    except (TypeError, ValueError, OverflowError):
        return False


def check_segmentation(seg, height: int, width: int):
    """(reason or None, cleaned segmentation, number of polygon parts dropped)."""
    if seg is None:
        return NO_SEGM, None, 0
    if isinstance(seg, list):
        parts = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                 and _finite_numbers(p)]
        if not parts:
            return BAD_POLY, None, 0
        return None, parts, len(seg) - len(parts)
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if (not isinstance(size, list) or len(size) != 2
                or [int(v) if isinstance(v, int) else -1 for v in size] != [height, width]):
            return BAD_RLE, None, 0
        if isinstance(counts, list):
            ok = all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        elif isinstance(counts, (str, bytes)):
            counts = rle_string_counts(counts)
            ok = counts is not None and all(c >= 0 for c in counts)
        else:
            ok = False
        if not ok or sum(counts) != height * width:
            return BAD_RLE, None, 0
        return None, seg, 0
    return BAD_POLY, None, 0


def decode_segmentation(seg, height: int, width: int) -> np.ndarray:
    """A checked segmentation (polygon parts, or RLE dict) -> (H, W) uint8 mask."""
    from pycocotools import mask as mask_utils
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {"size": list(seg["size"]),
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle)


@dataclass
class AnnotationReport:
    """What loading an annotation file skipped, clipped or filled (annotation ids)."""
    json: str
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> annotation ids
    clipped: list[int] = field(default_factory=list)
    parts_dropped: list[int] = field(default_factory=list)
    crowd: int = 0
    area_filled: int = 0
    eval_dropped: list[int] = field(default_factory=list)
    images_filtered: int = 0

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        """One line; empty when nothing was skipped, clipped or filled."""
        def ids(v):
            head = ", ".join(str(i) for i in v[:5])
            return f"id{'s' if len(v) > 1 else ''} {head}{', ...' if len(v) > 5 else ''}"
        parts = []
        if self.skipped:
            why = "; ".join(f"{len(v)} {k}: {ids(v)}" for k, v in self.skipped.items())
            parts.append(f"skipped {self.n_skipped} annotation{'s' if self.n_skipped > 1 else ''}"
                         f" ({why})")
        if self.parts_dropped:
            parts.append(f"dropped invalid polygon parts of {len(self.parts_dropped)} "
                         f"annotation(s) ({ids(self.parts_dropped)})")
        if self.clipped:
            parts.append(f"clipped {len(self.clipped)} box(es) to their image "
                         f"({ids(self.clipped)})")
        if self.area_filled:
            parts.append(f"filled {self.area_filled} missing area(s) from the box")
        if self.eval_dropped:
            parts.append(f"{len(self.eval_dropped)} annotation(s) with an unusable "
                         f"segmentation also left out of evaluation")
        if self.images_filtered:
            parts.append(f"left out {self.images_filtered} training image(s) without a usable "
                         f"annotation")
        return f"{Path(self.json).name}: " + "; ".join(parts) if parts else ""


class _Ann(NamedTuple):
    ann_id: int
    label: int
    box: tuple[float, float, float, float]  # xyxy, clipped to the image
    area: float
    segmentation: object  # checked polygon parts or RLE dict; None without masks


class CocoDetection(torch.utils.data.Dataset):
    """``(image, target)`` items of a COCO instances json and its image folder
    (the format is in the module docstring). ``transform(image, target, index)``
    is applied when given (e.g. :class:`RandomHorizontalFlip`)."""

    def __init__(self, ann_file: str | Path, img_dir: str | Path, train: bool = False,
                 with_masks: bool = True, transform=None, min_size: int = 32):
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        self.train, self.with_masks, self.transform = train, with_masks, transform
        data = load_coco_json(self.ann_file)
        name = str(self.ann_file)
        self.report = AnnotationReport(name)

        cats = {}
        for c in data["categories"]:
            cid = c.get("id") if isinstance(c, dict) else None
            if not isinstance(cid, int) or isinstance(cid, bool):
                raise DataError(f"{name}: category entry {c!r:.80} has no integer 'id'")
            if cid in cats:
                raise DataError(f"{name}: category id {cid} is listed twice")
            cats[cid] = str(c.get("name", cid))
        self.cat_ids = sorted(cats)
        self.class_names = [cats[c] for c in self.cat_ids]
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.cat_id_to_label = {c: i for i, c in self.label_to_cat_id.items()}

        images = {}
        for k, im in enumerate(data["images"]):
            iid = im.get("id") if isinstance(im, dict) else None
            if not isinstance(iid, int) or isinstance(iid, bool):
                raise DataError(f"{name}: image entry #{k} has no integer 'id'")
            if iid in images:
                raise DataError(f"{name}: image id {iid} is listed twice")
            h, w, fn = im.get("height"), im.get("width"), im.get("file_name")
            if not isinstance(fn, str) or not fn:
                raise DataError(f"{name}: image {iid} has no 'file_name'")
            if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
                raise DataError(f"{name}: image {iid} ({fn}) has no positive integer "
                                f"'width' and 'height' (got {w!r} x {h!r})")
            images[iid] = im

        per_image: dict[int, list[_Ann]] = {iid: [] for iid in images}
        eval_anns, seen = [], set()
        rep = self.report
        for k, a in enumerate(data["annotations"]):
            aid = a.get("id") if isinstance(a, dict) else None
            if not isinstance(aid, int) or isinstance(aid, bool):
                raise DataError(f"{name}: annotation entry #{k} has no integer 'id'")
            if aid in seen:
                raise DataError(f"{name}: annotation id {aid} is listed twice")
            seen.add(aid)
            for key in ("image_id", "category_id", "bbox"):
                if key not in a:
                    raise DataError(f"{name}: annotation {aid} has no '{key}'")
            for key in ("image_id", "category_id"):
                if not isinstance(a[key], int) or isinstance(a[key], bool):
                    raise DataError(f"{name}: annotation {aid} has {key} {a[key]!r:.40}, not an "
                                    f"integer id")
            if a["category_id"] not in cats:
                raise DataError(f"{name}: annotation {aid} has category_id "
                                f"{a['category_id']!r}, which is not among the "
                                f"{len(cats)} categories")
            im = images.get(a["image_id"])
            if im is None:
                raise DataError(f"{name}: annotation {aid} refers to image_id "
                                f"{a['image_id']!r}, which is not among the images")
            bbox = a["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and _finite_numbers(bbox)):
                raise DataError(f"{name}: annotation {aid} has bbox {bbox!r:.80}: expected "
                                f"[x, y, width, height], four finite numbers")
            h, w = im["height"], im["width"]
            ev = a
            area = a.get("area")
            if not (isinstance(area, (int, float)) and not isinstance(area, bool)
                    and math.isfinite(area)):
                area = float(max(bbox[2], 0) * max(bbox[3], 0))
                ev = dict(a, area=area)
                rep.area_filled += 1
            if "iscrowd" not in a:  # COCOeval reads it from every ground-truth entry
                ev = dict(ev, iscrowd=0)
            x, y, bw, bh = (float(v) for v in bbox)
            box = (max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h)))
            reason, seg = None, None
            if bw < 1 or bh < 1:
                reason = ZERO_SIZE
            elif box[2] <= box[0] or box[3] <= box[1]:
                reason = OUTSIDE
            elif area <= 0:
                reason = ZERO_AREA
            if with_masks:
                sreason, seg, dropped = check_segmentation(a.get("segmentation"), h, w)
                if sreason is not None:
                    rep.eval_dropped.append(aid)
                    ev = None
                    reason = reason or sreason
                elif dropped:
                    rep.parts_dropped.append(aid)
                    ev = dict(ev, segmentation=seg)
            if ev is not None:
                eval_anns.append(ev)
            if reason is not None:
                rep.skipped.setdefault(reason, []).append(aid)
                continue
            if a.get("iscrowd", 0):
                rep.crowd += 1
                continue
            if box != (x, y, x + bw, y + bh):
                rep.clipped.append(aid)
            per_image[a["image_id"]].append(
                _Ann(aid, self.cat_id_to_label[a["category_id"]], box, float(area), seg))

        keep = []
        for im in data["images"]:
            iid = im["id"]
            if train and (not per_image[iid] or min(im["height"], im["width"]) < min_size):
                rep.images_filtered += 1
                continue
            keep.append(im)
        self.image_ids = [im["id"] for im in keep]
        self.files = [self.img_dir / im["file_name"] for im in keep]
        self.sizes = [(im["height"], im["width"]) for im in keep]  # (h, w), no decoding
        self._anns = [per_image[i] for i in self.image_ids]
        self._eval_data = {k: v for k, v in data.items() if k != "annotations"}
        self._eval_data["annotations"] = eval_anns
        self._coco = None
        msg = rep.summary()
        if msg:
            log.warning(msg)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def coco(self):
        """The evaluation ground truth as a pycocotools ``COCO`` (built on first use)."""
        if self._coco is None:
            from pycocotools.coco import COCO
            coco = COCO()
            coco.dataset = self._eval_data
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __len__(self) -> int:
        return len(self.image_ids)

    def get_height_width(self, index: int) -> tuple[int, int]:
        return self.sizes[index]

    def num_instances(self, index: int) -> int:
        return len(self._anns[index])

    def load_image(self, index: int) -> torch.Tensor:
        path, iid = self.files[index], self.image_ids[index]
        try:
            with Image.open(path) as im:
                im.load()
                arr = np.array(im.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"image file not found: {path} (image id {iid} in "
                            f"{self.ann_file.name})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read image {path} (image id {iid}): corrupt or "
                            f"truncated ({e})") from None
        h, w = self.sizes[index]
        if arr.shape[:2] != (h, w):
            raise DataError(f"image {path} (image id {iid}) is {arr.shape[1]}x{arr.shape[0]} "
                            f"but {self.ann_file.name} says {w}x{h}")
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255)

    def load_target(self, index: int) -> dict:
        anns, (h, w) = self._anns[index], self.sizes[index]
        n = len(anns)
        target = {
            "boxes": torch.tensor([a.box for a in anns], dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor([a.label for a in anns], dtype=torch.int64),
            "image_id": self.image_ids[index],
            "area": torch.tensor([a.area for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
            "ann_ids": torch.tensor([a.ann_id for a in anns], dtype=torch.int64),
        }
        if self.with_masks:
            masks = np.zeros((n, h, w), np.uint8)
            for j, a in enumerate(anns):
                try:
                    masks[j] = decode_segmentation(a.segmentation, h, w)
                except Exception as e:  # pycocotools' own errors carry no file or id
                    raise DataError(f"{self.ann_file}: annotation {a.ann_id} (image "
                                    f"{self.image_ids[index]}): cannot decode its "
                                    f"segmentation ({type(e).__name__}: {e})") from None
            target["masks"] = torch.from_numpy(masks)
        return target

    def __getitem__(self, index: int):
        image, target = self.load_image(index), self.load_target(index)
        if self.transform is not None:
            image, target = self.transform(image, target, index)
        return image, target

    def check_images(self, decode: bool = False, workers: int = 8) -> None:
        """Open every image file (the header only unless ``decode``) and compare its
        size with the json; one DataError listing every missing, unreadable or
        mis-sized file (the first 10 by name, and the count)."""
        def probe(i):
            path, iid = self.files[i], self.image_ids[i]
            try:
                with Image.open(path) as im:
                    if decode:
                        im.load()
                    size = im.size
            except FileNotFoundError:
                return f"{path.name} (id {iid}): not found"
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                return f"{path.name} (id {iid}): unreadable ({e})"
            h, w = self.sizes[i]
            if size != (w, h):
                return f"{path.name} (id {iid}): {size[0]}x{size[1]}, the json says {w}x{h}"
            return None
        with ThreadPoolExecutor(max(1, workers)) as pool:
            problems = [p for p in pool.map(probe, range(len(self))) if p]
        if problems:
            more = f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(f"{len(problems)} of {len(self)} images of {self.ann_file.name} in "
                            f"{self.img_dir} cannot be used: " + "; ".join(problems[:10]) + more)


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror image (C, H, W), boxes and masks left-right."""
    w = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = w - target["boxes"][:, 2], w - target["boxes"][:, 0]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


class RandomHorizontalFlip:
    """Horizontal flip of image, boxes and masks with probability ``p``; the coin
    comes from (seed, epoch, index), so it does not depend on workers or resuming."""

    def __init__(self, p: float = 0.5, seed: int = 0):
        self.p, self.seed, self.epoch = p, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: torch.Tensor, target: dict, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7_919_993 + index)
        if torch.rand((), generator=g).item() < self.p:
            return hflip(image, target)
        return image, target


def collate(batch):
    """``(list of images, list of targets)``: detection images differ in size."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
