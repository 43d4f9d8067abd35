"""Column sums of a 16-bit matrix in fp32: the bias gradient of a Linear layer.

PyTorch's ``grad.sum(0)`` of a (tokens, channels) gradient runs far below memory speed on
the GPU for TransNeXt's narrow layers (72-576 channels, 10^4-10^5 tokens; see
docs/dense_speed.md, round 9). Here each program sums a strip of rows for a block of
columns in fp32 registers; the (programs, columns) partials are summed once: deterministic,
no atomics. Triton on CUDA tensors, triton's interpreter on CPU tensors (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_launch import launch, sm_count

# The tile's element count (rows x columns); programs per multiprocessor and warps for
# long (>= long_rows rows) and short matrices. An H200 sweep at TransNeXt-Tiny's shapes:
# short ones gain from fewer programs (less to sum afterwards), long ones from more warps.
TUNING = dict(tile=8192, long_rows=65536, per_sm=(2, 4), num_warps=(4, 8))


def _colsum_kernel(G, PART, M, N, stride_m, SPLIT, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, SPLIT * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ptr = G + rows.to(tl.int64)[:, None] * stride_m + cols[None, :]
        acc += tl.load(ptr, mask=(rows < M)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    tl.store(PART + pid_s * N + cols, tl.sum(acc, 0), mask=c_ok)


def column_sum_reference(g: Tensor) -> Tensor:
    """What :func:`column_sum` computes: the sum over every dimension but the last, fp32."""
    return g.reshape(-1, g.shape[-1]).float().sum(0)


def column_sum(g: Tensor, out: Tensor | None = None) -> Tensor:
    """Sum of ``g`` over every dimension but the last, accumulated and returned in fp32
    (or written into ``out``, in its dtype). ``g``'s last dimension must be contiguous (a
    Linear layer's output gradient)."""
    if g.dim() == 0 or g.stride(-1) != 1:
        raise ValueError(f"column_sum needs a tensor whose last dimension is contiguous, got "
                         f"shape {tuple(g.shape)} strides {tuple(g.stride())}")
    N = g.shape[-1]
    g2 = g.reshape(-1, N)  # a view for the usual contiguous gradient
    M = g2.shape[0]
    if M == 0 or N == 0:
        return torch.zeros(N, dtype=torch.float32, device=g.device) if out is None else out.zero_()
    block_n = min(256, triton.next_power_of_2(N))
    block_m = max(1, TUNING["tile"] // block_n)
    col_blocks = triton.cdiv(N, block_n)
    long = M >= TUNING["long_rows"]
    target = TUNING["per_sm"][long] * sm_count(g.device) if g.is_cuda else 2
    split = max(1, min(triton.cdiv(M, block_m), target // col_blocks))
    part = torch.empty((split, N), dtype=torch.float32, device=g.device)
    launch(_colsum_kernel, g2, (col_blocks, split), g2, part, M, N, g2.stride(0), split,
           block_m, block_n, num_warps=TUNING["num_warps"][long])
    total = part[0] if split == 1 else part.sum(0)
    return total if out is None else out.copy_(total)
