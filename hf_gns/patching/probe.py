"""The numerical probe: which `NormSpec`, if any, reproduces a module's forward.

The original forward and each candidate spec (run through `fused_norm`, exactly as the
patched module will run) see the same random inputs, on a copy of the module whose
γ and β are the module's own plus a random perturbation (ones-initialized and
zeros-initialized weights would otherwise hide offset and LayerNorm/RMSNorm differences).
Probe configurations, on the module's device:

- weights in fp32 and bf16 × inputs in fp32 and bf16 × 2-D (B, D) and 3-D (B, T, D)
  inputs; mixed fp32-weight / bf16-input pairs tell Llama's promote-and-cast-x̂ apart
  from Gemma/OLMo2's cast-at-the-end;
- fp32 weights under autocast (bf16) on the module's device type;
- rows of very different scale (1e-3 … 10), so ε matters for some rows and a wrong ε
  attribute is caught.

A candidate is accepted when it matches in every configuration where the original ran:
same dtype and shape, every element within one bf16 ulp (relative 2⁻⁷) and all but 1%
within a tight tolerance (fp32 outputs: 1e-5 relative; bf16 outputs: 2⁻⁸ relative).
The 1% slack absorbs rare one-ulp flips where a rounding sits on a tie boundary; a wrong
flavour differs almost everywhere. Candidates that fail are dropped as soon as they fail,
so a registered spec costs a handful of tiny forwards.

Limit: the probe sees autocast only on the device the module is on. A class that calls
F.layer_norm / F.rms_norm on its raw input returns fp32 under CUDA autocast; probed on
CPU that cannot be seen. Register such classes with `autocast_op`.

Randomness comes from a private generator: patching never moves the global RNG.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .forward import norm_bias, run_norm
from .spec import NormSpec

_ROWS_2D = 4
_SHAPE_3D = (2, 3)
_LOOSE_RTOL = 2.0**-7 * 1.01  # one bf16 ulp, worst case
_LOOSE_ATOL = 1e-5
_TIGHT = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2.0**-8 * 1.01, 1e-6)}
_OUTLIER_FRACTION = 0.01


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of `probe_norm`: the accepted spec, or `None` with the reason."""

    spec: NormSpec | None
    reason: str = ""
    dtypes: frozenset | None = None  # weight dtypes the spec is verified for; None: all


# A spec that matches with fp32 weights only (NemotronLayerNorm1P rounds 1+γ to bf16 with bf16
# weights) serves fp32/fp64 weights; the others take the per-example call (`forward.py`).
FP32_WEIGHT_DTYPES = frozenset({torch.float32, torch.float64})


@dataclass(frozen=True)
class _Config:
    weight_dtype: torch.dtype
    input_dtype: torch.dtype
    leading_shape: tuple[int, ...]
    autocast: bool = False

    def describe(self) -> str:
        dims = f"{len(self.leading_shape) + 1}-D"
        where = ", autocast" if self.autocast else ""
        return f"{_short(self.input_dtype)} input, {_short(self.weight_dtype)} weight, {dims}{where}"


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fallback_candidates() -> list[NormSpec]:
    """Every flavour the structural fallback may accept, in order of preference."""
    return [
        NormSpec(rms=rms, weight_offset=offset, cast_before_weight=cast, output_dtype=out)
        for rms, offset, cast, out in itertools.product(
            (True, False), (0.0, 1.0), (False, True), ("input", "promote", "float32")
        )
    ]


def _configs(device: torch.device) -> list[_Config]:
    configs = [
        _Config(w, x, shape)
        for w, x, shape in itertools.product(
            (torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16), ((_ROWS_2D,), _SHAPE_3D)
        )
    ]
    if torch.amp.is_autocast_available(device.type):
        configs += [
            _Config(torch.float32, x, _SHAPE_3D, autocast=True) for x in (torch.float32, torch.bfloat16)
        ]
    return configs


def _perturbed_copies(module: nn.Module, generator: torch.Generator) -> dict[torch.dtype, nn.Module]:
    """fp32 and bf16 copies of `module` with γ (and β) moved off their initial values."""
    base = copy.deepcopy(module).float()
    with torch.no_grad():
        for param in (base.weight, norm_bias(base)):
            if param is not None:
                noise = torch.randn(param.shape, generator=generator, device=param.device)
                param.add_(0.5 * noise)
    return {torch.float32: base, torch.bfloat16: copy.deepcopy(base).to(torch.bfloat16)}


def _probe_input(config: _Config, width: int, device, generator: torch.Generator) -> torch.Tensor:
    """Rows with a random shift and a scale spread over 1e-3 … 10 (some rows dominated by ε)."""
    shape = (*config.leading_shape, width)
    x = torch.randn(shape, generator=generator, device=device)
    n_rows = math.prod(config.leading_shape)
    log_scale = torch.linspace(-3.0, 1.0, n_rows, device=device).reshape(*config.leading_shape, 1)
    shift = torch.randn((*config.leading_shape, 1), generator=generator, device=device)
    return (x * 10.0**log_scale + shift * 10.0**log_scale).to(config.input_dtype)


def _context(config: _Config, device: torch.device):
    if config.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _mismatch(expected: torch.Tensor, actual: torch.Tensor) -> tuple[float, str | None]:
    """(max abs error, why `actual` does not reproduce `expected` or `None` if it does)."""
    if actual.dtype != expected.dtype:
        return math.inf, f"output dtype {_short(actual.dtype)} instead of {_short(expected.dtype)}"
    if actual.shape != expected.shape:
        return math.inf, f"output shape {tuple(actual.shape)} instead of {tuple(expected.shape)}"
    ref, out = expected.double(), actual.double()
    if not torch.equal(torch.isfinite(ref), torch.isfinite(out)):
        return math.inf, "non-finite values differ"
    finite = torch.isfinite(ref)
    err, scale = (out - ref)[finite].abs(), ref[finite].abs()
    if err.numel() == 0:
        return 0.0, None
    max_err = err.max().item()
    if (err > _LOOSE_ATOL + _LOOSE_RTOL * scale).any():
        return max_err, f"max abs err {max_err:.3g}"
    rtol, atol = _TIGHT.get(expected.dtype, _TIGHT[torch.float32])
    outliers = (err > atol + rtol * scale).double().mean().item()
    if outliers > _OUTLIER_FRACTION:
        return max_err, f"{outliers:.0%} of elements beyond tolerance, max abs err {max_err:.3g}"
    return max_err, None


def probe_norm(module: nn.Module, candidates: list[NormSpec], eps_attr: str, seed: int = 0) -> ProbeResult:
    """Find the first of `candidates` that reproduces `module`'s forward on random inputs.

    Args:
        module (`nn.Module`): an unpatched norm module with a 1-D `weight`.
        candidates (`list[NormSpec]`): specs to try, in order of preference.
        eps_attr (`str`): the attribute holding ε.
        seed (`int`, *optional*, defaults to 0): seed of the probe's private generator.

    Returns:
        `ProbeResult`: the accepted spec, or `None` and a reason such as
        `"probe mismatch: max abs err 0.31 (bfloat16 input, float32 weight, 3-D)"`. A spec that
        matches every fp32-weight configuration but not the bf16-weight ones comes with
        `dtypes=FP32_WEIGHT_DTYPES` and the reason of the bf16 mismatch.
    """
    device = module.weight.device
    if device.type == "meta":
        return ProbeResult(None, "weights are on the meta device: patch after the weights are materialized")
    forward = type(module).forward  # the class's own math, without the instance's hooks
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        copies = _perturbed_copies(module, generator)
    except Exception as error:  # any failure means we cannot vouch for the module
        return ProbeResult(None, f"probe could not copy the module: {error}")
    remaining = list(candidates)
    ran_any = False
    fp32_survivors: list[NormSpec] | None = None
    # fp32-weight configs first: a spec that fails only with bf16 weights still serves fp32 weights
    for config in sorted(_configs(device), key=lambda config: config.weight_dtype != torch.float32):
        if config.weight_dtype != torch.float32 and fp32_survivors is None:
            fp32_survivors = list(remaining) if ran_any else []
        probe_module = copies[config.weight_dtype]
        x = _probe_input(config, module.weight.shape[0], device, generator)
        # quiet: mixed-dtype configs make torch warn about its slow path, which is no news to the user
        with torch.no_grad(), _context(config, device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = forward(probe_module, x)
            except Exception:  # e.g. mixed dtypes the original refuses: that config does not count
                continue
            if not isinstance(expected, torch.Tensor):
                return ProbeResult(None, f"forward returns {type(expected).__name__}, not a tensor")
            ran_any = True
            outcomes = {spec: _run_candidate(probe_module, x, spec, eps_attr, expected) for spec in remaining}
        survivors = [spec for spec in remaining if outcomes[spec][1] is None]
        if not survivors:
            best = min(remaining, key=lambda spec: outcomes[spec][0])
            why = f"probe mismatch: {outcomes[best][1]} ({config.describe()}), closest: {best.describe()}"
            if fp32_survivors:
                return ProbeResult(fp32_survivors[0], why, FP32_WEIGHT_DTYPES)
            return ProbeResult(None, why)
        remaining = survivors
    if not ran_any:
        return ProbeResult(None, "probe failed: the original forward raised on every probe input")
    return ProbeResult(remaining[0])


def _run_candidate(module, x, spec, eps_attr, expected) -> tuple[float, str | None]:
    try:
        return _mismatch(expected, run_norm(module, x, spec, eps_attr))
    except Exception as error:  # a spec that cannot even run is simply not a match
        return math.inf, f"{type(error).__name__}: {error}"
