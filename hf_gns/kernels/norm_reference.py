"""Pure-PyTorch LayerNorm / RMSNorm with per-example parameter-gradient norms.

This is the CPU fallback of the fused op and the readable statement of what the Triton
kernels in `norm_triton.py` compute. Forward and backward are written out explicitly
(no autograd) so that the backward can emit, besides dx, dγ and dβ, the per-example
squared norms of dγ and dβ.

Shapes: the input is viewed as (B, R, D): B examples, R rows per example (sequence,
heads, ...), D normalized features. With x̂ the normalized input, dy the incoming
gradient and w_eff = γ + weight_offset:

    LayerNorm: x̂ = (x - μ)·rstd,   RMSNorm: x̂ = x·rstd,   y = x̂ ⊙ w_eff (+ β)
    dγ_b = Σ_r dy_r ⊙ x̂_r,   dβ_b = Σ_r dy_r          (per example b)
    dγ = Σ_b dγ_b,   |dγ_b|², |dβ_b|²                  (the extra outputs)

References: Gray et al. 2024 (arXiv 2411.00999), section 3; DESIGN.md section 2.
"""

from __future__ import annotations

import torch


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
):
    """Backward of `norm_forward_reference`, with per-example squared norms.

    Example b is `x[b]`; every other leading dim belongs to it. Returns
    `(dx, dw, db, sq_norms)`: `dx` like `x`; `dw` like `weight` (None without weight);
    `db` in `weight`'s dtype (None without bias); `sq_norms` of shape (B, 2), fp32 (fp64
    for fp64 inputs): column 0 is |dγ_b|², column 1 is |dβ_b|² (zeros where absent).
    `param_grads=False` (frozen γ and β, no sink) skips dw, db and the norms.
    """
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
