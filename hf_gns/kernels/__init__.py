"""Norm kernels with per-example gradient norms. Imports torch and triton only."""

from .norm_op import (
    BACKENDS,
    TRITON_AVAILABLE,
    fused_norm,
    get_backend,
    new_sq_norm_sink,
    set_backend,
    use_backend,
)
from .norm_reference import norm_backward_reference, norm_forward_reference

__all__ = [
    "BACKENDS",
    "TRITON_AVAILABLE",
    "fused_norm",
    "get_backend",
    "new_sq_norm_sink",
    "norm_backward_reference",
    "norm_forward_reference",
    "set_backend",
    "use_backend",
]
