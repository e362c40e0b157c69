"""hf_gns: gradient noise scale as a free, always-on signal in HuggingFace training."""

__version__ = "0.1.0"

from .control import BatchSizeController
from .gns import GNSEstimator
from .kernels import fused_norm, new_sq_norm_sink, set_backend, use_backend
from .patching import (
    NormPatchError,
    NormSpec,
    PatchReport,
    patch,
    per_example_sq_norms,
    register_norm,
    unpatch,
    unregister_norm,
    zero_stats,
)

__all__ = [
    "BatchSizeControlMixin",
    "BatchSizeController",
    "GNSArguments",
    "GNSEstimator",
    "GNSMixin",
    "GNSTrainer",
    "GNSTrainingArguments",
    "NormPatchError",
    "NormSpec",
    "PatchReport",
    "fused_norm",
    "gns_config",
    "new_sq_norm_sink",
    "patch",
    "per_example_sq_norms",
    "register_norm",
    "set_backend",
    "unpatch",
    "unregister_norm",
    "use_backend",
    "zero_stats",
]


_TRAINER_NAMES = (
    "BatchSizeControlMixin",
    "GNSArguments",
    "GNSMixin",
    "GNSTrainer",
    "GNSTrainingArguments",
    "gns_config",
)


def __getattr__(name: str):
    # The trainer imports transformers: load it on first use so that `import hf_gns` (and the
    # kernels and patching layers) stays light.
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_gns' has no attribute {name!r}")
