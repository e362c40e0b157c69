"""The forward that `patch` binds onto each norm instance, and the state it reads.

`patched_norm_forward` is a plain module-level function bound with `types.MethodType`, so
`copy.deepcopy(model)` rebinds it to the copy. Everything it needs lives in one instance
attribute, `_hf_gns_norm` (a `NormPatch`): no buffers, no parameters, nothing in the
state_dict, and `unpatch` only has to delete two instance attributes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import fused_norm
from .documents import offsets_for_rows
from .model_hook import ModelForwardHook
from .sinks import SquaredNormSinks
from .spec import NormSpec

PATCH_ATTRIBUTE = "_hf_gns_norm"


@dataclass
class NormPatch:
    """Per-instance state of a patched norm module.

    Args:
        name (`str`): the module's name in the model that was patched (for messages).
        spec (`NormSpec`): what the module computes.
        eps_attr (`str`): the attribute holding ε, read at every call.
        source (`str`): `"registry"` or `"probe"`: how the spec was found.
        model_hook (`ModelForwardHook`): the model-level hook (batch size, sink preparation).
        sinks (`SquaredNormSinks`): per-example squared norms collected in backward.
    """

    name: str
    spec: NormSpec
    eps_attr: str
    source: str
    model_hook: ModelForwardHook = field(default_factory=ModelForwardHook)
    sinks: SquaredNormSinks = field(default=None)

    def __post_init__(self):
        if self.sinks is None:
            self.sinks = SquaredNormSinks(self.name)

    def __deepcopy__(self, memo):
        # A copied model gets its own, empty statistics (the sinks' hooks point at this object)
        # and shares the copied model's hook.
        model_hook = copy.deepcopy(self.model_hook, memo)
        return NormPatch(self.name, self.spec, self.eps_attr, self.source, model_hook)

    @staticmethod
    def tracks_gradients(module: nn.Module) -> bool:
        """True when this call's backward will produce parameter gradients worth measuring."""
        if not torch.is_grad_enabled():
            return False
        bias = norm_bias(module)
        return module.weight.requires_grad or (bias is not None and bias.requires_grad)


def norm_bias(module: nn.Module) -> torch.Tensor | None:
    """β of a norm module; several HF classes have no `bias` attribute at all."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def run_norm(
    module: nn.Module,
    hidden_states: torch.Tensor,
    spec: NormSpec,
    eps_attr: str,
    sq_norm_sink: torch.Tensor | None = None,
    example_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """`module`'s forward computed by `fused_norm` according to `spec`."""
    weight = module.weight
    return fused_norm(
        hidden_states,
        weight,
        norm_bias(module),
        spec.resolve_eps(getattr(module, eps_attr), hidden_states),
        rms=spec.rms,
        weight_offset=spec.weight_offset,
        cast_before_weight=spec.cast_before_weight,
        out_dtype=spec.result_dtype(hidden_states, weight),
        sq_norm_sink=sq_norm_sink,
        example_offsets=example_offsets,
    )


def patched_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Forward of a patched norm: the fused kernel, plus a sink for per-example norms when training."""
    state: NormPatch = getattr(self, PATCH_ATTRIBUTE)
    hook = state.model_hook
    if hook.example_offsets is not None and state.tracks_gradients(
        self
    ):  # padding-free: examples are documents
        offsets = offsets_for_rows(hook.example_offsets, hidden_states, hook.token_shape)
        sink = state.sinks.take_for(offsets.shape[0] - 1, hidden_states.device)
        return run_norm(self, hidden_states, state.spec, state.eps_attr, sink, offsets)
    x = hook.group_rows(hidden_states)  # (B, ..., D): dim 0 indexes examples
    sink = state.sinks.take(x) if state.tracks_gradients(self) else None
    y = run_norm(self, x, state.spec, state.eps_attr, sink)
    return y if x.dim() == hidden_states.dim() else y.reshape(hidden_states.shape)
