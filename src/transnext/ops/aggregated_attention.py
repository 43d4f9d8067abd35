"""Public aggregated-attention op and backend dispatch.

The model hands everything after its projections (SPEC section 3, steps 3-7)
to :func:`aggregated_attention`. Backends:

* ``reference`` - plain PyTorch (``ops.reference``), the ground truth; any device.
* ``triton``    - fused Triton kernels (``ops.triton_kernels``), CUDA (or
  ``TRITON_INTERPRET=1`` on the CPU, for tests).

``TRANSNEXT_ATTN_BACKEND=reference|triton|auto`` (default ``auto``: Triton on
CUDA when it is importable, the reference elsewhere and under
``torch.use_deterministic_algorithms(True)``) picks one for the whole process;
``backend=`` picks one per call.

The Triton path has no attention dropout: with ``attn_drop > 0`` and
``training`` every backend falls back to the reference (as do fp64 inputs:
the kernels compute in fp32; fp32, fp16 and bf16 are supported). On CPU tensors the
Triton path runs only under ``TRITON_INTERPRET=1`` (set before triton is first
imported), which is how the CPU tests exercise it. The Triton path is the
custom op ``torch.ops.transnext.aggregated_attention_fwd`` (with a registered
backward ``..._bwd``, autograd and fake kernels), so ``torch.compile`` keeps it
in the graph.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from .position_bias import FactoredBias
from .reference import aggregated_attention_reference

BACKENDS = ("auto", "reference", "triton")

_TRITON_ERR: Exception | None = None


def _triton_op(name: str = "aggregated_attention_triton"):
    """A Triton entry point, or None (with the import error kept) if triton is unusable."""
    global _TRITON_ERR
    try:
        from . import triton_kernels
    except Exception as e:  # pragma: no cover - depends on the install
        _TRITON_ERR = e
        return None
    return getattr(triton_kernels, name)


def _interpreting() -> bool:
    """True when triton's interpreter is active (TRITON_INTERPRET=1 when triton was imported)."""
    try:
        import triton.language as tl
    except Exception:  # pragma: no cover
        return False
    return type(tl.sum).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def attention_backend(name: str):
    """``TRANSNEXT_ATTN_BACKEND=name`` inside the block, the previous value (or none) after."""
    old = os.environ.get("TRANSNEXT_ATTN_BACKEND")
    os.environ["TRANSNEXT_ATTN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRANSNEXT_ATTN_BACKEND", None)
        else:
            os.environ["TRANSNEXT_ATTN_BACKEND"] = old


def backend_from_env() -> str:
    name = os.environ.get("TRANSNEXT_ATTN_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"TRANSNEXT_ATTN_BACKEND={name!r} is not one of {', '.join(BACKENDS)}"
        )
    return name


def resolve_backend(q: Tensor, attn_drop: float = 0.0, training: bool = False,
                    backend: str | None = None) -> str:
    """'reference' or 'triton': what :func:`aggregated_attention` will run for these inputs."""
    name = backend or backend_from_env()
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    if (attn_drop > 0.0 and training) or q.dtype == torch.float64:
        # The fused kernels have no attention dropout and compute in fp32 (fp64 stays exact).
        return "reference"
    if name == "auto":
        if torch.are_deterministic_algorithms_enabled():
            # The kernels reduce parameter grads with fp32 atomics (order varies run to run);
            # deterministic mode (train --deterministic) wants bitwise-repeatable runs.
            return "reference"
        return "triton" if q.is_cuda and _triton_op() is not None else "reference"
    return name


def aggregated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    pool_bias: Tensor | FactoredBias,
    query_embedding: Tensor,
    temperature: Tensor,
    rel_bias_local: Tensor,
    learnable_tokens: Tensor,
    learnable_bias: Tensor,
    H: int,
    W: int,
    window: int = 3,
    attn_drop: float = 0.0,
    training: bool = False,
    backend: str | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Aggregated attention of SPEC section 3, steps 3-7.

    Shapes (h heads of size d, N = H*W query tokens, P pooled tokens):
      q, k, v           (B, N, h, d)  raw projections (not normalised); any strides
      k_pool, v_pool    (B, P, h, d)  raw projections of the pooled tokens
      pool_bias         (h, N, P)     continuous position bias (SPEC section 5), or the
                                      same as a FactoredBias (read by the kernels in
                                      that form: no (h, N, P) tensor is written)
      query_embedding   (h, 1, d)
      temperature       (h, 1, 1)     raw; softplus is applied inside
      rel_bias_local    (h, w*w)
      learnable_tokens  (h, d, w*w)
      learnable_bias    (h, 1, w*w)
    Returns (B, N, h, d) in q's dtype. Length scales and the border mask are
    derived from (H, W, window, P) inside the op. ``return_weights``: also the softmax
    weights (B, N, h, w*w + P), from the reference (whatever the backend).
    """
    name = resolve_backend(q, attn_drop, training, backend)
    args = (q, k, v, k_pool, v_pool, pool_bias, query_embedding, temperature,
            rel_bias_local, learnable_tokens, learnable_bias, H, W, window)
    if return_weights:  # only the reference materialises the weights
        return aggregated_attention_reference(*args, attn_drop=attn_drop, training=training,
                                              return_weights=True)
    if name == "reference":
        return aggregated_attention_reference(*args, attn_drop=attn_drop, training=training)
    return _triton_entry(q)(*args)


def _triton_entry(q: Tensor, name: str = "aggregated_attention_triton"):
    """The Triton entry point ``name`` for q's device, or a clear error."""
    fn = _triton_op(name)
    if fn is None:
        raise RuntimeError(f"attention backend 'triton' is not available: {_TRITON_ERR!r}")
    if not q.is_cuda and not _interpreting():
        raise RuntimeError(
            "attention backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            "triton is imported, for CPU tests)"
        )
    return fn


def aggregated_attention_packed(
    qkv: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    pool_bias: Tensor | FactoredBias,
    query_embedding: Tensor,
    temperature: Tensor,
    rel_bias_local: Tensor,
    learnable_tokens: Tensor,
    learnable_bias: Tensor,
    H: int,
    W: int,
    window: int = 3,
    attn_drop: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> Tensor:
    """:func:`aggregated_attention` of ``q, k, v = qkv.unbind(2)``, qkv (B, N, 3, h, d): q,
    k and v packed in one tensor, as the model's joint q/kv projection makes them. The
    Triton backend, in eager training, writes their gradients into one (B, N, 3, h, d)
    tensor; with three inputs autograd would stack k's and v's and the projection's backward
    concatenate them with q's (two copies of the same gradient)."""
    q, k, v = qkv.unbind(2)
    name = resolve_backend(q, attn_drop, training, backend)
    rest = (k_pool, v_pool, pool_bias, query_embedding, temperature, rel_bias_local,
            learnable_tokens, learnable_bias, H, W, window)
    if name == "reference":
        return aggregated_attention_reference(q, k, v, *rest, attn_drop=attn_drop,
                                              training=training)
    return _triton_entry(q, "aggregated_attention_triton_packed")(qkv, *rest)
