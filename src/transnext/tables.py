"""One cache for per-size tables (coordinates, masks, length scales).

They depend only on integers, a device and a dtype, so each is built once per
key. Under torch.compile the cache is bypassed and tables are built in the
graph, where they constant-fold.
"""
from __future__ import annotations

import torch

_CACHE: dict[tuple, object] = {}
_LIMIT = 256


def cached(fn, *args):
    """``fn(*args)``, built once per (fn, args); args must be hashable."""
    if torch.compiler.is_compiling():
        return fn(*args)
    key = (fn.__module__, fn.__qualname__) + args
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) >= _LIMIT:
            _CACHE.clear()
        # Normal tensors even when first asked for inside inference_mode, so a
        # later training forward at the same size can save them for backward.
        with torch.inference_mode(False):
            value = _CACHE[key] = fn(*args)
    return value


__all__ = ["cached"]
