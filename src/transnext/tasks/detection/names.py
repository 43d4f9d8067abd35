"""COCO's 80 detection classes shipped with the package, and the mapping between
COCO category ids (1..90 with gaps) and contiguous labels 1..K (0 = background,
torchvision's convention)."""
from __future__ import annotations

import functools
from pathlib import Path

_HERE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _coco_table() -> tuple[tuple[int, str], ...]:
    rows = []
    for line in (_HERE / "coco_classes.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            cid, name = line.split(maxsplit=1)
            rows.append((int(cid), name.strip()))
    return tuple(rows)


def coco_classes() -> list[str]:
    """The 80 COCO class names; name i is label i + 1."""
    return [name for _, name in _coco_table()]


def coco_category_ids() -> list[int]:
    """The 80 COCO category ids (1..90 with gaps), in label order."""
    return [cid for cid, _ in _coco_table()]


def label_to_cat_id(cat_ids) -> dict[int, int]:
    """{label: category id} for categories sorted by id: label 1 is the smallest id."""
    return {i + 1: int(c) for i, c in enumerate(sorted(cat_ids))}


def cat_id_to_label(cat_ids) -> dict[int, int]:
    """{category id: label 1..K}, the inverse of :func:`label_to_cat_id`."""
    return {c: label for label, c in label_to_cat_id(cat_ids).items()}
