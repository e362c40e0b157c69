"""Triton: the weight gradient and per-example squared norms from per-example gradients, in one read.

The simultaneous method forms per-example gradients P (B, N) (N = rows·K of a chunk of the
weight) with one batched matmul. Two torch reductions over P (the sum over examples, the
squared norm of each example) read it twice; this kernel reads it once: each program owns
a block of N columns, walks the B examples, accumulates the fp32 column sums and stores
each example's Σ P_b² over its block. The (B, blocks) partials are summed afterwards, in
a fixed order, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm_triton import _CachedLauncher, _cdiv

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _sum_and_sq_norms_kernel(P, Out, Partial, n_examples, n_cols, n_blocks, BLOCK: tl.constexpr):
    """Out[n] = Σ_b P[b, n] (fp32 accumulation, stored in Out's dtype);
    Partial[b, block] = Σ_{n in block} P[b, n]² (fp32)."""
    block = tl.program_id(0)
    cols = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    total = tl.zeros([BLOCK], dtype=tl.float32)
    row = P + cols  # pointers into example 0; advanced by one row per example (64-bit pointer math)
    for b in range(n_examples):
        values = tl.load(row, mask=mask, other=0.0).to(tl.float32)
        total += values
        tl.store(Partial + b * n_blocks + block, tl.sum(values * values, axis=0))
        row += n_cols
    tl.store(Out + cols, total.to(Out.dtype.element_ty), mask=mask)


_launch = _CachedLauncher(_sum_and_sq_norms_kernel)


def sum_and_sq_norms_triton(per_example: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write Σ_b per_example[b] into `out` (N,) and return |per_example[b]|² (B,) fp32.

    Args:
        per_example (`torch.Tensor`): (B, N), contiguous, fp32/bf16/fp16.
        out (`torch.Tensor`): (N,), contiguous, any float dtype (the weight's).
    """
    n_examples, n_cols = per_example.shape
    n_blocks = _cdiv(n_cols, BLOCK)
    partial = torch.empty(n_examples, n_blocks, dtype=torch.float32, device=per_example.device)
    # What Triton specializes on, for the launcher's cache (instead of its walk over every argument):
    # the two pointers' dtypes and 16-byte alignment (`partial` is a fresh allocation: aligned) and the
    # integers (n_blocks follows from n_cols).
    key = (
        per_example.dtype,
        per_example.data_ptr() % 16 == 0,
        out.dtype,
        out.data_ptr() % 16 == 0,
        n_examples,
        n_cols,
    )
    args = (per_example, out, partial, n_examples, n_cols, n_blocks)
    _launch((n_blocks,), args, NUM_WARPS, key=key, BLOCK=BLOCK)
    return partial.sum(1)


def sum_and_sq_norms_traceable(per_example: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`sum_and_sq_norms_triton` launched through `torch.library.wrap_triton`, for the body of
    a `triton_op` that Inductor traces (no cached launcher, no `data_ptr`)."""
    n_examples, n_cols = (int(n) for n in per_example.shape)
    n_blocks = triton.cdiv(n_cols, BLOCK)
    partial = torch.empty(n_examples, n_blocks, dtype=torch.float32, device=per_example.device)
    torch.library.wrap_triton(_sum_and_sq_norms_kernel)[(n_blocks,)](
        per_example, out, partial, n_examples, n_cols, n_blocks, BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    return partial.sum(1)
