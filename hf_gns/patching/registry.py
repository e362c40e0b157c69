"""Registry of known norm classes: class → `NormSpec`, looked up along the MRO.

Two tables:
- user registrations, keyed by the class object (`register_norm`);
- built-in entries for torch and HuggingFace classes, keyed by `"module.QualName"`
  strings, so that nothing is imported to fill the table: a class that was never imported
  has no instances to patch.

A registered spec applies to a subclass only if the subclass inherits the registered
forward. HF subclasses nn.LayerNorm with different math (NemotronLayerNorm1P's γ+1,
ChameleonLayerNorm, channel-first LayerNorm2d): those go to the structural fallback and
its probe instead of silently inheriting nn.LayerNorm's spec.

HF has dozens of copies of LlamaRMSNorm (MistralRMSNorm, Qwen2RMSNorm, Gemma3RMSNorm, ...):
only the originals of each flavour are listed here; the copies are found by the probe.
"""

from __future__ import annotations

from torch import nn

from .spec import NormSpec

_LLAMA = NormSpec(rms=True, cast_before_weight=True, output_dtype="promote")
_GEMMA = NormSpec(rms=True, weight_offset=1.0)

BUILTIN_SPECS: dict[str, NormSpec] = {
    "torch.nn.modules.normalization.LayerNorm": NormSpec(rms=False, autocast_op="layer_norm"),
    "torch.nn.modules.normalization.RMSNorm": NormSpec(rms=True, autocast_op="rms_norm"),
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": _LLAMA,
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm": _GEMMA,
    "transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm": NormSpec(rms=True),
    "transformers.models.cohere.modeling_cohere.CohereLayerNorm": NormSpec(rms=False),
}

_user_specs: dict[type, NormSpec] = {}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_norm(cls_or_spec, spec: NormSpec | None = None):
    """Register a norm class so that `hf_gns.patch` recognizes it and its subclasses.

    The spec is still confirmed by the numerical probe when the model is patched.

    Args:
        cls_or_spec (`type` or `NormSpec`): the class, or the spec when used as a decorator.
        spec (`NormSpec`, *optional*): the spec, when the class is given first.

    Raises:
        `ValueError`: if the class is already registered (call `unregister_norm` first).

    Example:
    ```python
    >>> hf_gns.register_norm(MyRMSNorm, NormSpec(rms=True))
    >>> @hf_gns.register_norm(NormSpec(rms=True, weight_offset=1.0))
    ... class MyGemmaNorm(nn.Module): ...
    ```
    """
    if isinstance(cls_or_spec, NormSpec) and spec is None:
        return lambda cls: register_norm(cls, cls_or_spec)
    cls = cls_or_spec
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_norm expects an nn.Module subclass, got {cls!r}")
    if not isinstance(spec, NormSpec):
        raise TypeError(f"register_norm expects a NormSpec for {cls.__name__}, got {spec!r}")
    if cls in _user_specs or _qualified_name(cls) in BUILTIN_SPECS:
        raise ValueError(
            f"{_qualified_name(cls)} is already registered as a norm; call hf_gns.unregister_norm(cls) "
            "first to replace its spec"
        )
    _user_specs[cls] = spec
    return cls


def unregister_norm(cls: type) -> None:
    """Remove a registration made with `register_norm` (built-in entries cannot be removed)."""
    if cls not in _user_specs:
        raise KeyError(f"{_qualified_name(cls)} was not registered with hf_gns.register_norm")
    del _user_specs[cls]


def _spec_of(cls: type) -> NormSpec | None:
    return _user_specs.get(cls) or BUILTIN_SPECS.get(_qualified_name(cls))


def has_registered_base(cls: type) -> bool:
    """Whether `cls` or a base class is registered (whether or not it overrides the forward)."""
    return any(_spec_of(base) is not None for base in cls.__mro__)


def registered_spec(cls: type) -> tuple[NormSpec, type] | None:
    """The spec registered for `cls` or its nearest registered base class, with that base.

    Returns `None` when no class on the MRO is registered, or when `cls` overrides the
    registered class's `forward` (its math may differ: the probe decides).
    """
    for base in cls.__mro__:
        spec = _spec_of(base)
        if spec is not None:
            return (spec, base) if cls.forward is base.forward else None
    return None
