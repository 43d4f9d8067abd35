"""Whole-model check of an attention backend against the reference.

Runs one forward and backward of ``model`` on ``x`` with
``TRANSNEXT_ATTN_BACKEND=reference`` and with ``backend``, and returns the relative
errors of the logits and of the worst parameter gradient. Used by the tests (CPU
interpreter, CUDA) and by ``benchmarks/bench_model.py`` before it times anything.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.aggregated_attention import attention_backend


def _run(model: nn.Module, x: torch.Tensor, backend: str, amp_dtype) -> tuple:
    with attention_backend(backend):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(x)
        logits.float().square().mean().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach().float(), grads


def _errors(logits, grads, ref_logits, ref_grads) -> dict:
    # Some gradients are analytically zero (a per-head constant added to every logit of a
    # softmax row cancels): each error is measured against a floor tied to the largest
    # gradient's norm rather than to each tensor's own, possibly tiny, norm.
    floor = 1e-3 * torch.stack([g.norm() for g in ref_grads.values()]).max()

    def rel(a, b):
        return ((a - b).norm() / torch.maximum(b.norm(), floor)).item()

    worst = max(ref_grads, key=lambda n: rel(grads[n], ref_grads[n]))
    return {"logits": rel(logits, ref_logits), "grad": rel(grads[worst], ref_grads[worst]),
            "worst_param": worst}


def compare_backends(model: nn.Module, x: torch.Tensor, backend: str = "triton",
                     amp_dtype: torch.dtype | None = None) -> dict:
    """Relative errors of ``backend`` against the reference at the same precision:
    {"logits", "grad" (the worst parameter's), "worst_param"}.

    With ``amp_dtype`` (e.g. bf16 autocast) both are also compared with the reference in
    fp32, under "vs_fp32": {"backend": {...}, "reference": {...}}. Low-precision error
    grows with depth, so what shows a backend right is that its error against fp32 is of
    the size of the reference's own.
    """
    ref_logits, ref_grads = _run(model, x, "reference", amp_dtype)
    new_logits, new_grads = _run(model, x, backend, amp_dtype)
    if set(new_grads) != set(ref_grads):
        odd = sorted(set(ref_grads) ^ set(new_grads))
        raise RuntimeError(f"backend {backend!r} left these gradients unset or extra: {odd}")
    out = _errors(new_logits, new_grads, ref_logits, ref_grads)
    if amp_dtype is not None:
        exact = _run(model, x, "reference", None)
        out["vs_fp32"] = {"backend": _errors(new_logits, new_grads, *exact),
                          "reference": _errors(ref_logits, ref_grads, *exact)}
    return out
