"""One cache for per-size tables (coordinates, masks, length scales).

They depend only on integers, a device and a dtype, so each is built once per
key. Under torch.compile the cache is bypassed and tables are built in the
graph, where they constant-fold. A CUDA graph being recorded reads them by address, so an
entry it reads is pinned: never dropped when the cache is cleared.
"""
from __future__ import annotations

import torch

_CACHE: dict[tuple, object] = {}
_PINNED: set[tuple] = set()
_LIMIT = 256


def capturing() -> bool:
    """True while the current CUDA stream is recorded into a graph (``engine.cuda_graphs``):
    a graph replays reads of the addresses it saw, so caches that may free a tensor must
    not hand it to one."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def cached(fn, *args):
    """``fn(*args)``, built once per (fn, args); args must be hashable."""
    if torch.compiler.is_compiling():
        return fn(*args)
    key = (fn.__module__, fn.__qualname__) + args
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) >= _LIMIT:
            kept = {k: _CACHE[k] for k in _PINNED if k in _CACHE}
            _CACHE.clear()
            _CACHE.update(kept)
        # Normal tensors even when first asked for inside inference_mode, so a
        # later training forward at the same size can save them for backward.
        with torch.inference_mode(False):
            value = _CACHE[key] = fn(*args)
    if capturing():
        _PINNED.add(key)
    return value


__all__ = ["cached", "capturing"]
