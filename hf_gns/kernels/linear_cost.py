"""Which per-example norm method a linear layer uses: a cost model over its shapes.

For input A (B, T, K) and output gradient G (B, T, L), beyond the ordinary weight gradient:
- simultaneous: the per-example gradients G_bᵀ A_b come out of the weight-gradient matmul
  itself (same FLOPs); the extra work is writing B·K·L values and reading them back for the
  sum over examples and the squared norms (once with the Triton kernel, twice in torch):
  ~3·B·K·L element operations, memory-bound.
- ghost: the Gram matrices A_b A_bᵀ and G_b G_bᵀ, ~2·B·T²·(K + L) FLOPs, B·T² memory each.
Counting an element touched like a FLOP, simultaneous wins when 2·T²·(K + L) ≥ 3·K·L,
i.e. T² ≥ 1.5·K·L / (K + L) (DESIGN.md §2): T ≥ 24 for K = L = 768, T ≥ 31 for GPT-2's
MLP (768 → 3072), T ≥ 34 for its LM head (768 → 50257). Long sequences favour simultaneous,
short ones (and 2-D inputs, T = 1) ghost. The ghost Gram matrices grow as T²: where they
would exceed the memory cap, simultaneous (whose memory is bounded by chunking) is used.
"""

from __future__ import annotations

import math

LINEAR_METHODS = ("auto", "simultaneous", "ghost")
# Above this many bytes of Gram matrices (2·B·T² fp32), ghost is not used.
GHOST_MEMORY_CAP_BYTES = 1 << 30


def simultaneous_min_seq(in_features: int, out_features: int) -> int:
    """Smallest T at which the simultaneous method is chosen: ⌈√(1.5·K·L/(K + L))⌉."""
    return math.ceil(math.sqrt(1.5 * in_features * out_features / (in_features + out_features)))


def choose_linear_method(
    n_examples: int,
    seq: int,
    in_features: int,
    out_features: int,
    requested: str = "auto",
    ghost_memory_cap_bytes: int = GHOST_MEMORY_CAP_BYTES,
) -> str:
    """`"simultaneous"` or `"ghost"` for a layer K → L seeing `n_examples` × `seq` rows.

    Args:
        n_examples (`int`): B.
        seq (`int`): T, rows per example (1 for 2-D inputs).
        in_features (`int`): K.
        out_features (`int`): L.
        requested (`str`, *optional*, defaults to `"auto"`): a method other than `"auto"`
            is returned as is.
        ghost_memory_cap_bytes (`int`, *optional*, defaults to 1 GiB): largest Gram-matrix
            memory (2·B·T²·4 bytes) that ghost may use.
    """
    if requested not in LINEAR_METHODS:
        raise ValueError(f"linear method must be one of {LINEAR_METHODS}, got {requested!r}")
    if requested != "auto":
        return requested
    if 2 * n_examples * seq * seq * 4 > ghost_memory_cap_bytes:
        return "simultaneous"
    return "simultaneous" if seq >= simultaneous_min_seq(in_features, out_features) else "ghost"
