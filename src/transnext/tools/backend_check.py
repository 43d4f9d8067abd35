"""Whole-model check of an attention backend against the reference.

Runs one forward and backward of ``model`` on ``x`` with
``TRANSNEXT_ATTN_BACKEND=reference`` and with ``backend``, and returns the relative
errors of the logits and of the worst parameter gradient. Used by the tests (CPU
interpreter, CUDA) and by ``benchmarks/bench_model.py`` before it times anything.
"""
from __future__ import annotations

import os

import torch
from torch import nn


def _run(model: nn.Module, x: torch.Tensor, backend: str, amp_dtype) -> tuple:
    old = os.environ.get("TRANSNEXT_ATTN_BACKEND")
    os.environ["TRANSNEXT_ATTN_BACKEND"] = backend
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(x)
        logits.float().square().mean().backward()
    finally:
        if old is None:
            os.environ.pop("TRANSNEXT_ATTN_BACKEND", None)
        else:
            os.environ["TRANSNEXT_ATTN_BACKEND"] = old
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach().float(), grads


def compare_backends(model: nn.Module, x: torch.Tensor, backend: str = "triton",
                     amp_dtype: torch.dtype | None = None) -> dict:
    """{"logits": rel. error, "grad": worst rel. error over parameters, "worst_param": name}.

    Some gradients are analytically zero (a per-head constant added to every logit of a
    softmax row cancels), so each error is measured against a floor tied to the largest
    gradient's norm rather than to each tensor's own, possibly tiny, norm.
    """
    ref_logits, ref_grads = _run(model, x, "reference", amp_dtype)
    new_logits, new_grads = _run(model, x, backend, amp_dtype)
    if set(new_grads) != set(ref_grads):
        missing = sorted(set(ref_grads) ^ set(new_grads))
        raise RuntimeError(f"backend {backend!r} left these gradients unset or extra: {missing}")
    floor = 1e-3 * torch.stack([g.norm() for g in ref_grads.values()]).max()

    def rel(a, b):
        return ((a - b).norm() / torch.maximum(b.norm(), floor)).item()

    worst = max(ref_grads, key=lambda n: rel(new_grads[n], ref_grads[n]))
    return {"logits": rel(new_logits, ref_logits), "grad": rel(new_grads[worst], ref_grads[worst]),
            "worst_param": worst}
