"""Patching any HF causal LM's norm layers onto the fused op, and the statistics it yields."""

from .kinds import KINDS, module_kind
from .layers import layer_tracking_enabled, set_layer_tracking
from .model_hook import prepare_sinks
from .patcher import NormPatchError, patch, unpatch
from .registry import register_norm, unregister_norm
from .report import (
    PatchedLayer,
    PatchedModule,
    PatchedNorm,
    PatchReport,
    SkippedLayer,
    SkippedModule,
    SkippedNorm,
    UntrackedParameter,
)
from .spec import NormSpec
from .stats import (
    IncompleteStatistics,
    IncompleteStatisticsError,
    check_step_statistics,
    example_sq_norm_sums,
    per_example_sq_norms,
    tracked_parameter_names,
    untracked_among,
    zero_stats,
)

__all__ = [
    "KINDS",
    "IncompleteStatistics",
    "IncompleteStatisticsError",
    "NormPatchError",
    "NormSpec",
    "PatchReport",
    "PatchedLayer",
    "PatchedModule",
    "PatchedNorm",
    "SkippedLayer",
    "SkippedModule",
    "SkippedNorm",
    "UntrackedParameter",
    "check_step_statistics",
    "example_sq_norm_sums",
    "layer_tracking_enabled",
    "module_kind",
    "patch",
    "per_example_sq_norms",
    "prepare_sinks",
    "register_norm",
    "set_layer_tracking",
    "tracked_parameter_names",
    "untracked_among",
    "unpatch",
    "unregister_norm",
    "zero_stats",
]
