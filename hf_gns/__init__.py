"""hf_gns: gradient noise scale as a free, always-on signal in HuggingFace training."""

__version__ = "0.1.0"

from .kernels import fused_norm, new_sq_norm_sink, set_backend, use_backend

__all__ = ["fused_norm", "new_sq_norm_sink", "set_backend", "use_backend"]
