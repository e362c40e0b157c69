"""Liger-Kernel's norms, read as `NormSpec`s, so that hf_gns's fused op can take them over.

Liger (linkedin/Liger-Kernel, read at 0.8.5) replaces norm layers in two ways:
- by class: `apply_liger_kernel_to_<model>()` swaps the modeling module's norm class for
  `LigerRMSNorm` / `LigerLayerNorm`, so models built afterwards hold Liger modules;
- per instance (what the Trainer does for `use_liger_kernel=True`, through
  `_apply_liger_kernel_to_instance`): the HF norm keeps its class, gets the attributes
  `offset`, `casting_mode`, `variance_epsilon`, `in_place`, `row_mode` and
  `module.__dict__["forward"] = LigerRMSNorm.forward` (`LigerLayerNorm.forward`).

Either way the module computes Liger's function of its attributes, which maps onto
`fused_norm` (liger_kernel/ops/rms_norm.py, `_rms_norm_forward_kernel`):
- `casting_mode="llama"`: rstd in fp32, x̂ rounded to the input dtype, then × (offset + γ):
  `cast_before_weight=True`;
- `"gemma"`: everything in fp32, one rounding at the end: `cast_before_weight=False`;
- `"none"`: everything in the input dtype; the fused op computes in fp32 (more exact, not
  bitwise Liger's);
- the output always has the input's dtype (`Y = torch.empty(..., dtype=X.dtype)`);
- `in_place` (dx written into dy's buffer) and `row_mode` are kernel choices, not math.
`LigerLayerNorm` is (x − μ)·rstd·γ + β in fp32, returned in the input dtype, with ε in
`variance_epsilon`. Liger's kernels need a GPU (or TRITON_INTERPRET=1), so these specs are
taken from the attributes rather than confirmed by the probe; the tests compare them with
Liger's kernels under the interpreter.

Nothing here imports liger_kernel: modules and forwards are recognised by where they are
defined, so hf_gns works the same with Liger absent.
"""

from __future__ import annotations

from torch import nn

from .spec import NormSpec
from .state import instance_forward

_LIGER_PACKAGE = "liger_kernel"
_RMS_CLASS, _LAYER_NORM_CLASS = "LigerRMSNorm", "LigerLayerNorm"
_CAST_BEFORE_WEIGHT = {"llama": True, "gemma": False, "none": False, 0: True, 1: False, -1: False}


def _from_liger(obj: object) -> bool:
    return getattr(obj, "__module__", "").split(".")[0] == _LIGER_PACKAGE


def liger_kind(module: nn.Module) -> str | None:
    """`"LigerRMSNorm"` / `"LigerLayerNorm"` when `module` runs exactly that Liger forward (its class's
    own, or bound on the instance), else None (subclasses that override it go to the probe)."""
    forward = instance_forward(module)
    if forward is None:  # the class's forward: Liger's own, not a subclass's override of it
        forward = type(module).forward
    if not _from_liger(forward):
        return None
    owner = getattr(forward, "__qualname__", "").split(".")[0]
    return owner if owner in (_RMS_CLASS, _LAYER_NORM_CLASS) else None


def liger_norm_spec(module: nn.Module) -> NormSpec | str | None:
    """The `NormSpec` of a module that runs Liger's norm, the reason it has none, or None if it
    does not run Liger's norm at all."""
    kind = liger_kind(module)
    if kind is None:
        return None
    if kind == _LAYER_NORM_CLASS:
        return NormSpec(rms=False, output_dtype="input", eps_attr="variance_epsilon")
    casting_mode = getattr(module, "casting_mode", "llama")
    if casting_mode not in _CAST_BEFORE_WEIGHT:
        return f"Liger RMSNorm with unknown casting_mode {casting_mode!r}"
    return NormSpec(
        rms=True,
        weight_offset=float(getattr(module, "offset", 0.0)),
        cast_before_weight=_CAST_BEFORE_WEIGHT[casting_mode],
        output_dtype="input",
        eps_attr="variance_epsilon",
    )
