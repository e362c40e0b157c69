"""`NormSpec`: what a norm module computes, stated in the terms of `fused_norm`.

A spec is the "flavour" of a normalization layer: LayerNorm or RMSNorm, the weight
offset (Gemma's x̂·(1+γ)), whether x̂ is rounded to the input dtype before the weight
product (Llama), and the dtype of the output. The numbers it needs at call time (ε, γ,
β) are read from the module itself, so one spec serves every instance of a class.

Output dtype rules (the part HF's many copies disagree on):
- `"input"`: `x.dtype` (Gemma, OLMo2, Cohere: `(x̂ * γ).to(input_dtype)`);
- `"promote"`: `torch.promote_types(γ.dtype, x.dtype)` (Llama: `γ * x̂.to(input_dtype)`
  gives fp32 for bf16 activations and fp32 weights);
- `"float32"`: always fp32.
On top of the rule, `autocast_op="layer_norm"` / `"rms_norm"` says the module calls that
aten op on its raw input (nn.LayerNorm, nn.RMSNorm): autocast then runs it in fp32 and
returns fp32 on the devices whose autocast policy lists the op (CUDA, not CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OUTPUT_DTYPE_RULES = ("input", "promote", "float32")
AUTOCAST_OPS = ("layer_norm", "rms_norm")
# Attributes that hold ε in torch and HF norm classes, in lookup order.
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")

_DISPATCH_KEY_SUFFIX = {
    "cuda": "CUDA",
    "xpu": "XPU",
    "mps": "MPS",
    "mtia": "MTIA",
    "maia": "MAIA",
    "cpu": "CPU",
}


def _autocast_fp32_devices(op: str) -> frozenset[str]:
    """Device types whose autocast policy has a kernel for `aten::<op>` (all of them cast it to fp32).

    Read from the dispatcher once at import so the answer fits the installed torch: newer
    versions list `rms_norm` for CUDA, older ones do not (see aten/src/ATen/autocast_mode.h).
    """
    try:
        return frozenset(
            device
            for device, suffix in _DISPATCH_KEY_SUFFIX.items()
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", f"Autocast{suffix}")
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - private API moved
        return frozenset({"cuda"})


# A plain frozenset lookup at call time, which torch.compile folds into a constant.
AUTOCAST_FP32_DEVICES = {op: _autocast_fp32_devices(op) for op in AUTOCAST_OPS}


@dataclass(frozen=True)
class NormSpec:
    """The flavour of a normalization layer, as `fused_norm` arguments.

    Args:
        rms (`bool`):
            RMSNorm (x̂ = x·rstd) instead of LayerNorm (x̂ = (x − μ)·rstd).
        weight_offset (`float`, *optional*, defaults to 0.0):
            The module scales by γ + offset; 1.0 for Gemma's x̂·(1+γ).
        cast_before_weight (`bool`, *optional*, defaults to `False`):
            x̂ is rounded to the input dtype before the weight product, as in Llama's
            `self.weight * hidden_states.to(input_dtype)`.
        output_dtype (`str`, *optional*, defaults to `"input"`):
            One of `OUTPUT_DTYPE_RULES` (see the module docstring).
        autocast_op (`str`, *optional*):
            `"layer_norm"` or `"rms_norm"` when the module applies that aten op to its raw
            input, so that autocast makes the output fp32 on devices such as CUDA.
        eps_attr (`str`, *optional*):
            The attribute holding ε. Defaults to the first of `EPS_ATTRIBUTES` the module has.
            A value of `None` there means fp32's (fp64's) machine epsilon, as in `nn.RMSNorm`.

    Example:
    ```python
    >>> gemma = NormSpec(rms=True, weight_offset=1.0)
    >>> llama = NormSpec(rms=True, cast_before_weight=True, output_dtype="promote")
    ```
    """

    rms: bool
    weight_offset: float = 0.0
    cast_before_weight: bool = False
    output_dtype: str = "input"
    autocast_op: str | None = None
    eps_attr: str | None = None

    def __post_init__(self):
        if self.output_dtype not in OUTPUT_DTYPE_RULES:
            raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPE_RULES}, got {self.output_dtype!r}")
        if self.autocast_op is not None and self.autocast_op not in AUTOCAST_OPS:
            raise ValueError(f"autocast_op must be None or one of {AUTOCAST_OPS}, got {self.autocast_op!r}")

    def describe(self) -> str:
        """A short label for reports, e.g. `"RMSNorm γ+1 out=input"`."""
        parts = ["RMSNorm" if self.rms else "LayerNorm"]
        if self.weight_offset:
            parts.append(f"γ+{self.weight_offset:g}")
        if self.cast_before_weight:
            parts.append("cast-x̂")
        parts.append(f"out={self.output_dtype}")
        if self.autocast_op:
            parts.append("autocast→fp32")
        return " ".join(parts)

    def autocasts_to_fp32(self, x: torch.Tensor) -> bool:
        """Whether autocast, if active for `x`'s device, makes this norm compute and return fp32."""
        return autocasts_to_fp32(self.autocast_op, x)

    def result_dtype(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
        """The dtype the original module returns for input `x`."""
        return result_dtype(self.output_dtype, self.autocast_op, x, weight)

    def resolve_eps(self, eps: float | None, x: torch.Tensor) -> float:
        """ε as a float (see `resolve_eps`)."""
        return resolve_eps(eps, x)


# The rules as functions of the spec's fields, for the compiled forward (`forward.py`), which
# reads a tuple of the fields instead of the spec: under torch.compile every method called on
# an object adds guards on it, and a spec shared by 25 norms an identity guard per norm.


def autocasts_to_fp32(autocast_op: str | None, x: torch.Tensor) -> bool:
    """Whether autocast, if active for `x`'s device, makes a norm calling `autocast_op` compute
    and return fp32."""
    if autocast_op is None or not torch.is_autocast_enabled(x.device.type):
        return False
    return x.device.type in AUTOCAST_FP32_DEVICES[autocast_op]


def result_dtype(
    output_dtype: str, autocast_op: str | None, x: torch.Tensor, weight: torch.Tensor | None
) -> torch.dtype:
    """The dtype a norm with these spec fields returns for input `x`."""
    if autocasts_to_fp32(autocast_op, x):
        return torch.float32
    if output_dtype == "float32":
        return torch.float32
    if output_dtype == "promote" and weight is not None:
        return torch.promote_types(weight.dtype, x.dtype)
    return x.dtype


def resolve_eps(eps: float | None, x: torch.Tensor) -> float:
    """ε as a float; `None` means, as in `F.rms_norm`, the machine epsilon of its compute
    dtype: fp32 for fp32/bf16/fp16 inputs (aten's opmath type), fp64 for fp64."""
    if eps is not None:
        return float(eps)
    return torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
