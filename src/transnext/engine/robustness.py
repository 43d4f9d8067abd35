"""ImageNet robustness suite: ImageNet-A, -R, -Sketch, -V2 and -C (mCE).

Folder layouts (as distributed by their authors):
  ImageNet-A / -R   DIR/<wnid>/*.jpg   200 classes each; the model's 1000 logits are
                    restricted to that 200-class subset before the arg-max.
  ImageNet-Sketch   DIR/<wnid>/*.JPEG  all 1000 classes.
  ImageNetV2        DIR/<0..999>/*.jpeg  folders named by class index (wnids also work).
  ImageNet-C        DIR/<corruption>/<severity 1..5>/<wnid>/*.JPEG

Corruption error (Hendrycks & Dietterich 2019):
  CE_c = sum_s E(c, s) / sum_s E_AlexNet(c, s)   over the severities present,
  mCE  = mean of CE_c over the 15 standard corruptions present;
errors are top-1 error rates in [0, 1]; results are reported in percent.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..data import (DataError, imagenet_a_wnids, imagenet_c_alexnet_errors,
                    imagenet_r_wnids, imagenet_wnids)
from .errors import UserError
from .evaluate import evaluate
from .loaders import folder_eval_loader


def imagenet_class_map(root: str | os.PathLike) -> dict[str, int]:
    """Map each class folder (a wnid, or a class index as in ImageNetV2) to its
    ImageNet-1K output index."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data directory does not exist: {root}")
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    out = {}
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if not e.is_dir() or e.name.startswith("."):
            continue
        if e.name in index:
            out[e.name] = index[e.name]
        elif e.name.isdigit() and 0 <= int(e.name) < 1000:
            out[e.name] = int(e.name)
        else:
            raise UserError(f"{root}: class folder '{e.name}' is neither an ImageNet wnid nor "
                            f"a class index 0..999")
    if not out:
        raise UserError(f"no class folders in {root}")
    return out


def subset_indices(wnids: list[str]) -> list[int]:
    """Output indices of a 200-class subset (ImageNet-A/-R), in output order."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    return sorted(index[w] for w in wnids)


def corruption_errors(errors: dict[str, dict[int, float]]) -> dict:
    """errors[corruption][severity] = top-1 error in [0, 1] -> CE per corruption and mCE
    (both as ratios x 100, i.e. percent of AlexNet's error)."""
    alex = imagenet_c_alexnet_errors()
    ce = {}
    for c, by_sev in errors.items():
        if c not in alex or not by_sev:
            continue
        sevs = sorted(by_sev)
        num = sum(by_sev[s] for s in sevs)
        den = sum(alex[c][s - 1] for s in sevs)
        ce[c] = 100.0 * num / den
    mce = sum(ce.values()) / len(ce) if ce else float("nan")
    return {"ce": ce, "mce": mce, "corruptions": len(ce), "complete": len(ce) == len(alex)}


def _eval_folder(model, root, size, dcfg, args, dist, subset=None):
    try:
        loader = folder_eval_loader(root, size, dcfg, args.batch_size, dist, workers=args.workers,
                                    class_to_idx=imagenet_class_map(root),
                                    verify=not args.no_verify)
    except DataError as e:
        raise UserError(str(e)) from None
    if subset is not None:
        allowed = set(subset)
        bad = [c for c, i in loader.dataset.class_to_idx.items() if i not in allowed]
        if bad:
            raise UserError(f"{root}: class folders {bad[:5]} are not in this set's 200 classes")
    return evaluate(model, loader, dist.device, amp=args.amp, subset=subset)


def run_suite(model, size, dcfg, args, dist) -> dict:
    """Evaluate every set whose folder the user named; returns a JSON-able dict."""
    if getattr(model, "num_classes", 1000) != 1000:
        raise UserError("the robustness suite needs a 1000-class ImageNet model")
    res: dict = {}
    if args.imagenet_a:
        r = _eval_folder(model, args.imagenet_a, size, dcfg, args, dist,
                         subset_indices(imagenet_a_wnids()))
        res["imagenet-a"] = {**r, "error": 100.0 - r["top1"]}
    if args.imagenet_r:
        r = _eval_folder(model, args.imagenet_r, size, dcfg, args, dist,
                         subset_indices(imagenet_r_wnids()))
        res["imagenet-r"] = {**r, "error": 100.0 - r["top1"]}
    if args.imagenet_sketch:
        res["imagenet-sketch"] = _eval_folder(model, args.imagenet_sketch, size, dcfg, args, dist)
    if args.imagenet_v2:
        res["imagenet-v2"] = _eval_folder(model, args.imagenet_v2, size, dcfg, args, dist)
    if args.imagenet_c:
        root = Path(args.imagenet_c)
        if not root.is_dir():
            raise UserError(f"data directory does not exist: {root}")
        per: dict[str, dict[int, dict]] = {}
        known = imagenet_c_alexnet_errors()
        for cdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for sdir in sorted(p for p in cdir.iterdir() if p.is_dir() and p.name.isdigit()):
                sev = int(sdir.name)
                if not 1 <= sev <= 5:
                    raise UserError(f"{sdir}: severity folders must be 1..5")
                per.setdefault(cdir.name, {})[sev] = _eval_folder(model, sdir, size, dcfg, args, dist)
        if not per:
            raise UserError(f"{root}: expected <corruption>/<severity>/<wnid>/ folders")
        errors = {c: {s: 1.0 - r["top1"] / 100.0 for s, r in d.items()} for c, d in per.items()}
        summary = corruption_errors(errors)
        res["imagenet-c"] = {
            "per_severity": {c: {str(s): r for s, r in d.items()} for c, d in per.items()},
            "error": {c: {str(s): 100.0 * e for s, e in d.items()} for c, d in errors.items()},
            "extra_corruptions": sorted(c for c in per if c not in known),
            **summary,
        }
    if not res:
        raise UserError("--suite robustness needs at least one of --imagenet-a, --imagenet-r, "
                        "--imagenet-sketch, --imagenet-v2, --imagenet-c")
    return res


def format_suite(res: dict) -> str:
    lines = ["| set | top-1 | top-5 | error | images |", "|---|---|---|---|---|"]
    for name in ("imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-v2"):
        if name in res:
            r = res[name]
            lines.append(f"| {name} | {r['top1']:.2f} | {r['top5']:.2f} | {100 - r['top1']:.2f} | "
                         f"{r['count']} |")
    if "imagenet-c" in res:
        c = res["imagenet-c"]
        lines.append("")
        lines.append("| corruption | error by severity 1..5 (%) | CE (%) |")
        lines.append("|---|---|---|")
        for name, errs in c["error"].items():
            sev = " ".join(f"{errs.get(str(s), float('nan')):.1f}" for s in range(1, 6))
            ce = c["ce"].get(name)
            lines.append(f"| {name} | {sev} | {'-' if ce is None else f'{ce:.2f}'} |")
        lines.append(f"| **mCE** | over {c['corruptions']} corruptions"
                     f"{'' if c['complete'] else ' (incomplete set)'} | {c['mce']:.2f} |")
    return "\n".join(lines)
