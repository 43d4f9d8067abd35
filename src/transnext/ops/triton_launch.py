"""How the package's Triton kernels are launched: plain Python functions wrapped lazily,
``triton.jit`` for CUDA tensors and triton's interpreter for CPU tensors (tests),
whatever ``TRITON_INTERPRET`` says; :func:`launch` on a tensor's own device; and the GPU's
multiprocessor count for grid sizing."""
from __future__ import annotations

import torch
import triton

_KERNELS: dict = {}
_SM_COUNT: dict = {}


def kernel(fn, interpret: bool):
    """``fn`` compiled (CUDA) or interpreted (CPU), wrapped once per process."""
    key = (fn.__module__, fn.__qualname__, interpret)
    k = _KERNELS.get(key)
    if k is None:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            k = InterpretedFunction(fn)
        else:
            k = triton.jit(fn)
        _KERNELS[key] = k
    return k


class _DeviceFn(triton.JITFunction):
    """A ``triton.jit`` helper that kernels call. Compiled kernels inline it as usual; the
    interpreter (used here for CPU tensors without ``TRITON_INTERPRET``) calls it as a plain
    function, which a ``JITFunction`` refuses, so that call runs it interpreted."""

    def __call__(self, *args, **kwargs):
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted(*args, **kwargs)


def device_fn(fn):
    """``fn`` as a helper for the package's kernels (compiled or interpreted)."""
    f = _DeviceFn(fn)
    f._interpreted = None
    return f


_OPTIONS = ("num_warps", "num_stages")  # for the compiler; the interpreter takes none


def launch(fn, like, grid, *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)``, compiled on ``like``'s GPU (triton launches on the
    current device) or interpreted for a CPU tensor (without the compiler's options,
    num_warps and num_stages; constexprs may come as keywords)."""
    if not like.is_cuda:
        kernel(fn, True)[grid](*args, **{k: v for k, v in kwargs.items() if k not in _OPTIONS})
    elif like.device.index == torch.cuda.current_device():
        kernel(fn, False)[grid](*args, **kwargs)
    else:
        with torch.cuda.device(like.device):
            kernel(fn, False)[grid](*args, **kwargs)


def sm_count(dev) -> int:
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n
