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


# Kelly's colours of maximum contrast (white and black left out): up to 20 classes after
# class 0 get colours that stay apart on an overlay.
_KELLY = ["F3C300", "875692", "F38400", "A1CAF1", "BE0032", "C2B280", "848482", "008856",
          "E68FAC", "0067A5", "F99379", "604E97", "F6A600", "B3446C", "DCD300", "882D17",
          "8DB600", "654522", "E25822", "2B3D26"]


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: ADE20K's for 150 classes; class 0 black and Kelly's
    contrast colours for up to 21 classes; else a fixed random spread."""
    if num_classes == 150:
        return ade20k_palette()
    if num_classes <= len(_KELLY) + 1:
        pal = [(0, 0, 0)] + [tuple(int(c[i:i + 2], 16) for i in (0, 2, 4)) for c in _KELLY]
        return np.array(pal[:num_classes], dtype=np.uint8).reshape(-1, 3)
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, (num_classes, 3)).astype(np.uint8)
    pal[0] = (0, 0, 0)
    return pal
