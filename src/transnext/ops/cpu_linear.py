"""Linear layers for fp32 CPU inference through oneDNN, each weight packed once.

``F.linear`` in fp32 on the CPU is an MKL GEMM that lays the weight out again at every
call. oneDNN's linear on a weight packed ahead of time (the pair of ops Inductor uses on
the CPU) ran TransNeXt-T's products 10-35% faster on the project's 2-core machine, the
whole 224 forward 7-16% (docs/dense_speed.md, round 13).

Opt in per model with :func:`pack_linears` (the ``predict`` and ``eval`` jobs do on the
CPU: classification, segmentation and detection). A packed copy remembers its weight's
storage and version counter and is rebuilt when either moved (optimizer steps,
``load_state_dict``, ``.to()``); an edit through ``.data`` bypasses the version counter,
so call :func:`pack_linears` again after one. The packed copies double the memory of the
layers' weights while they live. Autograd, autocast, other dtypes and devices, FX,
torch.compile and exports keep ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # torch.fx symbolic tracing only
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_tracing

_SLOTS = "_transnext_packed"  # attribute on an opted-in weight: a _Slots


class _Slots(dict):
    """{rows: ((data_ptr, version), packed weight)}. Pickled and copied empty: a packed
    oneDNN tensor has no storage to save (``torch.save(model)`` would fail on it)."""

    def __reduce__(self):
        return (_Slots, ())


def available() -> bool:
    """Whether this torch build has oneDNN and the two ops (torch >= 2.1 on x86 and Arm)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def pack_linears(model: nn.Module, enable: bool = True) -> int:
    """Opt ``model``'s Linear layers (and 1x1 convs the model runs as linears) in to the
    packed product, or out with ``enable=False`` (dropping the packed copies). Weights are
    packed at their first call. Returns how many layers changed; 0 where oneDNN is missing."""
    if enable and not available():
        return 0
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1
                                             and tuple(m.kernel_size) == (1, 1))):
            continue
        if enable and not hasattr(w, _SLOTS):
            setattr(w, _SLOTS, _Slots())
            n += 1
        elif not enable and hasattr(w, _SLOTS):
            delattr(w, _SLOTS)
            n += 1
    return n


def pack_on_cpu(model: nn.Module, device) -> nn.Module:
    """:func:`pack_linears` where ``device`` is the CPU (the inference jobs); ``model``."""
    if torch.device(device).type == "cpu":
        pack_linears(model)
    return model


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", None)
    return (_fx_tracing() or torch.compiler.is_compiling() or bool(exporting and exporting())
            or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None,
           rows: tuple[int, int] | None = None) -> Tensor | None:
    """``F.linear(x, weight[rows], bias[rows])`` (``weight`` reshaped to 2-D: a 1x1 conv's)
    from the packed weight, or None where that does not apply (not opted in, autograd on,
    not fp32 on the CPU, autocast, tracing, ``torch.backends.mkldnn.enabled`` off): the
    caller then runs its usual product."""
    # before the attribute lookup: an FX proxy has none, and Dynamo need not see one
    if torch.is_grad_enabled() or _fx_tracing() or torch.compiler.is_compiling():
        return None
    slots = getattr(weight, _SLOTS, None)
    if (slots is None or _tracing() or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or not torch.backends.mkldnn.enabled):  # the user switched oneDNN off
        return None
    stamp = (weight.data_ptr(), weight._version)
    entry = slots.get(rows)
    if entry is None or entry[0] != stamp:
        w = weight.reshape(weight.shape[0], -1)
        if rows is not None:
            w = w[rows[0]:rows[1]]
        entry = slots[rows] = (stamp, torch.ops.mkldnn._reorder_linear_weight(w.contiguous()))
    if bias is not None and rows is not None:
        bias = bias[rows[0]:rows[1]]
    return torch.ops.mkldnn._linear_pointwise(x, entry[1], bias, "none", [], "")


def reference(x: Tensor, weight: Tensor, bias: Tensor | None,
              rows: tuple[int, int] | None = None) -> Tensor:
    """What :func:`linear` computes, through ``F.linear`` (tests)."""
    w = weight.reshape(weight.shape[0], -1)
    if rows is not None:
        w, bias = w[rows[0]:rows[1]], None if bias is None else bias[rows[0]:rows[1]]
    return F.linear(x, w, bias)
