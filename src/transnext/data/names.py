"""Class-name lists shipped with the package."""
from __future__ import annotations

import functools
from pathlib import Path

_HERE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _read_list(filename: str) -> tuple[str, ...]:
    lines = (_HERE / filename).read_text(encoding="utf-8").splitlines()
    return tuple(x.strip() for x in lines if x.strip() and not x.startswith("#"))


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1K class names, in the standard (sorted wnid) order."""
    return list(_read_list("imagenet_classes.txt"))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1K WordNet ids, sorted: index i is output i."""
    return list(_read_list("imagenet_wnids.txt"))


def imagenet_a_wnids() -> list[str]:
    """The 200 classes of ImageNet-A."""
    return list(_read_list("imagenet_a_wnids.txt"))


def imagenet_r_wnids() -> list[str]:
    """The 200 classes of ImageNet-R."""
    return list(_read_list("imagenet_r_wnids.txt"))


def fashion_mnist_classes() -> list[str]:
    return list(_read_list("fashion_mnist_classes.txt"))


def imagenet_c_alexnet_errors() -> dict[str, tuple[float, ...]]:
    """AlexNet's top-1 error per ImageNet-C corruption, severities 1..5."""
    out = {}
    for line in _read_list("imagenet_c_alexnet_errors.txt"):
        name, *vals = line.split()
        out[name] = tuple(float(v) for v in vals)
    return out


def default_class_names(num_classes: int) -> list[str]:
    """Names to show for a model without recorded class names."""
    if num_classes == 1000:
        return imagenet_classes()
    if num_classes == 10:
        return fashion_mnist_classes()
    return [f"class_{i}" for i in range(num_classes)]
