"""Structural checks: which modules are norms, and which of those the fused op can replace.

A module is *norm-like* when its class (or a registered base) is a registered norm, or
its class name contains "Norm" past the model family's prefix and it is not an Embedding,
Linear or convolution — unless it is a mere container (children, no parameters
of its own, e.g. StableLmLayerNormPerHead, whose child nn.LayerNorms are the norms).
Every norm-like module appears in the report, patched or skipped with a reason.

A norm-like module is *patchable* when it looks like what `fused_norm` computes: no
children, a 1-D `weight` (and optionally a 1-D `bias`) over the last dim and nothing
else, an ε attribute, a forward taking a single tensor. Whether its math really is that
is then decided by the probe.
"""

from __future__ import annotations

import inspect
import numbers

import torch
from torch import nn

from .registry import has_registered_base, registered_spec
from .spec import EPS_ATTRIBUTES, NormSpec

# Norms over other dims than the last one, whatever their parameters look like.
_OTHER_AXIS_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)


# Layers whose class name may say "Norm" (InklingNormedEmbedding) but that are not norms.
_LAYER_CLASSES = (nn.Embedding, nn.Linear, nn.modules.conv._ConvNd)


def _name_says_norm(cls: type) -> bool:
    """ "Norm" in the class name, past the model family's prefix (RobertaPreLayerNormLMHead is a head)."""
    name = cls.__name__
    family = cls.__module__.rpartition(".")[2].removeprefix("modeling_").replace("_", "").lower()
    if family and name.lower().startswith(family):
        name = name[len(family) :]
    return "Norm" in name


def is_norm_like(module: nn.Module) -> bool:
    """Whether `module` is a normalization layer that the report must account for."""
    cls = type(module)
    if not has_registered_base(cls) and (isinstance(module, _LAYER_CLASSES) or not _name_says_norm(cls)):
        return False
    has_children = next(module.children(), None) is not None
    has_own_parameters = next(module.parameters(recurse=False), None) is not None
    return has_own_parameters or not has_children


def find_eps_attr(module: nn.Module, spec: NormSpec | None = None) -> str | None:
    """The attribute holding ε: the spec's choice, else the first of `EPS_ATTRIBUTES` present."""
    names = (spec.eps_attr,) if spec is not None and spec.eps_attr else EPS_ATTRIBUTES
    for name in names:
        if hasattr(module, name):
            value = getattr(module, name)
            if value is None or isinstance(value, numbers.Real):
                return name
    return None


def _extra_forward_arguments(cls: type) -> list[str]:
    """Parameters of `cls.forward` beyond `self` and the input tensor."""
    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # builtins without a signature: let the probe decide
        return []
    return [str(p) for p in parameters[1:]] if parameters else ["(no input argument)"]


def unsupported_reason(module: nn.Module) -> str | None:
    """Why `module` cannot be replaced by the fused op, or `None` if it may be (probe pending)."""
    cls = type(module)
    if "forward" in module.__dict__:
        return (
            "its forward is already replaced on the instance (accelerate device_map hooks or another "
            "patcher?); patch a model without instance-level forward overrides"
        )
    if isinstance(module, _OTHER_AXIS_NORMS):
        return f"{cls.__name__} normalizes over other dims than the last one: not supported"
    if next(module.children(), None) is not None:
        return "has child modules: not a plain norm layer"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        if next(module.parameters(recurse=False), None) is not None:
            names = ", ".join(name for name, _ in module.named_parameters(recurse=False))
            return f"no `weight` (its parameters: {names}): not a plain norm layer"
        return "no learnable weight: nothing to track (left unpatched)"
    if weight.dim() != 1:
        return (
            f"{weight.dim()}-D weight {tuple(weight.shape)} (per-head weights) not supported: "
            "the fused op takes a 1-D γ over the last dim"
        )
    bias = getattr(module, "bias", None)
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.shape == weight.shape):
        return f"bias {getattr(bias, 'shape', bias)!r} does not match weight {tuple(weight.shape)}"
    others = [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
    if others:
        return f"has parameters other than weight and bias ({', '.join(others)}): not a plain norm layer"
    extra = _extra_forward_arguments(cls)
    if extra:
        return f"forward takes more than one input ({', '.join(extra)}): not supported"
    registered = registered_spec(cls)
    spec = registered[0] if registered is not None else None
    if find_eps_attr(module, spec) is None:
        wanted = spec.eps_attr if spec is not None and spec.eps_attr else " / ".join(EPS_ATTRIBUTES)
        return f"no ε attribute ({wanted}): cannot tell which ε it uses"
    return None


def call_route_reason(module: nn.Module) -> str | None:
    """Why `module` cannot take the per-example call either (`per_example_call.py`), or `None`.

    The call runs the module's own forward per example, so it takes what the fused op does not
    (several inputs, N-D or grouped weights, other parameter names, no ε attribute); it still
    needs the module to be a leaf with parameters of its own, normalizing each example alone.
    """
    if "forward" in module.__dict__:
        return unsupported_reason(module)
    if isinstance(module, _OTHER_AXIS_NORMS):
        return f"{type(module).__name__} normalizes over other dims than the last one: not supported"
    if next(module.children(), None) is not None:
        return "has child modules: not a plain norm layer"
    if next(module.parameters(recurse=False), None) is None:
        return "no learnable weight: nothing to track (left unpatched)"
    return None


def shared_module_names(model: nn.Module) -> dict[int, list[str]]:
    """Names under which each module that appears more than once in `model` is reachable.

    A norm module reachable from two parents is normally called twice per forward; its
    per-example gradient is the sum of both calls', whose squared norm the fused op cannot
    give (|a+b|² ≠ |a|²+|b|²). Keyed by `id(module)`.
    """
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return {key: found for key, found in names.items() if len(found) > 1}
