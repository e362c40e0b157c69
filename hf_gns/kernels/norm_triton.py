"""Triton LayerNorm / RMSNorm whose backward also yields per-example gradient norms.

Same math as `norm_reference.py`. Layout: the input is viewed as (B, R, D) with unit
stride on D; rows r of example b are `x[b, r, :]`.

Forward: one pass over a tile of BLOCK_M rows, mean/rstd kept in fp32.
Backward: a grid over (example b, chunk c of b's rows). Each program walks its rows,
writes dx, and accumulates fp32 partial dγ (and dβ) for its rows in registers; it
stores them in a (P, B, C, D) buffer (P = 1 or 2 parameters). A second kernel over
column blocks sums the chunks in a fixed order, giving dγ_b, dγ = Σ_b dγ_b and, per
column block, Σ_d dγ_b[d]²; the last of its programs to finish (an atomic ticket, which
orders nothing numeric) adds those up into |dγ_b|². No atomics on the sums themselves:
results are bitwise deterministic (DESIGN.md section 3). Partial sums keyed by SM or
by lock would mix examples and lose the per-example information.

Padding-free batches (`example_offsets`: example e owns rows [offsets[e], offsets[e+1]) of
the input viewed as (N, D)) use a second backward kernel and the same reduction. The
rows are cut into C-row chunks, one program each (the dense grid with B = 1); a program
walks the examples that meet its chunk (found by binary search in the offsets) and
stores one partial per piece (chunk k ∩ example e) at slot k + e. Slots are unique (each
new piece in row order starts a new chunk, a new example, or both) and example e's
pieces fill the contiguous slots offsets[e]//C + e … (offsets[e+1]-1)//C + e, so the
reduction finds them from the offsets alone. The grid (N/C programs) and the buffer
(N/C + E - 1 slots) are sized from N and E = offsets.numel() - 1, both host-known: no
host-device sync, and the dense path is unchanged.

Host cost matters as much as bandwidth at small D (a fwd+bwd takes tens of
microseconds on the GPU): the eager launchers (`norm_launch.py`) cache a plan per input
layout, make few allocations and launch three kernels in all. This file holds the kernels,
their tile configs and `_CachedLauncher` (the per-call-keyed direct launcher of the other
kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch
import triton
import triton.language as tl

# A full row lives in registers; beyond this the launchers refuse (the op falls back).
MAX_FUSED_WIDTH = 65536


@triton.jit
def _norm_fwd_kernel(
    X, Y, W, Bias, Mean, Rstd,
    stride_xb, stride_xr,
    n_rows, rows_per_example, width, inv_width, eps, weight_offset,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """y = x̂ ⊙ (γ + offset) + β, x̂ = (x - μ)·rstd (LayerNorm) or x·rstd (RMSNorm)."""
    rows, cols, row_mask, col_mask, mask, x_offsets = _norm_fwd_tile(
        n_rows, rows_per_example, width, stride_xb, stride_xr, BLOCK_M, BLOCK_D
    )
    x = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
    _norm_fwd_rows(
        x, X, Y, W, Bias, Mean, Rstd, rows, cols, row_mask, col_mask, mask,
        width, inv_width, eps, weight_offset, IS_RMS, HAS_WEIGHT, HAS_BIAS, CAST_BEFORE_WEIGHT,
    )  # fmt: skip


@triton.jit
def _norm_fwd_residual_kernel(
    X, Residual, Sum, Y, W, Bias, Mean, Rstd,
    stride_xb, stride_xr,
    n_rows, rows_per_example, width, inv_width, eps, weight_offset,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """`_norm_fwd_kernel` of s = x + r, s also stored (in Sum's dtype): a residual add fused into the
    norm after it. X, Residual and Sum share X's strides. Launched only by the compiled graphs'
    pass (`norm_graph_pass.py`); s is fp32(x) + fp32(r) rounded once to Sum's dtype, as torch adds."""
    rows, cols, row_mask, col_mask, mask, x_offsets = _norm_fwd_tile(
        n_rows, rows_per_example, width, stride_xb, stride_xr, BLOCK_M, BLOCK_D
    )
    x = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
    x = x + tl.load(Residual + x_offsets, mask=mask, other=0.0).to(tl.float32)
    x = x.to(Sum.dtype.element_ty)
    tl.store(Sum + x_offsets, x, mask=mask)
    _norm_fwd_rows(
        x.to(tl.float32), Sum, Y, W, Bias, Mean, Rstd, rows, cols, row_mask, col_mask, mask,
        width, inv_width, eps, weight_offset, IS_RMS, HAS_WEIGHT, HAS_BIAS, CAST_BEFORE_WEIGHT,
    )  # fmt: skip


@triton.jit
def _norm_fwd_tile(
    n_rows, rows_per_example, width, stride_xb, stride_xr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """This program's BLOCK_M rows: (rows, cols, row mask, col mask, mask, element offsets in X)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < width
    mask = row_mask[:, None] & col_mask[None, :]
    example = (rows // rows_per_example).to(tl.int64)
    x_rows = example * stride_xb + (rows % rows_per_example).to(tl.int64) * stride_xr
    return rows, cols, row_mask, col_mask, mask, x_rows[:, None] + cols[None, :]


@triton.jit
def _norm_fwd_rows(
    x, X, Y, W, Bias, Mean, Rstd, rows, cols, row_mask, col_mask, mask, width, inv_width, eps, weight_offset,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
):  # fmt: skip
    """The norm of the fp32 rows `x` (loaded from X, whose dtype CAST_BEFORE_WEIGHT rounds x̂ to)."""
    # Inductor passes Python-float arguments of user Triton kernels as fp64 (the JIT passes fp32):
    # fix their type here so the arithmetic is the same fp32 in eager and compiled runs.
    inv_width = tl.cast(inv_width, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_offset = tl.cast(weight_offset, tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) * inv_width
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(Mean + rows, mean, mask=row_mask)
    # means as products with 1/D (exact at D=1, where x - μ must be exactly 0), and a
    # round-to-nearest sqrt and division (Triton's tl.sqrt and `/` are approximate):
    # RMSNorm's dx = rstd·g·(1 - x̂²) cancels at D=1 and shows every ulp of rstd
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(xc * xc, axis=1) * inv_width + eps))
    tl.store(Rstd + rows, rstd, mask=row_mask)

    y = xc * rstd[:, None]
    if CAST_BEFORE_WEIGHT:
        y = y.to(X.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset
        y = y * w[None, :]
    if HAS_BIAS:
        y = y + tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y_rows = rows.to(tl.int64) * width
    tl.store(Y + y_rows[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_rows(
    X, DY, Mean, Rstd, DX, x_rows, dy_rows, flat_rows, row_mask, cols, col_mask, w, width, inv_width,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, N_PARAMS: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
):  # fmt: skip
    """dx of one tile of rows (stored), and the tile's fp32 dy and x̂ (rounded like the forward's
    when CAST_BEFORE_WEIGHT) for the partial sums dγ += dy ⊙ x̂, dβ += dy.

    g = dy ⊙ w;  dx = rstd·(g - x̂·mean(g ⊙ x̂) - mean(g))  (no mean(g) term for RMSNorm).
    `x_rows`/`dy_rows` are element offsets of the rows in X/DY, `flat_rows` their index in
    Mean/Rstd and in the contiguous DX.
    """
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + dy_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(Rstd + flat_rows, mask=row_mask, other=0.0)
    if IS_RMS:
        xhat = x * rstd[:, None]
    else:
        mean = tl.load(Mean + flat_rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_WEIGHT:
        g = dy * w[None, :]
    else:
        g = dy
    proj = tl.sum(g * xhat, axis=1) * inv_width
    centred = g - xhat * proj[:, None]
    if not IS_RMS:
        centred = centred - (tl.sum(g, axis=1) * inv_width)[:, None]
    dx = centred * rstd[:, None]
    tl.store(DX + flat_rows[:, None] * width + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if N_PARAMS >= 1 and CAST_BEFORE_WEIGHT:
        xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
    return dy, xhat


@triton.jit
def _load_rows(ptrs, mask, EVICT_FIRST: tl.constexpr):
    """A masked load (0 outside `mask`); EVICT_FIRST: an L2 eviction hint for data read once."""
    if EVICT_FIRST:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(ptrs, value, mask, EVICT_FIRST: tl.constexpr):
    if EVICT_FIRST:
        tl.store(ptrs, value, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _add_pairs(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _norm_bwd_tile(
    x, dy, rstd, mean, mask, w, inv_width,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ONE_REDUCTION: tl.constexpr,
):  # fmt: skip
    """dx and x̂ of one tile of rows from its fp32 x and dy and its rows' rstd (and mean).

    g = dy ⊙ w;  dx = rstd·(g - x̂·mean(g ⊙ x̂) - mean(g))  (no mean(g) term for RMSNorm).
    ONE_REDUCTION (LayerNorm): both row sums in one `tl.reduce` over a pair, one round of
    cross-warp exchange (and barrier) instead of two; the same sums, up to fp32 rounding.
    """
    if IS_RMS:
        xhat = x * rstd[:, None]
    else:
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_WEIGHT:
        g = dy * w[None, :]
    else:
        g = dy
    if ONE_REDUCTION and not IS_RMS:
        sum_g_xhat, sum_g = tl.reduce((g * xhat, g), 1, _add_pairs)
        centred = g - xhat * (sum_g_xhat * inv_width)[:, None]
        centred = centred - (sum_g * inv_width)[:, None]
    else:
        proj = tl.sum(g * xhat, axis=1) * inv_width
        centred = g - xhat * proj[:, None]
        if not IS_RMS:
            centred = centred - (tl.sum(g, axis=1) * inv_width)[:, None]
    return centred * rstd[:, None], xhat


@triton.jit
def _norm_bwd_load(
    X, DY, DY2, DY3, Mean, Rstd, example, first, row_end, stride_xb, stride_xr, stride_dyb, stride_dyr,
    rows_per_example, cols, col_mask,
    IS_RMS: tl.constexpr, BLOCK_M: tl.constexpr, EVICT_FIRST: tl.constexpr, N_DY: tl.constexpr,
):  # fmt: skip
    """x and dy (in their dtype), rstd and mean (= rstd for RMSNorm: unused) of example b's rows
    [first, first + BLOCK_M) below row_end; masked rows load nothing. N_DY > 1: dy is the fp32 sum
    (dy + dy2) + dy3 of N_DY tensors of one layout, each widened as it is read."""
    r = first + tl.arange(0, BLOCK_M)
    row_mask = r < row_end
    mask = row_mask[:, None] & col_mask[None, :]
    r64 = r.to(tl.int64)
    x_rows = example * stride_xb + r64 * stride_xr
    dy_rows = example * stride_dyb + r64 * stride_dyr
    flat_rows = example * rows_per_example + r64  # index into mean/rstd/dx
    x = _load_rows(X + x_rows[:, None] + cols[None, :], mask, EVICT_FIRST)
    dy_offsets = dy_rows[:, None] + cols[None, :]
    dy = _load_rows(DY + dy_offsets, mask, EVICT_FIRST)
    if N_DY >= 2:
        dy = dy.to(tl.float32) + _load_rows(DY2 + dy_offsets, mask, EVICT_FIRST).to(tl.float32)
    if N_DY == 3:
        dy = dy + _load_rows(DY3 + dy_offsets, mask, EVICT_FIRST).to(tl.float32)
    rstd = tl.load(Rstd + flat_rows, mask=row_mask, other=0.0)
    if IS_RMS:
        mean = rstd
    else:
        mean = tl.load(Mean + flat_rows, mask=row_mask, other=0.0)
    return x, dy, rstd, mean


@triton.jit
def _norm_bwd_rows_step(
    x, dy, rstd, mean, X, Addend, DX, DXNarrow, example, first, row_end, rows_per_example, cols, col_mask,
    w, width, inv_width, acc_dw, acc_db,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, N_PARAMS: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, ONE_REDUCTION: tl.constexpr, EVICT_FIRST: tl.constexpr,
    HAS_ADDEND: tl.constexpr, HAS_NARROW_DX: tl.constexpr,
):  # fmt: skip
    """One tile of the backward's row loop, from its loaded x, dy, rstd, mean (`_norm_bwd_load`):
    dx stored, and the partial sums dγ += dy ⊙ x̂ (x̂ rounded like the forward's when
    CAST_BEFORE_WEIGHT), dβ += dy returned. HAS_ADDEND: DX gets dx (in DX's dtype) + addend, one
    fp32 add as torch adds them; HAS_NARROW_DX: that sum also rounded into DXNarrow."""
    r = first + tl.arange(0, BLOCK_M)
    row_mask = r < row_end
    mask = row_mask[:, None] & col_mask[None, :]
    x = x.to(tl.float32)
    dy = dy.to(tl.float32)
    dx, xhat = _norm_bwd_tile(x, dy, rstd, mean, mask, w, inv_width, IS_RMS, HAS_WEIGHT, ONE_REDUCTION)
    flat_rows = example * rows_per_example + r.to(tl.int64)
    dx_offsets = flat_rows[:, None] * width + cols[None, :]
    dx = dx.to(DX.dtype.element_ty)
    if HAS_ADDEND:
        dx = (dx.to(tl.float32) + _load_rows(Addend + dx_offsets, mask, EVICT_FIRST).to(tl.float32)).to(
            DX.dtype.element_ty
        )
    _store_rows(DX + dx_offsets, dx, mask, EVICT_FIRST)
    if HAS_NARROW_DX:
        _store_rows(DXNarrow + dx_offsets, dx.to(DXNarrow.dtype.element_ty), mask, EVICT_FIRST)
    if N_PARAMS >= 1:
        if CAST_BEFORE_WEIGHT:
            xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
        acc_dw += dy * xhat
    if N_PARAMS == 2:
        acc_db += dy
    return acc_dw, acc_db


@triton.jit
def _norm_bwd_kernel(
    X, DY, W, Mean, Rstd, DX, PartialW, PartialB,
    stride_xb, stride_xr, stride_dyb, stride_dyr,
    n_examples, rows_per_example, rows_per_chunk, n_chunks, width, inv_width, weight_offset,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, N_PARAMS: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_REDUCTION: tl.constexpr, PREFETCH: tl.constexpr, LOOP_STAGES: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
):  # fmt: skip
    """dx for the rows of chunk c of example b, and that chunk's partial dγ_b (N_PARAMS >= 1)
    and dβ_b (N_PARAMS == 2); N_PARAMS = 0 for frozen or absent parameters.

    g = dy ⊙ (γ + offset);  dx = rstd·(g - x̂·mean(g ⊙ x̂) - mean(g))  (no mean(g) term
    for RMSNorm);  partial dγ_b = Σ_r dy_r ⊙ x̂_r,  partial dβ_b = Σ_r dy_r.

    Variants (`BackwardOptions`; all off: the kernel as first tuned), each with the same
    arithmetic per row and the same order of the partial sums:
    ONE_REDUCTION: LayerNorm's two row sums in one reduction (`_norm_bwd_tile`).
    PREFETCH: the next tile's x, dy, rstd (, mean) are loaded before the current tile is
    computed (software pipelining in registers: two tiles' loads in flight, not one).
    LOOP_STAGES > 0: the row loop as `tl.range(num_stages=LOOP_STAGES)`, which lets Triton
    pipeline its loads through shared memory (cp.async) though the loop has no dot.
    EVICT_FIRST: x and dy loads and dx stores hint L2 to evict them first (each read once).
    """
    _norm_bwd_fused_kernel(  # Triton inlines it: with these constants, the code of before
        X, DY, DY, DY, W, Mean, Rstd, DX, DX, DX, PartialW, PartialB,
        stride_xb, stride_xr, stride_dyb, stride_dyr,
        n_examples, rows_per_example, rows_per_chunk, n_chunks, width, inv_width, weight_offset,
        IS_RMS, HAS_WEIGHT, N_PARAMS, CAST_BEFORE_WEIGHT, BLOCK_M, BLOCK_D,
        ONE_REDUCTION, PREFETCH, LOOP_STAGES, EVICT_FIRST,
        1, False, False,
    )  # fmt: skip


@triton.jit
def _norm_bwd_fused_kernel(
    X, DY, DY2, DY3, W, Mean, Rstd, Addend, DX, DXNarrow, PartialW, PartialB,
    stride_xb, stride_xr, stride_dyb, stride_dyr,
    n_examples, rows_per_example, rows_per_chunk, n_chunks, width, inv_width, weight_offset,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, N_PARAMS: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_REDUCTION: tl.constexpr, PREFETCH: tl.constexpr, LOOP_STAGES: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    N_DY: tl.constexpr, HAS_ADDEND: tl.constexpr, HAS_NARROW_DX: tl.constexpr,
):  # fmt: skip
    """`_norm_bwd_kernel` with the sums around it in a compiled backward fused in (launched as a
    kernel only by the compiled graphs' pass, `norm_graph_pass.py`; `_norm_bwd_kernel` is this
    with all three off): dy = (DY + DY2) + DY3 in fp32 for N_DY of them
    (the gradients of the q/k/v or gate/up casts of the norm's output, each widened as it is read;
    all with DY's strides); HAS_ADDEND: DX = dx + Addend (the residual stream's gradient, laid out
    as DX); HAS_NARROW_DX: that sum also rounded into DXNarrow (the cast that the residual branch's
    output projection reads). The same fp32 operations, in the same order, as the graph's."""
    # Inductor passes Python-float arguments of user Triton kernels as fp64 (the JIT passes fp32):
    # fix their type here so the arithmetic is the same fp32 in eager and compiled runs.
    inv_width = tl.cast(inv_width, tl.float32)
    weight_offset = tl.cast(weight_offset, tl.float32)
    example = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < width
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset
    else:
        w = tl.zeros((BLOCK_D,), dtype=tl.float32)  # unused
    acc_dw = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    row_start = chunk * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, rows_per_example)
    if PREFETCH:
        x, dy, rstd, mean = _norm_bwd_load(
            X, DY, DY2, DY3, Mean, Rstd, example, row_start, row_end, stride_xb, stride_xr, stride_dyb,
            stride_dyr, rows_per_example, cols, col_mask, IS_RMS, BLOCK_M, EVICT_FIRST, N_DY,
        )  # fmt: skip
        for first in range(row_start, row_end, BLOCK_M):
            next_x, next_dy, next_rstd, next_mean = _norm_bwd_load(
                X, DY, DY2, DY3, Mean, Rstd, example, first + BLOCK_M, row_end, stride_xb, stride_xr,
                stride_dyb, stride_dyr, rows_per_example, cols, col_mask, IS_RMS, BLOCK_M, EVICT_FIRST, N_DY,
            )  # fmt: skip
            acc_dw, acc_db = _norm_bwd_rows_step(
                x, dy, rstd, mean, X, Addend, DX, DXNarrow, example, first, row_end, rows_per_example, cols,
                col_mask, w, width, inv_width, acc_dw, acc_db, IS_RMS, HAS_WEIGHT, N_PARAMS,
                CAST_BEFORE_WEIGHT, BLOCK_M, ONE_REDUCTION, EVICT_FIRST, HAS_ADDEND, HAS_NARROW_DX,
            )  # fmt: skip
            x, dy, rstd, mean = next_x, next_dy, next_rstd, next_mean
    elif LOOP_STAGES > 0:
        for first in tl.range(row_start, row_end, BLOCK_M, num_stages=LOOP_STAGES):
            x, dy, rstd, mean = _norm_bwd_load(
                X, DY, DY2, DY3, Mean, Rstd, example, first, row_end, stride_xb, stride_xr, stride_dyb,
                stride_dyr, rows_per_example, cols, col_mask, IS_RMS, BLOCK_M, EVICT_FIRST, N_DY,
            )  # fmt: skip
            acc_dw, acc_db = _norm_bwd_rows_step(
                x, dy, rstd, mean, X, Addend, DX, DXNarrow, example, first, row_end, rows_per_example, cols,
                col_mask, w, width, inv_width, acc_dw, acc_db, IS_RMS, HAS_WEIGHT, N_PARAMS,
                CAST_BEFORE_WEIGHT, BLOCK_M, ONE_REDUCTION, EVICT_FIRST, HAS_ADDEND, HAS_NARROW_DX,
            )  # fmt: skip
    else:  # a plain `range`, not tl.range(num_stages=0): the default's compiled code stays the tuned,
        # GPU-verified kernel's (folding it into the branch above waits for a GPU check of its PTX)
        for first in range(row_start, row_end, BLOCK_M):
            x, dy, rstd, mean = _norm_bwd_load(
                X, DY, DY2, DY3, Mean, Rstd, example, first, row_end, stride_xb, stride_xr, stride_dyb,
                stride_dyr, rows_per_example, cols, col_mask, IS_RMS, BLOCK_M, EVICT_FIRST, N_DY,
            )  # fmt: skip
            acc_dw, acc_db = _norm_bwd_rows_step(
                x, dy, rstd, mean, X, Addend, DX, DXNarrow, example, first, row_end, rows_per_example, cols,
                col_mask, w, width, inv_width, acc_dw, acc_db, IS_RMS, HAS_WEIGHT, N_PARAMS,
                CAST_BEFORE_WEIGHT, BLOCK_M, ONE_REDUCTION, EVICT_FIRST, HAS_ADDEND, HAS_NARROW_DX,
            )  # fmt: skip

    # PartialW[b, c, :] and PartialB[b, c, :]: the two halves of one (P, B, C, D) buffer
    partial_offset = (example * n_chunks + chunk) * width + cols
    if N_PARAMS >= 1:
        tl.store(PartialW + partial_offset, tl.sum(acc_dw, axis=0), mask=col_mask)
    if N_PARAMS == 2:
        tl.store(PartialB + partial_offset, tl.sum(acc_db, axis=0), mask=col_mask)


@triton.jit
def _example_of_row(Offsets, n_examples, row, search_steps):
    """The last e in [0, E) with offsets[e] <= row: the example owning `row` (empty examples
    own none). Binary search over the (E+1,) offsets, `search_steps` = ⌈log2 E⌉ halvings."""
    lo = row * 0
    hi = lo + n_examples - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        right = tl.load(Offsets + mid) <= row
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    return lo


@triton.jit
def _norm_bwd_documents_kernel(
    X, DY, W, Mean, Rstd, DX, PartialW, PartialB, Offsets,
    stride_xr, stride_dyr,
    n_rows, n_examples, rows_per_chunk, search_steps, width, inv_width, weight_offset,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, N_PARAMS: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dx for the rows of chunk k, [k·C, (k+1)·C), and for each example e meeting the chunk the
    partial dγ_e = Σ_r dy_r ⊙ x̂_r (and dβ_e = Σ_r dy_r) over the rows they share, stored at
    slot k + e of PartialW (PartialB). The row math is `_norm_bwd_kernel`'s default variant's
    (whose PTX for sm_90 is the pre-variant kernel's, up to the order of two instructions)."""
    # Inductor passes Python-float arguments of user Triton kernels as fp64 (the JIT passes fp32):
    # fix their type here so the arithmetic is the same fp32 in eager and compiled runs.
    inv_width = tl.cast(inv_width, tl.float32)
    weight_offset = tl.cast(weight_offset, tl.float32)
    chunk = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < width
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset
    else:
        w = tl.zeros((BLOCK_D,), dtype=tl.float32)  # unused

    chunk_start = chunk.to(tl.int64) * rows_per_chunk
    chunk_end = tl.minimum(chunk_start + rows_per_chunk, n_rows)
    first_example = _example_of_row(Offsets, n_examples, chunk_start, search_steps)
    last_example = _example_of_row(Offsets, n_examples, chunk_end - 1, search_steps)
    for example in range(first_example, last_example + 1):
        row_start = tl.maximum(tl.load(Offsets + example), chunk_start)
        row_end = tl.minimum(tl.load(Offsets + example + 1), chunk_end)
        acc_dw = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        acc_db = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for first in range(row_start, row_end, BLOCK_M):
            r = first + tl.arange(0, BLOCK_M)  # int64
            row_mask = r < row_end
            dy, xhat = _norm_bwd_rows(
                X, DY, Mean, Rstd, DX, r * stride_xr, r * stride_dyr, r, row_mask, cols, col_mask, w, width,
                inv_width, IS_RMS, HAS_WEIGHT, N_PARAMS, CAST_BEFORE_WEIGHT,
            )  # fmt: skip
            if N_PARAMS >= 1:
                acc_dw += dy * xhat
            if N_PARAMS == 2:
                acc_db += dy
        partial_offset = (chunk + example) * width + cols  # slot k + e
        if N_PARAMS >= 1:
            tl.store(PartialW + partial_offset, tl.sum(acc_dw, axis=0), mask=col_mask)
        if N_PARAMS == 2:
            tl.store(PartialB + partial_offset, tl.sum(acc_db, axis=0), mask=col_mask)


@triton.jit
def _reduce_partials_kernel(
    Partial, Grads, SqPartial, SqNorms, Ticket, Offsets,
    n_examples, n_chunks, width, rows_per_chunk, n_slots,
    N_PARAMS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SEGMENTED: tl.constexpr,
):  # fmt: skip
    """For a block of columns and each parameter p: dγ_b = Σ_c Partial[p, b, c] (c in
    order), Grads[p] = Σ_b dγ_b, SqPartial[b, p, block] = Σ_{d in block} dγ_b[d]².
    The last program to finish sums SqPartial over blocks: SqNorms[b, p] = |dγ_b|².

    SEGMENTED (examples given by Offsets, partials by `_norm_bwd_documents_kernel`):
    example b's partials are the contiguous slots offsets[b]//C + b, … of Partial[p]
    ((n_slots, D) per parameter), one per chunk its rows meet, none if it is empty."""
    block = tl.program_id(0)
    n_blocks = tl.num_programs(0)
    cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < width
    for p in tl.static_range(N_PARAMS):
        total = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for first_example in range(0, n_examples, BLOCK_B):
            examples = first_example + tl.arange(0, BLOCK_B)
            per_example = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
            if SEGMENTED:
                in_range = examples < n_examples
                starts = tl.load(Offsets + examples, mask=in_range, other=0)
                ends = tl.load(Offsets + examples + 1, mask=in_range, other=0)
                first_slots = p * n_slots + starts // rows_per_chunk + examples  # (BLOCK_B,)
                n_pieces = tl.where(
                    ends > starts, (ends - 1) // rows_per_chunk - starts // rows_per_chunk + 1, 0
                )
                for first_chunk in range(0, tl.max(n_pieces, axis=0), BLOCK_C):
                    chunks = first_chunk + tl.arange(0, BLOCK_C)
                    rows = first_slots[:, None] + chunks[None, :]  # (BLOCK_B, BLOCK_C) slots
                    offsets = rows.to(tl.int64)[:, :, None] * width + cols[None, None, :]
                    mask = (chunks[None, :] < n_pieces[:, None])[:, :, None] & col_mask[None, None, :]
                    per_example += tl.sum(tl.load(Partial + offsets, mask=mask, other=0.0), axis=1)
            else:
                for first_chunk in range(0, n_chunks, BLOCK_C):
                    chunks = first_chunk + tl.arange(0, BLOCK_C)
                    rows = (p * n_examples + examples)[:, None] * n_chunks + chunks[
                        None, :
                    ]  # (BLOCK_B, BLOCK_C)
                    offsets = rows.to(tl.int64)[:, :, None] * width + cols[None, None, :]
                    mask = ((examples < n_examples)[:, None] & (chunks < n_chunks)[None, :])[:, :, None]
                    mask = mask & col_mask[None, None, :]
                    per_example += tl.sum(tl.load(Partial + offsets, mask=mask, other=0.0), axis=1)
            total += tl.sum(per_example, axis=0)
            sq_offsets = (examples * 2 + p) * n_blocks + block
            tl.store(
                SqPartial + sq_offsets, tl.sum(per_example * per_example, axis=1), mask=examples < n_examples
            )
        tl.store(Grads + p * width + cols, total.to(Grads.dtype.element_ty), mask=col_mask)

    # The atomic is a ticket only (acq_rel: this program's stores above are visible to
    # whoever draws the last ticket); the sums below run in a fixed order.
    if tl.atomic_add(Ticket, 1) == n_blocks - 1:
        pairs = tl.arange(0, 2)  # p
        for first_example in range(0, n_examples, BLOCK_B):
            examples = first_example + tl.arange(0, BLOCK_B)
            rows = examples[:, None] * 2 + pairs[None, :]  # (BLOCK_B, 2): index b·2 + p
            row_mask = (examples < n_examples)[:, None] & (pairs < N_PARAMS)[None, :]
            acc = tl.zeros((BLOCK_B, 2), dtype=tl.float32)
            for first_block in range(0, n_blocks, BLOCK_N):
                blocks = first_block + tl.arange(0, BLOCK_N)
                mask = row_mask[:, :, None] & (blocks < n_blocks)[None, None, :]
                offsets = rows[:, :, None] * n_blocks + blocks[None, None, :]
                acc += tl.sum(
                    tl.load(SqPartial + offsets, mask=mask, other=0.0, cache_modifier=".cg"), axis=2
                )
            tl.store(SqNorms + rows, acc, mask=(examples < n_examples)[:, None])
        tl.atomic_xchg(Ticket, 0)  # ready for another backward through the same buffers


# ----------------------------------------------------------------------------- launchers


# Device types whose compiled kernels the launchers run directly after the first launch
# (`benchmarks/bench_norm_host.py --stub-launch` adds "cpu", with a stub `_compile`: a CPU proxy
# of the host cost).
DIRECT_LAUNCH_DEVICES = {"cuda"}


def _compile(kernel, grid, args, constexprs, num_warps):
    """A launch through Triton: `kernel[grid]` specializes on the arguments, compiles (or finds)
    the kernel and launches it; returns the compiled kernel, which later launches run directly."""
    return kernel[grid](*args, **constexprs, num_warps=num_warps)


class _CachedLauncher:
    """Launch a `@triton.jit` kernel with a fraction of `JITFunction.run`'s host cost.

    `kernel[grid](...)` re-derives the kernel's specialization from every argument on
    each call: about 30-100 µs of Python a launch on the H100 machine, which dominated
    a fwd+bwd at D <= 4096 (three launches). The first call for a given key goes through
    `kernel[grid]`, which compiles and returns the compiled kernel; later calls launch
    it directly, the way `JITFunction.run` does at its end. The key is finer than
    Triton's own specialization (dtype and 16-byte alignment of every pointer; ==1,
    %16 and int32 range of every int; every constexpr; num_warps; device), so a cached
    kernel is only reused where Triton would pick the same one. Off under
    TRITON_INTERPRET=1, with HF_GNS_FAST_LAUNCH=0, or after any error in the direct path.

    A caller that knows what determines all of that (the launchers below: shapes, strides,
    dtypes and the alignment of the tensors they did not allocate themselves, fresh CUDA
    allocations being 512-byte aligned) passes it as `key=` and skips the per-argument
    walk, a third of a launch's host time (`call_key` is that walk, for tests).
    """

    enabled = os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("HF_GNS_FAST_LAUNCH", "1") != "0"

    def __init__(self, kernel):
        self.kernel = kernel
        params = getattr(kernel, "params", [])  # the interpreter's kernels have none
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        self.compiled = {}  # key -> (compiled kernel, its constexpr arguments in order)

    @staticmethod
    def _spec(arg):
        if isinstance(arg, torch.Tensor):
            return arg.dtype, arg.data_ptr() % 16 == 0
        if isinstance(arg, bool) or arg is None:
            return arg
        if isinstance(arg, int):
            return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
        return type(arg)

    def call_key(self, args, num_warps, constexprs) -> tuple:
        """The key derived from every argument (used when the caller gives none)."""
        return (num_warps, *constexprs.values(), *map(self._spec, args))

    def __call__(self, grid, args, num_warps, key=None, **constexprs):
        if not _CachedLauncher.enabled or not args[0].is_cuda:
            _compile(self.kernel, grid, args, constexprs, num_warps)
            return
        device = args[0].device.index
        key = (device, self.call_key(args, num_warps, constexprs) if key is None else key)
        entry = self.compiled.get(key)
        if entry is None or device != torch._C._cuda_getDevice():
            compiled = _compile(self.kernel, grid, args, constexprs, num_warps)
            self.compiled[key] = (compiled, tuple(constexprs[name] for name in self.constexpr_names))
            return
        compiled, constexpr_args = entry
        all_args = (*args, *constexpr_args)
        grid = (*grid, 1, 1)
        try:
            stream = torch._C._cuda_getCurrentRawStream(device)
            enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
            metadata = None if enter is None else compiled.launch_metadata(grid, stream, *all_args)
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                         metadata, enter, leave, *all_args)  # fmt: skip
        except (AttributeError, TypeError) as error:  # a Triton whose launch protocol differs
            _CachedLauncher.enabled = False
            warnings.warn(
                f"hf_gns: direct Triton launch unavailable ({error}); using kernel[grid]", stacklevel=2
            )
            self.kernel[grid[:3]](*args, **constexprs, num_warps=num_warps)


def _cdiv(a: int, b: int) -> int:
    # on every launch: `triton.cdiv` is a constexpr_function in recent Triton, ~10 µs a Python call
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _dtype(tensor: torch.Tensor | None) -> torch.dtype | None:
    return None if tensor is None else tensor.dtype


def _aligned(*tensors: torch.Tensor | None) -> tuple[bool | None, ...]:
    """16-byte alignment of each tensor's data (what Triton specializes pointers on); None for None."""
    return tuple(None if t is None else t.data_ptr() % 16 == 0 for t in tensors)


def _as_rows(t: torch.Tensor, n_examples: int) -> torch.Tensor:
    """View `t` as (B, R, D) with unit stride on D, copying only when no such view exists."""
    t3 = t.reshape(n_examples, -1, t.shape[-1])
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


@dataclasses.dataclass(frozen=True)
class BackwardOptions:
    """Compile-time variants of the dense backward kernel (`_norm_bwd_kernel`'s docstring says what
    each does); the defaults give the kernel as first tuned. None changes the reduction order of
    the partial sums or uses atomics: results stay bitwise deterministic run to run.

    Args:
        one_reduction (`bool`, *optional*, defaults to `False`):
            LayerNorm's two row sums in one `tl.reduce` (no effect on RMSNorm).
        prefetch (`bool`, *optional*, defaults to `False`):
            Load the next tile of rows before computing the current one.
        loop_stages (`int`, *optional*, defaults to 0):
            `num_stages` of the row loop's `tl.range` (0: a plain loop, no pipelining); not with `prefetch`.
        evict_first (`bool`, *optional*, defaults to `False`):
            Evict-first L2 hints on the x and dy loads and the dx stores.
    """

    one_reduction: bool = False
    prefetch: bool = False
    loop_stages: int = 0
    evict_first: bool = False

    def __post_init__(self):
        if self.loop_stages < 0 or (self.prefetch and self.loop_stages):
            raise ValueError(f"loop_stages must be >= 0, and 0 with prefetch: {self}")

    def constexprs(self) -> dict[str, bool | int]:
        """The kernel's constexpr arguments, in its signature's order."""
        return {
            "ONE_REDUCTION": self.one_reduction, "PREFETCH": self.prefetch,
            "LOOP_STAGES": self.loop_stages, "EVICT_FIRST": self.evict_first,
        }  # fmt: skip


DEFAULT_BACKWARD_OPTIONS = BackwardOptions()

# Tuned tiles by BLOCK_D (the next power of two of D), as `benchmarks/tune_norm_kernels.py`
# prints them; a BLOCK_D not listed uses the rules in `forward_config` / `backward_config`.
# Tuned on an H200 on 2026-12-02 (B=8, T=2048, bf16, inputs cycled past L2), one entry per BLOCK_D
# good for both norms. fwd+bwd share of the copy roofline, rules -> these tiles, LayerNorm / RMSNorm:
# D=2048 70/74% -> ~80/81%, D=4096 73/77% -> ~81/82%, D=8192 71/79% -> ~86/84%. The backward's gain
# is `loop_stages=3` (Triton pipelines the row loop's loads through shared memory: two programs an
# SM kept too few bytes in flight); LayerNorm at 2048 also gains from `one_reduction`.
# BLOCK_D=1024, tuned at D=768 (GPT-2, Llama-124M) on the H200 later that day: backward LayerNorm
# 45.8% -> 57.8%, RMSNorm 52.0% -> 61.2% of the roofline with `loop_stages=4`; forward (4, 4)
# instead of (8, 4): 66 -> 68% / 73 -> 76% (`benchmarks/results/tune_norm_kernels_h200_20261202d_*768.txt`).
FORWARD_TILES: dict[int, tuple[int, int]] = {1024: (4, 4), 8192: (1, 8)}  # BLOCK_D: (BLOCK_M, num_warps)
# BLOCK_D: (BLOCK_M, num_warps, waves of programs) or (..., BackwardOptions(...)). Applied only on
# GPUs with the H200's shared memory a block (`_takes_tuned_backward`): 3 stages of x and dy rows
# need up to 96 KB at D=8192, more than smaller parts have.
BACKWARD_TILES: dict[int, tuple] = {
    1024: (2, 4, 4, BackwardOptions(one_reduction=True, loop_stages=4)),  # bwd LN 57.8%, RMS 61.2%
    2048: (2, 4, 2, BackwardOptions(one_reduction=True, loop_stages=3)),  # bwd LN 77.1%
    4096: (1, 8, 2, BackwardOptions(loop_stages=3)),  # bwd LN 76.3%, RMS 77.5%
    8192: (1, 16, 2, BackwardOptions(loop_stages=3)),  # bwd LN 82.6%
}
# Shared memory a block (opt-in) of the GPU BACKWARD_TILES were tuned on (H100/H200: 227 KB).
_TUNED_SHARED_MEMORY = 200 * 1024


@functools.lru_cache(maxsize=256)
def forward_config(width: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_D columns, num_warps) for one program's tile.

    From `benchmarks/tune_norm_kernels.py` on an H100 (bf16, B·T = 16K rows): narrow
    an 8K-element tile (D=768: 8 rows, D=4096: 2, D=8192: 1) with a warp per 512 columns
    and at least 4 (D=4096: 8 warps, D=8192: 16).
    """
    block_d = triton.next_power_of_2(width)
    block_m = max(1, min(16, 8192 // block_d))
    num_warps = max(4, min(16, block_d // 512))
    block_m, num_warps = FORWARD_TILES.get(block_d, (block_m, num_warps))
    return block_m, block_d, num_warps


@functools.lru_cache(maxsize=1024)
def backward_config(width: int, n_examples: int, rows_per_example: int, device: torch.device):
    """(BLOCK_M, BLOCK_D, num_warps, rows_per_chunk, n_chunks, options) for the backward grid;
    `options` (`BackwardOptions`) are the dense kernel's variants (the padding-free one has none).

    A tile of about 4K elements, 8 a thread (16 at D <= 1024): each program keeps two
    fp32 (BLOCK_M, BLOCK_D) accumulators in registers. Tuned on an H100 with
    `benchmarks/tune_norm_kernels.py`. The grid is (B, n_chunks), with n_chunks chosen
    for about two waves of programs: each program's partial sums cost a (D,) fp32 write
    and read, so more programs than that buy latency hiding with extra bytes.
    """
    block_d = triton.next_power_of_2(width)
    block_m = max(1, 4096 // block_d)
    num_warps = 4 if block_d <= 1024 else min(16, block_m * block_d // 512)
    tuned = BACKWARD_TILES.get(block_d) if _takes_tuned_backward(device) else None
    block_m, num_warps, waves, *options = tuned or (block_m, num_warps, 2)
    options = options[0] if options else DEFAULT_BACKWARD_OPTIONS
    max_chunks = triton.cdiv(rows_per_example, block_m)
    programs = _target_programs(device) * waves // 2  # _target_programs is two waves
    n_chunks = max(1, min(max_chunks, triton.cdiv(programs, n_examples)))
    rows_per_chunk = triton.cdiv(triton.cdiv(rows_per_example, n_chunks), block_m) * block_m
    n_chunks = triton.cdiv(rows_per_example, rows_per_chunk)
    return block_m, block_d, num_warps, rows_per_chunk, n_chunks, options


@functools.lru_cache(maxsize=1024)
def reduce_config(width: int, n_examples: int, n_chunks: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_D, num_warps) for the partial-sum reduction.

    Narrow column blocks (16 or 32 fp32: at least 128 programs at D >= 2048) give many
    programs, and a 3-D tile of up to 8K elements covers all chunks of several examples
    in one load.
    """
    block_d = min(triton.next_power_of_2(width), 32 if width >= 4096 else 16)
    block_c = min(triton.next_power_of_2(n_chunks), 64)
    block_b = max(1, min(triton.next_power_of_2(n_examples), 8192 // (block_c * block_d)))
    return block_b, block_c, block_d, 4


_TICKETS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per device and stream, reset to 0 by the kernel that uses it.

    Kernels on one stream run in order, so they can share it; another stream gets its own.
    """
    # the raw stream handle: `torch.cuda.current_stream()` builds a Stream object each call
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _TICKETS[key]


@functools.lru_cache(maxsize=16)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _takes_tuned_backward(device: torch.device) -> bool:
    """Whether `BACKWARD_TILES` applies on `device`: a GPU with the shared memory a block of the one
    they were tuned on (the interpreter on CPU always: tests run the tuned kernels there)."""
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0)
    return optin >= _TUNED_SHARED_MEMORY


def _target_programs(device: torch.device) -> int:
    """Programs for the backward grid: two waves of the GPU (a fixed 64 on CPU)."""
    if device.type == "cuda":
        return 2 * _multiprocessor_count(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    return 64


def check_fused_width(width: int) -> None:
    if not 1 <= width <= MAX_FUSED_WIDTH:
        raise ValueError(
            f"hf_gns Triton norm supports 1 <= D <= {MAX_FUSED_WIDTH}, got D={width}; "
            "use the PyTorch reference (backend='torch') for wider rows."
        )


# Pieces of one example summed per load in the segmented reduction: most documents meet
# one or two chunks; a long one loops.
_DOCUMENT_PIECES_PER_LOAD = 4
