"""The norm forward and backward as `torch.library.triton_op`s: what `torch.compile` runs.

Under torch.compile, AOTAutograd decomposes a triton_op into its body, so Inductor sees the
Triton kernels (through `torch.library.wrap_triton`) and launches them from its own generated
code: no Python custom-op dispatch per call (an opaque `custom_op` cost ~170-280 µs of host
time per call in a compiled GPT-2 step, issue 11). The body is therefore written to be
traceable by make_fx: torch ops, `wrap_triton` launches, shape-only Python. It uses no
`data_ptr`, no cached launcher and no global tensor: the reduction's ticket counter is a fresh
zeroed int32 per call, and every buffer a kernel writes is its own allocation (functionalized
kernels writing overlapping views of one workspace would depend on the order mutations are
replayed). Sizes the tile configs need are specialized to ints (a dynamic-shape graph gets
a guard on them).

Eager calls never come here: `norm_op`'s autograd Function calls the cached launchers of
`norm_triton.py` directly (cheaper than any op dispatch). Where the Triton path does not
apply (`use_triton` False: CPU tensors, backend "torch", fp64, very wide rows) the body is
the PyTorch reference, traced into ordinary aten ops that Inductor fuses.

The backward returns the parameter gradients stacked, (P, D) with P = 0, 1 (dγ) or 2 (dγ, dβ):
outputs of an op may not alias each other, and the reduction kernel writes both rows.
"""

from __future__ import annotations

import torch

from .norm_reference import norm_backward_reference, norm_forward_reference

try:
    import triton

    from .norm_triton import (
        _DOCUMENT_PIECES_PER_LOAD,
        _as_rows,
        _norm_bwd_documents_kernel,
        _norm_bwd_fused_kernel,
        _norm_bwd_kernel,
        _norm_fwd_kernel,
        _norm_fwd_residual_kernel,
        _reduce_partials_kernel,
        backward_config,
        check_fused_width,
        forward_config,
        reduce_config,
    )

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    TRITON_AVAILABLE = False


def _launches_triton(x: torch.Tensor, use_triton: bool) -> bool:
    """Whether the op traces the Triton launches (CUDA tensors) or the PyTorch reference. CPU tests
    of the compiled graphs (`tests/inductor_interpreted.py`) open it to CPU tensors."""
    return use_triton and x.is_cuda and TRITON_AVAILABLE


def _n_params(weight: torch.Tensor | None, has_bias: bool, param_grads: bool) -> int:
    return 0 if (weight is None or not param_grads) else (2 if has_bias else 1)


def _int(size) -> int:
    """A size as a Python int (a SymInt is specialized: configs are looked up per shape)."""
    return int(size)


# ----------------------------------------------------------------------------- forward


def norm_forward_traceable(x, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype):
    """`norm_forward_triton` through `wrap_triton`: `(y, mean, rstd)`, each a fresh tensor."""
    return _forward_launch(x, None, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype)[1:]


def norm_add_forward_traceable(
    x, residual, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype
):
    """The norm of s = x + residual, s computed by the kernel: `(s, y, mean, rstd)`, s in the promoted
    dtype of x and residual (contiguous, of one shape). What `norm_graph_pass.py` makes of a residual
    add before a compiled norm, as a function."""
    if residual.shape != x.shape or not (x.is_contiguous() and residual.is_contiguous()):
        raise ValueError("norm_add_forward_traceable: x and residual must be contiguous tensors of one shape")
    return _forward_launch(x, residual, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype)


def _forward_launch(x, residual, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype):
    width = _int(x.shape[-1])
    check_fused_width(width)
    n_examples = x.shape[0] if x.dim() > 1 else 1
    x3 = _as_rows(x, n_examples)  # (B, R, D)
    rows_per_example = x3.shape[1]
    n_rows = n_examples * rows_per_example
    total = (
        None
        if residual is None
        else torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
    )
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    mean = torch.empty(0 if rms else x.shape[:-1], dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return total, y, mean, rstd
    block_m, block_d, num_warps = forward_config(width)
    if residual is None:
        kernel, inputs = _norm_fwd_kernel, (x3,)
    else:
        kernel, inputs = (
            _norm_fwd_residual_kernel,
            (x3, _as_rows(residual, n_examples), _as_rows(total, n_examples)),
        )
    torch.library.wrap_triton(kernel)[(triton.cdiv(n_rows, block_m),)](
        *inputs, y, x3 if weight is None else weight, x3 if bias is None else bias, mean, rstd,
        x3.stride(0), x3.stride(1), n_rows, rows_per_example, width, 1.0 / width, eps, weight_offset,
        IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return total, y, mean, rstd


@torch.library.triton_op("hf_gns::fused_norm_forward", mutates_args=())
def norm_forward_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    weight_offset: float,
    cast_before_weight: bool,
    out_dtype: torch.dtype,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(y, mean, rstd)`: the Triton kernel for CUDA tensors when `use_triton`, else the reference."""
    if _launches_triton(x, use_triton):
        return norm_forward_traceable(x, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype)
    return norm_forward_reference(x, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype)


# ---------------------------------------------------------------------------- backward


def _reduce_traceable(
    partial, n_params, n_examples, n_chunks, width, dtype, offsets, rows_per_chunk, n_slots
):
    """The partial-sum reduction: `(grads (P, D) in `dtype`, sq_norms (E, 2) fp32)`."""
    segmented = offsets is not None
    pieces = _DOCUMENT_PIECES_PER_LOAD if segmented else n_chunks
    reduce_b, reduce_c, reduce_d, reduce_warps = reduce_config(width, n_examples, pieces)
    n_blocks = triton.cdiv(width, reduce_d)
    grads = torch.empty(n_params, width, dtype=dtype, device=partial.device)
    sq_partial = torch.empty(n_examples * 2 * n_blocks, dtype=torch.float32, device=partial.device)
    sq_norms = torch.empty(n_examples, 2, dtype=torch.float32, device=partial.device)
    ticket = torch.zeros(1, dtype=torch.int32, device=partial.device)  # reset by the kernel's last program
    torch.library.wrap_triton(_reduce_partials_kernel)[(n_blocks,)](
        partial, grads, sq_partial, sq_norms, ticket, partial if offsets is None else offsets,
        n_examples, n_chunks, width, rows_per_chunk, n_slots,
        N_PARAMS=n_params, BLOCK_B=reduce_b, BLOCK_C=reduce_c, BLOCK_D=reduce_d,
        BLOCK_N=min(triton.next_power_of_2(n_blocks), 1024 // reduce_b), SEGMENTED=segmented,
        num_warps=reduce_warps,
    )  # fmt: skip
    return grads, sq_norms


def norm_backward_traceable(
    dy,
    x,
    weight,
    mean,
    rstd,
    has_bias,
    rms,
    weight_offset,
    cast_before_weight,
    param_grads,
    example_offsets=None,
):
    """`norm_backward_triton` through `wrap_triton`: `(dx, grads (P, D), sq_norms (B or E, 2) fp32)`."""
    args = (x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight, param_grads)
    dx, _, grads, sq_norms = _backward_launch((dy,), None, None, *args, example_offsets)
    return dx, grads, sq_norms


def norm_backward_fused_traceable(dys, addend, narrow_dtype, *config):
    """`_norm_bwd_fused_kernel`, as the compiled graphs' pass (`norm_graph_pass.py`) launches it:
    the backward of dy = (dys[0] + dys[1]) + dys[2] (summed in fp32; one layout), dx + `addend`
    (fp32, x's shape, contiguous) and, with `narrow_dtype`, that sum rounded to it too:
    `(dx + addend, the rounded copy or None, grads (P, D), sq_norms (B, 2) fp32)`. `config`:
    `norm_backward_traceable`'s arguments after dy, up to param_grads (dense rows only)."""
    x = config[0]
    if not 1 <= len(dys) <= 3 or any(d.shape != dys[0].shape or d.stride() != dys[0].stride() for d in dys):
        raise ValueError(
            f"dys must be one to three tensors of one layout, got {[tuple(d.shape) for d in dys]}"
        )
    if addend is not None and (addend.shape != x.shape or not addend.is_contiguous()):
        raise ValueError(f"the addend must be a contiguous tensor of x's shape {tuple(x.shape)}")
    return _backward_launch(tuple(dys), addend, narrow_dtype, *config, None)


def _backward_launch(
    dys, addend, narrow_dtype, x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight,
    param_grads, example_offsets,
):  # fmt: skip
    """The backward launches: the fused kernel where there is more than one dy, an addend or a narrow
    copy of dx (dense rows only), else `_norm_bwd_kernel` or the documents kernel."""
    dy = dys[0]
    width = _int(x.shape[-1])
    n_params = _n_params(weight, has_bias, param_grads)
    segmented = example_offsets is not None
    n_examples = _int(example_offsets.shape[0] - 1 if segmented else (x.shape[0] if x.dim() > 1 else 1))
    x3 = _as_rows(x, 1 if segmented else n_examples)  # (B, R, D), or (1, N, D) for documents
    dy3 = _as_rows(dy, 1 if segmented else n_examples)
    rows_per_example = _int(x3.shape[1])
    device = x.device
    dx = torch.empty(x.shape, dtype=x.dtype, device=device)
    dx_narrow = None if narrow_dtype is None else torch.empty(x.shape, dtype=narrow_dtype, device=device)
    if x3.shape[0] * rows_per_example == 0:
        grads = torch.zeros(n_params, width, dtype=x.dtype if weight is None else weight.dtype, device=device)
        return dx, dx_narrow, grads, torch.zeros(n_examples, 2, dtype=torch.float32, device=device)

    rows = (1, rows_per_example) if segmented else (n_examples, rows_per_example)
    block_m, block_d, num_warps, rows_per_chunk, n_chunks, options = backward_config(width, *rows, device)
    n_slots = n_chunks + n_examples - 1 if segmented else n_examples * n_chunks  # partial rows per parameter
    # (slots, D) fp32 partial sums of dγ and of dβ, each its own allocation: never a view. A written
    # view at a storage offset is what torch <= 2.13's Inductor clones by reading offset + span
    # elements of a buffer sized to the view (pytorch/pytorch#192219; `linear_op._sum_and_sq_norms_op`),
    # and the same tensor twice among written arguments would be replayed one over the other by
    # functionalization. Without dβ, PartialB is an untouched placeholder.
    partial_w = torch.empty(n_slots if n_params else 1, width, dtype=torch.float32, device=device)
    partial_b = (
        torch.empty(n_slots, width, dtype=torch.float32, device=device)
        if n_params == 2
        else torch.empty(1, dtype=torch.float32, device=device)
    )
    constexprs = dict(
        IS_RMS=rms, HAS_WEIGHT=weight is not None, N_PARAMS=n_params, CAST_BEFORE_WEIGHT=cast_before_weight,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    w = x3 if weight is None else weight
    mean_arg = rstd if mean.numel() == 0 else mean  # RMSNorm: never read
    if segmented:
        offsets = example_offsets.contiguous()
        search_steps = (n_examples - 1).bit_length()
        torch.library.wrap_triton(_norm_bwd_documents_kernel)[(n_chunks,)](
            x3, dy3, w, mean_arg, rstd, dx, partial_w, partial_b, offsets, x3.stride(1), dy3.stride(1),
            rows_per_example, n_examples, rows_per_chunk, search_steps, width, 1.0 / width, weight_offset,
            **constexprs,
        )  # fmt: skip
    elif len(dys) > 1 or addend is not None or dx_narrow is not None:
        offsets = None
        extra = [_as_rows(d, n_examples) for d in dys[1:]]
        extra += [dy3] * (2 - len(extra))
        torch.library.wrap_triton(_norm_bwd_fused_kernel)[(n_examples, n_chunks)](
            x3, dy3, *extra, w, mean_arg, rstd, dx if addend is None else addend, dx,
            dx if dx_narrow is None else dx_narrow, partial_w, partial_b,
            x3.stride(0), x3.stride(1), dy3.stride(0), dy3.stride(1),
            n_examples, rows_per_example, rows_per_chunk, n_chunks, width, 1.0 / width, weight_offset,
            **constexprs, **options.constexprs(),
            N_DY=len(dys), HAS_ADDEND=addend is not None, HAS_NARROW_DX=dx_narrow is not None,
        )  # fmt: skip
    else:
        offsets = None
        torch.library.wrap_triton(_norm_bwd_kernel)[(n_examples, n_chunks)](
            x3, dy3, w, mean_arg, rstd, dx, partial_w, partial_b,
            x3.stride(0), x3.stride(1), dy3.stride(0), dy3.stride(1),
            n_examples, rows_per_example, rows_per_chunk, n_chunks, width, 1.0 / width, weight_offset,
            **constexprs, **options.constexprs(),
        )  # fmt: skip
    if n_params == 0:
        grads = torch.empty(0, width, dtype=x.dtype, device=device)
        return dx, dx_narrow, grads, torch.zeros(n_examples, 2, dtype=torch.float32, device=device)
    # the reduction reads (P, slots, D): one copy of n_slots·D fp32 for LayerNorm (~2 µs at D=2048)
    partial = partial_w[None] if n_params == 1 else torch.stack((partial_w, partial_b))
    grads, sq_norms = _reduce_traceable(
        partial, n_params, n_examples, n_chunks, width, weight.dtype, offsets, rows_per_chunk, n_slots
    )
    return dx, dx_narrow, grads, sq_norms


@torch.library.triton_op("hf_gns::fused_norm_backward", mutates_args=())
def norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
    rms: bool,
    weight_offset: float,
    cast_before_weight: bool,
    param_grads: bool,
    use_triton: bool,
    example_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dx, grads, sq_norms)`: grads (P, D) stacks dγ (and dβ), P = 0 for frozen or absent
    parameters; sq_norms (B, 2) fp32, or (E, 2) with `example_offsets`."""
    args = (dy, x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight, param_grads)
    if _launches_triton(x, use_triton):
        return norm_backward_traceable(*args, example_offsets)
    extra = {} if example_offsets is None else {"example_offsets": example_offsets}
    dx, dw, db, sq_norms = norm_backward_reference(*args[:-1], param_grads=param_grads, **extra)
    width = x.shape[-1]
    present = [g for g in (dw, db) if g is not None]
    dtype = x.dtype if weight is None else weight.dtype
    grads = torch.stack(present) if present else torch.empty(0, width, dtype=dtype, device=x.device)
    return dx, grads, sq_norms.float()
