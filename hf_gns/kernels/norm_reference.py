"""Pure-PyTorch LayerNorm / RMSNorm with per-example parameter-gradient norms.

This is the CPU fallback of the fused op and the readable statement of what the Triton
kernels in `norm_triton.py` compute. Forward and backward are written out explicitly
(no autograd) so that the backward can emit, besides dx, dγ and dβ, the per-example
squared norms of dγ and dβ.

Shapes: the input is viewed as (B, R, D): B examples, R rows per example (sequence,
heads, ...), D normalized features. With `example_offsets` (padding-free batches, where an
example is a document), the input is viewed as (N, D) instead and example e owns rows
[offsets[e], offsets[e+1]). With x̂ the normalized input, dy the incoming
gradient and w_eff = γ + weight_offset:

    LayerNorm: x̂ = (x - μ)·rstd,   RMSNorm: x̂ = x·rstd,   y = x̂ ⊙ w_eff (+ β)
    dγ_b = Σ_r dy_r ⊙ x̂_r,   dβ_b = Σ_r dy_r          (per example b)
    dγ = Σ_b dγ_b,   |dγ_b|², |dβ_b|²                  (the extra outputs)

References: Gray et al. 2024 (arXiv 2411.00999), section 3; DESIGN.md section 2.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


def compute_dtype_for(x: torch.Tensor, upcast: bool = True) -> torch.dtype:
    """fp32 for low-precision inputs (fp64 stays fp64); the input dtype when `upcast=False`."""
    if not upcast:
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _normalize(x, mean, rstd, rms: bool):
    """x̂ in the compute dtype; `mean` is unused for RMSNorm."""
    return x * rstd if rms else (x - mean) * rstd


def _round_like_input(xhat: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    """Llama-style norms cast x̂ to the input dtype before the weight product."""
    return xhat.to(input_dtype).to(xhat.dtype)


def norm_forward_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    weight_offset: float = 0.0,
    cast_before_weight: bool = False,
    out_dtype: torch.dtype | None = None,
    upcast: bool = True,
):
    """Forward of the norm over the last dim of `x` (any leading shape).

    Returns `(y, mean, rstd)`: `y` of `x.shape` in `out_dtype` (defaults to `x.dtype`),
    `mean` and `rstd` of shape `x.shape[:-1]` in the compute dtype (`mean` is empty for
    RMSNorm).
    """
    cdt = compute_dtype_for(x, upcast)
    xc = x.to(cdt)
    if rms:
        mean = x.new_empty(0, dtype=cdt)
        var = xc.square().mean(-1)
    else:
        mean = xc.mean(-1)
        var = (xc - mean.unsqueeze(-1)).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    xhat = _normalize(xc, None if rms else mean.unsqueeze(-1), rstd.unsqueeze(-1), rms)
    if cast_before_weight:
        xhat = _round_like_input(xhat, x.dtype)
    y = xhat
    if weight is not None:
        y = y * (weight.to(cdt) + weight_offset)
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(out_dtype or x.dtype), mean, rstd


def check_example_offsets(example_offsets: torch.Tensor, n_rows: int) -> None:
    """Clear errors for offsets that cannot describe row ranges of an (N, D) input.

    Shape and dtype only on accelerators (the values would cost a host-device sync); on CPU
    also the values: offsets[0] == 0, non-decreasing, offsets[-1] == N.
    """
    if example_offsets.dim() != 1 or example_offsets.numel() < 2 or example_offsets.dtype != torch.int64:
        raise ValueError(
            "example_offsets must be a 1-D int64 tensor (E+1,) of row offsets, got "
            f"{example_offsets.dtype} of shape {tuple(example_offsets.shape)}"
        )
    # real CPU tensors only: a traced (fake) tensor has no values to read
    if example_offsets.device.type == "cpu" and not is_fake(example_offsets):
        first, last = int(example_offsets[0]), int(example_offsets[-1])
        if first != 0 or last != n_rows or bool((example_offsets.diff() < 0).any()):
            raise ValueError(
                f"example_offsets must rise from 0 to the input's {n_rows} rows without decreasing, "
                f"got {example_offsets.tolist()}"
            )


def segment_sums(rows: torch.Tensor, example_offsets: torch.Tensor) -> torch.Tensor:
    """(E, D): Σ of rows[offsets[e]:offsets[e+1]] for each e (zeros for empty ranges), for rows (N, D).

    A segmented reduction: each example's rows are summed in a fixed order (no atomics, no
    host sync), so results are deterministic on every device.
    """
    return torch.segment_reduce(rows, "sum", offsets=example_offsets, axis=0, unsafe=True)


def norm_backward_reference(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
    rms: bool,
    weight_offset: float = 0.0,
    cast_before_weight: bool = False,
    upcast: bool = True,
    param_grads: bool = True,
    example_offsets: torch.Tensor | None = None,
):
    """Backward of `norm_forward_reference`, with per-example squared norms.

    Example b is `x[b]`; every other leading dim belongs to it. Returns
    `(dx, dw, db, sq_norms)`: `dx` like `x`; `dw` like `weight` (None without weight);
    `db` in `weight`'s dtype (None without bias); `sq_norms` of shape (B, 2), fp32 (fp64
    for fp64 inputs): column 0 is |dγ_b|², column 1 is |dβ_b|² (zeros where absent).
    `param_grads=False` (frozen γ and β, no sink) skips dw, db and the norms.

    `example_offsets` (int64 (E+1,), *optional*): examples are row ranges of `x` viewed as
    (N, D) instead of dim 0: example e (a document of a padding-free batch) owns rows
    [offsets[e], offsets[e+1]), and `sq_norms` is (E, 2). The offsets must cover all N rows.
    """
    if example_offsets is not None:
        return _norm_backward_documents(
            dy, x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight, upcast,
            param_grads, example_offsets,
        )  # fmt: skip
    cdt = compute_dtype_for(x, upcast)
    n_examples, width = x.shape[0], x.shape[-1]
    x3 = x.reshape(n_examples, -1, width).to(cdt)  # (B, R, D)
    dy3 = dy.reshape(n_examples, -1, width).to(cdt)  # (B, R, D)
    rstd3 = rstd.reshape(n_examples, -1, 1).to(cdt)  # (B, R, 1)
    mean3 = None if rms else mean.reshape(n_examples, -1, 1).to(cdt)
    xhat = _normalize(x3, mean3, rstd3, rms)  # (B, R, D)

    w_eff = 1.0 if weight is None else weight.to(cdt) + weight_offset
    g = dy3 * w_eff  # dL/dx̂, (B, R, D)
    proj = (g * xhat).mean(-1, keepdim=True)  # (B, R, 1)
    centred = g - xhat * proj if rms else g - g.mean(-1, keepdim=True) - xhat * proj
    dx = (centred * rstd3).to(x.dtype).reshape(x.shape)

    sq_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    sq_norms = torch.zeros(n_examples, 2, dtype=sq_dtype, device=x.device)
    dw = db = None
    if weight is not None and param_grads:
        xhat_w = _round_like_input(xhat, x.dtype) if cast_before_weight else xhat
        dw_per_example = (dy3 * xhat_w).sum(1)  # (B, D)
        dw = dw_per_example.sum(0).to(weight.dtype)
        sq_norms[:, 0] = dw_per_example.square().sum(-1).to(sq_dtype)
        if has_bias:
            db_per_example = dy3.sum(1)  # (B, D)
            db = db_per_example.sum(0).to(weight.dtype)
            sq_norms[:, 1] = db_per_example.square().sum(-1).to(sq_dtype)
    return dx, dw, db, sq_norms


def _norm_backward_documents(
    dy, x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight, upcast, param_grads, offsets
):
    """`norm_backward_reference` with examples given as row ranges of the (N, D) input."""
    width = x.shape[-1]
    n_rows = x.numel() // width
    check_example_offsets(offsets, n_rows)
    n_examples = offsets.numel() - 1
    # dx is row-wise: the whole input as one example gives it; the parameter sums are per segment
    dx, _, _, _ = norm_backward_reference(
        dy.reshape(1, n_rows, width), x.reshape(1, n_rows, width), weight, mean,
        rstd.reshape(1, n_rows), has_bias, rms, weight_offset, cast_before_weight, upcast, param_grads=False,
    )  # fmt: skip
    cdt = compute_dtype_for(x, upcast)
    sq_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    sq_norms = torch.zeros(n_examples, 2, dtype=sq_dtype, device=x.device)
    dw = db = None
    if weight is not None and param_grads:
        x2, dy2 = x.reshape(n_rows, width).to(cdt), dy.reshape(n_rows, width).to(cdt)  # (N, D)
        xhat = _normalize(
            x2, None if rms else mean.reshape(n_rows, 1).to(cdt), rstd.reshape(n_rows, 1).to(cdt), rms
        )
        if cast_before_weight:
            xhat = _round_like_input(xhat, x.dtype)
        dw_per_example = segment_sums(dy2 * xhat, offsets)  # (E, D)
        dw = dw_per_example.sum(0).to(weight.dtype)
        sq_norms[:, 0] = dw_per_example.square().sum(-1).to(sq_dtype)
        if has_bias:
            db_per_example = segment_sums(dy2, offsets)  # (E, D)
            db = db_per_example.sum(0).to(weight.dtype)
            sq_norms[:, 1] = db_per_example.square().sum(-1).to(sq_dtype)
    return dx.reshape(x.shape), dw, db, sq_norms
