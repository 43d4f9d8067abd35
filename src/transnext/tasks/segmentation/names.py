"""Class names and colour palettes shipped with the package."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent


def _lines(name: str) -> list[str]:
    return [x.strip() for x in (_HERE / name).read_text().splitlines()
            if x.strip() and not x.startswith("#")]


@functools.lru_cache(maxsize=None)
def _ade20k_classes() -> tuple[str, ...]:
    return tuple(_lines("ade20k_classes.txt"))


def ade20k_classes() -> list[str]:
    """The 150 ADE20K classes (model output k = annotation value k + 1)."""
    return list(_ade20k_classes())


def ade20k_palette() -> np.ndarray:
    return np.array([[int(v) for v in x.split()] for x in _lines("ade20k_palette.txt")], np.uint8)


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: ADE20K's for 150 classes, else a fixed
    spread of distinct colours."""
    if num_classes == 150:
        return ade20k_palette()
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, (num_classes, 3)).astype(np.uint8)
    if num_classes > 0:
        pal[0] = (0, 0, 0)
    return pal
